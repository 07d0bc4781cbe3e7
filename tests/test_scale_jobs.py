"""The jobs' shortcuts for a model they loaded themselves (issue 15: no copy of it, one export of
the result) write exactly what they write for a Model given in memory, which they copy."""

from __future__ import annotations

from pathlib import Path

import pytest

from graphopt.core.loader import load
from graphopt.fixtures import fixture_path
from graphopt.jobs.optimize import optimize
from graphopt.jobs.plan import plan_memory


@pytest.mark.parametrize("fixture", ["cnn.onnx", "residual.onnx"])
def test_optimize_from_path_equals_from_model(fixture: str, tmp_path: Path) -> None:
    path = fixture_path(fixture)
    given = load(path)
    before = given.to_onnx().SerializeToString()
    a = optimize(path, output=tmp_path / "a.onnx")
    b = optimize(given, output=tmp_path / "b.onnx")
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert a.to_json()["verify"] == b.to_json()["verify"]
    assert given.to_onnx().SerializeToString() == before  # a Model given is not changed


@pytest.mark.parametrize("fixture", ["cnn.onnx", "mobilenet_block.onnx"])
def test_plan_from_path_equals_from_model(fixture: str, tmp_path: Path) -> None:
    path = fixture_path(fixture)
    given = load(path)
    before = given.to_onnx().SerializeToString()
    a = plan_memory(path, output=tmp_path / "a.onnx")
    b = plan_memory(given, output=tmp_path / "b.onnx")
    assert b.to_json()["arena_bytes"] == a.to_json()["arena_bytes"]
    assert a.proof is not None and a.proof.ok
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert (tmp_path / "a.onnx.memplan.json").read_text() == (
        tmp_path / "b.onnx.memplan.json"
    ).read_text()
    assert given.to_onnx().SerializeToString() == before
