"""What every command module shares: the console, JSON output, tables, human units, the name
formatter, and the parsing of the common options.

The command modules only parse arguments, call one job and format its result: ``--json`` prints
exactly the result's ``to_json()`` (:func:`emit_json`), the tables are built from the same result.
Every model-derived name (node, tensor, input, op, file) that reaches the terminal goes through
:func:`fmt_name`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from graphopt.core.errors import terminal_safe
from graphopt.core.shapes import parse_input_shapes
from graphopt.core.verify import VerifyReport
from graphopt.jobs.common import ModelNumbers


def console(stderr: bool = False) -> Console:
    """The terminal (stdout, or stderr for progress), without rich's automatic highlighting."""
    return Console(stderr=stderr, highlight=False, soft_wrap=False)


def emit_json(obj: Mapping[str, Any]) -> None:
    """Print one JSON object on stdout: a job result's ``to_json()``, unchanged."""
    sys.stdout.write(json.dumps(obj, indent=2, allow_nan=False) + "\n")


def fmt_name(name: object) -> str:
    """A name from a model or the command line, safe to print in rich markup (node, tensor, op,
    input and file names all go through here): control characters and escape sequences are
    written visibly (:func:`~graphopt.core.errors.terminal_safe`, the helper error messages go
    through too), then rich markup is escaped."""
    return escape(terminal_safe(name))


def fmt_shape(shape: Sequence[Any] | None) -> str:
    if shape is None:
        return "?"
    return "[" + ", ".join("?" if d is None else fmt_name(d) for d in shape) + "]"


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


def db(v: float | str | None) -> str:
    """A decibel figure: ``inf``, ``-inf``, one decimal, or empty for None."""
    if v is None:
        return ""
    if isinstance(v, str):
        return v
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:.1f}"


def names(items: Iterable[object], limit: int = 10) -> str:
    """``a, b, c ...``: at most ``limit`` names, formatted."""
    items = list(items)
    more = " ..." if len(items) > limit else ""
    return ", ".join(fmt_name(x) for x in items[:limit]) + more


def verify_table(
    report: VerifyReport | Any, title: str = "verification against the input (onnxruntime)"
) -> Table:
    """Per output: shape, max abs error, cosine, SQNR, ok (anything with ``.outputs`` of
    :class:`~graphopt.core.verify.OutputDiff`)."""
    t = Table(title=title, title_justify="left")
    for col in ("output", "shape", "max abs err", "cosine", "SQNR dB", "ok"):
        t.add_column(col, justify="left" if col == "output" else "right")
    for o in report.outputs:
        t.add_row(
            fmt_name(o.name),
            fmt_shape(o.shape),
            f"{o.max_abs_err:.3g}",
            f"{o.cosine:.6f}",
            db(o.sqnr_db),
            "[green]yes[/]" if o.ok else f"[red]NO[/] {fmt_name(o.note)}",
        )
    return t


def before_after_table(before: ModelNumbers, after: ModelNumbers, title: str) -> Table:
    """Nodes, params, weights, MACs, activation peak and the op counts that changed."""
    t = Table(title=title, title_justify="left")
    for col in ("", "before", "after", "change"):
        t.add_column(col, justify="left" if not col else "right")

    def row(label: str, a: float, b: float, fmt: Callable[[float], str]) -> None:
        ch = "" if a == b else (f"{(b - a) / a * 100:+.1f}%" if a else "new")
        t.add_row(label, fmt(a), fmt(b), ch)

    row("nodes", before.nodes, after.nodes, lambda v: str(int(v)))
    row("params", before.params, after.params, human_count)
    row("weights", before.param_bytes, after.param_bytes, human_bytes)
    row("MACs", before.macs, after.macs, human_count)
    row("activation peak", before.activation_peak, after.activation_peak, human_bytes)
    for op in sorted(set(before.ops) | set(after.ops)):
        a, b = before.ops.get(op, 0), after.ops.get(op, 0)
        if a != b:
            t.add_row(f"  {fmt_name(op)}", str(a), str(b), f"{b - a:+d}")
    return t


def key_value_table(title: str, rows: Iterable[tuple[str, str]], value: str = "value") -> Table:
    """A two-column table without header."""
    t = Table(title=title, title_justify="left", show_header=False)
    t.add_column("what")
    t.add_column(value, justify="right")
    for k, v in rows:
        t.add_row(k, v)
    return t


def input_shapes(args: argparse.Namespace) -> dict[str, tuple[int, ...]]:
    """The ``--input-shape NAME:DIMS`` options, parsed (a bad spec is a ShapeError, exit 2)."""
    return parse_input_shapes(getattr(args, "input_shape", []))


def split_list(text: str | None) -> list[str]:
    """``"a, b,c"`` -> ``["a", "b", "c"]``."""
    return [s.strip() for s in (text or "").split(",") if s.strip()]


def add_feeds_option(p: argparse.ArgumentParser, what: str = "verify on") -> None:
    """``--feeds DATA``: the inputs a verifying command checks its output on (same formats as
    ``--calib``: a ``.npz`` keyed by input name, a folder of ``.npz``/``.npy``)."""
    p.add_argument(
        "--feeds",
        metavar="DATA",
        help=f"inputs to {what} (.npz keyed by input name, or a folder, as for --calib); "
        "default: generated inputs, which cannot stand in for size or shape inputs",
    )
