"""TVM libraries of several graphopt revisions side by side: is a slower figure a regression?

For each git revision (``--revs 96aa603,HEAD``) the model is compiled by that revision's own code
(``graphopt compile --target llvm``, its hand-rule schedules, no tuning database) in a child
process, from a detached worktree of the revision; then this process loads every library (TVM's
Relax VM only, so libraries of any revision run the same way) and times them against onnxruntime
on the same input, interleaved (:func:`graphopt.core.latency.interleaved`), in two modes:

* **wall, 2 threads**: TVM_NUM_THREADS=2 (``runtime.config_threadpool``), onnxruntime
  ORT_ENABLE_ALL with 2 intra-op threads and spinning off; the median of the per-round ratios.
  On a loaded machine these figures move by several times from one minute to the next (TVM's
  thread pool splits each parallel kernel statically, so a descheduled worker holds up the whole
  kernel; onnxruntime's pool hands the work of a late thread to the caller);
* **CPU, 1 thread**: TVM's pool at 1 thread and onnxruntime at 1 intra-op thread, each run
  measured in CPU time of the calling thread (``time.thread_time``), which does not grow while
  the thread waits for a core: the figure that stays comparable on a loaded machine.

A revision's code that had no ``graphopt.passes`` package inside ``graphopt/`` (the ``passes/``
folder mapped by pyproject) gets a link ``graphopt/passes -> ../passes`` in its worktree, so
that ``PYTHONPATH`` finds it.

Models: PP-OCR's (cls, rec, det; random input) and corpus models by name (their feed shapes and
representative feed).

Run: ``nice python bench/tvm_revisions.py --revs 96aa603,HEAD --models rec,cls [--rounds 30]
[--workdir DIR] [--out FILE.md]``; worktrees and libraries go to ``--workdir`` (default: a
temporary folder, removed with its worktrees afterwards) and are reused when it is given again.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TVM_NUM_THREADS", "2")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# this file is in bench/: keep bench/ off the path so that `import tvm` finds apache-tvm
sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

from graphopt import corpus  # noqa: E402
from graphopt.algorithms.tvm.runner import flatten_outputs  # noqa: E402
from graphopt.core.latency import interleaved  # noqa: E402
from graphopt.core.output import atomic_write_text  # noqa: E402
from graphopt.core.session import make_session  # noqa: E402
from graphopt.fixtures import real_model  # noqa: E402

SHAPES = {"rec": (1, 3, 48, 320), "cls": (1, 3, 48, 192), "det": (1, 3, 640, 640)}


def locate(name: str) -> tuple[Path, dict[str, tuple[int, ...]], dict[str, np.ndarray]]:
    """Path, input shapes and one feed of a PP-OCR model or a corpus model."""
    if name in SHAPES:
        path, _ = real_model(name)
        x = np.random.default_rng(0).standard_normal(SHAPES[name]).astype(np.float32)
        return path, {"x": SHAPES[name]}, {"x": x}
    e = corpus.entry(name)
    return corpus.get(name), dict(e.feed_shapes), dict(corpus.feeds(name, n=1)[0])


#: run in the child, with the revision's worktree first on PYTHONPATH: its own compile function
_BUILD = """
import importlib, json, sys, time
wt, path, out, shapes = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
for name in ("graphopt.jobs.compile", "graphopt.emit.tvm"):
    try:
        mod = importlib.import_module(name)
        break
    except ImportError:
        continue
assert mod.__file__.startswith(wt), mod.__file__
t = time.perf_counter()
res = mod.compile_model(path, target="llvm", output=out, input_shapes=shapes)
print("RESULT " + json.dumps({"compile_s": time.perf_counter() - t,
                              "schedules": getattr(res, "schedules", None),
                              "kernels": len(getattr(res, "kernels", []) or [])}))
