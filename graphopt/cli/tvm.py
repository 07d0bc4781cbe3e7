"""``graphopt compile`` (through Apache TVM), ``graphopt tune`` (measured schedules into a tuning
database), ``graphopt run`` (a library or an ONNX model) and ``graphopt bench`` (a library against
onnxruntime, optionally per kernel)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from graphopt.cli.common import (
    add_feeds_option,
    console,
    db,
    emit_json,
    fmt_name,
    fmt_shape,
    human_bytes,
    input_shapes,
    key_value_table,
    names,
)
from graphopt.core.errors import FeedError
from graphopt.jobs.compile import TuningSummary, bench_artifact, compile_model
from graphopt.jobs.run import run
from graphopt.jobs.tune import tune


def _tuning_options(p: argparse.ArgumentParser, compile_cmd: bool) -> None:
    p.add_argument(
        "--trials",
        type=int,
        default=16,
        help="candidates measured per kernel (hand rule included)"
        + ("; 0: use the database's records only" if compile_cmd else ""),
    )
    p.add_argument(
        "--rpc",
        metavar="HOST:PORT",
        help="measure on the boards of a TVM RPC tracker (default: a local tracker)",
    )
    p.add_argument("--key", metavar="NAME", help="device key of the RPC servers (with --rpc)")


@contextmanager
def _progress(enabled: bool) -> Iterator[Callable[[str, int, int], None] | None]:
    """A progress bar on stderr fed by the tuning's ``(message, done, total)`` callback."""
    if not enabled:
        yield None
        return
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console(stderr=True),
        transient=True,
    )
    task = bar.add_task("tuning", total=1)

    def update(msg: str, done: int, total: int) -> None:
        bar.update(task, description=fmt_name(msg)[:60], completed=done, total=max(total, 1))

    with bar:
        yield update


def add_arguments(name: str, p: argparse.ArgumentParser) -> None:
    if name == "compile":
        p.add_argument("model")
        p.add_argument("-o", "--output", required=True, help="library path, e.g. model.so")
        p.add_argument(
            "--target",
            default="llvm",
            help="llvm (this host), aarch64, cuda, cuda:sm_80 or cuda:sm_90",
        )
        p.add_argument(
            "--no-schedules",
            action="store_true",
            help="TVM's default kernels instead of graphopt's CPU schedules",
        )
        p.add_argument(
            "--no-verify", action="store_true", help="skip running the library against onnxruntime"
        )
        p.add_argument(
            "--no-nvcc-check",
            action="store_true",
            help="cuda: skip compiling the generated source with nvcc",
        )
        add_feeds_option(p, "run the library and onnxruntime on")
        p.add_argument(
            "--db",
            metavar="FILE",
            help="tuning database: kernels it has are scheduled as recorded, the others are "
            "measured first and added (see 'graphopt tune')",
        )
        _tuning_options(p, compile_cmd=True)
        p.set_defaults(func=cmd_compile)
    elif name == "tune":
        p.add_argument("model")
        p.add_argument("--target", default="llvm", help="llvm (this host) or aarch64")
        p.add_argument(
            "--db",
            metavar="FILE",
            help="tuning database (default ~/.cache/graphopt/tvm-tuning.json)",
        )
        _tuning_options(p, compile_cmd=False)
        p.add_argument(
            "--min-share",
            type=float,
            default=0.01,
            help="kernels under this share of the model keep their hand rule (default 0.01)",
        )
        p.add_argument(
            "--servers", type=int, default=1, help="local RPC servers to start (without --rpc)"
        )
        p.add_argument(
            "--retune", action="store_true", help="search again kernels already tuned in the db"
        )
        p.set_defaults(func=cmd_tune)
    elif name == "run":
        p.add_argument("artifact", help="a library from 'graphopt compile' or an .onnx file")
        p.add_argument("--input", action="append", default=[], metavar="NAME=FILE.npy")
        p.add_argument("-o", "--output", help="write the outputs to this .npz")
        p.set_defaults(func=cmd_run)
    else:
        p.add_argument("artifact")
        p.add_argument("model", help="the ONNX model it was compiled from")
        p.add_argument("--runs", type=int, default=50)
        p.add_argument("--warmup", type=int, default=5)
        p.add_argument("--threads", type=int, default=2)
        p.add_argument(
            "--per-kernel",
            action="store_true",
            help="also time each kernel inside the model run (share of the total)",
        )
        p.set_defaults(func=cmd_bench)


def cmd_compile(args: argparse.Namespace) -> int:
    with _progress(bool(args.db) and not args.json) as progress:
        res = compile_model(
            args.model,
            target=args.target,
            output=args.output,
            input_shapes=input_shapes(args) or None,
            schedules=not args.no_schedules,
            check_cuda_source=not args.no_nvcc_check,
            verify=not args.no_verify,
            feeds=args.feeds,
            db=args.db,
            trials=args.trials,
            rpc=args.rpc,
            key=args.key,
            progress=progress,
        )
    info = res.to_json()
    if args.json:
        emit_json(info)
        return 0
    rows = [
        ("target", fmt_name(res.target)),
        ("compile time", f"{res.compile_seconds:.2f} s"),
        ("artifact size", human_bytes(res.artifact_bytes)),
        ("manifest", fmt_name(res.manifest)),
        ("kernels", str(len(res.kernels))),
    ]
    if res.verified_on:
        rows.append(("verified on", res.verified_on))
    if res.cuda_source_checked is not None:
        rows.append(("CUDA source compiled by nvcc", str(res.cuda_source_checked)))
    if args.db:
        rows.append(("kernels from the tuning database", str(res.tuned_kernels)))
        if res.tuning is not None:
            rows.append(("candidates measured now", str(res.tuning.measurements)))
    c = console()
    c.print(key_value_table(f"{fmt_name(args.model)} -> {fmt_name(res.artifact)}", rows))
    if res.verify is not None:
        vt = Table(title="verification against onnxruntime", title_justify="left")
        for col in ("output", "max abs err", "cosine", "SQNR dB"):
            vt.add_column(col, justify="left" if col == "output" else "right")
        for o in res.verify.outputs:
            vt.add_row(fmt_name(o.name), f"{o.max_abs_err:.3g}", f"{o.cosine:.6f}", db(o.sqnr_db))
        c.print(vt)
    return 0


