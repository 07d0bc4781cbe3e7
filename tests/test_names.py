"""Names of the nodes and tensors passes create (``base__goN``): deterministic per model (the same
model through the same passes gets the same names, however many runs came before in the process)
and unique against every name the model already holds, subgraphs included."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
from helpers_graphs import make_model, vi
from onnx import helper

from graphopt.core.graph import const, graph_names, make_node, name_scope, unique_name
from graphopt.core.loader import load
from graphopt.core.model import Model
from graphopt.fixtures import fixture_path
from graphopt.jobs.fp16 import fp16_model
from graphopt.jobs.optimize import optimize_model


def _names(model: Model) -> list[str]:
    return [n.name for g in model.walk_graphs() for n in g.nodes] + sorted(graph_names(model.graph))


def test_optimize_twice_gives_the_same_names() -> None:
    for fixture in ("mobilenet_block.onnx", "if_model.onnx", "transformer_block.onnx"):
        first = optimize_model(load(fixture_path(fixture)), verify_output=False).model
        second = optimize_model(load(fixture_path(fixture)), verify_output=False).model
        assert _names(first) == _names(second), fixture


def test_fp16_twice_gives_the_same_names() -> None:
    a = fp16_model(load(fixture_path("mobilenet_block.onnx")), verify_output=False).model
    b = fp16_model(load(fixture_path("mobilenet_block.onnx")), verify_output=False).model
    assert _names(a) == _names(b)


def test_names_skip_what_the_model_holds() -> None:
    m = make_model(
        [
            helper.make_node("Relu", ["x"], ["relu__go0"], name="relu__go1"),
            helper.make_node("Relu", ["relu__go0"], ["y"], name="relu__go2_out"),
        ],
        [vi("x", [2])],
        [vi("y", [2])],
    )
    taken = graph_names(m.graph)
    with name_scope(m.graph):
        fresh = [unique_name("relu") for _ in range(3)]
        node = make_node("Relu", [m.graph.inputs[0]])
        c = const("relu", np.ones(2, np.float32))
    # relu__go0 and relu__go1 are taken; relu__go2 would give relu__go2_out (taken) to make_node
    assert fresh == ["relu__go3", "relu__go4", "relu__go5"]
    assert node.name == "relu__go6" and node.outputs[0].name == "relu__go6_out"
    assert c.name == "relu__go7"
    assert not taken & {*fresh, node.name, c.name}


def test_names_in_subgraphs_are_taken_too() -> None:
    then = gs.Graph(
        nodes=[
            gs.Node("Identity", "n__go0", inputs=[gs.Variable("x")], outputs=[gs.Variable("t")])
        ],
        outputs=[gs.Variable("t")],
    )
    graph = gs.Graph(nodes=[gs.Node("If", "if", attrs={"then_branch": then, "else_branch": then})])
    assert {"n__go0", "t", "x", "if"} <= graph_names(graph)
    with name_scope(graph):
        assert unique_name("n") == "n__go1"


def test_nested_scopes_share_one_counter() -> None:
    a = gs.Graph(nodes=[gs.Node("Relu", "a__go0")])
    b = gs.Graph(nodes=[gs.Node("Relu", "a__go1")])
    with name_scope(a):
        first = unique_name("a")
        with name_scope(b):  # a graph the run builds (a clone): its names count as well
            second = unique_name("a")
        third = unique_name("a")
    assert [first, second, third] == ["a__go1", "a__go2", "a__go3"]


def test_outside_a_scope_names_are_still_unique() -> None:
    assert len({unique_name("x") for _ in range(100)}) == 100
