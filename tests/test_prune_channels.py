"""Tests for prune-channels: one exactness test per dependency handler, negative cases, real models
and recovery on the digits fixture.

Exactness protocol (DESIGN.md): the channels to be removed are first made exactly zero in the
original (producer weights and biases, BN gamma/beta, additive per-channel constants and the
consumers' input weights); pruning that zeroed model must then reproduce its outputs (rtol 1e-4).
The l1 criterion removes exactly the zeroed channels, since their norm is 0.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.algorithms.prune import (
    analyze,
    groups,
    keep_elements,
    prunable_macs,
    select,
    unit_scores,
    weight_importance,
    zero_pruned,
)
from graphopt.core.feeds import random_feeds
from graphopt.core.loader import load
from graphopt.core.model import Model
from graphopt.core.session import make_session
from graphopt.core.shapes import fix_input_shapes, infer_shapes
from graphopt.fixtures import fixture_path
from graphopt.passes import get_pass
from graphopt.testing import check_pass

RNG = np.random.default_rng(0)


def W(*shape: int, scale: float = 0.3) -> np.ndarray:
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def P(*shape: int) -> np.ndarray:
    return (RNG.random(shape) + 0.5).astype(np.float32)


def build(
    nodes: list[onnx.NodeProto],
    inputs: dict[str, list[int]],
    outputs: list[str],
    inits: dict[str, np.ndarray],
    opset: int = 13,
) -> Model:
    g = helper.make_graph(
        nodes,
        "t",
        [helper.make_tensor_value_info(k, TensorProto.FLOAT, v) for k, v in inputs.items()],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    model = Model.from_onnx(m)
    shaped = model.clone()
    infer_shapes(shaped)  # give the graph outputs their shapes (onnx.checker wants them)
    for t, s in zip(model.graph.outputs, shaped.graph.outputs):
        t.shape = s.shape
    return model


def bn(name: str, x: str, y: str, c: int, inits: dict[str, np.ndarray]) -> onnx.NodeProto:
    inits.update({f"{name}_g": P(c), f"{name}_b": W(c), f"{name}_m": W(c), f"{name}_v": P(c)})
    return helper.make_node(
        "BatchNormalization",
        [x, f"{name}_g", f"{name}_b", f"{name}_m", f"{name}_v"],
        [y],
        name=name,
    )


def conv(
    name: str,
    x: str,
    y: str,
    cin: int,
    cout: int,
    inits: dict[str, np.ndarray],
    k: int = 3,
    group: int = 1,
    bias: bool = True,
    **attrs: Any,
) -> onnx.NodeProto:
    inits[f"{name}_w"] = W(cout, cin // group, k, k)
    ins = [x, f"{name}_w"]
    if bias:
        inits[f"{name}_b"] = W(cout)
        ins.append(f"{name}_b")
    return helper.make_node("Conv", ins, [y], name=name, pads=[k // 2] * 4, group=group, **attrs)


def zeroed(model: Model, ratio: float = 0.5, round_to: int | None = None) -> tuple[Model, int]:
    """The model with the channels l1 would remove made exactly zero; and how many."""
    work = model.clone()
    infer_shapes(work)
    an = analyze(work)
    keep = select(an, groups(an), unit_scores(an, weight_importance(an)), ratio, round_to)
    ke = keep_elements(an, keep)
    zero_pruned(work, an, ke)
    return work, int((~ke).sum())


def exact(model: Model, ratio: float = 0.5, structure=None, **kw: Any):  # noqa: ANN201
    z, n = zeroed(model, ratio)
    assert n > 0, "nothing to prune: the test model is wrong"
    res, _ = check_pass(
        z,
        "prune-channels",
        ratio=ratio,
        recover=False,
        rtol=1e-4,
        atol=1e-5,
        structure=structure,
        **kw,
    )
    assert res.stats["channels_removed"] == n
    return res


def weight_shape(model: Model, node_name: str, index: int = 1) -> tuple[int, ...]:
    from graphopt.core.const_eval import const_value

    node = next(n for n in model.graph.nodes if n.name == node_name)
    v = const_value(node.inputs[index])
    assert v is not None
    return tuple(v.shape)


# ------------------------------------------------------------------------------ handlers
def test_conv_bn_chain_zeroed_by_hand() -> None:
    """Independent of the analysis: zero conv1's channels 0..3 and its BN by hand."""
    inits: dict[str, np.ndarray] = {}
    nodes = [
        conv("c1", "x", "a", 3, 8, inits),
        bn("bn1", "a", "b", 8, inits),
        helper.make_node("Relu", ["b"], ["r"]),
        conv("c2", "r", "y", 8, 4, inits),
    ]
    inits["c1_w"][:4] = 0
    inits["c1_b"][:4] = 0
    inits["bn1_g"][:4] = 0
    inits["bn1_b"][:4] = 0
    m = build(nodes, {"x": [1, 3, 8, 8]}, ["y"], inits)

    def st(pm: Model) -> None:
        assert weight_shape(pm, "c1") == (4, 3, 3, 3)
        assert weight_shape(pm, "c2") == (4, 4, 3, 3)
        assert weight_shape(pm, "bn1", 4) == (4,)

    check_pass(m, "prune-channels", ratio=0.5, recover=False, structure=st)


