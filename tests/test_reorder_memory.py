"""Memory-aware node order: never worse, strictly better where the given order is bad, exact on
small graphs (checked against every topological order)."""

from __future__ import annotations

import itertools
import random
from typing import Any

import networkx as nx
import numpy as np
import pytest
from onnx import TensorProto, helper
from test_memory import capture, chain, residual

from graphopt.algorithms.memory.arena import prove
from graphopt.algorithms.memory.order import (
    _after_step,
    _build,
    _greedy,
    _Problem,
    _profile,
    _step_alloc,
    exact_order,
    improve,
    simulate,
)
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


# ------------------------------------------------------------------ wide graphs (issue 14)


def weights_made_first(width: int) -> Model:
    """The light conformance suite's layout (DenseNet-121, Inception, ...): every weight is made
    by a ConstantOfShape node and all of them come first, so in the given order every weight is
    live from the start. ``width`` branches ``x[1,16] -> MatMul(w_i [16,64]) -> Relu ->
    MatMul(v_i [64,16])``, summed."""
    nodes_w, nodes_b, inits = [], [], []
    for name, dims in (("s_w", [16, 64]), ("s_v", [64, 16])):
        inits.append(helper.make_tensor(name, TensorProto.INT64, [2], dims))
    outs = []
    for i in range(width):
        for kind, shape in (("w", "s_w"), ("v", "s_v")):
            value = helper.make_tensor("value", F, [1], [0.01 * (i % 7 + 1)])
            nodes_w.append(
                helper.make_node(
                    "ConstantOfShape", [shape], [f"{kind}{i}"], name=f"c{kind}{i}", value=value
                )
            )
        nodes_b += [
            helper.make_node("MatMul", ["x", f"w{i}"], [f"h{i}"], name=f"mm{i}"),
            helper.make_node("Relu", [f"h{i}"], [f"r{i}"], name=f"relu{i}"),
            helper.make_node("MatMul", [f"r{i}", f"v{i}"], [f"o{i}"], name=f"out{i}"),
        ]
        outs.append(f"o{i}")
    nodes_b.append(helper.make_node("Sum", outs, ["y"], name="sum"))
    g = helper.make_graph(
        nodes_w + nodes_b,
        "wide",
        [helper.make_tensor_value_info("x", F, [1, 16])],
        [helper.make_tensor_value_info("y", F, [1, 16])],
        initializer=inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    return prepare(Model.from_onnx(m))


def test_reorder_moves_weights_made_at_the_top_next_to_their_readers():
    # DenseNet-121 of the light suite: 836 ConstantOfShape weights first; the list scheduling
    # ran out of its evaluation budget there and kept the given order (40.1 MB arena, 8.5 MB
    # found once the scheduling is incremental)
    model = weights_made_first(150)

    def structure(m: Model) -> None:
        names = [n.name for n in m.graph.nodes]
        assert names.index("cw149") > names.index("mm0")  # not all weights first any more

    res, _ = check_pass(model, "reorder-memory", structure=structure)
    assert res.stats["arena_after"] * 4 < res.stats["arena_before"]


def test_reorder_leaves_a_wide_graph_in_a_good_order_alone():
    # the same graph with each weight made right before its reader: nothing to gain
    model = weights_made_first(150)
    by_name = {n.name: n for n in model.graph.nodes}
    good = []
    for i in range(150):
        good += [by_name[f"cw{i}"], by_name[f"mm{i}"], by_name[f"relu{i}"], by_name[f"cv{i}"]]
        good.append(by_name[f"out{i}"])
    model.graph.nodes = [*good, by_name["sum"]]
    check_pass(model, "reorder-memory", expect_modified=False)


def _problem(reads: list[list[int]], makes: list[list[int]], size: list[int], **kw: Any) -> Any:
    """A search problem from the buffers each node reads and creates (``_build`` without ONNX).
    ``outputs``: graph output buffers; ``inputs``: buffers live from the start; ``inplace``:
    per node, the read buffers it may overwrite."""
    n, nb = len(reads), len(size)
    producer = {b: v for v, bs in enumerate(makes) for b in bs}
    preds = [0] * n
    pred_list: list[list[int]] = [[] for _ in range(n)]
    succs: list[list[int]] = [[] for _ in range(n)]
    readers: list[list[int]] = [[] for _ in range(nb)]
    cons, ncons = [0] * nb, [0] * nb
    for v in range(n):
        for b in reads[v]:
            p = producer.get(b)
            if p is not None and p not in pred_list[v]:
                pred_list[v].append(p)
                preds[v] |= 1 << p
                succs[p].append(v)
            readers[b].append(v)
            cons[b] |= 1 << v
            ncons[b] += 1
    is_out = [b in kw.get("outputs", ()) for b in range(nb)]
    return _Problem(
        n,
        preds,
        succs,
        makes,
        reads,
        kw.get("inplace") or [[] for _ in range(n)],
        size,
        is_out,
        cons,
        ncons,
        sum(size[b] for b in kw.get("inputs", ())),
        list(range(n)),
        [len(p) for p in pred_list],
        readers,
        pred_list,
    )


def _random_problem(rng: random.Random, n: int) -> Any:
    """Node v creates buffer v and reads up to 3 earlier nodes' buffers and the graph inputs'
    (buffers n, n+1, n+2); two buffers are graph outputs."""
    size = [rng.choice([64, 128, 256, 1024, 4096]) for _ in range(n + 3)]
    reads = []
    for v in range(n):
        ps = rng.sample(range(v), min(rng.choice([0, 1, 1, 2, 3]), v))
        reads.append(ps + [n + j for j in range(3) if rng.random() < 0.1])
    inplace = [[b for b in reads[v] if size[b] == size[v] and rng.random() < 0.5] for v in range(n)]
    return _problem(
        reads,
        [[v] for v in range(n)],
        size,
        outputs=rng.sample(range(n + 3), 2),
        inputs=range(n, n + 3),
        inplace=inplace,
    )


def _reference_greedy(pb: Any, mode: str) -> list[int]:
    """The list scheduling ``_greedy`` computes incrementally, as a scan of every ready node at
    every step (quadratic on wide graphs: what reorder-memory did before)."""
    npred, remaining = list(pb.npreds), list(pb.ncons)
    ready = [v for v in range(pb.n) if npred[v] == 0]
    order: list[int] = []
    last = -1

    def freed(s: int, minus: list[int]) -> int:
        return sum(
            pb.size[b]
            for b in pb.in_bufs[s]
            if remaining[b] - (b in minus) == 1 and not pb.is_out[b]
        )

    def key(v: int) -> tuple[int, ...]:
        alloc, reused = _step_alloc(pb, v, remaining)
        dead = sum(pb.size[b] for b in pb.out_bufs[v] if pb.ncons[b] == 0 and not pb.is_out[b])
        net = alloc - freed(v, []) - dead
        look = 0
        if mode in ("lookahead", "lookahead-dfs"):
            look = min([0] + [-freed(s, pb.in_bufs[v]) for s in pb.succs[v] if npred[s] == 1])
        tie = -pb.pos[v] if mode == "reverse" else pb.pos[v]
        if mode.endswith("dfs"):
            return (0 if last >= 0 and v in pb.succs[last] else 1, net + look, tie)
        if mode == "peak":  # the step's peak less the live bytes every candidate shares
            return (alloc - reused, net, tie)
        return (net + look, tie)

    while ready:
        v = min(ready, key=key)
        ready.remove(v)
        order.append(v)
        last = v
        _after_step(pb, v, remaining, 0)
        for s in pb.succs[v]:
            npred[s] -= 1
            if npred[s] == 0:
                ready.append(s)
    return order


def _reference_improve(pb: Any, order: list[int], window: int) -> list[int]:
    """``improve`` simulating every candidate order in full."""
    order = list(order)
    best = simulate(pb, order)
    improved = True
    while improved:
        improved = False
        p = int(np.argmax(_profile(pb, order)))
        where = {v: k for k, v in enumerate(order)}
        for k in range(max(0, p - window), min(pb.n, p + window + 1)):
            v = order[k]
            lo = max((where[u] for u in pb.pred_list[v]), default=-1) + 1
            hi = min((where[s] for s in pb.succs[v]), default=pb.n)
            for j in range(max(lo, k - 3 * window), min(hi, k + 3 * window + 1)):
                if j in (k, k + 1):
                    continue
                cand = order[:k] + order[k + 1 :]
                cand.insert(j if j < k else j - 1, v)
                if simulate(pb, cand) < best:
                    best, order, improved = simulate(pb, cand), cand, True
                    break
            if improved:
                break
    return order


MODES = ("net", "peak", "lookahead", "dfs", "lookahead-dfs", "reverse")


def test_incremental_list_scheduling_picks_what_a_full_scan_picks():
    rng = random.Random(0)
    for _ in range(150):
        pb = _random_problem(rng, rng.randint(2, 60))
        for mode in MODES:
            assert _greedy(pb, mode) == _reference_greedy(pb, mode), mode


def test_windowed_hill_climbing_moves_what_a_full_simulation_moves():
    rng = random.Random(1)
    moved = 0
    for _ in range(60):
        pb = _random_problem(rng, rng.randint(2, 90))
        start = _greedy(pb, rng.choice(MODES))
        window = rng.choice([2, 3, 12])
        got = improve(pb, start, window=window, max_work=10**12)
        assert got == _reference_improve(pb, start, window)
        moved += got != start
    assert moved > 10  # the hill climbing did move nodes on many of them


def _wide_problem(width: int) -> Any:
    """``weights_made_first`` as a search problem: node 2i makes weight i (4 KiB, buffer
    width + 1 + i), node 2i+1 reads x and it and makes branch i (256 B, buffer i), the last node
    reads every branch and makes the output (buffer width)."""
    x = 2 * width + 1
    reads = [r for i in range(width) for r in ([], [x, width + 1 + i])]
    makes = [m for i in range(width) for m in ([width + 1 + i], [i])]
    size = [256] * (width + 1) + [4096] * width + [64]
    return _problem(
        [*reads, list(range(width))],
        [*makes, [width]],
        size,
        outputs=[width],
        inputs=[x],
    )


def test_list_scheduling_work_grows_linearly_with_a_wide_graph():
    # every weight is ready from the start: a scan of the ready nodes per step cost width^2
    # (DenseNet-121: 840 ready at once, 470,000 evaluations per start before the budget cut it)
    spent = {}
    for width in (500, 1000, 2000):
        pb = _wide_problem(width)
        for mode in MODES:
            work = [0]
            order = _greedy(pb, mode, work)
            assert sorted(order) == list(range(pb.n))
            spent[width, mode] = work[0]
            edges = sum(len(s) for s in pb.succs)
            assert work[0] <= 20 * (pb.n + edges), (width, mode, work[0])
    for mode in MODES:
        assert spent[2000, mode] <= 2.2 * spent[1000, mode] <= 2.2**2 * spent[500, mode], mode
    # the order found frees each weight right after its reader: about one weight live at once
    pb = _wide_problem(1000)
    assert simulate(pb, _greedy(pb, "lookahead")) < 3 * 4096 + 1000 * 256 + 64


def test_exact_search_gives_up_at_once_on_a_wide_graph():
    pb = _wide_problem(1000)
    status: dict[str, str] = {}
    assert exact_order(pb, upper=10**18, status=status) is None
    assert status["result"] == "too-many-states"
