"""``graphopt optimize MODEL -o OUT --recipe NAME|FILE`` (run, verify and tabulate every step) and
``graphopt list-recipes``."""

from __future__ import annotations

import argparse

from rich.table import Table

from graphopt.cli.common import (
    console,
    emit_json,
    fmt_name,
    human_bytes,
    human_count,
    input_shapes,
)
from graphopt.jobs.recipe import describe_builtin, run_recipe
from graphopt.jobs.recipe.runner import sqnr_text


def add_arguments(name: str, p: argparse.ArgumentParser) -> None:
    p.set_defaults(func=cmd_list_recipes)


def cmd_optimize_recipe(args: argparse.Namespace) -> int:
    res = run_recipe(
        args.model,
        args.recipe,
        input_shapes=input_shapes(args),
        calib=args.calib,
        feeds=getattr(args, "feeds", None),
        output=args.output,
        bench=args.bench,
        report=args.report,
    )
    if args.json:
        emit_json(res.to_json())
        return 0
    before = res.before
    t = Table(
        title=f"recipe {fmt_name(res.recipe.name)}: {fmt_name(args.model)} -> "
        f"{fmt_name(res.output)}",
        title_justify="left",
    )
    for col in (
        "step",
        "verified",
        "nodes",
        "params",
        "MACs",
        "size",
        "arena",
        "SQNR vs original",
        "latency",
        "time",
    ):
        t.add_column(col, justify="left" if col in ("step", "verified") else "right")
    t.add_row(
        "input",
        "-",
        str(before.nodes),
        human_count(before.params),
        human_count(before.macs),
        human_bytes(res.kept_original().to_onnx().ByteSize()),
        "-",
        "-",
        "-",
        "-",
    )
    for s in res.steps:
        t.add_row(
            fmt_name(s.label),
            ("[green]yes[/] " if s.ok else "[red]NO[/] ") + s.check,
            str(s.nodes),
            human_count(s.params),
            human_count(s.macs),
            human_bytes(s.model_bytes),
            human_bytes(s.arena_bytes) if s.arena_bytes is not None else "-",
            fmt_name(sqnr_text(s.fidelity)),
            f"{s.latency_ms:.2f} ms" if s.latency_ms else "-",
            f"{s.seconds:.1f} s",
        )
    c = console()
    c.width = max(c.width, 160)
    c.print(t)
    for s in res.steps:
        if s.note:
            c.print(f"  {fmt_name(s.label)}: {fmt_name(s.note)}")
    if res.artifact:
        c.print(f"library: {fmt_name(res.artifact)}")
    c.print(f"wrote {fmt_name(res.output)} ({res.seconds:.1f} s in all)")
    return 0


def cmd_list_recipes(args: argparse.Namespace) -> int:
    rows = [{"name": n, "description": d, "steps": s} for n, d, s in describe_builtin()]
    if args.json:
        emit_json({"recipes": rows})
        return 0
    t = Table(
        title="built-in recipes (graphopt optimize MODEL -o OUT --recipe NAME)",
        title_justify="left",
    )
    for col in ("name", "steps", "what it does"):
        t.add_column(col)
    for r in rows:
        t.add_row(
            fmt_name(r["name"]), fmt_name(" -> ".join(r["steps"])), fmt_name(r["description"])
        )
    console().print(t)
    return 0
