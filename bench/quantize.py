"""graphopt int8 quantization against onnxruntime.quantization.quantize_static on PP-OCRv4.

For det, rec and cls: quantize with graphopt (MSE and Entropy) and with onnxruntime (MinMax,
Entropy, Percentile; uint8 activations + reduce_range, and its defaults), each job in its own
subprocess (wall time, peak RSS from getrusage, an RSS watchdog that kills a job above
--mem-cap-gb), then measure:

- latency int8 vs fp32: onnxruntime ORT_ENABLE_ALL, intra_op threads fixed, spinning off, A/B
  interleaved, medians; det at 1x3x320x320, rec 1x3x48x320, cls 1x3x48x192;
- fidelity on rendered data the calibration never saw: det IoU of the map binarized at 0.3 against
  fp32; rec CTC character accuracy against ground truth; cls top-1 agreement with fp32;
- RapidOCR end to end (rapidocr_onnxruntime.RapidOCR with the three model paths swapped) character
  accuracy on rendered pages.

Writes bench/results/quantize.md and prints it. Usage: python bench/quantize.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.ocr_data import (  # noqa: E402
    char_accuracy,
    cls_preprocess,
    ctc_decode,
    det_preprocess,
    pages,
    rec_preprocess,
    text_lines,
)
from graphopt.core.latency import interleaved  # noqa: E402
from graphopt.core.output import atomic_write_text  # noqa: E402

LAT_SHAPES = {"det": (1, 3, 320, 320), "rec": (1, 3, 48, 320), "cls": (1, 3, 48, 192)}
ORT_METHODS = ("MinMax", "Entropy", "Percentile")


# ---------------------------------------------------------------------- data


def make_calibration(d: Path, n_rec: int, n_det: int, n_cls: int) -> dict[str, Path]:
    """Calibration sets as .npz (and a folder of per-width .npz for rec)."""
    out = {}
    lines = text_lines(max(n_rec, n_cls), seed=1)
    # rec: variable widths, bucketed to multiples of 32 so batches share a shape (like RapidOCR)
    rec_dir = d / "rec_calib"
    rec_dir.mkdir(exist_ok=True)
    buckets: dict[int, list[np.ndarray]] = {}
    for img, _ in lines[:n_rec]:
        x = rec_preprocess(img, width=None)
        w = min(320, int(np.ceil(x.shape[2] / 32) * 32))
        pad = np.zeros((3, 48, w), np.float32)
        pad[:, :, : min(w, x.shape[2])] = x[:, :, :w]
        buckets.setdefault(w, []).append(pad)
    for w, xs in sorted(buckets.items()):
        np.savez(rec_dir / f"w{w:04d}.npz", x=np.stack(xs))
    out["rec"] = rec_dir
    # onnxruntime's calibrator needs one shape per input: the same lines padded to 320
    np.savez(d / "rec_320.npz", x=np.stack([rec_preprocess(i, 320) for i, _ in lines[:n_rec]]))
    out["rec_ort"] = d / "rec_320.npz"
    # a quarter of the samples, for timing onnxruntime's Entropy when the full set exceeds the cap
    np.savez(
        d / "rec_320_quarter.npz",
        x=np.stack([rec_preprocess(i, 320) for i, _ in lines[: max(n_rec // 4, 1)]]),
    )
    out["rec_ort_quarter"] = d / "rec_320_quarter.npz"
    np.savez(d / "det.npz", x=np.concatenate([det_preprocess(p) for p, _ in pages(n_det, seed=2)]))
    out["det"] = out["det_ort"] = d / "det.npz"
    cls = []
    for k, (img, _) in enumerate(lines[:n_cls]):
        cls.append(cls_preprocess(img if k % 2 == 0 else img[::-1, ::-1].copy()))
    np.savez(d / "cls.npz", x=np.stack(cls))
    out["cls"] = out["cls_ort"] = d / "cls.npz"
    return out


# ---------------------------------------------------------------------- workers (subprocesses)


def worker(spec: dict) -> dict:
    """One quantization job; runs in a fresh process."""
    t0 = time.perf_counter()
    info: dict = {}
    if spec["tool"] == "graphopt":
        import graphopt.passes  # noqa: F401
        from graphopt.core.saver import save
        from graphopt.jobs.quantize import quantize

        res = quantize(
            spec["model"],
            spec["calib"],
            method=spec["method"],
            batch_size=spec.get("batch_size", 8),
            eval_samples=4,
        )
        save(res.model, spec["out"])
        info = {
            "calib_seconds": res.calib_seconds,
            "kept_float": len(res.kept_float),
            "layers_int8": res.summary()["layers_int8"],
            "activations": res.activation_dtype,
            "reduce_range": res.reduce_range,
        }
    else:
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )

        class Reader(CalibrationDataReader):
            def __init__(self, path: str) -> None:
                self.x = np.load(path)["x"]
                self.i = 0

            def get_next(self) -> dict | None:
                if self.i >= len(self.x):
                    return None
                self.i += 1
                return {"x": self.x[self.i - 1 : self.i]}

        u8 = spec["variant"] == "u8rr"
        quantize_static(
            spec["model"],
            spec["out"],
            Reader(spec["calib"]),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8 if u8 else QuantType.QInt8,
            weight_type=QuantType.QInt8,
            reduce_range=u8,
            per_channel=False,
            calibrate_method=getattr(CalibrationMethod, spec["method"]),
        )
    info["seconds"] = time.perf_counter() - t0
    info["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return info


def run_job(spec: dict, mem_cap: float, timeout: float) -> dict:
    """Run ``worker(spec)`` in a subprocess with an RSS watchdog."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]
    killed = [""]

    def watch() -> None:
        while p.poll() is None:
            try:
                with open(f"/proc/{p.pid}/status") as f:
                    for line in f:
                        if line.startswith("VmRSS:"):
                            rss = int(line.split()[1]) * 1024
                            peak[0] = max(peak[0], rss)
                            if rss > mem_cap:
                                killed[0] = f"killed above {mem_cap / 2**30:.0f} GB"
                                p.kill()
            except OSError:
                pass
            if time.perf_counter() - t0 > timeout:
                killed[0] = f"killed after {timeout:.0f} s"
                p.kill()
            time.sleep(0.05)

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    out, err = p.communicate()
    th.join()
    wall = time.perf_counter() - t0
    if killed[0] or p.returncode != 0:
        last = (err.strip().splitlines() or ["?"])[-1][:160]
        return {"error": killed[0] or f"failed: {last}", "seconds": wall, "peak_rss": peak[0]}
    info = json.loads(out.strip().splitlines()[-1])
    info["peak_rss"] = max(info.get("peak_rss", 0), peak[0])
    return info


