"""``graphopt plan MODEL``: one arena for every activation (liveness, offsets, in-place)."""

from __future__ import annotations

import argparse

from rich.table import Table

from graphopt.cli.common import console, emit_json, fmt_name, human_bytes, input_shapes
from graphopt.jobs.plan import plan_memory


def add_arguments(name: str, p: argparse.ArgumentParser) -> None:
    p.add_argument("model")
    p.add_argument(
        "--report",
        metavar="OUT.html",
        help="write a self-contained HTML report (graphs, per-step figures)",
    )
    p.add_argument(
        "-o",
        "--output",
        help="write the model in the planned order, with the plan "
        "in its metadata and beside it as OUT.memplan.json",
    )
    p.add_argument(
        "--strategy",
        default="best",
        choices=["greedy-size", "greedy-breadth", "best"],
        help="offset assignment (best: try all, keep the smallest arena)",
    )
    p.add_argument(
        "--no-inplace",
        action="store_true",
        help="no in-place writes and no reshape aliasing: one buffer per tensor",
    )
    p.add_argument("--no-reorder", action="store_true", help="keep the given node order")
    p.add_argument(
        "--reuse-inputs",
        action="store_true",
        help="the run may overwrite its inputs: their bytes are reused after their last reader "
        "and elementwise ops may write into them (default: inputs are the caller's, untouched)",
    )
    p.add_argument("--plot", metavar="PNG", help="draw the arena over time")
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--prove",
        dest="prove",
        action="store_true",
        default=None,
        help="run the model node by node inside the arena and compare with "
        "onnxruntime (random inputs unless --feeds); the default with -o",
    )
    g.add_argument(
        "--no-prove",
        dest="prove",
        action="store_false",
        help="with -o: write the plan without its execution proof (a warning says so)",
    )
    p.add_argument(
        "--feeds",
        metavar="DATA",
        help="inputs (.npz keyed by input name, or a folder as for --calib) for "
        "--prove and for sizing data-dependent tensors",
    )
    p.set_defaults(func=cmd_plan)


def cmd_plan(args: argparse.Namespace) -> int:
    res = plan_memory(
        args.model,
        input_shapes(args),
        strategy=args.strategy,
        inplace=not args.no_inplace,
        reorder=not args.no_reorder,
        reuse_inputs=args.reuse_inputs,
        feeds=args.feeds,
        prove_plan=args.prove,
        output=args.output,
        plot=args.plot,
        report=args.report,
    )
    if args.json:
        emit_json(res.to_json())
        return 0
    plan = res.plan
    s = plan.summary()
    rows = [
        ("one buffer per tensor (naive)", human_bytes(plan.naive_bytes), ""),
        ("lower bound (liveness)", human_bytes(plan.lower_bound_bytes), "1.000x"),
    ]
    if plan.inplace:
        rows.append(
            (
                "lower bound with in-place/aliasing",
                human_bytes(plan.inplace_lower_bound_bytes),
                f"{plan.inplace_lower_bound_bytes / max(plan.lower_bound_bytes, 1):.3f}x",
            )
        )
    rows += [
        (
            f"[bold]arena[/] ({plan.strategy})",
            f"[bold]{human_bytes(plan.arena_bytes)}[/]",
            f"{s['arena_over_lower_bound']:.3f}x",
        ),
        ("arena / its lower bound", "", f"{plan.ratio:.3f}x"),
        ("naive / arena", "", f"{s['naive_over_arena']:.1f}x"),
    ]
    t = Table(
        title=f"memory plan of {fmt_name(args.model)}", title_justify="left", show_header=False
    )
    t.add_column("what")
    t.add_column("bytes", justify="right")
    t.add_column("", justify="right")
    for row in rows:
        t.add_row(*row)
    c = console()
    c.print(t)
    if res.shapes_from in ("drawn", "feeds") and res.input_shapes:
        shapes = ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in res.input_shapes.items())
        why = "the --feeds" if res.shapes_from == "feeds" else "drawn from its dynamic dims"
        c.print(
            f"planned for input shapes {fmt_name(shapes)} ({why}; the offsets hold at these "
            "shapes only: give --input-shape for yours)"
        )
    c.print(f"peak at step {plan.peak_step} of {plan.steps}: node '{fmt_name(plan.peak_node)}'")
    c.print(
        f"buffers {s['buffers']} for {s['tensors']} tensors: {plan.aliased} aliased views, "
        f"{plan.inplace_reused} in-place writes"
        + (
            f", {len(plan.unplanned)} tensors of unknown size outside the arena"
            if plan.unplanned
            else ""
        )
    )
    if plan.order_changed and plan.order_before_arena:
        c.print(
            f"node order changed: arena {human_bytes(plan.order_before_arena)} -> "
            f"{human_bytes(plan.arena_bytes)} "
            f"({(plan.arena_bytes / plan.order_before_arena - 1) * 100:+.1f}%)"
        )
    else:
        c.print(
            "node order unchanged ("
            + ("--no-reorder" if args.no_reorder else "no order with a smaller arena found")
            + ")"
        )
    if res.proof is not None:
        c.print(
            f"execution proof: [green]passed[/] ({res.proof.nodes_in_arena} nodes ran inside "
            "the arena, outputs match onnxruntime)"
        )
    if res.output is not None:
        c.print(
            f"wrote {fmt_name(res.output)} (planned order, plan in metadata "
            f"'graphopt.memory_plan') and {fmt_name(res.plan_file)}"
        )
    if res.plot is not None:
        c.print(f"wrote {fmt_name(res.plot)}")
    return 0
