"""graphopt: a compiler-style graph optimizer for ONNX models.

Public API::

    import graphopt
    model = graphopt.load("model.onnx")
    info = graphopt.inspect(model, input_shapes={"x": (1, 3, 640, 640)})
    result = graphopt.optimize(model, input_shapes={"x": (1, 3, 640, 640)})
    graphopt.save(result.model, "model.opt.onnx")

Heavy modules are imported on first use, so ``import graphopt`` stays fast.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from graphopt.core.errors import GraphoptError, ModelLoadError, PassError, VerificationError
from graphopt.core.model import Model, load

if TYPE_CHECKING:
    from graphopt.jobs.optimize import OptimizeResult

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

ModelLike = Model | str | os.PathLike[str]


def _as_model(model: ModelLike) -> Model:
    return model if isinstance(model, Model) else Model.load(model)


def save(model: Model, path: str | os.PathLike[str], **kwargs: Any) -> Path:
    """Write ``model`` atomically (see :func:`graphopt.core.saver.save_model`)."""
    return model.save(path, **kwargs)


def inspect(model: ModelLike, input_shapes: Mapping[str, Sequence[int]] | None = None,
            per_node: bool = False) -> dict[str, Any]:
    """The ``graphopt inspect --json`` summary of a model (a path or a Model; not modified)."""
    from graphopt.jobs.inspect import inspect_model
    from graphopt.jobs.optimize import prepare

    m = prepare(_as_model(model).clone(), input_shapes)
    return inspect_model(m, per_node=per_node)


def optimize(model: ModelLike, **kwargs: Any) -> OptimizeResult:
    """Run the default (or given) pass pipeline and verify; see
    :func:`graphopt.jobs.optimize.optimize_model`.

    Returns an ``OptimizeResult`` with ``.model``, ``.verify`` and per-pass ``.stats()``.
    """
    from graphopt.jobs.optimize import optimize_model

    return optimize_model(_as_model(model), **kwargs)


def quantize(model: ModelLike, calib: Any, **kwargs: Any) -> Any:
    """Calibration-based int8 QDQ quantization; see :func:`graphopt.jobs.quantize.quantize`.

    Returns a ``QuantizeResult`` with ``.model``, per-layer reports, the layers kept in float and
    the verify figures against fp32.
    """
    from graphopt.jobs.quantize import quantize as _quantize

    return _quantize(model, calib, **kwargs)


def prune(model: ModelLike, ratio: float | dict[str, float], **kwargs: Any) -> Any:
    """Structured channel pruning with least-squares recovery; see
    :func:`graphopt.jobs.prune.prune`."""
    from graphopt.jobs.prune import prune as _prune

    return _prune(model, ratio, **kwargs)


def plan_memory(model: ModelLike, input_shapes: Mapping[str, Sequence[int]] | None = None,
                **kwargs: Any) -> Any:
    """Plan activations into one arena; see :func:`graphopt.algorithms.memory.planner.plan_memory`."""
    from graphopt.algorithms.memory.planner import plan_memory as _plan

    return _plan(_as_model(model), input_shapes, **kwargs)


def compile(model: ModelLike, target: str = "llvm", output: str | os.PathLike[str] = "model.so",
            **kwargs: Any) -> Any:  # noqa: A001 - the public name DESIGN.md asks for
    """Compile through Apache TVM (llvm, aarch64, cuda); see
    :func:`graphopt.algorithms.tvm.emit.compile_model`."""
    from graphopt.algorithms.tvm.emit import compile_model

    return compile_model(model, target=target, output=output, **kwargs)


def from_torch(module: Any, example_inputs: Any, **kwargs: Any) -> Model:
    """Export a ``torch.nn.Module`` through torch.onnx; see
    :func:`graphopt.core.torch_export.from_torch`."""
    from graphopt.core.torch_export import from_torch as _from_torch

    return _from_torch(module, example_inputs, **kwargs)


def run_recipe(model: ModelLike, recipe: Any, **kwargs: Any) -> Any:
    """Run a recipe (built-in name, TOML path or mapping); see
    :func:`graphopt.jobs.recipe.run_recipe`."""
    from graphopt.jobs.recipe import run_recipe as _run

    return _run(model, recipe, **kwargs)


def diff(a: ModelLike, b: ModelLike, **kwargs: Any) -> Any:
    """Structural and numerical diff of two models; see :func:`graphopt.algorithms.diff.diff_models`."""
    from graphopt.algorithms.diff import diff_models
    from graphopt.jobs.optimize import prepare

    return diff_models(prepare(_as_model(a).clone()), prepare(_as_model(b).clone()), **kwargs)


__all__ = [
    "GraphoptError",
    "Model",
    "ModelLoadError",
    "PassError",
    "VerificationError",
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
