"""Quantization modes beyond static int8 (issue 13): dynamic int8, weight-only int4/int8 (RTN and
GPTQ), the automatic choice of mode, and the CLI's option checks.

Every quantized model runs in onnxruntime with ORT_DISABLE_ALL (so no onnxruntime fusion hides a
wrong rewrite) and is compared with a numpy reference of the same arithmetic (tight tolerance) and
with fp32 (explicit SQNR floors); seeds are fixed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from graphopt.algorithms.quant.dynamic import DynamicConfig, quantize_dynamic_matmuls, weight_int8
from graphopt.algorithms.quant.gptq import output_error, quantize_gptq, quantize_rtn
from graphopt.algorithms.quant.smoothquant import smooth_model
from graphopt.algorithms.quant.weight_only import (
    WeightOnlyConfig,
    collect_hessians,
    pack_nbits,
    quantize_weight_only,
)
from graphopt.algorithms.residual_sum import sum_residual_adds
from graphopt.core.model import Model
from graphopt.core.session import make_session
from graphopt.core.shapes import prepare
from graphopt.core.verify import sqnr_db
from graphopt.fixtures import fixture_path
from graphopt.jobs.quantize_modes import choose_mode, quantize_dynamic, quantize_weight_only_job
from graphopt.testing import op_counts, ort_optimized_ops

K, N, M = 64, 48, 10


def _mlp(opset: int = 17, gemm: bool = False, bias: bool = True, seed: int = 0) -> Model:
    """x [M, K] -> MatMul(W1) (+ b1) -> Relu -> Gemm/MatMul(W2) -> y; optional Gather table."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((K, N)) * 0.2).astype(np.float32)
    b1 = (rng.standard_normal(N) * 0.1).astype(np.float32)
    w2 = (rng.standard_normal((16, N)) * 0.2).astype(np.float32)  # Gemm transB: [N_out, K]
    b2 = (rng.standard_normal(16) * 0.1).astype(np.float32)
    inits = [onnx.numpy_helper.from_array(w1, "w1"), onnx.numpy_helper.from_array(w2, "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"], name="mm1")]
    h = "h0"
    if bias:
        inits.append(onnx.numpy_helper.from_array(b1, "b1"))
        nodes.append(helper.make_node("Add", ["h0", "b1"], ["h1"], name="add1"))
        h = "h1"
    nodes.append(helper.make_node("Relu", [h], ["r"], name="relu"))
    if gemm:
        inits.append(onnx.numpy_helper.from_array(b2, "b2"))
        nodes.append(
            helper.make_node(
                "Gemm", ["r", "w2", "b2"], ["y"], name="gemm2", transB=1, alpha=0.5, beta=2.0
            )
        )
    else:
        inits.append(onnx.numpy_helper.from_array(np.ascontiguousarray(w2.T), "w2t"))
        nodes.append(helper.make_node("MatMul", ["r", "w2t"], ["y"], name="mm2"))
        inits = [i for i in inits if i.name != "w2"]
    g = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [M, K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [M, 16])],
        inits,
    )
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 10
    return Model.from_onnx(proto)


def _x(seed: int = 1, shift: float = 0.3) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((M, K)) + shift).astype(np.float32)


def _run(model: Model, feeds: dict[str, np.ndarray], level: str = "disable_all") -> np.ndarray:
    return np.asarray(make_session(model, level).run(None, feeds)[0])


