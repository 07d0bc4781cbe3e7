"""``graphopt prune MODEL -o OUT --ratio R``: structured channel pruning with least-squares
recovery (``--recover distill`` fine-tunes against the original with torch); ``--scan`` measures
MACs against fidelity at several ratios."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from graphopt.cli.common import (
    add_feeds_option,
    console,
    db,
    emit_json,
    fmt_name,
    human_count,
    input_shapes,
    split_list,
)
from graphopt.core.errors import OptionError
from graphopt.jobs.prune import (
    DEFAULT_MIN_SQNR_DB,
    OutputFidelity,
    PruneResult,
    ScanPoint,
    prune,
    prune_scan,
)


def add_arguments(name: str, p: argparse.ArgumentParser) -> None:
    p.add_argument("model")
    p.add_argument(
        "--report",
        metavar="OUT.html",
        help="write a self-contained HTML report (graphs, per-step figures)",
    )
    p.add_argument("-o", "--output", help="pruned model (required unless --scan)")
    p.add_argument(
        "--ratio",
        type=float,
        help="fraction removed, in [0, 1): of the prunable MACs (--scope auto) or of every "
        "group's channels (--scope group)",
    )
    p.add_argument(
        "--calib",
        metavar="DATA",
        help=".npz keyed by input name (batch on axis 0) or a folder of .npz/.npy; "
        "used for recovery and the activation/output criteria",
    )
    p.add_argument(
        "--criterion",
        choices=["l1", "l2", "bn", "activation", "output"],
        default="l1",
        help="channel importance (default l1); output: what a unit adds to its consumers' "
        "outputs on --calib after their refit (attention heads, FFN neurons)",
    )
    p.add_argument("--round-to", type=int, metavar="N", help="keep widths multiples of N")
    p.add_argument("--min-channels", type=int, default=1, help="never keep fewer channels")
    p.add_argument(
        "--min-fraction",
        type=float,
        default=0.0,
        help="never keep less than this fraction of a group",
    )
    p.add_argument(
        "--scope",
        choices=["auto", "group", "global"],
        default=None,
        help="auto: --ratio of the prunable MACs, split across layers, heads and FFN neurons by a "
        "sensitivity scan on --calib; group: the same ratio in every group (uniform); global: "
        "rank all channels together (default: auto with --calib when no prunable layer is a "
        "convolution, else group)",
    )
    p.add_argument("--no-recover", action="store_true", help="skip the least-squares refit")
    p.add_argument(
        "--recover",
        choices=["none", "least-squares", "distill"],
        default=None,
        help="least-squares (default with --calib): refit the layers after pruned ones; distill: "
        "then fine-tune the whole model against the original on --calib (unlabeled; needs "
        "torch: pip install graphopt[train])",
    )
    p.add_argument(
        "--steps", type=int, default=300, metavar="N", help="--recover distill: training steps"
    )
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        metavar="S",
        help="--recover distill: stop training after S seconds",
    )
    p.add_argument(
        "--target-sqnr",
        type=float,
        default=None,
        metavar="DB",
        help="--recover distill: stop once every output's held-out SQNR reaches DB",
    )
    p.add_argument("--threads", type=int, default=None, help="--recover distill: torch threads")
    p.add_argument(
        "--progress",
        action="store_true",
        help="show the training progress bar even when stderr is not a terminal",
    )
    add_feeds_option(p, "judge the pruned model on (default: held-out --calib samples)")
    p.add_argument(
        "--scan",
        action="store_true",
        help="prune at several ratios and print MACs against fidelity",
    )
    p.add_argument("--ratios", default="0.1,0.2,0.3,0.4,0.5", help="ratios for --scan")
    p.add_argument("--plot", metavar="PNG", help="with --scan: plot MACs against fidelity")
    p.add_argument(
        "--min-sqnr",
        type=float,
        default=None,
        metavar="DB",
        help=f"the check's floor: every output's SQNR against the original (default "
        f"{DEFAULT_MIN_SQNR_DB:g} dB; 0: no floor, with a warning)",
    )
    p.add_argument(
        "--min-cosine",
        type=float,
        default=None,
        metavar="C",
        help="the check's cosine floor (default: implied by --min-sqnr)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="write the pruned model even when it fails the check (e.g. to fine-tune it)",
    )
    p.set_defaults(func=cmd_prune)


def _ratios(text: str) -> list[float]:
    try:
        return [float(r) for r in split_list(text)]
    except ValueError:
        raise OptionError(f"bad --ratios '{text}': comma-separated numbers") from None


def cmd_prune(args: argparse.Namespace) -> int:
    if not args.scan and not args.output:
        raise OptionError("give -o OUT (or --scan to only measure several ratios)")
    if args.ratio is None and not args.scan:
        raise OptionError("give --ratio R (fraction of channels to remove, e.g. 0.3)")
    if args.no_recover and args.recover not in (None, "none"):
        raise OptionError(f"--no-recover contradicts --recover {args.recover}")
    recover = "none" if args.no_recover else (args.recover or "least-squares")
    opts = dict(
        calib=args.calib,
        criterion=args.criterion,
        round_to=args.round_to,
        recover=recover != "none",
        input_shapes=input_shapes(args) or None,
        min_channels=args.min_channels,
        min_fraction=args.min_fraction,
        scope=args.scope,
    )
    ratios = _ratios(args.ratios) if args.scan else None
    if args.ratio is None or args.output is None:  # --scan only
        scan = prune_scan(args.model, ratios or [], plot=args.plot, report=args.report, **opts)
        if args.json:
            emit_json(scan.to_json())
        else:
            console().print(_scan_table(scan.points))
        return 0
    opts["recover"] = recover
    show = (not args.json and sys.stderr.isatty()) or args.progress
    with (
        _training_bar(recover == "distill" and show) as bar,
        _scan_bar(show and args.calib is not None and args.scope in (None, "auto")) as scan_bar,
    ):
        res = prune(
            args.model,
            args.ratio,
            output=args.output,
            report=args.report,
            scan=ratios,
            plot=args.plot if args.scan else None,
            min_sqnr=args.min_sqnr,
            min_cosine=args.min_cosine,
            feeds=args.feeds,
            force=args.force,
            steps=args.steps,
            time_budget=args.time_budget,
            target_sqnr=args.target_sqnr,
            threads=args.threads,
            train_progress=bar,
            scan_progress=scan_bar,
            **opts,
        )
    if args.json:
        emit_json(res.to_json())
        return 0
    c = console()
    if res.scan is not None:
        c.print(_scan_table(res.scan))
    if res.report.allocation is not None:
        c.print(_allocation_table(res))
    c.print(_group_table(res))
    c.print(_summary_table(res, args.model))
    what = (
        "(held-out quarter of the calibration data)"
        if res.held_out
        else "(on the calibration data)"
        if args.calib
        else "(seeded random inputs)"
    )
    c.print(_fidelity_table(res.fidelity, f"fidelity against the original {what}"))
    c.print(f"wrote {fmt_name(res.output)} in {res.seconds:.2f} s")
    return 0


@contextmanager
def _scan_bar(show: bool) -> Iterator[Callable[[int, int], None] | None]:
    """A progress bar (on stderr) for the sensitivity scan of ``--scope auto``."""
    if not show:
        yield None
        return
    bar = Progress(
        "sensitivity scan",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console(stderr=True),
        transient=True,
    )
    task = bar.add_task("scan", total=None)

    def update(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total)

    bar.start()
    try:
        yield update
    finally:
        bar.stop()


def _allocation_table(res: PruneResult) -> Table:
    a = res.report.allocation
    assert a is not None
    t = Table(
        title=f"allocation: {a.achieved * 100:.1f}% of the prunable MACs removed "
        f"(asked {a.target * 100:.1f}%; {a.points} scan points)",
        title_justify="left",
    )
    for col in ("group", "kind", "removed", "est. distortion"):
        t.add_column(col, justify="left" if col in ("group", "kind") else "right")
    for g in a.groups:
        t.add_row(fmt_name(g.name), g.kind, f"{g.removed} / {g.width}", f"{g.distortion:.2e}")
    return t


@contextmanager
def _training_bar(show: bool) -> Iterator[Callable[[int, int, float, float | None], None] | None]:
    """A progress bar for training (on stderr): step, loss, held-out SQNR; ``None`` if not shown."""
    if not show:
        yield None
        return
    bar = Progress(
        "distilling",
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console(stderr=True),
        transient=True,
    )
    task = bar.add_task("distilling", total=None, info="")
    held: list[float] = []

    def update(step: int, steps: int, loss: float, sqnr: float | None) -> None:
        if sqnr is not None:
            held.append(sqnr)
        info = f"loss {loss:.3g}" + (f", held-out SQNR {held[-1]:.1f} dB" if held else "")
        bar.update(task, completed=step, total=steps, info=info)

    bar.start()
    try:
        yield update
    finally:
        bar.stop()


def _scan_table(points: Sequence[ScanPoint]) -> Table:
    t = Table(title="MACs against fidelity", title_justify="left")
    for col in ("ratio", "MACs", "SQNR dB", "cosine", "top-1 agreement"):
        t.add_column(col, justify="right")
    for p in points:
        f = p.main
        t.add_row(
            f"{p.ratio:g}",
            f"{p.macs_ratio:.3f}x",
            db(f.sqnr_db),
            f"{f.cosine:.4f}",
            "-" if f.top1_agreement is None else f"{f.top1_agreement:.3f}",
        )
    return t


def _group_table(res: PruneResult, limit: int = 60) -> Table:
    t = Table(title="channel groups (width of the first producer)", title_justify="left")
    for col in ("group", "producers", "before", "after", "status"):
        t.add_column(col, justify="right" if col in ("before", "after") else "left")
    rows = sorted(res.report.groups, key=lambda g: (g.blocked, g.name))
    for g in rows[:limit]:
        status = (
            "blocked: " + "; ".join(fmt_name(r) for r in g.reasons[:2])
            if g.blocked
            else ("pruned" if g.width_after < g.width_before else "kept")
        )
        t.add_row(
            fmt_name(g.name), str(len(g.producers)), str(g.width_before), str(g.width_after), status
        )
    if len(rows) > limit:
        t.add_row(f"... {len(rows) - limit} more", "", "", "", "")
    return t


def _summary_table(res: PruneResult, model: str) -> Table:
    rep, st = res.report, res.stats
    t = Table(title=f"{fmt_name(model)} -> {fmt_name(res.output)}", title_justify="left")
    t.add_column("")
    t.add_column("value", justify="right")
    t.add_row("MACs before", human_count(rep.macs_before))
    t.add_row("MACs after", f"{human_count(rep.macs_after)} ({res.macs_ratio:.3f}x)")
    t.add_row("prunable compute", f"{rep.prunable_fraction * 100:.1f}%")
    t.add_row(
        "groups pruned / blocked / all",
        f"{st['groups_pruned']} / {st['groups_blocked']} / {st['groups']}",
    )
    t.add_row("channels removed", str(st["channels_removed"]))
    t.add_row(
        "recovery",
        f"{st.get('layers_refit', 0)} layers refit"
        if st.get("layers_refit")
        else "none (no --calib or --no-recover)",
    )
    tr = res.training
    if tr is not None:
        t.add_row(
            "distillation",
            f"{tr.steps} steps in {tr.seconds:.1f} s ({tr.stopped}) on {tr.train_samples} "
            f"samples; held-out SQNR {db(tr.initial_sqnr_db)} -> {db(tr.final_sqnr_db)} dB",
        )
    return t


def _fidelity_table(fid: Sequence[OutputFidelity], title: str) -> Table:
    t = Table(title=title, title_justify="left")
    for col in ("output", "SQNR dB", "cosine", "top-1 agreement"):
        t.add_column(col, justify="left" if col == "output" else "right")
    for f in fid:
        t.add_row(
            fmt_name(f.name),
            db(f.sqnr_db),
            f"{f.cosine:.4f}",
            "-" if f.top1_agreement is None else f"{f.top1_agreement:.3f}",
        )
    return t
