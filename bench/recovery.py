"""Recovery benchmark (issue 16): what each recovery method gives back after pruning and int8
quantization, and what it costs in time, on the digits fixture and PP-OCR det/rec/cls.

Pruning (``--ratio``, round_to 8, l1) through the prune job, then per method:
none, least squares (the default), distillation at each ``--budgets`` step count (Adam on the
unlabeled calibration data, its last quarter held out for the running fidelity; starts from the
least-squares model). int8 through the quantize job: static (mse calibration), learned rounding
(AdaRound, ``--adaround-iters`` per layer) and QAT at the largest budget. Task metrics as
bench/prune.py measures them (same helpers): digits accuracy on digits_eval.npz (labels), cls
top-1 agreement with fp32, det map IoU@0.3, rec character accuracy.
Every written model is the job's output (standard ONNX, run in onnxruntime).

Timings are wall seconds of the job on this machine with the 1-minute load average beside them:
the machine is shared, so they are indicative only.

Run: ``nice -n 10 python bench/recovery.py [--models digits,cls] [--budgets 100,300]``; writes
bench/results/recovery.md (or ``--out``) and prints it.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.prune import cls_data, det_data, fidelity, load, per_sample, rec_data  # noqa: E402
from graphopt.core.output import atomic_write_text  # noqa: E402
from graphopt.fixtures import fixture_path  # noqa: E402
from graphopt.jobs.prune import prune  # noqa: E402
from graphopt.jobs.quantize import quantize  # noqa: E402


def data(kind: str, n_calib: int, n_eval: int) -> tuple[list[dict[str, np.ndarray]], Any]:
    """(calibration feeds, evaluation data for :func:`bench.prune.fidelity`)."""
    if kind == "digits":
        cal = np.load(fixture_path("digits_calib.npz"))["x"]
        ev = np.load(fixture_path("digits_eval.npz"))
        return [{"x": cal[i : i + 16]} for i in range(0, len(cal), 16)], (ev["x"], ev["y"])
    if kind == "cls":
        return per_sample(cls_data(n_calib, 1)), cls_data(n_eval, 2)
    if kind == "rec":
        return per_sample(rec_data(n_calib, 1)[0]), rec_data(n_eval, 2)
    return per_sample(det_data(n_calib, 1)), det_data(n_eval, 2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="digits,cls")
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--budgets", default="100,300", help="distillation step budgets")
    ap.add_argument("--calib", type=int, default=64, help="OCR calibration samples (rendered)")
    ap.add_argument("--eval", type=int, default=64, help="OCR evaluation samples (rendered)")
    ap.add_argument("--no-int8", action="store_true")
    ap.add_argument("--adaround-iters", type=int, default=1000, help="AdaRound steps per layer")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "recovery.md"))
    args = ap.parse_args()
    budgets = [int(b) for b in args.budgets.split(",") if b]
    rows: list[str] = []
    t_start = time.time()

    def row(kind: str, what: str, metric: str, value: float, ref: float, extra: str, s: float):
        line = (
            f"| {kind} | {what} | {metric} | {value:.4f} | {ref:.4f} | {extra} | {s:.1f} | "
            f"{os.getloadavg()[0]:.1f} |"
        )
        rows.append(line)
        print(line, flush=True)

    for kind in args.models.split(","):
        original = load(kind)
        calib, ev = data(kind, args.calib, args.eval)
        plans: list[tuple[str, Any, int]] = [("none", "none", 0), ("least squares", True, 0)]
        plans += [(f"distill {b} steps", "distill", b) for b in budgets]
        for label, recover, steps in plans:
            t0 = time.perf_counter()
            r = prune(
                original,
                args.ratio,
                calib=calib,
                round_to=8,
                recover=recover,
                steps=max(steps, 1),
                min_sqnr=0,
            )
            s = time.perf_counter() - t0
            metric, value, ref = fidelity(kind, original, r.model, ev)
            tr = r.training
            extra = f"MACs {r.macs_ratio:.2f}x, SQNR {r.fidelity[0].sqnr_db:.1f} dB"
            if tr is not None:
                extra += f", {tr.steps} steps ({tr.stopped})"
            row(kind, f"prune {args.ratio:g} + {label}", metric, value, ref, extra, s)
        if args.no_int8:
            continue
        int8: list[tuple[str, dict[str, Any]]] = [
            ("int8 static", {}),
            ("int8 AdaRound", {"rounding": "adaround", "rounding_iters": args.adaround_iters}),
            (f"int8 QAT {budgets[-1]} steps", {"qat": True, "steps": budgets[-1]}),
        ]
        for label, opts in int8:
            t0 = time.perf_counter()
            q = quantize(original, calib, min_sqnr=0, **opts)
            s = time.perf_counter() - t0
            metric, value, ref = fidelity(kind, original, q.model, ev)
            sq = q.verify.outputs[0].sqnr_db if q.verify is not None else float("nan")
            row(kind, label, metric, value, ref, f"SQNR {sq:.1f} dB (calib samples)", s)
    head = [
        f"# Recovery benchmark ({_dt.date.today()}, {platform.machine()}, "
        f"{os.cpu_count()} cores, shared: load in the last column)",
        "",
        f"`nice -n 10 python bench/recovery.py --models {args.models} --ratio {args.ratio:g} "
        f"--budgets {args.budgets}`; {time.time() - t_start:.0f} s in all.",
        "",
        "| model | method | metric | value | fp32 | notes | s | load |",
        "|---|---|---|---|---|---|---|---|",
    ]
    text = "\n".join(head + rows) + "\n"
    atomic_write_text(Path(args.out), text)
    print(text)


if __name__ == "__main__":
    main()
