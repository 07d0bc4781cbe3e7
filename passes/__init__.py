"""Built-in passes. Importing this package registers every pass module listed in ``PASS_MODULES``."""

from __future__ import annotations

import importlib

PASS_MODULES = [
    "dead_node_elimination",
    "identity_elimination",
    "topological_sort",
    "fp16",
]

for _m in PASS_MODULES:
    importlib.import_module(f"{__name__}.{_m}")
