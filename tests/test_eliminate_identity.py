"""eliminate-identity: Identity and inference Dropout removed; graph-output names kept."""

from __future__ import annotations

import numpy as np
from helpers_graphs import make_model, vi
from onnx import helper

from graphopt.testing import check_pass, op_counts


def test_removes_identity_and_dropout() -> None:
    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node("Identity", ["a"], ["b"]),
        helper.make_node("Dropout", ["b"], ["c"]),
        helper.make_node("Sigmoid", ["c"], ["y"]),
    ]
    m = make_model(nodes, [vi("x", [4])], [vi("y", [4])])
    res, _ = check_pass(m, "eliminate-identity")
    assert op_counts(res.model) == {"Relu": 1, "Sigmoid": 1}
    assert res.stats["removed"] == 2


def test_identity_to_graph_output_keeps_name() -> None:
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Identity", ["a"], ["y"])]
    m = make_model(nodes, [vi("x", [4])], [vi("y", [4])])
    res, _ = check_pass(m, "eliminate-identity")
    assert [t.name for t in res.model.graph.outputs] == ["y"]
    assert op_counts(res.model) == {"Relu": 1}


def test_identity_of_graph_input_to_output_kept() -> None:
    # returning an input under another name needs the Identity
    nodes = [helper.make_node("Identity", ["x"], ["y"])]
    m = make_model(nodes, [vi("x", [4])], [vi("y", [4])])
    check_pass(m, "eliminate-identity", expect_modified=False)


def test_training_dropout_kept() -> None:
    nodes = [helper.make_node("Dropout", ["x", "r", "t"], ["y"])]
    m = make_model(
        nodes, [vi("x", [4])], [vi("y", [4])], {"r": np.array(0.5, np.float32), "t": np.array(True)}
    )
    check_pass(
        m,
        "eliminate-identity",
        expect_modified=False,
        checker=False,
        feeds={"x": np.zeros(4, np.float32)},
    )
