"""toposort: stable (a valid order is never touched), minimal moves otherwise, subgraph captures
are dependencies, and a memory-aware order survives it."""

from __future__ import annotations

import onnx_graphsurgeon as gs
from helpers_graphs import vi
from onnx import TensorProto, helper
from test_reorder_memory import two_branches

from graphopt.core.graph import insert_nodes, local_topo_order
from graphopt.core.loader import load
from graphopt.core.model import Model
from graphopt.fixtures import fixture_path
from graphopt.jobs.plan import plan_memory
from graphopt.passes import get_pass
from graphopt.testing import check_pass


def _model(nodes: list, inputs: list, outputs: list, inits: list | None = None) -> Model:
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits or [])
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return Model.from_onnx(proto)


def test_sorts_reversed_graph() -> None:
    nodes = [helper.make_node("Sigmoid", ["a"], ["y"]), helper.make_node("Relu", ["x"], ["a"])]
    m = _model(nodes, [vi("x", [3])], [vi("y", [3])])
    res, _ = check_pass(m, "toposort")
    assert [n.op for n in res.model.graph.nodes] == ["Relu", "Sigmoid"]


def test_sorted_fixtures_are_untouched() -> None:
    """An already sorted model keeps its order exactly and reports modified=False (the graphsurgeon
    sort reordered transformer_block and claimed a change)."""
    for name in ("transformer_block.onnx", "if_model.onnx", "mobilenet_block.onnx"):
        m = load(fixture_path(name))
        before = [id(n) for g in m.walk_graphs() for n in g.nodes]
        res = get_pass("toposort")(m)
        assert not res.modified, name
        assert [id(n) for g in res.model.walk_graphs() for n in g.nodes] == before, name
        check_pass(load(fixture_path(name)), "toposort", expect_modified=False)


def test_only_the_misplaced_node_moves() -> None:
    """a b c d e with d moved to the front (it reads c): d goes back right after c; the others keep
    their relative order."""
    names = ["a", "b", "c", "d", "e"]
    nodes = {
        n: helper.make_node("Relu", [f"{p}_out" if p else "x"], [f"{n}_out"], name=n)
        for n, p in zip(names, [None, "a", "b", "c", "d"])
    }
    order = ["d", "a", "b", "c", "e"]
    m = _model([nodes[n] for n in order], [vi("x", [3])], [vi("e_out", [3])])
    res, _ = check_pass(m, "toposort")
    assert [n.name for n in res.model.graph.nodes] == names


def test_subgraph_captures_are_dependencies() -> None:
    """The If reads 'c' only inside its branches (no explicit input): the producer of 'c' must come
    before it, which the explicit edges alone do not say."""
    then_g = helper.make_graph([helper.make_node("Neg", ["c"], ["t"])], "then", [], [vi("t", [3])])
    else_g = helper.make_graph([helper.make_node("Abs", ["c"], ["e"])], "else", [], [vi("e", [3])])
    if_node = helper.make_node(
        "If", ["cond"], ["y"], name="if", then_branch=then_g, else_branch=else_g
    )
    relu = helper.make_node("Relu", ["x"], ["c"], name="relu")
    cond = helper.make_tensor_value_info("cond", TensorProto.BOOL, [])
    m = _model([if_node, relu], [vi("x", [3]), cond], [vi("y", [3])])
    order = local_topo_order(m.graph)
    assert [n.name for n in order] == ["relu", "if"]
    res, _ = check_pass(_model([if_node, relu], [vi("x", [3]), cond], [vi("y", [3])]), "toposort")
    assert [n.name for n in res.model.graph.nodes] == ["relu", "if"]


def test_toposort_keeps_the_memory_aware_order() -> None:
    """reorder-memory runs each branch to its end; toposort afterwards must keep that order (the
    graphsurgeon sort undid it: arena 16,512 -> 32,832 bytes; 16,576 since graph inputs are held
    for the whole run, issue 18)."""
    m = two_branches(bad=True)
    res = get_pass("reorder-memory")(m)
    assert res.modified
    order = [n.name for n in res.model.graph.nodes]
    arena = plan_memory(res.model, reorder=False).arena_bytes
    res2 = get_pass("toposort")(res.model)
    assert not res2.modified
    assert [n.name for n in res2.model.graph.nodes] == order
    assert plan_memory(res2.model, reorder=False).arena_bytes == arena == 16_576


def test_insert_nodes_goes_right_before_the_first_reader() -> None:
    x = gs.Variable("x", dtype="float32", shape=[3])
    a, b, c, q = (gs.Variable(n, dtype="float32", shape=[3]) for n in "abcq")
    n1 = gs.Node("Relu", "n1", inputs=[x], outputs=[a])
    n2 = gs.Node("Neg", "n2", inputs=[x], outputs=[b])
    n3 = gs.Node("Abs", "n3", inputs=[a], outputs=[c])
    g = gs.Graph(nodes=[n1, n2, n3], inputs=[x], outputs=[b, c])
    new = gs.Node("Identity", "new", inputs=[a], outputs=[q])
    n3.inputs[0] = q
    insert_nodes(g, [new])
    assert [n.name for n in g.nodes] == ["n1", "n2", "new", "n3"]  # n1 n2 n3 keep their order
