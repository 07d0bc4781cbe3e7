"""Attention-head and FFN-neuron pruning benchmark (issue 13): MACs, onnxruntime latency and task
fidelity, through the prune job (what ``graphopt prune`` runs), with least-squares recovery.

Models:

- ``digits-transformer`` (fixtures/digits_transformer.onnx, 2 layers x 4 heads, FFN 128): held-out
  accuracy on digits_eval.npz before pruning, pruned with recovery on digits_calib.npz as
  ``graphopt prune --calib fixtures/digits_calib.npz --criterion output`` does it (recovery on
  the first three quarters of the calibration images, the check on the last quarter). Settings:
  * ``uniform``: ``--scope group``: every head and FFN group loses ``ratio`` of its units (0.30,
    the ratio a user asks for, and 0.35, the first that removes at least 30% of the MACs);
  * ``auto``: the default (``--scope auto`` for a transformer given ``--calib``): ``--ratio 0.3``
    of the prunable (attention + FFN) MACs, split across layers, heads and FFN neurons by the
    job's sensitivity scan on the calibration data (graphopt/algorithms/prune/allocate.py).
  The accuracy without recovery is measured for the same split (``--no-recover``).
- ``bert-mini`` (graphopt.corpus, 6 layers x 12 heads, FFN 1536, random weights): MACs at the
  corpus feed shape (batch 1, 64 tokens) and SQNR of ``last_hidden_state`` on held-out corpus feeds
  (seed 1, the job's ``feeds``; calibration seed 0: 64 sequences, 16 with --quick, all used for
  recovery), ``uniform`` and ``auto`` at 0.3. Any other corpus name works the same way
  (``bert-mini-dynamo``, ``whisper-tiny-encoder``; ``gpt2-small-past`` prunes FFN neurons only:
  its heads are tied to the key/value cache inputs).

Criterion ``output`` throughout (a unit's Optimal Brain Surgeon cost in the outputs of the layers
that read it). The attention+FFN MAC fraction counts the nodes whose work depends on a prunable
unit (Q/K/V/O projections, ``q @ k^T``, ``probs @ v``, both FFN MatMuls): what ``--ratio`` means
under ``--scope auto``; ``heads`` and ``ffn`` list the units kept per group (groups of several
producers are Q/K/V, so heads). Latency: original and pruned sessions (ORT_ENABLE_ALL, one
intra-op thread, spinning off) interleaved by :func:`graphopt.core.latency.interleaved`;
``latency_ratio`` = pruned / original median (< 1 is faster), at batch 1 and batch 64 for the
digits model.

``run(models, quick)`` returns one dict per model and setting; ``section(models, quick=,
workdir=)`` is the entry bench/transformers.py calls (its cases' names, the rows and a table);
``python bench/transformers_prune.py [--quick] [--models a,b]`` prints a markdown table and writes
its section of bench/results/transformers_prune.md (the ``## job path`` section; the earlier
sections of the file are kept).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import logging
import os
import platform
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from graphopt.algorithms.prune import analyze, groups  # noqa: E402
from graphopt.core.cost import model_cost  # noqa: E402
from graphopt.core.latency import interleaved  # noqa: E402
from graphopt.core.loader import load  # noqa: E402
from graphopt.core.model import Model  # noqa: E402
from graphopt.core.output import atomic_write_text  # noqa: E402
from graphopt.core.session import make_session  # noqa: E402
from graphopt.core.shapes import fix_input_shapes, infer_shapes  # noqa: E402
from graphopt.core.verify import sqnr_db  # noqa: E402
from graphopt.fixtures import fixture_path  # noqa: E402
from graphopt.jobs.prune import PruneResult  # noqa: E402
from graphopt.jobs.prune import prune as prune_job  # noqa: E402
from graphopt.passes.prune_channels import PruneReport  # noqa: E402

logger = logging.getLogger(__name__)

MODELS = ("digits-transformer", "bert-mini")
DIGITS_RATIO = 0.30  # the fraction of the attention and FFN MACs asked for
DIGITS_UNIFORM = (0.30, 0.35)
BERT_RATIO = 0.30
CRITERION = "output"
RESULTS = ROOT / "bench" / "results" / "transformers_prune.md"
SECTION = "## job path"
Feeds = Mapping[str, np.ndarray]


# ------------------------------------------------------------------------------ helpers
def node_macs(model: Model, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """MACs of every node at the given input shapes."""
    m = model.clone()
    fix_input_shapes(m, dict(shapes))
    infer_shapes(m)
    return {n.name: n.macs for n in model_cost(m).nodes}


def analysis_of(model: Model, shapes: Mapping[str, tuple[int, ...]]) -> tuple[set[str], dict]:
    """(the compute nodes whose work depends on a prunable unit, units per prunable group).

    For a transformer the nodes are the Q/K/V/O projections, ``q @ k^T``, ``probs @ v`` and both
    FFN MatMuls; a group's units are its heads or FFN neurons."""
    m = model.clone()
    fix_input_shapes(m, dict(shapes))
    infer_shapes(m)
    an = analyze(m)
    fixed = an.unit[an.fixed]
    names = {
        name
        for name, labs in an.touched.items()
        if any(((lab >= 0) & (an.unit[np.maximum(lab, 0)] != fixed)).any() for lab in labs)
    }
    return names, {g.name: (len(g.free), len(g.producers)) for g in groups(an) if not g.blocked}


