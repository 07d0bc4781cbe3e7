"""Regression tests for what bench/corpus.py found running graphopt on the real-model corpus
(issue 14), one per finding. The feed-form finding (files batched together) is in
test_conformance_findings.py with the other feed tests.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from graphopt.core.errors import VerificationError
from graphopt.core.model import Model
from graphopt.core.session import make_session
from graphopt.jobs import optimize as opt_job
from graphopt.jobs.optimize import optimize


def _relu() -> Model:
    g = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["a"]), helper.make_node("Relu", ["a"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return Model.from_onnx(proto)


def test_optimized_model_that_loads_only_without_optimizations_is_not_written(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Verification runs at ORT_DISABLE_ALL; the output must also load at ORT_ENABLE_ALL."""
    real = opt_job._load_error

    def only_the_output_fails(model: Model | onnx.ModelProto, level: str) -> str | None:
        # the job hands over the optimized graph exported (a ModelProto) or as a Model
        ops = (
            model.op_histogram()
            if isinstance(model, Model)
            else dict(Counter(n.op_type for n in model.graph.node))
        )
        if ops == {"Relu": 1}:  # the optimized graph
            return "Node (If_0) Op (If) [TypeInferenceError] ..."
        return real(model, level)

    monkeypatch.setattr(opt_job, "_load_error", only_the_output_fails)
    with pytest.raises(VerificationError, match="does not load in onnxruntime at ORT_ENABLE_ALL"):
        optimize(_relu())
    monkeypatch.setattr(opt_job, "_load_error", real)
    assert optimize(_relu()).model.op_histogram() == {"Relu": 1}  # the negative: it loads


@pytest.mark.real
def test_silero_vad_with_fixed_dims_onnxruntime_refuses_is_said(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """silero-vad with --input-shape input:1x576 (16 kHz: 512 samples + 64 of context) is
    verified at ORT_DISABLE_ALL, but onnxruntime 1.32 refuses it at ORT_ENABLE_ALL (the If
    subgraph's LSTM inference), the input with those dims as much as the output: a warning says
    so; with the dims left dynamic, the output loads and runs at ORT_ENABLE_ALL."""
    import logging

    from graphopt import corpus

    why = corpus.why_unavailable("silero-vad")
    if why:
        pytest.skip(why)
    feeds = corpus.feeds("silero-vad", 2, seed=0)
    fixed = {"input": [1, 576], "state": [2, 1, 128]}
    with caplog.at_level(logging.WARNING, logger="graphopt"):
        res = optimize(corpus.get("silero-vad"), feeds=feeds, input_shapes=fixed)
    assert res.verify is not None and res.verify.ok
    if opt_job._load_error(res.model, "all") is not None:  # onnxruntime as of 1.32
        assert "--input-shape input:1x576" in caplog.text and "ORT_ENABLE_ALL" in caplog.text
    res = optimize(corpus.get("silero-vad"), feeds=feeds)  # dims left dynamic: fine
    assert res.verify is not None and res.verify.ok
    out = make_session(res.model, "all").run(None, feeds[0])
    assert all(np.isfinite(o).all() for o in out)


def test_quantize_default_floor_falls_back_to_meet_it_on_the_feeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """PP-OCRv4's detector: the int8 model met the default floor on the calibration samples, so
    nothing fell back, and missed it on --feeds (other pages: 9.7 dB < 10 dB), so it was refused
    (exit 1). The floor is now met on the feeds too: the fallback sees them. Here the feeds are
    twice the calibration range (clipped); the calibration samples alone pass at ~27 dB."""
    import logging

    from graphopt.core.feeds import random_feeds
    from graphopt.core.loader import load
    from graphopt.fixtures import fixture_path
    from graphopt.jobs import quantize as q_job

    m = load(fixture_path("mobilenet_block.onnx"))
    calib = [random_feeds(m, seed=i) for i in range(8)]
    feeds = [{k: v * 2 for k, v in random_feeds(m, seed=100 + i).items()} for i in range(4)]
    monkeypatch.setattr(q_job, "DEFAULT_MIN_SQNR_DB", 13.0)
    out = tmp_path / "q.onnx"
    with caplog.at_level(logging.WARNING, logger="graphopt"):
        res = q_job.quantize(m, calib, feeds=feeds, output=out, measure_speed=False)
    assert "on the calibration samples and --feeds, below the 13.0 dB floor" in caplog.text
    assert res.mixed_precision["met"] and res.mixed_precision["kept"]
    assert res.verify is not None and res.verify.ok and out.is_file()
    assert min(o.sqnr_db for o in res.verify.outputs) >= 13.0
    # the negative: without feeds the calibration samples meet the floor, nothing falls back
    res = q_job.quantize(m, calib, measure_speed=False)
    assert res.mixed_precision == {} and not res.kept_float


def _output_relisted_without_shape(tmp_path: Path) -> Path:
    """ddddocr's layout: the output ``y`` declared ``[1, n]`` and listed again in value_info
    without a shape. Returns the saved model's path."""
    g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Sigmoid", ["a"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "n"])],
        value_info=[helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 12)], ir_version=6)
    src = tmp_path / "m.onnx"
    onnx.save(proto, src)
    return src


def test_plan_writes_a_shape_on_an_output_value_info_lists_without_one(tmp_path: Path) -> None:
    """ddddocr's common_old.onnx declares its output's shape and lists the output again in
    value_info without a shape; the model as loaded had no output shape, and plan wrote it so:
    its own file was refused as invalid (exit 2). The output now keeps its rank."""
    from graphopt.jobs.plan import plan_memory

    src = _output_relisted_without_shape(tmp_path)
    out = tmp_path / "p.onnx"
    plan_memory(src, output=out)
    written = onnx.load(out)
    onnx.checker.check_model(written)
    assert len(written.graph.output[0].type.tensor_type.shape.dim) == 2


def test_loader_keeps_a_declared_output_shape_value_info_lists_without_one(
    tmp_path: Path,
) -> None:
    """The same ddddocr layout through prune (bench/corpus.py: ddddocr-ocr prune exit 2, "invalid
    ONNX model in .../prune.onnx: Field 'shape' of 'type' is required but missing"): the loader
    itself now keeps the output's declared shape, so no command writes it without one."""
    from graphopt.core.loader import load

    src = _output_relisted_without_shape(tmp_path)
    m = load(src)
    assert m.graph.outputs[0].shape == [1, "n"]
    onnx.checker.check_model(m.to_onnx())
