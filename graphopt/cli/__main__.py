"""``python -m graphopt.cli``: the ``graphopt`` command."""

from __future__ import annotations

from graphopt.cli import entry

entry()
