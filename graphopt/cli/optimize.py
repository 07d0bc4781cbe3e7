"""``graphopt optimize MODEL -o OUT``: the pass pipeline (or a recipe), verified, written."""

from __future__ import annotations

import argparse

from rich.table import Table

from graphopt.cli.common import (
    add_feeds_option,
    before_after_table,
    console,
    emit_json,
    fmt_name,
    input_shapes,
    verify_table,
)
from graphopt.core.errors import GraphoptError
from graphopt.jobs.optimize import optimize


def add_arguments(name: str, p: argparse.ArgumentParser) -> None:
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True)
    p.add_argument(
        "--target",
        default="portable",
        choices=["portable", "ort"],
        help="portable: standard ONNX only (default); ort: may emit onnxruntime ops",
    )
    p.add_argument("--passes", help="comma-separated pass names instead of the default pipeline")
    p.add_argument("--no-verify", action="store_true", help="skip the onnxruntime comparison")
    p.add_argument(
        "--report",
        metavar="OUT.html",
        help="write a self-contained HTML report (graphs before/after, summary)",
    )
    p.add_argument(
        "--recipe",
        metavar="NAME|FILE.toml",
        help="run a recipe (built-in name or TOML file) instead of --passes; "
        "'graphopt list-recipes' shows the built-in ones",
    )
    p.add_argument(
        "--calib",
        metavar="DATA",
        help="calibration data for recipe steps "
        "(.npz, .npy or a folder; overrides the recipe's calib); doubles as --feeds",
    )
    add_feeds_option(p)
    p.add_argument(
        "--bench",
        action="store_true",
        help="onnxruntime latency before/after at DISABLE_ALL and ENABLE_ALL "
        "(interleaved medians); with --recipe: after every step",
    )
    p.set_defaults(func=cmd_optimize)


def cmd_optimize(args: argparse.Namespace) -> int:
    if args.recipe:
        if args.passes:
            raise GraphoptError("give either --recipe or --passes, not both")
        from graphopt.cli.recipes import cmd_optimize_recipe  # noqa: PLC0415

        return cmd_optimize_recipe(args)
    res = optimize(
        args.model,
        args.passes,
        target=args.target,
        input_shapes=input_shapes(args),
        verify_output=not args.no_verify,
        feeds=args.feeds or args.calib,
        output=args.output,
        report=args.report,
        bench=args.bench,
    )
    if args.json:
        emit_json(res.to_json())
        return 0
    c = console()
    c.print(
        before_after_table(
            res.before, res.after, f"{fmt_name(args.model)} -> {fmt_name(res.output)}"
        )
    )
    stats = res.stats()
    if stats:
        pt = Table(title="passes", title_justify="left")
        pt.add_column("pass")
        pt.add_column("what it did")
        for name, st in stats.items():
            pt.add_row(fmt_name(name), ", ".join(f"{k}={v}" for k, v in st.items() if v) or "-")
        c.print(pt)
    if res.verify:
        c.print(verify_table(res.verify))
    if res.latency_ms:
        lt = Table(
            title="onnxruntime latency (median ms, interleaved, 1 thread, spinning off)",
            title_justify="left",
        )
        for col in ("level", "before", "after", "speed-up"):
            lt.add_column(col, justify="left" if col == "level" else "right")
        for level, label in (("disable_all", "ORT_DISABLE_ALL"), ("all", "ORT_ENABLE_ALL")):
            a, b = res.latency_ms["before"][level], res.latency_ms["after"][level]
            lt.add_row(label, f"{a:.3f}", f"{b:.3f}", f"{a / b:.2f}x" if b > 0 else "-")
        c.print(lt)
    c.print(
        f"optimized in {res.pass_seconds:.2f} s, wrote {fmt_name(res.output)} "
        f"({res.seconds:.2f} s in all)"
    )
    return 0
