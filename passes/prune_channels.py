"""Structured channel pruning: remove whole output channels of weight layers, with recovery.

For a ratio ``r`` (``scope="group"``, the default) every dependency group (see
:mod:`graphopt.algorithms.prune.analysis`: the producers whose channels are coupled through
BatchNormalization, depthwise convs, residual Add/Mul, SE blocks, Concat/Split/Slice, Resize,
Flatten/Reshape into Gemm/MatMul, ...) loses its ``round(r * width)`` least important free channels,
never going below ``max(min_channels, min_fraction * width)`` and, with ``round_to=N``, keeping a
multiple of ``N`` channels (CPU kernels work in channel blocks). With ``scope="global"`` importances
are normalized by their group's mean and the least important ``r`` of all channels of the model go,
so groups lose different fractions. With ``scope="auto"`` the ratio is the fraction of the
*prunable MACs* removed, split across groups by a sensitivity scan on the calibration data
(:mod:`graphopt.algorithms.prune.allocate`: per group, the output distortion after removing a few
counts of its units with the readers refit; then a greedy knapsack by distortion per MAC saved);
``scope=None`` picks ``auto`` when calibration data is given, the ratio is one number and no free
group is convolutional (transformers, MLPs), else ``group``.

Importance of a channel (summed over the coupled producers, each normalized by its layer mean):

* ``l1`` / ``l2``: ``||W[c]||_1`` / ``||W[c]||_2`` of the producer's output-channel weight slice;
* ``bn``: ``|gamma_c|`` of the BatchNormalization that scales the channel (network slimming); groups
  with no BN fall back to ``l1``;
* ``activation``: ``mean |y_c|`` of the producer's output on calibration data (onnxruntime with the
  producers' outputs exposed);
* ``output``: the error a unit's removal leaves in the outputs of the MatMul/Gemm layers that read
  it once they are refit (Optimal Brain Surgeon cost on calibration data; attention heads: context
  columns and output-projection rows; FFN neurons: rows of the second MatMul); the criterion for
  transformers.

Transformers (:mod:`graphopt.algorithms.prune.heads`): attention heads (Q/K/V columns, biases and
output-projection rows, coupled through the head Reshape/Transpose; the head count in the Reshape
target rewritten) and FFN intermediate neurons are units; the residual stream stays blocked.

Removing channel ``c`` slices ``W[c]`` (and bias, BN parameters, per-channel constants) of its
producers and ``W[:, c]`` of its consumers, and rewrites hard-coded widths (Reshape targets, Split
sizes, Slice bounds, depthwise ``group``). This is exact when channel ``c`` is zero; otherwise the
recovery step (:mod:`graphopt.algorithms.prune.recover`, least squares on calibration data) refits
the consumer layers to the original outputs.

Decisions (documented in the README): pruning runs on the model as loaded, *before* the fusion
pipeline, so BatchNormalization is still there for the ``bn`` criterion and recovery fits a conv's
pre-BN output; hard-coded channel counts in shape computations (a constant Reshape target, or a
constant piece of a ``Concat``-built shape vector as in the PP-OCR classifier head) are rewritten,
so the pass also works after constant folding. Dynamic input dims are fixed to 1 for the analysis
and restored afterwards.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.algorithms.prune import (
    CALIB_CRITERIA,
    CRITERIA,
    Analysis,
    Group,
    analyze,
    apply_pruning,
    group_width,
    groups,
    importance,
    keep_elements,
    kept_positions,
    prunable_macs,
    recover,
    select,
    unit_scores,
    validate_ratio,
)
from graphopt.algorithms.prune.allocate import SCAN_FEEDS, Allocation, allocate, group_kind
from graphopt.core.cost import model_cost
from graphopt.core.errors import CalibrationError, GraphoptError, OptionError
from graphopt.core.feeds import Feeds, open_calibration
from graphopt.core.model import Model
from graphopt.core.pass_manager import Pass, PassResult, register_pass
from graphopt.core.shapes import fix_input_shapes, infer_shapes, is_static

logger = logging.getLogger(__name__)


@dataclass
class GroupReport:
    """One dependency group in the report."""

    name: str
    producers: list[str]
    width_before: int
    width_after: int
    blocked: bool
    reasons: list[str] = field(default_factory=list)


@dataclass
class PruneReport:
    """What ``prune-channels`` did."""

    criterion: str
    ratio: float | dict[str, float]
    round_to: int | None
    groups: list[GroupReport]
    macs_before: int
    macs_after: int
    prunable_macs: int
    recovery: dict[str, int] = field(default_factory=dict)
    scope: str = "group"
    allocation: Allocation | None = None

    @property
    def prunable_fraction(self) -> float:
        return self.prunable_macs / self.macs_before if self.macs_before else 0.0

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["prunable_fraction"] = self.prunable_fraction
        d["allocation"] = None if self.allocation is None else self.allocation.to_json()
        return d


def materialize_calib(calib: Any, model: Model, limit: int = 128) -> list[Feeds]:
    """Feed dicts from any calibration source, split to batch 1 when the model's batch is 1."""
    if calib is None:
        return []
    if isinstance(calib, list) and all(isinstance(c, Mapping) for c in calib):
        feeds = [dict(c) for c in calib]
    else:
        batch1 = any(t.shape and t.shape[0] == 1 for t in model.graph.inputs)
        feeds = list(open_calibration(calib, model, batch_size=1 if batch1 else 16, limit=limit))
    out: list[Feeds] = []
    for f in feeds:
        out.append({k: np.asarray(v) for k, v in f.items()})
    return out[:limit]