# ---------------------------------------------------------------------- evaluation


def session(path: str | Path, threads: int = 2):  # noqa: ANN201
    import onnxruntime as ort

    from graphopt.core.session import session_options

    return ort.InferenceSession(
        str(path), session_options("all", threads=threads), providers=["CPUExecutionProvider"]
    )


def latency(fp32: Path, int8: Path, shape: tuple[int, ...], runs: int) -> tuple[float, float]:
    """Median seconds of the float and the int8 model, interleaved (A B, B A, ...)."""
    sa, sb = session(fp32), session(int8)
    x = {"x": np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)}
    t = interleaved(
        {"a": lambda: sa.run(None, x), "b": lambda: sb.run(None, x)}, runs=runs, warmup=1
    )
    return t.median_ms("a") / 1e3, t.median_ms("b") / 1e3


class EvalData:
    def __init__(self, n_rec: int, n_det: int, n_cls: int) -> None:
        lines = text_lines(n_rec, seed=999)
        self.rec_x = np.stack([rec_preprocess(i, 320) for i, _ in lines])
        self.rec_truth = [t for _, t in lines]
        self.det_x = [det_preprocess(p) for p, _ in pages(n_det, seed=77)]
        cl = text_lines(n_cls, seed=555)
        self.cls_x = np.stack(
            [cls_preprocess(i if k % 2 else i[::-1, ::-1].copy()) for k, (i, _) in enumerate(cl)]
        )
        self.fp32: dict[str, Any] = {}


