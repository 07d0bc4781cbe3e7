"""Graph simplifiers side by side on the published models: graphopt vs onnx-simplifier, onnxslim,
onnxoptimizer and onnxruntime's offline optimizer (BASIC, EXTENDED).

Every tool gets the same input: the published model with its input dims fixed (det 1x3x640x640, rec
1x3x48x320, cls 1x3x48x192; silero-vad state 2x1x128 with its audio input left dynamic, run on
1x512) and nothing else changed. Each tool runs in its own subprocess (a crash or hang becomes
``failed: <reason>``), timed from load to save. Then, in this process: node count (subgraphs
included), max abs error of every output against the original (both run with onnxruntime at
DISABLE_ALL), and onnxruntime CPU latency at DISABLE_ALL and ENABLE_ALL, interleaved round-robin
over all candidates, median of many runs, intra-op threads fixed, spinning off. Writes
``bench/results/simplify.md`` and prints it.

Usage: ``python bench/simplify.py [--models det,rec,cls,silero] [--threads 1] [--rounds N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from graphopt.core.latency import interleaved
from graphopt.core.output import atomic_write_text

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "simplify.md"
#: bench shapes (det is benchmarked at 640x640, larger than the test shape)
SHAPES: dict[str, dict[str, tuple[int, ...]]] = {
    "det": {"x": (1, 3, 640, 640)},
    "rec": {"x": (1, 3, 48, 320)},
    "cls": {"x": (1, 3, 48, 192)},
    # silero's audio input stays dynamic: fixed to 1x512, its 8 kHz branch (which expects 256
    # samples) is statically inconsistent and onnxruntime refuses the model at BASIC and above
    "silero": {"state": (2, 1, 128), "sr": ()},
}
TOOLS = [
    "onnxsim",
    "onnxslim",
    "onnxoptimizer",
    "ort-basic",
    "ort-extended",
    "graphopt",
    "graphopt-ort",
]
ROUNDS = {"det": 15, "rec": 60, "cls": 150, "silero": 300}


# ------------------------------------------------------------------------------- helpers


def count_nodes(g: onnx.GraphProto) -> int:
    n = 0
    for node in g.node:
        n += 1
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                n += count_nodes(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                n += sum(count_nodes(s) for s in a.graphs)
    return n


def fix_inputs(src: Path, dst: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """Set the graph inputs' dims (nothing else is touched)."""
    m = onnx.load(str(src))
    for inp in m.graph.input:
        if inp.name in shapes:
            dims = inp.type.tensor_type.shape
            dims.ClearField("dim")
            for d in shapes[inp.name]:
                dims.dim.add().dim_value = int(d)
    onnx.save(m, str(dst))


def feeds_for(name: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    if name == "silero":  # 16 kHz, 512 samples
        return {
            "input": (rng.standard_normal((1, 512)) * 0.1).astype(np.float32),
            "state": np.zeros((2, 1, 128), np.float32),
            "sr": np.array(16000, np.int64),
        }
    return {k: rng.uniform(-1, 1, size=v).astype(np.float32) for k, v in SHAPES[name].items()}


def session(path: Path, level: str, threads: int) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "disable_all": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 4
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


# ------------------------------------------------------------------------------- workers


def run_tool(tool: str, src: str, dst: str, model_name: str) -> dict[str, Any]:
    """Optimize ``src`` into ``dst`` with ``tool`` (called in a subprocess)."""
    shapes = SHAPES[model_name]
    # imports are outside the timed region (a warm process, as in a service or a notebook)
    if tool == "onnxsim":
        import onnxsim
    elif tool == "onnxslim":
        import onnxslim
    elif tool == "onnxoptimizer":
        import onnxoptimizer
    elif tool.startswith("ort-"):
        import onnxruntime as ort
    else:
        import graphopt.passes  # noqa: F401  (registers the passes)
        from graphopt.core.loader import load
        from graphopt.core.saver import save
        from graphopt.jobs.optimize import optimize_model
    t0 = time.perf_counter()
    if tool == "onnxsim":
        m, ok = onnxsim.simplify(onnx.load(src), check_n=0)
        onnx.save(m, dst)
    elif tool == "onnxslim":
        spec = [f"{k}:{','.join(str(d) for d in v)}" for k, v in shapes.items() if v]
        m = onnxslim.slim(onnx.load(src), model_check=False, input_shapes=spec or None)
        onnx.save(m, dst)
    elif tool == "onnxoptimizer":
        m = onnxoptimizer.optimize(onnx.load(src))
        onnx.save(m, dst)
    elif tool in ("ort-basic", "ort-extended"):
        so = ort.SessionOptions()
        so.graph_optimization_level = (
            ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
            if tool == "ort-basic"
            else ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        )
        so.optimized_model_filepath = dst
        so.log_severity_level = 4
        ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    elif tool in ("graphopt", "graphopt-ort"):
        target = "ort" if tool == "graphopt-ort" else "portable"
        res = optimize_model(load(src), target=target, input_shapes=shapes, verify_output=False)
        save(res.model, dst)
    else:
        raise ValueError(tool)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "nodes": count_nodes(onnx.load(dst).graph)}


