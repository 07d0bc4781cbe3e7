"""Dynamic dims (issue 19): BERT-style exports with symbolic ``batch`` and ``seq`` through
optimize, fp16 and quantize without ``--input-shape``, against the same commands with the shape
fixed at (1, 128).

For every model and command: node count, whether the graph output keeps both symbolic dims, max
abs error (and SQNR) against the original at (1, 7), (3, 33) and (2, 128), and onnxruntime CPU
latency at (1, 128), dynamic vs fixed, interleaved (median of many rounds, 1 thread, spinning off)
at DISABLE_ALL and ENABLE_ALL. Writes ``bench/results/dynamic.md`` and prints it.

Models: ``fixtures/bert_tiny_dynamic.onnx`` (2 layers, hidden 64) and the corpus ``bert-mini``
export (6 layers, hidden 384; torch + transformers, cached in ``~/.cache/graphopt/corpus``) when
it is available.

Usage: ``python bench/dynamic.py [--models tiny,bert-mini] [--rounds 200] [--commands
optimize,fp16,quantize]``.
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

import graphopt
from graphopt.core.latency import interleaved
from graphopt.core.model import Model
from graphopt.core.output import atomic_write_text
from graphopt.core.session import input_names, make_session, run_model
from graphopt.fixtures import fixture_path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "dynamic.md"
CHECK_SHAPES = ((1, 7), (3, 33), (2, 128))
BENCH_SHAPE = (1, 128)


def bert_feeds(batch: int, seq: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Token ids in the vocabulary, the last row half padded, segment ids 0 then 1."""
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, seq), np.int64)
    if batch > 1:
        mask[-1, seq // 2 :] = 0
    types = np.zeros((batch, seq), np.int64)
    types[:, seq // 2 :] = 1
    return {
        "input_ids": rng.integers(1, vocab, (batch, seq)).astype(np.int64),
        "attention_mask": mask,
        "token_type_ids": types,
    }


def model_path(name: str) -> tuple[Path, int]:
    """The model file and its vocabulary size."""
    if name == "tiny":
        return fixture_path("bert_tiny_dynamic.onnx"), 256
    from graphopt import corpus  # noqa: PLC0415 - torch/transformers only for the corpus model

    return corpus.get(name), 30522


def out_dims(model: Model) -> list[object]:
    return list(model.graph.outputs[0].shape or [])


def run_command(
    cmd: str, path: Path, vocab: int, fixed: bool
) -> Model:  # the transformed model in memory
    shapes = {n: BENCH_SHAPE for n in ("input_ids", "attention_mask", "token_type_ids")}
    kw: dict[str, Any] = {"input_shapes": shapes} if fixed else {}
    if cmd == "optimize":
        return graphopt.optimize(str(path), **kw).model
    if cmd == "fp16":
        return graphopt.fp16(str(path), **kw).model
    if cmd == "quantize":
        lengths = [(2, 9), (1, 33), (4, 17), (2, 64), (1, 128), (3, 40)]
        if fixed:
            lengths = [BENCH_SHAPE] * len(lengths)
        calib = [bert_feeds(b, s, vocab, seed=100 + i) for i, (b, s) in enumerate(lengths)]
        return graphopt.quantize(str(path), calib, method="minmax", **kw).model
    raise ValueError(cmd)


def errors(original: Path, model: Model, vocab: int) -> list[tuple[float, float]]:
    """(max abs error, SQNR dB) of the first output at each CHECK_SHAPES."""
    out = []
    for b, s in CHECK_SHAPES:
        f = bert_feeds(b, s, vocab, seed=b * 1000 + s)
        ref = next(iter(run_model(original, f).values()))
        got = next(iter(run_model(model, f).values()))
        err = float(np.max(np.abs(ref.astype(np.float64) - got)))
        noise = float(np.sum((ref.astype(np.float64) - got) ** 2))
        sqnr = (
            10 * np.log10(float(np.sum(ref.astype(np.float64) ** 2)) / noise) if noise else np.inf
        )
        out.append((err, float(sqnr)))
    return out


def latency(models: dict[str, Any], vocab: int, rounds: int) -> dict[str, float]:
    """Median ms of every model at DISABLE_ALL and ENABLE_ALL at BENCH_SHAPE, interleaved."""
    f = bert_feeds(*BENCH_SHAPE, vocab, seed=5)
    runners = {}
    for name, m in models.items():
        for level in ("disable_all", "all"):
            sess = make_session(m, level, threads=1)
            feed = {k: v for k, v in f.items() if k in input_names(sess)}
            runners[f"{name}@{level}"] = (lambda s, x: lambda: s.run(None, x))(sess, feed)
    t = interleaved(runners, runs=rounds, warmup=10)
    return t.medians_ms() | {
        f"ratio@{level}": t.ratio(f"dynamic@{level}", f"fixed@{level}", paired=True)
        for level in ("disable_all", "all")
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="tiny,bert-mini")
    ap.add_argument("--commands", default="optimize,fp16,quantize")
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    rows = []
    for name in args.models.split(","):
        try:
            path, vocab = model_path(name)
        except Exception as exc:  # noqa: BLE001 - the corpus model needs torch
            print(f"{name}: skipped ({exc})", file=sys.stderr)
            continue
        original = graphopt.load(str(path))
        for cmd in args.commands.split(","):
            dyn = run_command(cmd, path, vocab, fixed=False)
            fix = run_command(cmd, path, vocab, fixed=True)
            errs = errors(path, dyn, vocab)
            lat = latency({"original": original, "dynamic": dyn, "fixed": fix}, vocab, args.rounds)
            rows.append(
                {
                    "model": name,
                    "command": cmd,
                    "nodes_original": original.num_nodes(),
                    "nodes_dynamic": dyn.num_nodes(),
                    "nodes_fixed": fix.num_nodes(),
                    "dims": out_dims(dyn),
                    "errors": errs,
                    **lat,
                }
            )
            print(rows[-1], file=sys.stderr)
    text = render(rows, args.rounds)
    atomic_write_text(args.out, text)
    print(text)
    return 0


def render(rows: list[dict[str, Any]], rounds: int) -> str:
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Dynamic dims: BERT-style exports without --input-shape",
        "",
        f"{now}, {platform.machine()}, onnxruntime {ort.__version__} CPU, 1 thread, "
        f"{rounds} interleaved rounds (medians; ratio = paired median of dynamic/fixed).",
        "",
        "Node counts: original / without --input-shape (dynamic) / with the shape fixed at "
        "1x128. Output dims of the dynamic result. Max abs error (SQNR dB) of the dynamic result "
        "against the original at (batch, seq). Latency at 1x128: dynamic / fixed in ms, and "
        "their ratio (below 1: the dynamic model is faster) at DISABLE_ALL | ENABLE_ALL.",
        "",
        "| model | command | nodes orig / dyn / fixed | output dims | "
        + " | ".join(f"err {b}x{s}" for b, s in CHECK_SHAPES)
        + " | ms DISABLE_ALL dyn / fixed | ms ENABLE_ALL dyn / fixed | ratio dyn/fixed |",
        "|---|---|---|---|" + "---:|" * len(CHECK_SHAPES) + "---:|---:|---:|",
    ]
    for r in rows:
        errs = " | ".join(
            f"{e:.2g}" + (f" ({q:.1f} dB)" if np.isfinite(q) and e > 1e-5 else "")
            for e, q in r["errors"]
        )
        lines.append(
            f"| {r['model']} | {r['command']} | {r['nodes_original']} / {r['nodes_dynamic']} / "
            f"{r['nodes_fixed']} | {r['dims']} | {errs} | "
            f"{r['dynamic@disable_all']:.3f} / {r['fixed@disable_all']:.3f} | "
            f"{r['dynamic@all']:.3f} / {r['fixed@all']:.3f} | "
            f"{r['ratio@disable_all']:.3f} / {r['ratio@all']:.3f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
