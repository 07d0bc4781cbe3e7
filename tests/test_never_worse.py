"""The never-worse contract of issue 14: a command that claims speed or changes numbers never hands
back something worse than its input without saying so.

- ``optimize --bench``: an optimized model slower than the input beyond noise is not written; the
  input's graph is, with a warning (timings are never asserted: the measurement is replaced by a
  fixed one where the decision is tested).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from graphopt.core.loader import load
from graphopt.core.model import Model
from graphopt.jobs import optimize as opt_job
from graphopt.jobs.optimize import BenchResult, bench_models, optimize


def _identity_model() -> Model:
    """y = Relu(Identity(Identity(x))): the default pipeline removes both Identity nodes."""
    g = helper.make_graph(
        [
            helper.make_node("Identity", ["x"], ["a"]),
            helper.make_node("Identity", ["a"], ["b"]),
            helper.make_node("Relu", ["b"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])],
    )
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return Model.from_onnx(proto)


def _fixed(ratios: list[float]) -> object:
    """A stand-in for :func:`bench_models` whose k-th call measures ``ratios[k]`` (after/before)
    at both levels, 3 % noise."""
    calls = iter(ratios)

    def bench(before: Model, after: Model, feeds: object, **kw: object) -> BenchResult:
        r = next(calls)
        lat = {"before": {"disable_all": 1.0, "all": 1.0}, "after": {"disable_all": r, "all": r}}
        return BenchResult(lat, {"disable_all": r, "all": r}, {"disable_all": 0.03, "all": 0.03})

    return bench


def test_bench_keeps_the_input_when_the_optimized_model_is_slower(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(opt_job, "bench_models", _fixed([1.5, 1.4]))
    out = tmp_path / "o.onnx"
    with caplog.at_level(logging.WARNING, logger="graphopt"):
        res = optimize(_identity_model(), output=out, bench=True)
    assert res.kept_input and res.optimized is not None
    assert res.optimized.op_histogram() == {"Relu": 1}  # what the pipeline made, not written
    assert load(out).op_histogram() == {"Identity": 2, "Relu": 1}  # the input's graph
    d = res.to_json()
    assert d["kept_input"] is True and d["nodes_after"] == d["nodes_before"] == 3
    assert d["latency_ratio"] == {"disable_all": 1.4, "all": 1.4}
    assert "slower than the input" in caplog.text and "input's graph is written" in caplog.text


def test_bench_writes_the_optimized_model_when_not_slower(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    for ratios in ([0.8], [1.02], [1.5, 1.01]):  # faster, within noise, one noisy measurement
        monkeypatch.setattr(opt_job, "bench_models", _fixed(ratios))
        out = tmp_path / "o.onnx"
        with caplog.at_level(logging.WARNING, logger="graphopt"):
            res = optimize(_identity_model(), output=out, bench=True)
        assert not res.kept_input and res.optimized is None, ratios
        assert load(out).op_histogram() == {"Relu": 1}, ratios
        assert "slower than the input" not in caplog.text


def test_bench_models_measures_both_levels() -> None:
    """The real measurement: its shape, never its figures."""
    m = _identity_model()
    b = bench_models(m, m, {"x": np.ones((4, 8), np.float32)}, runs=5)
    assert set(b.latency_ms) == {"before", "after"}
    assert set(b.ratio) == set(b.noise) == {"disable_all", "all"}
    assert all(r > 0 for r in b.ratio.values())
    assert all(n >= opt_job.BENCH_MIN_NOISE for n in b.noise.values())


def test_cli_bench_json_has_the_verdict(tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(_identity_model().to_onnx(), str(src))
    out = subprocess.run(
        [sys.executable, "-m", "graphopt.cli", "optimize", str(src), "-o", str(tmp_path / "o")]
        + ["--bench", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert isinstance(d["kept_input"], bool)
    assert set(d["latency_ratio"]) == {"disable_all", "all"}
    written = load(tmp_path / "o").op_histogram()
    assert written == ({"Identity": 2, "Relu": 1} if d["kept_input"] else {"Relu": 1})


# ------------------------------------------------------------------ fp16: observed ranges


def _power_model() -> Model:
    """y = max(x * x, 1) * 1e-5 + 1: a power spectrum of int16-scaled audio reaches 1e9 (inf in
    half) before its scaling brings it back to 1e4. ``Max`` has a float16 kernel in onnxruntime's
    CPU provider, so the half tensor is really made (ops it runs through its own Casts would hide
    the overflow in float32 on x86)."""
    g = helper.make_graph(
        [
            helper.make_node("Mul", ["x", "x"], ["p"], name="power"),
            helper.make_node("Max", ["p", "one"], ["c"], name="floor"),
            helper.make_node("Mul", ["c", "k"], ["s"], name="scale"),
            helper.make_node("Add", ["s", "one"], ["y"], name="shift"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 256])],
        [
            helper.make_tensor("k", TensorProto.FLOAT, [], [1e-5]),
            helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]),
        ],
    )
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return Model.from_onnx(proto)


def _audio(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": (rng.uniform(-1, 1, (1, 256)) * 32767).astype(np.float32)}


def test_fp16_keeps_float32_where_the_feeds_overflow_half(tmp_path: Path) -> None:
    from graphopt.jobs.fp16 import fp16

    out = tmp_path / "h.onnx"
    res = fp16(_power_model(), feeds=[_audio(0), _audio(1)], output=out)
    assert {"power", "floor", "scale"} <= set(res.kept_fp32)  # 1e9 in and out: inf in half
    assert "shift" not in res.kept_fp32  # 1e4: half is fine there
    assert res.stats["kept_fp32_range"] >= 2
    assert res.verify is not None and res.verify.ok
    from graphopt.core.session import run_model

    got = run_model(out, _audio(2), outputs=["c", "y"])  # data the check never saw, as loud
    assert np.isfinite(got["c"]).all() and np.isfinite(got["y"]).all()


def test_fp16_without_observation_overflows_on_loud_data() -> None:
    """The negative: the same conversion judged on constants only makes inf on loud data (what
    the issue saw: verified on N(0, 1), NaN on real audio); on N(0, 1) nothing is kept."""
    from graphopt.algorithms.fp16 import convert_float16
    from graphopt.core.session import run_model
    from graphopt.core.shapes import infer_shapes
    from graphopt.jobs.fp16 import fp16

    m = _power_model()
    infer_shapes(m)
    conv = convert_float16(m)
    assert conv.stats["kept_fp32_range"] == 0 and "power" not in conv.kept_fp32
    c = run_model(m, _audio(0), outputs=["c"])["c"]
    assert c.dtype == np.float16 and np.isinf(c).any()  # the half tensor overflows
    quiet = fp16(_power_model())  # generated N(0, 1) inputs: nothing overflows, nothing kept
    assert quiet.stats["kept_fp32_range"] == 0 and quiet.kept_fp32 == []
    assert quiet.verify is not None and quiet.verify.ok


def test_fp16_keeps_float32_where_the_feeds_underflow_half() -> None:
    from graphopt.algorithms.fp16 import convert_float16
    from graphopt.core.shapes import infer_shapes

    tiny = {"x": np.full((1, 256), 1e-3, np.float32)}  # squares to 1e-6: subnormal in half
    m = _power_model()
    infer_shapes(m)
    conv = convert_float16(m, feeds=tiny)
    assert "power" in conv.kept_fp32


def test_optimize_gives_its_feeds_to_the_fp16_pass() -> None:
    res = optimize(_power_model(), ["fp16"], feeds=_audio(0))
    assert res.stats()["fp16"]["kept_fp32_range"] >= 2
    assert res.verify is not None and res.verify.ok


# ------------------------------------------------------------------ quantize: floor and speed


def _calib(model: Model, n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    from graphopt.core.feeds import random_feeds

    return [random_feeds(model, seed=seed + i) for i in range(n)]


def test_quantize_falls_back_to_float_to_meet_the_default_floor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """No --min-sqnr: when the fully quantized model misses the default floor, the most sensitive
    layers are kept float until it holds (with a warning), instead of refusing at once."""
    from graphopt.fixtures import fixture_path
    from graphopt.jobs import quantize as q_job

    m = load(fixture_path("mobilenet_block.onnx"))
    feeds = _calib(m, 8)
    base = q_job.quantize(m, feeds, measure_speed=False)
    assert base.verify is not None and base.mixed_precision == {}  # floor met: no search
    floor = min(o.sqnr_db for o in base.verify.outputs) + 6
    monkeypatch.setattr(q_job, "DEFAULT_MIN_SQNR_DB", floor)
    out = tmp_path / "q.onnx"
    with caplog.at_level(logging.WARNING, logger="graphopt"):
        res = q_job.quantize(m, feeds, output=out, measure_speed=False)
    mp = res.mixed_precision
    assert mp["met"] and mp["kept"] and mp["target_sqnr_db"] == floor, mp
    assert res.verify is not None and res.verify.ok and out.is_file()
    assert all(o.sqnr_db >= floor for o in res.verify.outputs)
    assert "below the" in caplog.text and "keeping the most sensitive layers float" in caplog.text


def test_quantize_below_the_floor_even_all_float_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from graphopt.core.errors import VerificationError
    from graphopt.fixtures import fixture_path
    from graphopt.jobs import quantize as q_job

    m = load(fixture_path("cnn.onnx"))
    monkeypatch.setattr(q_job, "DEFAULT_MIN_SQNR_DB", 500.0)  # no int8 layer can meet it
    out = tmp_path / "q.onnx"
    with pytest.raises(VerificationError, match="not written"):
        q_job.quantize(m, _calib(m, 4), output=out, measure_speed=False)
    assert not out.exists()


def test_quantize_reports_the_speedup_and_warns_when_int8_is_slower(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from graphopt.fixtures import fixture_path
    from graphopt.jobs import quantize as q_job

    m = load(fixture_path("cnn.onnx"))
    feeds = _calib(m, 4)
    res = q_job.quantize(m, feeds)  # the real measurement: its shape, never its figures
    assert res.speed is not None and set(res.speed) == {"fp32", "int8", "speedup", "noise"}
    assert res.to_json()["latency_ms"]["speedup"] > 0

    def slower(before: Model, after: Model, feed: object, **kw: object) -> BenchResult:
        lat = {"before": {"all": 1.0}, "after": {"all": 1.25}}
        return BenchResult(lat, {"all": 1.25}, {"all": 0.03})

    monkeypatch.setattr(q_job, "bench_models", slower)
    with caplog.at_level(logging.WARNING, logger="graphopt"):
        res = q_job.quantize(m, feeds)
    assert res.speed is not None and res.speed["speedup"] == 0.8
    assert "int8 model is slower than float32 on this CPU" in caplog.text