def test_conv_chain_bn() -> None:
    inits: dict[str, np.ndarray] = {}
    nodes = [
        conv("c1", "x", "a", 3, 8, inits),
        bn("bn1", "a", "b", 8, inits),
        helper.make_node("Relu", ["b"], ["r"]),
        conv("c2", "r", "s", 8, 8, inits),
        helper.make_node("Clip", ["s", "lo", "hi"], ["t"]),
        conv("c3", "t", "y", 8, 4, inits),
    ]
    inits["lo"], inits["hi"] = np.array(0, np.float32), np.array(6, np.float32)
    m = build(nodes, {"x": [1, 3, 8, 8]}, ["y"], inits)
    exact(m, structure=lambda pm: weight_shape(pm, "c3") == (4, 4, 3, 3) or pytest.fail())


def test_depthwise_passes_channels() -> None:
    inits: dict[str, np.ndarray] = {}
    nodes = [
        conv("c1", "x", "a", 3, 8, inits),
        bn("bn1", "a", "b", 8, inits),
        helper.make_node("Relu", ["b"], ["r"]),
        conv("dw", "r", "d", 8, 8, inits, group=8),
        bn("bn2", "d", "e", 8, inits),
        conv("c2", "e", "y", 8, 4, inits, k=1),
    ]

    def st(pm: Model) -> None:
        node = next(n for n in pm.graph.nodes if n.name == "dw")
        assert node.attrs["group"] == 4 and weight_shape(pm, "dw") == (4, 1, 3, 3)

    exact(build(nodes, {"x": [1, 3, 8, 8]}, ["y"], inits), structure=st)


def test_residual_add_ties_producers() -> None:
    inits: dict[str, np.ndarray] = {}
    nodes = [
        conv("c1", "x", "a", 3, 8, inits),
        helper.make_node("Relu", ["a"], ["r"]),
        conv("c2", "r", "b", 8, 8, inits),
        helper.make_node("Add", ["a", "b"], ["s"]),
        conv("c3", "s", "y", 8, 4, inits),
    ]
    m = build(nodes, {"x": [1, 3, 8, 8]}, ["y"], inits)
    work = m.clone()
    infer_shapes(work)
    grps = groups(analyze(work))
    tied = [g for g in grps if len(g.producers) == 2]
    assert len(tied) == 1 and {p.node.name for p in tied[0].producers} == {"c1", "c2"}
    exact(m, structure=lambda pm: weight_shape(pm, "c2") == (4, 4, 3, 3) or pytest.fail())


