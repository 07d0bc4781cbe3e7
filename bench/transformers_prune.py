"""Attention-head and FFN-neuron pruning benchmark (issue 13): MACs, onnxruntime latency and task
fidelity, with and without least-squares recovery.

Models:

- ``digits-transformer`` (fixtures/digits_transformer.onnx, 2 layers x 4 heads, FFN 128): held-out
  accuracy on digits_eval.npz before pruning, after pruning without recovery and with recovery,
  calibrated on digits_calib.npz. Two settings:
  * ``uniform``: every head and FFN group loses ``ratio`` of its units (``graphopt prune --ratio
    0.35 --criterion output``);
  * ``allocated``: the attention and FFN MACs drop by ``target`` (30%) with the heads removed
    where the calibration data says it costs least: for every non-empty choice of head groups
    losing one head (at least one head goes: this bench measures head pruning), the FFN ratio
    that meets the MAC target is found and the choice with the best logits SQNR on a held-out
    quarter of the *calibration* images (never the evaluation set) is kept.
- ``bert-mini`` (graphopt.corpus, 6 layers x 12 heads, FFN 1536, random weights): MACs at the
  corpus feed shape (batch 1, 64 tokens) and SQNR of ``last_hidden_state`` on held-out corpus feeds
  (seed 1; calibration seed 0: 64 sequences, 16 with --quick), uniform ratio. Any other corpus
  name works the same way (``bert-mini-dynamo``, ``whisper-tiny-encoder``; ``gpt2-small-past``
  prunes FFN neurons only: its heads are tied to the key/value cache inputs).

Criterion ``output`` throughout (a unit's Optimal Brain Surgeon cost in the outputs of the layers
that read it). The attention+FFN MAC fraction counts the nodes whose work depends on a prunable
unit (Q/K/V/O projections, ``q @ k^T``, ``probs @ v``, both FFN MatMuls); ``heads`` and ``ffn``
list the units kept per group (groups of several producers are Q/K/V, so heads). Latency:
original and pruned sessions (ORT_ENABLE_ALL, one intra-op thread, spinning off) interleaved by
:func:`graphopt.core.latency.interleaved`; ``latency_ratio`` = pruned / original median (< 1 is
faster), at batch 1 and batch 64 for the digits model.

``run(models, quick)`` returns one dict per model and setting; ``section(models, quick=,
workdir=)`` is the entry bench/transformers.py calls (its cases' names, the rows and a table);
``python bench/transformers_prune.py [--quick] [--models a,b]`` prints a markdown table and writes
bench/results/transformers_prune.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import itertools
import logging
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
from graphopt.passes import get_pass  # noqa: E402
from graphopt.passes.prune_channels import PruneChannelsPass  # noqa: E402

logger = logging.getLogger(__name__)

MODELS = ("digits-transformer", "bert-mini")
DIGITS_TARGET = 0.30  # fraction of the attention and FFN MACs removed
DIGITS_UNIFORM = 0.35
BERT_RATIO = 0.30
CRITERION = "output"
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


def units_kept(p: PruneChannelsPass, units: Mapping[str, tuple[int, int]]) -> dict[str, list[int]]:
    """Units kept per prunable group, in graph order: ``heads`` (groups of several producers:
    Q, K, V) and ``ffn`` (one producer: the first FFN MatMul)."""
    assert p.report is not None
    out: dict[str, list[int]] = {"heads": [], "ffn": []}
    for g in p.report.groups:
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
    model: Model, ratio: float | dict[str, float], calib: Sequence[Feeds], recover: bool
) -> tuple[Model, PruneChannelsPass]:
    p = get_pass("prune-channels", ratio=ratio, criterion=CRITERION, calib=calib, recover=recover)
    assert isinstance(p, PruneChannelsPass)
    res = p(model.clone())
    return res.model, p


# ------------------------------------------------------------------------------ digits
def _digits_data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ev = np.load(fixture_path("digits_eval.npz"))
    cal = np.load(fixture_path("digits_calib.npz"))["x"]
    return ev["x"], ev["y"], cal


def _accuracy(model: Model, x: np.ndarray, y: np.ndarray) -> float:
    out = make_session(model, "all").run(None, {"x": x})[0]
    return float((out.argmax(1) == y).mean())


def _logits(model: Model, x: np.ndarray) -> np.ndarray:
    return np.asarray(make_session(model, "all").run(None, {"x": x})[0])


def digits_allocation(
    base: Model, calib: Sequence[Feeds], held: np.ndarray, target: float
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Per-group ratios removing ``target`` of the attention+FFN MACs, chosen on calibration data
    (see the module docstring); returns them and the candidates tried."""
    shapes = {"x": (1, 1, 8, 8)}
    before = node_macs(base, shapes)
    names, units = analysis_of(base, shapes)
    head_groups = [g for g, (_, producers) in units.items() if producers > 1]
    ffn_groups = [g for g, (_, producers) in units.items() if producers == 1]
    ref = _logits(base, held)
    tried: list[dict[str, Any]] = []
    best: tuple[float, dict[str, float]] | None = None
    for k in range(min(1, len(head_groups)), len(head_groups) + 1):
        for chosen in itertools.combinations(head_groups, k):
            ratios = {g: 1.0 / units[g][0] for g in chosen}  # one head
            for r_ffn in np.arange(0.05, 0.80, 0.05):
                ratios.update({g: float(round(r_ffn, 2)) for g in ffn_groups})
                pm, _ = prune(base, ratios, calib, recover=False)
                if fraction_removed(before, node_macs(pm, shapes), names) >= target:
                    break
            else:
                continue
            pm, _ = prune(base, ratios, calib, recover=True)
            s = sqnr_db(ref, _logits(pm, held))
            tried.append(
                {"heads_pruned": list(chosen), "ffn_ratio": ratios[ffn_groups[0]], "sqnr": s}
            )
            if best is None or s > best[0]:
                best = (s, dict(ratios))
    assert best is not None
    return best[1], tried


