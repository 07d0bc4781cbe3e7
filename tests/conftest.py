"""Shared pytest fixtures: the bundled fixture models and the published real models."""

from __future__ import annotations

import pytest

from graphopt.core.loader import load
from graphopt.core.model import Model
from graphopt.fixtures import FIXTURES, REAL_MODELS, fixture_path, real_model


@pytest.fixture(params=FIXTURES)
def fixture_name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def load_fixture():
    """``load_fixture('cnn.onnx') -> Model``."""

    def _load(name: str) -> Model:
        return load(fixture_path(name))

    return _load


def real_or_skip(name: str):
    """(path, shapes) of a real model, or skip the test with the reason."""
    try:
        return real_model(name)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


REAL_NAMES = tuple(n for n in REAL_MODELS if n != "silero_op15")