def fidelity(name: str, path: Path, data: EvalData, fp32_path: Path) -> float:
    s = session(path)
    if name == "rec":
        preds = []
        for i in range(0, len(data.rec_x), 16):
            preds += ctc_decode(s.run(None, {"x": data.rec_x[i : i + 16]})[0])
        return char_accuracy(preds, data.rec_truth)
    if name == "det":
        if "det" not in data.fp32:
            sf = session(fp32_path)
            data.fp32["det"] = [sf.run(None, {"x": x})[0] > 0.3 for x in data.det_x]
        inter = union = 0
        for x, ref in zip(data.det_x, data.fp32["det"], strict=False):
            m = s.run(None, {"x": x})[0] > 0.3
            inter += int(np.logical_and(m, ref).sum())
            union += int(np.logical_or(m, ref).sum())
        return inter / max(union, 1)
    if "cls" not in data.fp32:
        sf = session(fp32_path)
        data.fp32["cls"] = sf.run(None, {"x": data.cls_x})[0].argmax(1)
    return float((s.run(None, {"x": data.cls_x})[0].argmax(1) == data.fp32["cls"]).mean())


def end_to_end(models: dict[str, Path], n_pages: int) -> float:
    from rapidocr_onnxruntime import RapidOCR

    engine = RapidOCR(
        det_model_path=str(models["det"]),
        rec_model_path=str(models["rec"]),
        cls_model_path=str(models["cls"]),
        intra_op_num_threads=2,
        inter_op_num_threads=1,
    )
    preds, truths = [], []
    for img, lines in pages(n_pages, seed=4242):
        result, _ = engine(img[:, :, ::-1].copy())  # RapidOCR takes BGR like cv2
        found = sorted(
            result or [],
            key=lambda r: (np.mean([p[1] for p in r[0]]), np.mean([p[0] for p in r[0]])),
        )
        # PP-OCRv4 (a Chinese+English model) rarely emits the spaces between words: compare the
        # characters without whitespace
        preds.append("\n".join("".join(r[1].split()) for r in found))
        truths.append("\n".join("".join(t.split()) for t in lines))
    return char_accuracy(preds, truths)


# ---------------------------------------------------------------------- main


