"""Static memory planning: one arena with offsets, in-place reuse and aliasing, for a model whose
shapes are inferred (:func:`plan_order`). The job that prepares the model, sizes unknown tensors
and searches a better order first is :func:`graphopt.jobs.plan.plan_memory`.

The model (fixed input shapes) runs its nodes in graph order; every node takes one *step*
(Constant nodes take none). A node with subgraphs (If/Loop/Scan) takes an *enter* step, then the
steps of its bodies' nodes laid out one after the other (the two branches of an If never run
together, so laying them out in sequence is exact), then an *exit* step where its outputs are born.

Liveness (:mod:`graphopt.core.liveness`). A tensor is live on the closed interval ``[start, end]``
of steps: ``start`` is the step of its producer (the exit step for the outputs of If/Loop/Scan),
``end`` the last step reading it.

- Initializers and ``Constant`` outputs are parameters: they are not in the arena.
- Graph inputs ARE in the arena (the caller copies the feeds in) and belong to the caller: they
  are live from step 0 to the last step, so that no other tensor ever takes their bytes and the
  caller finds them unchanged after the run (TensorFlow Lite's planner preserves its inputs the
  same way; onnxruntime never reuses a graph input's buffer). The arena is then the whole
  activation footprint.
- Graph outputs are in the arena and live to the last step (the caller reads them out at the end).
- No buffer that holds a graph input or a graph output (also through a view: a Reshape of an
  input) is ever written in place; a graph input that is also a graph output is one buffer that
  nothing writes.
- A tensor that a subgraph reads from an enclosing scope (a capture) stays live until the exit
  step of the If/Loop node in that scope; a branch's outputs stay live until that exit step (they
  are copied into the If's outputs there). Tensors inside Loop/Scan bodies are kept live for the
  whole node (iterations repeat), and no in-place reuse is done inside those bodies.
- Tensors whose size shape inference cannot fix are sized by running the model once node by node
  (:mod:`graphopt.algorithms.memory.arena`); tensors that still have no size (untaken branches) are
  *unplanned*: left out of the arena and counted.

Lower bound: ``max over steps of sum(size of tensors live at that step)`` with sizes rounded up
to the alignment; no offset assignment can beat it.

Buffers. Tensors are merged into buffers before offsets are chosen:

- aliasing: the output of Reshape/Flatten/Squeeze/Unsqueeze/Identity is the same buffer as its
  input (a view; the op writes nothing new);
- in-place (``inplace=True``): an op of :data:`INPLACE_OPS` (elementwise unary/binary,
  activations, BatchNormalization, Softmax: onnxruntime's CPU kernels compute all of them
  correctly with the output aliasing an input, which the executor checks) writes its output into
  an input with the same shape and dtype whose buffer dies at that op.

A buffer lives on the union of its tensors' intervals and is as large as its largest tensor. With
in-place reuse the lower bound itself shrinks; both bounds are reported.

Offsets. Buffers are placed into one arena by best fit (the smallest gap between already placed,
time-overlapping buffers that fits, else on top) in several orders: by size (TFLite's
greedy-by-size), by breadth (TFLite's greedy-by-breadth: the steps with the most live bytes
first) and by size with longer lifetimes first; the smallest arena wins, and buffers left above
the lower bound are then pinned to the bottom one at a time while that shrinks the arena.
Offsets are multiples of ``alignment`` (64 bytes).
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numba
import numpy as np
from networkx.utils import UnionFind

from graphopt.core.errors import GraphoptError
from graphopt.core.liveness import Liveness, live_profile, liveness
from graphopt.core.model import Model

logger = logging.getLogger(__name__)

ALIGNMENT = 64

#: ops whose output is a view of input 0 (same bytes, another shape)
ALIAS_OPS: frozenset[str] = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"})

_UNARY = (
    "Relu",
    "LeakyRelu",
    "Sigmoid",
    "HardSigmoid",
    "HardSwish",
    "Tanh",
    "Elu",
    "Selu",
    "Celu",
    "Softplus",
    "Softsign",
    "ThresholdedRelu",
    "Exp",
    "Log",
    "Neg",
    "Abs",
    "Sqrt",
    "Reciprocal",
    "Floor",
    "Ceil",
    "Round",
    "Sign",
    "Erf",
    "Sin",
    "Cos",
    "Not",
    "Clip",
    "BatchNormalization",
    "PRelu",
    "Softmax",
    "LogSoftmax",
)
_BINARY = ("Add", "Sub", "Mul", "Div", "Pow", "And", "Or", "Xor")
_VARIADIC = ("Max", "Min", "Sum", "Mean")

#: op -> input positions the output may overwrite (None: any input). Elementwise ops only: each
#: output element depends on the same element of the overwritten input (broadcast operands are
#: never overwritten because their shape differs from the output's).
INPLACE_OPS: dict[str, tuple[int, ...] | None] = {
    **{op: (0,) for op in _UNARY},
    **{op: (0, 1) for op in _BINARY},
    **{op: None for op in _VARIADIC},
}

STRATEGIES = ("greedy-size", "greedy-breadth", "best")


def align(n: int | np.ndarray, a: int = ALIGNMENT) -> Any:
    return (n + a - 1) // a * a


# ---------------------------------------------------------------------------------- buffers


@dataclass
class Buffers:
    """Tensors merged into buffers (aliasing and in-place reuse)."""

    of_tensor: np.ndarray  # buffer id per tensor
    start: np.ndarray
    end: np.ndarray
    size: np.ndarray  # aligned bytes
    aliased: int = 0
    inplace: int = 0
    #: tensor name -> the input tensor whose buffer it reuses (alias or in-place), for reports
    reuses: dict[str, tuple[str, str]] = field(default_factory=dict)


def merge_buffers(
    live: Liveness,
    inplace: bool = True,
    alias: bool = True,
    alignment: int = ALIGNMENT,
    reuse_inputs: bool = False,
) -> Buffers:
    """Group tensors into buffers: views for reshapes, in-place writes for elementwise ops
    (into a graph input's buffer only with ``reuse_inputs``)."""
    n = len(live.names)
    sets = UnionFind(range(n))
    find = sets.__getitem__
    gend = live.end.tolist()  # per set, at its current root: the last step of any member

    # buffers holding a graph input (the caller's) or a graph output must never be overwritten in
    # place (also through an alias); a graph input that is also an output keeps kind "input"
    kept = ("output",) if reuse_inputs else ("input", "output")
    holds_output = {i for i, k in enumerate(live.kinds) if k in kept}

    def union(keep: int, other: int) -> None:
        a, b = find(keep), find(other)
        if a != b:
            sets.union(a, b)
            root = find(a)
            gend[root] = max(gend[a], gend[b])
            if a in holds_output or b in holds_output:
                holds_output.add(root)

    idx = live.index
    aliased = inplaced = 0
    reuses: dict[str, tuple[str, str]] = {}
    for step, node, in_loop in live.step_nodes:
        if in_loop or not node.outputs or not node.outputs[0].name:
            continue
        o = idx.get(node.outputs[0].name)
        if o is None or live.kinds[o] in ("loop",):
            continue
        if alias and node.op in ALIAS_OPS and node.inputs and node.inputs[0].name:
            x = idx.get(node.inputs[0].name)
            if x is not None and live.nbytes[x] == live.nbytes[o] and live.kinds[x] != "loop":
                union(x, o)
                aliased += 1
                reuses[live.names[o]] = (live.names[x], "alias")
            continue
        if not inplace or node.op not in INPLACE_OPS or node.domain not in (None, "", "ai.onnx"):
            continue
        positions = INPLACE_OPS[node.op]
        cands = range(len(node.inputs)) if positions is None else positions
        for k in cands:
            if k >= len(node.inputs) or not node.inputs[k].name:
                continue
            x = idx.get(node.inputs[k].name)
            if x is None or live.kinds[x] == "loop" or find(x) in holds_output:
                continue
            if (
                live.shapes[x] != live.shapes[o]
                or live.dtypes[x] != live.dtypes[o]
                or gend[find(x)] != step
                or find(x) == find(o)
            ):
                continue
            union(x, o)
            inplaced += 1
            reuses[live.names[o]] = (live.names[x], "inplace")
            break
    # a buffer is numbered by its first tensor (sets grow from the tensor they first alias)
    roots = np.zeros(n, dtype=np.int64)
    for members in sets.to_sets():
        roots[list(members)] = min(members)
    uniq, of_tensor = np.unique(roots, return_inverse=True)
    m = len(uniq)
    bstart = np.full(m, np.iinfo(np.int64).max, dtype=np.int64)
    bend = np.full(m, -1, dtype=np.int64)
    bsize = np.zeros(m, dtype=np.int64)
    np.minimum.at(bstart, of_tensor, live.start)
    np.maximum.at(bend, of_tensor, live.end)
    np.maximum.at(bsize, of_tensor, align(live.nbytes, alignment))
    return Buffers(
        of_tensor=of_tensor.astype(np.int64),
        start=bstart,
        end=bend,
        size=bsize,
        aliased=aliased,
        inplace=inplaced,
        reuses=reuses,
    )


# ---------------------------------------------------------------------------------- offsets


def best_fit(
    start: np.ndarray,
    end: np.ndarray,
    size: np.ndarray,
    order: np.ndarray,
    alignment: int = ALIGNMENT,
) -> tuple[np.ndarray, int]:
    """Place buffers in ``order``, each in the smallest gap that fits among the already placed
    buffers that overlap it in time (else on top of them). Returns (offsets, arena bytes)."""
    offs, arena = _best_fit(
        np.ascontiguousarray(start, dtype=np.int64),
        np.ascontiguousarray(end, dtype=np.int64),
        np.ascontiguousarray(size, dtype=np.int64),
        np.ascontiguousarray(order, dtype=np.int64),
        int(alignment),
    )
    return offs, int(arena)


@numba.njit(cache=True, nogil=True)
def _best_fit(
    start: np.ndarray, end: np.ndarray, size: np.ndarray, order: np.ndarray, alignment: int
) -> tuple[np.ndarray, int]:  # pragma: no cover - numba
    """:func:`best_fit`'s loop. The placed buffers are kept sorted by (offset, placement), so
    placing one is a scan of them that skips those not overlapping it in time plus one insertion:
    O(n) per buffer, no sort."""
    n = len(size)
    offs = np.full(n, -1, dtype=np.int64)
    ps = np.empty(n, dtype=np.int64)  # placed buffers by (offset, placement): start, end,
    pe = np.empty(n, dtype=np.int64)  # offset and size
    po = np.empty(n, dtype=np.int64)
    pz = np.empty(n, dtype=np.int64)
    k = 0
    arena = 0
    for i in range(len(order)):
        b = order[i]
        s, e, z = start[b], end[b], size[b]
        off = 0
        if k > 0 and z > 0:
            top = 0  # highest end (offset + size) of the overlapping buffers below
            best_gap = -1
            for j in range(k):
                if ps[j] <= e and pe[j] >= s:
                    gap = po[j] - top
                    if gap >= z and (best_gap < 0 or gap < best_gap):
                        best_gap = gap
                        off = top
                    t = po[j] + pz[j]
                    if t > top:
                        top = t
            if best_gap < 0:
                off = top
        off = (off + alignment - 1) // alignment * alignment
        offs[b] = off
        at = k  # after every placed buffer with an offset <= off (stable)
        while at > 0 and po[at - 1] > off:
            at -= 1
        for j in range(k, at, -1):
            ps[j] = ps[j - 1]
            pe[j] = pe[j - 1]
            po[j] = po[j - 1]
            pz[j] = pz[j - 1]
        ps[at] = s
        pe[at] = e
        po[at] = off
        pz[at] = z
        k += 1
        if off + z > arena:
            arena = off + z
    return offs, arena


def size_order(buf: Buffers) -> np.ndarray:
    """TFLite's greedy-by-size order: largest first, earlier first on ties."""
    return np.lexsort((buf.start, -buf.size))


def size_lifetime_order(buf: Buffers) -> np.ndarray:
    return np.lexsort((buf.start, -(buf.end - buf.start), -buf.size))


def breadth_order(buf: Buffers, steps: int) -> np.ndarray:
    """TFLite's greedy-by-breadth order: steps by decreasing live bytes; at each step its not yet
    placed buffers by decreasing size. A buffer is therefore placed at the best-ranked step of its
    interval."""
    breadth = live_profile(buf.start, buf.end, buf.size, steps)
    rank = np.empty(steps, dtype=np.int64)
    rank[np.argsort(-breadth, kind="stable")] = np.arange(steps)
    # minimum rank over each interval via a sparse table (no per-step Python loop)
    levels = [rank]
    j = 1
    while (1 << j) <= steps:
        prev = levels[-1]
        half = 1 << (j - 1)
        levels.append(np.minimum(prev[:-half], prev[half:]))
        j += 1
    length = buf.end - buf.start + 1
    lg = np.floor(np.log2(np.maximum(length, 1))).astype(np.int64)
    best = np.empty(len(buf.size), dtype=np.int64)
    for lev in np.unique(lg):
        sel = np.flatnonzero(lg == lev)
        table = levels[int(lev)]
        a = table[buf.start[sel]]
        b = table[buf.end[sel] - (1 << int(lev)) + 1]
        best[sel] = np.minimum(a, b)
    return np.lexsort((buf.start, -buf.size, best))


def assign_offsets(
    buf: Buffers, steps: int, strategy: str = "best", alignment: int = ALIGNMENT
) -> tuple[np.ndarray, int, str]:
    """Offsets of every buffer; returns (offsets, arena bytes, strategy that won)."""
    if strategy not in STRATEGIES:
        raise GraphoptError(f"unknown strategy '{strategy}'; choose one of {', '.join(STRATEGIES)}")
    cands: list[tuple[str, np.ndarray]] = []
    if strategy in ("greedy-size", "best"):
        cands.append(("greedy-size", size_order(buf)))
    if strategy in ("greedy-breadth", "best"):
        cands.append(("greedy-breadth", breadth_order(buf, steps)))
    if strategy == "best":
        cands.append(("greedy-size-lifetime", size_lifetime_order(buf)))
    best: tuple[np.ndarray, int, str] | None = None
    best_order = cands[0][1]
    for name, order in cands:
        offs, arena = best_fit(buf.start, buf.end, buf.size, order, alignment)
        if best is None or arena < best[1]:
            best = (offs, arena, name)
            best_order = order
    assert best is not None
    if strategy == "best" and len(buf.size):
        best = _repair(buf, steps, best, best_order, alignment)
    return best


#: how much best-fit work (tries x buffers^2) the pinning repair may spend on one plan
REPAIR_WORK = 1e8


def _repair(
    buf: Buffers,
    steps: int,
    best: tuple[np.ndarray, int, str],
    order: np.ndarray,
    alignment: int,
    rounds: int = 4,
    tries: int = 48,
) -> tuple[np.ndarray, int, str]:
    """Pinning: a buffer (those ending above the lower bound first, then the longest-lived) is
    placed first (at the bottom) and the rest best-fit again around it; kept when the arena
    shrinks. Fixes the fragmentation that
    size order leaves when a small long-lived buffer straddles two phases of large ones.

    Each try is a best fit, quadratic in the buffers: past about 700 buffers the tries are cut
    to :data:`REPAIR_WORK` / n^2 in all (a 1,700-node DenseNet spent 90 s here), so the plan of a
    large graph stays seconds; below, every round and try runs as before."""
    bound = int(live_profile(buf.start, buf.end, buf.size, steps).max())
    offs, arena, name = best
    budget = max(1, int(REPAIR_WORK // max(len(buf.size) ** 2, 1)))
    for _ in range(rounds):
        if arena <= bound or budget <= 0:
            break
        over = np.flatnonzero(offs + buf.size > bound)
        over = over[np.argsort(-(offs[over] + buf.size[over]), kind="stable")]
        # then the others, longest-lived first (a long buffer pinned low often unblocks the rest)
        rest = np.setdiff1d(np.arange(len(buf.size)), over)
        rest = rest[np.argsort(-(buf.end[rest] - buf.start[rest]), kind="stable")]
        found = None
        for b in np.concatenate((over, rest))[: min(tries, budget)].tolist():
            budget -= 1
            o = np.concatenate(([b], order[order != b]))
            of2, a2 = best_fit(buf.start, buf.end, buf.size, o, alignment)
            if a2 < arena and (found is None or a2 < found[1]):
                found = (of2, a2, o)
        if found is None:
            break
        offs, arena, order = found
        name = name + "+pin" if not name.endswith("+pin") else name
    return offs, arena, name


# ---------------------------------------------------------------------------------- the plan


@dataclass
class TensorPlan:
    name: str
    offset: int
    nbytes: int
    start: int
    end: int
    shape: tuple[int, ...]
    dtype: str
    kind: str
    buffer: int


@dataclass
class MemoryPlan:
    """Where every activation lives in one arena, and the figures that judge it."""

    tensors: dict[str, TensorPlan]
    arena_bytes: int
    lower_bound_bytes: int  # plain liveness bound (no in-place), aligned sizes
    inplace_lower_bound_bytes: int  # bound after aliasing and in-place merges
    naive_bytes: int  # one buffer per tensor
    inplace: bool
    strategy: str
    alignment: int
    steps: int
    order: list[str]
    peak_step: int
    peak_node: str
    aliased: int = 0
    inplace_reused: int = 0
    unplanned: list[str] = field(default_factory=list)
    order_changed: bool = False
    order_before_lower_bound: int | None = None
    order_before_arena: int | None = None
    reuses: dict[str, tuple[str, str]] = field(default_factory=dict)
    #: op types of ``order`` (with the names, what the executor checks the model against)
    order_ops: list[str] = field(default_factory=list)
    #: for each node of the planned order, its position in the model given to plan_memory
    order_index: list[int] = field(default_factory=list)
    #: graph inputs' bytes reused after their last reader (``plan --reuse-inputs``): the run
    #: overwrites its inputs
    reuse_inputs: bool = False
    #: the model the plan is for (prepared shapes, planned order); not serialized
    model: Model | None = None

    @property
    def bound(self) -> int:
        """The lower bound this plan competes with (in-place bound when in-place is on)."""
        return self.inplace_lower_bound_bytes if self.inplace else self.lower_bound_bytes

    @property
    def ratio(self) -> float:
        return self.arena_bytes / self.bound if self.bound else 1.0

    def summary(self) -> dict[str, Any]:
        lb = self.lower_bound_bytes
        return {
            "arena_bytes": self.arena_bytes,
            "lower_bound_bytes": lb,
            "inplace_lower_bound_bytes": self.inplace_lower_bound_bytes,
            "naive_bytes": self.naive_bytes,
            "inplace": self.inplace,
            "reuse_inputs": self.reuse_inputs,
            "order_changed": self.order_changed,
            "arena_over_bound": round(self.ratio, 4),
            "arena_over_lower_bound": round(self.arena_bytes / lb, 4) if lb else 1.0,
            "naive_over_arena": round(self.naive_bytes / self.arena_bytes, 3)
            if self.arena_bytes
            else 1.0,
            "strategy": self.strategy,
            "alignment": self.alignment,
            "tensors": len(self.tensors),
            "buffers": len({t.buffer for t in self.tensors.values()}),
            "aliased": self.aliased,
            "inplace_reused": self.inplace_reused,
            "unplanned": len(self.unplanned),
            "steps": self.steps,
            "peak_step": self.peak_step,
            "peak_node": self.peak_node,
            "order_before_lower_bound_bytes": self.order_before_lower_bound,
            "order_before_arena_bytes": self.order_before_arena,
        }

    def to_json(self) -> dict[str, Any]:
        """Everything, tensors included (the ``.memplan.json`` file)."""
        d = self.summary()
        d["order"] = self.order
        d["unplanned_tensors"] = self.unplanned
        d["tensors"] = [
            {
                "name": t.name,
                "offset": t.offset,
                "bytes": t.nbytes,
                "start": t.start,
                "end": t.end,
                "shape": list(t.shape),
                "dtype": t.dtype,
                "kind": t.kind,
                "buffer": t.buffer,
                **(
                    {"reuses": self.reuses[t.name][0], "reuse": self.reuses[t.name][1]}
                    if t.name in self.reuses
                    else {}
                ),
            }
            for t in self.tensors.values()
        ]
        return d

    def compact_json(self) -> str:
        """Arena size and offsets only (for the model's ``graphopt.memory_plan`` metadata)."""
        return json.dumps(
            {
                "arena_bytes": self.arena_bytes,
                "alignment": self.alignment,
                "inplace": self.inplace,
                "offsets": {t.name: t.offset for t in self.tensors.values()},
            },
            separators=(",", ":"),
        )

    def with_offsets(self, offsets: Mapping[str, int]) -> MemoryPlan:
        """A copy with some offsets replaced (to build deliberately wrong plans in tests)."""
        other = copy.copy(self)
        other.tensors = {k: copy.copy(v) for k, v in self.tensors.items()}
        for k, off in offsets.items():
            other.tensors[k].offset = int(off)
        other.arena_bytes = max((t.offset + t.nbytes for t in other.tensors.values()), default=0)
        other.arena_bytes = int(align(other.arena_bytes, self.alignment))
        return other


def conflicts(plan: MemoryPlan, limit: int = 10) -> list[tuple[str, str]]:
    """Pairs of tensors that are live at the same step and overlap in the arena, and are not the
    same buffer (brute force over all pairs; for tests and small graphs)."""
    ts = list(plan.tensors.values())
    if not ts:
        return []
    s = np.array([t.start for t in ts])
    e = np.array([t.end for t in ts])
    o = np.array([t.offset for t in ts])
    z = np.array([t.nbytes for t in ts])
    b = np.array([t.buffer for t in ts])
    out: list[tuple[str, str]] = []
    for i in range(len(ts)):
        j = np.arange(i + 1, len(ts))
        bad = (
            (s[j] <= e[i])
            & (e[j] >= s[i])
            & (o[j] < o[i] + z[i])
            & (o[j] + z[j] > o[i])
            & (z[j] > 0)
            & (z[i] > 0)
            & (b[j] != b[i])
        )
        for k in j[bad].tolist():
            out.append((ts[i].name, ts[k].name))
            if len(out) >= limit:
                return out
    return out


def plan_order(
    model: Model,
    *,
    inplace: bool = True,
    strategy: str = "best",
    alignment: int = ALIGNMENT,
    observed: Mapping[str, tuple[tuple[int, ...], np.dtype]] | None = None,
    reuse_inputs: bool = False,
) -> MemoryPlan:
    """Plan ``model`` (shapes already inferred) in its current node order; ``reuse_inputs``:
    graph inputs' bytes may be reused after their last reader (see
    :func:`graphopt.core.liveness.liveness`)."""
    live = liveness(model, observed, reuse_inputs=reuse_inputs)
    aligned = align(live.nbytes, alignment)
    lb_plain = live.peak(alignment)[0]  # the cost model's activation peak at alignment 1
    buf = merge_buffers(
        live, inplace=inplace, alias=inplace, alignment=alignment, reuse_inputs=reuse_inputs
    )
    if len(buf.size):
        prof = live_profile(buf.start, buf.end, buf.size, live.steps)
        lb_inplace = int(prof.max())
        offs, arena, won = assign_offsets(buf, live.steps, strategy, alignment)
        peak = int(np.argmax(prof))
    else:
        lb_inplace, offs, arena, won, peak = 0, np.zeros(0, np.int64), 0, strategy, 0
    tensors: dict[str, TensorPlan] = {}
    for i, name in enumerate(live.names):
        b = int(buf.of_tensor[i])
        tensors[name] = TensorPlan(
            name,
            int(offs[b]),
            int(live.nbytes[i]),
            int(live.start[i]),
            int(live.end[i]),
            live.shapes[i],
            str(live.dtypes[i]),
            live.kinds[i],
            b,
        )
    if live.unplanned:
        logger.info(
            "memory plan: %d tensors of unknown size left out of the arena", len(live.unplanned)
        )
    return MemoryPlan(
        tensors=tensors,
        arena_bytes=int(arena),
        lower_bound_bytes=lb_plain,
        inplace_lower_bound_bytes=lb_inplace,
        naive_bytes=int(aligned.sum()),
        inplace=inplace,
        strategy=won,
        alignment=alignment,
        steps=live.steps,
        order=[n.name for n in model.graph.nodes],
        order_ops=[n.op for n in model.graph.nodes],
        peak_step=peak,
        peak_node=live.step_names[peak] if live.step_names else "",
        aliased=buf.aliased,
        inplace_reused=buf.inplace,
        unplanned=list(live.unplanned),
        reuses=buf.reuses,
        reuse_inputs=reuse_inputs,
        model=model,
    )
