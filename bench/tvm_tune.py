"""TVM tuning benchmark: hand-rule schedules vs measured (tuned) schedules vs onnxruntime.

Per model (PP-OCRv4 cls / rec / det, corpus models such as openWakeWord's melspectrogram and
speech embedding, or the fixtures):

1. ``graphopt compile`` without a database (the hand rules: "default");
2. ``graphopt tune --trials N`` into an empty database (or ``--db FILE`` to reuse one), timed:
   the tuning time includes the tracker and builder start, the baseline of every kernel and the
   search of the kernels over 1 % of the model;
3. ``graphopt compile --db`` with the records only (``trials=0``; it must measure nothing);
4. latency of the two libraries and onnxruntime (ORT_ENABLE_ALL, 2 intra-op threads, spinning off;
   TVM_NUM_THREADS=2) on the same input, interleaved round-robin, the median of each; the tuned
   library's max abs error against onnxruntime.

On a shared machine run it under ``nice`` and read the ratios, not the milliseconds; the
interleaving keeps the ratios comparable even when the load changes during the run.

Run: ``nice python bench/tvm_tune.py [--models cls,oww-melspectrogram] [--trials 16]
[--rounds 30] [--db FILE]``; writes bench/results/tvm_tune.md (after every model) and prints it.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TVM_NUM_THREADS", "2")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# this file is bench/tvm_tune.py: keep bench/ off the path so that `import tvm` finds apache-tvm
sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

from graphopt import corpus  # noqa: E402
from graphopt.algorithms.tvm import runner as grunner  # noqa: E402
from graphopt.algorithms.tvm.tuning_db import TuningDB  # noqa: E402
from graphopt.core.latency import interleaved  # noqa: E402
from graphopt.core.output import atomic_write_text  # noqa: E402
from graphopt.core.session import make_session  # noqa: E402
from graphopt.fixtures import REAL_MODELS, fixture_path, real_model  # noqa: E402
from graphopt.jobs import compile as gcompile  # noqa: E402
from graphopt.jobs.tune import tune  # noqa: E402

THREADS = 2
RESULTS = ROOT / "bench" / "results" / "tvm_tune.md"
#: input shapes for the benchmark (det smaller than deployed, so that tuning stays short)
SHAPES: dict[str, dict[str, tuple[int, ...]]] = {
    "det": {"x": (1, 3, 320, 320)},
    "rec": {"x": (1, 3, 48, 320)},
}


def locate(name: str) -> tuple[Path, dict[str, tuple[int, ...]]]:
    """Path and input shapes of a real model, a corpus model or a fixture."""
    if name in REAL_MODELS:
        path, shapes = real_model(name)
        return path, SHAPES.get(name, shapes)
    try:
        e = corpus.entry(name)
    except KeyError:
        return fixture_path(f"{name}.onnx"), {}
    return corpus.get(name), dict(e.feed_shapes)


def feeds_for(name: str, sess: Any, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """The corpus's representative input where it has one, else seeded normal noise."""
    try:
        corpus.entry(name)
        return dict(corpus.feeds(name, n=1)[0])
    except KeyError:
        pass
    rng = np.random.default_rng(0)
    out = {}
    for i in sess.get_inputs():
        shape = shapes.get(i.name) or tuple(d if isinstance(d, int) else 1 for d in i.shape)
        out[i.name] = rng.standard_normal(shape).astype(np.float32)
    return out


def bench_model(
    name: str,
    trials: int,
    rounds: int,
    tmp: Path,
    db: Path | None,
    min_share: float,
    db_dir: Path | None = None,
) -> dict[str, Any]:
    path, shapes = locate(name)
    row: dict[str, Any] = {"model": name, "trials": trials}
    row["shape"] = ", ".join("x".join(map(str, s)) for s in shapes.values()) or "as declared"
    kw: dict[str, Any] = {"input_shapes": shapes or None}
    hand = gcompile.compile_model(path, output=tmp / f"{name}.hand.so", **kw)
    dbp = db if db is not None else (db_dir or tmp) / f"{name}.tuning.json"
    row["db_records_before"] = len(TuningDB(dbp)) if dbp.exists() else 0
    t0 = time.perf_counter()
    tr = tune(path, "llvm", db=dbp, trials=trials, min_share=min_share, **kw)
    row["tune_s"] = time.perf_counter() - t0
    s = tr.summary
    row["measured"] = s.measurements
    row["kernels"] = len(s.kernels)
    row["status"] = s.counts()
    row["won"] = sum(1 for k in s.kernels if k.status == "tuned" and k.params is not None)
    gains = [k.speedup for k in s.kernels if k.status == "tuned" and k.speedup]
    row["best_kernel_gain"] = max(gains) if gains else None
    tuned = gcompile.compile_model(path, output=tmp / f"{name}.tuned.so", db=dbp, trials=0, **kw)
    row["tuned_kernels"] = tuned.tuned_kernels
    row["compile_hand_s"] = hand.compile_seconds
    row["compile_tuned_s"] = tuned.compile_seconds
    a_hand = grunner.load_artifact(hand.artifact)
    a_tuned = grunner.load_artifact(tuned.artifact)
    sess = make_session(path, "all", threads=THREADS)
    feed = feeds_for(name, sess, shapes)
    ref = sess.run(None, feed)
    got = list(a_tuned.run(feed).values())
    row["err_tuned"] = max(float(np.abs(g - r).max()) for g, r in zip(got, ref))
    dev_hand, dev_tuned = a_hand.to_device(feed), a_tuned.to_device(feed)
    times = interleaved(
        {
            "hand": lambda: a_hand.run_device(dev_hand),
            "tuned": lambda: a_tuned.run_device(dev_tuned),
            "ort": lambda: sess.run(None, feed),
        },
        runs=rounds,
        warmup=3,
    )
    for k in times.times:
        row[f"{k}_ms"] = times.median_ms(k)
    row["hand_vs_ort"] = times.ratio("hand", "ort", paired=True)
    row["tuned_vs_ort"] = times.ratio("tuned", "ort", paired=True)
    row["tuned_vs_hand"] = times.ratio("tuned", "hand", paired=True)
    row["per_kernel"] = [k.to_json() for k in s.kernels if k.status == "tuned"]
    return row