def fraction_removed(before: Mapping[str, int], after: Mapping[str, int], names: set[str]) -> float:
    """Fraction of the MACs of ``names`` that pruning removed."""
    total = sum(before.get(k, 0) for k in names)
    return 1.0 - sum(after.get(k, 0) for k in names) / total if total else 0.0


def units_kept(rep: PruneReport, units: Mapping[str, tuple[int, int]]) -> dict[str, list[int]]:
    """Units kept per prunable group, in graph order: ``heads`` (groups of several producers:
    Q, K, V) and ``ffn`` (one producer: the first FFN MatMul)."""
    out: dict[str, list[int]] = {"heads": [], "ffn": []}
    for g in rep.groups:
        if g.name not in units:
            continue
        n, producers = units[g.name]
        kept = int(round(n * g.width_after / g.width_before))
        out["heads" if producers > 1 else "ffn"].append(kept)
    return out


def latency_ratio(a: Model, b: Model, feeds: Feeds, runs: int) -> float:
    """Median latency of ``b`` over ``a`` (ORT_ENABLE_ALL, 1 thread), interleaved."""
    runners = {}
    for name, m in (("a", a), ("b", b)):
        s = make_session(m, "all", threads=1)
        f = dict(feeds)
        runners[name] = lambda s=s, f=f: s.run(None, f)  # noqa: E731
    t = interleaved(runners, runs=runs, warmup=5)
    return t.ratio("b", "a", paired=True)


def prune(
    path: str | os.PathLike[str], ratio: float, calib: Any, scope: str | None, recover: bool, **kw
) -> PruneResult:
    """The prune job as ``graphopt prune --criterion output`` runs it (nothing written)."""
    return prune_job(
        str(path),
        ratio,
        calib=calib,
        criterion=CRITERION,
        scope=scope,
        recover=recover,
        min_sqnr=0,
        **kw,
    )


def _allocation(res: PruneResult) -> dict[str, Any] | None:
    a = res.report.allocation
    if a is None:
        return None
    return {
        "achieved": a.achieved,
        "points": a.points,
        "removed": {g.name: f"{g.removed}/{g.width}" for g in a.groups},
    }


# ------------------------------------------------------------------------------ digits
def _accuracy(model: Model, x: np.ndarray, y: np.ndarray) -> float:
    out = make_session(model, "all").run(None, {"x": x})[0]
    return float((out.argmax(1) == y).mean())


