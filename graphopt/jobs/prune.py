"""The prune jobs (``graphopt prune``): structured channel pruning with least-squares recovery
(:func:`prune`), and a scan of several ratios measuring MACs against fidelity (:func:`prune_scan`).

Recovery: ``recover=True`` (``"least-squares"``) refits the consumer layers by least squares on the
calibration data; ``recover="distill"`` then fine-tunes the whole pruned model against the original
on the same unlabeled data (knowledge distillation with torch, :mod:`graphopt.algorithms.train`,
the ``graphopt[train]`` extra) within ``steps`` / ``time_budget``, watching the held-out fidelity.

    import graphopt
    out = graphopt.prune("model.onnx", 0.3, calib="calib.npz", round_to=8, output="pruned.onnx")
    print(out.macs_ratio, out.to_json()["verify"])

Fidelity is measured against the original on evaluation feeds (the calibration data, or seeded
random inputs): per output SQNR and cosine, and top-1 agreement for outputs that look like class
scores (rank 2 or 3 with a last axis of at least 2 classes).

The check decides: a pruned model is written only when every output reaches the SQNR floor
(default :data:`DEFAULT_MIN_SQNR_DB`, pooled and for the median sample), the cosine it implies,
and NaN/inf match exactly. Pruning without recovery usually misses it (that model is a starting
point for fine-tuning): give ``calib`` for the least-squares recovery, a lower ratio, or write it
anyway with ``force`` / ``min_sqnr=0`` (with a warning).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from graphopt.core.errors import OptionError
from graphopt.core.feeds import Feeds, feed_list, random_feeds
from graphopt.core.model import Model
from graphopt.core.output import atomic_path
from graphopt.core.session import make_session
from graphopt.core.shapes import check_run_size, fix_input_shapes
from graphopt.core.verify import VerifyReport, compare_samples
from graphopt.jobs.common import (
    ModelLike,
    ModelNumbers,
    TransformResult,
    as_model,
    decide,
    jsonable,
    lossy_floors,
    output_paths,
    path_or_none,
    source_path,
    write_outputs,
)
from graphopt.jobs.report import write_report
from graphopt.passes.prune_channels import PruneChannelsPass, PruneReport, materialize_calib

logger = logging.getLogger(__name__)

#: default floor of the check (dB, every output against the original): as the recipes' prune step;
#: least-squares recovery on calibration data reaches it at moderate ratios (digits fixture at 0.3:
#: 13.5 dB, top-1 agreement 1.0), pruning without recovery does not (1-3 dB)
DEFAULT_MIN_SQNR_DB = 10.0
#: with ``recover="distill"`` the least-squares start (and a data criterion) uses at most this many
#: calibration feeds: a few dozen samples fit it and its cost grows with each, while the
#: distillation after it trains on all of them (the more unlabeled inputs, the less it overfits)
DISTILL_LSQ_FEEDS = 128


@dataclass
class OutputFidelity:
    """Agreement of one output with the original."""

    name: str
    sqnr_db: float
    cosine: float
    top1_agreement: float | None = None
    max_abs_err: float = 0.0


@dataclass(kw_only=True)
class PruneResult(TransformResult):
    """What :func:`prune` did: the before/after block, the per-group report and the fidelity.

    Attributes:
        report: the ``prune-channels`` report (groups, widths, MACs before and after); the HTML
            report written is ``report_path``.
        stats: the pass's counters.
        fidelity: per output, against the original (SQNR, cosine, top-1 agreement).
        held_out: True when fidelity was measured on calibration batches kept out of recovery.
        scan: with ``scan``: the points measured before pruning.
        plot: the scan plot written (None when not asked for).
    """

    report: PruneReport
    stats: dict[str, Any]
    fidelity: list[OutputFidelity] = field(default_factory=list)
    held_out: bool = False
    scan: list[ScanPoint] | None = None
    plot: Path | None = None
    training: Any = None  # recover="distill": graphopt.algorithms.train.recover.TrainReport

    @property
    def macs_ratio(self) -> float:
        r = self.report
        return r.macs_after / r.macs_before if r.macs_before else 1.0

    # MACs come from the pass, which counts them with the input shapes fixed (the pruned model
    # gets the caller's dynamic dims back, where a cost count would see unknown sizes)
    @cached_property
    def before(self) -> ModelNumbers:
        return replace(ModelNumbers.of(self.kept_original()), macs=int(self.report.macs_before))

    @cached_property
    def after(self) -> ModelNumbers:
        return replace(ModelNumbers.of(self.model), macs=int(self.report.macs_after))

    def pass_stats(self) -> dict[str, dict[str, Any]]:
        return {"prune-channels": self.stats}

    @property
    def recovery(self) -> str:
        """``none``, ``least-squares`` or ``distill`` (what was done, not what was asked)."""
        if self.training is not None:
            return "distill"
        return "least-squares" if self.stats.get("layers_refit") else "none"

    def verify_json(self) -> dict[str, Any]:
        return {
            f.name: {"max_abs_err": f.max_abs_err, "cosine": f.cosine, "sqnr_db": f.sqnr_db}
            for f in self.fidelity
        }

    def to_json(self) -> dict[str, Any]:
        """The ``graphopt prune --json`` object."""
        rep = self.report
        d: dict[str, Any] = {
            **self.change_json(),
            "prunable_macs_fraction": rep.prunable_fraction,
            "fidelity": fidelity_json(self.fidelity),
            "held_out": self.held_out,
            "recovery": self.recovery,
            "scope": rep.scope,
            "allocation": None if rep.allocation is None else rep.allocation.to_json(),
            "training": None if self.training is None else self.training.to_json(),
            "groups": [
                {
                    "name": g.name,
                    "producers": g.producers,
                    "width_before": g.width_before,
                    "width_after": g.width_after,
                    "blocked": g.blocked,
                    "reasons": g.reasons,
                }
                for g in rep.groups
            ],
        }
        if self.scan is not None:
            d["scan"] = scan_json(self.scan)
            d["plot"] = path_or_none(self.plot)
        return jsonable(d)  # type: ignore[no-any-return]


def fidelity_json(fid: Sequence[OutputFidelity]) -> dict[str, dict[str, Any]]:
    return {
        f.name: {
            "sqnr_db": f.sqnr_db,
            "cosine": f.cosine,
            "max_abs_err": f.max_abs_err,
            "top1_agreement": f.top1_agreement,
        }
        for f in fid
    }


def looks_like_scores(arr: np.ndarray) -> bool:
    """Class scores: rank 2 ``[N, K]`` or 3 ``[N, T, K]`` with ``K >= 2``."""
    return arr.ndim in (2, 3) and arr.shape[-1] >= 2


def fidelity(
    original: Model, pruned: Model, feeds: Sequence[Mapping[str, np.ndarray]]
) -> list[OutputFidelity]:
    """SQNR, cosine and top-1 agreement of ``pruned`` against ``original`` over ``feeds``."""
    return fidelity_check(original, pruned, feeds)[0]


def fidelity_check(
    original: Model,
    pruned: Model,
    feeds: Sequence[Mapping[str, np.ndarray]],
    min_sqnr_db: float | None = None,
    min_cosine: float | None = None,
) -> tuple[list[OutputFidelity], VerifyReport]:
    """:func:`fidelity`, and the check against the floors (NaN/inf compared exactly)."""
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
    lossy = -np.inf if min_sqnr_db is None else min_sqnr_db
    report = VerifyReport(min_sqnr_db=min_sqnr_db, min_cosine=min_cosine, samples=len(feeds))
    res = []
    for n in names:
        d = compare_samples(n, refs[n], outs[n], min_sqnr_db=lossy, min_cosine=min_cosine)
        report.outputs.append(d)
        agree = None
        if all(looks_like_scores(r) for r in refs[n]):
            hits = sum(int((r.argmax(-1) == o.argmax(-1)).sum()) for r, o in zip(refs[n], outs[n]))
            total = sum(int(np.prod(r.shape[:-1])) for r in refs[n])
            agree = hits / max(total, 1)
        res.append(OutputFidelity(n, d.sqnr_db, d.cosine, agree, d.max_abs_err))
    return res, report


RECOVER_MODES = ("none", "least-squares", "distill")


def recover_mode(recover: bool | str | None) -> str:
    """``none``, ``least-squares`` or ``distill`` from the ``recover`` argument."""
    if recover is True or recover in ("least-squares", "lsq"):
        return "least-squares"
    if recover is False or recover in ("none", None):
        return "none"
    if recover == "distill":
        return "distill"
    raise OptionError(f"bad recovery '{recover}': one of {', '.join(RECOVER_MODES)}")


def _eval_feeds(
    model: Model, calib: list[Feeds], input_shapes: Mapping[str, Sequence[int]] | None, n: int = 8
) -> list[Feeds]:
    if calib:
        return calib[: max(n, 1) * 4]
    probe = model.clone()
    if input_shapes:
        fix_input_shapes(probe, input_shapes)
    return [random_feeds(probe, seed=s, draw=s) for s in range(n)]  # both draws of dynamic dims


def prune(
    model: ModelLike,
    ratio: float | dict[str, float],
    calib: Any = None,
    criterion: str = "l1",
    round_to: int | None = None,
    recover: bool | str = True,
    *,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    min_channels: int = 1,
    min_fraction: float = 0.0,
    calib_limit: int = 128,
    measure: bool = True,
    holdout: float = 0.25,
    steps: int = 300,
    time_budget: float | None = None,
    target_sqnr: float | None = None,
    train_progress: Any = None,
    threads: int | None = None,
    output: str | os.PathLike[str] | None = None,
    report: str | os.PathLike[str] | None = None,
    scan: Sequence[float] | None = None,
    plot: str | os.PathLike[str] | None = None,
    min_sqnr: float | None = None,
    min_cosine: float | None = None,
    force: bool = False,
    feeds: Any = None,
    scope: str | None = None,
    scan_progress: Any = None,
    **options: Any,
) -> PruneResult:
    """The prune job: structured channel pruning (pass ``prune-channels``) with least-squares
    recovery, fidelity against the original, and the pruned model written.

    Args:
        model: a :class:`Model` (not changed) or the path of an ONNX file (never written).
        ratio: with ``scope="group"``: fraction of channels removed from every dependency group,
            or ``{producer node name: ratio, "*": default}`` per layer; with ``scope="auto"``:
            fraction of the prunable MACs removed, split across the groups by a sensitivity scan
            on ``calib`` (:mod:`graphopt.algorithms.prune.allocate`).
        calib: calibration data (path, iterable of feed dicts) for recovery and the
            ``activation`` criterion; without it recovery is skipped.
        criterion: ``l1``, ``l2``, ``bn``, ``activation`` or ``output`` (needs ``calib``).
        round_to: keep widths multiples of this (e.g. 8 for CPU kernels).
        recover: ``True`` / ``"least-squares"``: refit consumer layers by least squares on
            ``calib``; ``"distill"``: then fine-tune the pruned model against the original on
            ``calib`` (needs torch: ``graphopt[train]``); ``False`` / ``"none"``: no recovery.
        input_shapes: fix dynamic input dims (``{"x": (1, 3, 320, 320)}``).
        min_channels: never keep fewer channels in a group.
        min_fraction: never keep less than this fraction of a group.
        calib_limit: at most this many calibration samples are used.
        measure: compute fidelity against the original.
        holdout: with ``measure`` and at least 4 calibration batches, this last fraction of them
            is kept out of recovery and used to measure fidelity (else: seeded random inputs, or
            the calibration data itself when there is too little of it).
        steps: with ``recover="distill"``: Adam steps (16 samples each).
        time_budget: with ``recover="distill"``: stop training after this many seconds.
        target_sqnr: with ``recover="distill"``: stop once every output's held-out SQNR
            against the original reaches this (dB).
        train_progress: ``train_progress(step, steps, loss, held_out_sqnr_db_or_None)``.
        threads: torch threads while training (default: torch's).
        output: write the pruned model here (atomically).
        report: write a self-contained HTML report here (with the scan when ``scan`` is given).
        scan: also prune at these ratios first and measure MACs against fidelity (``scan``).
        plot: with ``scan``: draw MACs against fidelity into this PNG.
        min_sqnr: the check's SQNR floor (dB; default :data:`DEFAULT_MIN_SQNR_DB`; 0: none).
        min_cosine: the check's cosine floor (default: implied by ``min_sqnr``).
        force: write the pruned model even when it fails the check (with a warning).
        feeds: judge fidelity on these inputs (``--feeds``: a path in the ``--calib`` formats,
            a feed dict or an iterable of them) instead of held-out calibration samples.
        scope: ``group`` (the same ratio in every group), ``global`` (channels ranked over the
            model), ``auto`` (the sensitivity allocation; needs ``calib``) or None: ``auto`` when
            ``calib`` is given, ``ratio`` is one number and no prunable group is convolutional,
            else ``group`` (the report's ``scope`` says which).
        scan_progress: with ``auto``: ``scan_progress(done, total)`` after every scan point.

    Returns:
        A :class:`PruneResult`; ``to_json()`` is what ``graphopt prune --json`` prints.

    Raises:
        VerificationError: the pruned model failed its check and ``output``, ``report`` or
            ``plot`` was given (nothing is written), unless ``force``.
    """
    t0 = time.perf_counter()
    mode = recover_mode(recover)
    training: dict[str, Any] | None = None
    if mode == "distill":
        from graphopt.algorithms.train import require

        require("--recover distill")
        if calib is None:
            raise OptionError(
                "--recover distill trains on unlabeled inputs: give --calib DATA (the more "
                "samples, the better)"
            )
        if steps < 1 or (time_budget is not None and time_budget <= 0):
            raise OptionError("--steps and --time-budget must be positive")
        training = dict(
            steps=steps,
            time_budget=time_budget,
            target_sqnr=target_sqnr,
            progress=train_progress,
            threads=threads,
        )
    recover = mode != "none"
    out_path, report_path, plot_path = output_paths(
        model, output, report, plot if scan is not None else None, inputs=[calib, feeds]
    )
    writing = out_path is not None or report_path is not None or plot_path is not None
    floors = lossy_floors(min_sqnr, min_cosine, DEFAULT_MIN_SQNR_DB)
    measure = measure or writing  # nothing is written unchecked
    opts: dict[str, Any] = dict(
        calib=calib,
        criterion=criterion,
        round_to=round_to,
        recover=recover,
        input_shapes=input_shapes,
        min_channels=min_channels,
        min_fraction=min_fraction,
        calib_limit=calib_limit,
        holdout=holdout,
        eval_feeds=feeds,
        scope=scope,
        progress=scan_progress,
        **options,
    )
    # the pass checks its options (ratio in [0, 1), criterion, ...) before any work
    PruneChannelsPass(
        ratio=ratio,
        criterion=criterion,
        round_to=round_to,
        min_channels=min_channels,
        min_fraction=min_fraction,
        scope=scope,
        **options,
    )
    source = as_model(model, tensors_only="prune")
    points = (
        None
        if scan is None
        else [_point(r, _prune_once(source, r, measure=True, **opts)) for r in scan]
    )
    res = _prune_once(source, ratio, measure=measure, floors=floors, training=training, **opts)
    res.input = source_path(model)
    decide(
        res.verify,
        what="the pruned model",
        judged_on=(
            f"{res.verify.samples} samples of --feeds"
            if feeds is not None
            else f"{res.verify.samples} held-out calibration samples"
            if res.held_out
            else f"{res.verify.samples} {'calibration' if calib is not None else 'random'} inputs"
        )
        if res.verify is not None
        else "",
        advice=(
            "Lower --ratio, "
            + ("" if calib is not None and recover else "give --calib DATA for recovery, ")
            + "or write it anyway with --force or --min-sqnr 0 (e.g. to fine-tune it)"
        ),
        force=force,
        writing=writing,
    )
    res.scan = points
    if plot_path is not None and res.scan is not None:
        res.plot = plot_scan(
            res.scan,
            plot_path,
            title=_scan_title(res.input, criterion, recover and calib is not None),
        )
    write_outputs(res, out_path, report_path, "graphopt prune:", prune_scan=res.scan)
    res.seconds = time.perf_counter() - t0
    return res


def _prune_once(
    model: Model,
    ratio: float | dict[str, float],
    *,
    calib: Any,
    criterion: str,
    round_to: int | None,
    recover: bool,
    input_shapes: Mapping[str, Sequence[int]] | None,
    min_channels: int,
    min_fraction: float,
    calib_limit: int,
    measure: bool,
    holdout: float,
    floors: tuple[float | None, float | None] = (None, None),
    eval_feeds: Any = None,
    training: dict[str, Any] | None = None,
    **options: Any,
) -> PruneResult:
    """Prune a copy of ``model`` once and measure its fidelity (checked against ``floors``)."""
    original = model.clone()
    if input_shapes:
        fix_input_shapes(original, input_shapes)
    check_run_size(original, infer=True)
    feeds = materialize_calib(calib, original, calib_limit) if calib is not None else []
    held: list[Feeds] = []
    if measure and holdout > 0 and len(feeds) >= 4:
        k = max(1, int(round(len(feeds) * holdout)))
        feeds, held = feeds[:-k], feeds[-k:]
    p = PruneChannelsPass(
        ratio=ratio,
        criterion=criterion,
        round_to=round_to,
        min_channels=min_channels,
        min_fraction=min_fraction,
        calib=feeds or None,
        recover=recover,
        calib_limit=calib_limit if training is None else min(calib_limit, DISTILL_LSQ_FEEDS),
        **options,
    )
    result = p(original.clone())
    assert p.report is not None
    out = PruneResult(
        model=result.model, original=original, report=p.report, stats=dict(result.stats)
    )
    if training is not None and feeds:
        from graphopt.algorithms.train.recover import distill_model

        out.model, out.training = distill_model(result.model, original, feeds, held, **training)
    if measure:
        given = feed_list(eval_feeds, original)
        out.held_out = bool(held) and not given
        out.fidelity, out.verify = fidelity_check(
            original,
            out.model,
            given or held or _eval_feeds(original, feeds, input_shapes),
            *floors,
        )
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


def _point(ratio: float, res: PruneResult) -> ScanPoint:
    return ScanPoint(ratio, res.macs_ratio, res.fidelity)


def scan_json(points: Sequence[ScanPoint]) -> list[dict[str, Any]]:
    return [
        {
            "ratio": p.ratio,
            "macs_ratio": p.macs_ratio,
            "sqnr_db": p.main.sqnr_db,
            "cosine": p.main.cosine,
            "top1_agreement": p.main.top1_agreement,
        }
        for p in points
    ]


@dataclass
class PruneScanResult:
    """What :func:`prune_scan` measured.

    Attributes:
        points: one per ratio: MACs after/before and the fidelity of every output.
        input: the file scanned (None for a model built in memory).
        plot: the plot written (None when not asked for).
        report_path: the HTML report written (None when not asked for).
        seconds: wall time.
    """

    points: list[ScanPoint]
    input: str | None = None
    plot: Path | None = None
    report_path: Path | None = None
    seconds: float = 0.0

    def __iter__(self) -> Iterator[ScanPoint]:
        return iter(self.points)

    def __len__(self) -> int:
        return len(self.points)

    def __getitem__(self, i: int) -> ScanPoint:
        return self.points[i]

    def to_json(self) -> dict[str, Any]:
        """The ``graphopt prune --scan --json`` object (without ``--ratio``/``-o``)."""
        return jsonable(
            {
                "input": self.input,
                "output": None,  # type: ignore[no-any-return]
                "scan": scan_json(self.points),
                "plot": path_or_none(self.plot),
                "report": path_or_none(self.report_path),
                "seconds": round(self.seconds, 3),
            }
        )


def prune_scan(
    model: ModelLike,
    ratios: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5),
    *,
    plot: str | os.PathLike[str] | None = None,
    report: str | os.PathLike[str] | None = None,
    criterion: str = "l1",
    **kwargs: Any,
) -> PruneScanResult:
    """Prune at several ratios (same options as :func:`prune`) and measure MACs and fidelity.

    Args:
        plot: draw MACs against fidelity into this PNG (needs matplotlib).
        report: write a self-contained HTML report with the scan curve here.
    """
    t0 = time.perf_counter()
    plot_path, report_path = output_paths(model, plot, report, inputs=[kwargs.get("calib")])
    source = as_model(model, tensors_only="prune")
    ratios = list(ratios)
    for r in ratios:  # every ratio is checked before the first one is pruned
        PruneChannelsPass(ratio=r, criterion=criterion, scope=kwargs.get("scope"))
    opts = dict(_PRUNE_DEFAULTS, criterion=criterion, **kwargs)
    measure = opts.pop("measure")
    pts = [_point(r, _prune_once(source, r, measure=measure, **opts)) for r in ratios]
    res = PruneScanResult(pts, input=source_path(model))
    if plot_path is not None:
        res.plot = plot_scan(
            pts,
            plot_path,
            title=_scan_title(
                res.input, criterion, bool(opts["recover"]) and opts["calib"] is not None
            ),
        )
    if report_path is not None:
        name = Path(res.input).name if res.input else "model"
        res.report_path = write_report(
            report_path, source, None, prune_scan=pts, title=f"graphopt prune --scan: {name}"
        )
    res.seconds = time.perf_counter() - t0
    return res


#: :func:`prune`'s defaults, for :func:`prune_scan`
_PRUNE_DEFAULTS: dict[str, Any] = {
    "calib": None,
    "round_to": None,
    "recover": True,
    "input_shapes": None,
    "min_channels": 1,
    "min_fraction": 0.0,
    "calib_limit": 128,
    "measure": True,
    "holdout": 0.25,
    "scope": None,
}


def _scan_title(path: str | None, criterion: str, recovered: bool) -> str:
    name = Path(path).name if path else "model"
    return f"prune scan: {name} ({criterion}, {'recovery' if recovered else 'no recovery'})"


def plot_scan(points: Sequence[ScanPoint], path: str | os.PathLike[str], title: str = "") -> Path:
    """Draw MACs (after / before) against fidelity (top-1 agreement when every point has it,
    else the first output's cosine) into a PNG, atomically. Needs matplotlib."""
    try:
        import matplotlib  # noqa: PLC0415 - optional and heavy

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        raise OptionError("plotting needs matplotlib (pip install 'graphopt[plot]')") from None
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [p.macs_ratio for p in points]
    agree = [p.main.top1_agreement for p in points]
    top1 = all(a is not None for a in agree)
    ys = [float(a) for a in agree if a is not None] if top1 else [p.main.cosine for p in points]
    ax.plot(xs, ys, "o-")
    for p, x, y in zip(points, xs, ys):
        ax.annotate(f"{p.ratio:g}", (x, y), textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("MACs after / before")
    ax.set_ylabel("top-1 agreement" if top1 else "output cosine")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
    finally:
        plt.close(fig)
    return Path(path)
