"""graphopt: a compiler-style graph optimizer for ONNX models.

Public API::

    import graphopt
    model = graphopt.load("model.onnx")
    info = graphopt.inspect(model, input_shapes={"x": (1, 3, 640, 640)})      # InspectResult
    result = graphopt.optimize(model, input_shapes={"x": (1, 3, 640, 640)})   # OptimizeResult
    graphopt.save(result.model, "model.opt.onnx")
    print(result.to_json())                    # what `graphopt optimize --json` prints

Every job (``inspect``, ``optimize``, ``quantize``, ``prune``, ``plan_memory``, ``fp16``,
``compile``, ``run``, ``diff``, ``run_recipe``) takes a Model or a path and returns a typed result
whose ``to_json()`` is exactly what the matching command prints with ``--json``.

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
    from graphopt.jobs.compile import CompileResult
    from graphopt.jobs.compile import compile_model as compile  # noqa: A004
    from graphopt.jobs.diff import DiffResult, diff
    from graphopt.jobs.fp16 import Fp16Result, fp16
    from graphopt.jobs.inspect import InspectResult, inspect
    from graphopt.jobs.optimize import OptimizeResult, optimize
    from graphopt.jobs.plan import PlanResult, plan_memory
    from graphopt.jobs.prune import PruneResult, PruneScanResult, prune, prune_scan
    from graphopt.jobs.quantize import QuantizeResult, quantize
    from graphopt.jobs.recipe import RecipeResult, run_recipe
    from graphopt.jobs.run import RunResult, run

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
    "prune_scan": ("graphopt.jobs.prune", "prune_scan"),
    "plan_memory": ("graphopt.jobs.plan", "plan_memory"),
    "fp16": ("graphopt.jobs.fp16", "fp16"),
    "compile": ("graphopt.jobs.compile", "compile_model"),
    "run": ("graphopt.jobs.run", "run"),
    "run_recipe": ("graphopt.jobs.recipe", "run_recipe"),
    "diff": ("graphopt.jobs.diff", "diff"),
    "InspectResult": ("graphopt.jobs.inspect", "InspectResult"),
    "OptimizeResult": ("graphopt.jobs.optimize", "OptimizeResult"),
    "QuantizeResult": ("graphopt.jobs.quantize", "QuantizeResult"),
    "PruneResult": ("graphopt.jobs.prune", "PruneResult"),
    "PruneScanResult": ("graphopt.jobs.prune", "PruneScanResult"),
    "PlanResult": ("graphopt.jobs.plan", "PlanResult"),
    "Fp16Result": ("graphopt.jobs.fp16", "Fp16Result"),
    "CompileResult": ("graphopt.jobs.compile", "CompileResult"),
    "RunResult": ("graphopt.jobs.run", "RunResult"),
    "DiffResult": ("graphopt.jobs.diff", "DiffResult"),
    "RecipeResult": ("graphopt.jobs.recipe", "RecipeResult"),
}

__all__ = [
    "CompileResult",
    "DiffResult",
    "Fp16Result",
    "GraphoptError",
    "InspectResult",
    "Model",
    "ModelLoadError",
    "OptimizeResult",
    "PassError",
    "PlanResult",
    "PruneResult",
    "PruneScanResult",
    "QuantizeResult",
    "RecipeResult",
    "RunResult",
    "VerificationError",
    "__version__",
    "compile",
    "diff",
    "fp16",
    "from_torch",
    "inspect",
    "load",
    "optimize",
    "plan_memory",
    "prune",
    "prune_scan",
    "quantize",
    "run",
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
