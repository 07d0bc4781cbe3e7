"""toposort: unsorted graphs are sorted, sorted ones untouched (stable)."""

from __future__ import annotations

import onnx
from helpers_graphs import vi
from onnx import helper

from graphopt.core.loader import load
from graphopt.core.model import Model
from graphopt.fixtures import fixture_path
from graphopt.testing import check_pass


def test_sorts_reversed_graph() -> None:
    nodes = [helper.make_node("Sigmoid", ["a"], ["y"]), helper.make_node("Relu", ["x"], ["a"])]
    g = helper.make_graph(nodes, "g", [vi("x", [3])], [vi("y", [3])])
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    m = Model.from_onnx(proto)
    res, _ = check_pass(m, "toposort")
    assert [n.op for n in res.model.graph.nodes] == ["Relu", "Sigmoid"]


def test_sorted_fixture_unchanged() -> None:
    check_pass(load(fixture_path("if_model.onnx")), "toposort", expect_modified=False)
    assert onnx  # keep import for readers
