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

from graphopt.errors import GraphoptError, ModelLoadError, PassError, VerificationError
from graphopt.ir import Model, load

if TYPE_CHECKING:
    from graphopt.optimize import OptimizeResult

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

ModelLike = Model | str | os.PathLike[str]


def _as_model(model: ModelLike) -> Model:
    return model if isinstance(model, Model) else Model.load(model)


def save(model: Model, path: str | os.PathLike[str], **kwargs: Any) -> Path:
    """Write ``model`` atomically (see :func:`graphopt.emit.onnx.save_model`)."""
    return model.save(path, **kwargs)


def inspect(model: ModelLike, input_shapes: Mapping[str, Sequence[int]] | None = None,
            per_node: bool = False) -> dict[str, Any]:
    """The ``graphopt inspect --json`` summary of a model (a path or a Model; not modified)."""
    from graphopt.inspect import inspect_model
    from graphopt.optimize import prepare

    m = prepare(_as_model(model).clone(), input_shapes)
    return inspect_model(m, per_node=per_node)


def optimize(model: ModelLike, **kwargs: Any) -> OptimizeResult:
    """Run the default (or given) pass pipeline and verify; see :func:`graphopt.optimize.optimize_model`.

    Returns an ``OptimizeResult`` with ``.model``, ``.verify`` and per-pass ``.stats()``.
    """
    from graphopt.optimize import optimize_model

    return optimize_model(_as_model(model), **kwargs)


__all__ = [
    "GraphoptError",
    "Model",
    "ModelLoadError",
    "PassError",
    "VerificationError",
    "inspect",
    "load",
    "optimize",
    "save",
]