"""


def git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(ROOT), *args], check=True, capture_output=True, text=True
    ).stdout.strip()


def worktree(rev: str, workdir: Path) -> tuple[str, Path]:
    """A detached worktree of ``rev`` under ``workdir`` (reused when there)."""
    sha = git("rev-parse", "--short", rev)
    wt = workdir / f"wt-{sha}"
    if not wt.exists():
        git("worktree", "add", "--detach", str(wt), sha)
    link = wt / "graphopt" / "passes"
    if not link.exists() and (wt / "passes").is_dir():
        link.symlink_to(Path("..") / "passes")
    return sha, wt


def build(model: str, sha: str, wt: Path, workdir: Path) -> dict[str, Any]:
    """Compile ``model`` with the code of worktree ``wt`` (reused when the library exists)."""
    path, shapes, _ = locate(model)
    out = workdir / f"{sha}-{model}.so"
    meta = out.with_suffix(".json")
    if out.exists() and meta.exists():
        return json.loads(meta.read_text())  # type: ignore[no-any-return]
    env = dict(os.environ, PYTHONPATH=str(wt), TVM_NUM_THREADS="2")
    proc = subprocess.run(
        [sys.executable, "-c", _BUILD, str(wt), str(path), str(out), json.dumps(shapes)],
        cwd=wt,
        env=env,
        capture_output=True,
        text=True,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"{sha} failed to compile {model}: {' | '.join(tail)}")
    info: dict[str, Any] = json.loads(lines[-1][len("RESULT ") :])
    info["date"] = git("show", "-s", "--format=%cd", "--date=format:%Y-%m-%d %H:%M", sha)
    info["subject"] = git("show", "-s", "--format=%s", sha)[:70]
    meta.write_text(json.dumps(info))
    return info


def time_model(model: str, libs: dict[str, Path], rounds: int) -> dict[str, Any]:
    """Both timing modes for ``model``: {mode: {candidate: (median ms, ratio to ORT)}}, errors."""
    import tvm  # noqa: PLC0415
    from tvm.runtime.vm import VirtualMachine  # noqa: PLC0415

    path, _, feed = locate(model)
    config = tvm.get_global_func("runtime.config_threadpool")
    ort2 = make_session(path, "all", threads=2)
    ort1 = make_session(path, "all", threads=1)
    ref = ort2.run(None, feed)
    # the manifest's input order (the revision's compile wrote it beside the library)
    names = [
        i["name"]
        for i in json.loads(next(iter(libs.values())).with_suffix(".so.json").read_text())["inputs"]
    ]
    xa = [tvm.runtime.tensor(np.ascontiguousarray(feed[n])) for n in names]
    mains, errs = {}, {}
    for sha, lib in libs.items():
        vm = VirtualMachine(tvm.runtime.load_module(str(lib)), tvm.cpu())
        outs = flatten_outputs(vm["main"](*xa))
        errs[sha] = max(float(np.abs(o.numpy() - r).max()) for o, r in zip(outs, ref))
        mains[sha] = vm["main"]
    res: dict[str, Any] = {"err": errs}
    for mode, threads, sess, clock in (
        ("wall2", 2, ort2, time.perf_counter),
        ("cpu1", 1, ort1, time.thread_time),
    ):
        config(0, threads)
        runners: dict[str, Any] = {"ort": lambda s=sess: s.run(None, feed)}
        for sha, main in mains.items():
            runners[sha] = lambda m=main: m(*xa)
        t = interleaved(runners, runs=rounds, warmup=2, clock=clock)
        res[mode] = {k: (t.median_ms(k), t.ratio(k, "ort", paired=True)) for k in runners}
    config(0, 2)
    return res


def render(rows: list[dict[str, Any]], rounds: int, loads: list[str]) -> str:
    import onnxruntime as ort  # noqa: PLC0415
    import tvm  # noqa: PLC0415

    lines = [
        "# TVM libraries of graphopt revisions side by side (`bench/tvm_revisions.py`)",
        "",
        f"Date: {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC. Machine: "
        f"{platform.machine()}, {os.cpu_count()} cores, shared (load average "
        f"{' -> '.join(loads)}). apache-tvm {tvm.__version__}, onnxruntime {ort.__version__}. "
        "Each library compiled by its revision's own code (llvm, hand-rule schedules), all "
        f"timed in one process, {rounds} interleaved rounds per mode. wall: 2 threads (TVM pool "
        "and onnxruntime intra-op, spinning off), median ms and median of per-round ratios. "
        "cpu: 1 thread, CPU time of the calling thread (not inflated by waiting for a core).",
        "",
        "| model | revision | committed | schedules (rule: kernels) | wall ms | wall / ORT | "
        "1-thread CPU ms | CPU / ORT | max abs err |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['rev']} | | failed: {r['error']} | | | | | |")
            continue
        w, c = r["wall2"], r["cpu1"]
        sched = ", ".join(f"{k} {v}" for k, v in sorted((r.get("schedules") or {}).items()))
        err = f"{r['err']:.1e}" if r.get("err") is not None else ""
        lines.append(
            f"| {r['model']} | {r['rev']} | {r.get('date', '')} | {sched} | {w[0]:.2f} | "
            f"{w[1]:.2f}x | {c[0]:.2f} | {c[1]:.2f}x | {err} |"
        )
    lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--revs", default="HEAD", help="comma-separated git revisions")
    ap.add_argument("--models", default="rec,cls")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--workdir", type=Path, help="worktrees and libraries (kept; reused)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "tvm_revisions.md")
    ns = ap.parse_args()
    loads = [" ".join(Path("/proc/loadavg").read_text().split()[:1])]
    tmp = None if ns.workdir else tempfile.TemporaryDirectory(prefix="graphopt-revs-")
    workdir = ns.workdir or Path(tmp.name)  # type: ignore[union-attr]
    workdir.mkdir(parents=True, exist_ok=True)
    made: list[Path] = []
    rows: list[dict[str, Any]] = []
    try:
        trees = []
        for rev in ns.revs.split(","):
            existed = (workdir / f"wt-{git('rev-parse', '--short', rev)}").exists()
            sha, wt = worktree(rev, workdir)
            if not existed and tmp is not None:
                made.append(wt)
            trees.append((sha, wt))
        for model in ns.models.split(","):
            libs: dict[str, Path] = {}
            infos: dict[str, dict[str, Any]] = {}
            for sha, wt in trees:
                try:
                    infos[sha] = build(model, sha, wt, workdir)
                    libs[sha] = workdir / f"{sha}-{model}.so"
                except RuntimeError as exc:
                    rows.append({"model": model, "rev": sha, "error": str(exc)[:150]})
                print(f"{model} {sha}: built", file=sys.stderr, flush=True)
            if not libs:
                continue
            t = time_model(model, libs, ns.rounds)
            rows.append(
                {
                    "model": model,
                    "rev": "onnxruntime",
                    "wall2": t["wall2"]["ort"],
                    "cpu1": t["cpu1"]["ort"],
                    "err": None,
                }
            )
            for sha in libs:
                rows.append(
                    {
                        "model": model,
                        "rev": sha,
                        **infos[sha],
                        "wall2": t["wall2"][sha],
                        "cpu1": t["cpu1"][sha],
                        "err": t["err"][sha],
                    }
                )
    finally:
        for wt in made:
            git("worktree", "remove", "--force", str(wt))
        if tmp is not None:
            tmp.cleanup()
    loads.append(" ".join(Path("/proc/loadavg").read_text().split()[:1]))
    text = render(rows, ns.rounds, loads)
    atomic_write_text(ns.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
