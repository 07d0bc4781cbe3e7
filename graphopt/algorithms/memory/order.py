"""Memory-aware node order: reorder the main graph's nodes for a lower activation peak.

The rewrite: a topological order ``pi`` of the main graph's nodes is replaced by another one
``pi'`` when the planned arena of ``pi'`` is strictly smaller (ties: its lower bound strictly
smaller); otherwise nothing changes. Numerics are untouched (same nodes, same edges).

Search model. Buffers are the tensors merged by aliasing (a Reshape's output is its input's buffer,
order-independent). Running node ``v`` after the set ``S`` of already run nodes costs

    peak(v | S) = mem(S) + out(v) - inplace(v, S)
    mem(S + v)  = mem(S) + out(v) - freed(v, S)

where ``out(v)`` is the bytes of the buffers ``v`` creates, ``freed`` the input buffers whose last
reader is ``v`` (graph outputs are never freed), and ``inplace`` the size of one such dying input
that ``v`` may overwrite (same shape and dtype, op in
``graphopt.algorithms.memory.planner.INPLACE_OPS``). ``mem(S)`` depends only on ``S``, so the
minimal peak over all orders is a shortest-path problem over the down-sets of the DAG.

- Exact: dynamic programming over down-sets (``best[S + v] = min(max(best[S], peak(v|S)))``),
  level by level, pruned by the best heuristic peak; used when the number of states stays under
  ``max_states`` (small graphs, or large graphs of small width).
- Heuristics otherwise: list scheduling that picks, among ready nodes, the one with the lowest
  (peak, allocated - freed) with a one-step lookahead through the successors it makes ready,
  from several starts (given order as tie-break, reversed tie-break, depth-first continuation),
  then hill climbing around the peak step of the best; the best by the model's peak is planned
  for real. Both are incremental, so they run to the end on wide graphs too: the ready nodes
  sit in a heap whose keys are recomputed only where a step changed a consumer or predecessor
  count they read (O((n + e) log n) per start), and a hill-climbing move is simulated only
  between its two positions, within a count of simulated steps (:data:`IMPROVE_WORK`, a count so
  that the result does not depend on the machine's load).

The given order is always a candidate, so the result is never worse. Constant nodes are not
scheduled: each is emitted right before its first reader. If/Loop nodes are scheduled as units
(their captures count as inputs); their bodies keep their order.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs
from networkx.utils import UnionFind

from graphopt.algorithms.memory.planner import (
    ALIAS_OPS,
    ALIGNMENT,
    INPLACE_OPS,
    MemoryPlan,
    align,
    plan_order,
)
from graphopt.core.graph import captured_names, node_subgraphs
from graphopt.core.liveness import liveness
from graphopt.core.model import Model

logger = logging.getLogger(__name__)


@dataclass
class _Problem:
    n: int
    preds: list[int]  # bitmask of predecessors
    succs: list[list[int]]
    out_bufs: list[list[int]]  # buffers each node creates
    in_bufs: list[list[int]]  # distinct buffers each node reads
    inplace_cands: list[list[int]]  # buffers each node may overwrite
    size: list[int]
    is_out: list[bool]
    cons: list[int]  # bitmask of readers per buffer
    ncons: list[int]
    mem0: int
    pos: list[int] = field(default_factory=list)  # original position (tie-break)
    npreds: list[int] = field(default_factory=list)  # number of distinct predecessors
    readers: list[list[int]] = field(default_factory=list)  # nodes reading each buffer
    pred_list: list[list[int]] = field(default_factory=list)  # distinct predecessors per node


#: the exact search (:func:`exact_order`) and the bitmasks it needs (``preds``, ``cons``: n bits
#: per node and per buffer, so n^2 bits in all) are only built up to this many nodes; past it
#: the DP could not finish within its state budget anyway (one state per level at least)
EXACT_MAX_NODES = 10_000


def _build(
    model: Model,
    sched: list[gs.Node],
    inplace: bool,
    alignment: int,
    observed: Mapping[str, Any] | None,
) -> _Problem:
    live = liveness(model, observed)
    idx = live.index
    n = len(sched)
    # buffers: union tensors through alias ops (order independent), numbered by first tensor
    sets = UnionFind(range(len(live.names)))
    if inplace:
        for nd in sched:
            if nd.op in ALIAS_OPS and nd.inputs and nd.outputs:
                x, y = idx.get(nd.inputs[0].name), idx.get(nd.outputs[0].name)
                if x is not None and y is not None and live.nbytes[x] == live.nbytes[y]:
                    sets.union(x, y)
    groups = sorted((sorted(members) for members in sets.to_sets()), key=lambda m: m[0])
    tb = [0] * len(live.names)
    for k, members in enumerate(groups):
        for i in members:
            tb[i] = k
    nb = len(groups)
    size = [0] * nb
    is_out = [False] * nb
    sizes = align(live.nbytes, alignment).tolist()
    for i in range(len(live.names)):
        size[tb[i]] = max(size[tb[i]], sizes[i])
        if live.kinds[i] == "output":
            is_out[tb[i]] = True
    producer: dict[str, int] = {}
    for v, nd in enumerate(sched):
        for t in nd.outputs:
            if t.name:
                producer[t.name] = v
    exact = n <= EXACT_MAX_NODES
    preds = [0] * n if exact else []
    npreds = [0] * n
    succs: list[list[int]] = [[] for _ in range(n)]
    in_bufs: list[list[int]] = [[] for _ in range(n)]
    out_bufs: list[list[int]] = [[] for _ in range(n)]
    cands: list[list[int]] = [[] for _ in range(n)]
    cons = [0] * nb if exact else []
    ncons = [0] * nb
    readers: list[list[int]] = [[] for _ in range(nb)]
    pred_list: list[list[int]] = [[] for _ in range(n)]
    created: set[int] = set()
    mem0 = 0
    for t in model.graph.inputs:  # graph inputs are live from the start
        bi = idx.get(t.name)
        if bi is not None and tb[bi] not in created:
            created.add(tb[bi])
            mem0 += size[tb[bi]]
    for v, nd in enumerate(sched):
        reads = [t.name for t in nd.inputs if t.name]
        if node_subgraphs(nd):
            reads += captured_names(nd)
        seen: set[int] = set()
        before: set[int] = set()
        for name in reads:
            p = producer.get(name)
            if p is not None and p != v and p not in before:
                before.add(p)
                npreds[v] += 1
                pred_list[v].append(p)
                if exact:
                    preds[v] |= 1 << p
                succs[p].append(v)
            bi = idx.get(name)
            if bi is not None and tb[bi] not in seen:
                seen.add(tb[bi])
                in_bufs[v].append(tb[bi])
                ncons[tb[bi]] += 1
                readers[tb[bi]].append(v)
                if exact:
                    cons[tb[bi]] |= 1 << v
        for t in nd.outputs:  # an alias output's buffer already exists (its input's)
            bi = idx.get(t.name)
            if bi is not None and tb[bi] not in created:
                created.add(tb[bi])
                out_bufs[v].append(tb[bi])
        if inplace and nd.op in INPLACE_OPS and nd.outputs and nd.outputs[0].name in idx:
            o = idx[nd.outputs[0].name]
            pos = INPLACE_OPS[nd.op]
            ks = range(len(nd.inputs)) if pos is None else pos
            for k in ks:
                if k < len(nd.inputs) and nd.inputs[k].name in idx:
                    x = idx[nd.inputs[k].name]
                    if live.shapes[x] == live.shapes[o] and live.dtypes[x] == live.dtypes[o]:
                        cands[v].append(tb[x])
    return _Problem(
        n,
        preds,
        succs,
        out_bufs,
        in_bufs,
        cands,
        size,
        is_out,
        cons,
        ncons,
        mem0,
        list(range(n)),
        npreds,
        readers,
        pred_list,
    )


def simulate(pb: _Problem, order: list[int]) -> int:
    """Peak of ``order`` under the search model."""
    return int(max(pb.mem0, int(_profile(pb, order).max()) if order else pb.mem0))


def _greedy(pb: _Problem, mode: str, work: list[int] | None = None) -> list[int]:
    """List scheduling: at each step run the ready node with the lowest key, ``mode`` picking
    the key (see below). ``work`` (optional, one element) is incremented by the node and edge
    visits spent, for complexity checks.

    Keys (``net`` = bytes the node allocates minus the bytes it frees; ``look`` = minus the
    bytes freed by the successor it alone still blocks that frees the most; ``pos`` = given
    position): ``net``: (net, pos); ``peak``: (allocated - in-place reuse, net, pos);
    ``lookahead``: (net + look, pos); ``reverse``: (net, -pos); ``dfs`` and ``lookahead-dfs``: a
    ready successor of the node just run first, then as ``net`` / ``lookahead``.

    Incremental: the ready nodes sit in a heap; a key depends only on the consumer counts of the
    buffers its node and its blocked successors read, and on those successors' unfinished
    predecessor counts, so a step recomputes only the keys those counts touch (lazy deletion):
    O((n + e) log n) in all for bounded fan-in and fan-out (a key with the lookahead costs its
    successors' inputs), instead of a scan of every ready node per step."""
    n = pb.n
    size, is_out, in_bufs, succs = pb.size, pb.is_out, pb.in_bufs, pb.succs
    readers, pred_list, pos = pb.readers, pb.pred_list, pb.pos
    npred = list(pb.npreds)
    remaining = list(pb.ncons)
    alloc = [sum(size[b] for b in pb.out_bufs[v]) for v in range(n)]
    dead_out = [
        sum(size[b] for b in pb.out_bufs[v] if pb.ncons[b] == 0 and not is_out[b]) for v in range(n)
    ]
    look_on = mode in ("lookahead", "lookahead-dfs")
    dfs = mode.endswith("dfs")
    done = [False] * n
    ready = [False] * n
    keys: list[tuple[int, ...]] = [()] * n
    heap: list[tuple[tuple[int, ...], int]] = []
    ops = 0

    def key(v: int) -> tuple[int, ...]:
        nonlocal ops
        ops += 1 + len(in_bufs[v])
        freed = dead_out[v]
        for b in in_bufs[v]:
            if remaining[b] == 1 and not is_out[b]:
                freed += size[b]
        net = alloc[v] - freed
        if mode == "peak":
            a, reused = _step_alloc(pb, v, remaining)
            return (a - reused, net, pos[v])
        if mode == "reverse":
            return (net, -pos[v])
        if look_on:
            # the successor this node makes ready that frees the most at once: a node that
            # enables an immediate big release is worth running even if it allocates
            best = 0
            mine = in_bufs[v]
            for s in succs[v]:
                ops += 1
                if npred[s] == 1:
                    ops += len(in_bufs[s])
                    fs = 0
                    for b in in_bufs[s]:
                        if remaining[b] - (1 if b in mine else 0) == 1 and not is_out[b]:
                            fs += size[b]
                    best = min(best, -fs)
            net += best
        return (net, pos[v])

    def push(v: int) -> None:
        k = key(v)
        if k != keys[v]:
            keys[v] = k
            heapq.heappush(heap, (k, v))

    def blocker(s: int) -> int:
        """The one unfinished predecessor of ``s`` (``npred[s] == 1``)."""
        nonlocal ops
        for p in pred_list[s]:
            ops += 1
            if not done[p]:
                return p
        return -1

    for v in range(n):
        if npred[v] == 0:
            ready[v] = True
            push(v)
    order: list[int] = []
    last = -1
    while len(order) < n:
        v = -1
        if dfs and last >= 0:
            for s in succs[last]:
                if ready[s] and (v < 0 or keys[s] < keys[v]):
                    v = s
        if v < 0:
            while True:
                k, v = heapq.heappop(heap)
                if ready[v] and keys[v] == k:
                    break
        ready[v] = False
        done[v] = True
        order.append(v)
        last = v
        dirty: set[int] = set()
        for b in in_bufs[v]:
            remaining[b] -= 1
            r = remaining[b]
            if r == 1 or (look_on and r == 2):
                for c in readers[b]:
                    ops += 1
                    if done[c]:
                        continue
                    if r == 1:
                        dirty.add(c)  # its freed bytes (and in-place credit) change
                    if look_on and npred[c] == 1:
                        dirty.add(blocker(c))  # the node whose lookahead sees c
        for s in succs[v]:
            ops += 1
            npred[s] -= 1
            if npred[s] == 0:
                ready[s] = True
                dirty.add(s)
            elif npred[s] == 1 and look_on:
                dirty.add(blocker(s))
        for u in dirty:
            if u >= 0 and ready[u]:
                push(u)
    if work is not None:
        work[0] += ops
    return order


#: steps the hill climbing of one search may simulate (:func:`improve`); a count, not a time, so
#: that the result does not depend on the machine's load
IMPROVE_WORK = 1_000_000


def improve(
    pb: _Problem,
    order: list[int],
    window: int = 12,
    max_work: int = IMPROVE_WORK,
    work: list[int] | None = None,
) -> list[int]:
    """Hill climbing: move single nodes near the peak step to another legal position while that
    lowers the model's peak (strictly), first improvement first.

    A move changes the profile only between its two positions (the down-set before and after
    them is the same), so a candidate is simulated from the state at ``peak - 4 * window`` to
    its farther position and compared with the unchanged prefix and suffix maxima: O(window)
    steps per candidate instead of O(n). Stops after ``max_work`` simulated steps; ``work``
    (optional, one element) is incremented by the steps spent."""
    order = list(order)
    n = pb.n
    spent = 0
    improved = True
    while improved and spent < max_work:
        improved = False
        prof = _profile(pb, order)
        spent += n
        best = max(pb.mem0, int(prof.max()))
        pre = np.maximum.accumulate(prof).tolist()  # max of steps 0..t
        suf = np.maximum.accumulate(prof[::-1])[::-1].tolist()  # max of steps t..n-1
        p = int(np.argmax(prof))
        base = max(0, p - 4 * window)
        remaining = list(pb.ncons)  # the state before step ``base``
        mem = pb.mem0
        for v in order[:base]:
            alloc = sum(pb.size[b] for b in pb.out_bufs[v])
            mem = _after_step(pb, v, remaining, mem + alloc)
        spent += base
        where = {v: k for k, v in enumerate(order)}
        for k in range(max(0, p - window), min(n, p + window + 1)):
            v = order[k]
            lo = max((where[u] for u in pb.pred_list[v]), default=-1) + 1
            hi = min((where[s] for s in pb.succs[v]), default=n)
            for j in range(max(lo, k - 3 * window), min(hi, k + 3 * window + 1)):
                if j == k or j == k + 1:
                    continue
                # the new order differs from ``order`` on [a, b] only
                a, b = (j, k) if j < k else (k, j - 1)
                seg = order[a:k] + order[k + 1 : b + 1]
                seg.insert(j - a if j < k else len(seg), v)
                rem = list(remaining)
                m = mem
                val = pre[base - 1] if base > 0 else 0
                for u in order[base:a] + seg:
                    alloc, reused = _step_alloc(pb, u, rem)
                    val = max(val, m + alloc - reused)
                    m = _after_step(pb, u, rem, m + alloc)
                spent += b + 1 - base
                if b + 1 < n:
                    val = max(val, suf[b + 1])
                val = max(val, pb.mem0)
                if val < best:
                    order = order[:a] + seg + order[b + 1 :]
                    best, improved = val, True
                    break
            if improved or spent >= max_work:
                break
    if work is not None:
        work[0] += spent
    return order


def _step_alloc(pb: _Problem, v: int, remaining: list[int]) -> tuple[int, int]:
    """(bytes step ``v`` allocates for its outputs, bytes of them an input read for the last time
    lends in place): the step's peak is the live bytes plus the first minus the second."""
    alloc = sum(pb.size[b] for b in pb.out_bufs[v])
    for b in pb.inplace_cands[v]:
        if remaining[b] == 1 and not pb.is_out[b]:
            return alloc, min(pb.size[b], alloc)
    return alloc, 0


def _after_step(pb: _Problem, v: int, remaining: list[int], mem: int) -> int:
    """Bytes live after step ``v`` (its outputs already counted in ``mem``): inputs read for the
    last time and outputs nobody reads are freed; ``remaining`` consumer counts are updated."""
    for b in pb.in_bufs[v]:
        remaining[b] -= 1
        if remaining[b] == 0 and not pb.is_out[b]:
            mem -= pb.size[b]
    for b in pb.out_bufs[v]:
        if pb.ncons[b] == 0 and not pb.is_out[b]:
            mem -= pb.size[b]
    return mem


def _profile(pb: _Problem, order: list[int]) -> np.ndarray:
    """Bytes live while each step of ``order`` runs (its outputs allocated, an in-place input
    reused), under the search model."""
    remaining = list(pb.ncons)
    mem = pb.mem0
    out = np.zeros(len(order), dtype=np.int64)
    for k, v in enumerate(order):
        alloc, reused = _step_alloc(pb, v, remaining)
        out[k] = mem + alloc - reused
        mem = _after_step(pb, v, remaining, mem + alloc)
    return out


def exact_order(
    pb: _Problem,
    upper: int,
    max_states: int = 50_000,
    max_level: int = 5_000,
    status: dict[str, str] | None = None,
    max_work: int = 2_000_000,
) -> list[int] | None:
    """Minimal-peak order by DP over down-sets, or None when it would need too many states or
    when no order beats ``upper`` (``status['result']`` says which: ``optimal``,
    ``no-better-order`` or ``too-many-states``, also past :data:`EXACT_MAX_NODES` or past
    ``max_work`` moves tried: a graph with many nodes ready at once)."""
    if pb.n > EXACT_MAX_NODES:
        if status is not None:
            status["result"] = "too-many-states"
        return None
    full = (1 << pb.n) - 1
    width = (pb.n + 7) // 8

    def key(x: int) -> bytes:
        # a down-set's bytes, not the int: Python hashes an int modulo 2**61 - 1, so sets that
        # differ by nodes 61 apart collide, and the dicts below degrade to linear scans on
        # graphs of a few thousand nodes (a bytes hash mixes every bit)
        return x.to_bytes(width, "little")

    # level: key(S) -> (peak, mem, S, mask of the nodes ready after S); the nodes tried from a
    # state are the ready ones, lowest first (the order a scan of every node would meet them)
    succ_mask = [0] * pb.n
    for v in range(pb.n):
        for w in pb.succs[v]:
            succ_mask[v] |= 1 << w
    sources = 0
    for v in range(pb.n):
        if not pb.preds[v]:
            sources |= 1 << v
    level: dict[bytes, tuple[int, int, int, int]] = {key(0): (pb.mem0, pb.mem0, 0, sources)}
    parents: list[dict[bytes, tuple[bytes, int]]] = []
    total = 0
    work = 0  # moves tried: a wide graph (many nodes ready at once) gives up early
    for _ in range(pb.n):
        nxt: dict[bytes, tuple[int, int, int, int]] = {}
        back: dict[bytes, tuple[bytes, int]] = {}
        for ks, (pk, mem, s, ready) in level.items():
            if work > max_work:
                break
            avail = ready
            while avail:
                low = avail & -avail
                v = low.bit_length() - 1
                avail ^= low
                work += 1
                done = s | low
                alloc = 0
                for b in pb.out_bufs[v]:
                    alloc += pb.size[b]
                credit = 0
                freed = 0
                for b in pb.in_bufs[v]:
                    if not pb.is_out[b] and not (pb.cons[b] & ~done):
                        freed += pb.size[b]
                        if not credit and b in pb.inplace_cands[v]:
                            credit = pb.size[b]
                for b in pb.out_bufs[v]:
                    if pb.ncons[b] == 0 and not pb.is_out[b]:
                        freed += pb.size[b]
                p = max(pk, mem + alloc - min(credit, alloc))
                if p >= upper:
                    continue
                kd = key(done)
                old = nxt.get(kd)
                if old is None or p < old[0]:
                    if old is None:  # the ready set depends on the down-set only
                        if len(nxt) >= max_level or total + len(nxt) >= max_states:
                            # this level alone is over a limit (the level only grows): stop
                            # now rather than after expanding every state of it (a wide graph
                            # has thousands of states per level, each trying every ready node)
                            if status is not None:
                                status["result"] = "too-many-states"
                            return None
                        nready = ready ^ low
                        more = succ_mask[v]
                        while more:
                            wl = more & -more
                            more ^= wl
                            if not (pb.preds[wl.bit_length() - 1] & ~done):
                                nready |= wl
                    else:
                        nready = old[3]
                    nxt[kd] = (p, mem + alloc - freed, done, nready)
                    back[kd] = (ks, v)
        if work > max_work:
            if status is not None:
                status["result"] = "too-many-states"
            return None
        total += len(nxt)
        if not nxt:  # no order beats ``upper``: the search proved the upper bound optimal
            if status is not None:
                status["result"] = "no-better-order"
            return None
        if total > max_states or len(nxt) > max_level:
            if status is not None:
                status["result"] = "too-many-states"
            return None
        parents.append(back)
        level = nxt
    if key(full) not in level:
        return None
    if status is not None:
        status["result"] = "optimal"
    order: list[int] = []
    k = key(full)
    for back in reversed(parents):
        prev, v = back[k]
        order.append(v)
        k = prev
    return order[::-1]


def _emit(model: Model, sched: list[gs.Node], order: list[int]) -> list[gs.Node]:
    """The full node list: scheduled nodes in ``order``, each Constant before its first reader."""
    consts = [nd for nd in model.graph.nodes if nd.op == "Constant"]
    first_reader: dict[int, int] = {}
    reader_pos = {id(sched[v]): k for k, v in enumerate(order)}
    by_name = {nd.outputs[0].name: nd for nd in consts if nd.outputs}
    for nd in sched:
        reads = [t.name for t in nd.inputs if t.name]
        if node_subgraphs(nd):
            reads += captured_names(nd)
        for name in reads:
            c = by_name.get(name)
            if c is not None:
                k = reader_pos[id(nd)]
                first_reader[id(c)] = min(first_reader.get(id(c), k), k)
    before: dict[int, list[gs.Node]] = {}
    head: list[gs.Node] = []
    for c in consts:
        kr = first_reader.get(id(c))
        if kr is None:
            head.append(c)
        else:
            before.setdefault(kr, []).append(c)
    out = list(head)
    for k, v in enumerate(order):
        out.extend(before.get(k, []))
        out.append(sched[v])
    return out


def reorder_for_memory(
    model: Model,
    *,
    inplace: bool = True,
    strategy: str = "best",
    alignment: int = ALIGNMENT,
    observed: Mapping[str, Any] | None = None,
    baseline: MemoryPlan | None = None,
    max_states: int = 50_000,
    info: dict[str, Any] | None = None,
    reuse_inputs: bool = False,
) -> bool:
    """Reorder ``model.graph.nodes`` (shapes inferred) in place when that lowers the planned arena.

    Returns True when the order changed. ``info`` (optional) receives the search figures.
    """
    sched = [nd for nd in model.graph.nodes if nd.op != "Constant"]
    if len(sched) < 2:
        return False
    pb = _build(model, sched, inplace, alignment, observed)
    identity = list(range(pb.n))
    cands: dict[str, list[int]] = {"given": identity}
    for mode in ("net", "peak", "lookahead", "dfs", "lookahead-dfs", "reverse"):
        cands[mode] = _greedy(pb, mode)
    peaks = {k: simulate(pb, o) for k, o in cands.items()}
    start = min(peaks, key=lambda k: (peaks[k], k != "given"))
    cands["improved"] = improve(pb, cands[start])
    peaks["improved"] = simulate(pb, cands["improved"])
    upper = min(peaks.values())
    status: dict[str, str] = {}
    exact = exact_order(pb, upper, max_states=max_states, status=status)
    if exact is not None:
        cands["exact"] = exact
        peaks["exact"] = simulate(pb, exact)
    if info is not None:
        proved = status.get("result") in ("optimal", "no-better-order")
        info.update(
            {
                "search_peaks": dict(peaks),
                "exact_searched": proved,
                "exact_result": status.get("result", ""),
                "nodes_scheduled": pb.n,
            }
        )
    if baseline is None:
        baseline = plan_order(
            model,
            inplace=inplace,
            strategy=strategy,
            alignment=alignment,
            observed=observed,
            reuse_inputs=reuse_inputs,
        )
    original = list(model.graph.nodes)
    best_key = (baseline.arena_bytes, baseline.bound)
    best_nodes: list[gs.Node] | None = None
    best_name = "given"
    tried: set[tuple[int, ...]] = {tuple(identity)}
    for name in sorted(cands, key=lambda k: (peaks[k], k != "exact")):
        order = cands[name]
        if tuple(order) in tried or peaks[name] > peaks["given"]:
            continue
        tried.add(tuple(order))
        model.graph.nodes = _emit(model, sched, order)
        plan = plan_order(
            model,
            inplace=inplace,
            strategy=strategy,
            alignment=alignment,
            observed=observed,
            reuse_inputs=reuse_inputs,
        )
        key = (plan.arena_bytes, plan.bound)
        if key < best_key:
            best_key, best_nodes, best_name = key, list(model.graph.nodes), name
        if len(tried) >= 4:
            break
    if best_nodes is None:
        model.graph.nodes = original
        if info is not None:
            info.update(
                {
                    "method": "given",
                    "arena_before": baseline.arena_bytes,
                    "arena_after": baseline.arena_bytes,
                }
            )
        return False
    model.graph.nodes = best_nodes
    if info is not None:
        info.update(
            {"method": best_name, "arena_before": baseline.arena_bytes, "arena_after": best_key[0]}
        )
    logger.info(
        "memory order: %s order cuts the arena %d -> %d bytes",
        best_name,
        baseline.arena_bytes,
        best_key[0],
    )
    return True
