"""Python API for pruning: ``prune`` (structured channels, with recovery) and ``prune_scan``.

    import graphopt
    out = graphopt.prune("model.onnx", 0.3, calib="calib.npz", round_to=8)
    graphopt.save(out.model, "pruned.onnx"); print(out.report.macs_after / out.report.macs_before)

Fidelity is measured against the original on evaluation feeds (the calibration data, or seeded
random inputs): per output SQNR and cosine, and top-1 agreement for outputs that look like class
scores (rank 2 or 3 with a last axis of at least 2 classes).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from graphopt.core.feeds import random_feeds
from graphopt.core.loader import load
from graphopt.core.model import Model
from graphopt.core.session import make_session
from graphopt.core.shapes import fix_input_shapes
from graphopt.core.verify import cosine, sqnr_db
from graphopt.passes.prune_channels import PruneChannelsPass, materialize_calib

logger = logging.getLogger(__name__)

Feeds = dict[str, np.ndarray]


@dataclass
class OutputFidelity:
    """Agreement of one output with the original."""

    name: str
    sqnr_db: float
    cosine: float
    top1_agreement: float | None = None
    max_abs_err: float = 0.0


@dataclass
class PruneOutcome:
    """Result of :func:`prune`."""

    model: Model
    report: Any  # passes.prune_channels.PruneReport
    stats: dict[str, Any]
    fidelity: list[OutputFidelity] = field(default_factory=list)
    #: True when fidelity was measured on calibration batches kept out of recovery
    held_out: bool = False

    @property
    def macs_ratio(self) -> float:
        r = self.report
        return r.macs_after / r.macs_before if r.macs_before else 1.0

    def to_json(self) -> dict[str, Any]:
        def num(v: float | None) -> Any:
            if v is None:
                return None
            return "inf" if v == math.inf else float(v)

        return {
            "stats": self.stats,
            **self.report.to_json(),
            "fidelity": {f.name: {"sqnr_db": num(f.sqnr_db), "cosine": num(f.cosine),
                                  "max_abs_err": num(f.max_abs_err),
                                  "top1_agreement": num(f.top1_agreement)}
                         for f in self.fidelity},
        }


def _as_model(model: Model | str | os.PathLike[str]) -> Model:
    return model.clone() if isinstance(model, Model) else load(model)


def looks_like_scores(arr: np.ndarray) -> bool:
    """Class scores: rank 2 ``[N, K]`` or 3 ``[N, T, K]`` with ``K >= 2``."""
    return arr.ndim in (2, 3) and arr.shape[-1] >= 2


def fidelity(original: Model, pruned: Model, feeds: Sequence[Mapping[str, np.ndarray]]
             ) -> list[OutputFidelity]:
    """SQNR, cosine and top-1 agreement of ``pruned`` against ``original`` over ``feeds``."""
    s0, s1 = make_session(original, "basic"), make_session(pruned, "basic")
    names = [o.name for o in s0.get_outputs()]
    ins = {i.name for i in s0.get_inputs()}
    refs: dict[str, list[np.ndarray]] = {n: [] for n in names}
    outs: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for f in feeds:
        f = {k: v for k, v in f.items() if k in ins}
        for n, a, b in zip(names, s0.run(names, f), s1.run(names, f)):
            refs[n].append(np.asarray(a))
            outs[n].append(np.asarray(b))
    res = []
    for n in names:
        a = np.concatenate([r.reshape(-1) for r in refs[n]])
        b = np.concatenate([r.reshape(-1) for r in outs[n]])
        agree = None
        if all(looks_like_scores(r) for r in refs[n]):
            hits = sum(int((r.argmax(-1) == o.argmax(-1)).sum()) for r, o in zip(refs[n], outs[n]))
            total = sum(int(np.prod(r.shape[:-1])) for r in refs[n])
            agree = hits / max(total, 1)
        err = float(np.max(np.abs(a.astype(np.float64) - b))) if a.size else 0.0
        res.append(OutputFidelity(n, sqnr_db(a, b), cosine(a, b), agree, err))
    return res


def _eval_feeds(model: Model, calib: list[Feeds], input_shapes: Mapping[str, Sequence[int]] | None,
                n: int = 8) -> list[Feeds]:
    if calib:
        return calib[:max(n, 1) * 4]
    probe = model.clone()
    if input_shapes:
        fix_input_shapes(probe, input_shapes)
    return [random_feeds(probe, seed=s) for s in range(n)]


def prune(model: Model | str | os.PathLike[str], ratio: float | dict[str, float],
          calib: Any = None, criterion: str = "l1", round_to: int | None = None,
          recover: bool = True, *, input_shapes: Mapping[str, Sequence[int]] | None = None,
          min_channels: int = 1, min_fraction: float = 0.0, calib_limit: int = 128,
          measure: bool = True, holdout: float = 0.25, **options: Any) -> PruneOutcome:
    """Structured channel pruning (pass ``prune-channels``) with least-squares recovery.

    Args:
        model: a :class:`Model` (not changed) or a path.
        ratio: fraction of channels removed from every dependency group, or
            ``{producer node name: ratio, "*": default}`` per layer.
        calib: calibration data (path, iterable of feed dicts) for recovery and the
            ``activation`` criterion; without it recovery is skipped.
        criterion: ``l1``, ``l2``, ``bn`` or ``activation``.
        round_to: keep widths multiples of this (e.g. 8 for CPU kernels).
        recover: refit consumer layers by least squares on ``calib``.
        input_shapes: fix dynamic input dims (``{"x": (1, 3, 320, 320)}``).
        min_channels: never keep fewer channels in a group.
        min_fraction: never keep less than this fraction of a group.
        calib_limit: at most this many calibration samples are used.
        measure: compute fidelity against the original.
        holdout: with ``measure`` and at least 4 calibration batches, this last fraction of them
            is kept out of recovery and used to measure fidelity (else: seeded random inputs, or
            the calibration data itself when there is too little of it).

    Returns:
        :class:`PruneOutcome` with the pruned model, the per-group report and the fidelity.
    """
    original = _as_model(model)
    if input_shapes:
        fix_input_shapes(original, input_shapes)
    feeds = materialize_calib(calib, original, calib_limit) if calib is not None else []
    held: list[Feeds] = []
    if measure and holdout > 0 and len(feeds) >= 4:
        k = max(1, int(round(len(feeds) * holdout)))
        feeds, held = feeds[:-k], feeds[-k:]
    p = PruneChannelsPass(ratio=ratio, criterion=criterion, round_to=round_to,
                          min_channels=min_channels, min_fraction=min_fraction,
                          calib=feeds or None, recover=recover, calib_limit=calib_limit,
                          **options)
    work = original.clone()
    result = p(work)
    out = PruneOutcome(result.model, p.report, dict(result.stats))
    if measure:
        out.held_out = bool(held)
        out.fidelity = fidelity(original, result.model,
                                held or _eval_feeds(original, feeds, input_shapes))
    return out


@dataclass
class ScanPoint:
    """One ratio of :func:`prune_scan`."""

    ratio: float
    macs_ratio: float
    fidelity: list[OutputFidelity]

    @property
    def main(self) -> OutputFidelity:
        return self.fidelity[0]


def prune_scan(model: Model | str | os.PathLike[str], ratios: Sequence[float] = (
        0.1, 0.2, 0.3, 0.4, 0.5), **kwargs: Any) -> list[ScanPoint]:
    """Prune at several ratios (same options as :func:`prune`) and measure MACs and fidelity."""
    base = _as_model(model)
    pts = []
    for r in ratios:
        out = prune(base, r, **kwargs)
        pts.append(ScanPoint(r, out.macs_ratio, out.fidelity))
    return pts
