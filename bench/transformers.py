"""Transformer models (issue 13): graphopt against the tools a transformer user already has.

Sections (``--sections optimize,quant,prune``, all by default):

* **optimize** (this file): per model, the input, onnxslim, onnxruntime's transformer optimizer
  (``onnxruntime.transformers.optimizer.optimize_model``), graphopt's portable output and graphopt
  ``--target ort``: node count (subgraphs included), the fused ops each output holds (Attention,
  MultiHeadAttention, SkipLayerNormalization, Gelu, FastGelu, BiasGelu, LayerNormalization and
  their RMS/GQA relatives), onnxruntime ENABLE_ALL latency (every candidate of a model interleaved
  round-robin, one intra-op thread, spinning off: :func:`graphopt.core.latency.interleaved`, median
  ms, and the median of the per-round ratios against the input and against onnxruntime's
  optimizer), max abs error of every output against the input (both at ORT_DISABLE_ALL, so that
  what is compared is the file, not onnxruntime's own fusions), and the tool's wall time.
  onnxruntime's optimizer runs with the settings its own tooling uses: ``model_type='bert'`` for
  the BERTs and the digits transformer, ``'gpt2'`` for the decoder, both at ``opt_level=None``
  (the tool's default: 1, onnxruntime's basic level before its Python fusions), and ``'bart'`` at
  ``opt_level=0`` for the Whisper encoder (what ``onnxruntime.transformers.models.whisper`` does);
  heads and hidden size are given explicitly.
* **quant** / **prune**: ``bench/transformers_quant.py`` / ``bench/transformers_prune.py`` when
  present (written by their own owners). Each exposes ``section(models, *, quick, workdir) ->
  (dict, str)``: ``models`` is :func:`models`' list of ``(name, path, feeds)``, ``workdir`` a
  temporary folder, and it returns its JSON-able results and its markdown. A missing module is
  reported as such.

Models (:func:`models`): the corpus exports ``bert-mini``, ``bert-mini-dynamo``,
``whisper-tiny-encoder`` and ``gpt2-small-past`` (``graphopt.corpus``, random weights, exported
into the cache on first use; skipped with the reason when torch/transformers are missing) with
their corpus feeds, and ``fixtures/digits_transformer.onnx`` when present, fed with held-out
digits (``fixtures/digits_eval.npz``).

Writes ``bench/results/transformers.json`` and ``bench/results/transformers.md`` (``--quick``:
``transformers_quick.json``/``.md``, so that a quick check never replaces a full run). Timings on
a shared machine are rough; rerun on a quiet one for the README.

Usage: ``python bench/transformers.py [--quick] [--models a,b] [--sections optimize,quant,prune]
[--rounds N] [--out FILE.md]``. ``--quick`` (under 3 minutes): bert-mini and the digits
transformer, 5 rounds.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import platform
import sys
import tempfile
import time
import types
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from graphopt import corpus
from graphopt.core.latency import interleaved
from graphopt.core.loader import load
from graphopt.core.output import atomic_write_text
from graphopt.core.saver import save
from graphopt.core.session import make_session

logger = logging.getLogger("bench.transformers")

ROOT = Path(__file__).resolve().parent.parent
RESULTS_JSON = ROOT / "bench" / "results" / "transformers.json"
RESULTS_MD = ROOT / "bench" / "results" / "transformers.md"
#: ``--quick`` writes here, so that a quick check never replaces a full run's results
QUICK_JSON = ROOT / "bench" / "results" / "transformers_quick.json"
QUICK_MD = ROOT / "bench" / "results" / "transformers_quick.md"
DIGITS = ROOT / "fixtures" / "digits_transformer.onnx"
DIGITS_EVAL = ROOT / "fixtures" / "digits_eval.npz"

Feed = dict[str, np.ndarray]
ModelCase = tuple[str, Path, list[Feed]]

CORPUS_MODELS = ("bert-mini", "bert-mini-dynamo", "whisper-tiny-encoder", "gpt2-small-past")
QUICK_MODELS = ("bert-mini", "digits-transformer")
SECTIONS = ("optimize", "quant", "prune")
TOOLS = ("input", "onnxslim", "ort-optimizer", "graphopt", "graphopt-ort")
#: fused ops counted in every output (any domain)
FUSED_OPS = (
    "Attention",
    "MultiHeadAttention",
    "GroupQueryAttention",
    "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "LayerNormalization",
    "SimplifiedLayerNormalization",
    "RMSNormalization",
    "Gelu",
    "FastGelu",
    "BiasGelu",
)
#: columns of the markdown table (short names)
FUSED_COLUMNS = {
    "Attention": "Attn",
    "MultiHeadAttention": "MHA",
    "SkipLayerNormalization": "SkipLN",
    "LayerNormalization": "LN",
    "Gelu": "Gelu",
    "FastGelu": "FastGelu",
    "BiasGelu": "BiasGelu",
}
#: onnxruntime transformer optimizer settings per model (see the module docstring)
ORT_OPTIMIZER: dict[str, dict[str, Any]] = {
    "bert-mini": {"model_type": "bert", "num_heads": 12, "hidden_size": 384},
    "bert-mini-dynamo": {"model_type": "bert", "num_heads": 12, "hidden_size": 384},
    "whisper-tiny-encoder": {
        "model_type": "bart",
        "num_heads": 6,
        "hidden_size": 384,
        "opt_level": 0,
    },
    "gpt2-small-past": {"model_type": "gpt2", "num_heads": 4, "hidden_size": 256},
    "digits-transformer": {"model_type": "bert", "num_heads": 4, "hidden_size": 32},
}


# ------------------------------------------------------------------------------- models


def _digits_feeds(n: int, batch: int = 32) -> list[Feed]:
    data = np.load(DIGITS_EVAL)
    x = data["x"].astype(np.float32)
    return [{"x": x[i * batch : (i + 1) * batch]} for i in range(n)]


def models(names: Sequence[str] | None = None, n_feeds: int = 2) -> list[ModelCase]:
    """The bench's transformer models as ``(name, path, feeds)``, those available only.

    Args:
        names: restrict to these names (default: every corpus model and the digits transformer).
        n_feeds: feed dicts per model (the corpus' representative feeds; held-out digits).
    """
    wanted = list(names) if names else [*CORPUS_MODELS, "digits-transformer"]
    out: list[ModelCase] = []
    for name in wanted:
        if name == "digits-transformer":
            if DIGITS.is_file() and DIGITS_EVAL.is_file():
                out.append((name, DIGITS, _digits_feeds(n_feeds)))
            else:
                logger.warning("digits-transformer: %s not present, skipped", DIGITS.name)
            continue
        try:
            out.append((name, corpus.get(name), corpus.feeds(name, n=n_feeds)))
        except corpus.CorpusUnavailable as exc:
            logger.warning("%s: skipped (%s)", name, exc)
    return out


# ------------------------------------------------------------------------------- tools


def run_tool(tool: str, name: str, src: Path, dst: Path) -> Path:
    """Write ``tool``'s output for ``src`` to ``dst`` (the input itself for ``input``)."""
    if tool == "input":
        return src
    if tool == "onnxslim":
        import onnx
        import onnxslim

        onnx.save(onnxslim.slim(onnx.load(str(src)), model_check=False), str(dst))
    elif tool == "ort-optimizer":
        from onnxruntime.transformers.optimizer import optimize_model

        settings = dict(ORT_OPTIMIZER.get(name, {"model_type": "bert"}))
        m = optimize_model(str(src), **settings)
        m.save_model_to_file(str(dst))
    elif tool in ("graphopt", "graphopt-ort"):
        from graphopt.jobs.optimize import optimize

        target = "ort" if tool == "graphopt-ort" else "portable"
        res = optimize(str(src), target=target, verify_output=False)
        save(res.model, dst)
    else:
        raise ValueError(f"unknown tool {tool!r}")
    return dst


def op_counts(path: Path) -> tuple[int, dict[str, int]]:
    """Node count (subgraphs included) and the fused ops' counts (any domain) of a file."""
    hist = load(path).op_histogram()
    fused = {
        op: sum(v for k, v in hist.items() if k == op or k.endswith(f".{op}")) for op in FUSED_OPS
    }
    return sum(hist.values()), {k: v for k, v in fused.items() if v}


def max_abs_err(ref: list[list[np.ndarray]], out: list[list[np.ndarray]]) -> float:
    """Largest absolute difference over every feed and output."""
    err = 0.0
    for ra, oa in zip(ref, out, strict=True):
        for a, b in zip(ra, oa, strict=True):
            if a.size:
                d = np.abs(a.astype(np.float64) - np.asarray(b).astype(np.float64))
                err = max(err, float(np.max(d)))
    return err


def _runner(sess: Any, feed: Feed) -> Callable[[], object]:
    names = {i.name for i in sess.get_inputs()}
    f = {k: v for k, v in feed.items() if k in names}
    return lambda: sess.run(None, f)


def bench_optimize(case: ModelCase, tmp: Path, rounds: int) -> list[dict[str, Any]]:
    """One model through every tool: the rows of the optimize table."""
    name, src, feeds = case
    rows: list[dict[str, Any]] = []
    for tool in TOOLS:
        row: dict[str, Any] = {"model": name, "tool": tool}
        t0 = time.perf_counter()
        try:
            path = run_tool(tool, name, src, tmp / f"{name}.{tool}.onnx")
            row["seconds"] = round(time.perf_counter() - t0, 2) if tool != "input" else 0.0
            row["nodes"], row["fused"] = op_counts(path)
            row["path"] = path
        except Exception as exc:  # noqa: BLE001 - a failing tool is a result, not a crash
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            logger.warning("%s %s failed: %s", name, tool, row["error"])
        rows.append(row)
        logger.info("%s %-13s %s", name, tool, row.get("nodes", row.get("error")))
    ref = [s.run(None, f) for s in [make_session(src, "disable_all", 1)] for f in feeds]
    runners: dict[str, Callable[[], object]] = {}
    for row in rows:
        if "path" not in row:
            continue
        try:
            s0 = make_session(row["path"], "disable_all", 1)
            row["max_abs_err"] = max_abs_err(ref, [s0.run(None, f) for f in feeds])
            runners[row["tool"]] = _runner(make_session(row["path"], "all", 1), feeds[0])
        except Exception as exc:  # noqa: BLE001 - an output onnxruntime refuses is a result
            row["error"] = f"onnxruntime: {str(exc).splitlines()[0][:160]}"
            logger.warning("%s %s: %s", name, row["tool"], row["error"])
    if runners:
        t = interleaved(runners, runs=rounds, warmup=2)
        for row in rows:
            tool = row["tool"]
            if tool not in runners:
                continue
            row["all_ms"] = round(t.median_ms(tool), 3)
            if "input" in runners:
                row["vs_input"] = round(t.ratio(tool, "input", paired=True), 3)
            if "ort-optimizer" in runners:
                row["vs_ort_optimizer"] = round(t.ratio(tool, "ort-optimizer", paired=True), 3)
    for row in rows:
        row.pop("path", None)
    return rows


def optimize_markdown(rows: list[dict[str, Any]]) -> str:
    cols = list(FUSED_COLUMNS.values())
    head = (
        "| model | tool | nodes | "
        + " | ".join(cols)
        + " | ENABLE_ALL ms | vs input | vs ort opt | max abs err | tool s |"
    )
    lines = [head, "|" + "---|" * (len(cols) + 8)]
    for r in rows:
        if "error" in r and "nodes" not in r:
            lines.append(f"| {r['model']} | {r['tool']} | failed: {r['error']} |")
            continue
        fused = r.get("fused", {})
        cells = [str(fused.get(op, 0) or "") for op in FUSED_COLUMNS]

        def num(key: str, fmt: str, row: dict[str, Any] = r) -> str:
            v = row.get(key)
            return format(v, fmt) if isinstance(v, (int, float)) else "-"

        lines.append(
            f"| {r['model']} | {r['tool']} | {r['nodes']} | "
            + " | ".join(cells)
            + f" | {num('all_ms', '.2f')} | {num('vs_input', '.2f')}"
            f" | {num('vs_ort_optimizer', '.2f')} | {num('max_abs_err', '.1e')}"
            f" | {num('seconds', '.1f')} |" + (f" {r['error']}" if "error" in r else "")
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------- sections


def load_section(section: str) -> types.ModuleType | None:
    """``bench/transformers_<section>.py`` as a module, None when the file is not there."""
    path = Path(__file__).resolve().parent / f"transformers_{section}.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location(f"bench_transformers_{section}", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def run_optimize(cases: list[ModelCase], tmp: Path, rounds: int) -> tuple[dict[str, Any], str]:
    rows: list[dict[str, Any]] = []
    for case in cases:
        rows += bench_optimize(case, tmp, rounds)
    md = (
        "Fused-op columns count ops of that type in any domain (com.microsoft included). "
        "Latency: ENABLE_ALL, 1 thread, all tools of a model interleaved; ratios are medians of "
        "per-round ratios. max abs err: against the input, both at ORT_DISABLE_ALL, over "
        "every output and feed.\n\n" + optimize_markdown(rows)
    )
    return {"rows": rows, "ort_optimizer": ORT_OPTIMIZER}, md


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="bert-mini + digits, 5 rounds")
    ap.add_argument("--models", help="comma-separated model names")
    ap.add_argument("--sections", default=",".join(SECTIONS), help="optimize,quant,prune")
    ap.add_argument("--rounds", type=int, help="latency rounds (default 5 quick, 30 full)")
    ap.add_argument(
        "--out",
        type=Path,
        help="markdown file to write, its JSON beside it (default: bench/results/transformers.md, "
        "transformers_quick.md with --quick); a run of some sections or models elsewhere keeps "
        "the full run's tables",
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        ap.error(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    names = args.models.split(",") if args.models else (QUICK_MODELS if args.quick else None)
    rounds = args.rounds or (5 if args.quick else 30)
    cases = models(names, n_feeds=1 if args.quick else 2)
    t0 = time.perf_counter()
    results: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "quick": args.quick,
        "models": [c[0] for c in cases],
        "sections": {},
    }
    md = [f"# Transformers bench ({results['date']}, {'quick' if args.quick else 'full'})", ""]
    with tempfile.TemporaryDirectory(prefix="graphopt-transformers-") as d:
        tmp = Path(d)
        for section in sections:
            if section == "optimize":
                res, text = run_optimize(cases, tmp, rounds)
            else:
                mod = load_section(section)
                if mod is None:
                    res, text = {"missing": True}, f"bench/transformers_{section}.py not present."
                else:
                    sub = tmp / section
                    sub.mkdir()
                    try:
                        res, text = mod.section(cases, quick=args.quick, workdir=sub)
                    except Exception as exc:  # noqa: BLE001 - one section failing keeps the rest
                        logger.exception("section %s failed", section)
                        res, text = {"error": repr(exc)}, f"failed: {exc!r}"
            results["sections"][section] = res
            md += [f"## {section}", "", text, ""]
    results["seconds"] = round(time.perf_counter() - t0, 1)
    md.append(f"Total {results['seconds']:.0f} s.")
    out_json, out_md = (QUICK_JSON, QUICK_MD) if args.quick else (RESULTS_JSON, RESULTS_MD)
    if args.out:
        out_md, out_json = args.out, args.out.with_suffix(".json")
    atomic_write_text(out_json, json.dumps(results, indent=1, default=str) + "\n")
    atomic_write_text(out_md, "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