def bench_digits(quick: bool) -> list[dict[str, Any]]:
    path = fixture_path("digits_transformer.onnx")
    base = load(path)
    x, y, cal = _digits_data()
    calib = [{"x": cal[i : i + 16]} for i in range(0, len(cal), 16)]
    shapes = {"x": (1, 1, 8, 8)}
    before = node_macs(base, shapes)
    names, units = analysis_of(base, shapes)
    acc0 = _accuracy(base, x, y)
    runs = 30 if quick else 200
    rows = []
    held = cal[96:]  # the allocation is scored on the last quarter of the calibration images
    alloc, tried = digits_allocation(
        base, [{"x": cal[i : i + 16]} for i in range(0, 96, 16)], held, DIGITS_TARGET
    )
    for setting, ratio in (("uniform", DIGITS_UNIFORM), ("allocated", alloc)):
        t0 = time.perf_counter()
        bare, _ = prune(base, ratio, calib, recover=False)
        rec, p = prune(base, ratio, calib, recover=True)
        secs = time.perf_counter() - t0
        after = node_macs(rec, shapes)
        row: dict[str, Any] = {
            "model": "digits-transformer",
            "setting": setting,
            "criterion": CRITERION,
            "ratio": ratio,
            **units_kept(p, units),
            "macs_before": sum(before.values()),
            "macs_after": sum(after.values()),
            "macs_ratio": sum(after.values()) / sum(before.values()),
            "attn_ffn_macs_removed": fraction_removed(before, after, names),
            "acc_before": acc0,
            "acc_pruned": _accuracy(bare, x, y),
            "acc_recovered": _accuracy(rec, x, y),
            "latency_ratio_b1": latency_ratio(base, rec, {"x": x[:1]}, runs),
            "latency_ratio_b64": latency_ratio(base, rec, {"x": x[:64]}, runs),
            "prune_seconds": secs,
        }
        if setting == "allocated":
            row["allocation_tried"] = tried
        rows.append(row)
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
    out = {}
    t0 = time.perf_counter()
    for rec in (False, True):
        pm, p = prune(base, BERT_RATIO, calib, recover=rec)
        s_ref = make_session(base, "all")
        s_p = make_session(pm, "all")
        refs = np.concatenate([s_ref.run(None, dict(f))[0].ravel() for f in held])
        outs = np.concatenate([s_p.run(None, dict(f))[0].ravel() for f in held])
        out[rec] = (pm, p, sqnr_db(refs, outs))
    secs = time.perf_counter() - t0
    pm, p, _ = out[True]
    after = node_macs(pm, shapes)
    assert p.report is not None
    return [
        {
            "model": name,
            "setting": "uniform",
            "criterion": CRITERION,
            "ratio": BERT_RATIO,
            **units_kept(p, units),
            "groups_blocked": sum(g.blocked for g in p.report.groups),
            "groups": len(p.report.groups),
            "macs_before": sum(before.values()),
            "macs_after": sum(after.values()),
            "macs_ratio": sum(after.values()) / sum(before.values()),
            "attn_ffn_macs_removed": fraction_removed(before, after, names),
            "sqnr_db_pruned": out[False][2],
            "sqnr_db_recovered": out[True][2],
            "latency_ratio_b1": latency_ratio(base, pm, one, 10 if quick else 50),
            "prune_seconds": secs,
        }
    ]


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
        "| model | setting | heads kept | FFN neurons kept | MACs after/before "
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
            f"| {r['model']} | {r['setting']} | {r['heads']} | {r['ffn']} | {r['macs_ratio']:.3f} "
            f"| {r['attn_ffn_macs_removed']:.1%} | {fid} | {lat} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer timing runs and feeds")
    ap.add_argument("--models", default=",".join(MODELS))
    args = ap.parse_args(argv)
    rows = run(args.models.split(","), args.quick)
    when = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = (
        f"# Head/FFN pruning ({when}, {platform.machine()}, {platform.processor() or 'cpu'}"
        f"{', --quick' if args.quick else ''})\n\n" + table(rows) + "\n"
    )
    for r in rows:
        if r.get("setting") == "allocated":
            text += f"\nallocation ({r['model']}): ratios {r['ratio']}\n"
            for c in r["allocation_tried"]:
                where = ", ".join(c["heads_pruned"]) or "none"
                text += (
                    f"- one head pruned in: {where}; FFN ratio {c['ffn_ratio']}: "
                    f"calibration SQNR {c['sqnr']:.1f} dB\n"
                )
    print(text)
    atomic_write_text(ROOT / "bench" / "results" / "transformers_prune.md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
