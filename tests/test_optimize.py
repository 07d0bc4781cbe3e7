"""Round trip of every fixture and real model through the default pipeline: load, run every exact
pass, save, reload; onnxruntime must agree with the input at fp32 noise, subgraphs included."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REAL_NAMES, real_or_skip

from graphopt.core.loader import load
from graphopt.core.saver import save
from graphopt.core.shapes import prepare
from graphopt.core.verify import verify
from graphopt.fixtures import FIXTURES, fixture_path, real_model_feeds
from graphopt.jobs.optimize import ATOL, RTOL, default_pipeline, optimize_model


@pytest.mark.parametrize("target", ["portable", "ort"])
@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_optimize_round_trip(name: str, target: str, tmp_path: Path) -> None:
    shapes = {"x": (2, 1, 8, 8)} if name == "digits_cnn.onnx" else None
    src = load(fixture_path(name))
    res = optimize_model(src, target=target, input_shapes=shapes)
    assert res.verify is not None and res.verify.ok
    out = save(res.model, tmp_path / name)
    ref = prepare(load(fixture_path(name)), shapes)
    rep = verify(ref, out, rtol=RTOL, atol=ATOL, samples=2)
    assert rep.ok, rep.to_json()
    assert res.model.num_nodes() <= ref.num_nodes()


@pytest.mark.real
@pytest.mark.parametrize("name", REAL_NAMES)
def test_real_optimize_round_trip(name: str, tmp_path: Path) -> None:
    path, shapes = real_or_skip(name)
    feeds = real_model_feeds(name)
    res = optimize_model(load(path), input_shapes=shapes, feeds=feeds)
    out = save(res.model, tmp_path / "opt.onnx")
    reloaded = load(out)
    assert reloaded.num_subgraphs() <= load(path).num_subgraphs()
    ref = prepare(load(path), shapes)
    rep = verify(ref, out, feeds=feeds, rtol=RTOL, atol=ATOL)
    assert rep.ok, rep.to_json()


def test_default_pipeline_known_passes() -> None:
    assert "eliminate-dead" in default_pipeline()
    with pytest.raises(Exception, match="unknown target"):
        default_pipeline("nope")
