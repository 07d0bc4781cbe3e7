"""``graphopt compile`` (through Apache TVM), ``graphopt run`` (a library or an ONNX model) and
``graphopt bench`` (a library against onnxruntime)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from rich.table import Table

from graphopt.cli.common import (
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
from graphopt.jobs.compile import bench_artifact, compile_model
from graphopt.jobs.run import run


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
        p.set_defaults(func=cmd_compile)
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
        p.set_defaults(func=cmd_bench)


def cmd_compile(args: argparse.Namespace) -> int:
    res = compile_model(
        args.model,
        target=args.target,
        output=args.output,
        input_shapes=input_shapes(args) or None,
        schedules=not args.no_schedules,
        check_cuda_source=not args.no_nvcc_check,
        verify=not args.no_verify,
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
    res = bench_artifact(
        args.artifact, args.model, runs=args.runs, warmup=args.warmup, threads=args.threads
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
    return 0
