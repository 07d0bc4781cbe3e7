"""Scaling benchmark: time and peak memory of every command against graph size.

Two deterministic model shapes, built at 10k, 50k and 200k nodes with small tensors (1x8 float32
activations, 8x8 weights) so that onnxruntime's share of the time stays small and graphopt's own
work is what is measured:

- ``chain``: a straight chain of blocks ``MatMul(W) -> Add(b) -> Relu -> Identity -> Mul(s)``
  (every block gives fuse-matmul-add and eliminate-identity something to do);
- ``residual``: residual blocks ``y = MatMul(Relu(MatMul(x, W1)), W2) * Sigmoid(x) + x`` (every
  block input is read three times: a wide, branchy graph for liveness and order search).

Each command (``inspect``, ``optimize``, ``plan``; ``quantize`` and ``fp16`` up to 50k nodes) runs
through the CLI in its own process; wall time and that process's peak resident memory
(``os.wait4``'s ``ru_maxrss``) are recorded. The table gives the time per node and its ratio to the
smallest size's time per node (1.0 = linear). The goal of issue 15: optimize and plan of a
200,000-node chain each under 60 s and 2 GB, time per node at 200k within 1.5x of that at 10k.

Run: ``python bench/scale.py [--quick] [--sizes 10000,50000] [--shapes chain] [--commands plan]``;
writes bench/results/scale.md (``--quick``: 10k and 50k only) and prints it.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "scale.md"
GRAPHOPT = Path(sys.executable).with_name("graphopt")

WIDTH = 8
SIZES = (10_000, 50_000, 200_000)
QUICK_SIZES = (10_000, 50_000)
COMMANDS = ("inspect", "optimize", "plan", "quantize", "fp16")
#: the lossy commands calibrate and verify in onnxruntime many times: only up to this size
LOSSY_MAX_NODES = 50_000
#: a command still running after this long is stopped and reported as a timeout
TIMEOUT_S = 1800


def _weight(rng: np.random.Generator, name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
    scale = 1.0 / np.sqrt(shape[0]) if len(shape) == 2 else 0.1
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def _model(name: str, nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], y: str) -> bytes:
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, WIDTH])],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, [1, WIDTH])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()  # type: ignore[no-any-return]


def chain_model(n_nodes: int, seed: int = 0) -> bytes:
    """A chain of ``n_nodes`` nodes (rounded down to whole 5-node blocks), serialized.

    Block ``i``: ``MatMul(h, W_i) -> Add(b_i) -> Relu -> Identity -> Mul(s_i)``.
    """
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    h = "x"
    for i in range(max(1, n_nodes // 5)):
        inits += [
            _weight(rng, f"w{i}", (WIDTH, WIDTH)),
            _weight(rng, f"b{i}", (WIDTH,)),
            numpy_helper.from_array(np.array([1.0 + 0.01 * (i % 7)], np.float32), f"s{i}"),
        ]
        nodes += [
            helper.make_node("MatMul", [h, f"w{i}"], [f"m{i}"], name=f"mm{i}"),
            helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"], name=f"add{i}"),
            helper.make_node("Relu", [f"a{i}"], [f"r{i}"], name=f"relu{i}"),
            helper.make_node("Identity", [f"r{i}"], [f"i{i}"], name=f"id{i}"),
            helper.make_node("Mul", [f"i{i}", f"s{i}"], [f"h{i}"], name=f"mul{i}"),
        ]
        h = f"h{i}"
    return _model("chain", nodes, inits, h)


def residual_model(n_nodes: int, seed: int = 0) -> bytes:
    """Residual blocks, ``n_nodes`` nodes (rounded down to whole 6-node blocks), serialized.

    Block ``i``: ``y = MatMul(Relu(MatMul(x, W1_i)), W2_i) * Sigmoid(x) + x``.
    """
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    h = "x"
    for i in range(max(1, n_nodes // 6)):
        inits += [_weight(rng, f"u{i}", (WIDTH, WIDTH)), _weight(rng, f"v{i}", (WIDTH, WIDTH))]
        nodes += [
            helper.make_node("MatMul", [h, f"u{i}"], [f"p{i}"], name=f"mm1_{i}"),
            helper.make_node("Relu", [f"p{i}"], [f"r{i}"], name=f"relu{i}"),
            helper.make_node("MatMul", [f"r{i}", f"v{i}"], [f"q{i}"], name=f"mm2_{i}"),
            helper.make_node("Sigmoid", [h], [f"g{i}"], name=f"sig{i}"),
            helper.make_node("Mul", [f"q{i}", f"g{i}"], [f"t{i}"], name=f"gate{i}"),
            helper.make_node("Add", [f"t{i}", h], [f"h{i}"], name=f"res{i}"),
        ]
        h = f"h{i}"
    return _model("residual", nodes, inits, h)


SHAPES: dict[str, Callable[[int], bytes]] = {"chain": chain_model, "residual": residual_model}


@dataclass
class Run:
    """One command on one model."""

    shape: str
    nodes: int
    command: str
    seconds: float
    cpu_seconds: float
    peak_bytes: int
    rc: int
    error: str = ""

    @property
    def per_node_us(self) -> float:
        """CPU time per node (what the ratios compare: steadier than wall time on a shared
        machine; the commands are single-threaded outside onnxruntime's runs)."""
        return self.cpu_seconds / self.nodes * 1e6


def run_command(argv: list[str], timeout: float = TIMEOUT_S) -> tuple[float, float, int, int, str]:
    """Run ``argv`` in a child process: ``(wall seconds, CPU seconds, peak RSS bytes, exit code,
    last stderr line)``.

    The peak is the child's own ``ru_maxrss`` (``os.wait4``), not the high-water mark of every
    child so far (``RUSAGE_CHILDREN``).
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, env=env)
        deadline = t0 + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.02)
        dt = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        tail = err.read().decode(errors="replace").strip().splitlines()[-1:]
    cpu = usage.ru_utime + usage.ru_stime
    return dt, cpu, int(usage.ru_maxrss) * 1024, proc.returncode, tail[0] if tail else ""


def command_argv(command: str, model: Path, work: Path) -> list[str]:
    """The CLI line of ``command`` on ``model`` (outputs under ``work``)."""
    out = work / f"{model.stem}.{command}.onnx"
    exe = [str(GRAPHOPT)] if GRAPHOPT.exists() else [sys.executable, "-m", "graphopt.cli"]
    if command == "inspect":
        return [*exe, "inspect", str(model), "--json"]
    if command == "optimize":
        return [*exe, "optimize", str(model), "-o", str(out), "--json"]
    if command == "plan":
        return [*exe, "plan", str(model), "-o", str(out), "--json"]
    if command == "quantize":
        calib = work / "calib.npz"
        if not calib.exists():
            x = np.random.default_rng(0).standard_normal((4, WIDTH)).astype(np.float32)
            np.savez(calib, x=x)
        return [
            *exe,
            *("quantize", str(model), "-o", str(out), "--calib", str(calib)),
            *("--method", "minmax", "--json"),
        ]
    if command == "fp16":
        return [*exe, "fp16", str(model), "-o", str(out), "--json"]
    raise ValueError(command)


def measure(
    shapes: list[str],
    sizes: list[int],
    commands: list[str],
    work: Path,
    log: Callable[[str], None],
    timeout: float = TIMEOUT_S,
) -> list[Run]:
    runs: list[Run] = []
    for shape in shapes:
        for size in sizes:
            path = work / f"{shape}{size}.onnx"
            path.write_bytes(SHAPES[shape](size))
            n = len(onnx.load(str(path), load_external_data=False).graph.node)
            for command in commands:
                if command in ("quantize", "fp16") and size > LOSSY_MAX_NODES:
                    continue
                dt, cpu, peak, rc, err = run_command(command_argv(command, path, work), timeout)
                runs.append(Run(shape, n, command, dt, cpu, peak, rc, "" if rc == 0 else err))
                log(
                    f"{shape:9s} {n:>7,} {command:9s} {dt:8.1f} s {cpu:8.1f} s CPU"
                    f" {peak / 2**20:8.0f} MiB"
                    f" rc={rc} {runs[-1].error}"
                )
                for f in work.glob(f"{path.stem}.{command}.onnx*"):
                    f.unlink()
            path.unlink()
    return runs


def table(runs: list[Run]) -> str:
    """The markdown table: per shape and command, each size's time, peak and time-per-node ratio
    to the smallest size."""
    lines = [
        "| shape | command | nodes | wall (s) | CPU (s) | peak RSS (MiB) | CPU us/node "
        "| ratio to smallest |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    keys = sorted({(r.shape, r.command) for r in runs}, key=lambda k: (k[0], COMMANDS.index(k[1])))
    for shape, command in keys:
        rows = sorted(
            (r for r in runs if (r.shape, r.command) == (shape, command)), key=lambda r: r.nodes
        )
        base = rows[0].per_node_us
        for r in rows:
            status = "" if r.rc == 0 else f" (exit {r.rc}: {r.error[:60]})"
            lines.append(
                f"| {shape} | {command} | {r.nodes:,} | {r.seconds:.1f}{status} | "
                f"{r.cpu_seconds:.1f} | {r.peak_bytes / 2**20:.0f} | {r.per_node_us:.0f} | "
                f"{r.per_node_us / base:.2f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="10k and 50k nodes only")
    ap.add_argument("--sizes", help="comma-separated node counts (overrides --quick)")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="chain,residual")
    ap.add_argument("--commands", default=",".join(COMMANDS), help=",".join(COMMANDS))
    ap.add_argument("--output", type=Path, default=RESULTS, help="markdown file to write")
    ap.add_argument(
        "--timeout",
        type=float,
        default=TIMEOUT_S,
        help="wall seconds after which a command is stopped (raise it on a shared machine)",
    )
    args = ap.parse_args(argv)
    sizes = (
        [int(s) for s in args.sizes.split(",")]
        if args.sizes
        else list(QUICK_SIZES if args.quick else SIZES)
    )
    shapes = [s for s in args.shapes.split(",") if s]
    commands = [c for c in args.commands.split(",") if c]
    for s in shapes:
        if s not in SHAPES:
            ap.error(f"unknown shape {s}")
    for c in commands:
        if c not in COMMANDS:
            ap.error(f"unknown command {c}")
    with tempfile.TemporaryDirectory(prefix="graphopt-scale-") as tmp:
        runs = measure(
            shapes, sizes, commands, Path(tmp), lambda s: print(s, flush=True), args.timeout
        )
    when = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = (
        "# Scaling: time and peak memory against graph size\n\n"
        f"{when}; {platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}; each command through the CLI in its own process "
        "(wall time, CPU time and peak RSS of that process). `CPU us/node` is CPU time per node "
        "(steadier than wall time on a shared machine); the ratio is to the smallest size's "
        "(1.0 = linear). Generated by `python bench/scale.py"
        f"{' --quick' if args.quick else ''}`.\n\n" + table(runs) + "\n"
    )
    from graphopt.core.output import atomic_write_text  # noqa: PLC0415 - only when writing

    atomic_write_text(args.output, text)
    print()
    print(text)
    return 0 if all(r.rc == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
