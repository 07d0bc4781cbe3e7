"""The pattern engine: matching (DAG bindings, commutativity) and its escaping-value guarantees."""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from helpers_graphs import make_model, vi
from onnx import helper

from graphopt.core.graph import make_node
from graphopt.core.model import Model
from graphopt.core.pattern import (
    Const,
    Match,
    Op,
    Opt,
    Refusal,
    RewritePass,
    Rule,
    Var,
    match_pattern,
    scalar,
)
from graphopt.testing import check_pass, op_counts


class MulMulToMul(Rule):
    """Mul(Mul(x, a), b) -> Mul(x, a*b) for constants a, b (a toy rule that modifies weights)."""

    name = "mul-mul"
    pattern = Op(
        "Mul", [Op("Mul", ["x", Const("a")], commutative=True), Const("b")], commutative=True
    )
    modifies = ("a", "b")

    def rewrite(self, m: Match, outputs: list[gs.Variable]) -> list[gs.Node]:
        c = gs.Constant(m["a"].name + "_x", np.asarray(m.value("a") * m.value("b"), np.float32))
        return [make_node("Mul", [m["x"], c], outputs)]


class MulMulPass(RewritePass):
    name = "test-mul-mul"
    rules = (MulMulToMul(),)


def _chain(shared: bool = False, expose_inner: bool = False, weight_input: bool = False) -> Model:
    nodes = [helper.make_node("Mul", ["x", "a"], ["t"]), helper.make_node("Mul", ["b", "t"], ["y"])]
    outputs = [vi("y", [2, 3])]
    inputs = [vi("x", [2, 3])]
    inits = {"a": np.full((3,), 2.0, np.float32), "b": np.full((1,), 3.0, np.float32)}
    if shared:
        nodes.append(helper.make_node("Add", ["x", "a"], ["z"]))
        outputs.append(vi("z", [2, 3]))
    if expose_inner:
        outputs.append(vi("t", [2, 3]))
    if weight_input:
        del inits["a"]
        inputs.append(vi("a", [3]))
    return make_model(nodes, inputs, outputs, inits)


def test_rewrite_applies_and_verifies() -> None:
    res, _ = check_pass(
        _chain(),
        MulMulPass(),
        structure=lambda m: op_counts(m) == {"Mul": 1} or pytest.fail(str(op_counts(m))),
    )
    assert res.stats == {"mul-mul": 1}


@pytest.mark.parametrize("case", ["shared", "expose_inner", "weight_input"])
def test_escaping_values_refused(case: str) -> None:
    m = _chain(**{case: True})
    feeds = {"x": np.ones((2, 3), np.float32)}
    if case == "weight_input":
        feeds["a"] = np.full((3,), 2.0, np.float32)
    check_pass(m, MulMulPass(), expect_modified=False, feeds=feeds)


def test_dag_binding_requires_same_tensor() -> None:
    # x * Clip(x + 3, 0, 6): the two x must be one tensor
    pat = Op(
        "Mul",
        [
            "x",
            Op(
                "Clip",
                [Op("Add", ["x", Const("three", scalar(3.0))], commutative=True), None, None],
            ),
        ],
        commutative=True,
    )
    nodes = [
        helper.make_node("Add", ["x", "three"], ["s"]),
        helper.make_node("Clip", ["s", "lo", "hi"], ["c"]),
        helper.make_node("Mul", ["c", "x"], ["y"]),
        helper.make_node("Mul", ["c", "w"], ["y2"]),
    ]
    inits = {
        "three": np.array(3.0, np.float32),
        "lo": np.array(0.0, np.float32),
        "hi": np.array(6.0, np.float32),
    }
    m = make_model(nodes, [vi("x", [4]), vi("w", [4])], [vi("y", [4]), vi("y2", [4])], inits)
    mul_x, mul_w = [n for n in m.graph.nodes if n.op == "Mul"]
    assert match_pattern(pat, mul_x) is not None
    assert match_pattern(pat, mul_w) is None


def test_const_predicate_and_var() -> None:
    nodes = [helper.make_node("Add", ["x", "k"], ["y"])]
    m = make_model(nodes, [vi("x", [2])], [vi("y", [2])], {"k": np.array(3.0, np.float32)})
    add = m.graph.nodes[0]
    assert match_pattern(Op("Add", [Var("x"), Const("k", scalar(3.0))]), add) is not None
    assert match_pattern(Op("Add", [Var("x"), Const("k", scalar(4.0))]), add) is None
    assert match_pattern(Op("Add", [Const("k"), Var("x")], commutative=False), add) is None
    assert match_pattern(Op("Add", [Const("k"), Var("x")], commutative=True), add) is not None


