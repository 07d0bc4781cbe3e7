"""``graphopt diff A B``: what changed in the graph, and where the numbers part ways."""

from __future__ import annotations

import argparse

from rich.table import Table

from graphopt.cli.common import console, emit_json, fmt_name, input_shapes, names, verify_table
from graphopt.jobs.diff import diff


def add_arguments(name: str, p: argparse.ArgumentParser) -> None:
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument(
        "--per-layer",
        action="store_true",
        help="compare every tensor both models have; report the first divergent node",
    )
    p.add_argument("--rtol", type=float, default=1e-4, help="relative tolerance (of max |A|)")
    p.add_argument("--atol", type=float, default=1e-5, help="absolute tolerance")
    p.add_argument("--structure-only", action="store_true", help="skip onnxruntime")
    p.add_argument("--check", action="store_true", help="exit 1 when the outputs differ")
    p.set_defaults(func=cmd_diff)


def cmd_diff(args: argparse.Namespace) -> int:
    res = diff(
        args.a,
        args.b,
        input_shapes=input_shapes(args),
        per_layer=args.per_layer,
        rtol=args.rtol,
        atol=args.atol,
        numeric=not args.structure_only,
    )
    code = 1 if args.check and not res.outputs_equal else 0
    if args.json:
        emit_json(res.to_json())
        return code
    rep = res.report
    c = console()
    t = Table(title=f"{fmt_name(args.a)} -> {fmt_name(args.b)}", title_justify="left")
    for col in ("", "A", "B"):
        t.add_column(col, justify="left" if not col else "right")
    t.add_row("nodes", str(rep.nodes_a), str(rep.nodes_b))
    for op in sorted(set(rep.nodes_added) | set(rep.nodes_removed)):
        n = rep.nodes_added.get(op, 0) - rep.nodes_removed.get(op, 0)
        t.add_row(f"  {fmt_name(op)}", "", f"{n:+d}")
    t.add_row(
        "initializers added/removed/changed",
        "",
        f"{len(rep.initializers_added)}/{len(rep.initializers_removed)}/"
        f"{len(rep.initializers_changed)}",
    )
    t.add_row("tensors with a new shape or dtype", "", str(len(rep.shapes_changed)))
    c.print(t)
    if rep.fused_groups:
        counts: dict[str, int] = {}
        for g in rep.fused_groups:
            counts[g.label] = counts.get(g.label, 0) + 1
        ft = Table(title="fused groups (A's nodes replaced by one node of B)", title_justify="left")
        ft.add_column("group")
        ft.add_column("count", justify="right")
        ft.add_column("example")
        for label, n in counts.items():
            ex = next(g for g in rep.fused_groups if g.label == label)
            ft.add_row(
                fmt_name(label),
                str(n),
                f"{names(ex.replaced, len(ex.replaced))} -> {fmt_name(ex.node)}",
            )
        c.print(ft)
    for label, items in (
        ("changed", rep.changed),
        ("removed", rep.removed),
        ("added", rep.added),
        ("initializers changed", rep.initializers_changed),
    ):
        if items:
            c.print(f"{label}: {names(items)}")
    if rep.outputs:
        c.print(verify_table(rep, title=f"outputs (rtol {args.rtol:g}, atol {args.atol:g})"))
        c.print("outputs equal" if rep.outputs_equal else "[red]outputs differ[/]")
    if args.per_layer:
        if rep.first_divergent_node:
            d = next(x for x in rep.layers if x.tensor == rep.first_divergent_tensor)
            c.print(
                f"first divergent node: [bold]{fmt_name(rep.first_divergent_node)}[/] "
                f"({fmt_name(d.op)}), tensor {fmt_name(d.tensor)}: max abs err "
                f"{d.max_abs_err:.3g}, SQNR {d.sqnr_db:.1f} dB ({len(rep.layers)} tensors "
                "compared)"
            )
        else:
            c.print(f"no divergent node ({len(rep.layers)} tensors compared)")
    return code