def spawn(tool: str, src: Path, dst: Path, model_name: str, timeout: float = 600) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", tool, str(src), str(dst), model_name]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode == 0 and lines:
        return json.loads(lines[-1])
    err = [ln for ln in (p.stderr or "").strip().splitlines() if ln.strip()]
    reason = err[-1] if err else f"exit code {p.returncode}"
    return {"error": reason[:160]}


# ------------------------------------------------------------------------------- main


def max_err(ref: list[np.ndarray], out: list[np.ndarray]) -> float:
    return max(
        float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0
        for a, b in zip(ref, out, strict=True)
    )


def bench_model(name: str, tmp: Path, threads: int, rounds: int | None) -> list[dict[str, Any]]:
    from graphopt.fixtures import real_model

    src, _ = real_model(name)
    fixed = tmp / f"{name}_fixed.onnx"
    fix_inputs(src, fixed, SHAPES[name])
    rows: list[dict[str, Any]] = [
        {
            "tool": "original",
            "path": fixed,
            "seconds": 0.0,
            "nodes": count_nodes(onnx.load(str(fixed)).graph),
        }
    ]
    for tool in TOOLS:
        dst = tmp / f"{name}_{tool}.onnx"
        r = spawn(tool, fixed, dst, name)
        if "error" in r and not tool.startswith("graphopt"):
            # a peer that fails at fixed shapes gets the published (dynamic) model as a second try
            first = r["error"]
            r = spawn(tool, Path(src), dst, name)
            r["note"] = f"published dynamic-shape model (fixed shapes failed: {first[:80]})"
            if "error" in r:
                r["error"] = first
        r.update(tool=tool, path=dst)
        rows.append(r)
        print(f"  {name:7s} {tool:14s} {r.get('nodes', r.get('error'))}", file=sys.stderr)
    feeds = feeds_for(name)
    ref_sess = session(fixed, "disable_all", threads)
    out_names = [o.name for o in ref_sess.get_outputs()]
    ref = ref_sess.run(out_names, feeds)
    sessions: list[tuple[dict[str, Any], str, Any]] = []
    for r in rows:
        if "error" in r:
            continue
        for lvl in ("disable_all", "all"):
            try:
                s0 = session(r["path"], lvl, threads)
                if lvl == "disable_all":
                    out = s0.run(out_names, feeds)
                    r["max_err"] = 0.0 if r["tool"] == "original" else max_err(ref, out)
                sessions.append((r, lvl, s0))
            except Exception as exc:  # noqa: BLE001 - a broken output is a result, not a crash
                msg = str(exc).replace("\n", " ")
                r[f"{lvl}_error"] = msg[:200]
                print(f"  {name} {r['tool']} @{lvl}: {msg[:300]}", file=sys.stderr)
    n = rounds or ROUNDS[name]
    runners = {
        f"{r['tool']}@{lvl}": (lambda s=s: s.run(out_names, feeds)) for r, lvl, s in sessions
    }
    t = interleaved(runners, runs=n, warmup=1)
    for r, lvl, _ in sessions:
        r[lvl] = t.median_ms(f"{r['tool']}@{lvl}")
    return rows


def fmt_row(name: str, r: dict[str, Any], base: dict[str, Any]) -> str:
    if "error" in r and "nodes" not in r:
        return f"| {name} | {r['tool']} | failed: {r['error']} | | | | |"

    def lat(k: str) -> str:
        if f"{k}_error" in r:
            return (
                "does not load"
                if "Load model" in r[f"{k}_error"] or "Inferenc" in r[f"{k}_error"]
                else "fails"
            )
        if k not in r:
            return "-"
        ratio = f" ({base[k] / r[k]:.2f}x)" if k in base and r["tool"] != "original" else ""
        return f"{r[k]:.2f}{ratio}"

    err = r.get("max_err")
    err_s = f"{err:.1e}" if isinstance(err, float) else "-"
    secs = f"{r['seconds']:.2f}" if r["tool"] != "original" else "-"
    tool = r["tool"] + (" *" if "note" in r else "")
    return (
        f"| {name} | {tool} | {r['nodes']} | {secs} | {err_s} | {lat('disable_all')} | "
        f"{lat('all')} |"
    )


