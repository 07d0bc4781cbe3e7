"""``python -m graphopt.cli``: the ``graphopt`` command."""

from __future__ import annotations

import sys

from graphopt.cli import main

sys.exit(main())