def _tuning_table(title: str, summary: TuningSummary) -> Table:
    t = Table(title=title, title_justify="left")
    t.add_column("kernel", overflow="fold", ratio=3)
    for col in ("calls", "status", "hand ms", "best ms", "gain"):
        t.add_column(col, justify="left" if col == "status" else "right")
    t.add_column("schedule", overflow="fold", ratio=2)
    for k in sorted(summary.kernels, key=lambda k: -((k.hand_ms or 0.0) * k.calls)):
        sched = (
            k.template
            if k.params is None
            else f"{k.template} " + ",".join(f"{a}={b}" for a, b in sorted(k.params.items()))
        )
        t.add_row(
            fmt_name(k.name)[:48],
            str(k.calls),
            k.status,
            "-" if k.hand_ms is None else f"{k.hand_ms:.3f}",
            "-" if k.best_ms is None else f"{k.best_ms:.3f}",
            "-" if k.speedup is None else f"{k.speedup:.2f}x",
            fmt_name(sched)[:60],
        )
    return t


def cmd_tune(args: argparse.Namespace) -> int:
    with _progress(not args.json) as progress:
        res = tune(
            args.model,
            args.target,
            db=args.db,
            trials=args.trials,
            rpc=args.rpc,
            key=args.key,
            input_shapes=input_shapes(args) or None,
            min_share=args.min_share,
            servers=args.servers,
            retune=args.retune,
            progress=progress,
        )
    if args.json:
        emit_json(res.to_json())
        return 0
    s = res.summary
    c = console()
    c.print(
        key_value_table(
            f"{fmt_name(args.model)} -> {fmt_name(res.db)}",
            [
                ("target", fmt_name(s.target)),
                ("measured on", fmt_name(s.cpu)),
                ("kernels", str(len(s.kernels))),
                ("candidates measured", str(s.measurements)),
                ("time", f"{res.seconds:.1f} s"),
                ("status", ", ".join(f"{k}: {v}" for k, v in sorted(s.counts().items()))),
            ],
        )
    )
    c.print(_tuning_table("kernels (largest first)", s))
    return 0


def _input_specs(specs: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise FeedError(f"bad --input '{spec}': expected NAME=FILE.npy")
        out[name] = path
    return out


def cmd_run(args: argparse.Namespace) -> int:
    res = run(args.artifact, _input_specs(args.input), output=args.output)
    if args.json:
        emit_json(res.to_json())
        return 0
    t = Table(title=f"outputs of {fmt_name(args.artifact)}", title_justify="left")
    for col in ("output", "shape", "dtype", "min", "max"):
        t.add_column(col)
    for k, v in res.summary().items():
        t.add_row(
            fmt_name(k),
            fmt_shape(v["shape"]),
            v["dtype"],
            "-" if v["min"] is None else f"{v['min']:.4g}",
            "-" if v["max"] is None else f"{v['max']:.4g}",
        )
    console().print(t)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    # TVM's thread pool reads this when the library is loaded: the same threads as onnxruntime
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    res = bench_artifact(
        args.artifact,
        args.model,
        runs=args.runs,
        warmup=args.warmup,
        threads=args.threads,
        per_kernel=args.per_kernel,
    )
    if args.json:
        emit_json(res.to_json())
        return 0
    c = console()
    c.print(
        f"TVM artifact {res.tvm_ms:.3f} ms, onnxruntime {res.ort_ms:.3f} ms "
        f"(TVM/ORT latency ratio {res.ratio_tvm_vs_ort:.2f}; median of {args.runs} "
        "interleaved runs)"
    )
    bad = [k for k, v in res.verify.items() if not v.get("ok", True)]
    c.print("outputs match onnxruntime" if not bad else f"[red]outputs differ: {names(bad)}[/]")
    prof = res.per_kernel
    if prof is not None:
        t = Table(
            title=f"per kernel (median of {prof.runs} instrumented runs; sum {prof.kernels_ms:.3f} "
            f"ms, plain run {prof.total_ms:.3f} ms)",
            title_justify="left",
        )
        for col in ("kernel", "calls", "ms", "share", "cumulative"):
            t.add_column(col, justify="left" if col == "kernel" else "right")
        cum = 0.0
        for k in prof.kernels:
            cum += k.share
            t.add_row(
                fmt_name(k.name)[:60],
                str(k.calls),
                f"{k.ms:.3f}",
                f"{k.share * 100:.1f}%",
                f"{cum * 100:.1f}%",
            )
        c.print(t)
    return 0
