"""Every graphopt command on every corpus model, with the model's real feeds (issue 14).

For each model of :mod:`graphopt.corpus` that is available here (its package installed, or its
transformers export cached) and each command (``inspect``, ``optimize``, ``optimize --target ort``,
``quantize``, ``prune``, ``fp16``, ``plan``, and ``compile`` when apache-tvm is installed), the
command line runs in its own process as a user would run it, with ``--feeds`` (and ``--calib`` for
quantize and prune) pointing at folders of the corpus's representative inputs (one ``.npz`` per
feed; calibration uses other samples than the feeds), ``--input-shape`` fixing every dynamic dim
to the feeds' shapes, and ``--json``. One table row per (model, command):

- exit: the command's exit status (0 ok, 2 refused with a reason, 1 failed), or ``timeout``;
- nodes: the node count of the input and of the written model (the command's ``nodes_before``
  and ``nodes_after``);
- verified: the command's own check (every output of its ``verify`` block ok);
- fidelity: the model's task metric (:func:`graphopt.corpus.compare`: detection F1, CTC sequence
  agreement, top-1 agreement, VAD decisions, cosine, SQNR...) of the written model against the
  original on the feeds;
- speed-up: original / written model latency in onnxruntime (ORT_ENABLE_ALL, one thread,
  interleaved runs, median of the per-round ratios, :func:`graphopt.core.latency.interleaved`);
  provisional on a shared machine;
- reason: the one line the command printed when it did not exit 0, else its warnings.

Writes bench/results/corpus.md after every row, so a long run leaves what it measured; rows are
merged by (model, command) into the table already there (``--replace`` starts a new one), so runs
of a few commands each build up one table. The table ends with exit counts per command.
Usage: python bench/corpus.py [--models a,b] [--commands optimize,fp16] [--feeds 8] [--timeout S]
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from graphopt import corpus  # noqa: E402
from graphopt.core.latency import interleaved  # noqa: E402
from graphopt.core.loader import load  # noqa: E402
from graphopt.core.output import atomic_write_text  # noqa: E402
from graphopt.core.session import input_names, make_session  # noqa: E402

COMMANDS = ("inspect", "optimize", "optimize-ort", "quantize", "prune", "fp16", "plan", "compile")
RESULTS = ROOT / "bench" / "results" / "corpus.md"


@dataclass
class Row:
    """One (model, command) run."""

    model: str
    command: str
    exit: str = ""
    verified: str = "-"
    nodes: str = "-"
    fidelity: str = "-"
    speedup: str = "-"
    reason: str = ""
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def write_feeds(folder: Path, feeds: list[dict[str, np.ndarray]]) -> Path:
    """One ``.npz`` per feed (each exactly the model's inputs), the layout ``--feeds`` reads."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(feeds):
        np.savez(folder / f"{i:03d}.npz", **f)  # type: ignore[arg-type]
    return folder


def shape_args(name: str, feed: dict[str, np.ndarray]) -> list[str]:
    """``--input-shape`` for every input with a dynamic dim, fixed to the feed's shape."""
    out = []
    for k, dims in corpus.entry(name).dynamic_dims.items():
        if any(not isinstance(d, int) for d in dims) and feed[k].ndim:
            out += ["--input-shape", f"{k}:" + "x".join(str(d) for d in feed[k].shape)]
    return out


def argv_for(command: str, model: Path, out: Path, feeds: Path, calib: Path) -> list[str] | None:
    """The command line of one command (None: not available here)."""
    if command == "inspect":
        return ["inspect", str(model)]
    if command == "optimize":
        return ["optimize", str(model), "-o", str(out), "--feeds", str(feeds)]
    if command == "optimize-ort":
        return ["optimize", str(model), "-o", str(out), "--target", "ort", "--feeds", str(feeds)]
    if command == "quantize":
        return [
            "quantize",
            str(model),
            "-o",
            str(out),
            "--calib",
            str(calib),
            "--feeds",
            str(feeds),
        ]
    if command == "prune":
        return [
            "prune",
            str(model),
            "-o",
            str(out),
            "--ratio",
            "0.25",
            "--calib",
            str(calib),
            "--feeds",
            str(feeds),
        ]
    if command == "fp16":
        return ["fp16", str(model), "-o", str(out), "--feeds", str(feeds)]
    if command == "plan":
        return ["plan", str(model), "-o", str(out), "--feeds", str(feeds)]
    if command == "compile":
        if importlib.util.find_spec("tvm") is None:
            return None
        so = out.with_suffix(".so")
        return ["compile", str(model), "-o", str(so), "--target", "llvm", "--feeds", str(feeds)]
    raise ValueError(command)


def _reason(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("graphopt:"):
            return ln.removeprefix("graphopt: ")[:300]
    return (lines[-1] if lines else "")[:300]


def _verified(d: dict[str, Any]) -> str:
    proof = d.get("proof")
    if isinstance(proof, dict) and "ok" in proof:
        return "proof ok" if proof["ok"] else "proof FAILED"
    v = d.get("verify")
    if not isinstance(v, dict) or not v:
        return "-"
    # prune reports fidelity per output without an ``ok`` of its own (its floor judges the
    # model as a whole, and the command exits 1 when it is not met): no flag is no failure
    oks = [o["ok"] for o in v.values() if isinstance(o, dict) and "ok" in o]
    worst = [o.get("sqnr_db") for o in v.values() if isinstance(o, dict)]
    finite = [float(x) for x in worst if isinstance(x, (int, float))]
    exact = any(x == "inf" for x in worst)  # JSON writes an infinite SQNR (no error) as "inf"
    sqnr = f", min SQNR {min(finite):.1f} dB" if finite else (", exact" if exact else "")
    return ("ok" if all(oks) else "FAILED") + sqnr


def _fmt_metric(m: corpus.Metric) -> str:
    v = m.value
    text = "nan" if isinstance(v, float) and math.isnan(v) else f"{v:.3g}"
    if m.detail.get("nonfinite"):
        text += " (NaN/inf)"
    return f"{m.name} {text}"


#: Warning of optimize/quantize/...: the model with the --input-shape dims does not load at
#: ORT_ENABLE_ALL, the input with those dims included (graphopt.jobs.optimize.check_loads).
NO_LOAD_WITH_DIMS = "cannot load the model with --input-shape"
#: A measured speed-up below this is measured again, five times longer, before it is reported.
CONFIRM_BELOW = 0.95


def _run_cli(row: Row, argv: list[str], timeout: float) -> dict[str, Any] | None:
    """Run ``graphopt ARGV`` into ``row`` (exit, reason or warnings, seconds); its JSON result
    (None when it timed out)."""
    t0 = time.perf_counter()
    try:
        p = subprocess.run(
            [sys.executable, "-m", "graphopt.cli", *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        row.exit, row.reason = "timeout", f"over {timeout:.0f} s"
        row.seconds = time.perf_counter() - t0
        return None
    row.seconds = time.perf_counter() - t0
    row.exit = str(p.returncode)
    if p.returncode != 0:
        row.reason = _reason(p.stderr)
    else:  # what the command warned about (a slower model kept, int8 slower, dims refused...)
        warned = [
            ln.strip().removeprefix("graphopt: ")
            for ln in p.stderr.splitlines()
            if ln.strip().startswith("graphopt: warning:")
        ]
        row.reason = "; ".join(w[:200] for w in warned[:2])
    try:
        d = json.loads(p.stdout) if p.stdout.strip() else {}
    except json.JSONDecodeError:
        d = {}
        if p.returncode == 0:
            row.reason = "stdout is not JSON"
    return d if isinstance(d, dict) else {}


def run_one(
    name: str, command: str, model: Path, work: Path, feeds_dir: Path, calib_dir: Path, args: Any
) -> Row:
    row = Row(name, command)
    out = work / f"{command}.onnx"
    argv = argv_for(command, model, out, feeds_dir, calib_dir)
    if argv is None:
        row.exit, row.reason = "-", "apache-tvm not installed"
        return row
    feed0 = corpus.feeds(name, 1, seed=0)[0]
    dims = shape_args(name, feed0)
    d = _run_cli(row, [*argv, *dims, "--json"], args.timeout)
    if d is None:
        return row
    if row.exit == "0" and dims and NO_LOAD_WITH_DIMS in row.reason:
        # onnxruntime refuses the input itself with those dims fixed at ORT_ENABLE_ALL (its
        # If-subgraph inference checks a branch the fixed dims make ill-typed, though never
        # taken): do what the warning advises, leave the dims dynamic
        fixed = " ".join(dims)
        d = _run_cli(row, [*argv, "--json"], args.timeout)
        if d is None:
            return row
        note = (
            f"dims left dynamic: with {fixed} onnxruntime loads neither the input nor the "
            "output at ORT_ENABLE_ALL (warned)"
        )
        row.reason = f"{note}; {row.reason}" if row.reason else note
    row.verified = _verified(d)
    if isinstance(d.get("nodes_before"), int) and isinstance(d.get("nodes_after"), int):
        row.nodes = f"{d['nodes_before']} -> {d['nodes_after']}"
    elif isinstance(d.get("nodes"), int):
        row.nodes = str(d["nodes"])
    if row.exit == "0" and out.is_file():
        fs = corpus.feeds(name, args.feeds, seed=0)
        try:
            row.fidelity = _fmt_metric(corpus.compare(name, out, fs))
        except Exception as exc:  # noqa: BLE001 - a table cell, not a crash of the bench
            row.fidelity = f"error: {type(exc).__name__}: {str(exc)[:80]}"
        if command != "inspect" and not args.no_speed:
            try:
                ratio = speedup(model, out, fs[0], args.runs)
                row.speedup = f"{ratio:.2f}x"
                if ratio < CONFIRM_BELOW:  # a slowdown is confirmed before it is reported
                    again = speedup(model, out, fs[0], 5 * args.runs)
                    row.speedup = f"{again:.2f}x (first {ratio:.2f}x, remeasured)"
            except Exception as exc:  # noqa: BLE001
                row.speedup = f"error: {type(exc).__name__}"
    return row


def speedup(before: Path, after: Path, feed: dict[str, np.ndarray], runs: int) -> float:
    """Latency of ``before`` / ``after`` at ORT_ENABLE_ALL, one thread: the median of the
    per-round ratios of interleaved runs (both runs of a round see the same machine load)."""
    runners = {}
    for key, path in (("before", before), ("after", after)):
        sess = make_session(load(path), "all", threads=1)
        f = {k: v for k, v in feed.items() if k in input_names(sess)}
        runners[key] = functools.partial(sess.run, None, f)
    return interleaved(runners, runs=runs, warmup=3).ratio("before", "after", paired=True)


def parse_rows(text: str) -> tuple[list[Row], list[str]]:
    """The rows and run notes of a table :func:`markdown` wrote (to merge a chunk into it)."""
    rows: list[Row] = []
    runs: list[str] = []
    in_runs = False
    for line in text.splitlines():
        if line.startswith("Runs merged into this table"):
            in_runs = True
            continue
        if in_runs and line.startswith("- "):
            runs.append(line[2:])
            continue
        if in_runs and line.strip() and not line.startswith("- "):
            in_runs = False
        if not line.startswith("| ") or line.startswith("| model |"):
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if len(cells) != 9:
            continue
        model, command, exit_, nodes, verified, fidelity, speed, secs, reason = cells
        try:
            seconds = float(secs)
        except ValueError:
            seconds = 0.0
        rows.append(
            Row(
                model,
                command,
                exit_,
                verified,
                nodes,
                fidelity,
                speed,
                reason.replace("\\|", "|"),
                seconds,
            )
        )
    return rows, runs


def merge_rows(old: list[Row], new: list[Row]) -> list[Row]:
    """``old`` with every (model, command) that ``new`` ran replaced, in corpus then command
    order (rows of models or commands not known here keep their place at the end)."""
    by_key = {(r.model, r.command): r for r in old}
    by_key.update({(r.model, r.command): r for r in new})
    models = [e.name for e in corpus.list_models()]

    def key(r: Row) -> tuple[int, int]:
        m = models.index(r.model) if r.model in models else len(models)
        c = COMMANDS.index(r.command) if r.command in COMMANDS else len(COMMANDS)
        return (m, c)

    return sorted(by_key.values(), key=key)


def markdown(rows: list[Row], skipped: dict[str, str], runs: list[str]) -> str:
    lines = [
        "# Every command on every corpus model",
        "",
        "`python bench/corpus.py` on a shared 2-core machine: **timings are provisional** "
        "(speed-up = original / written model, onnxruntime ORT_ENABLE_ALL, one thread, "
        "interleaved, median per-round ratio). Feeds: the corpus's representative inputs "
        "(graphopt/corpus.py); fidelity: the model's task metric of the written model against "
        "the original on them. Each run replaces the rows of the (model, command) pairs it ran "
        "and keeps the others.",
        "",
        "Runs merged into this table:",
        "",
        *[f"- {r}" for r in runs],
        "",
        "| model | command | exit | nodes | verified | fidelity | speed-up | s | reason |",
        "|---|---|---|---|---|---|---|---:|---|",
    ]
    for r in rows:
        reason = r.reason.replace("|", "\\|")
        lines.append(
            f"| {r.model} | {r.command} | {r.exit} | {r.nodes} | {r.verified} | {r.fidelity} "
            f"| {r.speedup} | {r.seconds:.0f} | {reason} |"
        )
    counts = exit_counts(rows)
    if counts:
        lines += ["", "| command | exit 0 | exit 2 | exit 1 | other |", "|---|---:|---:|---:|---:|"]
        for cmd, c in counts.items():
            lines.append(f"| {cmd} | {c['0']} | {c['2']} | {c['1']} | {c['other']} |")
    if skipped:
        lines += ["", "Not available here:", ""]
        lines += [f"- {k}: {v}" for k, v in skipped.items()]
    return "\n".join(lines) + "\n"


def exit_counts(rows: list[Row]) -> dict[str, dict[str, int]]:
    """Command -> counts of exit 0 / 2 / 1 / anything else (timeout, not available)."""
    out: dict[str, dict[str, int]] = {}
    for r in rows:
        c = out.setdefault(r.command, {"0": 0, "2": 0, "1": 0, "other": 0})
        c[r.exit if r.exit in ("0", "2", "1") else "other"] += 1
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    ap.add_argument("--models", help="comma-separated corpus names (default: all available)")
    ap.add_argument("--commands", default=",".join(COMMANDS), help="comma-separated commands")
    ap.add_argument("--feeds", type=int, default=8, help="feeds per model")
    ap.add_argument("--calib", type=int, default=16, help="calibration samples per model")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per command")
    ap.add_argument("--runs", type=int, default=20, help="timed runs per model for the speed-up")
    ap.add_argument("--no-speed", action="store_true", help="skip the latency measurement")
    ap.add_argument("--output", default=str(RESULTS), help="markdown table (%(default)s)")
    ap.add_argument(
        "--replace", action="store_true", help="start a new table (default: merge into it)"
    )
    ap.add_argument(
        "--merge",
        nargs="+",
        metavar="TABLE",
        help="merge the rows of these tables (of runs with another --output) into --output "
        "and exit; runs in parallel each write their own table, merged afterwards",
    )
    args = ap.parse_args(argv)
    if args.merge:
        base = Path(args.output)
        rows0, runs0 = parse_rows(base.read_text()) if base.is_file() else ([], [])
        for other in args.merge:
            more, more_runs = parse_rows(Path(other).read_text())
            rows0, runs0 = merge_rows(rows0, more), [*runs0, *more_runs]
        atomic_write_text(base, markdown(rows0, {}, runs0))
        return 0
    names = args.models.split(",") if args.models else [e.name for e in corpus.list_models()]
    commands = args.commands.split(",")
    unknown = [c for c in commands if c not in COMMANDS]
    if unknown:
        ap.error(f"unknown command(s) {','.join(unknown)}; choose from {','.join(COMMANDS)}")
    old_rows: list[Row] = []
    runs: list[str] = []
    out_path = Path(args.output)
    if out_path.is_file() and not args.replace:
        old_rows, runs = parse_rows(out_path.read_text())
    load_avg = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    started = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    rows: list[Row] = []
    skipped: dict[str, str] = {}
    t0 = time.perf_counter()

    def run_note() -> str:
        return (
            f"{started}-{time.strftime('%H:%M', time.gmtime())} UTC, "
            f"`--commands {','.join(commands)} --feeds {args.feeds}`"
            + (f" `--models {args.models}`" if args.models else "")
            + f", {(time.perf_counter() - t0) / 60:.0f} min, load average at start "
            f"{load_avg:.1f}, {len(rows)} rows"
        )

    def write() -> None:
        text = markdown(merge_rows(old_rows, rows), skipped, [*runs, run_note()])
        atomic_write_text(args.output, text)

    with tempfile.TemporaryDirectory(prefix="graphopt-corpus-") as tmp:
        for name in names:
            why = corpus.why_unavailable(name)
            if why:
                skipped[name] = why
                continue
            model = corpus.get(name)
            work = Path(tmp) / name
            feeds_dir = write_feeds(work / "feeds", corpus.feeds(name, args.feeds, seed=0))
            calib_dir = write_feeds(work / "calib", corpus.feeds(name, args.calib, seed=1))
            for command in commands:
                row = run_one(name, command, model, work, feeds_dir, calib_dir, args)
                rows.append(row)
                print(
                    f"{row.model:22} {row.command:13} exit {row.exit:7} {row.nodes:12} "
                    f"{row.verified:28} "
                    f"{row.fidelity:40} {row.speedup:8} {row.seconds:6.0f}s {row.reason[:120]}",
                    flush=True,
                )
                write()
    write()
    bad = [r for r in rows if r.exit not in ("0", "2", "-")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