def bench_digits(quick: bool) -> list[dict[str, Any]]:
    path = fixture_path("digits_transformer.onnx")
    calib = fixture_path("digits_calib.npz")
    base = load(path)
    ev = np.load(fixture_path("digits_eval.npz"))
    x, y = ev["x"], ev["y"]
    shapes = {"x": (1, 1, 8, 8)}
    before = node_macs(base, shapes)
    names, units = analysis_of(base, shapes)
    acc0 = _accuracy(base, x, y)
    runs = 30 if quick else 200
    rows = []
    settings = [("uniform", r, "group") for r in DIGITS_UNIFORM] + [("auto", DIGITS_RATIO, None)]
    for setting, ratio, scope in settings:
        t0 = time.perf_counter()
        res = prune(path, ratio, calib, scope, recover=True)
        secs = time.perf_counter() - t0
        # the same split without recovery: per-group ratios of what the job chose
        split: Any = ratio
        if res.report.allocation is not None:
            split = res.report.allocation.ratios()
        bare = prune(path, split, calib, "group", recover=False)
        rec = res.model
        after = node_macs(rec, shapes)
        rows.append(
            {
                "model": "digits-transformer",
                "setting": f"{setting} {ratio:g}",
                "scope": res.report.scope,
                "criterion": CRITERION,
                "ratio": ratio,
                **units_kept(res.report, units),
                "macs_before": sum(before.values()),
                "macs_after": sum(after.values()),
                "macs_ratio": sum(after.values()) / sum(before.values()),
                "attn_ffn_macs_removed": fraction_removed(before, after, names),
                "acc_before": acc0,
                "acc_pruned": _accuracy(bare.model, x, y),
                "acc_recovered": _accuracy(rec, x, y),
                "held_out_sqnr_db": res.fidelity[0].sqnr_db,
                "latency_ratio_b1": latency_ratio(base, rec, {"x": x[:1]}, runs),
                "latency_ratio_b64": latency_ratio(base, rec, {"x": x[:64]}, runs),
                "prune_seconds": secs,
                "allocation": _allocation(res),
            }
        )
    return rows


# ------------------------------------------------------------------------------ corpus
def bench_corpus(name: str, quick: bool) -> list[dict[str, Any]]:
    from graphopt import corpus

    path = corpus.get(name)
    base = load(path)
    # 64 sequences of 64 tokens (quick: 16): the FFN's second MatMul refits 1536 + 1 inputs
    calib = corpus.feeds(name, n=4 if quick else 8, seed=0, batch=4 if quick else 8)
    held = corpus.feeds(name, n=2 if quick else 4, seed=1, batch=4)
    one = {k: v[:1] for k, v in held[0].items()}
    shapes = {k: tuple(v.shape) for k, v in one.items()}
    before = node_macs(base, shapes)
    names, units = analysis_of(base, shapes)
    s_ref = make_session(base, "all")
    refs = np.concatenate([s_ref.run(None, dict(f))[0].ravel() for f in held])
    rows = []
    for setting, scope in (("uniform", "group"), ("auto", None)):
        t0 = time.perf_counter()
        res = prune(path, BERT_RATIO, calib, scope, recover=True, feeds=held, holdout=0)
        secs = time.perf_counter() - t0
        split: Any = BERT_RATIO
        if res.report.allocation is not None:
            split = res.report.allocation.ratios()
        bare = prune(path, split, calib, "group", recover=False, feeds=held, holdout=0)
        out = {}
        for rec, m in ((False, bare.model), (True, res.model)):
            s_p = make_session(m, "all")
            outs = np.concatenate([s_p.run(None, dict(f))[0].ravel() for f in held])
            out[rec] = sqnr_db(refs, outs)
        after = node_macs(res.model, shapes)
        rows.append(
            {
                "model": name,
                "setting": f"{setting} {BERT_RATIO:g}",
                "scope": res.report.scope,
                "criterion": CRITERION,
                "ratio": BERT_RATIO,
                **units_kept(res.report, units),
                "groups_blocked": sum(g.blocked for g in res.report.groups),
                "groups": len(res.report.groups),
                "macs_before": sum(before.values()),
                "macs_after": sum(after.values()),
                "macs_ratio": sum(after.values()) / sum(before.values()),
                "attn_ffn_macs_removed": fraction_removed(before, after, names),
                "sqnr_db_pruned": out[False],
                "sqnr_db_recovered": out[True],
                "latency_ratio_b1": latency_ratio(base, res.model, one, 10 if quick else 50),
                "prune_seconds": secs,
                "allocation": _allocation(res),
            }
        )
    return rows