@pytest.mark.parametrize("op", ["Add", "Mul", "Max", "Min", "Sum", "And", "Or", "Xor", "Equal"])
def test_commutative_ops_match_either_input_order(op: str) -> None:
    """The constant comes first in the graph, second in the pattern: matched without saying
    ``commutative=True``; a non-commutative op is not."""
    dt = np.bool_ if op in ("And", "Or", "Xor") else np.float32
    nodes = [helper.make_node(op, ["k", "x"], ["y"])]
    m = make_model(
        nodes,
        [vi("x", [2], helper.np_dtype_to_tensor_dtype(np.dtype(dt)))],
        [
            vi(
                "y",
                [2],
                helper.np_dtype_to_tensor_dtype(
                    np.dtype(np.bool_ if op in ("And", "Or", "Xor", "Equal") else dt)
                ),
            )
        ],
        {"k": np.ones(2, dt)},
    )
    found = match_pattern(Op(op, [Var("x"), Const("k")]), m.graph.nodes[0])
    assert found is not None and found["x"].name == "x" and found["k"].name == "k"
    sub = make_model(
        [helper.make_node("Sub", ["k", "x"], ["y"])],
        [vi("x", [2])],
        [vi("y", [2])],
        {"k": np.ones(2, np.float32)},
    )
    assert match_pattern(Op("Sub", [Var("x"), Const("k")]), sub.graph.nodes[0]) is None


def test_optional_inputs() -> None:
    """``Opt`` matches a missing input (absent or the empty name) and binds nothing; a present
    input must match the inner pattern."""
    w, b = np.ones((2, 3, 1, 1), np.float32), np.zeros(2, np.float32)
    pat = Op("Conv", ["x", Const("w"), Opt(Const("b"))], name="conv")
    x = [vi("x", [1, 3, 4, 4])]
    y = [vi("y", [1, 2, 4, 4])]
    with_b = make_model([helper.make_node("Conv", ["x", "w", "b"], ["y"])], x, y, {"w": w, "b": b})
    no_b = make_model([helper.make_node("Conv", ["x", "w"], ["y"])], x, y, {"w": w})
    empty_b = make_model([helper.make_node("Conv", ["x", "w", ""], ["y"])], x, y, {"w": w})
    var_b = make_model(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"])], x + [vi("b", [2])], y, {"w": w}
    )
    found = match_pattern(pat, with_b.graph.nodes[0])
    assert found is not None and "b" in found.tensors
    for m in (no_b, empty_b):
        found = match_pattern(pat, m.graph.nodes[0])
        assert found is not None and "b" not in found.tensors
    assert match_pattern(pat, var_b.graph.nodes[0]) is None  # present, but not a constant
    # a required input stays required
    assert match_pattern(Op("Conv", ["x", Const("w"), Const("b")]), no_b.graph.nodes[0]) is None


class ScaleRule(Rule):
    """``op(x, c) -> Identity(x)`` when ``c`` is the op's neutral element (one class, one rule
    instance per op, each with its own pattern and name)."""

    modifies = ()

    def __init__(self, op: str, neutral: float) -> None:
        super().__init__(Op(op, ["x", Const("c")]), name=f"drop-neutral-{op.lower()}")
        self.neutral = neutral

    def check(self, m: Match) -> bool | Refusal:
        if not np.all(m.value("c") == self.neutral):
            return Refusal(f"constant is not {self.neutral}")
        return True

    def rewrite(self, m: Match, outputs: list[gs.Variable]) -> list[gs.Node]:
        return [make_node("Identity", [m["x"]], outputs)]


class NeutralPass(RewritePass):
    name = "test-neutral"
    rules = (ScaleRule("Mul", 1.0), ScaleRule("Add", 0.0))


def test_pattern_per_rule_instance_and_refusal_reason(caplog: pytest.LogCaptureFixture) -> None:
    nodes = [
        helper.make_node("Mul", ["x", "one"], ["a"]),
        helper.make_node("Add", ["a", "two"], ["y"]),
    ]
    m = make_model(
        nodes,
        [vi("x", [2])],
        [vi("y", [2])],
        {"one": np.ones(2, np.float32), "two": np.full(2, 2.0, np.float32)},
    )
    assert [r.pattern.op for r in NeutralPass.rules] == ["Mul", "Add"]
    with caplog.at_level(logging.DEBUG, logger="graphopt.core.pattern"):
        res, _ = check_pass(m, NeutralPass())
    assert res.stats == {"drop-neutral-mul": 1}
    assert op_counts(res.model) == {"Identity": 1, "Add": 1}
    assert "drop-neutral-add: check refused at" in caplog.text
    assert "constant is not 0.0" in caplog.text
    assert not Refusal("x") and repr(Refusal("x")) == "Refusal('x')"


def test_new_nodes_take_the_root_place() -> None:
    """The rewrite's nodes replace the match where its root was: the other nodes keep their
    order (no re-sort of the whole graph)."""
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="r"),
        helper.make_node("Mul", ["r", "one"], ["a"], name="mul"),
        helper.make_node("Neg", ["x"], ["n"], name="n"),
        helper.make_node("Add", ["a", "n"], ["y"], name="add"),
    ]
    m = make_model(nodes, [vi("x", [2])], [vi("y", [2])], {"one": np.ones(2, np.float32)})
    res, _ = check_pass(m, NeutralPass())
    assert [n.op for n in res.model.graph.nodes] == ["Relu", "Identity", "Neg", "Add"]
