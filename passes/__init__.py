"""Built-in passes, one module each (file named after the pass), and the catalogue that finds a
pass by name.

``PASS_INDEX`` maps every built-in pass name to its module so that a pass is imported only when it
is used (pruning and quantization pull in their algorithms, which the default optimize pipeline
does not need). ``load_all()`` imports every module (for ``graphopt list-passes``); a test checks
that the index matches what the modules register. :func:`get_pass` and :func:`resolve_passes` turn
names into pass instances for the jobs and the CLI.

This package is the passes layer: it imports :mod:`graphopt.core` and :mod:`graphopt.algorithms`,
never a job, and no pass module imports another.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterable, Sequence
from typing import Any

from graphopt.core.errors import GraphoptError, UnknownPassError
from graphopt.core.pass_manager import Pass, registered_pass_classes

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
    "fuse-attention": "fuse_attention",
    "annotate-fusion-groups": "annotate_fusion_groups",
    "fuse-slices": "fuse_slices",
    "merge-slices": "merge_slices",
    "fuse-space-to-depth": "fuse_space_to_depth",
    "simplify-symbolic-shapes": "simplify_symbolic_shapes",
    "prune-channels": "prune_channels",
    "prune-magnitude": "prune_magnitude",
    "quantize-int8": "quantize_int8",
    "fuse-layernorm": "fuse_layernorm",
    "fuse-gelu": "fuse_gelu",
    "fuse-skip-layernorm": "fuse_skip_layernorm",
    "sum-residual-adds": "sum_residual_adds",
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


def registered_passes() -> dict[str, type[Pass]]:
    """All registered passes by name, sorted (imports every built-in pass module)."""
    load_all()
    return dict(sorted(registered_pass_classes().items()))


def known_pass_names() -> set[str]:
    """Names of every built-in and registered pass, without importing the pass modules."""
    return set(PASS_INDEX) | set(registered_pass_classes())


def pass_class(name: str) -> type[Pass]:
    """The class of a pass by name, importing only its module. Raises UnknownPassError."""
    if name not in registered_pass_classes():
        load(name)
    cls = registered_pass_classes().get(name)
    if cls is None:
        close = difflib.get_close_matches(name, sorted(known_pass_names()), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UnknownPassError(
            f"unknown pass '{name}'{hint}; 'graphopt list-passes' shows the available passes"
        )
    return cls


def get_pass(name: str, **options: Any) -> Pass:
    """Instantiate a registered pass by name. Unknown names raise :class:`UnknownPassError`."""
    cls = pass_class(name)
    try:
        return cls(**options)
    except TypeError as exc:
        raise GraphoptError(f"bad options for pass '{name}': {exc}") from None


def resolve_passes(spec: str | Sequence[str | Pass]) -> list[Pass]:
    """Turn 'a,b,c' or a list of names/passes into pass instances."""
    items: Iterable[str | Pass]
    items = [s.strip() for s in spec.split(",") if s.strip()] if isinstance(spec, str) else spec
    return [p if isinstance(p, Pass) else get_pass(p) for p in items]
