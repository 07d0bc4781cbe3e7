"""Training on ONNX graphs: recover what compression loses, from the ONNX file alone (needs torch,
the ``graphopt[train]`` extra).

This package's ``__init__`` imports no torch (its names load on first use, PEP 562), and nothing
outside the package imports a submodule at module level: the jobs call :func:`require` and import
inside the function that trains, so ``import graphopt`` and every other command work without
torch.

* :class:`~.module.OnnxModule` -- an ONNX graph as a trainable ``torch.nn.Module`` (an
  interpreter over the graph's nodes, parameters named by their ONNX tensors).
* :func:`~.export.write_back` -- trained tensors back into the same graph, by name.
* :mod:`.distill` -- output distillation (Hinton et al. 2015, "Distilling the knowledge in a
  neural network") and feature distillation (Romero et al. 2015, "FitNets: hints for thin deep
  nets") of a student graph from its teacher on unlabeled inputs.
* :mod:`.qat` with :mod:`.fakequant` -- quantization-aware training of a QDQ graph with learned
  step sizes (Esser et al. 2020, "Learned Step Size Quantization", LSQ), exported as the same
  QDQ graph.
* :mod:`.adaround` -- learned rounding of weights (Nagel et al. 2020, "Up or Down? Adaptive
  Rounding for Post-Training Quantization", AdaRound).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from graphopt.core.errors import OptionError

if TYPE_CHECKING:
    from .export import replace_tensors, same_structure, verify_export, write_back
    from .module import OnnxModule

__all__ = [
    "OnnxModule",
    "available",
    "replace_tensors",
    "require",
    "same_structure",
    "verify_export",
    "write_back",
]

_LAZY = {
    "OnnxModule": "module",
    "replace_tensors": "export",
    "same_structure": "export",
    "verify_export": "export",
    "write_back": "export",
}


def available() -> bool:
    """Whether torch is installed and imports (the ``graphopt[train]`` extra); imports it."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def require(what: str) -> None:
    """Raise :class:`OptionError` (exit 2) naming the extra when torch is missing.

    Args:
        what: the option that needs training, e.g. ``"--recover distill"``.
    """
    if not available():
        raise OptionError(
            f"{what} trains the model with torch, which is not installed: "
            "pip install graphopt[train] (the CPU build is enough: add "
            "--extra-index-url https://download.pytorch.org/whl/cpu)"
        )


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
