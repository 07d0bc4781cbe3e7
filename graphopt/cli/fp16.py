"""``graphopt fp16 MODEL -o OUT``: float16 conversion, SQNR-checked against float32."""

from __future__ import annotations

import argparse

from graphopt.cli.common import (
    add_feeds_option,
    before_after_table,
    console,
    emit_json,
    fmt_name,
    input_shapes,
    names,
    verify_table,
)
from graphopt.jobs.fp16 import MIN_SQNR_DB, fp16


def add_arguments(name: str, p: argparse.ArgumentParser) -> None:
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True)
    p.add_argument(
        "--keep-fp32",
        default="",
        metavar="OPS",
        help="comma-separated op types or node names to keep in float32",
    )
    p.add_argument(
        "--io-fp16",
        action="store_true",
        help="make graph inputs/outputs float16 too (default: float32 with Casts)",
    )
    p.add_argument("--keep-softmax", action="store_true", help="keep Softmax in float32")
    p.add_argument(
        "--kernels",
        choices=["any", "native"],
        default="any",
        help="native: also keep ops that onnxruntime CPU has no float16 kernel for",
    )
    p.add_argument(
        "--min-sqnr",
        type=float,
        default=MIN_SQNR_DB,
        metavar="DB",
        help=f"minimum output SQNR against the float32 model (default {MIN_SQNR_DB:g} dB; "
        "0: no floor)",
    )
    p.add_argument(
        "--min-cosine",
        type=float,
        default=None,
        metavar="C",
        help="minimum output cosine (default: implied by --min-sqnr)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="write the model even when it fails the check (with a warning)",
    )
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="skip the onnxruntime comparison (the model is written unchecked)",
    )
    p.add_argument("--report", metavar="OUT.html", help="write a self-contained HTML report")
    add_feeds_option(p, "check the float16 model on (the data it will see)")
    p.set_defaults(func=cmd_fp16)


def cmd_fp16(args: argparse.Namespace) -> int:
    res = fp16(
        args.model,
        keep_fp32=args.keep_fp32,
        keep_io_types=not args.io_fp16,
        keep_softmax=args.keep_softmax,
        kernels=args.kernels,
        min_sqnr=args.min_sqnr,
        min_cosine=args.min_cosine,
        force=args.force,
        verify_output=not args.no_verify,
        input_shapes=input_shapes(args),
        feeds=args.feeds,
        output=args.output,
        report=args.report,
    )
    if args.json:
        emit_json(res.to_json())
        return 0
    c = console()
    c.print(
        before_after_table(
            res.before, res.after, f"{fmt_name(args.model)} -> {fmt_name(res.output)} (float16)"
        )
    )
    kept = res.kept_fp32
    c.print(
        f"fp16: {res.stats.get('nodes_fp16', 0)} nodes in float16, "
        f"{res.stats.get('casts_inserted', 0)} Casts inserted, {len(kept)} nodes kept in "
        f"float32" + (f" ({names(kept, 8)})" if kept else "")
    )
    if res.verify:
        c.print(verify_table(res.verify))
    c.print(f"wrote {fmt_name(res.output)} in {res.seconds:.2f} s")
    return 0
