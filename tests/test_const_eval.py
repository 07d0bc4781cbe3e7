"""Tests for graphopt/core/const_eval.py: the one constant evaluator and its size guard."""

from __future__ import annotations

import tracemalloc

import numpy as np
import onnx_graphsurgeon as gs
import pytest

import graphopt.core.const_eval as ce
from graphopt.core.const_eval import (
    ConstantEvaluator,
    SizeGuard,
    const_value,
    constant_subgraph,
    evaluate,
    literal_value,
    size_refusal,
)
from graphopt.core.model import Model
from graphopt.passes import get_pass

OPSET = 17


def _c(name: str, v: np.ndarray) -> gs.Constant:
    return gs.Constant(name, np.asarray(v))


def _node(
    op: str, inputs: list[gs.Tensor], name: str | None = None, n_out: int = 1, **attrs: object
) -> gs.Node:
    name = name or op.lower()
    outs = [gs.Variable(f"{name}_out{i}") for i in range(n_out)]
    return gs.Node(op, name, attrs=dict(attrs), inputs=inputs, outputs=outs)


@pytest.fixture()
def no_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything is computed (onnxruntime or the reference evaluator)."""

    def refuse(*_a: object, **_k: object) -> None:
        raise AssertionError("a refused node was evaluated")

    monkeypatch.setattr(ce, "_run_ort", refuse)
    monkeypatch.setattr(ce, "ReferenceEvaluator", refuse)


def test_constant_of_shape_of_1e10_elements_is_refused_without_allocating(no_kernels: None) -> None:
    node = _node("ConstantOfShape", [_c("shape", np.array([100_000, 100_000], np.int64))])
    assert node.outputs[0].shape is None  # no IR shape: the estimate comes from ONNX inference
    tracemalloc.start()
    try:
        res = evaluate(node, OPSET, max_bytes=1 << 30)
        why = size_refusal(node, OPSET, 1 << 30)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert res.values is None and not res
    assert res.reason is not None and "40,000,000,000 bytes" in res.reason, res.reason
    assert why == res.reason
    assert peak < 16 << 20  # nothing near 40 GB (nor 1 GB) was allocated
    assert SizeGuard(OPSET).estimate(node) == [40_000_000_000]


def test_size_guard_uses_ir_shapes_first_and_none_refuses_nothing(no_kernels: None) -> None:
    node = _node(
        "Expand", [_c("x", np.ones((1, 3), np.float32)), _c("s", np.array([4, 3], np.int64))]
    )
    node.outputs[0].shape, node.outputs[0].dtype = [1 << 20, 1 << 10], np.float32  # as the IR says
    assert SizeGuard(OPSET).estimate(node) == [4 << 30]
    assert size_refusal(node, OPSET, 1 << 30) is not None
    assert size_refusal(node, OPSET, None) is None


def test_unknown_estimates_are_checked_node_by_node() -> None:
    # Concat builds the shape at run time: ConstantOfShape is estimated once Concat is computed
    side = np.array([1000], np.int64)
    cat = _node("Concat", [_c("a", side), _c("b", side)], axis=0)
    fill = _node("ConstantOfShape", [cat.outputs[0]])
    small = evaluate([cat, fill], OPSET, max_bytes=1 << 20)
    assert small.values is None and small.reason is not None
    assert "ConstantOfShape" in small.reason and "4,000,000 bytes" in small.reason
    ok = evaluate([cat, fill], OPSET, max_bytes=1 << 23)
    assert ok.values is not None
    np.testing.assert_array_equal(ok.values["concat_out0"], [1000, 1000])
    assert ok.values["constantofshape_out0"].shape == (1000, 1000)
    assert ok.values["constantofshape_out0"].dtype == np.float32


def test_evaluate_a_small_subgraph_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((2, 6)).astype(np.float32)
    k = gs.Node("Constant", "k", attrs={"value": _c("kv", w)}, outputs=[gs.Variable("k_out")])
    r = _node("Reshape", [k.outputs[0], _c("shp", np.array([3, -1], np.int64))])
    add = _node("Add", [r.outputs[0], _c("one", np.float32(1.5))])
    res = evaluate([k, r, add], OPSET)
    assert res.values is not None and res.reason is None
    np.testing.assert_array_equal(res.values["add_out0"], w.reshape(3, -1) + np.float32(1.5))
    # the same through const_value, which walks up from the tensor
    sub = constant_subgraph(add.outputs[0])
    assert not isinstance(sub, str) and [n.name for n in sub] == ["k", "reshape", "add"]
    np.testing.assert_array_equal(const_value(add.outputs[0], OPSET), res.values["add_out0"])


def test_const_value_limits() -> None:
    x = gs.Variable("x", dtype=np.float32, shape=[2])
    w = _c("w", np.arange(6, dtype=np.float32))
    tile = _node("Tile", [w, _c("reps", np.array([2], np.int64))])
    neg = _node("Neg", [tile.outputs[0]])
    assert const_value(w) is not None and literal_value(w) is not None
    assert const_value(neg.outputs[0]) is None  # no opset: literal constants only
    np.testing.assert_array_equal(const_value(neg.outputs[0], OPSET), -np.tile(np.arange(6), 2))
    assert const_value(neg.outputs[0], OPSET, ops={"Neg"}) is None  # Tile is not allowed
    assert "Tile" in constant_subgraph(neg.outputs[0], ops={"Neg"})  # type: ignore[operator]
    assert const_value(neg.outputs[0], OPSET, max_depth=0) is None  # Tile is one node too far
    dep = _node("Relu", [x])
    assert const_value(dep.outputs[0], OPSET) is None  # a graph input
    rnd = _node("RandomNormal", [], shape=[2])
    res = evaluate(rnd, OPSET)
    assert res.values is None and "random" in (res.reason or "")
    assert const_value(neg.outputs[0], OPSET, max_bytes=16) is None  # 48 bytes: over the guard


def test_evaluator_batches_and_falls_back_per_node() -> None:
    a = _node("Add", [_c("p", np.ones(3, np.float32)), _c("q", np.ones(3, np.float32))], "a")
    bad = _node("Reshape", [a.outputs[0], _c("bad_shape", np.array([7], np.int64))], "bad")
    ok = _node("Mul", [a.outputs[0], _c("two", np.float32(2))], "ok")
    ev = ConstantEvaluator(OPSET)
    got = ev.run([a, bad, ok], {})
    assert ev.sessions > 1  # the batch failed (bad reshape), then node by node
    np.testing.assert_array_equal(got[id(ok.outputs[0])], [4, 4, 4])
    assert id(bad.outputs[0]) not in got


def test_fold_constants_leaves_a_huge_constant_of_shape_alone(no_kernels: None) -> None:
    # x + ReduceSum(ConstantOfShape([1e5, 1e5])): the IR has no shape for the big value
    x = gs.Variable("x", dtype=np.float32, shape=[1])
    big = _node("ConstantOfShape", [_c("shape", np.array([100_000, 100_000], np.int64))], "big")
    red = _node("ReduceSum", [big.outputs[0]], "red", keepdims=0)
    y = gs.Variable("y", dtype=np.float32, shape=[1])
    add = gs.Node("Add", "add", inputs=[x, red.outputs[0]], outputs=[y])
    graph = gs.Graph(nodes=[big, red, add], inputs=[x], outputs=[y], opset=OPSET)
    model = Model(graph)
    res = get_pass("fold-constants")(model)
    assert not res.modified
    assert [n.op for n in res.model.graph.nodes] == ["ConstantOfShape", "ReduceSum", "Add"]
