"""graphopt: a compiler-style graph optimizer for ONNX models."""

from __future__ import annotations

import logging

from graphopt.errors import GraphoptError, ModelLoadError, PassError, VerificationError
from graphopt.ir import Model, load

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())


def save(model: Model, path: str, **kwargs: object) -> object:
    """Write ``model`` atomically (see :func:`graphopt.emit.onnx.save_model`)."""
    return model.save(path, **kwargs)


__all__ = [
    "GraphoptError",
    "Model",
    "ModelLoadError",
    "PassError",
    "VerificationError",
    "load",
    "save",
]
