"""eliminate-dead: unreachable nodes go, live ones and graph inputs stay."""

from __future__ import annotations

import numpy as np
from helpers_graphs import make_model, vi
from onnx import helper

from graphopt.core.loader import load
from graphopt.fixtures import fixture_path
from graphopt.testing import check_pass, op_counts


def test_removes_dead_branch() -> None:
    nodes = [
        helper.make_node("Relu", ["x"], ["y"]),
        helper.make_node("Sigmoid", ["x"], ["dead1"]),
        helper.make_node("Mul", ["dead1", "w"], ["dead2"]),
    ]
    m = make_model(nodes, [vi("x", [4])], [vi("y", [4])], {"w": np.ones(4, np.float32)})
    res, _ = check_pass(m, "eliminate-dead", checker=False)
    assert op_counts(res.model) == {"Relu": 1}
    assert res.stats["nodes_removed"] == 2 and res.stats["constants_removed"] == 1
    assert [t.name for t in res.model.graph.inputs] == ["x"]


def test_keeps_live_graph_and_unused_input() -> None:
    nodes = [helper.make_node("Relu", ["x"], ["y"])]
    m = make_model(nodes, [vi("x", [4]), vi("unused", [4])], [vi("y", [4])])
    check_pass(
        m,
        "eliminate-dead",
        expect_modified=False,
        feeds={"x": np.ones(4, np.float32), "unused": np.ones(4, np.float32)},
    )


def test_fixture_unchanged() -> None:
    check_pass(load(fixture_path("residual.onnx")), "eliminate-dead", expect_modified=False)