def test_se_block_hardsigmoid_mul() -> None:
    inits: dict[str, np.ndarray] = {}
    nodes = [
        conv("c1", "x", "a", 3, 16, inits),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        conv("se1", "p", "q", 16, 4, inits, k=1),
        helper.make_node("Relu", ["q"], ["q2"]),
        conv("se2", "q2", "u", 4, 16, inits, k=1),
        helper.make_node("HardSigmoid", ["u"], ["h"], alpha=0.2, beta=0.5),
        helper.make_node("Mul", ["r", "h"], ["s"]),
        conv("c2", "s", "y", 16, 4, inits),
    ]

    def st(pm: Model) -> None:
        assert weight_shape(pm, "se1")[:2] == (2, 8)
        assert weight_shape(pm, "se2")[:2] == (8, 2)
        assert weight_shape(pm, "c2")[:2] == (4, 8)

    exact(build(nodes, {"x": [1, 3, 8, 8]}, ["y"], inits), structure=st)


def test_concat_offsets() -> None:
    inits: dict[str, np.ndarray] = {}
    nodes = [
        conv("c1", "x", "a", 3, 8, inits),
        conv("c2", "x", "b", 3, 4, inits),
        helper.make_node("Concat", ["a", "x", "b"], ["c"], axis=1),
        conv("c3", "c", "y", 15, 4, inits),
    ]
    exact(
        build(nodes, {"x": [1, 3, 8, 8]}, ["y"], inits),
        structure=lambda pm: weight_shape(pm, "c3")[:2] == (4, 9) or pytest.fail(),
    )


def test_split_segments() -> None:
    inits: dict[str, np.ndarray] = {"sp": np.array([3, 5], np.int64)}
    nodes = [
        conv("c1", "x", "a", 3, 8, inits),
        helper.make_node("Split", ["a", "sp"], ["s0", "s1"], axis=1),
        conv("c2", "s0", "y0", 3, 4, inits),
        conv("c3", "s1", "y1", 5, 4, inits),
    ]
    m = build(nodes, {"x": [1, 3, 8, 8]}, ["y0", "y1"], inits)
    inits["c1_w"][:3] *= 5  # keep segment 0 wide so both segments lose channels unevenly
    exact(m)


def test_resize_scales_and_sizes() -> None:
    inits: dict[str, np.ndarray] = {
        "roi": np.zeros(0, np.float32),
        "sc": np.array([1, 1, 2, 2], np.float32),
        "sz": np.array([1, 8, 32, 32], np.int64),
    }
    nodes = [
        conv("c1", "x", "a", 3, 8, inits),
        helper.make_node("Resize", ["a", "roi", "sc"], ["b"], mode="nearest"),
        helper.make_node("Resize", ["b", "roi", "", "sz"], ["c"], mode="nearest"),
        conv("c2", "c", "y", 8, 4, inits),
    ]
    exact(build(nodes, {"x": [1, 3, 8, 8]}, ["y"], inits))


def test_conv_transpose_swapped_layout() -> None:
    inits: dict[str, np.ndarray] = {"ct_w": W(8, 6, 2, 2), "ct_b": W(6)}
    nodes = [
        conv("c1", "x", "a", 3, 8, inits),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("ConvTranspose", ["r", "ct_w", "ct_b"], ["t"], name="ct", strides=[2, 2]),
        bn("bn1", "t", "u", 6, inits),
        conv("c2", "u", "y", 6, 4, inits),
    ]

    def st(pm: Model) -> None:
        assert weight_shape(pm, "ct") == (4, 3, 2, 2)

    exact(build(nodes, {"x": [1, 3, 8, 8]}, ["y"], inits), structure=st)


def test_gemm_after_flatten_channel_blocks() -> None:
    inits: dict[str, np.ndarray] = {
        "fc_w": W(10, 8 * 16),
        "fc_b": W(10),
        "fc2_w": W(10, 5),
        "fc2_b": W(5),
    }
    nodes = [
        conv("c1", "x", "a", 3, 8, inits),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["g"], name="fc", transB=1),
        helper.make_node("Relu", ["g"], ["g2"]),
        helper.make_node("Gemm", ["g2", "fc2_w", "fc2_b"], ["y"], name="fc2"),
    ]

    def st(pm: Model) -> None:
        assert weight_shape(pm, "fc") == (5, 4 * 16)
        assert weight_shape(pm, "fc2") == (5, 5)

    exact(build(nodes, {"x": [1, 3, 8, 8]}, ["y"], inits), structure=st)


