"""graphopt: a compiler-style graph optimizer for ONNX models.

Public API::

    import graphopt
    model = graphopt.load("model.onnx")
    info = graphopt.inspect(model, input_shapes={"x": (1, 3, 640, 640)})
    result = graphopt.optimize(model, input_shapes={"x": (1, 3, 640, 640)})
    graphopt.save(result.model, "model.opt.onnx")

This module is a facade over the layers (``graphopt.core`` <- ``graphopt.algorithms`` <-
``graphopt.passes`` <- ``graphopt.jobs`` <- ``graphopt.cli``): every name below is imported from
its layer on first use (PEP 562), so ``import graphopt`` stays fast; type checkers see the real
functions and their return types through the ``TYPE_CHECKING`` imports.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

from graphopt.core import __version__

if TYPE_CHECKING:
    from graphopt.core.errors import GraphoptError, ModelLoadError, PassError, VerificationError
    from graphopt.core.loader import load
    from graphopt.core.model import Model
    from graphopt.core.saver import save
    from graphopt.core.torch_export import from_torch
    from graphopt.jobs.compile import compile_model as compile  # noqa: A004
    from graphopt.jobs.diff import diff
    from graphopt.jobs.inspect import inspect
    from graphopt.jobs.optimize import optimize
    from graphopt.jobs.plan import plan_memory
    from graphopt.jobs.prune import prune
    from graphopt.jobs.quantize import quantize
    from graphopt.jobs.recipe import run_recipe

logging.getLogger(__name__).addHandler(logging.NullHandler())

#: public name -> (module, attribute)
_EXPORTS: dict[str, tuple[str, str]] = {
    "GraphoptError": ("graphopt.core.errors", "GraphoptError"),
    "ModelLoadError": ("graphopt.core.errors", "ModelLoadError"),
    "PassError": ("graphopt.core.errors", "PassError"),
    "VerificationError": ("graphopt.core.errors", "VerificationError"),
    "Model": ("graphopt.core.model", "Model"),
    "load": ("graphopt.core.loader", "load"),
    "save": ("graphopt.core.saver", "save"),
    "from_torch": ("graphopt.core.torch_export", "from_torch"),
    "inspect": ("graphopt.jobs.inspect", "inspect"),
    "optimize": ("graphopt.jobs.optimize", "optimize"),
    "quantize": ("graphopt.jobs.quantize", "quantize"),
    "prune": ("graphopt.jobs.prune", "prune"),
    "plan_memory": ("graphopt.jobs.plan", "plan_memory"),
    "compile": ("graphopt.jobs.compile", "compile_model"),
    "run_recipe": ("graphopt.jobs.recipe", "run_recipe"),
    "diff": ("graphopt.jobs.diff", "diff"),
}

__all__ = [
    "GraphoptError",
    "Model",
    "ModelLoadError",
    "PassError",
    "VerificationError",
    "__version__",
    "compile",
    "diff",
    "from_torch",
    "inspect",
    "load",
    "optimize",
    "plan_memory",
    "prune",
    "quantize",
    "run_recipe",
    "save",
]


def __getattr__(name: str) -> Any:
    try:
        module, attr = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'graphopt' has no attribute '{name}'") from None
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value  # the next access does not come back here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
