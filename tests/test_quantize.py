"""int8 QDQ quantization: fixtures load in onnxruntime with high SQNR, onnxruntime runs integer
kernels, digits accuracy holds, mixed-range Concat stays float, mixed precision meets its target."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import real_or_skip
from onnx import TensorProto, helper
from test_calibration import dynamic_width_model

from graphopt.algorithms.quant.graph import choose_activation_type
from graphopt.core.loader import load
from graphopt.core.model import Model
from graphopt.core.session import make_session
from graphopt.fixtures import fixture_path
from graphopt.jobs.quantize import quantize
from graphopt.testing import op_counts, ort_optimized_ops


def calib_feeds(model: Model, n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        f = {}
        for t in model.graph.inputs:
            shape = [
                d if isinstance(d, int) else (1 if i == 0 else 8) for i, d in enumerate(t.shape)
            ]
            f[t.name] = rng.standard_normal(shape).astype(np.float32)
        out.append(f)
    return out


@pytest.mark.parametrize(
    "name, min_db",
    [
        ("cnn.onnx", 30),
        ("residual.onnx", 25),
        ("mobilenet_block.onnx", 20),
        ("transformer_block.onnx", 20),
        ("external_data.onnx", 25),
        ("digits_cnn.onnx", 20),
    ],
)
def test_fixture_quantizes_loads_and_keeps_sqnr(name: str, min_db: float) -> None:
    m = load(fixture_path(name))
    res = quantize(m, calib_feeds(m, 16), method="mse")
    assert res.stats["nodes_quantized"] > 0
    assert op_counts(res.model).get("QuantizeLinear", 0) > 0
    onnx.checker.check_model(res.model.to_onnx(), full_check=True)
    make_session(res.model, "all")  # loads with onnxruntime's QDQ fusions on
    assert res.verify is not None
    for o in res.verify.outputs:
        assert o.sqnr_db >= min_db, (name, o)


def test_onnxruntime_runs_integer_kernels(tmp_path: Path) -> None:
    m = load(fixture_path("cnn.onnx"))
    res = quantize(m, calib_feeds(m, 8))
    ops = ort_optimized_ops(res.model, tmp_path)
    n_conv = op_counts(res.float_model)["Conv"]
    assert ops["QLinearConv"] == n_conv and ops.get("Conv", 0) == 0, ops
    assert ops["QGemm"] == 1 and ops["QLinearGlobalAveragePool"] == 1, ops
    # the Relus were absorbed into the QuantizeLinear after each Conv
    assert ops.get("Relu", 0) == 0 and ops.get("DequantizeLinear", 0) <= 1, ops


def test_digits_accuracy_within_half_a_point() -> None:
    m = load(fixture_path("digits_cnn.onnx"))
    res = quantize(m, str(fixture_path("digits_calib.npz")))
    ev = np.load(fixture_path("digits_eval.npz"))
    x, y = ev["x"], ev["y"]
    acc = {}
    for tag, model in (("fp32", m), ("int8", res.model)):
        s = make_session(model, "all")
        acc[tag] = float((s.run(None, {s.get_inputs()[0].name: x})[0].argmax(1) == y).mean())
    assert acc["fp32"] - acc["int8"] <= 0.005, acc


def _mixed_range_model() -> Model:
    """A detector-like head: boxes (0..320) and class probabilities (0..1) concatenated."""
    rng = np.random.default_rng(0)
    w1 = helper.make_tensor(
        "w1", TensorProto.FLOAT, [4, 8, 1, 1], rng.standard_normal(32).astype(np.float32)
    )
    w2 = helper.make_tensor(
        "w2", TensorProto.FLOAT, [3, 8, 1, 1], rng.standard_normal(24).astype(np.float32)
    )
    k = helper.make_tensor("k", TensorProto.FLOAT, [], [160.0])
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [7, -1])
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["b0"], name="box_conv"),
        helper.make_node("Sigmoid", ["b0"], ["b1"], name="box_sig"),
        helper.make_node("Mul", ["b1", "k"], ["b2"], name="box_scale"),
        helper.make_node("Add", ["b2", "b2"], ["boxes"], name="box_double"),
        helper.make_node("Conv", ["x", "w2"], ["c0"], name="cls_conv"),
        helper.make_node("Sigmoid", ["c0"], ["probs"], name="cls_sig"),
        helper.make_node("Concat", ["boxes", "probs"], ["cat"], name="head_concat", axis=1),
        helper.make_node("Reshape", ["cat", "shape"], ["y"], name="flatten"),
    ]
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [7, 16])],
        [w1, w2, k, shape],
    )
    return Model.from_onnx(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]))


def test_mixed_range_concat_kept_float() -> None:
    m = _mixed_range_model()
    feeds = calib_feeds(m, 16)
    res = quantize(m, feeds, optimize=False)
    assert "head_concat" in res.kept_float and "mixed-range" in res.kept_float["head_concat"]
    q = res.model
    cat = next(n for n in q.graph.nodes if n.name == "head_concat")
    assert all(t.inputs and t.inputs[0].op == "DequantizeLinear" for t in cat.inputs)
    assert not any(c.op == "QuantizeLinear" for c in cat.outputs[0].outputs)
    # the probabilities survive: small absolute error on the probability rows. The bound is the
    # quantization of the Sigmoid's input (step ~0.09, slope <= 0.25) plus the input's own step;
    # probabilities requantized on the boxes' grid (step ~1.25) would err by up to ~0.6.
    s_f, s_q = make_session(m), make_session(q)
    ref = s_f.run(None, feeds[0])[0]
    out = s_q.run(None, feeds[0])[0]
    assert np.abs(ref[4:] - out[4:]).max() < 0.05
    assert ref[4:].max() > 0.1  # not all zero


def test_min_sqnr_keeps_sensitive_layers_float() -> None:
    m = load(fixture_path("mobilenet_block.onnx"))
    feeds = calib_feeds(m, 8)
    base = quantize(m, feeds)
    assert base.verify is not None
    target = min(o.sqnr_db for o in base.verify.outputs) + 6
    res = quantize(m, feeds, min_sqnr=target)
    assert res.verify is not None
    mp = res.mixed_precision
    assert mp["met"] and mp["kept"], mp
    assert all(n in res.kept_float for n in mp["kept"])
    assert all(o.sqnr_db >= target for o in res.verify.outputs)
    assert any(layer.sensitivity_db is not None for layer in res.layers)


def test_metric_callback_drives_mixed_precision() -> None:
    m = load(fixture_path("cnn.onnx"))
    calls = []

    def metric(q: Model) -> bool:
        kept = sum(
            1 for n in q.graph.nodes if n.op == "Conv" and n.inputs[1].inputs == []
        )  # a float weight: layer kept float
        calls.append(kept)
        return kept >= 1

    res = quantize(m, calib_feeds(m, 4), metric=metric)
    assert res.mixed_precision["met"] and len(res.mixed_precision["kept"]) >= 1
    assert calls and calls[0] == 0


def test_variable_width_calibration() -> None:
    m = dynamic_width_model()
    rng = np.random.default_rng(0)
    calib = [{"x": rng.standard_normal((3, 8, w)).astype(np.float32)} for w in (8, 16, 16, 40)]
    res = quantize(m, calib, batch_size=4)
    assert res.calib_samples == 4 and res.calib_batches == 3
    assert res.stats["nodes_quantized"] >= 2


def test_activation_type_from_cpu_flags() -> None:
    dt, rr, _ = choose_activation_type("auto", flags={"avx2", "fma"}, machine="x86_64")
    assert dt == np.uint8 and rr
    dt, rr, _ = choose_activation_type("auto", flags={"avx2", "avx512_vnni"}, machine="x86_64")
    assert dt == np.uint8 and not rr
    dt, rr, _ = choose_activation_type("auto", flags=set(), machine="aarch64")
    assert dt == np.int8 and not rr


def test_int8_activations_and_per_tensor() -> None:
    m = load(fixture_path("cnn.onnx"))
    res = quantize(m, calib_feeds(m, 8), activations="int8", per_channel=False)
    zps = [n.inputs[2].values for n in res.model.graph.nodes if n.op == "QuantizeLinear"]
    assert zps and all(np.asarray(z).dtype == np.int8 for z in zps)
    assert all(
        "axis" not in n.attrs
        for n in res.model.graph.nodes
        if n.op == "DequantizeLinear" and n.inputs[0].dtype == np.int8
    )
    assert res.verify is not None
    assert min(o.sqnr_db for o in res.verify.outputs) > 25


def test_cli_quantize_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from graphopt.cli import main

    m = load(fixture_path("digits_cnn.onnx"))
    out = tmp_path / "q.onnx"
    rc = main(
        [
            "quantize",
            str(fixture_path("digits_cnn.onnx")),
            "-o",
            str(out),
            "--calib",
            str(fixture_path("digits_calib.npz")),
            "--json",
            "--method",
            "entropy",
        ]
    )
    assert rc == 0 and out.is_file()
    payload = json.loads(capsys.readouterr().out)
    for key in (
        "input",
        "output",
        "nodes_before",
        "nodes_after",
        "macs_before",
        "macs_after",
        "verify",
        "passes",
        "layers",
        "kept_float",
        "activations",
    ):
        assert key in payload
    assert payload["passes"]["quantize-int8"]["nodes_quantized"] > 0
    assert payload["file_bytes_after"] < payload["file_bytes_before"]
    _ = m


@pytest.mark.real
def test_real_cls_opset11_quantizes_and_loads() -> None:
    path, shapes = real_or_skip("cls")
    m = load(path)
    assert m.opset == 11
    rng = np.random.default_rng(0)
    calib = [{"x": rng.uniform(-1, 1, shapes["x"]).astype(np.float32)} for _ in range(4)]
    res = quantize(m, calib, input_shapes=shapes, eval_samples=2)
    assert res.opset_after >= 13
    assert res.stats["nodes_quantized"] > 20
    s = make_session(res.model, "all")
    out = s.run(None, calib[0])[0]
    assert out.shape == (1, 2) and np.isfinite(out).all()


def test_bias_correction_removes_mean_shift() -> None:
    m = load(fixture_path("mobilenet_block.onnx"))
    feeds = calib_feeds(m, 8)
    plain = quantize(m, feeds, method="minmax")
    corrected = quantize(m, feeds, method="minmax", bias_correct=True)
    assert corrected.stats["biases_corrected"] > 0
    ref = make_session(m).run(None, feeds[0])[0]

    def mean_err(q: Model) -> float:
        out = make_session(q).run(None, feeds[0])[0]
        return float(np.abs((out - ref).mean(axis=(0, 2, 3))).mean())

    assert mean_err(corrected.model) < mean_err(plain.model)


@pytest.mark.parametrize(
    "shape,axis", [((16, 3, 3, 3), 0), ((3, 16, 2, 2), 1), ((64, 10), 1), ((64, 10), None)]
)
def test_blockwise_weight_quantization_matches_whole_tensor(monkeypatch, shape, axis) -> None:
    """Huge layers are quantized block by block (bounded memory); the result must not change."""
    from graphopt.algorithms.quant import graph as qg

    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    a = np.abs(w.astype(np.float64))
    m = (
        np.asarray(a.max())
        if axis is None
        else np.moveaxis(a, axis, 0).reshape(a.shape[axis], -1).max(axis=1)
    )
    scales = np.where(m / 127 > 0, m / 127, 1.0).astype(np.float32)
    shp = [1] * w.ndim
    if axis is not None:
        shp[axis] = -1
    ref = np.clip(
        np.round(w.astype(np.float64) / scales.reshape(shp if axis is not None else ())), -127, 127
    ).astype(np.int8)
    monkeypatch.setattr(qg, "_BLOCK_ELEMENTS", 7)  # many small blocks
    assert np.array_equal(qg.weight_params(w, axis, 127), scales)
    assert np.array_equal(qg.quantize_weight(w, scales, axis, 127), ref)