def fmt_gb(b: float) -> str:
    return f"{b / 2**30:.2f} GB"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker")
    ap.add_argument("--quick", action="store_true", help="fewer samples and runs")
    ap.add_argument("--models", default="det,rec,cls")
    ap.add_argument("--mem-cap-gb", type=float, default=8.0)
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "quantize.md"))
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    from graphopt.fixtures import real_model

    n_rec, n_det, n_cls = (32, 4, 32) if args.quick else (128, 16, 64)
    runs = 10 if args.quick else args.runs
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    tmp = Path(tempfile.mkdtemp(prefix="graphopt-bench-quant-"))
    calib = make_calibration(tmp, n_rec, n_det, n_cls)
    data = EvalData(64 if args.quick else 300, 4 if args.quick else 12, 64 if args.quick else 200)
    fp32 = {n: real_model(n)[0] for n in ("det", "rec", "cls")}
    configs = [("graphopt", "mse", ""), ("graphopt", "entropy", "")]
    configs += [("ort", m, v) for v in ("u8rr", "default") for m in ORT_METHODS]
    rows: list[dict] = []
    outputs: dict[tuple[str, str, str, str], Path] = {}
    for name in names:
        for tool, method, variant in configs:
            out = tmp / f"{name}_{tool}_{method}_{variant or 'auto'}.onnx"
            spec = {
                "tool": tool,
                "method": method,
                "variant": variant,
                "model": str(fp32[name]),
                "out": str(out),
                "calib": str(calib[name if tool == "graphopt" else f"{name}_ort"]),
            }
            info = run_job(spec, args.mem_cap_gb * 2**30, args.timeout)
            row = {"model": name, "tool": tool, "method": method, "variant": variant, **info}
            if "error" not in info:
                try:
                    t32, t8 = latency(fp32[name], out, LAT_SHAPES[name], runs)
                    row.update(
                        fp32_ms=t32 * 1e3,
                        int8_ms=t8 * 1e3,
                        speedup=t32 / t8,
                        fidelity=fidelity(name, out, data, fp32[name]),
                    )
                    outputs[(name, tool, method, variant)] = out
                except Exception as exc:  # noqa: BLE001 - e.g. a model onnxruntime cannot load
                    row["error"] = f"does not run: {str(exc).splitlines()[0][:120]}"
            rows.append(row)
            print(
                json.dumps(
                    {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
                ),
                file=sys.stderr,
                flush=True,
            )
            if (
                name == "rec"
                and tool == "ort"
                and method == "Entropy"
                and variant == "u8rr"
                and "error" in info
            ):
                # the full set did not fit: time onnxruntime's Entropy on a quarter of it
                spec = dict(spec, calib=str(calib["rec_ort_quarter"]), out=str(out) + ".q.onnx")
                info = run_job(spec, args.mem_cap_gb * 2**30, args.timeout)
                rows.append(
                    {
                        "model": name,
                        "tool": tool,
                        "method": "Entropy",
                        "variant": variant,
                        "quarter": True,
                        **info,
                        "note": f"{max(n_rec // 4, 1)} samples (a quarter)",
                    }
                )
    base_fid = {n: fidelity(n, fp32[n], data, fp32[n]) for n in names}
    e2e = {}
    if set(names) == {"det", "rec", "cls"}:
        n_pages = 6 if args.quick else 12
        e2e["fp32"] = end_to_end(fp32, n_pages)
        for label, key in (
            ("graphopt mse", ("graphopt", "mse", "")),
            ("graphopt entropy", ("graphopt", "entropy", "")),
            ("onnxruntime Entropy u8+rr", ("ort", "Entropy", "u8rr")),
            ("onnxruntime Entropy default", ("ort", "Entropy", "default")),
        ):
            ms = {n: outputs.get((n, *key)) for n in names}
            if all(ms.values()):
                try:
                    e2e[label] = end_to_end(ms, n_pages)  # type: ignore[arg-type]
                except Exception as exc:  # noqa: BLE001 - report, do not lose the other rows
                    print(f"end to end {label} failed: {exc}", file=sys.stderr)
    md = report(rows, base_fid, e2e, n_rec, n_det, n_cls, runs, args.quick)
    atomic_write_text(args.out, md)
    print(md)
    return 0


def report(
    rows: list[dict],
    base_fid: dict,
    e2e: dict,
    n_rec: int,
    n_det: int,
    n_cls: int,
    runs: int,
    quick: bool,
) -> str:
    import platform

    import onnxruntime as ort

    from graphopt.algorithms.quant.graph import choose_activation_type

    dt, rr, why = choose_activation_type("auto")
    fid_name = {
        "det": "IoU of map>0.3 vs fp32",
        "rec": "char accuracy (ground truth)",
        "cls": "top-1 agreement with fp32",
    }
    lines = [
        "# int8 quantization: graphopt vs onnxruntime quantize_static (PP-OCRv4)",
        "",
        f"Date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"{platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, onnxruntime {ort.__version__}. **The machine was shared with "
        "other engineers' jobs while this ran: latencies are noisy; ratios come from interleaved "
        f"A/B medians of {runs} runs** (ORT_ENABLE_ALL, 2 intra-op threads, spinning off).",
        f"graphopt `--activations auto` chose {dt} activations, reduce_range={rr} ({why}).",
        f"Calibration: rec {n_rec} rendered text lines (variable widths for graphopt, padded to "
        f"320 for onnxruntime, whose calibrator needs one shape), det {n_det} rendered pages at "
        f"320x320, cls {n_cls} lines (half rotated 180). Evaluation data is rendered with other "
        "seeds (never seen in calibration). onnxruntime jobs use per_channel=False (per-channel "
        "output does not load for these opset 11/12 models) and get the published fp32 model.",
        "" if not quick else "**--quick run: small sample counts.**",
        "",
        "| model | tool | method | activations | fp32 ms | int8 ms | speedup | fidelity | "
        "calib wall s | peak RSS | note |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for n in sorted({r["model"] for r in rows}, key=["det", "rec", "cls"].index):
        lines.append(f"| {n} | fp32 | - | - | | | 1.00x | {base_fid[n]:.4f} | | | {fid_name[n]} |")
        for r in (r for r in rows if r["model"] == n):
            act = (
                "auto"
                if r["tool"] == "graphopt"
                else ("uint8 + reduce_range" if r["variant"] == "u8rr" else "defaults (int8)")
            )
            if "error" in r or r.get("quarter"):
                note = r.get("error", "")
                if r.get("quarter"):
                    note = r["note"] + (", calibration only" if not note else f": {note}")
                lines.append(
                    f"| {n} | {r['tool']} | {r['method']} | {act} | | | | | "
                    f"{r['seconds']:.1f} | {fmt_gb(r['peak_rss'])} | {note} |"
                )
                continue
            note = f"calibration {r['calib_seconds']:.1f} s" if "calib_seconds" in r else ""
            if r.get("kept_float"):
                note += f"; {r['kept_float']} kept float"
            lines.append(
                f"| {n} | {r['tool']} | {r['method']} | {act} | {r['fp32_ms']:.1f} | "
                f"{r['int8_ms']:.1f} | {r['speedup']:.2f}x | {r['fidelity']:.4f} | "
                f"{r['seconds']:.1f} | {fmt_gb(r['peak_rss'])} | {note} |"
            )
    if e2e:
        lines += [
            "",
            f"RapidOCR end to end ({'6' if quick else '12'} rendered pages, 6 lines "
            "each; character accuracy of the page text without whitespace, lines ordered top "
            "to bottom):",
            "",
            "| models | char accuracy |",
            "|---|---:|",
        ]
        lines += [f"| {k} | {v:.4f} |" for k, v in e2e.items()]
    ent = [r for r in rows if r["model"] == "rec" and r["method"].lower() == "entropy"]
    g = next((r for r in ent if r["tool"] == "graphopt"), None)
    o = next(
        (r for r in ent if r["tool"] == "ort" and r["variant"] == "u8rr" and not r.get("quarter")),
        None,
    )
    oq = next((r for r in ent if r.get("quarter")), None)
    if g and o:
        if "error" not in o:
            text = (
                f"onnxruntime {o['seconds']:.1f} s, peak {fmt_gb(o['peak_rss'])}; ratio "
                f"{o['seconds'] / g['seconds']:.1f}x"
            )
        else:
            text = f"onnxruntime did not finish ({o['error']} after {o['seconds']:.1f} s)"
            if oq and "error" in oq:
                text += (
                    f"; on a quarter of the samples it did not finish either "
                    f"({oq['error']} after {oq['seconds']:.1f} s)"
                )
            if oq and "error" not in oq:
                text += (
                    f"; on a quarter of the samples it took {oq['seconds']:.1f} s and "
                    f"{fmt_gb(oq['peak_rss'])}: graphopt on all {n_rec} samples is "
                    f"{oq['seconds'] / g['seconds']:.1f}x faster than onnxruntime on "
                    f"{max(n_rec // 4, 1)}"
                )
        lines += [
            "",
            f"Entropy calibration on {n_rec} rec samples: graphopt "
            f"{g['seconds']:.1f} s wall (whole job incl. optimization and checks; "
            f"calibration itself {g.get('calib_seconds', float('nan')):.1f} s), peak "
            f"{fmt_gb(g['peak_rss'])}; {text}.",
        ]
    ok = {
        r["model"]: r
        for r in rows
        if r["tool"] == "graphopt" and r["method"] == "mse" and "error" not in r
    }
    goals = []
    for n in ("det", "rec"):
        if n in ok:
            goals.append(f"{n} int8 speedup {ok[n]['speedup']:.2f}x (goal >= 1.5x)")
    if "rec" in ok:
        goals.append(f"rec char accuracy {ok['rec']['fidelity']:.4f} (goal >= 0.977)")
    if "graphopt mse" in e2e:
        goals.append(f"RapidOCR end to end {e2e['graphopt mse']:.4f} (goal >= 0.98)")
    if goals:
        lines += ["", "Goals (graphopt, default method mse): " + "; ".join(goals) + "."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