def test_constant_node_weights() -> None:
    w1, b1, w2 = W(8, 3, 3, 3), W(8), W(4, 8, 3, 3)
    nodes = [
        helper.make_node("Constant", [], ["w1"], value=numpy_helper.from_array(w1)),
        helper.make_node("Constant", [], ["b1"], value=numpy_helper.from_array(b1)),
        helper.make_node("Constant", [], ["w2"], value=numpy_helper.from_array(w2)),
        helper.make_node("Conv", ["x", "w1", "b1"], ["a"], name="c1", pads=[1] * 4),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("Conv", ["r", "w2"], ["y"], name="c2", pads=[1] * 4),
    ]
    exact(
        build(nodes, {"x": [1, 3, 8, 8]}, ["y"], {}),
        structure=lambda pm: weight_shape(pm, "c2") == (4, 4, 3, 3) or pytest.fail(),
    )


def test_reshape_of_constant_se_bias() -> None:
    """Paddle stores SE biases as Reshape(Constant [C], [1, C, 1, 1])."""
    inits: dict[str, np.ndarray] = {}
    bias = W(8)
    nodes = [
        conv("c1", "x", "a", 3, 8, inits, bias=False),
        helper.make_node("Constant", [], ["bc"], value=numpy_helper.from_array(bias)),
        helper.make_node(
            "Constant", [], ["bs"], value=numpy_helper.from_array(np.array([1, 8, 1, 1], np.int64))
        ),
        helper.make_node("Reshape", ["bc", "bs"], ["br"]),
        helper.make_node("Add", ["a", "br"], ["s"]),
        helper.make_node("Relu", ["s"], ["r"]),
        conv("c2", "r", "y", 8, 4, inits),
    ]
    exact(build(nodes, {"x": [1, 3, 8, 8]}, ["y"], inits))