def goals(name: str, rows: list[dict[str, Any]]) -> list[str]:
    # a peer whose output does not run at DISABLE_ALL does not count
    by = {r["tool"]: r for r in rows if "nodes" in r and "disable_all_error" not in r}
    out = []
    peers = [by[t]["nodes"] for t in ("onnxsim", "onnxslim", "ort-basic") if t in by]
    if "graphopt" in by and peers:
        ok = by["graphopt"]["nodes"] <= min(peers)
        out.append(
            f"{name}: portable nodes {by['graphopt']['nodes']} <= min(onnxsim, onnxslim, "
            f"ORT BASIC) {min(peers)} (peers with running outputs): "
            f"{'yes' if ok else 'NO'}"
        )
    if "graphopt-ort" in by and "ort-extended" in by:
        a, b = by["graphopt-ort"]["nodes"], by["ort-extended"]["nodes"]
        out.append(
            f"{name}: --target ort nodes {a} <= ORT EXTENDED {b}: {'yes' if a <= b else 'NO'}"
        )
    g = by.get("graphopt", {})
    ext = by.get("ort-extended", {})
    if "disable_all" in g and "disable_all" in ext:
        ratio = ext["disable_all"] / g["disable_all"]
        out.append(
            f"{name}: portable @DISABLE_ALL {g['disable_all']:.2f} ms vs ORT EXTENDED "
            f"output @DISABLE_ALL {ext['disable_all']:.2f} ms (speed ratio {ratio:.2f}x)"
        )
    best = [(r["all"], t) for t, r in by.items() if "all" in r and not t.startswith("graphopt")]
    if "all" in g and best:
        b, t = min(best)
        out.append(
            f"{name}: portable @ENABLE_ALL {g['all']:.2f} ms vs best peer ({t}) {b:.2f} ms "
            f"(ratio {b / g['all']:.2f}x)"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="det,rec,cls,silero")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=None, help="latency rounds (default per model)")
    ap.add_argument(
        "--worker", nargs=4, metavar=("TOOL", "SRC", "DST", "MODEL"), help=argparse.SUPPRESS
    )
    args = ap.parse_args(argv)
    if args.worker:
        tool, src, dst, model_name = args.worker
        print(json.dumps(run_tool(tool, src, dst, model_name)))
        return 0
    import onnxruntime as ort

    versions = {}
    for mod in ("onnxsim", "onnxslim", "onnxoptimizer"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception as exc:  # noqa: BLE001
            versions[mod] = f"not installed ({type(exc).__name__})"
    lines = [
        "# Graph simplifiers side by side (bench/simplify.py)",
        "",
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores "
        f"**shared with other jobs (noisy)**; onnxruntime {ort.__version__} CPU, "
        f"intra-op threads {args.threads}, spinning off; onnx {onnx.__version__}; "
        + ", ".join(f"{k} {v}" for k, v in versions.items())
        + ".",
        "",
        "Nodes include subgraph nodes. Time: load + optimize + save in a fresh process (graphopt "
        "without its own verification). Max err: max abs difference of any output vs the original, "
        "both at DISABLE_ALL. Latency: median ms, all candidates interleaved round-robin; "
        "(N.NNx) = speed-up over the original at the same level.",
        "",
        "| model | tool | nodes | time s | max err | DISABLE_ALL ms | ENABLE_ALL ms |",
        "|---|---|---|---|---|---|---|",
    ]
    goal_lines: list[str] = []
    with tempfile.TemporaryDirectory(prefix="graphopt-bench-") as d:
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            rows = bench_model(name, Path(d), args.threads, args.rounds)
            base = rows[0]
            lines += [fmt_row(name, r, base) for r in rows]
            goal_lines += goals(name, rows)
    lines += [
        "",
        "\\* the tool failed on the fixed-shape model and was given the published "
        "dynamic-shape model instead. 'does not load': onnxruntime refuses the model at that "
        "level.",
    ]
    lines += ["", "## Issue goals", ""] + [f"- {g}" for g in goal_lines]
    text = "\n".join(lines) + "\n"
    atomic_write_text(RESULTS, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