def _dql(x: np.ndarray) -> tuple[np.ndarray, float, int]:
    """numpy DynamicQuantizeLinear (ONNX reference semantics)."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    s = np.float32((hi - lo) / 255.0)
    z = int(np.clip(np.rint(-lo / s), 0, 255))
    q = np.clip(np.rint(x / s) + z, 0, 255).astype(np.int64)
    return q, float(s), z


# ---------------------------------------------------------------------- dynamic int8


@pytest.mark.parametrize("emit", ["integer", "ort"])
def test_dynamic_matches_numpy_reference(emit: str) -> None:
    m = _mlp(gemm=True)
    x = _x()
    ref = _run(m, {"x": x})
    q = m.clone()
    # pair-bounded weights: exact on every x86 kernel (full 8-bit u8s8 saturates AVX2's int16
    # pair sums, which this numpy reference does not model)
    st = quantize_dynamic_matmuls(q, DynamicConfig(emit=emit, pair_bound=True))
    assert sorted(st.quantized) == ["gemm2", "mm1"] and st.biases_fused == 1
    ops = op_counts(q)
    if emit == "integer":
        assert ops["MatMulInteger"] == 2 and ops["DynamicQuantizeLinear"] == 2
        assert "MatMul" not in ops and "Gemm" not in ops
    else:
        assert ops["com.microsoft.DynamicQuantizeMatMul"] == 2 and "Add" not in ops
    onnx.checker.check_model(q.to_onnx(), full_check=emit == "integer")
    out = _run(q, {"x": x})
    # numpy: the same arithmetic
    s1 = m.graph.tensors()
    w1 = np.asarray(s1["w1"].values)
    b1 = np.asarray(s1["b1"].values)
    w2 = np.asarray(s1["w2"].values).T * 0.5
    b2 = np.asarray(s1["b2"].values) * 2.0

    def layer(a: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
        aq, sa, za = _dql(a)
        wq, sw = weight_int8(w, True, 127, pair_bound=True)
        acc = (aq - za) @ wq.astype(np.int64)
        return (acc.astype(np.float32) * (np.float32(sa) * sw) + b).astype(np.float32)

    expect = layer(np.maximum(layer(x, w1, b1), 0), w2, b2)
    np.testing.assert_allclose(out, expect, rtol=1e-4, atol=1e-4 * np.abs(expect).max())
    assert sqnr_db(ref, out) > 30


def test_dynamic_pair_bound_never_saturates_and_beats_reduce_range() -> None:
    rng = np.random.default_rng(3)
    w = rng.standard_normal((257, 40)).astype(np.float32)
    w[5, 3] = 9.0  # an outlier column
    q, s = weight_int8(w, True, 127, pair_bound=True)
    a = np.abs(q.astype(np.int32))
    a = np.concatenate([a, np.zeros((1, a.shape[1]), np.int32)])
    assert (a[0::2] + a[1::2]).max() <= 128  # 255 * 128 < 32767: no int16 saturation
    q7, s7 = weight_int8(w, True, 63)
    err = sqnr_db(w, q.astype(np.float32) * s)
    err7 = sqnr_db(w, q7.astype(np.float32) * s7)
    assert err > err7 + 2


def test_dynamic_nothing_to_quantize_leaves_model_unchanged(caplog) -> None:
    # y = x @ x^T: no constant weight
    g = helper.make_graph(
        [
            helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0]),
            helper.make_node("MatMul", ["x", "xt"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 4])],
    )
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 10
    m = Model.from_onnx(proto)
    res = quantize_dynamic(m, measure_speed=False)
    assert res.stats["matmuls_quantized"] == 0
    assert "nothing to quantize" in res.note
    assert op_counts(res.model) == op_counts(m)
    assert res.verify is None
    st = quantize_dynamic_matmuls(m.clone())
    assert not st.quantized


def test_dynamic_job_quantizes_embedding_tables() -> None:
    rng = np.random.default_rng(4)
    table = rng.standard_normal((2000, K)).astype(np.float32)
    w = (rng.standard_normal((K, N)) * 0.2).astype(np.float32)
    g = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "ids"], ["e"], name="emb"),
            helper.make_node("MatMul", ["e", "w"], ["y"], name="mm"),
        ],
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 7])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 7, N])],
        [onnx.numpy_helper.from_array(table, "table"), onnx.numpy_helper.from_array(w, "w")],
    )
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 10
    m = Model.from_onnx(proto)
    ids = {"ids": rng.integers(0, 2000, (2, 7))}
    res = quantize_dynamic(m, feeds=ids, measure_speed=False)
    assert res.stats["embeddings_quantized"] == 1 and res.stats["matmuls_quantized"] == 1
    assert res.to_json()["weights_ratio"] < 0.27
    assert res.verify is not None and res.verify.outputs[0].sqnr_db > 30
    plain = quantize_dynamic(m, feeds=ids, measure_speed=False, embeddings=False)
    assert "embeddings_quantized" not in plain.stats


def test_dynamic_shared_weight_and_keep_float() -> None:
    m = _mlp()
    q = m.clone()
    st = quantize_dynamic_matmuls(q, keep_float=["mm2"])
    assert st.quantized == ["mm1"] and st.skipped["mm2"].startswith("kept float")
    assert op_counts(q)["MatMul"] == 1


def test_dynamic_job_on_transformer_block(tmp_path: Path) -> None:
    out = tmp_path / "dyn.onnx"
    res = quantize_dynamic(
        str(fixture_path("transformer_block.onnx")), output=out, measure_speed=False
    )
    assert out.is_file() and res.verify is not None and res.verify.ok
    assert res.stats["matmuls_quantized"] >= 4
    assert min(o.sqnr_db for o in res.verify.outputs) > 25
    assert res.to_json()["weights_ratio"] < 0.3


def _post_ln_block(seed: int = 0, bias: bool = False) -> Model:
    """x [2, 8, 32] -> h = LN(x + x @ W1 (+ c)); s2 = h + relu(h @ W2), y = LN(s2);
    z = LN(s2 + y): the sum s2 has two readers (as in a pre-norm block)."""
    rng = np.random.default_rng(seed)
    d = 32
    inits = [
        onnx.numpy_helper.from_array((rng.standard_normal((d, d)) * 0.2).astype(np.float32), n)
        for n in ("w1", "w2")
    ] + [
        onnx.numpy_helper.from_array(rng.uniform(0.5, 1.5, d).astype(np.float32), "g"),
        onnx.numpy_helper.from_array((rng.standard_normal(d) * 0.1).astype(np.float32), "b"),
        onnx.numpy_helper.from_array(np.full(d, 0.1, np.float32), "c"),
    ]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"], name="mm1")]
    if bias:  # the fusion's bias form: Add(x, Add(m1, c)) -> LN
        nodes.append(helper.make_node("Add", ["m1", "c"], ["m1b"], name="bias1"))
    nodes += [
        helper.make_node("Add", ["x", "m1b" if bias else "m1"], ["s1"], name="res1"),
        helper.make_node("LayerNormalization", ["s1", "g", "b"], ["h"], axis=-1, name="ln1"),
        helper.make_node("MatMul", ["h", "w2"], ["m2"], name="mm2"),
        helper.make_node("Relu", ["m2"], ["r"], name="relu"),
        helper.make_node("Add", ["h", "r"], ["s2"], name="res2"),
        helper.make_node("LayerNormalization", ["s2", "g", "b"], ["y"], axis=-1, name="ln2"),
        helper.make_node("Add", ["s2", "y"], ["s3"], name="pre_ln_res"),
        helper.make_node("LayerNormalization", ["s3", "g", "b"], ["z"], axis=-1, name="ln3"),
    ]
    shape = [2, 8, d]
    g = helper.make_graph(
        nodes,
        "post_ln",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, shape)],
        inits,
    )
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 10
    return prepare(Model.from_onnx(proto))


@pytest.mark.parametrize("bias", [False, True])
def test_dynamic_residual_adds_as_sum_keep_ort_from_skip_layernorm(
    tmp_path: Path, bias: bool
) -> None:
    m = _post_ln_block(bias=bias)
    x = {"x": np.random.default_rng(5).standard_normal((2, 8, 32)).astype(np.float32)}
    ref = _run(m, x)
    q = m.clone()
    st = quantize_dynamic_matmuls(q, DynamicConfig(pair_bound=True))
    plain = m.clone()
    quantize_dynamic_matmuls(plain, DynamicConfig(pair_bound=True, residual_sum=False))
    # res2's sum has two readers: onnxruntime would not fuse it, it stays an Add
    assert sorted(st.residual_sums) == ["pre_ln_res", "res1"]
    assert st.to_json()["residual_adds_as_sum"] == 2 and st.biases_fused == int(bias)
    ops = op_counts(q)
    assert ops["Sum"] == 2 and ops["Add"] == 1 + int(bias)  # the integer emit's bias Add
    onnx.checker.check_model(q.to_onnx(), full_check=True)
    # Sum is Add: bit-identical to the same quantization with Adds, at both levels
    np.testing.assert_array_equal(_run(q, x), _run(plain, x))
    np.testing.assert_array_equal(_run(q, x, "all"), _run(q, x, "disable_all"))
    assert sqnr_db(ref, _run(q, x)) > 30
    # what the rewrite is for: onnxruntime forms no SkipLayerNormalization from the Sums
    assert ort_optimized_ops(plain, tmp_path).get("SkipLayerNormalization", 0) == 2
    assert "SkipLayerNormalization" not in ort_optimized_ops(q, tmp_path)


def test_residual_sum_leaves_other_adds_alone() -> None:
    # negative cases: a constant operand, a broadcast operand, an Add no LayerNorm reads
    d = 16
    rng = np.random.default_rng(1)
    inits = [
        onnx.numpy_helper.from_array(rng.standard_normal((8, d)).astype(np.float32), "pos"),
        onnx.numpy_helper.from_array(np.ones(d, np.float32), "g"),
        onnx.numpy_helper.from_array(np.zeros(d, np.float32), "b"),
    ]
    nodes = [
        helper.make_node("Add", ["x", "pos"], ["a1"], name="const_operand"),
        helper.make_node("LayerNormalization", ["a1", "g", "b"], ["l1"], axis=-1),
        helper.make_node("Add", ["l1", "row"], ["a2"], name="broadcast"),
        helper.make_node("LayerNormalization", ["a2", "g", "b"], ["l2"], axis=-1),
        helper.make_node("Add", ["l2", "x"], ["y"], name="no_layernorm"),
    ]
    g = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8, d]),
            helper.make_tensor_value_info("row", TensorProto.FLOAT, [1, 8, d]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8, d])],
        inits,
    )
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 10
    m = prepare(Model.from_onnx(proto))
    before = op_counts(m)
    assert sum_residual_adds(m) == []
    assert op_counts(m) == before
    # and a model with nothing to quantize is not touched at all
    st = quantize_dynamic_matmuls(m)
    assert not st.quantized and not st.residual_sums and op_counts(m) == before


# ---------------------------------------------------------------------- weight-only


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("target", ["portable", "ort"])
def test_weight_only_matches_dequantized_reference(bits: int, target: str) -> None:
    m = _mlp(opset=21 if target == "portable" else 17, gemm=True)
    x = _x()
    ref = _run(m, {"x": x})
    q = m.clone()
    # accuracy_level 0: MatMulNBits computes in float, exactly the dequantized product
    cfg = WeightOnlyConfig(bits=bits, block_size=16, target=target, accuracy_level=0)
    st = quantize_weight_only(q, cfg)
    assert sorted(st.quantized) == ["gemm2", "mm1"]
    ops = op_counts(q)
    if target == "ort":
        assert ops["com.microsoft.MatMulNBits"] == 2
    else:
        assert ops["DequantizeLinear"] == 2 and "Gemm" not in ops
        onnx.checker.check_model(q.to_onnx(), full_check=True)
    out = _run(q, {"x": x})
    t = m.graph.tensors()
    w1 = np.asarray(t["w1"].values)
    w2 = np.asarray(t["w2"].values).T * 0.5
    d1 = quantize_rtn(w1, bits, 16).dequantize()
    d2 = quantize_rtn(w2, bits, 16).dequantize()
    h = np.maximum(x @ d1 + np.asarray(t["b1"].values), 0)
    expect = h @ d2 + np.asarray(t["b2"].values) * 2.0
    np.testing.assert_allclose(out, expect, rtol=1e-4, atol=1e-4 * np.abs(expect).max())
    assert sqnr_db(ref, out) > (15 if bits == 4 else 35)


@pytest.mark.parametrize("bits", [4, 8])
def test_weight_only_ort_computes_with_int8_activations_by_default(bits: int) -> None:
    # accuracy_level 4 by default: onnxruntime 1.32's float-compute 8-bit kernel dequantizes on
    # every call (0.06x of fp32 on the GPT-2 decoder); the int8-activation product stays close
    m = _mlp(opset=17, gemm=True)
    x = _x()
    ref = _run(m, {"x": x})
    q = m.clone()
    quantize_weight_only(q, WeightOnlyConfig(bits=bits, block_size=16, target="ort"))
    levels = [n.attrs["accuracy_level"] for n in q.graph.nodes if n.op == "MatMulNBits"]
    assert levels == [4, 4]
    exact = m.clone()
    quantize_weight_only(
        exact, WeightOnlyConfig(bits=bits, block_size=16, target="ort", accuracy_level=0)
    )
    out = _run(q, {"x": x})
    assert not np.array_equal(out, _run(exact, {"x": x}))  # the attribute does take effect
    assert sqnr_db(ref, out) > (15 if bits == 4 else 25)


def test_pack_nbits_lower_nibble_first() -> None:
    q = np.array([[1, 2, 3, 15, 7]], np.uint8)
    assert pack_nbits(q, 4).tolist() == [[0x21, 0xF3, 0x07]]
    assert pack_nbits(q, 8).tolist() == q.tolist()


def test_gptq_lowers_output_error_on_held_out_activations() -> None:
    rng = np.random.default_rng(0)
    mix = rng.standard_normal((K, K))
    xs = rng.standard_normal((4000, K)) @ mix * 0.3 + rng.standard_normal(K)
    calib, held = xs[:2000], xs[2000:]
    w = (rng.standard_normal((K, N)) * 0.05).astype(np.float32)
    h = calib.T @ calib
    rtn = quantize_rtn(w, 4, 16)
    gq = quantize_gptq(w, h, 4, 16)
    assert gq.q.max() <= 15 and gq.zero_points.max() <= 15
    hh = held.T @ held
    assert output_error(w, gq.dequantize(), hh) < 0.7 * output_error(w, rtn.dequantize(), hh)


def test_gptq_job_with_calibration(tmp_path: Path) -> None:
    m = _mlp(opset=17)
    calib = [{"x": _x(seed=s)} for s in range(8)]
    hs = collect_hessians(m, calib)
    assert set(hs) == {"mm1", "mm2"} and hs["mm1"].shape == (K, K)
    res = quantize_weight_only_job(
        m, calib, bits=4, block_size=16, rounding="gptq", measure_speed=False
    )
    assert res.opset_after == 21 and res.verify is not None and res.verify.ok
    assert res.stats["gptq_error_reduction_median"] > 1.0
    rtn = quantize_weight_only_job(m, calib, bits=4, block_size=16, measure_speed=False)
    assert rtn.verify is not None and res.verify is not None
    assert res.verify.outputs[0].sqnr_db > rtn.verify.outputs[0].sqnr_db


def test_weight_only_head_bits() -> None:
    res = quantize_weight_only_job(
        _mlp(), bits=4, block_size=16, target="ort", head_bits=8, measure_speed=False
    )
    bits = {n.name: n.attrs["bits"] for n in res.model.graph.nodes if n.op == "MatMulNBits"}
    assert sorted(bits.values()) == [4, 8]  # mm2 (produces the graph output y) is the head
    assert res.settings["head_bits"] == 8


def test_weight_only_embedding_table() -> None:
    rng = np.random.default_rng(2)
    table = rng.standard_normal((1000, 80)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["y"], name="emb")],
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [3, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 5, 80])],
        [onnx.numpy_helper.from_array(table, "table")],
    )
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 10
    m = Model.from_onnx(proto)
    q = m.clone()
    st = quantize_weight_only(q, WeightOnlyConfig(target="ort"))
    assert st.embeddings == ["emb"] and not st.quantized
    ids = rng.integers(0, 1000, (3, 5))
    out = _run(q, {"ids": ids})
    s = np.abs(table).max(axis=1, keepdims=True) / 127
    expect = (np.clip(np.rint(table / s), -127, 127) * s)[ids]
    np.testing.assert_allclose(out, expect, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------- SmoothQuant


def test_smoothquant_folds_into_layernorm_and_keeps_function() -> None:
    from graphopt.core.loader import load

    m = load(fixture_path("transformer_block.onnx"))
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((1, 16, 64)).astype(np.float32)} for _ in range(4)]
    before = [_run(m, f) for f in feeds]
    s = m.clone()
    st = smooth_model(s, feeds, alpha=0.5)
    assert st.folded_into_layernorm and st.matmuls >= 3
    after = [_run(s, f) for f in feeds]
    for a, b in zip(before, after, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * np.abs(a).max())
    assert op_counts(s) == op_counts(m)  # folded: no new op


def test_smoothquant_inserts_mul_only_for_outliers() -> None:
    m = _mlp()
    x = _x()
    calm = m.clone()
    assert not smooth_model(calm, [{"x": x}]).mul_inserted  # no LayerNorm, no outlier
    assert op_counts(calm) == op_counts(m)
    xo = x.copy()
    xo[:, 3] *= 50.0  # one outlier channel
    s = m.clone()
    st = smooth_model(s, [{"x": xo}], alpha=0.5)
    assert (
        st.mul_inserted
        and st.outlier_ratio_after[st.mul_inserted[0]]
        < 0.5 * (st.outlier_ratio_before[st.mul_inserted[0]])
    )
    np.testing.assert_allclose(_run(s, {"x": xo}), _run(m, {"x": xo}), rtol=1e-4, atol=1e-3)
    with pytest.raises(ValueError):
        smooth_model(m.clone(), [{"x": x}], alpha=1.5)


def test_digits_transformer_int8_accuracy_drop_at_most_half_a_point() -> None:
    from graphopt.jobs.quantize import quantize

    ev = np.load(fixture_path("digits_eval.npz"))
    m = str(fixture_path("digits_transformer.onnx"))
    fp32 = _run_model_path(m, {"x": ev["x"]})
    acc32 = float((fp32.argmax(-1) == ev["y"]).mean())
    res = quantize(m, str(fixture_path("digits_calib.npz")), measure_speed=False)
    assert res.stats.get("smoothquant", {}).get("alpha") == 0.5  # auto: a transformer
    q = np.asarray(make_session(res.model, "extended").run(None, {"x": ev["x"]})[0])
    assert float((q.argmax(-1) == ev["y"]).mean()) >= acc32 - 0.005
    dyn = quantize_dynamic(m, measure_speed=False)
    qd = np.asarray(make_session(dyn.model, "extended").run(None, {"x": ev["x"]})[0])
    assert float((qd.argmax(-1) == ev["y"]).mean()) >= acc32 - 0.005


def _run_model_path(path: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return np.asarray(make_session(path).run(None, feeds)[0])


# ---------------------------------------------------------------------- mode choice and CLI


def test_auto_mode_choice() -> None:
    from graphopt.core.loader import load

    tb = load(fixture_path("transformer_block.onnx"))
    cnn = load(fixture_path("cnn.onnx"))
    assert choose_mode(tb, "auto", False)[0] == "dynamic"
    mode, why = choose_mode(tb, "auto", True)  # calibration data does not make it static
    assert mode == "dynamic" and "--mode static" in why
    assert choose_mode(cnn, "auto", True)[0] == "static"
    assert choose_mode(cnn, "auto", False)[0] == "static"
    assert choose_mode(cnn, "weight-only", False) == ("weight-only", "requested")


@pytest.mark.parametrize(
    "extra",
    [
        ["--mode", "weight-only", "--bits", "3"],
        ["--mode", "weight-only", "--block-size", "48"],
        ["--mode", "weight-only", "--block-size", "8"],
        ["--mode", "weight-only", "--rounding", "gptq"],  # GPTQ needs --calib
        ["--mode", "weight-only", "--rounding", "adaround"],
        ["--bits", "4"],  # auto -> dynamic
        ["--mode", "dynamic", "--block-size", "32"],
        ["--mode", "dynamic", "--rounding", "gptq"],
        ["--mode", "dynamic", "--qat"],
        ["--mode", "static"],  # no --calib
        ["--mode", "static", "--calib", "CALIB", "--target", "ort"],
        ["--mode", "dynamic", "--smooth", "0.5"],
        ["--mode", "dynamic", "--head-bits", "8"],
        ["--mode", "static", "--calib", "CALIB", "--smooth", "2"],
        ["--mode", "fast"],
    ],
)
def test_cli_bad_combinations_exit_2(tmp_path: Path, extra: list[str]) -> None:
    from graphopt.cli import main

    calib = tmp_path / "c.npz"
    np.savez(calib, x=np.zeros((2, 1, 16, 64), np.float32))
    out = tmp_path / "q.onnx"
    args = [a.replace("CALIB", str(calib)) for a in extra]
    with pytest.raises(SystemExit) if "fast" in extra else _nullcontext():
        rc = main(["quantize", str(fixture_path("transformer_block.onnx")), "-o", str(out), *args])
        assert rc == 2
    assert not out.exists()


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def test_cli_auto_dynamic_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from graphopt.cli import main

    out = tmp_path / "q.onnx"
    rc = main(["quantize", str(fixture_path("transformer_block.onnx")), "-o", str(out), "--json"])
    assert rc == 0 and out.is_file()
    d = json.loads(capsys.readouterr().out)
    for key in (
        "input",
        "output",
        "nodes_before",
        "nodes_after",
        "macs_before",
        "macs_after",
        "verify",
        "passes",
        "mode",
        "mode_reason",
        "quantized",
        "weights_ratio",
        "kept_float",
        "latency_ms",
        "emit",
    ):
        assert key in d, key
    assert d["mode"] == "dynamic" and "MatMul/Gemm" in d["mode_reason"]
    assert d["passes"]["quantize-dynamic"]["matmuls_quantized"] >= 4


def test_cli_weight_only_ort_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from graphopt.cli import main

    out = tmp_path / "q.onnx"
    rc = main(
        [
            "quantize",
            str(fixture_path("transformer_block.onnx")),
            "-o",
            str(out),
            "--mode",
            "weight-only",
            "--bits",
            "8",
            "--block-size",
            "16",
            "--target",
            "ort",
            "--json",
        ]
    )
    assert rc == 0
    d = json.loads(capsys.readouterr().out)
    assert d["mode"] == "weight-only" and d["bits"] == 8 and d["emit"] == "MatMulNBits"
    assert d["ops_after"].get("com.microsoft.MatMulNBits", 0) >= 4
    assert d["verify_ok"] is True


def test_cli_static_json_says_mode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from graphopt.cli import main

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
        ]
    )
    assert rc == 0
    d = json.loads(capsys.readouterr().out)
    assert d["mode"] == "static" and "calibration data given" in d["mode_reason"]
