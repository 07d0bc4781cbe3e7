"""Memory-planning benchmark: naive vs lower bound vs graphopt's arena, against TVM and onnxruntime.

For every published model (PP-OCRv4 det at 640x640 and at the test shape, rec, cls; silero-vad)
and every fixture:

- naive bytes (one buffer per tensor), the liveness lower bound, graphopt's arena without and with
  in-place reuse/aliasing, their ratios, whether the plan passes the execution proof (the model
  run node by node inside the arena, compared with onnxruntime);
- the memory-aware order: the arena for the given order and for the emitted order;
- TVM's planned storage (Relax ``StaticPlanBlockMemory`` on graphopt's TVM-prepared graph: the sum
  of its ``alloc_storage`` sizes; intermediates only), with graphopt's arena on that same graph;
- onnxruntime's measured peak: the peak-RSS growth of a fresh process over its first two runs
  (``/proc/self/clear_refs`` resets the high-water mark after the session is built), default
  optimizations, 1 thread; with its CPU arena and memory pattern (the default) and with both off
  (plain malloc per tensor); for the original and the reordered model.

Run: ``python bench/memory.py [--quick]``; writes bench/results/memory.md and prints it.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from graphopt.algorithms.memory.arena import prove  # noqa: E402
from graphopt.core.loader import load as load_model  # noqa: E402
from graphopt.core.model import Model  # noqa: E402
from graphopt.core.output import atomic_write_text  # noqa: E402
from graphopt.core.saver import save  # noqa: E402
from graphopt.fixtures import FIXTURES, fixture_path, real_model, real_model_feeds  # noqa: E402
from graphopt.jobs.plan import apply_order  # noqa: E402
from graphopt.jobs.plan import plan_model as plan_memory  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "memory.md"


def mb(n: float | None) -> str:
    """Bytes as MB (10^6) or kB (10^3) for small figures."""
    if n is None:
        return "n/a"
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


# ------------------------------------------------------------------------------ onnxruntime peak

_CHILD = r"""
import sys, numpy as np, onnxruntime as ort
path, feeds_path, pattern = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
so = ort.SessionOptions()
so.intra_op_num_threads = 1
so.inter_op_num_threads = 1
so.enable_mem_pattern = pattern
so.enable_cpu_mem_arena = pattern
so.add_session_config_entry("session.intra_op.allow_spinning", "0")
so.log_severity_level = 4
sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
feeds = dict(np.load(feeds_path))
names = {i.name for i in sess.get_inputs()}
feeds = {k: v for k, v in feeds.items() if k in names}
base = status("VmRSS:")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
sess.run(None, feeds)
sess.run(None, feeds)  # the memory pattern is planned on the first run and used from the second
print(status("VmHWM:") - base)
"""


def ort_peak(path: Path, feeds_path: Path, pattern: bool) -> int | None:
    try:
        # a fixed mmap threshold: glibc returns every freed block >= 64 kB to the OS at once
        # (its adaptive threshold would otherwise keep freed tensors resident), so RSS follows
        # the bytes the run really holds
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
        out = subprocess.run(
            [sys.executable, "-c", _CHILD, str(path), str(feeds_path), "1" if pattern else "0"],
            capture_output=True,
            text=True,
            timeout=600,
            check=True,
            env=env,
        )
        return int(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError) as exc:
        print(f"  onnxruntime peak failed: {exc}", file=sys.stderr)
        return None


def ort_peaks(paths: dict[str, Path], feeds_path: Path, repeats: int) -> dict[str, int | None]:
    """Median peak per (model, pattern) with the runs interleaved."""
    got: dict[str, list[int]] = {}
    for _ in range(repeats):
        for key, p in paths.items():
            for pattern in (True, False):
                v = ort_peak(p, feeds_path, pattern)
                if v is not None:
                    got.setdefault(f"{key}/{'pattern' if pattern else 'dynamic'}", []).append(v)
    return {k: int(statistics.median(v)) for k, v in got.items()}


# ------------------------------------------------------------------------------ TVM


def tvm_storage(path: Path, shapes: dict[str, tuple[int, ...]]) -> tuple[int | None, int | None]:
    """(TVM's planned storage bytes, graphopt's arena on the same prepared graph) or n/a."""
    try:
        import tvm
        from tvm import relax

        from graphopt.algorithms.tvm.emit import import_relax
        from graphopt.jobs.compile import prepare_model
    except Exception:  # noqa: BLE001 - TVM missing or broken: n/a
        return None, None
    try:
        m, _ = prepare_model(load_model(path), shapes)
        ours = plan_memory(m, shapes, reorder=False).arena_bytes
        mod = import_relax(m.to_onnx(), shapes)
        with tvm.target.Target("llvm"):
            mod = tvm.transform.Sequential(
                [
                    relax.transform.DecomposeOpsForInference(),
                    relax.transform.CanonicalizeBindings(),
                    relax.transform.FoldConstant(),
                    relax.transform.LegalizeOps(),
                    relax.transform.AnnotateTIROpPattern(),
                    relax.transform.FoldConstant(),
                    relax.transform.FuseOps(),
                    relax.transform.FuseTIR(),
                    relax.transform.DeadCodeElimination(),
                    relax.transform.RewriteDataflowReshape(),
                    relax.transform.ToNonDataflow(),
                    relax.transform.RemovePurityChecking(),
                    relax.transform.CallTIRRewrite(),
                    relax.transform.StaticPlanBlockMemory(),
                ]
            )(mod)
        text = mod["main"].script(show_meta=False)
        sizes = [int(x) for x in re.findall(r"alloc_storage\(R\.shape\(\[(\d+)\]\)", text)]
        return sum(sizes), ours
    except Exception as exc:  # noqa: BLE001
        print(f"  TVM planning failed: {type(exc).__name__}: {str(exc)[:200]}", file=sys.stderr)
        return None, None


# ------------------------------------------------------------------------------ synthetic


def branches_model() -> Model:
    """Two branches that expand x[1,16] to [1,65536] and reduce back, in the bad order (both
    expansions first): the case the memory-aware order exists for."""
    from onnx import TensorProto, helper

    from graphopt.core.shapes import prepare

    rng = np.random.default_rng(0)
    f = TensorProto.FLOAT
    inits = []
    for i in (1, 2):
        inits.append(
            helper.make_tensor(
                f"w{i}", f, [16, 65536], rng.standard_normal((16, 65536)).astype(np.float32).ravel()
            )
        )
        inits.append(
            helper.make_tensor(
                f"v{i}",
                f,
                [65536, 16],
                rng.standard_normal((65536, 16)).astype(np.float32).ravel() * 0.01,
            )
        )
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["a1"], name="a1"),
        helper.make_node("MatMul", ["x", "w2"], ["b1"], name="b1"),
        helper.make_node("Relu", ["a1"], ["a1r"], name="a1r"),
        helper.make_node("Relu", ["b1"], ["b1r"], name="b1r"),
        helper.make_node("MatMul", ["a1r", "v1"], ["a2"], name="a2"),
        helper.make_node("MatMul", ["b1r", "v2"], ["b2"], name="b2"),
        helper.make_node("Add", ["a2", "b2"], ["y"], name="add"),
    ]
    g = helper.make_graph(
        nodes,
        "branches",
        [helper.make_tensor_value_info("x", f, [1, 16])],
        [helper.make_tensor_value_info("y", f, [1, 16])],
        initializer=inits,
    )
    return prepare(
        Model.from_onnx(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    )


# ------------------------------------------------------------------------------ main


def bench_one(
    label: str,
    model_path: Path | None,
    shapes: dict[str, Any] | None,
    feeds: dict[str, np.ndarray] | None,
    tmp: Path,
    repeats: int,
    peers: bool,
    model: Model | None = None,
) -> dict[str, Any]:
    t0 = time.perf_counter()

    def load() -> Model:
        if model is not None:
            return model.clone()
        assert model_path is not None
        return load_model(model_path)

    plain = plan_memory(load(), shapes, inplace=False, feeds=feeds)
    inpl = plan_memory(load(), shapes, inplace=True, feeds=feeds)
    given = plan_memory(load(), shapes, inplace=True, reorder=False, feeds=feeds)
    # plan --reuse-inputs: a runtime that copies the feeds into the arena gives the input away
    reuse = plan_memory(load(), shapes, inplace=True, feeds=feeds, reuse_inputs=True)
    plan_s = time.perf_counter() - t0
    proofs = []
    for plan in (plain, inpl, reuse):
        assert plan.model is not None
        rep = prove(plan.model, plan, feeds=feeds)
        proofs.append(rep.ok)
        if not rep.ok:
            print(f"  PROOF FAILED for {label}: {rep.to_json()}", file=sys.stderr)
    row: dict[str, Any] = {
        "label": label,
        "naive": inpl.naive_bytes,
        "lb": inpl.lower_bound_bytes,
        "arena_plain": plain.arena_bytes,
        "ip_lb": inpl.inplace_lower_bound_bytes,
        "arena_ip": inpl.arena_bytes,
        "arena_reuse": reuse.arena_bytes,
        "proof": all(proofs),
        "plain": plain,
        "inpl": inpl,
        "given_arena": given.arena_bytes,
        "given_lb": given.bound,
        "order_changed": inpl.order_changed or plain.order_changed,
        "plan_s": plan_s,
        "tvm": None,
        "tvm_ours": None,
        "ort": {},
    }
    if peers:
        src = model_path
        if src is None:
            assert model is not None
            src = tmp / f"{label}.onnx"
            save(model, src)
        feeds_path = tmp / f"{label}.npz"
        arrays: dict[str, Any] = feeds if feeds is not None else _random_feeds(load(), shapes)
        np.savez(feeds_path, **arrays)
        paths = {"original": src}
        if inpl.order_changed:
            reordered = tmp / f"{label}.reordered.onnx"
            save(apply_order(load(), inpl), reordered)
            paths["reordered"] = reordered
        row["ort"] = ort_peaks(paths, feeds_path, repeats)
        if model_path is not None and shapes:
            row["tvm"], row["tvm_ours"] = tvm_storage(model_path, shapes)
    return row


def _random_feeds(model: Model, shapes: dict[str, Any] | None) -> dict[str, np.ndarray]:
    from graphopt.core.feeds import random_feeds

    return random_feeds(model, seed=0, shapes=shapes)


PEERS_NOTE = (
    "Notes: silero's ORT figure is far below the arena because onnxruntime constant-folds the "
    "subgraph tensors computed only from weights (the LSTM weight concatenations, 0.26 MB "
    "each), which graphopt's plan of the unoptimized graph counts as activations; `graphopt "
    "optimize` (fold-constants) turns them into weights: planned after it, silero's arena is "
    "11.5 kB (measured separately; proof passes). The synthetic row is at the RSS noise floor "
    "(ORT also fuses and orders on its own)."
)


def table(rows: list[dict[str, Any]]) -> list[str]:
    out = [
        "| model | naive | lower bound (LB) | arena, no in-place | arena / LB | "
        "in-place LB | arena, in-place | arena / in-place LB | arena / plain LB | "
        "proof | arena, given order | arena, emitted order | "
        "arena, in-place, `--reuse-inputs` | that / plain LB |",
        "|---|" + "---:|" * 8 + "---|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r['label']} | {mb(r['naive'])} | {mb(r['lb'])} | {mb(r['arena_plain'])} | "
            f"{r['arena_plain'] / r['lb']:.3f} | {mb(r['ip_lb'])} | {mb(r['arena_ip'])} | "
            f"{r['arena_ip'] / r['ip_lb']:.3f} | {r['arena_ip'] / r['lb']:.3f} | "
            f"{'pass' if r['proof'] else 'FAIL'} | {mb(r['given_arena'])} | "
            f"{mb(r['arena_ip'])}{' (reordered)' if r['order_changed'] else ''} | "
            f"{mb(r['arena_reuse'])} | {r['arena_reuse'] / r['lb']:.3f} |"
        )
    return out


def peers_table(rows: list[dict[str, Any]]) -> list[str]:
    out = [
        "| model | graphopt arena (in-place) | TVM planned storage | graphopt arena on "
        "TVM's graph | TVM / graphopt (same graph) | ORT peak, pattern | "
        "ORT peak, dynamic | ORT pattern / graphopt arena | ORT peak, reordered "
        "model (pattern / dynamic) |",
        "|---|" + "---:|" * 8,
    ]
    for r in rows:
        o = r["ort"]
        pat, dyn = o.get("original/pattern"), o.get("original/dynamic")
        tvm_ratio = f"{r['tvm'] / r['tvm_ours']:.2f}" if r["tvm"] and r["tvm_ours"] else "n/a"
        reo = (
            "same model (order unchanged)"
            if "reordered/pattern" not in o
            else f"{mb(o.get('reordered/pattern'))} / {mb(o.get('reordered/dynamic'))}"
        )
        out.append(
            f"| {r['label']} | {mb(r['arena_ip'])} | {mb(r['tvm'])} | {mb(r['tvm_ours'])} | "
            f"{tvm_ratio} | {mb(pat)} | {mb(dyn)} | "
            f"{(pat / r['arena_ip']) if pat else float('nan'):.2f} | {reo} |"
        )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="skip det at 640x640, TVM and ORT peaks")
    ap.add_argument("--repeats", type=int, default=3, help="ORT peak runs per model (median)")
    args = ap.parse_args()
    peers = not args.quick
    real: list[tuple[str, str, dict[str, Any] | None]] = []
    if not args.quick:
        real.append(("det 1x3x640x640", "det", {"x": (1, 3, 640, 640)}))
    real += [
        ("det 1x3x320x320", "det", None),
        ("rec 1x3x48x320", "rec", None),
        ("cls 1x3x48x192", "cls", None),
        ("silero-vad (If subgraphs)", "silero", None),
    ]
    rows: list[dict[str, Any]] = []
    frows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="graphopt-bench-memory-") as d:
        tmp = Path(d)
        for label, name, override in real:
            try:
                path, shapes = real_model(name)
            except FileNotFoundError as exc:
                print(f"skip {label}: {exc}", file=sys.stderr)
                continue
            shapes = override or shapes
            feeds = real_model_feeds(name)
            if override:
                feeds = {
                    k: np.random.default_rng(0).uniform(-1, 1, v).astype(np.float32)
                    for k, v in override.items()
                }
            print(f"{label} ...", file=sys.stderr)
            rows.append(bench_one(label, path, shapes, feeds, tmp, args.repeats, peers))
        print("synthetic branches ...", file=sys.stderr)
        rows.append(
            bench_one(
                "synthetic: two branches, bad order",
                None,
                None,
                None,
                tmp,
                args.repeats,
                peers,
                model=branches_model(),
            )
        )
        for f in FIXTURES:
            fshapes = {"x": (1, 1, 8, 8)} if f == "digits_cnn.onnx" else None
            frows.append(bench_one(f, fixture_path(f), fshapes, None, tmp, 1, False))
    goal_bound = all(
        r["arena_plain"] <= 1.02 * r["lb"] and r["arena_ip"] <= 1.02 * r["ip_lb"]
        for r in rows + frows
    )
    goal_proof = all(r["proof"] for r in rows + frows)
    ocr = [r for r in rows if r["label"].split()[0] in ("det", "rec", "cls")]
    goal_ip = all(r["arena_ip"] <= 0.70 * r["lb"] for r in ocr)
    goal_reuse = all(r["arena_reuse"] <= 0.70 * r["lb"] for r in ocr)
    goal_order = all(r["arena_ip"] <= r["given_arena"] for r in rows + frows)
    lines = [
        "# Memory planning",
        "",
        f"{_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}; machine shared with other "
        "engineers (noisy; the byte figures are exact and do not depend on load, ORT peaks are "
        f"medians of {args.repeats} interleaved runs). Made by `python bench/memory.py"
        f"{' --quick' if args.quick else ''}`.",
        "",
        "MB = 10^6 bytes, kB = 10^3. Activations only (weights excluded); graph inputs and "
        "outputs are in the arena. LB = liveness lower bound for the node order (max bytes "
        "live at once, 64-byte aligned sizes); the in-place LB is the bound after aliasing "
        "(Reshape/Flatten/Squeeze/Unsqueeze/Identity) and in-place writes (elementwise, "
        "activations, BatchNormalization, Softmax). Proof = the model run node by node in "
        "onnxruntime with every input and output bound to its slice of one arena, outputs "
        "compared with onnxruntime on the whole model (both plans).",
        "",
        "## Real models",
        "",
        *table(rows),
        "",
    ]
    if peers:
        lines += [
            "## Against TVM and onnxruntime",
            "",
            "TVM: Relax `StaticPlanBlockMemory` after its own op fusion (FuseOps/FuseTIR) on "
            "graphopt's TVM-prepared graph (`graphopt.jobs.compile.prepare_model`: shapes "
            "folded, conv+bn fused); the sum of its `alloc_storage` sizes, i.e. intermediates only "
            "(graphopt's arena also holds the input and outputs). ORT: peak-RSS growth of a "
            "fresh process over its first two runs (session built first, high-water mark reset; "
            "the memory pattern is recorded on the first run and used on the second), default "
            "optimizations (ORT's own fusions shrink its tensors), 1 thread; 'pattern' = CPU "
            "arena + memory pattern (ORT's defaults), 'dynamic' = both off (malloc per tensor); "
            "glibc's mmap threshold fixed at 64 kB so freed tensors leave RSS. The figure "
            "includes kernel scratch (im2col, packed buffers) besides activations; RSS counts "
            "touched pages, so figures of a few hundred kB are at the noise floor.",
            "",
            *peers_table(rows),
            "",
            PEERS_NOTE,
            "",
        ]
    lines += [
        "## Fixtures",
        "",
        *table(frows),
        "",
        "## Goals",
        "",
        f"- arena <= 1.02x its lower bound on every real model and fixture, with and without "
        f"in-place: **{'met' if goal_bound else 'NOT met'}**",
        f"- every plan passes the execution proof: **{'met' if goal_proof else 'NOT met'}**",
        f"- with in-place reuse, arena <= 0.70x the plain lower bound on det, rec and cls: "
        f"**{'met' if goal_ip else 'NOT met'}** ("
        + ", ".join(f"{r['label']} {r['arena_ip'] / r['lb']:.3f}" for r in ocr)
        + "); with `--reuse-inputs` (the input's bytes reusable once read): "
        f"**{'met' if goal_reuse else 'NOT met'}** ("
        + ", ".join(f"{r['label']} {r['arena_reuse'] / r['lb']:.3f}" for r in ocr)
        + ")",
        f"- emitted order never worse than the given one: **{'met' if goal_order else 'NOT met'}**"
        "; improvements: "
        + (
            ", ".join(
                f"{r['label']} {mb(r['given_arena'])} -> {mb(r['arena_ip'])} "
                f"({(r['arena_ip'] / r['given_arena'] - 1) * 100:+.1f}%)"
                for r in rows + frows
                if r["order_changed"]
            )
            or "none"
        ),
        "",
    ]
    text = "\n".join(lines)
    atomic_write_text(RESULTS, text)
    print(text)
    return 0 if (goal_bound and goal_proof and goal_ip and goal_order) else 1


if __name__ == "__main__":
    sys.exit(main())
