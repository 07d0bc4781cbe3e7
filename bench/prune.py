"""Structured-pruning benchmark: MACs, onnxruntime latency and task fidelity, with and without
recovery, on PP-OCRv4 det/rec, the v2 orientation classifier and the digits fixture.

For every model and ratio (round_to 8 unless said otherwise), the model is pruned by the
``prune-channels`` pass (l1 criterion) without and with least-squares recovery on rendered
calibration data (bench/ocr_data.py), then:

- MACs after / before (graphopt.core.cost) and the share of MACs in prunable groups;
- onnxruntime latency speedup: original and pruned sessions (ORT_ENABLE_ALL, 1 intra-op thread,
  spinning off) run interleaved A, B, B, A, ... on the same input; the ratio of medians;
- fidelity on held-out rendered data (different seed than the calibration data):
  cls: top-1 agreement with the original on text crops (half of them rotated 180 degrees);
  det: mean IoU of the probability maps binarized at 0.3 (pruned vs original);
  rec: character accuracy (1 - edit distance / length) of the CTC-decoded text against the
  ground truth, with the original's accuracy beside it;
  digits: accuracy on digits_eval.npz, with the original's beside it.
- every pruned model passes onnx.checker (full_check) and runs in onnxruntime.

Run: ``python bench/prune.py [--quick]``; writes bench/results/prune.md and prints it.
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
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import ocr_data  # noqa: E402
from graphopt.algorithms.prune import analyze, prunable_macs  # noqa: E402
from graphopt.core.cost import model_cost  # noqa: E402
from graphopt.core.latency import interleaved  # noqa: E402
from graphopt.core.loader import load as load_model  # noqa: E402
from graphopt.core.model import Model  # noqa: E402
from graphopt.core.output import atomic_write_text  # noqa: E402
from graphopt.core.session import make_session  # noqa: E402
from graphopt.core.shapes import fix_input_shapes, infer_shapes  # noqa: E402
from graphopt.fixtures import fixture_path, real_model  # noqa: E402
from graphopt.passes import get_pass  # noqa: E402

THREADS = 1


# ------------------------------------------------------------------------------ data
def cls_data(n: int, seed: int) -> np.ndarray:
    xs = []
    for i, (img, _) in enumerate(ocr_data.text_lines(n, seed=seed)):
        if i % 2:
            img = img[::-1, ::-1]
        xs.append(ocr_data.cls_preprocess(img))
    return np.stack(xs).astype(np.float32)


def rec_data(n: int, seed: int) -> tuple[np.ndarray, list[str]]:
    lines = ocr_data.text_lines(n, seed=seed)
    return ocr_data.rec_batch([img for img, _ in lines]), [t for _, t in lines]


def det_data(n: int, seed: int) -> np.ndarray:
    return np.concatenate([ocr_data.det_preprocess(img) for img, _ in ocr_data.pages(n, seed=seed)])


def per_sample(x: np.ndarray) -> list[dict[str, np.ndarray]]:
    return [{"x": x[i : i + 1]} for i in range(len(x))]


def run_all(model: Model, x: np.ndarray) -> np.ndarray:
    s = make_session(model, "all", threads=THREADS)
    name = s.get_inputs()[0].name
    return np.concatenate([s.run(None, {name: x[i : i + 1]})[0] for i in range(len(x))])


# ------------------------------------------------------------------------------ metrics
def latency_speedup(
    a: Model, b: Model, x: np.ndarray, rounds: int, budget_s: float = 4.0
) -> tuple[float, float, float]:
    """(median of per-pair speedups, median ms of a, median ms of b). Pairs run back to back in
    alternating order, so load changes on the shared machine hit both sides of a pair alike; at
    least ``rounds`` pairs, more while within ``budget_s``."""
    sa = make_session(a, "all", threads=THREADS)
    sb = make_session(b, "all", threads=THREADS)
    name = sa.get_inputs()[0].name
    feed = {name: x[:1]}
    t = interleaved(
        {"a": lambda: sa.run(None, feed), "b": lambda: sb.run(None, feed)},
        runs=rounds,
        warmup=3,
        budget_s=budget_s,
    )
    return t.ratio("a", "b", paired=True), t.median_ms("a"), t.median_ms("b")


def fidelity(kind: str, ref_model: Model, model: Model, ev: Any) -> tuple[str, float, float]:
    """(metric name, pruned value, original value)."""
    if kind == "cls":
        ref = run_all(ref_model, ev).argmax(1)
        out = run_all(model, ev).argmax(1)
        return "top-1 agreement", float((ref == out).mean()), 1.0
    if kind == "det":
        ref = run_all(ref_model, ev) > 0.3
        out = run_all(model, ev) > 0.3
        ious = [float((r & o).sum()) / max(float((r | o).sum()), 1.0) for r, o in zip(ref, out)]
        return "map IoU@0.3", float(np.mean(ious)), 1.0
    if kind == "rec":
        x, truth = ev
        chars = ocr_data.rec_characters()
        acc_o = ocr_data.char_accuracy(ocr_data.ctc_decode(run_all(ref_model, x), chars), truth)
        acc_p = ocr_data.char_accuracy(ocr_data.ctc_decode(run_all(model, x), chars), truth)
        return "char accuracy", acc_p, acc_o
    x, y = ev
    acc_o = float((make_session(ref_model).run(None, {"x": x})[0].argmax(1) == y).mean())
    acc_p = float((make_session(model).run(None, {"x": x})[0].argmax(1) == y).mean())
    return "accuracy", acc_p, acc_o


# ------------------------------------------------------------------------------ main
def load(kind: str) -> Model:
    if kind == "digits":
        return load_model(fixture_path("digits_cnn.onnx"))
    path, shapes = real_model(kind)
    m = load_model(path)
    fix_input_shapes(m, shapes)
    infer_shapes(m)
    return m


def prunable_share(m: Model) -> float:
    w = m.clone()
    if any(not isinstance(d, int) for t in w.graph.inputs for d in (t.shape or [])):
        fix_input_shapes(
            w,
            {
                t.name: tuple(d if isinstance(d, int) else 1 for d in t.shape)
                for t in w.graph.inputs
            },
        )
    infer_shapes(w)
    an = analyze(w)
    pr, total = prunable_macs(an, {nc.name: nc.macs for nc in model_cost(w).nodes})
    return pr / total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer ratios, data and runs")
    ap.add_argument("--models", default="cls,digits,rec,det")
    args = ap.parse_args()
    q = args.quick
    rounds = 10 if q else 40
    t_start = time.time()
    load0 = os.getloadavg()[0]
    data: dict[str, tuple[Any, Any]] = {}
    for kind in args.models.split(","):
        if kind == "cls":
            data[kind] = (per_sample(cls_data(16 if q else 48, 1)), cls_data(64 if q else 200, 2))
        elif kind == "rec":
            xr, _ = rec_data(8 if q else 16, 1)
            data[kind] = (per_sample(xr), rec_data(16 if q else 64, 2))
        elif kind == "det":
            data[kind] = (per_sample(det_data(4 if q else 8, 1)), det_data(4 if q else 12, 2))
        elif kind == "digits":
            cal = np.load(fixture_path("digits_calib.npz"))["x"]
            ev = np.load(fixture_path("digits_eval.npz"))
            data[kind] = (
                [{"x": cal[i : i + 32]} for i in range(0, len(cal), 32)],
                (ev["x"], ev["y"]),
            )
    # (ratio, round_to, recover, criterion)
    plans: dict[str, list[tuple[float, int | None, bool, str]]] = {
        "cls": [
            (0.1, 8, False, "l1"),
            (0.1, 8, True, "l1"),
            (0.15, None, True, "l1"),
            (0.15, 8, True, "l1"),
            (0.15, 8, True, "bn"),
            (0.15, 8, True, "activation"),
            (0.2, 8, True, "l1"),
            (0.3, 8, False, "l1"),
            (0.3, 8, True, "l1"),
        ],
        "digits": [
            (0.2, None, False, "l1"),
            (0.2, None, True, "l1"),
            (0.3, None, True, "l1"),
            (0.3, 8, True, "l1"),
        ],
        "rec": [
            (0.1, 8, True, "l1"),
            (0.1, 8, True, "activation"),
            (0.3, 8, False, "l1"),
            (0.3, 8, True, "l1"),
        ],
        "det": [(0.1, 8, True, "l1"), (0.3, 8, False, "l1"), (0.3, 8, True, "l1")],
    }
    if q:
        plans = {k: [p for p in v if p[0] in (0.15, 0.2, 0.3)][:2] for k, v in plans.items()}
    rows = []
    shares = {}
    for kind in args.models.split(","):
        m = load(kind)
        shares[kind] = prunable_share(m)
        calib, ev = data[kind]
        for ratio, rt, rec, crit in plans[kind]:
            t0 = time.time()
            res = get_pass(
                "prune-channels",
                ratio=ratio,
                round_to=rt,
                recover=rec,
                criterion=crit,
                calib=calib if (rec or crit == "activation") else None,
            )(m.clone())
            secs = time.time() - t0
            pm = res.model
            onnx.checker.check_model(pm.to_onnx(), full_check=True)
            macs = res.stats["macs_after"] / res.stats["macs_before"]
            x_lat = ev[0] if isinstance(ev, tuple) else ev
            sp, ta, tb = latency_speedup(m, pm, x_lat, rounds)
            metric, val, orig = fidelity(kind, m, pm, ev)
            rows.append((kind, ratio, rt, rec, crit, macs, sp, ta, tb, metric, val, orig, secs))
            print(
                f"{kind} r={ratio} round_to={rt} recover={rec} {crit}: MACs {macs:.3f}x, "
                f"latency {sp:.2f}x ({ta:.2f} -> {tb:.2f} ms), {metric} {val:.3f} "
                f"(orig {orig:.3f}), {secs:.1f}s",
                flush=True,
            )
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Structured channel pruning (prune-channels)",
        "",
        f"{now}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"onnxruntime ORT_ENABLE_ALL, {THREADS} intra-op thread, spinning off. The machine was "
        "shared with other engineers' jobs while this ran (load average "
        f"{load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end, on {os.cpu_count()} "
        "cores): "
        "latencies are noisy; the speedup is the median over back-to-back A/B pairs in "
        f"alternating order (at least {rounds} pairs, more within 4 s).",
        "",
        "Criterion l1 unless said; recovery = least-squares refit of every weight layer on "
        "rendered calibration data (cls 48 crops, rec 16 lines, det 8 pages, digits 128 images); "
        "fidelity on held-out data rendered with another seed.",
        "",
        "Prunable compute (MACs of weight layers touching a free channel group): "
        + ", ".join(f"{k} {v * 100:.1f}%" for k, v in shares.items())
        + ".",
        "",
        "| model | ratio | round_to | criterion | recovery | MACs after/before | ORT speedup "
        "| ms before -> after | fidelity | pruned | original | prune time s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, ratio, rt, rec, crit, macs, sp, ta, tb, metric, val, orig, secs in rows:
        lines.append(
            f"| {kind} | {ratio} | {rt or '-'} | {crit} | {'yes' if rec else 'no'} "
            f"| {macs:.3f}x "
            f"| {sp:.2f}x | {ta:.2f} -> {tb:.2f} | {metric} | {val:.3f} | {orig:.3f} "
            f"| {secs:.1f} |"
        )
    lines += ["", f"Total benchmark time {time.time() - t_start:.0f} s."]
    text = "\n".join(lines) + "\n"
    out = ROOT / "bench" / "results" / "prune.md"
    atomic_write_text(out, text)
    print(text)


if __name__ == "__main__":
    main()
