"""Tests for passes/cse.py (eliminate-cse)."""

from __future__ import annotations

import numpy as np
from helpers_graphs import make_model, vi
from onnx import TensorProto, helper

from graphopt.core.model import Model
from graphopt.core.shapes import prepare
from graphopt.passes import get_pass
from graphopt.testing import check_pass, op_counts


def _ops(expected: dict[str, int]):
    def structure(r: Model) -> None:
        got = op_counts(r)
        assert got == expected, got

    return structure


def test_duplicate_nodes_merged_in_one_sweep() -> None:
    # two identical chains Relu -> Mul(c) -> Sigmoid collapse into one; Add(a, b) == Add(b, a)
    m = make_model(
        [
            helper.make_node("Relu", ["x"], ["r1"]),
            helper.make_node("Relu", ["x"], ["r2"]),
            helper.make_node("Mul", ["r1", "c"], ["m1"]),
            helper.make_node("Mul", ["c", "r2"], ["m2"]),
            helper.make_node("Sigmoid", ["m1"], ["s1"]),
            helper.make_node("Sigmoid", ["m2"], ["s2"]),
            helper.make_node("Add", ["s1", "s2"], ["y"]),
        ],
        [vi("x", [2, 3])],
        [vi("y", [2, 3])],
        {"c": np.full(3, 0.5, np.float32)},
    )
    res, _ = check_pass(
        prepare(m), "eliminate-cse", structure=_ops({"Relu": 1, "Mul": 1, "Sigmoid": 1, "Add": 1})
    )
    assert res.stats["nodes_merged"] == 3
    add = res.model.graph.nodes[-1]
    assert add.inputs[0] is add.inputs[1]


def test_identical_constants_deduplicated_then_nodes_merge() -> None:
    m = make_model(
        [
            helper.make_node("Add", ["x", "c1"], ["a"]),
            helper.make_node("Add", ["x", "c2"], ["b"]),
            helper.make_node("Mul", ["a", "b"], ["y"]),
        ],
        [vi("x", [3])],
        [vi("y", [3])],
        {"c1": np.arange(3, dtype=np.float32), "c2": np.arange(3, dtype=np.float32)},
    )
    res, _ = check_pass(prepare(m), "eliminate-cse", structure=_ops({"Add": 1, "Mul": 1}))
    assert res.stats == {"nodes_merged": 1, "constants_merged": 1}


def test_duplicate_whose_output_is_graph_output_keeps_the_name() -> None:
    m = make_model(
        [
            helper.make_node("Relu", ["x"], ["r1"]),
            helper.make_node("Neg", ["r1"], ["n"]),
            helper.make_node("Relu", ["x"], ["y"]),
        ],
        [vi("x", [3])],
        [vi("n", [3]), vi("y", [3])],
    )

    def structure(r: Model) -> None:
        assert op_counts(r) == {"Relu": 1, "Neg": 1}
        assert [t.name for t in r.graph.outputs] == ["n", "y"]
        relu = next(n for n in r.graph.nodes if n.op == "Relu")
        assert relu.outputs[0].name == "y"

    check_pass(prepare(m), "eliminate-cse", structure=structure)


# ---------------------------------------------------------------------------------------- negative


def test_different_attributes_stay() -> None:
    m = make_model(
        [
            helper.make_node("LeakyRelu", ["x"], ["a"], alpha=0.1),
            helper.make_node("LeakyRelu", ["x"], ["b"], alpha=0.2),
            helper.make_node("Transpose", ["a"], ["ta"], perm=[1, 0]),
            helper.make_node("Transpose", ["b"], ["tb"], perm=[1, 0]),
            helper.make_node("Add", ["ta", "tb"], ["y"]),
        ],
        [vi("x", [2, 3])],
        [vi("y", [3, 2])],
    )
    check_pass(prepare(m), "eliminate-cse", expect_modified=False)


