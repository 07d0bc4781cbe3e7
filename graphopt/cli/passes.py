"""``graphopt list-passes``: the registered passes, their kind, and the default pipeline."""

from __future__ import annotations

import argparse

from rich.table import Table

from graphopt.cli.common import console, emit_json, fmt_name
from graphopt.jobs.optimize import DEFAULT_PIPELINE
from graphopt.passes import registered_passes


def add_arguments(name: str, p: argparse.ArgumentParser) -> None:
    p.set_defaults(func=cmd_list_passes)


def cmd_list_passes(args: argparse.Namespace) -> int:
    rows = [
        {
            "name": n,
            "summary": cls.describe(),
            "default": n in DEFAULT_PIPELINE,
            "kind": "analysis" if cls.analysis else ("lossy" if cls.lossy else "exact"),
        }
        for n, cls in registered_passes().items()
    ]
    if args.json:
        emit_json({"passes": rows})
        return 0
    t = Table(title="passes", title_justify="left")
    for col in ("name", "kind", "default", "what it does"):
        t.add_column(col)
    for r in rows:
        t.add_row(
            fmt_name(r["name"]),
            str(r["kind"]),
            "yes" if r["default"] else "",
            fmt_name(r["summary"]),
        )
    console().print(t)
    return 0