def render(rows: list[dict[str, Any]], rounds: int, load: str) -> str:
    import onnxruntime as ort  # noqa: PLC0415
    import tvm  # noqa: PLC0415

    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    lines = [
        "# TVM: hand-rule schedules vs measured (tuned) schedules vs onnxruntime",
        "",
        f"Date: {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC. Machine: "
        f"{platform.machine()}, {os.cpu_count()} cores ({cpu}); load average {load} while "
        f"measured. apache-tvm {tvm.__version__}, onnxruntime {ort.__version__}. 2 threads for "
        "every runner (TVM_NUM_THREADS=2; onnxruntime intra-op 2, spinning off, ORT_ENABLE_ALL). "
        f"Latency: median of {rounds} interleaved runs; ratios: median of the per-round ratios "
        "(in parentheses: ratio of the medians; when the two disagree, the load changed during "
        "the run and neither is precise). "
        "Tuning from an empty database unless the records column says otherwise.",
        "",
        "| model | input | ORT ms | TVM hand ms | TVM tuned ms | hand / ORT | tuned / ORT | "
        "tuned / hand | trials | kernels (searched, won) | records before | measured | tune s | "
        "max abs err tuned |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | | failed: {r['error']} |" + " |" * 11)
            continue
        lines.append(
            f"| {r['model']} | {r['shape']} | {r['ort_ms']:.2f} | {r['hand_ms']:.2f} | "
            f"{r['tuned_ms']:.2f} | {r['hand_vs_ort']:.2f}x ({r['hand_ms'] / r['ort_ms']:.2f}x) | "
            f"{r['tuned_vs_ort']:.2f}x ({r['tuned_ms'] / r['ort_ms']:.2f}x) | "
            f"{r['tuned_vs_hand']:.2f}x ({r['tuned_ms'] / r['hand_ms']:.2f}x) | "
            f"{r['trials']} | {r['kernels']} "
            f"({r['status'].get('tuned', 0)}, {r.get('won', '?')}) | "
            f"{r.get('db_records_before', 0)} | {r['measured']} | {r['tune_s']:.0f} | "
            f"{r['err_tuned']:.1e} |"
        )
    lines += [
        "",
        "kernels (searched, won): distinct kernels of the model (those over 1 % of it that were "
        "searched; those where a candidate beat the hand rule by at least 3 % in the confirmation "
        "rounds, the others keep the hand rule). measured: candidates timed. records before: "
        "records in the database when tuning started. The compile with the database measures "
        "nothing (trials=0).",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="cls,oww-embedding,oww-melspectrogram,rec")
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--min-share", type=float, default=0.01)
    ap.add_argument(
        "--db", type=Path, help="one database for every model (default: empty per model)"
    )
    ap.add_argument(
        "--db-dir",
        type=Path,
        help="keep each model's database here as MODEL.tuning.json (a rerun reuses them: "
        "remeasures latency without tuning again)",
    )
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    ns = ap.parse_args()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="graphopt-bench-tune-") as td:
        for name in ns.models.split(","):
            t0 = time.perf_counter()
            try:
                rows.append(
                    bench_model(
                        name, ns.trials, ns.rounds, Path(td), ns.db, ns.min_share, ns.db_dir
                    )
                )
            except Exception as exc:  # noqa: BLE001 - reported in the table
                rows.append({"model": name, "error": f"{type(exc).__name__}: {str(exc)[:120]}"})
            print(f"{name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
            load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
            atomic_write_text(RESULTS, render(rows, ns.rounds, load))
            if ns.json:
                atomic_write_text(ns.json, json.dumps(rows, indent=1, default=str))
    print(RESULTS.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
