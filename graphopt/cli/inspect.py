"""``graphopt inspect MODEL``: I/O, opset, op histogram, params, MACs, activation memory."""

from __future__ import annotations

import argparse

from rich.table import Table

from graphopt.cli.common import (
    console,
    emit_json,
    fmt_name,
    fmt_shape,
    human_bytes,
    human_count,
    input_shapes,
)
from graphopt.jobs.inspect import inspect


def add_arguments(name: str, p: argparse.ArgumentParser) -> None:
    p.add_argument("model")
    p.add_argument("--per-node", action="store_true", help="also list every node's cost")
    p.set_defaults(func=cmd_inspect)


def cmd_inspect(args: argparse.Namespace) -> int:
    res = inspect(args.model, input_shapes(args), per_node=args.per_node)
    if args.json:
        emit_json(res.to_json())
        return 0
    model, cost = res.model, res.cost
    c = console()
    c.print(
        f"[bold]{fmt_name(args.model)}[/]  opset {model.opset}  IR {model.ir_version}  "
        f"producer {fmt_name(res.producer) or '?'}"
    )
    io = Table(title="inputs and outputs", title_justify="left")
    for col in ("", "name", "shape", "dtype"):
        io.add_column(col)
    for t in model.graph.inputs:
        io.add_row("in", fmt_name(t.name), fmt_shape(t.shape), str(t.dtype))
    for t in model.graph.outputs:
        io.add_row("out", fmt_name(t.name), fmt_shape(t.shape), str(t.dtype))
    c.print(io)
    summ = Table(title="summary", title_justify="left", show_header=False)
    summ.add_column("what")
    summ.add_column("value", justify="right")
    summ.add_row("nodes", f"{model.num_nodes()} ({model.num_subgraphs()} subgraphs)")
    summ.add_row("params", f"{human_count(cost.params)} ({human_bytes(cost.param_bytes)})")
    summ.add_row("MACs", human_count(cost.macs))
    summ.add_row("FLOPs", human_count(cost.flops))
    summ.add_row("activations, one buffer each", human_bytes(cost.activation_bytes_naive))
    summ.add_row(
        "activations, liveness peak",
        f"{human_bytes(cost.activation_bytes_peak)} at {fmt_name(cost.peak_node or '?')}",
    )
    if cost.unknown_shapes:
        summ.add_row("tensors of unknown size", f"{cost.unknown_shapes} (fix --input-shape)")
    c.print(summ)
    ops = Table(title="operators", title_justify="left")
    for col in ("op", "count", "MACs", "params"):
        ops.add_column(col, justify="left" if col == "op" else "right")
    by_op = cost.by_op()
    for op, n in model.op_histogram().items():
        row = by_op.get(op, {})
        ops.add_row(
            fmt_name(op), str(n), human_count(row.get("macs", 0)), human_count(row.get("params", 0))
        )
    c.print(ops)
    if args.per_node:
        pn = Table(title="per node", title_justify="left")
        for col in ("node", "op", "MACs", "params", "output bytes"):
            pn.add_column(col, justify="left" if col in ("node", "op") else "right")
        for nc in cost.nodes:
            pn.add_row(
                fmt_name(nc.name),
                fmt_name(nc.op),
                human_count(nc.macs),
                human_count(nc.params),
                human_bytes(nc.output_bytes),
            )
        c.print(pn)
    return 0
