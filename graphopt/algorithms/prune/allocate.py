"""Sensitivity-driven allocation of a global pruning budget across dependency groups.

``scope="auto"`` of ``prune-channels``: the ratio is the fraction of the *prunable* MACs to
remove (the compute of the nodes that read or write a free unit: Q/K/V/O projections, ``q @
k^T``, ``probs @ v`` and both FFN MatMuls of a transformer; the convs of a CNN), and this module
decides how many units every group loses, from calibration data:

1. **Sensitivity scan** (the layer-wise sensitivity analysis of Li et al. 2017, "Pruning Filters
   for Efficient ConvNets", measured here after a local recovery): for every free group ``g``
   and a few counts ``k`` (:data:`SCAN_RATIOS` of its width), the ``k`` least important units of
   ``g`` alone are removed (zeroed, which :func:`~graphopt.algorithms.prune.apply.zero_pruned`
   makes exactly equivalent) and the MatMul/Gemm layers that read them are refit by least squares
   on the calibration inputs (the Optimal Brain Surgeon update of a linear layer, Hassibi & Stork
   1993, as Frantar & Alistarh 2022 "Optimal Brain Compression" use it:
   ``W' = W - H^-1[:, P] ([H^-1]_PP)^-1 W_P`` with ``H = X^T X`` of the layer's input plus a ones
   column when the intercept can be written into a bias ``Add``; rows ``P`` become zero). The
   distortion ``d_g(k)`` is the network's output error on the calibration samples, ``sum_o
   ||y_o' - y_o||^2 / ||y_o||^2``, made non-decreasing in ``k`` and linear between the points
   (``d_g(0) = 0``).
2. **Allocation** (a multiple-choice knapsack under the additive-distortion assumption, the
   formulation of SPDY, Frantar & Alistarh 2022, solved greedily on the lower convex hull as the
   Lagrangian methods do): starting from nothing removed, repeatedly take the step (a group moving
   to a larger scanned count) with the least distortion added per MAC saved, until the saved MACs
   reach ``ratio`` times the prunable MACs; the step that would overshoot is replaced by the
   finishing move (any group, any count at unit granularity) adding the least distortion among
   those that reach the target. So the target is met within one unit's MACs.

MACs saved are counted exactly for the shapes analysed: a node's MACs scale with the kept
fraction of every distinct set of units it touches (a conv between two groups: the product;
``q @ k^T`` reading the same heads twice: once). Groups keep ``min_channels`` /
``min_fraction`` / ``round_to`` as :func:`~graphopt.algorithms.prune.importance.select` does, and
the units removed inside a group are the ones ``select`` would remove (least important first), so
the allocation hands ``select`` per-group ratios.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt.algorithms.prune.analysis import Analysis, ConstSlice
from graphopt.algorithms.prune.apply import zero_pruned
from graphopt.algorithms.prune.groups import Group
from graphopt.algorithms.prune.handlers import constant, replace_input
from graphopt.algorithms.prune.importance import keep_elements
from graphopt.algorithms.prune.recover import bias_add
from graphopt.core.model import Model
from graphopt.core.session import make_session

logger = logging.getLogger(__name__)

#: fractions of a group's width measured by the sensitivity scan (counts rounded, at least 1)
SCAN_RATIOS = (0.125, 0.25, 0.5, 0.75)

#: calibration feeds (batches) the scan measures on by default
SCAN_FEEDS = 8

Feeds = Mapping[str, np.ndarray]
Progress = Callable[[int, int], None]


@dataclass
class GroupAllocation:
    """What the allocation gave one group.

    Attributes:
        name: the group's name (its first producer's node name).
        kind: ``heads`` (several producers: Q/K/V), ``neurons`` (one MatMul/Gemm producer) or
            ``channels`` (convolutions).
        width: its units (free and fixed).
        removed: units removed.
        max_removed: the most the floors allow.
        macs: MACs of the nodes it touches (before pruning).
        distortion: the scan's estimate of the output distortion at ``removed``.
        curve: the measured ``(units removed, distortion)`` points.
    """

    name: str
    kind: str
    width: int
    removed: int
    max_removed: int
    macs: int
    distortion: float = 0.0
    curve: list[tuple[int, float]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "width": self.width,
            "removed": self.removed,
            "distortion": self.distortion,
            "curve": [[k, d] for k, d in self.curve],
        }


@dataclass
class Allocation:
    """The per-group split of a global MAC budget (see the module docstring).

    Attributes:
        target: the requested fraction of the prunable MACs.
        prunable_macs: MACs of the nodes touching a free unit.
        saved_macs: MACs the allocation removes (counted at the analysed shapes).
        distortion: the sum of the groups' estimated distortions.
        groups: one per free group.
        points: scan points measured (pruned model evaluations).
        met: whether the target was reached (False: every group at its largest scanned count).
    """

    target: float
    prunable_macs: int
    saved_macs: int
    distortion: float
    groups: list[GroupAllocation]
    points: int
    met: bool

    @property
    def achieved(self) -> float:
        """The fraction of the prunable MACs removed."""
        return self.saved_macs / self.prunable_macs if self.prunable_macs else 0.0

    def ratios(self) -> dict[str, float]:
        """Per-group ratios for :func:`~graphopt.algorithms.prune.importance.select`."""
        out: dict[str, float] = {"*": 0.0}
        for g in self.groups:
            out[g.name] = g.removed / g.width if g.width else 0.0
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "achieved": self.achieved,
            "prunable_macs": self.prunable_macs,
            "saved_macs": self.saved_macs,
            "distortion": self.distortion,
            "points": self.points,
            "met": self.met,
            "groups": [g.to_json() for g in self.groups],
        }


# ------------------------------------------------------------------------------ MAC model
@dataclass
class _Term:
    """One distinct set of units a node touches: its positions removed per group and count."""

    length: int
    cum: dict[int, np.ndarray]  # group index -> positions removed after k units of its order


@dataclass
class _Node:
    macs: int
    terms: list[_Term]


class MacModel:
    """MACs saved by removing the first ``k[j]`` units of every group's removal order."""

    def __init__(
        self,
        an: Analysis,
        grps: Sequence[Group],
        orders: Sequence[np.ndarray],
        node_macs: Mapping[str, int],
    ) -> None:
        fixed_unit = int(an.unit[an.fixed])
        unit_group = {}
        rank: dict[int, int] = {}
        for j, order in enumerate(orders):
            for i, u in enumerate(order.tolist()):
                unit_group[u] = j
                rank[u] = i
        self.nodes: list[_Node] = []
        self.by_group: list[list[int]] = [[] for _ in grps]
        self.prunable = 0
        for name, labs in an.touched.items():
            macs = int(node_macs.get(name, 0))
            terms: dict[frozenset[int], _Term] = {}
            for lab in labs:
                units = np.where(lab >= 0, an.unit[np.maximum(lab, 0)], fixed_unit)
                free = [u for u in np.unique(units).tolist() if u in unit_group]
                if not free:
                    continue
                key = frozenset(free)
                if key in terms:
                    continue
                cum: dict[int, np.ndarray] = {}
                for j in sorted({unit_group[u] for u in free}):
                    counts = np.zeros(len(orders[j]) + 1, dtype=np.int64)
                    for u in free:
                        if unit_group[u] == j:
                            counts[rank[u] + 1] += int((units == u).sum())
                    cum[j] = np.cumsum(counts)
                terms[key] = _Term(len(units), cum)
            if not terms:
                continue
            self.prunable += macs
            idx = len(self.nodes)
            self.nodes.append(_Node(macs, list(terms.values())))
            for j in {j for t in terms.values() for j in t.cum}:
                self.by_group[j].append(idx)

    def _node_saved(self, node: _Node, k: Sequence[int]) -> float:
        kept = 1.0
        for t in node.terms:
            gone = sum(int(c[min(k[j], len(c) - 1)]) for j, c in t.cum.items())
            kept *= 1.0 - gone / t.length
        return node.macs * (1.0 - kept)

    def saved(self, k: Sequence[int]) -> float:
        """MACs saved with ``k[j]`` units removed from group ``j``."""
        return sum(self._node_saved(n, k) for n in self.nodes)

    def delta(self, k: Sequence[int], j: int, new: int) -> float:
        """Extra MACs saved when group ``j`` goes from ``k[j]`` to ``new`` units removed."""
        k2 = list(k)
        k2[j] = new
        return sum(
            self._node_saved(self.nodes[i], k2) - self._node_saved(self.nodes[i], k)
            for i in self.by_group[j]
        )


# ------------------------------------------------------------------------------ allocation
class MacDelta(Protocol):
    """What :func:`greedy_allocate` asks of a MAC model (:class:`MacModel` is one)."""

    def delta(self, k: Sequence[int], j: int, new: int) -> float: ...


def allowed_counts(width: int, max_removed: int, round_to: int | None) -> np.ndarray:
    """Unit counts a group may lose: ``0..max_removed``, keeping a multiple of ``round_to``."""
    ks = np.arange(0, max(max_removed, 0) + 1)
    if round_to and round_to > 1:
        ks = ks[(ks == 0) | ((width - ks) % round_to == 0)]
    return ks


def greedy_allocate(
    curves: Sequence[Sequence[tuple[int, float]]],
    allowed: Sequence[np.ndarray],
    macs: MacDelta,
    target_macs: float,
) -> tuple[list[int], bool]:
    """Units removed per group minimizing the summed distortion with ``target_macs`` saved.

    ``curves[j]``: measured ``(count, distortion)`` points of group ``j`` (the greedy steps
    between them; linear in between); ``allowed[j]``: the counts it may take (the finishing move
    picks any of them). Returns the counts and whether the target was met."""
    n = len(curves)
    k = [0] * n
    if target_macs <= 0:
        return k, True

    def dist(j: int, c: int) -> float:
        pts = curves[j]
        return float(np.interp(c, [0] + [p[0] for p in pts], [0.0] + [p[1] for p in pts]))

    levels = [
        sorted({int(c) for c, _ in curves[j] if c in set(allowed[j].tolist())}) for j in range(n)
    ]
    saved = 0.0
    while saved < target_macs - 1e-9:
        best: tuple[float, int, int, float] | None = None  # (dd per mac, group, count, dm)
        finish: tuple[float, int, int, float] | None = None  # (dd, group, count, dm)
        for j in range(n):
            d0 = dist(j, k[j])
            for c in levels[j]:
                if c <= k[j]:
                    continue
                dm = macs.delta(k, j, c)
                if dm <= 0:
                    continue
                dd = max(dist(j, c) - d0, 0.0)
                if saved + dm < target_macs - 1e-9 and (best is None or dd / dm < best[0]):
                    best = (dd / dm, j, c, dm)
            # the finishing move of this group: the least count reaching the target
            top = max(levels[j], default=0)
            for c in allowed[j].tolist():
                if c <= k[j] or c > top:
                    continue
                dm = macs.delta(k, j, c)
                if saved + dm >= target_macs - 1e-9:
                    dd = max(dist(j, c) - d0, 0.0)
                    if finish is None or dd < finish[0]:
                        finish = (dd, j, c, dm)
                    break  # larger counts add at least as much distortion
        if finish is not None and (best is None or finish[0] <= best[0] * finish[3]):
            k[finish[1]] = finish[2]
            return k, True
        if best is None:
            return k, False
        _, j, c, dm = best
        k[j] = c
        saved += dm
    return k, True


