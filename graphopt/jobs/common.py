"""What the jobs share: a model given as a :class:`~graphopt.core.model.Model` or a path."""

from __future__ import annotations

import os

from graphopt.core.loader import load
from graphopt.core.model import Model

#: a Model, or the path of an ONNX file
ModelLike = Model | str | os.PathLike[str]


def as_model(model: ModelLike) -> Model:
    """``model`` itself when it is a :class:`Model`, else the model loaded from that path."""
    return model if isinstance(model, Model) else load(model)