def run(models: Sequence[str] | None = None, quick: bool = False) -> list[dict[str, Any]]:
    """Rows of the benchmark for ``models`` (default :data:`MODELS`)."""
    rows: list[dict[str, Any]] = []
    for name in models or MODELS:
        if name in ("digits", "digits-transformer", "digits_transformer"):
            rows += bench_digits(quick)
        else:
            rows += bench_corpus(name, quick)
    return rows


def section(
    models: Sequence[tuple[str, Any, Any]], *, quick: bool, workdir: Path
) -> tuple[dict[str, Any], str]:
    """The ``prune`` section of bench/transformers.py: ``models`` are its ``(name, path, feeds)``
    cases (only the names are used: each model is pruned with its own calibration and held-out
    data, see the module docstring); returns the rows and their markdown table."""
    del workdir  # nothing is written
    rows = run([name for name, _path, _feeds in models], quick)
    return {"rows": rows}, table(rows)


# ------------------------------------------------------------------------------ report
def _f(v: Any, fmt: str = ".3f") -> str:
    return "" if v is None else format(v, fmt)


def table(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = [
        "| model | setting (scope) | heads kept | FFN neurons kept | MACs after/before "
        "| attn+FFN MACs removed | fidelity before / pruned / recovered "
        "| latency pruned/orig (b1, b64) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if "acc_before" in r:
            fid = f"acc {r['acc_before']:.4f} / {r['acc_pruned']:.4f} / {r['acc_recovered']:.4f}"
        else:
            fid = f"SQNR - / {r['sqnr_db_pruned']:.1f} / {r['sqnr_db_recovered']:.1f} dB"
        lat = (
            _f(r.get("latency_ratio_b1"), ".2f")
            + ", "
            + (_f(r.get("latency_ratio_b64"), ".2f") or "-")
        )
        lines.append(
            f"| {r['model']} | {r['setting']} ({r['scope']}) | {r['heads']} | {r['ffn']} "
            f"| {r['macs_ratio']:.3f} | {r['attn_ffn_macs_removed']:.1%} | {fid} | {lat} |"
        )
    return "\n".join(lines)


def _replace_section(old: str, new: str) -> str:
    """``old`` with its :data:`SECTION` (to the next ``## `` heading or the end) replaced by
    ``new``, or ``new`` appended."""
    if SECTION not in old:
        return old.rstrip("\n") + "\n\n" + new
    head, rest = old.split(SECTION, 1)
    nxt = rest.find("\n## ")
    tail = rest[nxt + 1 :] if nxt >= 0 else ""
    return head + new + ("\n" + tail if tail else "")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer timing runs and feeds")
    ap.add_argument("--models", default=",".join(MODELS))
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    rows = run(args.models.split(","), args.quick)
    when = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    text = (
        f"{SECTION} ({when}, {platform.machine()}, load {load1:.1f}"
        f"{', --quick' if args.quick else ''}, {time.perf_counter() - t0:.0f} s)\n\n"
        f"`python bench/transformers_prune.py{' --quick' if args.quick else ''} --models "
        f"{args.models}`: the prune job (`graphopt prune --criterion output`), uniform "
        f"(`--scope group`) against the default sensitivity allocation (`--scope auto`).\n\n"
        + table(rows)
        + "\n"
    )
    for r in rows:
        a = r.get("allocation")
        if a:
            text += (
                f"\nallocation ({r['model']}, {r['setting']}): {a['achieved']:.1%} of the "
                f"prunable MACs removed, {a['points']} scan points; units removed: "
                + ", ".join(f"{k} {v}" for k, v in a["removed"].items())
                + "\n"
            )
    print(text)
    old = RESULTS.read_text() if RESULTS.exists() else ""
    atomic_write_text(RESULTS, _replace_section(old, text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