def test_different_constants_and_scalar_vs_vector_stay() -> None:
    m = make_model(
        [
            helper.make_node("Add", ["x", "c1"], ["a"]),
            helper.make_node("Add", ["x", "c2"], ["b"]),
            helper.make_node("Add", ["x", "c3"], ["c"]),
            helper.make_node("Sum", ["a", "b", "c"], ["y"]),
        ],
        [vi("x", [1])],
        [vi("y", [1])],
        {
            "c1": np.array(1.0, np.float32),
            "c2": np.array([1.0], np.float32),
            "c3": np.array([2.0], np.float32),
        },
    )
    check_pass(prepare(m), "eliminate-cse", expect_modified=False)


def test_sum_of_three_in_another_order_stays() -> None:
    # (a + b) + c and (c + b) + a may differ in the last bit: not the same value
    m = make_model(
        [
            helper.make_node("Relu", ["x"], ["a"]),
            helper.make_node("Neg", ["x"], ["b"]),
            helper.make_node("Sum", ["a", "b", "x"], ["s1"]),
            helper.make_node("Sum", ["x", "b", "a"], ["s2"]),
            helper.make_node("Sub", ["s1", "s2"], ["y"]),
        ],
        [vi("x", [4])],
        [vi("y", [4])],
    )
    check_pass(prepare(m), "eliminate-cse", expect_modified=False)


def test_two_graph_outputs_are_not_merged() -> None:
    m = make_model(
        [helper.make_node("Relu", ["x"], ["y1"]), helper.make_node("Relu", ["x"], ["y2"])],
        [vi("x", [3])],
        [vi("y1", [3]), vi("y2", [3])],
    )
    check_pass(prepare(m), "eliminate-cse", expect_modified=False)


def test_random_nodes_are_not_merged() -> None:
    m = make_model(
        [
            helper.make_node("RandomNormalLike", ["x"], ["a"]),
            helper.make_node("RandomNormalLike", ["x"], ["b"]),
            helper.make_node("Sub", ["a", "b"], ["y"]),
        ],
        [vi("x", [3])],
        [vi("y", [3])],
    )
    res = get_pass("eliminate-cse")(prepare(m))
    assert not res.modified
    assert op_counts(res.model)["RandomNormalLike"] == 2


def test_nodes_with_subgraphs_are_not_merged() -> None:
    branch = helper.make_graph([helper.make_node("Relu", ["x"], ["o"])], "b", [], [vi("o", [3])])
    branch2 = helper.make_graph([helper.make_node("Neg", ["x"], ["o2"])], "b2", [], [vi("o2", [3])])
    m = make_model(
        [
            helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
            helper.make_node("Greater", ["s", "z"], ["c"]),
            helper.make_node("If", ["c"], ["a"], then_branch=branch, else_branch=branch2),
            helper.make_node("If", ["c"], ["b"], then_branch=branch, else_branch=branch2),
            helper.make_node("Add", ["a", "b"], ["y"]),
        ],
        [vi("x", [3])],
        [vi("y", [3])],
        {"z": np.array(0.0, np.float32)},
    )
    res = get_pass("eliminate-cse")(prepare(m))
    assert op_counts(res.model)["If"] == 2
    assert res.stats["nodes_merged"] == 0


def test_int_constant_types_differ_stay() -> None:
    m = make_model(
        [
            helper.make_node("Reshape", ["x", "s1"], ["a"]),
            helper.make_node("Cast", ["s2"], ["s2f"], to=TensorProto.INT64),
            helper.make_node("Reshape", ["x", "s2f"], ["b"]),
            helper.make_node("Add", ["a", "b"], ["y"]),
        ],
        [vi("x", [2, 3])],
        [vi("y", [3, 2])],
        {"s1": np.array([3, 2], np.int64), "s2": np.array([3, 2], np.int32)},
    )
    check_pass(prepare(m), "eliminate-cse", expect_modified=False)