def test_matmul_chain_and_transpose_reshape() -> None:
    inits: dict[str, np.ndarray] = {
        "w1": W(8, 16),
        "w2": W(16, 6),
        "b1": W(16),
        "shp": np.array([1, 8, 64], np.int64),
    }
    nodes = [
        conv("c1", "x", "a", 3, 8, inits),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("Reshape", ["r", "shp"], ["f"]),
        helper.make_node("Transpose", ["f"], ["t"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["t", "w1"], ["m1"], name="mm1"),
        helper.make_node("Add", ["m1", "b1"], ["m1b"]),
        helper.make_node("Relu", ["m1b"], ["m1r"]),
        helper.make_node("MatMul", ["m1r", "w2"], ["y"], name="mm2"),
    ]

    def st(pm: Model) -> None:
        assert weight_shape(pm, "mm1") == (4, 8)
        assert weight_shape(pm, "mm2") == (8, 6)

    exact(build(nodes, {"x": [1, 3, 8, 8]}, ["y"], inits), structure=st)


def test_classifier_head_concat_shape_rewritten() -> None:
    """PP-OCR cls head: GAP -> Reshape(shape = Concat(Shape(x)[0:1], Cast(const C))) -> MatMul."""
    inits: dict[str, np.ndarray] = {
        "st": np.array([0], np.int64),
        "en": np.array([1], np.int64),
        "wc": W(8, 2),
        "cc": np.array([8], np.int32),
    }
    nodes = [
        conv("c1", "x", "a", 3, 8, inits),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Shape", ["p"], ["sh"]),
        helper.make_node("Slice", ["sh", "st", "en"], ["n"]),
        helper.make_node("Cast", ["cc"], ["c64"], to=TensorProto.INT64),
        helper.make_node("Concat", ["n", "c64"], ["shape"], axis=0),
        helper.make_node("Reshape", ["p", "shape"], ["f"]),
        helper.make_node("MatMul", ["f", "wc"], ["y"], name="head"),
    ]
    exact(
        build(nodes, {"x": [1, 3, 8, 8]}, ["y"], inits),
        structure=lambda pm: weight_shape(pm, "head") == (4, 2) or pytest.fail(),
    )


def test_slice_and_pad_on_channels() -> None:
    inits: dict[str, np.ndarray] = {
        "s": np.array([2], np.int64),
        "e": np.array([7], np.int64),
        "ax": np.array([1], np.int64),
        "pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64),
    }
    nodes = [
        conv("c1", "x", "a", 3, 8, inits),
        helper.make_node("Slice", ["a", "s", "e", "ax"], ["b"]),
        helper.make_node("Pad", ["b", "pads"], ["c"]),
        conv("c2", "c", "y", 5, 4, inits),
    ]
    exact(build(nodes, {"x": [1, 3, 8, 8]}, ["y"], inits))


def test_round_to_and_floor() -> None:
    inits: dict[str, np.ndarray] = {}
    nodes = [
        conv("c1", "x", "a", 3, 32, inits),
        helper.make_node("Relu", ["a"], ["r"]),
        conv("c2", "r", "y", 32, 4, inits),
    ]
    m = build(nodes, {"x": [1, 3, 8, 8]}, ["y"], inits)
    res = get_pass("prune-channels", ratio=0.3, round_to=8, recover=False)(m.clone())
    assert weight_shape(res.model, "c1")[0] == 24  # 32 * 0.7 = 22.4 -> 24
    res = get_pass("prune-channels", ratio=0.9, min_fraction=0.25, recover=False)(m.clone())
    assert weight_shape(res.model, "c1")[0] == 8


# ------------------------------------------------------------------------------ negative
def test_group_touching_graph_output_is_blocked() -> None:
    inits: dict[str, np.ndarray] = {}
    nodes = [
        conv("c1", "x", "a", 3, 8, inits),
        helper.make_node("Relu", ["a"], ["y"]),
        conv("c2", "y", "z", 8, 4, inits),
    ]
    m = build(nodes, {"x": [1, 3, 8, 8]}, ["y", "z"], inits)
    p = get_pass("prune-channels", ratio=0.5, recover=False)
    check_pass(m, p, expect_modified=False)
    grp = next(g for g in p.report.groups if g.name == "c1")
    assert grp.blocked and "graph output 'y'" in grp.reasons[0]


def test_op_without_handler_blocks() -> None:
    inits: dict[str, np.ndarray] = {}
    nodes = [
        conv("c1", "x", "a", 3, 8, inits),
        helper.make_node("LRN", ["a"], ["b"], size=3, name="lrn"),
        conv("c2", "b", "y", 8, 4, inits),
    ]
    m = build(nodes, {"x": [1, 3, 8, 8]}, ["y"], inits)
    p = get_pass("prune-channels", ratio=0.5, recover=False)
    check_pass(m, p, expect_modified=False)
    grp = next(g for g in p.report.groups if g.name == "c1")
    assert grp.blocked and "no handler for op LRN" in grp.reasons[0]


def test_weight_that_is_a_graph_input_blocks() -> None:
    inits: dict[str, np.ndarray] = {}
    nodes = [
        conv("c1", "x", "a", 3, 8, inits),
        helper.make_node("Conv", ["a", "w2"], ["y"], name="c2", pads=[1] * 4),
    ]
    m = build(nodes, {"x": [1, 3, 8, 8], "w2": [4, 8, 3, 3]}, ["y"], inits)
    p = get_pass("prune-channels", ratio=0.5, recover=False)
    check_pass(m, p, expect_modified=False)
    assert "non-constant weight" in next(g for g in p.report.groups if g.name == "c1").reasons[0]


# ------------------------------------------------------------------------------ recovery
def test_digits_recovery_keeps_accuracy() -> None:
    m = load(fixture_path("digits_cnn.onnx"))
    ev = np.load(fixture_path("digits_eval.npz"))
    cal = np.load(fixture_path("digits_calib.npz"))

    def acc(model: Model) -> float:
        out = make_session(model).run(None, {"x": ev["x"]})[0]
        return float((out.argmax(1) == ev["y"]).mean())

    base = acc(m)
    p = get_pass("prune-channels", ratio=0.2, calib=str(fixture_path("digits_calib.npz")))
    res = p(m.clone())
    assert res.stats["macs_after"] <= 0.7 * res.stats["macs_before"]  # 30% fewer MACs
    assert res.stats["layers_refit"] >= 2
    assert acc(res.model) >= base - 0.01
    bare = get_pass("prune-channels", ratio=0.2, recover=False)(m.clone())
    assert acc(bare.model) < acc(res.model)  # recovery is what keeps the accuracy
    assert cal["x"].shape[0] > 0


def test_activation_criterion_needs_calib() -> None:
    from graphopt.core.errors import GraphoptError

    m = load(fixture_path("cnn.onnx"))
    with pytest.raises(GraphoptError, match="calibration"):
        get_pass("prune-channels", ratio=0.3, criterion="activation")(m.clone())
    feeds = [random_feeds(m, seed=s) for s in range(4)]
    res = get_pass("prune-channels", ratio=0.3, criterion="activation", calib=feeds, recover=False)(
        m.clone()
    )
    assert res.modified


def test_bn_criterion_reads_gamma() -> None:
    inits: dict[str, np.ndarray] = {}
    nodes = [
        conv("c1", "x", "a", 3, 8, inits),
        bn("bn1", "a", "b", 8, inits),
        helper.make_node("Relu", ["b"], ["r"]),
        conv("c2", "r", "y", 8, 4, inits),
    ]
    inits["bn1_g"][:] = np.arange(1, 9, dtype=np.float32)  # channels 0..3 least important
    inits["c1_w"][4:] *= 0.01  # ... though their weights are the largest
    m = build(nodes, {"x": [1, 3, 8, 8]}, ["y"], inits)
    res = get_pass("prune-channels", ratio=0.5, criterion="bn", recover=False)(m.clone())
    node = next(n for n in res.model.graph.nodes if n.name == "bn1")
    np.testing.assert_allclose(node.inputs[1].values, np.arange(5, 9))


def test_api_and_scan() -> None:
    from graphopt.jobs.prune import prune, prune_scan

    m = load(fixture_path("digits_cnn.onnx"))
    out = prune(m, 0.3, calib=str(fixture_path("digits_calib.npz")), round_to=4)
    assert out.macs_ratio < 0.7 and out.fidelity[0].top1_agreement is not None
    assert all(g.width_after % 4 == 0 for g in out.report.groups if not g.blocked)
    pts = prune_scan(m, [0.1, 0.4], recover=False, input_shapes={"x": (1, 1, 8, 8)})
    assert pts[0].macs_ratio > pts[1].macs_ratio


# ------------------------------------------------------------------------------ real models
@pytest.mark.real
@pytest.mark.parametrize("name,floor", [("det", 0.99), ("cls", 0.99), ("rec", 0.94)])
def test_real_models_prune(name: str, floor: float) -> None:
    from conftest import real_or_skip

    path, shapes = real_or_skip(name)
    m = load(path)
    fix_input_shapes(m, shapes)
    infer_shapes(m)
    an = analyze(m)
    from graphopt.core.cost import model_cost

    pr, total = prunable_macs(an, {nc.name: nc.macs for nc in model_cost(m).nodes})
    assert pr / total >= floor
    p = get_pass("prune-channels", ratio=0.3, round_to=8, recover=False)
    res = p(m.clone())
    assert res.stats["macs_after"] <= 0.6 * res.stats["macs_before"]
    onnx.checker.check_model(res.model.to_onnx(), full_check=True)
    feeds = random_feeds(m, seed=0)
    out = make_session(res.model).run(None, feeds)
    ref = make_session(m).run(None, feeds)
    assert [o.shape for o in out] == [r.shape for r in ref]


@pytest.mark.real
def test_real_cls_exact_after_zeroing() -> None:
    from conftest import real_or_skip

    path, shapes = real_or_skip("cls")
    m = load(path)
    fix_input_shapes(m, shapes)
    z, n = zeroed(m, 0.3, round_to=8)
    assert n > 100
    check_pass(z, "prune-channels", ratio=0.3, round_to=8, recover=False, rtol=1e-4, atol=1e-5)


def test_global_scope_prunes_unevenly() -> None:
    inits: dict[str, np.ndarray] = {}
    nodes = [
        conv("c1", "x", "a", 3, 16, inits),
        helper.make_node("Relu", ["a"], ["r"]),
        conv("c2", "r", "b", 16, 16, inits),
        helper.make_node("Relu", ["b"], ["s"]),
        conv("c3", "s", "y", 16, 4, inits),
    ]
    inits["c1_w"][:8] *= 0.01  # half of c1's channels are nearly dead, c2's are all alike
    m = build(nodes, {"x": [1, 3, 8, 8]}, ["y"], inits)
    res = get_pass("prune-channels", ratio=0.25, scope="global", recover=False)(m.clone())
    assert weight_shape(res.model, "c1")[0] == 8  # 8 of the 32 channels, all from c1
    assert weight_shape(res.model, "c2")[0] == 16
    res = get_pass("prune-channels", ratio=0.25, recover=False)(m.clone())
    assert weight_shape(res.model, "c1")[0] == weight_shape(res.model, "c2")[0] == 12


@pytest.mark.parametrize(
    "attrs",
    [
        dict(strides=[2, 2], pads=[1, 1, 1, 1]),
        dict(dilations=[2, 2], pads=[2, 1, 2, 1]),
        dict(auto_pad="SAME_UPPER", strides=[2, 1]),
    ],
)
def test_recovery_im2col_matches_conv(attrs: dict) -> None:
    """The sampled im2col rows times the weight reproduce onnxruntime's conv output."""
    from graphopt.algorithms.prune.recover import _conv_patches

    w = W(5, 3, 3, 3)
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="c", **attrs)
    m = build([node], {"x": [1, 3, 9, 11]}, ["y"], {"w": w})
    x = RNG.standard_normal((1, 3, 9, 11)).astype(np.float32)
    y = make_session(m).run(None, {"x": x})[0][0]
    gnode = m.graph.nodes[0]
    pos = np.arange(y.shape[1] * y.shape[2])
    rows = _conv_patches(x[0], gnode, w.shape, (y.shape[1], y.shape[2]), pos)
    np.testing.assert_allclose(rows @ w.reshape(5, -1).T, y.reshape(5, -1).T, rtol=1e-4, atol=1e-5)


def test_recovery_restores_a_perturbed_layer_exactly() -> None:
    """Removed channels that are exactly zero leave c2's least-squares problem with an exact
    solution (its kept weights): with a negligible ridge, recovery must find it again."""
    inits: dict[str, np.ndarray] = {}
    nodes = [
        conv("c1", "x", "a", 3, 8, inits),
        helper.make_node("Relu", ["a"], ["r"]),
        conv("c2", "r", "y", 8, 4, inits),
    ]
    inits["c1_w"][:4] = 0
    inits["c1_b"][:4] = 0  # channels 0..3 are exactly zero: removal + refit stays exact
    m = build(nodes, {"x": [1, 3, 8, 8]}, ["y"], inits)
    feeds = [random_feeds(m, seed=s) for s in range(6)]
    res, _ = check_pass(
        m,
        "prune-channels",
        ratio=0.5,
        calib=feeds,
        ridge=1e-9,
        rtol=1e-3,
        atol=1e-4,
        feeds=random_feeds(m, seed=99),
    )
    assert res.stats["layers_refit"] == 1