def group_reports(an: Analysis, grps: Iterable[Group], keep_unit: np.ndarray) -> list[GroupReport]:
    out = []
    for g in grps:
        before, after = group_width(an, g, keep_unit)
        out.append(
            GroupReport(
                g.name,
                [p.node.name for p in g.producers],
                before,
                after,
                g.blocked,
                list(g.reasons),
            )
        )
    return out


def _node_macs(model: Model) -> dict[str, int]:
    return {nc.name: nc.macs for nc in model_cost(model).nodes}


#: ``scope`` values: the ratio per group (``group``), ranked over the whole model (``global``),
#: split by sensitivity (``auto``), or chosen from the model (None; see the module docstring)
SCOPES = ("group", "global", "auto", None)


@register_pass
class PruneChannelsPass(Pass):
    """Remove the least important output channels of every dependency group (structured)."""

    name = "prune-channels"
    lossy = True

    def __init__(
        self,
        ratio: float | dict[str, float] = 0.3,
        criterion: str = "l1",
        round_to: int | None = None,
        min_channels: int = 1,
        min_fraction: float = 0.0,
        calib: Any = None,
        recover: bool = True,
        positions: int = 256,
        ridge: float = 1e-3,
        calib_limit: int = 128,
        scope: str | None = "group",
        input_shapes: Mapping[str, tuple[int, ...]] | None = None,
        scan_feeds: int = SCAN_FEEDS,
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        if criterion not in CRITERIA:
            raise GraphoptError(
                f"unknown pruning criterion '{criterion}' (use one of {', '.join(CRITERIA)})"
            )
        ratio = validate_ratio(ratio)
        if scope not in SCOPES:
            raise OptionError(
                f"pruning scope must be one of {', '.join(str(x) for x in SCOPES)}, got {scope!r}"
            )
        if scope == "auto" and isinstance(ratio, dict):
            raise OptionError(
                "scope 'auto' splits one ratio (a fraction of the prunable MACs) across the "
                "groups itself: give one number, or per-group ratios with scope 'group'"
            )
        if round_to is not None and round_to < 1:
            raise GraphoptError("--round-to must be a positive integer")
        self.ratio = ratio
        self.scope = scope
        self.criterion = criterion
        self.round_to = round_to
        self.min_channels = int(min_channels)
        self.min_fraction = float(min_fraction)
        self.calib = calib
        self.recover = recover
        self.positions = positions
        self.ridge = ridge
        self.calib_limit = calib_limit
        self.input_shapes = dict(input_shapes or {})
        self.scan_feeds = int(scan_feeds)
        self.progress = progress
        self.report: PruneReport | None = None

    def resolve_scope(self, grps: Iterable[Group], calib: list[Feeds]) -> str:
        """The scope used: the one asked for, or for ``None``: ``auto`` when calibration data is
        given, the ratio is one number and no free group is convolutional, else ``group``."""
        if self.scope is not None:
            if self.scope == "auto" and not calib:
                raise CalibrationError(
                    "scope 'auto' measures each group's sensitivity on calibration data: give "
                    "--calib DATA, or use --scope group (the same ratio in every group)"
                )
            return self.scope
        if not calib or isinstance(self.ratio, dict):
            return "group"
        free = [g for g in grps if not g.blocked]
        if any(group_kind(g) == "channels" for g in free):
            return "group"
        return "auto"

    def call(self, model: Model) -> PassResult:
        work = model.clone()
        dyn = {t.name: (list(t.shape) if t.shape is not None else None) for t in work.graph.inputs}
        out_shapes = {
            t.name: (list(t.shape) if t.shape is not None else None) for t in work.graph.outputs
        }
        fixed = dict(self.input_shapes)
        for t in work.graph.inputs:
            if t.name not in fixed and t.shape is not None and not is_static(t.shape):
                fixed[t.name] = tuple(
                    int(d) if isinstance(d, (int, np.integer)) and d > 0 else 1 for d in t.shape
                )
        if fixed:
            fix_input_shapes(work, fixed)
        infer_shapes(work)
        an = analyze(work)
        grps = groups(an)
        calib = (
            materialize_calib(self.calib, model, self.calib_limit)
            if (self.criterion in CALIB_CRITERIA or self.recover or self.scope in ("auto", None))
            else []
        )
        scope = self.resolve_scope(grps, calib)
        scores = unit_scores(an, importance(model, an, self.criterion, calib))
        nm = _node_macs(work)
        alloc: Allocation | None = None
        ratio: float | dict[str, float] = self.ratio
        if scope == "auto":
            assert not isinstance(self.ratio, dict)
            alloc = allocate(
                model,
                work,
                an,
                grps,
                scores,
                nm,
                calib,
                float(self.ratio),
                round_to=self.round_to,
                min_channels=self.min_channels,
                min_fraction=self.min_fraction,
                scan_feeds=self.scan_feeds,
                progress=self.progress,
            )
            ratio = alloc.ratios()
        keep_unit = select(
            an,
            grps,
            scores,
            ratio,
            self.round_to,
            self.min_channels,
            self.min_fraction,
            "group" if scope == "auto" else scope,
        )
        keep_elem = keep_elements(an, keep_unit)
        pr, total = prunable_macs(an, nm)
        reports = group_reports(an, grps, keep_unit)
        stats: dict[str, Any] = {
            "groups": len(grps),
            "groups_blocked": sum(g.blocked for g in grps),
            "groups_pruned": sum(r.width_after < r.width_before for r in reports),
            "channels_removed": int((~keep_elem).sum()),
            "macs_before": total,
            "prunable_macs_fraction": round(pr / total, 4) if total else 0.0,
        }
        if alloc is not None:
            stats["scan_points"] = alloc.points
            stats["allocation_distortion"] = round(alloc.distortion, 6)
        if keep_elem.all():
            self.report = PruneReport(
                self.criterion,
                self.ratio,
                self.round_to,
                reports,
                total,
                total,
                pr,
                scope=scope,
                allocation=alloc,
            )
            stats["macs_after"] = total
            return PassResult(model, False, stats)
        changed = {
            name
            for name, (_, lab) in an.labels.items()
            if len(kept_positions(lab, keep_elem)) < len(lab)
        }
        kept_out = {
            p.node.name: kept_positions(np.arange(p.start, p.start + p.size), keep_elem)
            for p in an.producers
        }
        stats.update(apply_pruning(work, an, keep_elem))
        infer_shapes(work)
        macs_after = sum(_node_macs(work).values())
        if fixed:  # give the caller's dynamic dims back
            for t in work.graph.inputs:
                if dyn.get(t.name) is not None:
                    t.shape = dyn[t.name]
            for t in work.graph.outputs:
                if out_shapes.get(t.name) is not None:
                    t.shape = out_shapes[t.name]
            io = {t.name for t in work.graph.inputs} | {t.name for t in work.graph.outputs}
            for name, t in work.graph.tensors().items():
                if name not in io and isinstance(t, gs.Variable):
                    t.shape = None
        recovery: dict[str, int] = {}
        if self.recover and calib:
            recovery = recover(
                model.clone(), work, calib, kept_out, changed, self.positions, self.ridge
            )
            stats.update(recovery)
        elif self.recover:
            logger.info("prune-channels: no calibration data, recovery skipped")
        stats["macs_after"] = macs_after
        model.graph = work.graph
        self.report = PruneReport(
            self.criterion,
            self.ratio,
            self.round_to,
            reports,
            total,
            macs_after,
            pr,
            recovery,
            scope=scope,
            allocation=alloc,
        )
        return PassResult(model, True, stats)
