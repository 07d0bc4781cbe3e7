"""Built-in passes, one module each. ``PASS_INDEX`` maps every built-in pass name to its module so
that a pass is imported only when it is used (pruning and quantization pull in numba and networkx,
which the default optimize pipeline does not need). ``load_all()`` imports every module (for
``graphopt list-passes``); a test checks that the index matches what the modules register."""

from __future__ import annotations

import importlib

#: pass name -> module in this package
PASS_INDEX: dict[str, str] = {
    "fold-constants": "fold_constants",
    "eliminate-noop": "eliminate_noop",
    "eliminate-cse": "eliminate_cse",
    "eliminate-dead": "eliminate_dead",
    "eliminate-identity": "eliminate_identity",
    "toposort": "toposort",
    "plan-memory": "plan_memory",
    "reorder-memory": "reorder_memory",
    "fuse-conv-bn": "fuse_conv_bn",
    "fuse-conv-mul-add": "fuse_conv_mul_add",
    "fp16": "fp16",
    "recognize-activations": "recognize_activations",
    "fuse-pad": "fuse_pad",
    "fuse-matmul-add": "fuse_matmul_add",
    "fuse-conv-activation": "fuse_conv_activation",
    "fuse-slices": "fuse_slices",
    "prune-channels": "prune_channels",
    "prune-magnitude": "prune_magnitude",
    "quantize-int8": "quantize_int8",
}

PASS_MODULES: list[str] = list(dict.fromkeys(PASS_INDEX.values()))


def load(name: str) -> bool:
    """Import the module of the built-in pass ``name``; False if no built-in pass has that name."""
    module = PASS_INDEX.get(name)
    if module is None:
        return False
    importlib.import_module(f"{__name__}.{module}")
    return True


def load_all() -> None:
    """Import every built-in pass module (each registers its passes)."""
    for module in PASS_MODULES:
        importlib.import_module(f"{__name__}.{module}")
