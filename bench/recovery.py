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


def digits_unlabeled(n: int) -> np.ndarray:
    """The first ``n`` inputs of the digits fixture's training split (fixtures/build.py: the
    same ``train_test_split`` of scikit-learn's digits), without their labels: the fixture's
    ``digits_calib.npz`` is its first 128; ``digits_eval.npz`` is the disjoint test split."""
    cal = np.load(fixture_path("digits_calib.npz"))["x"]
    if n <= len(cal):
        return cal[:n]
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = (d.images / 16.0).astype(np.float32)[:, None, :, :]
    x_train = train_test_split(images, d.target, test_size=0.3, random_state=0)[0]
    if not np.array_equal(x_train[: len(cal)], cal):
        raise RuntimeError("the digits training split differs from the fixture's calibration")
    return np.asarray(x_train[:n])


def data(
    kind: str, n_calib: int, n_eval: int, n_digits: int = 128
) -> tuple[list[dict[str, np.ndarray]], Any]:
    """(calibration feeds, evaluation data for :func:`bench.prune.fidelity`)."""
    if kind == "digits":
        cal = digits_unlabeled(n_digits)
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
    ap.add_argument(
        "--distill-calib",
        type=int,
        default=0,
        help="unlabeled samples for distillation (OCR: more rendered crops/pages; digits: more "
        "inputs of the fixture's training split, at most 1257); 0: --calib (digits: 128)",
    )
    ap.add_argument("--time-budget", type=float, default=None, help="seconds per distillation")
    ap.add_argument("--eval", type=int, default=64, help="OCR evaluation samples (rendered)")
    ap.add_argument("--no-int8", action="store_true")
    ap.add_argument("--adaround-iters", type=int, default=1000, help="AdaRound steps per layer")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "recovery.md"))
    ap.add_argument("--append", action="store_true", help="add a section to --out")
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
        n_more = args.distill_calib
        more = data(kind, n_more, args.eval, n_more)[0] if n_more else calib
        plans: list[tuple[str, Any, int]] = [("none", "none", 0), ("least squares", True, 0)]
        plans += [(f"distill {b} steps", "distill", b) for b in budgets]
        for label, recover, steps in plans:
            t0 = time.perf_counter()
            feeds = more if recover == "distill" else calib
            r = prune(
                original,
                args.ratio,
                calib=feeds,
                round_to=8,
                recover=recover,
                steps=max(steps, 1),
                time_budget=args.time_budget if recover == "distill" else None,
                calib_limit=max(len(feeds), 128),
                min_sqnr=0,
            )
            s = time.perf_counter() - t0
            metric, value, ref = fidelity(kind, original, r.model, ev)
            tr = r.training
            extra = f"MACs {r.macs_ratio:.2f}x, SQNR {r.fidelity[0].sqnr_db:.1f} dB"
            if tr is not None:
                extra += (
                    f", {tr.steps} steps ({tr.stopped}), {tr.train_samples} unlabeled samples "
                    f"({tr.held_out_samples} held out)"
                )
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
        f"--budgets {args.budgets}"
        + (f" --calib {args.calib}" if args.models != "digits" else "")
        + (f" --distill-calib {args.distill_calib}" if args.distill_calib else "")
        + (f" --time-budget {args.time_budget:g}" if args.time_budget else "")
        + (" --no-int8" if args.no_int8 else "")
        + f"`; {time.time() - t_start:.0f} s in all.",
        "",
        "| model | method | metric | value | fp32 | notes | s | load |",
        "|---|---|---|---|---|---|---|---|",
    ]
    text = "\n".join(head + rows) + "\n"
    out = Path(args.out)
    if args.append and out.is_file():
        now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        section = ["", f"## {now}, load {os.getloadavg()[0]:.1f}", ""] + head[2:] + rows
        text = out.read_text() + "\n".join(section) + "\n"
    atomic_write_text(out, text)
    print(text)


if __name__ == "__main__":
    main()
