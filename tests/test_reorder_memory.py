"""Memory-aware node order: never worse, strictly better where the given order is bad, exact on
small graphs (checked against every topological order)."""

from __future__ import annotations

import itertools

import networkx as nx
import numpy as np
import pytest
from onnx import TensorProto, helper
from test_memory import capture, chain, residual

from graphopt.algorithms.memory.arena import prove
from graphopt.algorithms.memory.order import _build, _greedy, exact_order, simulate
from graphopt.core.loader import load
from graphopt.core.model import Model
from graphopt.core.saver import save
from graphopt.core.shapes import prepare
from graphopt.fixtures import FIXTURES, fixture_path
from graphopt.jobs.plan import plan_model as plan_memory
from graphopt.testing import check_pass

F = TensorProto.FLOAT


def two_branches(bad: bool = True, shared_weight: bool = False) -> Model:
    """x[1,16] -> two branches, each expands to [1,4096] then reduces to [1,16]; y = a + b.

    The bad order runs both expansions first, so both 16 KiB tensors are live at once; running
    each branch to its end first keeps one.
    """
    rng = np.random.default_rng(0)
    w = [
        helper.make_tensor(
            f"w{i}", F, [16, 4096], rng.standard_normal((16, 4096)).astype(np.float32).ravel()
        )
        for i in (1, 2)
    ]
    v = [
        helper.make_tensor(
            f"v{i}",
            F,
            [4096, 16],
            rng.standard_normal((4096, 16)).astype(np.float32).ravel() * 0.01,
        )
        for i in (1, 2)
    ]
    w2 = "w1" if shared_weight else "w2"
    a1 = helper.make_node("MatMul", ["x", "w1"], ["a1"], name="a1")
    b1 = helper.make_node("MatMul", ["x", w2], ["b1"], name="b1")
    a2 = helper.make_node("MatMul", ["a1", "v1"], ["a2"], name="a2")
    b2 = helper.make_node("MatMul", ["b1", "v2"], ["b2"], name="b2")
    add = helper.make_node("Add", ["a2", "b2"], ["y"], name="add")
    nodes = [a1, b1, a2, b2, add] if bad else [a1, a2, b1, b2, add]
    g = helper.make_graph(
        nodes,
        "branches",
        [helper.make_tensor_value_info("x", F, [1, 16])],
        [helper.make_tensor_value_info("y", F, [1, 16])],
        initializer=w + v,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    return prepare(Model.from_onnx(m))


def test_reorder_strictly_better_on_a_bad_order():
    model = two_branches(bad=True)
    before = plan_memory(model, reorder=False)

    def structure(m: Model) -> None:
        names = [n.name for n in m.graph.nodes]
        assert names.index("a2") < names.index("b1") or names.index("b2") < names.index("a1")
        after = plan_memory(m, reorder=False)
        assert after.arena_bytes < before.arena_bytes
        assert after.bound < before.bound

    res, _ = check_pass(model, "reorder-memory", structure=structure)
    assert res.stats["arena_after"] < res.stats["arena_before"]

    plan = plan_memory(model)  # the API reorders too and reports it
    assert plan.order_changed and plan.order_before_arena == before.arena_bytes
    assert plan.arena_bytes < before.arena_bytes
    assert prove(plan.model, plan).ok


def test_reorder_leaves_a_good_order_alone():
    res, _ = check_pass(two_branches(bad=False), "reorder-memory", expect_modified=False)
    assert res.stats["exact_searched"] == 1  # the DP proved no order beats the given one
    res, _ = check_pass(
        load(fixture_path("mobilenet_block.onnx")), "reorder-memory", expect_modified=False
    )
    assert res.stats["exact_searched"] == 1


def test_reorder_shared_weight_and_graph_output_intermediate_unchanged():
    # a shared weight changes nothing about the schedule's legality; the good order stays
    check_pass(two_branches(bad=False, shared_weight=True), "reorder-memory", expect_modified=False)
    # a chain has exactly one order
    check_pass(chain(), "reorder-memory", expect_modified=False)


@pytest.mark.parametrize("name", FIXTURES)
def test_reorder_never_worse_on_fixtures(name):
    shapes = {"x": (1, 1, 8, 8)} if name == "digits_cnn.onnx" else None
    model = prepare(load(fixture_path(name)), shapes)
    given = plan_memory(model, reorder=False, prepared=True)
    for inplace in (False, True):
        planned = plan_memory(model, inplace=inplace)
        ref = given if inplace else plan_memory(model, reorder=False, inplace=False)
        assert planned.arena_bytes <= ref.arena_bytes
        assert planned.order_changed == (planned.order_before_arena is not None)
        assert prove(planned.model, planned).ok


def _all_orders_min(pb, limit=5000):
    g = nx.DiGraph()
    g.add_nodes_from(range(pb.n))
    for v in range(pb.n):
        for u in range(pb.n):
            if pb.preds[v] >> u & 1:
                g.add_edge(u, v)
    return min(simulate(pb, list(o)) for o in itertools.islice(nx.all_topological_sorts(g), limit))


@pytest.mark.parametrize("build", [two_branches, residual, capture])
@pytest.mark.parametrize("inplace", [False, True])
def test_exact_search_is_optimal_on_small_graphs(build, inplace):
    model = build()
    sched = [n for n in model.graph.nodes if n.op != "Constant"]
    pb = _build(model, sched, inplace, 64, None)
    best = _all_orders_min(pb)
    order = exact_order(pb, upper=10**18)
    assert order is not None and sorted(order) == list(range(pb.n))
    assert simulate(pb, order) == best
    # the heuristics never produce an illegal order
    for mode in ("net", "peak", "lookahead", "dfs", "lookahead-dfs", "reverse"):
        o = _greedy(pb, mode)
        pos = {v: k for k, v in enumerate(o)}
        assert all(
            pos[u] < pos[v] for v in range(pb.n) for u in range(pb.n) if pb.preds[v] >> u & 1
        )


def test_reorder_keeps_if_subgraphs_working():
    res, _ = check_pass(
        load(fixture_path("if_model.onnx")), "reorder-memory", expect_modified=False
    )
    assert res.stats["order_changed"] == 0


def test_cli_writes_the_planned_order(tmp_path, capsys):
    import json

    import onnx

    from graphopt.cli import main
    from graphopt.core.verify import verify

    src = tmp_path / "bad.onnx"
    save(two_branches(bad=True), src)
    out = tmp_path / "planned.onnx"
    assert main(["plan", str(src), "-o", str(out), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["order_changed"] is True and d["arena_bytes"] < d["order_before_arena_bytes"]
    written = onnx.load(str(out))
    onnx.checker.check_model(written, full_check=True)
    names = [n.name for n in written.graph.node]
    assert names.index("a2") < names.index("b1") or names.index("b2") < names.index("a1")
    assert verify(str(src), str(out)).ok
    # the plan in the metadata is the plan of the written order
    meta = json.loads({p.key: p.value for p in written.metadata_props}["graphopt.memory_plan"])
    replan = plan_memory(load(out), reorder=False)
    assert meta["arena_bytes"] == replan.arena_bytes
    assert meta["offsets"] == {k: t.offset for k, t in replan.tensors.items()}