# ------------------------------------------------------------------------------ scan
def obs_inverse(xtx: np.ndarray, damp: float = 1e-3) -> np.ndarray:
    """``H^-1`` of a linear layer's input Gram matrix ``xtx``, damped by ``damp`` times its mean
    diagonal (what :func:`obs_update` takes)."""
    h = xtx + np.eye(len(xtx)) * (damp * float(np.mean(np.diag(xtx))) + 1e-12)
    return np.linalg.inv(h)


def obs_update(hinv: np.ndarray, w: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """The least-squares refit of a linear layer whose input rows ``pos`` are removed.

    ``hinv`` [R, R] is :func:`obs_inverse` of the Gram matrix of its inputs (R = rows of ``w``: K
    inputs, plus a ones column when ``w`` carries the bias as its last row), ``w`` [R, M]. Returns
    ``W'`` with rows ``pos`` zero and the rest refit: ``W - H^-1[:, P] ([H^-1]_PP)^-1 W_P``
    (Optimal Brain Surgeon)."""
    upd = hinv[:, pos] @ np.linalg.solve(hinv[np.ix_(pos, pos)], w[pos])
    out = w - upd
    out[pos] = 0.0
    return out


def _runnable(work: Model, io: onnx.GraphProto) -> onnx.ModelProto:
    """``work`` (input shapes fixed for the analysis) with the original's inputs and outputs, so
    that calibration batches of any size run through it."""
    p = work.to_onnx()
    del p.graph.value_info[:]
    del p.graph.input[:]
    p.graph.input.extend(io.input)
    del p.graph.output[:]
    p.graph.output.extend(io.output)
    return p


def _distortion(
    refs: Sequence[Sequence[np.ndarray]], outs: Sequence[Sequence[np.ndarray]]
) -> float:
    total = 0.0
    for i in range(len(refs[0])):
        r = np.concatenate([np.asarray(x[i], np.float64).ravel() for x in refs])
        o = np.concatenate([np.asarray(x[i], np.float64).ravel() for x in outs])
        if not np.issubdtype(np.asarray(refs[0][i]).dtype, np.floating):
            continue
        total += float(np.sum((o - r) ** 2) / (np.sum(r * r) + 1e-30))
    return total


class SensitivityScan:
    """Measures ``d_g(k)``: the output distortion with ``k`` units of one group removed and the
    linear layers reading them refit (see the module docstring)."""

    def __init__(
        self, model: Model, work: Model, an: Analysis, feeds: Sequence[Feeds], damp: float = 1e-3
    ) -> None:
        self.model = model
        self.work = work
        self.an = an
        self.damp = damp
        self.io = model.to_onnx().graph
        s0 = make_session(model, "basic")
        self.inputs = {i.name for i in s0.get_inputs()}
        self.feeds = [{k: v for k, v in f.items() if k in self.inputs} for f in feeds]
        self.refs = [s0.run(None, f) for f in self.feeds]
        self.fixed_unit = int(an.unit[an.fixed])
        self._grams: dict[str, np.ndarray] = {}
        self._hinv: dict[tuple[str, bool], np.ndarray] = {}
        self.points = 0

    def consumers(self, units: set[int]) -> list[ConstSlice]:
        """The MatMul/Gemm (2-D constant weight) consumer slices reading any of ``units``."""
        out = []
        for s in self.an.slices:
            if s.role != "consumer" or s.node.op not in ("MatMul", "Gemm") or s.index != 1:
                continue
            w = constant(s.node.inputs[1], self.work.opset)
            if w is None or w.ndim != 2:
                continue
            lab = s.labels
            u = self.an.unit[np.maximum(lab, 0)][lab >= 0]
            if units.intersection(u.tolist()):
                out.append(s)
        return out

    def grams(self, slices: Sequence[ConstSlice]) -> None:
        """Gram matrices (with a ones column) of the inputs of ``slices``' layers, computed once
        for all of them on the scan feeds (the original model)."""
        names = sorted({s.node.inputs[0].name for s in slices} - set(self._grams))
        if not names:
            return
        sess = make_session(self.model, outputs=names, truncate=True)
        ins = {i.name for i in sess.get_inputs()}
        acc: dict[str, np.ndarray] = {}
        for f in self.feeds:
            for name, x in zip(names, sess.run(names, {k: v for k, v in f.items() if k in ins})):
                x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
                x = np.concatenate([x, np.ones((len(x), 1))], axis=1)
                acc[name] = acc.get(name, 0) + x.T @ x
        self._grams.update(acc)

    def measure(self, removed: np.ndarray, consumers: Sequence[ConstSlice]) -> float:
        """Output distortion with the units ``removed`` gone and ``consumers`` refit."""
        an, work = self.an, self.work
        keep_unit = np.ones(an.n_elements + 1, dtype=bool)
        keep_unit[removed] = False
        keep_elem = keep_elements(an, keep_unit)
        saved: dict[tuple[int, int], tuple[gs.Node, gs.Tensor]] = {}
        for s in an.slices:
            saved.setdefault((id(s.node), s.index), (s.node, s.node.inputs[s.index]))
        bias_saved: list[tuple[gs.Node, int, gs.Tensor]] = []
        try:
            originals = {
                (id(s.node), s.index): constant(s.node.inputs[s.index], work.opset)
                for s in consumers
            }
            zero_pruned(work, an, keep_elem)
            rm = set(np.asarray(removed).tolist())
            for s in consumers:
                self._refit(s, originals[(id(s.node), s.index)], rm, bias_saved)
            sess = make_session(_runnable(work, self.io), "basic")
            outs = [sess.run(None, f) for f in self.feeds]
        finally:
            for node, index, t in reversed(bias_saved):
                node.inputs[index] = t
            for (_, index), (node, t) in saved.items():
                node.inputs[index] = t
        self.points += 1
        return _distortion(self.refs, outs)

    def _inverse(self, name: str, xtx: np.ndarray, bias: bool) -> np.ndarray:
        key = (name, bias)
        if key not in self._hinv:
            self._hinv[key] = obs_inverse(xtx if bias else xtx[:-1, :-1], self.damp)
        return self._hinv[key]

    def _refit(
        self,
        s: ConstSlice,
        w0: np.ndarray | None,
        removed: set[int],
        bias_saved: list[tuple[gs.Node, int, gs.Tensor]],
    ) -> None:
        if w0 is None:
            return
        node, opset = s.node, self.work.opset
        lab = s.labels
        units = np.where(lab >= 0, self.an.unit[np.maximum(lab, 0)], self.fixed_unit)
        pos = np.nonzero(np.isin(units, list(removed)))[0]
        if len(pos) == 0 or len(pos) == len(units):
            return
        xtx = self._grams.get(node.inputs[0].name)
        if xtx is None or len(xtx) != len(units) + 1:
            return
        w = np.moveaxis(w0.astype(np.float64), s.axis, 0)
        ba = bias_add(node, opset) if node.op == "MatMul" else None
        if ba is not None:
            add, bi = ba
            b = constant(add.inputs[bi], opset)
            assert b is not None
            sol = obs_update(
                self._inverse(node.inputs[0].name, xtx, True),
                np.vstack([w, b[None].astype(np.float64)]),
                pos,
            )
            bias_saved.append((add, bi, add.inputs[bi]))
            replace_input(add, bi, sol[-1].astype(b.dtype), "scan")
            new_w = sol[:-1]
        else:
            new_w = obs_update(self._inverse(node.inputs[0].name, xtx, False), w, pos)
        replace_input(node, 1, np.moveaxis(new_w, 0, s.axis).astype(w0.dtype), "scan")


def group_kind(grp: Group) -> str:
    """``heads``, ``neurons`` or ``channels`` (see :class:`GroupAllocation`)."""
    if any(p.kind in ("Conv", "ConvTranspose") for p in grp.producers):
        return "channels"
    return "heads" if len(grp.producers) > 1 else "neurons"


def allocate(
    model: Model,
    work: Model,
    an: Analysis,
    grps: Sequence[Group],
    scores: np.ndarray,
    node_macs: Mapping[str, int],
    calib: Sequence[Feeds],
    ratio: float,
    *,
    round_to: int | None = None,
    min_channels: int = 1,
    min_fraction: float = 0.0,
    scan_feeds: int = SCAN_FEEDS,
    scan_ratios: Sequence[float] = SCAN_RATIOS,
    progress: Progress | None = None,
) -> Allocation:
    """Split ``ratio`` of the prunable MACs across the free groups (see the module docstring).

    Args:
        model: the model as given (sessions run on it: dynamic dims as the caller has them).
        work: the analysed copy (input shapes fixed), whose constants ``an`` points at; its
            constants are changed during the scan and restored.
        an: the analysis of ``work``; ``grps`` its groups; ``scores`` the unit scores (the units
            removed inside a group are its least important, as ``select`` removes them).
        node_macs: MACs of every node of ``work``.
        calib: calibration feeds; the first ``scan_feeds`` are measured on.
        ratio: the fraction of the prunable MACs to remove, in [0, 1).
        round_to, min_channels, min_fraction: the floors of ``select``.
        scan_ratios: fractions of each group's width measured.
        progress: ``progress(done, total)`` after every scan point.

    Returns:
        The :class:`Allocation`; its ``ratios()`` go to ``select``.
    """
    free = [g for g in grps if not g.blocked]
    orders = [g.free[np.argsort(scores[g.free], kind="stable")] for g in free]
    mm = MacModel(an, free, orders, node_macs)
    maxes, allowed = [], []
    for g in free:
        n_fixed = g.width - len(g.free)
        floor = max(min_channels, int(np.ceil(min_fraction * g.width)), n_fixed, 1)
        mx = max(0, min(g.width - floor, len(g.free)))
        ks = allowed_counts(g.width, mx, round_to)
        maxes.append(int(ks.max()) if len(ks) else 0)
        allowed.append(ks)
    allocs = [
        GroupAllocation(
            g.name,
            group_kind(g),
            g.width,
            0,
            maxes[j],
            int(sum(mm.nodes[i].macs for i in mm.by_group[j])),
        )
        for j, g in enumerate(free)
    ]
    target = ratio * mm.prunable
    if ratio <= 0 or not free:
        return Allocation(ratio, mm.prunable, 0, 0.0, allocs, 0, True)
    # the counts to measure, per group
    plan: list[list[int]] = []
    for j, g in enumerate(free):
        ks = allowed[j]
        want = set()
        for r in scan_ratios:
            c = max(1, int(round(r * g.width)))
            if len(ks) > 1:
                nz = ks[ks > 0]
                want.add(int(nz[np.argmin(np.abs(nz - c))]))
        plan.append(sorted(want))
    total = sum(len(p) for p in plan)
    scan = SensitivityScan(model, work, an, calib[: max(scan_feeds, 1)])
    units_all = [set(o.tolist()) for o in orders]
    cons = [scan.consumers(units_all[j]) for j in range(len(free))]
    scan.grams([s for c in cons for s in c])
    done = 0
    curves: list[list[tuple[int, float]]] = []
    for j, ks_ in enumerate(plan):
        pts = []
        for c in ks_:
            d = scan.measure(orders[j][:c], cons[j])
            pts.append((c, d))
            done += 1
            if progress is not None:
                progress(done, total)
        ds: list[float] = np.maximum.accumulate([d for _, d in pts]).tolist() if pts else []
        curve = [(c, float(d)) for (c, _), d in zip(pts, ds)]
        curves.append(curve)
        allocs[j].curve = curve
        logger.debug("sensitivity %s: %s", free[j].name, curve)
    k, met = greedy_allocate(curves, allowed, mm, target)
    dsum = 0.0
    for j, a in enumerate(allocs):
        a.removed = int(k[j])
        pts = curves[j]
        a.distortion = float(
            np.interp(k[j], [0] + [p[0] for p in pts], [0.0] + [p[1] for p in pts])
        )
        dsum += a.distortion
    if not met:
        logger.warning(
            "prune-channels: %.1f%% of the prunable MACs requested, at most %.1f%% within the "
            "scanned counts (every group at its largest)",
            100 * ratio,
            100 * mm.saved(k) / max(mm.prunable, 1),
        )
    return Allocation(ratio, mm.prunable, int(round(mm.saved(k))), dsum, allocs, scan.points, met)
