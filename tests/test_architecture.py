"""The import graph of graphopt keeps its layers: imports point down only, no circles, no private
names across modules.

Every module of ``graphopt/`` and of ``passes/`` (installed as ``graphopt.passes`` through the
package-dir mapping) is parsed with ``ast``; every import counts, at module top, inside functions
and under ``if TYPE_CHECKING:``, and so does ``importlib.import_module("literal")``. Layers, lowest
first: core, algorithms, passes, jobs, cli, and at the top the facade ``graphopt/__init__.py`` with
the test helpers (``graphopt.testing``, ``graphopt.fixtures``) and the test corpora
(``graphopt.conformance``, ``graphopt.corpus``). A module may import its own layer or
a lower one; a pass module imports no other pass module.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parent.parent

#: layer -> rank (a module may import modules of its rank or lower)
LAYERS: dict[str, int] = {"core": 0, "algorithms": 1, "passes": 2, "jobs": 3, "cli": 4, "top": 5}
#: modules of the top layer besides the facade
TOP_MODULES = {
    "graphopt",
    "graphopt.testing",
    "graphopt.fixtures",
    "graphopt.conformance",
    "graphopt.corpus",
}


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    line: int
    names: tuple[str, ...]  # names taken with ``from target import ...`` (empty for ``import``)


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for graphopt/ and passes/ (mapped to graphopt.passes)."""
    out: dict[str, Path] = {}
    for base, package in ((ROOT / "graphopt", "graphopt"), (ROOT / "passes", "graphopt.passes")):
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(base).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if parts and parts[0] == "passes" and package == "graphopt":
                continue  # a stray link or copy of passes/ inside graphopt/ is not a module here
            out[".".join([package, *parts])] = path
    return out


def is_package(name: str, files: dict[str, Path]) -> bool:
    return files[name].name == "__init__.py"


def layer_of(name: str) -> str:
    if name in TOP_MODULES:
        return "top"
    parts = name.split(".")
    if len(parts) >= 2 and parts[1] in ("core", "algorithms", "passes", "jobs", "cli"):
        return parts[1]
    raise AssertionError(f"module {name} belongs to no layer: put it in one (see README)")


def _resolve(module: str, files: dict[str, Path]) -> str | None:
    """The internal module an imported dotted name refers to (its longest existing prefix)."""
    parts = module.split(".")
    while parts:
        cand = ".".join(parts)
        if cand in files:
            return cand
        parts.pop()
    return None


def imports_of(name: str, files: dict[str, Path]) -> list[Edge]:
    """Every import of an internal module by ``name``, wherever it sits in the file."""
    tree = ast.parse(files[name].read_text(), filename=str(files[name]))
    package = name if is_package(name, files) else name.rpartition(".")[0]
    edges: list[Edge] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _resolve(alias.name, files)
                if target:
                    edges.append(Edge(name, target, node.lineno, ()))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for alias in node.names:
                sub = f"{mod}.{alias.name}"
                if sub in files:  # ``from pkg import module``
                    edges.append(Edge(name, sub, node.lineno, ()))
                    continue
                target = _resolve(mod, files)
                if target:
                    edges.append(Edge(name, target, node.lineno, (alias.name,)))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            target = _resolve(node.args[0].value, files)
            if target:
                edges.append(Edge(name, target, node.lineno, ()))
    return [e for e in edges if e.target != name]


@pytest.fixture(scope="module")
def graph() -> tuple[dict[str, Path], list[Edge]]:
    files = module_files()
    edges = [e for name in files for e in imports_of(name, files)]
    return files, edges


def test_every_module_has_a_layer(graph: tuple[dict[str, Path], list[Edge]]) -> None:
    files, _ = graph
    assert "graphopt.passes" in files and "graphopt.passes.fold_constants" in files
    for name in files:
        layer_of(name)


def upward(edges: list[Edge], files: dict[str, Path]) -> list[str]:
    """The imports from a lower layer to a higher one, one line each."""
    bad = []
    for e in edges:
        src, dst = layer_of(e.source), layer_of(e.target)
        if LAYERS[dst] > LAYERS[src]:
            bad.append(f"{files[e.source]}:{e.line}: {e.source} ({src}) imports {e.target} ({dst})")
    return bad


def test_the_scanner_sees_function_level_and_mapped_imports(
    graph: tuple[dict[str, Path], list[Edge]],
    tmp_path: Path,
) -> None:
    """Guards the test itself: imports of graphopt.passes, and imports inside functions, count."""
    files, edges = graph
    seen = {(e.source, e.target) for e in edges}
    assert ("graphopt.jobs.optimize", "graphopt.passes") in seen
    assert ("graphopt.passes.fold_constants", "graphopt.core.pass_manager") in seen
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from graphopt.jobs.optimize import _x, optimize_model\n")
    with_probe = {**files, "graphopt.core.probe": probe}
    probe_edges = imports_of("graphopt.core.probe", with_probe)
    assert [(e.target, e.names) for e in probe_edges] == [
        ("graphopt.jobs.optimize", ("_x",)),
        ("graphopt.jobs.optimize", ("optimize_model",)),
    ]
    assert len(upward(probe_edges, with_probe)) == 2


def test_imports_point_down(graph: tuple[dict[str, Path], list[Edge]]) -> None:
    files, edges = graph
    bad = upward(edges, files)
    assert not bad, "imports from a lower layer to a higher one:\n" + "\n".join(bad)


def test_passes_import_no_other_pass(graph: tuple[dict[str, Path], list[Edge]]) -> None:
    files, edges = graph
    bad = [
        f"{files[e.source].relative_to(ROOT)}:{e.line}: {e.source} imports {e.target}"
        for e in edges
        if e.source.startswith("graphopt.passes.") and layer_of(e.target) == "passes"
    ]
    assert not bad, "a pass module imports another pass (move the shared code down):\n" + "\n".join(
        bad
    )


def test_no_import_circles(graph: tuple[dict[str, Path], list[Edge]]) -> None:
    files, edges = graph
    g = nx.DiGraph()
    g.add_nodes_from(files)
    g.add_edges_from((e.source, e.target) for e in edges)
    circles = [sorted(c) for c in nx.strongly_connected_components(g) if len(c) > 1]
    assert not circles, f"import circles: {circles}"


def test_no_private_names_across_modules(graph: tuple[dict[str, Path], list[Edge]]) -> None:
    files, edges = graph
    bad = [
        f"{files[e.source].relative_to(ROOT)}:{e.line}: {e.source} imports {n} from {e.target}"
        for e in edges
        for n in e.names
        if n.startswith("_") and not n.startswith("__")
    ]
    assert not bad, "private names imported from another module:\n" + "\n".join(bad)


def test_import_graphopt_is_light() -> None:
    """The facade imports its names lazily: a fresh ``import graphopt`` loads no layer module."""
    code = (
        "import sys, graphopt\n"
        "heavy = [m for m in ('onnx', 'onnxruntime', 'numba', 'networkx', 'graphopt.jobs',"
        " 'graphopt.core.model') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
