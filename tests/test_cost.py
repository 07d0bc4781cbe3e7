"""Tests for graphopt.core.cost: hand-computed MACs on tiny graphs, parameter and activation
accounting, and an independent MACs count of the published PP-OCR models (onnxruntime arrays + raw
proto)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.core.cost import model_cost, node_macs, tensor_bytes
from graphopt.core.loader import load
from graphopt.core.model import Model
from graphopt.core.shapes import fix_input_shapes, infer_shapes
from graphopt.fixtures import real_model

logger = logging.getLogger(__name__)

F = TensorProto.FLOAT


def _model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    inits: list[onnx.TensorProto] | None = None,
    opset: int = 17,
) -> Model:
    """Build a model, check it, and fill its shapes."""
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits or [])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(proto, full_check=True)
    return infer_shapes(Model.from_onnx(proto))


def _w(name: str, *shape: int) -> onnx.TensorProto:
    rng = np.random.default_rng(0)
    return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)


def _vi(name: str, *shape: int | str) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, F, list(shape))


def _single(model: Model) -> int:
    (node,) = [n for n in model.graph.nodes if n.op != "Constant"]
    return node_macs(node)


# ------------------------------------------------------------------------- hand-computed MACs


def test_conv_groups_dilation_stride_padding() -> None:
    # effective kernel 2*(3-1)+1 = 5; out = (17 + 2 - 5) // 2 + 1 = 8
    node = helper.make_node(
        "Conv", ["x", "w", "b"], ["y"], group=2, dilations=[2, 2], strides=[2, 2], pads=[1, 1, 1, 1]
    )
    m = _model(
        [node],
        [_vi("x", 1, 8, 17, 17)],
        [_vi("y", 1, 12, 8, 8)],
        [_w("w", 12, 4, 3, 3), _w("b", 12)],
    )
    assert list(m.graph.outputs[0].shape) == [1, 12, 8, 8]  # re-derived by shape inference
    macs = 1 * 12 * 8 * 8 * (8 // 2) * 3 * 3
    assert macs == 27648
    assert _single(m) == macs
    cost = model_cost(m)
    assert cost.macs == macs
    assert cost.flops == 2 * macs + 12 * 8 * 8  # bias adds in flops only
    assert cost.params == 12 * 4 * 9 + 12
    assert cost.param_bytes == 4 * cost.params


def test_depthwise_conv() -> None:
    node = helper.make_node("Conv", ["x", "w"], ["y"], group=16, pads=[1, 1, 1, 1])
    m = _model([node], [_vi("x", 2, 16, 10, 10)], [_vi("y", 2, 16, 10, 10)], [_w("w", 16, 1, 3, 3)])
    assert _single(m) == 2 * 16 * 10 * 10 * 1 * 9 == 28800
    assert model_cost(m).flops == 2 * 28800  # no bias


def test_conv_transpose_grouped() -> None:
    # Cin=4, group=2, W [Cin, Cout/group=3, 3, 3] -> Cout=6, out = (5-1)*2 + 3 = 11
    node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], group=2, strides=[2, 2])
    m = _model([node], [_vi("x", 1, 4, 5, 5)], [_vi("y", 1, 6, 11, 11)], [_w("w", 4, 3, 3, 3)])
    assert _single(m) == 1 * 4 * 5 * 5 * 3 * 3 * 3 == 2700


@pytest.mark.parametrize(("trans_a", "a_shape"), [(0, (3, 5)), (1, (5, 3))])
def test_gemm_trans(trans_a: int, a_shape: tuple[int, int]) -> None:
    node = helper.make_node("Gemm", ["a", "b", "c"], ["y"], transA=trans_a, transB=1)
    m = _model([node], [_vi("a", *a_shape)], [_vi("y", 3, 7)], [_w("b", 7, 5), _w("c", 7)])
    assert _single(m) == 3 * 7 * 5
    assert model_cost(m).flops == 2 * 105 + 21


@pytest.mark.parametrize(
    ("a", "b", "y", "macs"),
    [
        ((2, 1, 4, 6), (3, 6, 5), (2, 3, 4, 5), 2 * 3 * 4 * 5 * 6),  # broadcast batch dims
        ((6,), (2, 6, 5), (2, 5), 2 * 5 * 6),  # 1-D left operand
        ((2, 4, 6), (6,), (2, 4), 2 * 4 * 6),  # 1-D right operand
        ((6,), (6,), (), 6),  # dot product
    ],
)
def test_matmul_batched_broadcast(
    a: tuple[int, ...], b: tuple[int, ...], y: tuple[int, ...], macs: int
) -> None:
    node = helper.make_node("MatMul", ["a", "b"], ["y"])
    m = _model([node], [_vi("a", *a), _vi("b", *b)], [_vi("y", *y)])
    assert tuple(m.graph.outputs[0].shape) == y
    assert _single(m) == macs
    ref = np.matmul(np.zeros(a, np.float32), np.zeros(b, np.float32))
    assert ref.shape == y


def test_symbolic_shape_is_skipped_and_reported() -> None:
    node = helper.make_node("Conv", ["x", "w"], ["y"])
    m = _model([node], [_vi("x", "N", 3, 8, 8)], [_vi("y", "N", 4, 6, 6)], [_w("w", 4, 3, 3, 3)])
    cost = model_cost(m)
    assert cost.macs == 0
    assert cost.unknown_shapes == 2  # x and y
    assert cost.activation_bytes_naive == 0
    assert cost.params == 4 * 3 * 9


# ------------------------------------------------------------------------- params


def test_params_shared_weight_counted_once() -> None:
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["a"]),
        helper.make_node("Conv", ["x", "w"], ["b"]),
        helper.make_node(
            "Constant", [], ["k"], value=numpy_helper.from_array(np.ones((4, 1, 1), np.float32))
        ),
        helper.make_node("Add", ["a", "b"], ["s"]),
        helper.make_node("Mul", ["s", "k"], ["y"]),
    ]
    m = _model(nodes, [_vi("x", 1, 3, 8, 8)], [_vi("y", 1, 4, 8, 8)], [_w("w", 4, 3, 1, 1)])
    cost = model_cost(m)
    assert cost.params == 12 + 4
    assert cost.param_bytes == 4 * 16
    convs = [nc for nc in cost.nodes if nc.op == "Conv"]
    assert [nc.params for nc in convs] == [12, 12]  # each reader sees the weight
    assert sum(nc.params for nc in cost.nodes if nc.op == "Mul") == 4  # Constant value -> its user
    assert cost.by_op()["Conv"] == {
        "count": 2,
        "macs": 2 * 4 * 64 * 3,
        "flops": 2 * 2 * 4 * 64 * 3,
        "params": 24,
    }
    assert cost.by_op()["Constant"]["params"] == 0
    # the Constant output is a parameter, not an activation: x, a, b, s, y
    assert cost.activation_bytes_naive == 4 * (3 * 64 + 4 * 4 * 64)


def test_tensor_bytes() -> None:
    m = _model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x", 2, 3)], [_vi("y", 2, 3)])
    assert tensor_bytes(m.graph.inputs[0]) == 24
    m2 = _model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x", "n", 3)], [_vi("y", "n", 3)])
    assert tensor_bytes(m2.graph.inputs[0]) is None


# ------------------------------------------------------------------------- activation memory


def test_peak_vs_naive_chain() -> None:
    # x -> a -> b -> c, 4000 bytes each: the graph input x (the caller's) is held for the whole
    # run, and at most a producer's input and output are live beside it
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="r0"),
        helper.make_node("Relu", ["a"], ["b"], name="r1"),
        helper.make_node("Relu", ["b"], ["c"], name="r2"),
    ]
    m = _model(nodes, [_vi("x", 1, 1000)], [_vi("c", 1, 1000)])
    cost = model_cost(m)
    assert cost.activation_bytes_naive == 4 * 4000
    assert cost.activation_bytes_peak == 3 * 4000
    assert cost.peak_node == "r1"
    assert [nc.output_bytes for nc in cost.nodes] == [4000] * 3


def test_peak_vs_naive_diamond() -> None:
    # x feeds two branches; x, the graph input, stays live to the end (the caller's), so x, a, b
    # and c are live together at the join
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="left"),
        helper.make_node("Sigmoid", ["x"], ["b"], name="right"),
        helper.make_node("Add", ["a", "b"], ["c"], name="join"),
        helper.make_node("Relu", ["c"], ["d"], name="tail"),
    ]
    m = _model(nodes, [_vi("x", 1, 1000)], [_vi("d", 1, 1000)])
    cost = model_cost(m)
    assert cost.activation_bytes_naive == 5 * 4000
    assert cost.activation_bytes_peak == 4 * 4000
    assert cost.peak_node == "join"
    assert cost.flops == 1000 + 4 * 1000 + 1000 + 1000


def test_graph_outputs_stay_alive() -> None:
    # 'a' is a graph output: it is never freed, so the tail adds to it
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="n0"),
        helper.make_node("Relu", ["a"], ["b"], name="n1"),
        helper.make_node("Relu", ["b"], ["c"], name="n2"),
    ]
    m = _model(nodes, [_vi("x", 1000)], [_vi("a", 1000), _vi("c", 1000)])
    cost = model_cost(m)
    assert cost.activation_bytes_peak == 4 * 4000  # x (the caller's), a, b, c at n2
    assert cost.peak_node == "n2"


def test_if_subgraph_nodes_and_outer_liveness() -> None:
    then_g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["t"])], "then", [], [_vi("t", 4, 8)]
    )
    else_g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["e"])], "else", [], [_vi("e", 4, 8)]
    )
    nodes = [
        helper.make_node("Relu", ["x0"], ["x"], name="pre"),
        helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_g, else_branch=else_g),
    ]
    cond = helper.make_tensor_value_info("cond", TensorProto.BOOL, [])
    m = _model(nodes, [_vi("x0", 4, 8), cond], [_vi("y", 4, 8)], [_w("w", 8, 8)])
    cost = model_cost(m)
    ops = [nc.op for nc in cost.nodes]
    assert ops[:2] == ["Relu", "If"] and sorted(ops[2:]) == ["MatMul", "Relu"]  # both branches
    assert cost.macs == 4 * 8 * 8
    assert cost.params == 64
    # the planner's liveness model: at the If's exit step cond, x (read inside the branches), the
    # outputs of both branches (either may have run: both have their place) and y are live, and
    # so is the graph input x0 (the caller's, held for the whole run)
    assert cost.peak_node == "if"
    assert cost.activation_bytes_peak == 128 + 1 + 128 + 128 + 128 + 128


def test_large_chain_is_linear() -> None:
    """10k nodes: costs in one linear pass (timed in the report, not asserted here)."""
    n = 10_000
    nodes = [helper.make_node("Relu", [f"t{i}"], [f"t{i + 1}"], name=f"n{i}") for i in range(n)]
    m = _model(nodes, [_vi("t0", 256)], [_vi(f"t{n}", 256)])
    cost = model_cost(m)
    assert len(cost.nodes) == n
    assert cost.activation_bytes_peak == 3 * 1024  # t0 (the caller's input) + one Relu
    assert cost.activation_bytes_naive == (n + 1) * 1024


# ------------------------------------------------------------------------- real models


_CONTRACTIONS = ("Conv", "ConvTranspose", "MatMul", "Gemm")


def _independent_macs(path: Path, shape: tuple[int, ...]) -> dict[str, int]:
    """MACs of every contraction node, from onnxruntime's actual arrays and the raw proto's weights.

    Nothing here goes through graphopt: every input and output of the contraction nodes is exposed
    as a graph output, the model runs once, and the count is taken from the arrays' real shapes.
    """
    import onnxruntime as ort

    proto = onnx.load(str(path))
    weights: dict[str, np.ndarray] = {
        t.name: numpy_helper.to_array(t) for t in proto.graph.initializer
    }
    for n in proto.graph.node:
        if n.op_type == "Constant" and n.attribute[0].name == "value":
            weights[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    targets = [n for n in proto.graph.node if n.op_type in _CONTRACTIONS]
    names = {t for n in targets for t in (*n.input[:2], n.output[0]) if t not in weights}
    have = {o.name for o in proto.graph.output}
    for name in sorted(names - have):
        proto.graph.output.append(helper.make_tensor_value_info(name, F, None))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"x": x}), strict=True))
    arrays = {**outs, **weights}
    macs: dict[str, int] = {}
    for n in targets:
        a, b, y = arrays[n.input[0]], arrays[n.input[1]], arrays[n.output[0]]
        attrs = {at.name: helper.get_attribute_value(at) for at in n.attribute}
        if n.op_type == "Conv":
            assert b.shape[1] * attrs.get("group", 1) == a.shape[1]
            macs[n.name] = y.size * int(np.prod(b.shape[1:]))
        elif n.op_type == "ConvTranspose":
            macs[n.name] = a.size * int(np.prod(b.shape[1:]))
        elif n.op_type == "Gemm":
            k = a.shape[0] if attrs.get("transA", 0) else a.shape[1]
            macs[n.name] = y.size * k
        else:  # MatMul: numpy semantics
            assert np.matmul(a, b).shape == y.shape
            macs[n.name] = y.size * a.shape[-1]
    return macs


@pytest.mark.real
@pytest.mark.parametrize("key", ["det", "rec", "cls"])
def test_real_ppocr_macs_match_independent_count(key: str) -> None:
    pytest.importorskip("rapidocr_onnxruntime")
    path, shapes = real_model(key)  # det x: 1x3x320x320, rec 1x3x48x320, cls 1x3x48x192
    model = infer_shapes(fix_input_shapes(load(path), shapes))
    cost = model_cost(model)
    ref = _independent_macs(path, shapes["x"])
    ours = {nc.name: nc.macs for nc in cost.nodes if nc.op in _CONTRACTIONS}
    total_ref = sum(ref.values())
    logger.info(
        "%s MACs: graphopt %d, independent %d (%+.4f%%)",
        key,
        cost.macs,
        total_ref,
        100 * (cost.macs - total_ref) / total_ref,
    )
    assert cost.unknown_shapes == 0
    assert math.isclose(cost.macs, total_ref, rel_tol=0.01)
    assert ours == ref  # node by node, in fact exact
    assert cost.activation_bytes_peak <= cost.activation_bytes_naive
    proto = onnx.load(str(path))  # every constant of these models is a Constant node
    values = [
        numpy_helper.to_array(n.attribute[0].t) for n in proto.graph.node if n.op_type == "Constant"
    ]
    values += [numpy_helper.to_array(t) for t in proto.graph.initializer]
    assert cost.params == sum(v.size for v in values)
    assert cost.param_bytes == sum(v.nbytes for v in values)


@pytest.mark.real
def test_real_silero_subgraphs_are_walked() -> None:
    """silero-vad keeps its network inside If branches: every nested node is costed once."""
    pytest.importorskip("silero_vad")
    path, shapes = real_model("silero_op15")
    model = infer_shapes(fix_input_shapes(load(path), shapes))
    cost = model_cost(model)
    assert len(cost.nodes) == model.num_nodes() > len(model.graph.nodes)
    assert cost.params > 0
    assert cost.activation_bytes_peak <= cost.activation_bytes_naive
