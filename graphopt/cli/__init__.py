"""``graphopt`` command line. The only module that prints.

Exit codes: 0 success; 2 bad input (GraphoptError: missing/corrupt file, unknown pass, bad shape),
one
line on stderr, no traceback; 1 internal error or failed verification. Outputs are written
atomically and
the input file is never written.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
from rich.table import Table

from graphopt.algorithms.memory.arena import prove
from graphopt.algorithms.memory.plot import plot_plan
from graphopt.algorithms.tvm.runner import load_artifact
from graphopt.core import __version__
from graphopt.core.cost import model_cost
from graphopt.core.errors import GraphoptError, PassError, VerificationError
from graphopt.core.feeds import random_feeds
from graphopt.core.latency import interleaved_latency
from graphopt.core.loader import load
from graphopt.core.saver import save
from graphopt.core.session import run_model
from graphopt.core.shapes import infer_shapes, parse_input_shapes, prepare
from graphopt.core.verify import verify
from graphopt.jobs.compile import bench_artifact, compile_model
from graphopt.jobs.diff import diff_models
from graphopt.jobs.inspect import inspect_model
from graphopt.jobs.optimize import DEFAULT_PIPELINE, optimize_model
from graphopt.jobs.plan import apply_order, plan_memory
from graphopt.jobs.prune import prune, prune_scan
from graphopt.jobs.quantize import quantize
from graphopt.jobs.recipe import describe_builtin, run_recipe
from graphopt.jobs.report import write_report
from graphopt.passes import get_pass, registered_passes, resolve_passes

logger = logging.getLogger("graphopt")

Handler = Callable[[argparse.Namespace], int]
COMMANDS: dict[str, Handler] = {}


# --------------------------------------------------------------------------- output helpers


def console(stderr: bool = False) -> Any:
    return Console(stderr=stderr, highlight=False, soft_wrap=False)


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(_jsonable(obj), indent=2, sort_keys=False) + "\n")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        if math.isnan(f):
            return None
        if math.isinf(f):
            return "inf" if f > 0 else "-inf"
        return f
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj


def human_bytes(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TB"


def human_count(n: float | None) -> str:
    if n is None:
        return "?"
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def fmt_shape(shape: Sequence[Any] | None) -> str:
    if shape is None:
        return "?"
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def verify_table(report: Any, title: str = "verification against the input (onnxruntime)") -> Any:
    t = Table(title=title, title_justify="left")
    for col in ("output", "shape", "max abs err", "cosine", "SQNR dB", "ok"):
        t.add_column(col, justify="right" if col not in ("output",) else "left")
    for o in report.outputs:
        sq = "inf" if o.sqnr_db == math.inf else f"{o.sqnr_db:.1f}"
        t.add_row(o.name, fmt_shape(o.shape), f"{o.max_abs_err:.3g}", f"{o.cosine:.6f}", sq,
                  "[green]yes[/]" if o.ok else f"[red]NO[/] {o.note}")
    return t


# --------------------------------------------------------------------------- common arguments


def common_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME:DIMS",
                   help="fix an input's shape, e.g. x:1x3x640x640 (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    return p


def load_model(path: str, input_shapes: Sequence[str], load_weights: bool = True) -> Any:
    shapes = parse_input_shapes(input_shapes)
    model = load(path, load_weights=load_weights)
    return prepare(model, shapes)


def check_output_path(inp: str, out: str) -> Path:
    p = Path(out)
    try:
        if p.exists() and p.resolve() == Path(inp).resolve():
            raise GraphoptError(f"output {out} is the input file; choose another output path")
    except OSError:
        pass
    if p.exists() and p.is_dir():
        raise GraphoptError(f"output {out} is a folder; give a file path")
    return p


# --------------------------------------------------------------------------- inspect


def cmd_inspect(args: argparse.Namespace) -> int:
    # external weights are not read: sizes come from the tensors' dims (seconds for a >2 GB model)
    model = load_model(args.model, args.input_shape, load_weights=False)
    cost = model_cost(model)
    info = {"model": str(args.model), **inspect_model(model, per_node=args.per_node, cost=cost)}
    if args.json:
        emit_json(info)
        return 0

    c = console()
    c.print(f"[bold]{args.model}[/]  opset {model.opset}  IR {model.ir_version}  "
            f"producer {info['producer'] or '?'}")
    io = Table(title="inputs and outputs", title_justify="left")
    for col in ("", "name", "shape", "dtype"):
        io.add_column(col)
    for t in model.graph.inputs:
        io.add_row("in", t.name, fmt_shape(t.shape), str(t.dtype))
    for t in model.graph.outputs:
        io.add_row("out", t.name, fmt_shape(t.shape), str(t.dtype))
    c.print(io)
    summ = Table(title="summary", title_justify="left", show_header=False)
    summ.add_column("what")
    summ.add_column("value", justify="right")
    summ.add_row("nodes", f"{info['nodes']} ({info['subgraphs']} subgraphs)")
    summ.add_row("params", f"{human_count(cost.params)} ({human_bytes(cost.param_bytes)})")
    summ.add_row("MACs", human_count(cost.macs))
    summ.add_row("FLOPs", human_count(cost.flops))
    summ.add_row("activations, one buffer each", human_bytes(cost.activation_bytes_naive))
    summ.add_row("activations, liveness peak", f"{human_bytes(cost.activation_bytes_peak)}"
                 f" at {cost.peak_node or '?'}")
    if cost.unknown_shapes:
        summ.add_row("tensors of unknown size", f"{cost.unknown_shapes} (fix --input-shape)")
    c.print(summ)
    ops = Table(title="operators", title_justify="left")
    for col, j in (("op", "left"), ("count", "right"), ("MACs", "right"), ("params", "right")):
        ops.add_column(col, justify=j)  # type: ignore[arg-type]
    by_op = cost.by_op()
    for op, n in info["ops"].items():
        row = by_op.get(op, {})
        ops.add_row(op, str(n), human_count(row.get("macs", 0)), human_count(row.get("params", 0)))
    c.print(ops)
    if args.per_node:
        pn = Table(title="per node", title_justify="left")
        for col in ("node", "op", "MACs", "params", "output bytes"):
            pn.add_column(col, justify="left" if col in ("node", "op") else "right")
        for n in cost.nodes:
            pn.add_row(n.name, n.op, human_count(n.macs), human_count(n.params),
                       human_bytes(n.output_bytes))
        c.print(pn)
    return 0


# --------------------------------------------------------------------------- optimize


def summary_numbers(model: Any) -> dict[str, Any]:
    cost = model_cost(model)
    return {"nodes": model.num_nodes(), "ops": model.op_histogram(), "params": cost.params,
            "param_bytes": cost.param_bytes, "macs": cost.macs,
            "activation_peak": cost.activation_bytes_peak}


def before_after_table(before: dict[str, Any], after: dict[str, Any], title: str) -> Any:
    t = Table(title=title, title_justify="left")
    for col in ("", "before", "after", "change"):
        t.add_column(col, justify="left" if not col or col == "" else "right")

    def row(label: str, a: float, b: float, fmt: Callable[[float], str]) -> None:
        ch = "" if a == b else (f"{(b - a) / a * 100:+.1f}%" if a else "new")
        t.add_row(label, fmt(a), fmt(b), ch)

    row("nodes", before["nodes"], after["nodes"], lambda v: str(int(v)))
    row("params", before["params"], after["params"], human_count)
    row("weights", before["param_bytes"], after["param_bytes"], human_bytes)
    row("MACs", before["macs"], after["macs"], human_count)
    row("activation peak", before["activation_peak"], after["activation_peak"], human_bytes)
    ops = sorted(set(before["ops"]) | set(after["ops"]))
    for op in ops:
        a, b = before["ops"].get(op, 0), after["ops"].get(op, 0)
        if a != b:
            t.add_row(f"  {op}", str(a), str(b), f"{b - a:+d}")
    return t


def cmd_optimize(args: argparse.Namespace) -> int:
    out_path = check_output_path(args.model, args.output)
    if args.recipe:
        return optimize_recipe(args, out_path)
    shapes = parse_input_shapes(args.input_shape)
    passes = resolve_passes(args.passes) if args.passes else None
    model = load(args.model)
    t0 = time.perf_counter()
    res = optimize_model(model, passes=passes, target=args.target, input_shapes=shapes,
                         verify_output=not args.no_verify)
    before = summary_numbers(res.original)
    after = summary_numbers(res.model)
    save(res.model, out_path)
    if args.report:
        write_report(args.report, res.original, res.model, verify=res.verify,
                     title=f"graphopt optimize {Path(args.model).name}",
                     tables={"passes": [{"pass": k, **v} for k, v in res.stats().items()]})
    total = time.perf_counter() - t0
    latency = None
    if args.bench:
        latency = interleaved_latency({"before": res.original, "after": res.model},
                                      random_feeds(res.original, seed=0))
    payload = {
        "input": str(args.model), "output": str(out_path), "target": args.target,
        "latency_ms": latency,
        "nodes_before": before["nodes"], "nodes_after": after["nodes"],
        "macs_before": before["macs"], "macs_after": after["macs"],
        "params_before": before["params"], "params_after": after["params"],
        "ops_before": before["ops"], "ops_after": after["ops"],
        "verify": res.verify.to_json() if res.verify else None,
        "passes": res.stats(), "seconds": round(total, 3),
        "report": str(args.report) if args.report else None,
    }
    if args.json:
        emit_json(payload)
        return 0
    c = console()
    c.print(before_after_table(before, after, f"{args.model} -> {out_path}"))
    stats = res.stats()
    if stats:
        pt = Table(title="passes", title_justify="left")
        pt.add_column("pass")
        pt.add_column("what it did")
        for name, st in stats.items():
            pt.add_row(name, ", ".join(f"{k}={v}" for k, v in st.items() if v) or "-")
        c.print(pt)
    if res.verify:
        c.print(verify_table(res.verify))
    if latency:
        lt = Table(title="onnxruntime latency (median ms, interleaved, 1 thread, spinning off)",
                   title_justify="left")
        for col in ("level", "before", "after", "speed-up"):
            lt.add_column(col, justify="left" if col == "level" else "right")
        for level, label in (("disable_all", "ORT_DISABLE_ALL"), ("all", "ORT_ENABLE_ALL")):
            a, b = latency["before"][level], latency["after"][level]
            lt.add_row(label, f"{a:.3f}", f"{b:.3f}", f"{a / b:.2f}x" if b > 0 else "-")
        c.print(lt)
    c.print(f"optimized in {res.seconds:.2f} s, wrote {out_path} ({total:.2f} s in all)")
    return 0


# --------------------------------------------------------------------------- list-passes


def cmd_list_passes(args: argparse.Namespace) -> int:
    passes = registered_passes()
    rows = [{"name": n, "summary": cls.describe(), "default": n in DEFAULT_PIPELINE,
             "kind": "analysis" if cls.analysis else ("lossy" if cls.lossy else "exact")}
            for n, cls in passes.items()]
    if args.json:
        emit_json({"passes": rows})
        return 0

    t = Table(title="passes", title_justify="left")
    for col in ("name", "kind", "default", "what it does"):
        t.add_column(col)
    for r in rows:
        t.add_row(str(r["name"]), str(r["kind"]), "yes" if r["default"] else "", str(r["summary"]))
    console().print(t)
    return 0


# --------------------------------------------------------------------------- parser and main


def build_parser() -> argparse.ArgumentParser:
    common = common_parser()
    parser = argparse.ArgumentParser(
        prog="graphopt", description="A compiler-style graph optimizer for ONNX models.")

    parser.add_argument("--version", action="version", version=f"graphopt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("inspect", parents=[common], help="summary: I/O, ops, params, MACs, memory")
    p.add_argument("model")
    p.add_argument("--per-node", action="store_true", help="also list every node's cost")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("optimize", parents=[common], help="simplify and fuse; verify; write ONNX")
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--target", default="portable", choices=["portable", "ort"],
                   help="portable: standard ONNX only (default); ort: may emit onnxruntime ops")
    p.add_argument("--passes", help="comma-separated pass names instead of the default pipeline")
    p.add_argument("--no-verify", action="store_true", help="skip the onnxruntime comparison")
    p.add_argument("--report", metavar="OUT.html",
                   help="write a self-contained HTML report (graphs before/after, summary)")
    p.add_argument("--recipe", metavar="NAME|FILE.toml",
                   help="run a recipe (built-in name or TOML file) instead of --passes; "
                   "'graphopt list-recipes' shows the built-in ones")
    p.add_argument("--calib", metavar="DATA", help="calibration data for recipe steps "
                   "(.npz, .npy or a folder; overrides the recipe's calib)")
    p.add_argument("--bench", action="store_true",
                   help="onnxruntime latency before/after at DISABLE_ALL and ENABLE_ALL "
                   "(interleaved medians); with --recipe: after every step")
    p.set_defaults(func=cmd_optimize)

    p = sub.add_parser("list-passes", parents=[common], help="the registered passes")
    p.set_defaults(func=cmd_list_passes)

    for register in EXTRA_COMMANDS:
        register(sub, common)
    return parser


#: functions (subparsers, common parent) -> None that add more commands; kept in this module
EXTRA_COMMANDS: list[Callable[[Any, argparse.ArgumentParser], None]] = []


# --------------------------------------------------------------------------- fp16 (issue 8)


def cmd_fp16(args: argparse.Namespace) -> int:
    out_path = check_output_path(args.model, args.output)
    t0 = time.perf_counter()
    original = prepare(load(args.model), parse_input_shapes(args.input_shape))
    work = original.clone()
    p = get_pass("fp16", keep_fp32=args.keep_fp32, keep_io_types=not args.io_fp16,
                 keep_softmax=args.keep_softmax, kernels=args.kernels)
    res = p(work)
    infer_shapes(res.model)
    report = None if args.no_verify else verify(original, res.model, min_sqnr_db=args.min_sqnr)
    before, after = summary_numbers(original), summary_numbers(res.model)
    stats = dict(res.stats)
    kept = stats.pop("kept_fp32", [])
    payload = {
        "input": str(args.model), "output": str(out_path),
        "nodes_before": before["nodes"], "nodes_after": after["nodes"],
        "macs_before": before["macs"], "macs_after": after["macs"],
        "params_before": before["params"], "params_after": after["params"],
        "param_bytes_before": before["param_bytes"], "param_bytes_after": after["param_bytes"],
        "ops_before": before["ops"], "ops_after": after["ops"],
        "verify": report.to_json() if report else None,
        "passes": {"fp16": stats}, "kept_fp32": kept,
    }
    if report is not None and not report.ok:
        bad = report.worst()
        assert bad is not None
        raise VerificationError(
            f"float16 model's output '{bad.name}' has SQNR {bad.sqnr_db:.1f} dB "
            f"< {args.min_sqnr} dB"
            f"{' (' + bad.note + ')' if bad.note else ''}; not written. Keep more ops in float32 "
            "with --keep-fp32 OP,... or lower --min-sqnr")
    save(res.model, out_path)
    if args.report:
        write_report(args.report, original, res.model, verify=report,
                     title=f"graphopt fp16 {Path(args.model).name}",
                     summary={"nodes kept float32": len(kept),
                              "Casts inserted": stats.get("casts_inserted", 0)})
    payload["seconds"] = round(time.perf_counter() - t0, 3)
    if args.json:
        emit_json(payload)
        return 0
    c = console()
    c.print(before_after_table(before, after, f"{args.model} -> {out_path} (float16)"))
    c.print(f"fp16: {stats.get('nodes_fp16', 0)} nodes in float16, "
            f"{stats.get('casts_inserted', 0)} Casts inserted, {len(kept)} nodes kept in float32"
            + (f" ({', '.join(kept[:8])}{', ...' if len(kept) > 8 else ''})" if kept else ""))
    if report:
        c.print(verify_table(report))
    c.print(f"wrote {out_path} in {payload['seconds']:.2f} s")
    return 0


def register_fp16(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("fp16", parents=[common],
                       help="convert to float16 (float32 kept where half breaks numerics)")
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--keep-fp32", default="", metavar="OPS",
                   help="comma-separated op types or node names to keep in float32")
    p.add_argument("--io-fp16", action="store_true",
                   help="make graph inputs/outputs float16 too (default: float32 with Casts)")
    p.add_argument("--keep-softmax", action="store_true", help="keep Softmax in float32")
    p.add_argument("--kernels", choices=["any", "native"], default="any",
                   help="native: also keep ops that onnxruntime CPU has no float16 kernel for")
    p.add_argument("--min-sqnr", type=float, default=30.0, metavar="DB",
                   help="minimum output SQNR against the float32 model (default 30 dB)")
    p.add_argument("--no-verify", action="store_true", help="skip the onnxruntime comparison")
    p.add_argument("--report", metavar="OUT.html", help="write a self-contained HTML report")
    p.set_defaults(func=cmd_fp16)


EXTRA_COMMANDS.append(register_fp16)


# --------------------------------------------------------------------------- diff (issue 8)


def cmd_diff(args: argparse.Namespace) -> int:
    shapes = parse_input_shapes(args.input_shape)
    a = prepare(load(args.a), shapes)
    b = prepare(load(args.b), shapes)
    rep = diff_models(a, b, per_layer=args.per_layer, rtol=args.rtol, atol=args.atol,
                      numeric=not args.structure_only)
    payload = {"a": str(args.a), "b": str(args.b), **rep.to_json()}
    if not args.per_layer:
        payload.pop("layers")
    if args.json:
        emit_json(payload)
        return 1 if args.check and not rep.outputs_equal else 0

    c = console()
    t = Table(title=f"{args.a} -> {args.b}", title_justify="left")
    for col in ("", "A", "B"):
        t.add_column(col, justify="left" if not col else "right")
    t.add_row("nodes", str(rep.nodes_a), str(rep.nodes_b))
    ops = sorted(set(rep.nodes_added) | set(rep.nodes_removed))
    for op in ops:
        n = rep.nodes_added.get(op, 0) - rep.nodes_removed.get(op, 0)
        t.add_row(f"  {op}", "", f"{n:+d}")
    t.add_row("initializers added/removed/changed", "",
              f"{len(rep.initializers_added)}/{len(rep.initializers_removed)}/"
              f"{len(rep.initializers_changed)}")
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
            ft.add_row(label, str(n), f"{', '.join(ex.replaced)} -> {ex.node}")
        c.print(ft)
    for label, names in (("changed", rep.changed), ("removed", rep.removed),
                         ("added", rep.added), ("initializers changed", rep.initializers_changed)):
        if names:
            c.print(f"{label}: {', '.join(names[:10])}{' ...' if len(names) > 10 else ''}")
    if rep.outputs:
        c.print(verify_table(rep, title=f"outputs (rtol {args.rtol:g}, atol {args.atol:g})"))
        c.print("outputs equal" if rep.outputs_equal else "[red]outputs differ[/]")
    if args.per_layer:
        if rep.first_divergent_node:
            d = next(x for x in rep.layers if x.tensor == rep.first_divergent_tensor)
            c.print(f"first divergent node: [bold]{rep.first_divergent_node}[/] ({d.op}), tensor "
                    f"{d.tensor}: max abs err {d.max_abs_err:.3g}, SQNR {d.sqnr_db:.1f} dB "
                    f"({len(rep.layers)} tensors compared)")
        else:
            c.print(f"no divergent node ({len(rep.layers)} tensors compared)")
    return 1 if args.check and not rep.outputs_equal else 0


def register_diff(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("diff", parents=[common],
                       help="structural and numerical diff of two models")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--per-layer", action="store_true",
                   help="compare every tensor both models have; report the first divergent node")
    p.add_argument("--rtol", type=float, default=1e-4, help="relative tolerance (of max |A|)")
    p.add_argument("--atol", type=float, default=1e-5, help="absolute tolerance")
    p.add_argument("--structure-only", action="store_true", help="skip onnxruntime")
    p.add_argument("--check", action="store_true", help="exit 1 when the outputs differ")
    p.set_defaults(func=cmd_diff)


EXTRA_COMMANDS.append(register_diff)


# --------------------------------------------------------------------------- recipes (issue 8)


def _sqnr_text(d: dict[str, float]) -> str:
    vals = ["inf" if v == math.inf else f"{v:.1f}" for v in d.values()]
    if len(d) == 1:
        return f"{vals[0]} dB"
    return ", ".join(f"{k}: {v}" for k, v in zip(d, vals)) + " dB"


def optimize_recipe(args: argparse.Namespace, out_path: Path) -> int:
    """``graphopt optimize MODEL -o OUT --recipe NAME|FILE``: run, verify and tabulate each step."""
    if args.passes:
        raise GraphoptError("give either --recipe or --passes, not both")
    t0 = time.perf_counter()
    model = load(args.model)
    res = run_recipe(model, args.recipe, input_shapes=parse_input_shapes(args.input_shape),
                     calib=args.calib, output=out_path, bench=args.bench)
    save(res.model, out_path)
    before, after = summary_numbers(res.original), summary_numbers(res.model)
    rows = res.table()
    if args.report:
        write_report(args.report, res.original, res.model, quant=res.quant, memory=res.plan,
                     title=f"graphopt recipe {res.recipe.name} on {Path(args.model).name}",
                     tables={"steps": [{**r, "fidelity_sqnr_db": _sqnr_text(r["fidelity_sqnr_db"]),
                                        "step_sqnr_db": _sqnr_text(r["step_sqnr_db"])}
                                       for r in rows]})
    total = time.perf_counter() - t0
    last = res.steps[-1] if res.steps else None
    payload = {
        "input": str(args.model), "output": str(out_path), "recipe": res.recipe.name,
        "nodes_before": before["nodes"], "nodes_after": after["nodes"],
        "macs_before": before["macs"], "macs_after": after["macs"],
        "params_before": before["params"], "params_after": after["params"],
        "verify": {k: {"sqnr_db": v} for k, v in (last.fidelity if last else {}).items()},
        "passes": {s.label: s.stats for s in res.steps}, "steps": rows, "ok": res.ok,
        "artifact": str(res.artifact) if res.artifact else None,
        "report": str(args.report) if args.report else None, "seconds": round(total, 3),
    }
    if args.json:
        emit_json(payload)
        return 0

    t = Table(title=f"recipe {res.recipe.name}: {args.model} -> {out_path}", title_justify="left")
    for col in ("step", "verified", "nodes", "params", "MACs", "size", "arena",
                "SQNR vs original", "latency", "time"):
        t.add_column(col, justify="left" if col in ("step", "verified") else "right")
    t.add_row("input", "-", str(before["nodes"]), human_count(before["params"]),
              human_count(before["macs"]), human_bytes(res.original.to_onnx().ByteSize()),
              "-", "-", "-", "-")
    for s in res.steps:
        t.add_row(s.label, ("[green]yes[/] " if s.ok else "[red]NO[/] ") + s.check,
                  str(s.nodes), human_count(s.params), human_count(s.macs),
                  human_bytes(s.model_bytes),
                  human_bytes(s.arena_bytes) if s.arena_bytes is not None else "-",
                  _sqnr_text(s.fidelity), f"{s.latency_ms:.2f} ms" if s.latency_ms else "-",
                  f"{s.seconds:.1f} s")
    c = console()
    c.width = max(c.width, 160)
    c.print(t)
    for s in res.steps:
        if s.note:
            c.print(f"  {s.label}: {s.note}")
    if res.artifact:
        c.print(f"library: {res.artifact}")
    c.print(f"wrote {out_path} ({total:.1f} s in all)")
    return 0


def cmd_list_recipes(args: argparse.Namespace) -> int:
    rows = [{"name": n, "description": d, "steps": s} for n, d, s in describe_builtin()]
    if args.json:
        emit_json({"recipes": rows})
        return 0

    t = Table(title="built-in recipes (graphopt optimize MODEL -o OUT --recipe NAME)",
              title_justify="left")
    for col in ("name", "steps", "what it does"):
        t.add_column(col)
    for r in rows:
        t.add_row(str(r["name"]), " -> ".join(r["steps"]), str(r["description"]))
    console().print(t)
    return 0


def register_list_recipes(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("list-recipes", parents=[common], help="the built-in recipes")
    p.set_defaults(func=cmd_list_recipes)


EXTRA_COMMANDS.append(register_list_recipes)


# --------------------------------------------------------------------------- plan (issue 6)


def cmd_plan(args: argparse.Namespace) -> int:
    out_path = check_output_path(args.model, args.output) if args.output else None
    shapes = parse_input_shapes(args.input_shape)
    model = load(args.model)
    t0 = time.perf_counter()
    feeds = None
    if args.feeds:
        try:
            with np.load(args.feeds) as z:
                feeds = {k: z[k] for k in z.files}
        except (OSError, ValueError) as exc:
            raise GraphoptError(f"cannot read --feeds {args.feeds}: {exc}") from None
    plan = plan_memory(model, shapes, strategy=args.strategy, inplace=not args.no_inplace,
                       reorder=not args.no_reorder, feeds=feeds)
    seconds = time.perf_counter() - t0
    proof = None
    if args.prove:
        assert plan.model is not None
        proof = prove(plan.model, plan, feeds=feeds)
    if args.plot:
        plot_plan(plan, args.plot, title=f"{Path(args.model).name}: arena "
                  f"{human_bytes(plan.arena_bytes)} ({plan.ratio:.3f}x lower bound), "
                  f"naive {human_bytes(plan.naive_bytes)}"
                  f"{', in-place' if plan.inplace else ''}")
    plan_file = None
    if out_path is not None:
        out = apply_order(model, plan)
        out.metadata["graphopt.memory_plan"] = plan.compact_json()
        save(out, out_path)
        plan_file = Path(str(out_path) + ".memplan.json")
        tmp = plan_file.with_name(plan_file.name + ".tmp")
        tmp.write_text(json.dumps(_jsonable(plan.to_json()), indent=1) + "\n")
        os.replace(tmp, plan_file)
    if args.report:
        write_report(args.report, plan.model or model, None, memory=plan,
                     title=f"graphopt plan: {Path(args.model).name}")
    payload: dict[str, Any] = {"model": str(args.model), **plan.summary(),
                               "report": str(args.report) if args.report else None,
                               "output": str(out_path) if out_path else None,
                               "plan_file": str(plan_file) if plan_file else None,
                               "plot": args.plot, "seconds": round(seconds, 3),
                               "proof": proof.to_json() if proof else None}
    if proof is not None and not proof.ok:
        if args.json:
            emit_json(payload)
        raise VerificationError(
            f"the plan failed its execution proof ({proof.error or 'outputs differ'})")
    if args.json:
        emit_json(payload)
        return 0

    s = plan.summary()
    t = Table(title=f"memory plan of {args.model}", title_justify="left", show_header=False)
    t.add_column("what")
    t.add_column("bytes", justify="right")
    t.add_column("", justify="right")
    t.add_row("one buffer per tensor (naive)", human_bytes(plan.naive_bytes), "")
    t.add_row("lower bound (liveness)", human_bytes(plan.lower_bound_bytes), "1.000x")
    if plan.inplace:
        t.add_row("lower bound with in-place/aliasing", human_bytes(plan.inplace_lower_bound_bytes),
                  f"{plan.inplace_lower_bound_bytes / max(plan.lower_bound_bytes, 1):.3f}x")
    t.add_row(f"[bold]arena[/] ({plan.strategy})", f"[bold]{human_bytes(plan.arena_bytes)}[/]",
              f"{s['arena_over_lower_bound']:.3f}x")
    t.add_row("arena / its lower bound", "", f"{plan.ratio:.3f}x")
    t.add_row("naive / arena", "", f"{s['naive_over_arena']:.1f}x")
    c = console()
    c.print(t)
    c.print(f"peak at step {plan.peak_step} of {plan.steps}: node '{plan.peak_node}'")
    c.print(f"buffers {s['buffers']} for {s['tensors']} tensors: {plan.aliased} aliased views, "
            f"{plan.inplace_reused} in-place writes"
            + (f", {len(plan.unplanned)} tensors of unknown size outside the arena"
               if plan.unplanned else ""))
    if plan.order_changed and plan.order_before_arena:
        c.print(f"node order changed: arena {human_bytes(plan.order_before_arena)} -> "
                f"{human_bytes(plan.arena_bytes)} "
                f"({(plan.arena_bytes / plan.order_before_arena - 1) * 100:+.1f}%)")
    else:
        c.print("node order unchanged (" + ("--no-reorder" if args.no_reorder else
                                            "no order with a smaller arena found") + ")")
    if proof is not None:
        c.print(f"execution proof: [green]passed[/] ({proof.nodes_in_arena} nodes ran inside the "
                f"arena, outputs match onnxruntime)")
    if out_path is not None:
        c.print(f"wrote {out_path} (planned order, plan in metadata 'graphopt.memory_plan') "
                f"and {plan_file}")
    if args.plot:
        c.print(f"wrote {args.plot}")
    return 0


def register_plan(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("plan", parents=[common],
                       help="plan activation memory into one arena (liveness, offsets, in-place)")
    p.add_argument("model")
    p.add_argument("--report", metavar="OUT.html",
                   help="write a self-contained HTML report (graphs, per-step figures)")
    p.add_argument("-o", "--output", help="write the model in the planned order, with the plan "
                   "in its metadata and beside it as OUT.memplan.json")
    p.add_argument("--strategy", default="best",
                   choices=["greedy-size", "greedy-breadth", "best"],
                   help="offset assignment (best: try all, keep the smallest arena)")
    p.add_argument("--no-inplace", action="store_true",
                   help="no in-place writes and no reshape aliasing: one buffer per tensor")
    p.add_argument("--no-reorder", action="store_true", help="keep the given node order")
    p.add_argument("--plot", metavar="PNG", help="draw the arena over time")
    p.add_argument("--prove", action="store_true",
                   help="run the model node by node inside the arena and compare with "
                        "onnxruntime (random inputs unless --feeds)")
    p.add_argument("--feeds", metavar="NPZ", help="inputs (arrays keyed by input name) for "
                   "--prove and for sizing data-dependent tensors")
    p.set_defaults(func=cmd_plan)


EXTRA_COMMANDS.append(register_plan)


# --------------------------------------------------------------------------- prune (issue 5)


def _prune_group_table(report: Any, limit: int = 60) -> Any:
    t = Table(title="channel groups (width of the first producer)", title_justify="left")
    for col in ("group", "producers", "before", "after", "status"):
        t.add_column(col, justify="right" if col in ("before", "after") else "left")
    rows = sorted(report.groups, key=lambda g: (g.blocked, g.name))
    for g in rows[:limit]:
        status = "blocked: " + "; ".join(g.reasons[:2]) if g.blocked else (
            "pruned" if g.width_after < g.width_before else "kept")
        t.add_row(g.name, str(len(g.producers)), str(g.width_before), str(g.width_after), status)
    if len(rows) > limit:
        t.add_row(f"... {len(rows) - limit} more", "", "", "", "")
    return t


def _fidelity_table(fid: Sequence[Any], title: str) -> Any:
    t = Table(title=title, title_justify="left")
    for col in ("output", "SQNR dB", "cosine", "top-1 agreement"):
        t.add_column(col, justify="left" if col == "output" else "right")
    for f in fid:
        t.add_row(f.name, f"{f.sqnr_db:.1f}", f"{f.cosine:.4f}",
                  "-" if f.top1_agreement is None else f"{f.top1_agreement:.3f}")
    return t


def cmd_prune(args: argparse.Namespace) -> int:
    shapes = parse_input_shapes(args.input_shape)
    if not args.scan and not args.output:
        raise GraphoptError("give -o OUT (or --scan to only measure several ratios)")
    if args.ratio is None and not args.scan:
        raise GraphoptError("give --ratio R (fraction of channels to remove, e.g. 0.3)")
    if args.ratio is not None and not 0.0 <= args.ratio < 1.0:
        raise GraphoptError(f"--ratio must be in [0, 1), got {args.ratio}")
    out_path = check_output_path(args.model, args.output) if args.output else None
    model = load(args.model)
    opts = dict(calib=args.calib, criterion=args.criterion, round_to=args.round_to,
                recover=not args.no_recover, input_shapes=shapes or None,
                min_channels=args.min_channels, min_fraction=args.min_fraction, scope=args.scope)
    t0 = time.perf_counter()
    payload: dict[str, Any] = {"input": str(args.model), "output": str(out_path or "") or None}
    c = None if args.json else console()
    pts: list[Any] = []
    if args.scan:
        try:
            ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
        except ValueError:
            raise GraphoptError(f"bad --ratios '{args.ratios}': comma-separated numbers") from None
        pts = prune_scan(model, ratios, **opts)
        payload["scan"] = [{"ratio": p.ratio, "macs_ratio": p.macs_ratio,
                            "sqnr_db": _jsonable(p.main.sqnr_db), "cosine": p.main.cosine,
                            "top1_agreement": p.main.top1_agreement} for p in pts]
        if args.plot:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(6, 4))
            xs = [p.macs_ratio for p in pts]
            agree = [p.main.top1_agreement for p in pts]
            ys = agree if all(a is not None for a in agree) else [p.main.cosine for p in pts]
            ax.plot(xs, ys, "o-")
            for p, x, y in zip(pts, xs, ys):
                ax.annotate(f"{p.ratio:g}", (x, y), textcoords="offset points", xytext=(4, 4))
            ax.set_xlabel("MACs after / before")
            ax.set_ylabel("top-1 agreement" if ys is agree else "output cosine")
            ax.set_title(f"prune scan: {Path(args.model).name} ({args.criterion}, "
                         f"{'recovery' if not args.no_recover and args.calib else 'no recovery'})")
            ax.grid(True, alpha=0.3)
            fig.tight_layout()
            fig.savefig(args.plot, dpi=120)
            plt.close(fig)
            payload["plot"] = str(args.plot)
        if c is not None:
            t = Table(title="MACs against fidelity", title_justify="left")
            for col in ("ratio", "MACs", "SQNR dB", "cosine", "top-1 agreement"):
                t.add_column(col, justify="right")
            for p in pts:
                f = p.main
                t.add_row(f"{p.ratio:g}", f"{p.macs_ratio:.3f}x", f"{f.sqnr_db:.1f}",
                          f"{f.cosine:.4f}",
                          "-" if f.top1_agreement is None else f"{f.top1_agreement:.3f}")
            c.print(t)
    if args.ratio is not None and out_path is not None:
        out = prune(model, args.ratio, **opts)
        save(out.model, out_path)
        rep = out.report
        if args.report:
            write_report(args.report, model, out.model, prune_scan=pts if args.scan else None,
                         title=f"graphopt prune: {Path(args.model).name}")
            payload["report"] = str(args.report)
        payload.update({
            "nodes_before": model.num_nodes(), "nodes_after": out.model.num_nodes(),
            "macs_before": rep.macs_before, "macs_after": rep.macs_after,
            "prunable_macs_fraction": rep.prunable_fraction,
            "verify": {f.name: {"max_abs_err": f.max_abs_err, "cosine": f.cosine,
                                "sqnr_db": _jsonable(f.sqnr_db)} for f in out.fidelity},
            "fidelity": out.to_json()["fidelity"],
            "passes": {"prune-channels": out.stats},
            "groups": [{"name": g.name, "producers": g.producers, "width_before": g.width_before,
                        "width_after": g.width_after, "blocked": g.blocked,
                        "reasons": g.reasons} for g in rep.groups],
        })
        if c is not None:
            c.print(_prune_group_table(rep))

            t = Table(title=f"{args.model} -> {out_path}", title_justify="left")
            t.add_column("")
            t.add_column("value", justify="right")
            t.add_row("MACs before", human_count(rep.macs_before))
            t.add_row("MACs after", f"{human_count(rep.macs_after)} "
                      f"({rep.macs_after / max(rep.macs_before, 1):.3f}x)")
            t.add_row("prunable compute", f"{rep.prunable_fraction * 100:.1f}%")
            t.add_row("groups pruned / blocked / all",
                      f"{out.stats['groups_pruned']} / {out.stats['groups_blocked']} / "
                      f"{out.stats['groups']}")
            t.add_row("channels removed", str(out.stats["channels_removed"]))
            t.add_row("recovery", f"{out.stats.get('layers_refit', 0)} layers refit"
                      if out.stats.get("layers_refit") else "none (no --calib or --no-recover)")
            c.print(t)
            c.print(_fidelity_table(out.fidelity, "fidelity against the original " + (
                "(held-out quarter of the calibration data)" if out.held_out else
                "(on the calibration data)" if args.calib else "(seeded random inputs)")))
    payload["seconds"] = round(time.perf_counter() - t0, 3)
    if args.report and args.scan and not (args.ratio is not None and out_path is not None):
        write_report(args.report, model, None, prune_scan=pts,
                     title=f"graphopt prune --scan: {Path(args.model).name}")
        payload["report"] = str(args.report)
    if args.json:
        emit_json(payload)
    elif out_path is not None and args.ratio is not None:
        console().print(f"wrote {out_path} in {payload['seconds']:.2f} s")
    return 0


def register_prune(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("prune", parents=[common],
                       help="structured channel pruning with least-squares recovery")
    p.add_argument("model")
    p.add_argument("--report", metavar="OUT.html",
                   help="write a self-contained HTML report (graphs, per-step figures)")
    p.add_argument("-o", "--output", help="pruned model (required unless --scan)")
    p.add_argument("--ratio", type=float, help="fraction of channels removed per group (0..1)")
    p.add_argument("--calib", metavar="DATA",
                   help=".npz keyed by input name (batch on axis 0) or a folder of .npz/.npy; "
                        "used for recovery and the activation criterion")
    p.add_argument("--criterion", choices=["l1", "l2", "bn", "activation"], default="l1",
                   help="channel importance (default l1)")
    p.add_argument("--round-to", type=int, metavar="N", help="keep widths multiples of N")
    p.add_argument("--min-channels", type=int, default=1, help="never keep fewer channels")
    p.add_argument("--min-fraction", type=float, default=0.0,
                   help="never keep less than this fraction of a group")
    p.add_argument("--scope", choices=["group", "global"], default="group",
                   help="group: the ratio in every group; global: rank all channels together")
    p.add_argument("--no-recover", action="store_true", help="skip the least-squares refit")
    p.add_argument("--scan", action="store_true",
                   help="prune at several ratios and print MACs against fidelity")
    p.add_argument("--ratios", default="0.1,0.2,0.3,0.4,0.5", help="ratios for --scan")
    p.add_argument("--plot", metavar="PNG", help="with --scan: plot MACs against fidelity")
    p.set_defaults(func=cmd_prune)


EXTRA_COMMANDS.append(register_prune)


# --------------------------------------------------------------------------- quantize (issue 4)


def _quant_layer_table(result: Any, limit: int = 400) -> Any:
    t = Table(title="layers (SQNR: this layer's output in the int8 model vs fp32; isolated: model "
                    "outputs with only this layer int8)", title_justify="left")
    for col in ("layer", "op", "status", "in scale", "out scale", "weight scale", "SQNR dB",
                "isolated dB"):
        t.add_column(col, justify="left" if col in ("layer", "op", "status") else "right")

    def db(v: float | None) -> str:
        if v is None:
            return ""
        return "inf" if v == math.inf else f"{v:.1f}"

    for layer in result.layers[:limit]:
        ins = ", ".join(f"{s:.3g}" for s in layer.input_scales.values())
        ws = "" if not layer.weight_scale else (
            f"{layer.weight_scale[0]:.2g}..{layer.weight_scale[1]:.2g}" if layer.per_channel
            else f"{layer.weight_scale[0]:.3g}")
        status = "int8" if layer.status == "int8" else "[yellow]float[/]"
        t.add_row(layer.name, layer.op + (f"+{layer.absorbed.split('/')[-1]}" if layer.absorbed
                                          else ""), status, ins,
                  "" if layer.output_scale is None else f"{layer.output_scale:.3g}", ws,
                  db(layer.sqnr_db), db(layer.sensitivity_db))
    return t


def cmd_quantize(args: argparse.Namespace) -> int:
    out_path = check_output_path(args.model, args.output)
    shapes = parse_input_shapes(args.input_shape)
    model = load(args.model)
    keep = [s.strip() for s in (args.keep_float or "").split(",") if s.strip()]
    t0 = time.perf_counter()
    progress_cb = None
    bar = None
    if not args.json and sys.stderr.isatty() or args.progress:
        bar = Progress("calibrating", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                       console=console(stderr=True), transient=True)
        task = bar.add_task("calibrating", total=None)
        bar.start()

        def progress_cb(done: int, total: int | None) -> None:
            bar.update(task, completed=done, total=total)

    try:
        res = quantize(model, args.calib, method=args.method, activations=args.activations,
                       per_channel=args.per_channel, min_sqnr=args.min_sqnr,
                       sensitivity=True if args.sensitivity else None, input_shapes=shapes,
                       optimize=not args.no_optimize, keep_float=keep,
                       batch_size=args.batch_size, limit=args.limit,
                       bias_correct=args.bias_correction, progress=progress_cb)
    finally:
        if bar is not None:
            bar.stop()
    before = summary_numbers(res.original)
    after = summary_numbers(res.model)
    save(res.model, out_path)
    if args.report:
        write_report(args.report, res.original, res.model, quant=res, verify=res.verify,
                     title=f"graphopt quantize: {Path(args.model).name}")
    size_in = Path(args.model).stat().st_size
    size_out = out_path.stat().st_size
    total = time.perf_counter() - t0
    payload = {
        "input": str(args.model), "output": str(out_path),
        "nodes_before": before["nodes"], "nodes_after": after["nodes"],
        "macs_before": before["macs"], "macs_after": after["macs"],
        "verify": res.verify.to_json() if res.verify else None,
        "passes": {**({"optimize": res.optimize_stats} if res.optimize_stats else {}),
                   "quantize-int8": res.stats},
        **res.summary(),
        "file_bytes_before": size_in, "file_bytes_after": size_out,
        "layers": [layer.to_json() for layer in res.layers],
        "optimize_note": res.optimize_note, "seconds": round(total, 3),
        "report": str(args.report) if args.report else None,
    }
    if args.json:
        emit_json(payload)
        return 0
    c = console()
    c.print(f"[bold]{args.model}[/] -> {out_path}: {res.method} calibration on "
            f"{res.calib_samples} samples in {res.calib_seconds:.1f} s; activations "
            f"{res.activation_dtype}{' (reduce_range)' if res.reduce_range else ''} "
            f"({res.activation_reason}); weights int8 "
            f"{'per channel' if res.per_channel else 'per tensor'}; opset {res.opset_before} -> "
            f"{res.opset_after}")
    if res.optimize_note:
        c.print(f"[yellow]{res.optimize_note}[/]")
    c.print(_quant_layer_table(res))
    if res.kept_float:
        kt = Table(title="kept in float", title_justify="left")
        kt.add_column("node")
        kt.add_column("why")
        for n, why in res.kept_float.items():
            kt.add_row(n, why)
        c.print(kt)
    if res.mixed_precision:
        mp = res.mixed_precision
        c.print(f"mixed precision: target {mp.get('target_sqnr_db')} dB, all-int8 "
                f"{mp.get('sqnr_all_int8_db', float('nan')):.1f} dB -> "
                f"{mp.get('sqnr_db', float('nan')):.1f} dB with {len(mp.get('kept', []))} layers "
                f"float ({'met' if mp.get('met') else 'NOT met'}, {mp.get('evaluations')} "
                f"evaluations)")
    c.print(f"file size {human_bytes(size_in)} -> {human_bytes(size_out)} "
            f"({(size_out - size_in) / max(size_in, 1) * 100:+.1f}%)")
    if res.verify:
        c.print(verify_table(res.verify, "int8 against fp32 on calibration samples (onnxruntime)"))
    c.print(f"quantized in {res.seconds:.2f} s, wrote {out_path} ({total:.2f} s in all)")
    return 0


def register_quantize(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("quantize", parents=[common],
                       help="calibrated static int8 quantization (QDQ); verify against fp32")
    p.add_argument("model")
    p.add_argument("--report", metavar="OUT.html",
                   help="write a self-contained HTML report (graphs, per-step figures)")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--calib", required=True, metavar="DATA",
                   help=".npz keyed by input name (samples on axis 0), or a folder of .npz files "
                        "or of .npy files named after the inputs")
    p.add_argument("--method", default="mse", choices=["minmax", "percentile", "entropy", "mse"],
                   help="activation range method (default mse)")
    p.add_argument("--activations", default="auto", choices=["auto", "uint8", "int8"],
                   help="activation type; auto reads the CPU flags (default)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--per-channel", dest="per_channel", action="store_true", default=True,
                   help="per-output-channel weight scales (default; raises the opset to 13)")
    g.add_argument("--per-tensor", dest="per_channel", action="store_false",
                   help="one weight scale per tensor")
    p.add_argument("--min-sqnr", type=float, default=None, metavar="DB",
                   help="keep the most sensitive layers float until every output reaches DB")
    p.add_argument("--sensitivity", action="store_true",
                   help="measure every layer's isolated sensitivity (one layer int8 at a time)")
    p.add_argument("--keep-float", default="", metavar="NODES",
                   help="comma-separated node names to leave in float")
    p.add_argument("--bias-correction", action="store_true",
                   help="correct Conv/Gemm biases for the mean error of weight rounding")
    p.add_argument("--batch-size", type=int, default=8, help="calibration batch size (default 8)")
    p.add_argument("--limit", type=int, default=None, help="use at most this many samples")
    p.add_argument("--no-optimize", action="store_true",
                   help="quantize the model as given (skip the default optimization pipeline)")
    p.add_argument("--progress", action="store_true",
                   help="show the calibration progress bar even when stderr is not a terminal")
    p.set_defaults(func=cmd_quantize)


EXTRA_COMMANDS.append(register_quantize)


# --------------------------------------------------------------------------- compile/run/bench
# (issue 7)


def cmd_compile(args: argparse.Namespace) -> int:
    out = check_output_path(args.model, args.output)
    res = compile_model(args.model, target=args.target, output=out,
                        input_shapes=parse_input_shapes(args.input_shape) or None,
                        schedules=not args.no_schedules, check_cuda_source=not args.no_nvcc_check,
                        verify=not args.no_verify)
    info = res.to_json()
    if args.json:
        emit_json(info)
        return 0

    c = console()
    t = Table(title=f"{args.model} -> {info['artifact']}", title_justify="left",
              show_header=False)
    t.add_column("what")
    t.add_column("value", justify="right")
    t.add_row("target", str(info["target"]))
    t.add_row("compile time", f"{info.get('compile_seconds', 0):.2f} s")
    t.add_row("artifact size", human_bytes(info.get("artifact_bytes")))
    t.add_row("manifest", str(info.get("manifest")))
    if info.get("kernels") is not None:
        t.add_row("kernels", str(info["kernels"]))
    if info.get("verified_on"):
        t.add_row("verified on", str(info["verified_on"]))
    if info.get("cuda_source_checked") is not None:
        t.add_row("CUDA source compiled by nvcc", str(info["cuda_source_checked"]))
    c.print(t)
    if info.get("verify"):
        vt = Table(title="verification against onnxruntime", title_justify="left")
        for col in ("output", "max abs err", "cosine", "SQNR dB"):
            vt.add_column(col, justify="left" if col == "output" else "right")
        for name, v in info["verify"].items():
            sq = v["sqnr_db"]
            vt.add_row(name, f"{float(v['max_abs_err']):.3g}", f"{float(v['cosine']):.6f}",
                       sq if isinstance(sq, str) else f"{float(sq):.1f}")
        c.print(vt)
    return 0


def _read_inputs(specs: Sequence[str]) -> dict[str, Any]:
    feeds: dict[str, Any] = {}
    for spec in specs:
        if "=" not in spec:
            raise GraphoptError(f"bad --input '{spec}': expected NAME=FILE.npy")
        name, path = spec.split("=", 1)
        try:
            feeds[name] = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise GraphoptError(f"cannot read input '{name}' from {path}: {exc}") from None
    return feeds


def cmd_run(args: argparse.Namespace) -> int:
    feeds = _read_inputs(args.input)
    if str(args.artifact).endswith(".onnx"):
        model = load(args.artifact)
        base = random_feeds(model, seed=0) if not feeds else {}
        outs = run_model(model, {**base, **feeds})
    else:
        if not Path(args.artifact).is_file():
            raise GraphoptError(f"no such file: {args.artifact}")
        outs = load_artifact(args.artifact).run(feeds)
    if args.output:
        out = check_output_path(args.artifact, args.output)
        tmp = out.with_name(f".{out.name}.tmp.npz")
        np.savez(tmp, **outs)  # type: ignore[arg-type]  # numpy's stub types **kwds as bool
        tmp.replace(out)
    summary: dict[str, dict[str, Any]] = {k: {"shape": list(v.shape), "dtype": str(v.dtype),
                   "min": float(np.min(v)) if v.size else None,
                   "max": float(np.max(v)) if v.size else None} for k, v in outs.items()}
    if args.json:
        emit_json({"artifact": str(args.artifact), "outputs": summary,
                   "output_file": args.output})
        return 0

    t = Table(title=f"outputs of {args.artifact}", title_justify="left")
    for col in ("output", "shape", "dtype", "min", "max"):
        t.add_column(col)
    for k, v in summary.items():
        t.add_row(k, fmt_shape(v["shape"]), v["dtype"], f"{v['min']:.4g}", f"{v['max']:.4g}")
    console().print(t)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    res = bench_artifact(args.artifact, args.model, runs=args.runs, warmup=args.warmup,
                         threads=args.threads)
    if args.json:
        emit_json(res)
        return 0
    c = console()
    c.print(f"TVM artifact {res['tvm_ms']:.3f} ms, onnxruntime {res['ort_ms']:.3f} ms "
            f"(TVM/ORT latency ratio {res['ratio_tvm_vs_ort']:.2f}; median of {args.runs} "
            "interleaved runs)")
    if res.get("verify"):
        bad = [k for k, v in res["verify"].items() if not v.get("ok", True)]
        c.print("outputs match onnxruntime" if not bad else f"[red]outputs differ: {bad}[/]")
    return 0


def register_tvm(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("compile", parents=[common],
                       help="compile through Apache TVM to a native library (+ manifest)")
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True, help="library path, e.g. model.so")
    p.add_argument("--target", default="llvm",
                   help="llvm (this host), aarch64, cuda, cuda:sm_80 or cuda:sm_90")
    p.add_argument("--no-schedules", action="store_true",
                   help="TVM's default kernels instead of graphopt's CPU schedules")
    p.add_argument("--no-verify", action="store_true",
                   help="skip running the library against onnxruntime")
    p.add_argument("--no-nvcc-check", action="store_true",
                   help="cuda: skip compiling the generated source with nvcc")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("run", parents=[common], help="run a compiled library or an ONNX model")
    p.add_argument("artifact", help="a library from 'graphopt compile' or an .onnx file")
    p.add_argument("--input", action="append", default=[], metavar="NAME=FILE.npy")
    p.add_argument("-o", "--output", help="write the outputs to this .npz")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("bench", parents=[common],
                       help="latency of a compiled library against onnxruntime")
    p.add_argument("artifact")
    p.add_argument("model", help="the ONNX model it was compiled from")
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(func=cmd_bench)


EXTRA_COMMANDS.append(register_tvm)


def setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else (logging.INFO if verbose == 1 else logging.DEBUG)

    logging.basicConfig(level=level, format="%(name)s: %(message)s",
                        handlers=[RichHandler(console=console(stderr=True), show_time=False)])
    try:
        gs.G_LOGGER.severity = gs.G_LOGGER.DEBUG if verbose >= 2 else (
            gs.G_LOGGER.INFO if verbose == 1 else gs.G_LOGGER.ERROR)
    except Exception:  # noqa: BLE001
        pass


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    setup_logging(getattr(args, "verbose", 0))
    # SIGTERM unwinds like Ctrl-C, so that a half-written output's temporary folder is removed
    try:
        old_term = signal.signal(signal.SIGTERM, _raise_interrupt)
    except ValueError:  # not the main thread: leave signals alone
        old_term = None
    try:
        return int(args.func(args) or 0)
    except GraphoptError as exc:
        sys.stderr.write(f"graphopt: error: {exc}\n")
        return int(getattr(exc, "exit_code", 2))
    except (VerificationError, PassError) as exc:
        sys.stderr.write(f"graphopt: error: {exc}\n")
        if getattr(args, "verbose", 0):
            logger.exception("details")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("graphopt: interrupted; no output written\n")
        return 130
    except Exception as exc:  # noqa: BLE001 - the one place internal errors are reported
        sys.stderr.write(f"graphopt: internal error: {type(exc).__name__}: {exc} "
                         "(re-run with -v for the traceback)\n")
        if getattr(args, "verbose", 0):
            logger.exception("traceback")
        return 1
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt

