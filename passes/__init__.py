"""Built-in passes. Importing this package registers every pass module listed in ``PASS_MODULES``."""

from __future__ import annotations

import importlib

PASS_MODULES = [
    "constant_folding",
    "noop_elimination",
    "cse",
    "dead_node_elimination",
    "identity_elimination",
    "topological_sort",
    "memory_plan",
    "memory_order",
    "fuse_conv_bn",
    "fuse_conv_affine",
    "fp16",
    "recognize_activations",
    "fuse_pad",
    "fuse_matmul_add",
    "fuse_conv_activation",
    "fuse_slices",
    "prune_channels",
    "prune_magnitude",
    "quantize",
]

for _m in PASS_MODULES:
    importlib.import_module(f"{__name__}.{_m}")
