"""fuse-attention: scaled-dot-product attention -> com.microsoft Attention / MultiHeadAttention
(ort) or ONNX Attention (portable, opset >= 23).

Small hand-built attention blocks with symbolic batch and sequence dims, one per variant the
exporters write (BERT eager, SDPA with the scale split over Q and K, Whisper's pre-scaled Q,
GPT-2's causal triangle, grouped-query K/V, past key/values), each compared with the unfused
graph in onnxruntime (ORT_DISABLE_ALL) at two sequence lengths; negative cases where nothing may
change; the dynamic tiny BERT fixture through ``optimize --target ort``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import pytest
from fusion_graphs import build, node

from graphopt.core.kernels import ort_runs
from graphopt.core.loader import load
from graphopt.core.model import Model
from graphopt.core.session import make_session
from graphopt.fixtures import FIXTURES_DIR
from graphopt.jobs.optimize import optimize_model
from graphopt.testing import check_pass, op_counts

P = "fuse-attention"
N, H = 4, 8
D = N * H
RTOL, ATOL = 1e-4, 1e-5
RNG = np.random.default_rng(2026)


def w(*shape: int) -> np.ndarray:
    return (RNG.standard_normal(shape) * 0.3).astype(np.float32)


def _proj(name: str, x: str, bias: bool = True) -> tuple[list[onnx.NodeProto], dict[str, Any]]:
    """``name = x @ W [+ b]``."""
    inits: dict[str, Any] = {f"{name}_w": w(D, D)}
    if not bias:
        return [node("MatMul", [x, f"{name}_w"], name)], inits
    inits[f"{name}_b"] = w(D)
    return [
        node("MatMul", [x, f"{name}_w"], f"{name}_mm"),
        node("Add", [f"{name}_mm", f"{name}_b"], name),
    ], inits


def _heads(src: str, out: str, perm: Sequence[int], heads: int = N) -> list[onnx.NodeProto]:
    return [
        node("Reshape", [src, f"{out}_shape"], f"{out}_r"),
        node("Transpose", [f"{out}_r"], out, perm=list(perm)),
    ]


def _head_shape(out: str, heads: int = N) -> dict[str, np.ndarray]:
    return {f"{out}_shape": np.array([0, 0, heads, H], np.int64)}


def _tail(probs: str, vh: str) -> list[onnx.NodeProto]:
    return [
        node("MatMul", [probs, vh], "ctx"),
        node("Transpose", ["ctx"], "ctx_t", perm=[0, 2, 1, 3]),
        node("Reshape", ["ctx_t", "merge_shape"], "ctx_m"),
        node("MatMul", ["ctx_m", "o_w"], "y"),
    ]


def attention_model(
    variant: str = "bert",
    mask: bool = True,
    opset: int = 17,
    softmax_axis: int = -1,
    scale_input: bool = False,
    scores_output: bool = False,
    padding_mask: bool = False,
    query_bias: bool = False,
    causal: bool = False,
) -> Model:
    """One attention block ``y = attention(x) @ Wo`` in the form ``variant`` exports it."""
    nodes: list[onnx.NodeProto] = []
    inits: dict[str, Any] = {"merge_shape": np.array([0, 0, D], np.int64), "o_w": w(D, D)}
    inputs: dict[str, Sequence[Any]] = {"x": ("batch", "seq", D)}
    outputs = ["y"]
    for p in ("q", "k", "v"):
        ns, ii = _proj(p, "x", bias=variant != "whisper")
        nodes += ns
        inits.update(ii)
    scale = 1.0 / np.sqrt(H)
    scores = "scores"
    if variant in ("bert", "causal", "past", "gqa"):
        nodes += _heads("q", "qh", [0, 2, 1, 3])
        inits.update(_head_shape("qh"))
        if variant == "bert":
            nodes += _heads("k", "kt", [0, 2, 3, 1])
            inits.update(_head_shape("kt"))
            nodes += _heads("v", "vh", [0, 2, 1, 3])
            inits.update(_head_shape("vh"))
        elif variant == "causal":
            nodes += _heads("k", "kh", [0, 2, 1, 3]) + _heads("v", "vh", [0, 2, 1, 3])
            nodes.append(node("Transpose", ["kh"], "kt", perm=[0, 1, 3, 2]))
            inits.update(_head_shape("kh") | _head_shape("vh"))
        elif variant == "past":  # present = Concat(past, new) is a graph output
            inputs["past_k"] = ("batch", N, "past", H)
            inputs["past_v"] = ("batch", N, "past", H)
            nodes += _heads("k", "kn", [0, 2, 1, 3]) + _heads("v", "vn", [0, 2, 1, 3])
            inits.update(_head_shape("kn") | _head_shape("vn"))
            nodes += [
                node("Concat", ["past_k", "kn"], "present_k", axis=2),
                node("Concat", ["past_v", "vn"], "vh", axis=2),
                node("Transpose", ["present_k"], "kt", perm=[0, 1, 3, 2]),
            ]
            outputs += ["present_k", "vh"]
        else:  # gqa: K/V with 2 heads, repeated to 4 (Tile) before the products
            kv = N // 2
            inits["k_w"] = w(D, kv * H)
            inits["k_b"] = w(kv * H)
            inits["v_w"] = w(D, kv * H)
            inits["v_b"] = w(kv * H)
            nodes += _heads("k", "kg", [0, 2, 1, 3]) + _heads("v", "vg", [0, 2, 1, 3])
            inits.update(_head_shape("kg", kv) | _head_shape("vg", kv))
            inits["rep"] = np.array([1, N // kv, 1, 1], np.int64)
            nodes += [
                node("Tile", ["kg", "rep"], "kh"),
                node("Tile", ["vg", "rep"], "vh"),
                node("Transpose", ["kh"], "kt", perm=[0, 1, 3, 2]),
            ]
        nodes.append(node("MatMul", ["qh", "kt"], "qk"))
        if scale_input:
            inputs["s"] = ()
            nodes.append(node("Mul", ["qk", "s"], scores))
        else:
            inits["scale"] = np.float32(np.sqrt(H))
            nodes.append(node("Div", ["qk", "scale"], scores))
    elif variant == "sdpa":  # sqrt(scale) on Q and on K^T; K^T through a 3-D transpose
        nodes += _heads("q", "qh0", [0, 2, 1, 3]) + _heads("k", "kh", [0, 2, 1, 3])
        nodes += _heads("v", "vh", [0, 2, 1, 3])
        inits.update(_head_shape("qh0") | _head_shape("kh") | _head_shape("vh"))
        inits["s2"] = np.float32(np.sqrt(scale))
        inits |= {"minus1": np.array([-1], np.int64), "two": np.array([2], np.int64)}
        inits |= {"four": np.array([4], np.int64), "swap": np.array([0, 1, 3, 2], np.int64)}
        nodes += [  # the shapes computed from K's own Shape, as the dynamo exporter does
            node("Mul", ["qh0", "s2"], "qh"),
            node("Shape", ["kh"], "khs"),
            node("Slice", ["khs", "two", "four"], "th"),
            node("Concat", ["minus1", "th"], "k3_shape", axis=0),
            node("Reshape", ["kh", "k3_shape"], "k3"),
            node("Transpose", ["k3"], "k3t", perm=[0, 2, 1]),
            node("Gather", ["khs", "swap"], "kt4_shape", axis=0),
            node("Reshape", ["k3t", "kt4_shape"], "kt0"),
            node("Mul", ["kt0", "s2"], "kt"),
            node("MatMul", ["qh", "kt"], scores),
        ]
    elif variant == "whisper":  # Q pre-scaled before the head split, no mask
        inits["s"] = np.float32(scale)
        nodes.append(node("Mul", ["q", "s"], "qs"))
        nodes += _heads("qs", "qh", [0, 2, 1, 3]) + _heads("k", "kt", [0, 2, 3, 1])
        nodes += _heads("v", "vh", [0, 2, 1, 3])
        inits.update(_head_shape("qh") | _head_shape("kt") | _head_shape("vh"))
        nodes.append(node("MatMul", ["qh", "kt"], scores))
    else:
        raise ValueError(variant)
    if variant == "causal" or causal:  # GPT-2: Where(bias[:, :, T-S:T, :T], scores, -1e4)
        m = 16
        inits["tril"] = np.tril(np.ones((1, 1, m, m), np.bool_))
        inits["zero"] = np.array([0], np.int64)
        inits["axis2"] = np.array([2], np.int64)
        inits["axis3"] = np.array([3], np.int64)
        inits["fill"] = np.float32(-1e4)
        inits["one"] = np.array([1], np.int64)
        inits["two"] = np.array([2], np.int64)
        inits["three"] = np.array([3], np.int64)
        nodes += [
            node("Shape", ["x"], "xs"),
            node("Slice", ["xs", "one", "two"], "seq_len"),
            # key.size(-2) of the (B, N, T, H) key, as GPT-2 reads it
            node("Shape", ["present_k" if variant == "past" else "kh"], "kts"),
            node("Slice", ["kts", "two", "three"], "key_len"),
            node("Sub", ["key_len", "seq_len"], "past_len"),
            node("Slice", ["tril", "past_len", "key_len", "axis2"], "tri_r"),
            node("Slice", ["tri_r", "zero", "key_len", "axis3"], "tri"),
            node("Where", ["tri", scores, "fill"], "masked"),
        ]
        scores = "masked"
    if query_bias:  # a bias computed from the block's own query heads (relative-position style)
        nodes += [
            node("Transpose", ["qh"], "qh_t", perm=[0, 1, 3, 2]),
            node("MatMul", ["qh", "qh_t"], "qbias"),
            node("Add", [scores, "qbias"], "scores_qb"),
        ]
        scores = "scores_qb"
    if mask:
        total = "total" if variant == "past" else "seq"
        inputs["mask"] = ("batch", 1, 1 if padding_mask else "seq", total)
        nodes.append(node("Add", [scores, "mask"], "scores_m"))
        scores = "scores_m"
    nodes.append(node("Softmax", [scores], "probs", axis=softmax_axis))
    probs = "probs"
    if variant == "sdpa":
        inits["z"] = np.float32(0.0)
        nodes += [node("IsNaN", ["probs"], "nan"), node("Where", ["nan", "z", "probs"], "probs0")]
        probs = "probs0"
    nodes += _tail(probs, "vh")
    if scores_output:
        outputs.append(scores)
    return build(nodes, {k: list(v) for k, v in inputs.items()}, outputs, inits, opset=opset)


def feeds(model: Model, seqs: Sequence[int] = (5, 9), batch: int = 2) -> list[dict[str, Any]]:
    out = []
    rng = np.random.default_rng(7)
    for s in seqs:
        past = 3
        dims = {"batch": batch, "seq": s, "past": past, "total": past + s, "past + seq": past + s}
        f: dict[str, Any] = {}
        for t in model.graph.inputs:
            shape = [dims[d] if isinstance(d, str) else d for d in t.shape]
            f[t.name] = rng.standard_normal(shape).astype(np.float32)
            if t.name == "mask":
                # key 0 always visible: a query row with every key masked is the one place
                # where fused kernels differ (they give the masked keys' s + fill their weight)
                f[t.name] = np.where(rng.random(shape) < 0.25, -1e4, 0.0).astype(np.float32)
                f[t.name][..., 0] = 0.0
            if t.name == "s":
                f[t.name] = np.array(0.3, np.float32)
        out.append(f)
    return out


def _ops(**want: int) -> Any:
    def check(m: Model) -> None:
        got = op_counts(m)
        for op, n in want.items():
            assert got.get(op.replace("__", "."), 0) == n, got

    return check


# ---------------------------------------------------------------------------------- ort


@pytest.mark.parametrize("mask", [True, False])
def test_bert_packed_attention(mask: bool) -> None:
    m = attention_model("bert", mask=mask)
    res, _ = check_pass(
        m,
        P,
        target="ort",
        feeds=feeds(m),
        rtol=RTOL,
        atol=ATOL,
        structure=_ops(com__microsoft__Attention=1, Softmax=0, Transpose=0),
    )
    att = next(n for n in res.model.graph.nodes if n.op == "Attention")
    assert att.attrs["num_heads"] == N
    assert att.attrs["scale"] == pytest.approx(1 / np.sqrt(H))
    assert res.stats == {"attention_packed": 1}


def test_sdpa_split_scale_and_nan_guard() -> None:
    m = attention_model("sdpa")
    res, _ = check_pass(
        m,
        P,
        target="ort",
        feeds=feeds(m),
        rtol=RTOL,
        atol=ATOL,
        structure=_ops(com__microsoft__Attention=1, Softmax=0, IsNaN=0),
    )
    att = next(n for n in res.model.graph.nodes if n.op == "Attention")
    assert att.attrs["scale"] == pytest.approx(1 / np.sqrt(H), rel=1e-6)


def test_whisper_prescaled_query_no_bias() -> None:
    m = attention_model("whisper", mask=False)
    check_pass(
        m,
        P,
        target="ort",
        feeds=feeds(m),
        rtol=RTOL,
        atol=ATOL,
        structure=_ops(com__microsoft__Attention=1, Softmax=0, Mul=0),
    )


@pytest.mark.parametrize("mask", [True, False])
def test_causal_triangle(mask: bool) -> None:
    m = attention_model("causal", mask=mask)
    res, _ = check_pass(
        m,
        P,
        target="ort",
        feeds=feeds(m),
        rtol=RTOL,
        atol=ATOL,
        structure=_ops(Softmax=0, Where=int(mask)),
    )
    # with a mask the triangle goes into the bias (onnxruntime ignores unidirectional then);
    # that bias reads key.size(-2) of the 4-D key, so K and V stay 4-D for MultiHeadAttention
    op = "MultiHeadAttention" if mask else "Attention"
    att = next(n for n in res.model.graph.nodes if n.op == op)
    assert att.attrs.get("unidirectional", 0) == int(not mask)


def test_grouped_query_after_repeat() -> None:
    m = attention_model("gqa")
    check_pass(
        m,
        P,
        target="ort",
        feeds=feeds(m),
        rtol=RTOL,
        atol=ATOL,
        structure=_ops(com__microsoft__MultiHeadAttention=1, Softmax=0, Tile=2),
    )


@pytest.mark.parametrize("mask", [True, False])
def test_causal_with_past(mask: bool) -> None:
    """Causal decoding with a past: the triangle is bottom-right aligned (query i sees keys up to
    past + i); with a mask it goes into the bias, without one the block is kept (onnxruntime's
    unidirectional and ONNX's is_causal would align it differently when K/V carry the past)."""
    m = attention_model("past", mask=mask, causal=True)
    check_pass(
        m,
        P,
        target="ort",
        feeds=feeds(m),
        rtol=RTOL,
        atol=ATOL,
        expect_modified=mask,
        structure=_ops(com__microsoft__MultiHeadAttention=int(mask)),
    )


@pytest.mark.parametrize("mask", [True, False])
def test_past_key_values_keep_present(mask: bool) -> None:
    m = attention_model("past", mask=mask)
    res, _ = check_pass(
        m,
        P,
        target="ort",
        feeds=feeds(m),
        rtol=RTOL,
        atol=ATOL,
        structure=_ops(com__microsoft__MultiHeadAttention=1, Softmax=0, Concat=2),
    )
    assert [t.name for t in res.model.graph.outputs] == ["y", "present_k", "vh"]


def test_padding_mask_expanded_once() -> None:
    """A ``(B, 1, 1, T)`` mask (the classic BERT extended mask) is expanded over the queries once
    and shared by the blocks that read it."""
    m = attention_model("bert", padding_mask=True)
    check_pass(
        m,
        P,
        target="ort",
        feeds=feeds(m),
        rtol=RTOL,
        atol=ATOL,
        structure=_ops(com__microsoft__Attention=1, Softmax=0, Expand=1),
    )


# ---------------------------------------------------------------------------------- negatives


@pytest.mark.parametrize(
    "kwargs",
    [
        {"softmax_axis": 2},  # Softmax over the query axis: not attention
        {"scale_input": True},  # the scale is a graph input, not a constant
        {"scores_output": True},  # an inner tensor is a graph output
        {"query_bias": True, "mask": False},  # the bias reads the query heads inside the block
    ],
    ids=["softmax-axis", "scale-not-constant", "shared-intermediate", "bias-from-query"],
)
def test_nothing_changes(kwargs: dict[str, Any]) -> None:
    m = attention_model("bert", **kwargs)
    check_pass(m, P, target="ort", feeds=feeds(m), expect_modified=False)


def test_shared_weight_falls_back_to_multihead() -> None:
    """A projection weight read elsewhere cannot be packed: MultiHeadAttention after the three
    MatMuls instead."""
    m = attention_model("bert")
    g = m.graph
    qw = next(t for t in g.tensors().values() if t.name == "q_w")
    extra = g.layer(op="MatMul", inputs=[g.inputs[0], qw], outputs=["q_again"])
    extra[0].dtype, extra[0].shape = np.float32, ["batch", "seq", D]
    g.outputs.append(extra[0])
    check_pass(
        m,
        P,
        target="ort",
        feeds=feeds(m),
        rtol=RTOL,
        atol=ATOL,
        structure=_ops(com__microsoft__MultiHeadAttention=1, com__microsoft__Attention=0),
    )


def test_portable_below_opset_23_keeps_the_graph() -> None:
    m = attention_model("bert", opset=17)
    check_pass(m, P, target="portable", feeds=feeds(m), expect_modified=False)


@pytest.mark.skipif(not ort_runs("Attention", 23), reason="onnxruntime has no Attention(23)")
@pytest.mark.parametrize("variant", ["bert", "whisper", "causal"])
def test_portable_onnx_attention(variant: str) -> None:
    m = attention_model(variant, opset=23, mask=variant == "bert")
    res, _ = check_pass(
        m,
        P,
        target="portable",
        feeds=feeds(m),
        rtol=RTOL,
        atol=ATOL,
        structure=_ops(Attention=1, Softmax=0),
    )
    att = next(n for n in res.model.graph.nodes if n.op == "Attention")
    assert (att.domain or "") == "" and att.attrs["q_num_heads"] == N
    assert att.attrs.get("is_causal", 0) == int(variant == "causal")


def test_bad_target() -> None:
    from graphopt.core.errors import OptionError
    from graphopt.passes import get_pass

    with pytest.raises(OptionError):
        get_pass(P, target="tvm")


# ---------------------------------------------------------------------------------- end to end


def test_bert_tiny_dynamic_optimize_ort() -> None:
    """The dynamic tiny BERT through ``optimize --target ort``: every attention block fused,
    outputs equal at two batch/sequence sizes."""
    path = FIXTURES_DIR / "bert_tiny_dynamic.onnx"
    res = optimize_model(load(path), target="ort")
    ops = op_counts(res.model)
    assert ops.get("com.microsoft.Attention", 0) == 2 and ops.get("Softmax", 0) == 0, ops
    ref = make_session(load(path))
    got = make_session(res.model)
    rng = np.random.default_rng(0)
    for batch, seq in ((1, 5), (3, 17)):
        mask = np.ones((batch, seq), np.int64)
        mask[-1, seq // 2 :] = 0
        f = {
            "input_ids": rng.integers(0, 100, (batch, seq)),
            "attention_mask": mask,
            "token_type_ids": np.zeros((batch, seq), np.int64),
        }
        for a, b in zip(ref.run(None, f), got.run(None, f), strict=True):
            np.testing.assert_allclose(b, a, rtol=RTOL, atol=1e-4)
