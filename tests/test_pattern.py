"""The pattern engine: matching (DAG bindings, commutativity) and its escaping-value guarantees."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from helpers_graphs import make_model, vi
from onnx import helper

from graphopt.core.graph import make_node
from graphopt.core.model import Model
from graphopt.core.pattern import Const, Match, Op, RewritePass, Rule, Var, match_pattern, scalar
from graphopt.testing import check_pass, op_counts


class MulMulToMul(Rule):
    """Mul(Mul(x, a), b) -> Mul(x, a*b) for constants a, b (a toy rule that modifies weights)."""

    name = "mul-mul"
    pattern = Op("Mul", [Op("Mul", ["x", Const("a")], commutative=True), Const("b")],
                 commutative=True)
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
    res, _ = check_pass(_chain(), MulMulPass(),
                        structure=lambda m: op_counts(m) == {"Mul": 1} or pytest.fail(op_counts(m)))
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
    pat = Op("Mul", ["x", Op("Clip", [Op("Add", ["x", Const("three", scalar(3.0))],
                                        commutative=True), None, None])], commutative=True)
    nodes = [helper.make_node("Add", ["x", "three"], ["s"]),
             helper.make_node("Clip", ["s", "lo", "hi"], ["c"]),
             helper.make_node("Mul", ["c", "x"], ["y"]),
             helper.make_node("Mul", ["c", "w"], ["y2"])]
    inits = {"three": np.array(3.0, np.float32), "lo": np.array(0.0, np.float32),
             "hi": np.array(6.0, np.float32)}
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
    assert match_pattern(Op("Add", [Const("k"), Var("x")]), add) is None
    assert match_pattern(Op("Add", [Const("k"), Var("x")], commutative=True), add) is not None
