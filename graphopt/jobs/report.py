"""One self-contained HTML page about what a graphopt run did (no network: inline CSS, JS and SVG).

Sections, each present when its data is given:

* summary table (nodes, params, MACs, weights, activation peak before/after, plus any rows given)
  and extra tables (e.g. a recipe's per-step table, the verification table);
* the graph before and after as SVG: a layered drawing (layers are networkx topological generations
  of the node DAG, nodes in a layer ordered by the mean position of their producers). Constants are
  not drawn. Nodes of a fused group (found by :func:`graphopt.algorithms.diff.structural_diff`) are
  highlighted in both drawings, pruned layers (a Conv/Gemm/MatMul whose weight lost output channels)
  in the after drawing. Graphs over ``max_nodes`` nodes are collapsed: first chains of single-input,
  single-consumer nodes become one box, then blocks by name prefix (``/layer1/...``) or, for flat
  names, runs of consecutive nodes in topological order (which keeps the drawing acyclic);
* per-layer quantization error bars (SQNR of each layer's output vs float32);
* the memory arena timeline: one rectangle per tensor, x = execution steps it is live, y = its
  offset;
* the pruning scan curve (metric vs pruning ratio).

A small inline script checks that the drawings are there and sets ``document.body.dataset.ok``,
which the headless-browser test reads to prove the page ran without a script error.
"""

from __future__ import annotations

import html
import logging
import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx
import onnx_graphsurgeon as gs

from graphopt.algorithms.diff import input_dependent_nodes, structural_diff
from graphopt.core.cost import model_cost
from graphopt.core.model import Model
from graphopt.core.output import atomic_write_text

logger = logging.getLogger(__name__)

MAX_NODES = 300
BOX_W, BOX_H, GAP_X, GAP_Y = 132, 24, 12, 28


# ------------------------------------------------------------------ graph model for drawing


@dataclass
class Box:
    """One drawn box: a node, a chain of nodes, or a block."""

    key: int
    members: list[str]
    ops: list[str]
    tags: set[str] = field(default_factory=set)

    @property
    def label(self) -> str:
        if len(self.ops) == 1:
            return self.ops[0]
        if len(self.ops) <= 3:
            return "+".join(self.ops)
        c = Counter(self.ops).most_common(2)
        return " ".join(f"{op}x{n}" for op, n in c) + f" (+{len(self.ops) - sum(n for _, n in c)})"


def _node_graph(model: Model) -> tuple[nx.DiGraph, list[Any]]:
    """The DAG of nodes that depend on a graph input (Constant nodes and the constant subgraphs
    computing weights, e.g. Reshape(Constant), are weights, not drawn)."""
    nodes = input_dependent_nodes(model.graph)
    idx = {id(n): i for i, n in enumerate(nodes)}
    producer = {o.name: idx[id(n)] for n in nodes for o in n.outputs if o.name}
    g = nx.DiGraph()
    g.add_nodes_from(range(len(nodes)))
    for i, n in enumerate(nodes):
        for t in n.inputs:
            j = producer.get(t.name)
            if j is not None and j != i:
                g.add_edge(j, i)
    return g, nodes


def _contract(g: nx.DiGraph, group_of: Mapping[int, int]) -> nx.DiGraph:
    h = nx.DiGraph()
    h.add_nodes_from(set(group_of.values()))
    for u, v in g.edges:
        a, b = group_of[u], group_of[v]
        if a != b:
            h.add_edge(a, b)
    return h


def _chains(g: nx.DiGraph, order: Sequence[int]) -> dict[int, int]:
    """Merge u->v when u has one consumer and v one producer: chains of single-input nodes."""
    group = {u: u for u in g}
    for u in order:
        succ = list(g.successors(u))
        if len(succ) == 1 and g.in_degree(succ[0]) == 1:
            group[succ[0]] = group[u]
    return group


def collapse(
    model: Model, max_nodes: int = MAX_NODES, tags: Mapping[str, set[str]] | None = None
) -> tuple[list[Box], nx.DiGraph, str]:
    """Boxes to draw and their DAG; the string says how the graph was collapsed."""
    g, nodes = _node_graph(model)
    order = list(nx.topological_sort(g))
    how = "one box per node"
    group = {u: u for u in g}
    if len(nodes) > max_nodes:
        group = _chains(g, order)
        how = "chains of single-input nodes collapsed"
        n_groups = len(set(group.values()))
        if n_groups > max_nodes:
            names = [nodes[u].name for u in order]
            if sum("/" in (s or "") for s in names) > 0.5 * len(names):
                for depth in range(1, 8):
                    pref = {
                        u: "/".join((nodes[u].name or "").strip("/").split("/")[:depth])
                        for u in order
                    }
                    keys = {p: i for i, p in enumerate(dict.fromkeys(pref[u] for u in order))}
                    cand = {u: keys[pref[u]] for u in order}
                    if len(keys) >= max_nodes // 4 or depth == 7:
                        break
                if nx.is_directed_acyclic_graph(_contract(g, cand)) and len(keys) <= max_nodes:
                    group, how = cand, f"blocks by name prefix (depth {depth})"
            if len(set(group.values())) > max_nodes:
                # runs of consecutive chains in topological order: edges only go forward
                chain_order = list(dict.fromkeys(group[u] for u in order))
                k = math.ceil(len(chain_order) / max_nodes)
                block = {c: i // k for i, c in enumerate(chain_order)}
                group = {u: block[group[u]] for u in order}
                how = f"runs of {k} chains in topological order"
    members: dict[int, list[int]] = {}
    for u in order:
        members.setdefault(group[u], []).append(u)
    remap = {gk: i for i, gk in enumerate(members)}
    boxes = []
    for gk, us in members.items():
        b = Box(remap[gk], [nodes[u].name for u in us], [nodes[u].op for u in us])
        for name in b.members:
            b.tags |= (tags or {}).get(name, set())
        boxes.append(b)
    dag = _contract(g, {u: remap[group[u]] for u in g})
    return boxes, dag, how


def _layout(boxes: Sequence[Box], dag: nx.DiGraph) -> dict[int, tuple[float, float]]:
    pos: dict[int, tuple[float, float]] = {}
    for y, layer in enumerate(nx.topological_generations(dag)):

        def bary(k: int) -> float:
            xs = [pos[p][0] for p in dag.predecessors(k) if p in pos]
            return sum(xs) / len(xs) if xs else 0.0

        ordered = sorted(layer, key=lambda k: (bary(k), k))
        for x, k in enumerate(ordered):
            pos[k] = (float(x), float(y))
    return pos


def graph_svg(
    model: Model,
    tags: Mapping[str, set[str]] | None = None,
    max_nodes: int = MAX_NODES,
    css_id: str = "g",
) -> tuple[str, str]:
    """An SVG drawing of ``model``'s main graph and a note on how it was collapsed."""
    boxes, dag, how = collapse(model, max_nodes, tags)
    if not boxes:
        return f'<svg id="{css_id}" class="graph" width="200" height="40"></svg>', how
    pos = _layout(boxes, dag)
    widths = Counter(int(y) for _, y in pos.values())
    max_w = max(widths.values())
    layers = len(widths)
    width = max_w * (BOX_W + GAP_X) + GAP_X
    height = layers * (BOX_H + GAP_Y) + GAP_Y

    def xy(k: int) -> tuple[float, float]:
        x, y = pos[k]
        row = widths[int(y)]
        off = (max_w - row) * (BOX_W + GAP_X) / 2
        return GAP_X + off + x * (BOX_W + GAP_X), GAP_Y / 2 + y * (BOX_H + GAP_Y)

    parts = [
        f'<svg id="{css_id}" class="graph" xmlns="http://www.w3.org/2000/svg" '
        f'width="{width:.0f}" height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}">'
    ]
    for u, v in dag.edges:
        x1, y1 = xy(u)
        x2, y2 = xy(v)
        x1, y1, x2 = x1 + BOX_W / 2, y1 + BOX_H, x2 + BOX_W / 2
        my = (y1 + y2) / 2
        parts.append(
            f'<path class="edge" d="M{x1:.1f},{y1:.1f} C{x1:.1f},{my:.1f} {x2:.1f},'
            f'{my:.1f} {x2:.1f},{y2:.1f}"/>'
        )
    by_key = {b.key: b for b in boxes}
    for k in sorted(pos):
        b = by_key[k]
        x, y = xy(k)
        cls = " ".join(["node"] + sorted(b.tags) + (["block"] if len(b.members) > 1 else []))
        tip = html.escape(
            f"{len(b.members)} node(s): "
            + ", ".join(f"{n} ({o})" for n, o in list(zip(b.members, b.ops))[:12])
            + (" ..." if len(b.members) > 12 else "")
        )
        label = b.label if len(b.label) <= 21 else b.label[:20] + "\u2026"
        parts.append(
            f'<g class="{cls}"><title>{tip}</title><rect x="{x:.1f}" y="{y:.1f}" '
            f'width="{BOX_W}" height="{BOX_H}" rx="4"/><text x="{x + BOX_W / 2:.1f}" '
            f'y="{y + BOX_H / 2 + 4:.1f}">{html.escape(label)}</text></g>'
        )
    parts.append("</svg>")
    return "".join(parts), f"{len(model.graph.nodes)} nodes drawn as {len(boxes)} boxes ({how})"


# ------------------------------------------------------------------ highlights


def _weight_out_channels(model: Model) -> dict[str, int]:
    out = {}
    for n in model.graph.nodes:
        if (
            n.op in ("Conv", "Gemm", "MatMul", "ConvTranspose")
            and len(n.inputs) > 1
            and isinstance(n.inputs[1], gs.Constant)
            and len(n.inputs[1].shape) >= 2
        ):
            shape = n.inputs[1].shape
            ch = (
                shape[0]
                if n.op in ("Conv",) or (n.op == "Gemm" and n.attrs.get("transB"))
                else shape[-1]
                if n.op != "ConvTranspose"
                else shape[1]
            )
            for o in n.outputs:
                out[o.name] = int(ch)
    return out


def highlight_tags(
    before: Model, after: Model | None
) -> tuple[dict[str, set[str]], dict[str, set[str]], Any]:
    """Tags for the before and after drawings: fused groups, replaced nodes, pruned layers."""
    tb: dict[str, set[str]] = {}
    ta: dict[str, set[str]] = {}
    if after is None:
        return tb, ta, None

    d = structural_diff(before, after)
    for grp in d.fused_groups:
        for n in grp.nodes or [grp.node]:
            ta.setdefault(n, set()).add("fused")
        for n in grp.replaced:
            tb.setdefault(n, set()).add("replaced")
    for n in d.added:
        ta.setdefault(n, set()).add("added")
    for n in d.removed:
        tb.setdefault(n, set()).add("removed")
    wb, wa = _weight_out_channels(before), _weight_out_channels(after)
    prod_a = {o.name: n.name for n in after.graph.nodes for o in n.outputs}
    for t, ch in wa.items():
        if t in wb and ch < wb[t]:
            ta.setdefault(prod_a[t], set()).add("pruned")
    return tb, ta, d


# ------------------------------------------------------------------ charts


def _get(obj: Any, *names: str, default: Any = None) -> Any:
    for n in names:
        if isinstance(obj, Mapping) and n in obj:
            return obj[n]
        if hasattr(obj, n):
            return getattr(obj, n)
    return default


def quant_rows(quant: Any) -> list[tuple[str, str, float]]:
    """(layer, op, SQNR dB) from a QuantizeResult, a list of layer reports/dicts, or {name: db}."""
    layers = _get(quant, "layers", default=quant)
    rows: list[tuple[str, str, float]] = []
    if isinstance(layers, Mapping):
        for k, v in layers.items():
            db = _get(v, "sqnr_db", default=v)
            if isinstance(db, (int, float)):
                rows.append((str(k), str(_get(v, "op", default="")), float(db)))
        return rows
    for item in layers or []:
        db = _get(item, "sqnr_db")
        if isinstance(db, (int, float)):
            rows.append(
                (str(_get(item, "name", default="?")), str(_get(item, "op", default="")), float(db))
            )
    return rows


def quant_svg(rows: Sequence[tuple[str, str, float]]) -> str:
    finite = [r[2] for r in rows if math.isfinite(r[2])]
    top = max(finite + [40.0])
    row_h, label_w, bar_w = 14, 260, 560
    h = len(rows) * row_h + 30
    parts = [
        f'<svg id="quant" class="chart" xmlns="http://www.w3.org/2000/svg" width="'
        f'{label_w + bar_w + 80}" height="{h}">'
    ]
    for i, (name, op, db) in enumerate(rows):
        y = 10 + i * row_h
        v = top if not math.isfinite(db) else max(db, 0.0)
        w = bar_w * v / top
        cls = "bad" if db < 20 else ("warn" if db < 30 else "good")
        lab = f"{name} ({op})" if op else name
        lab = lab if len(lab) <= 40 else lab[:39] + "\u2026"
        parts.append(
            f'<g class="bar {cls}"><title>{html.escape(name)}: {db:.1f} dB</title>'
            f'<text x="{label_w - 6}" y="{y + 10}" class="lab">{html.escape(lab)}</text>'
            f'<rect x="{label_w}" y="{y}" width="{w:.1f}" height="{row_h - 3}"/>'
            f'<text x="{label_w + w + 4:.1f}" y="{y + 10}">{db:.1f}</text></g>'
        )
    for db in (20, 30):
        x = label_w + bar_w * db / top
        parts.append(
            f'<line class="ref" x1="{x:.1f}" y1="4" x2="{x:.1f}" y2="{h - 14}"/>'
            f'<text x="{x:.1f}" y="{h - 2}" class="axis">{db} dB</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def memory_rows(memory: Any) -> tuple[list[tuple[str, int, int, int, int]], int, int]:
    """(name, offset, nbytes, start, end) per tensor, arena bytes, steps, from a MemoryPlan/dict."""
    tensors = _get(memory, "tensors", default={})
    items = tensors.values() if isinstance(tensors, Mapping) else tensors
    rows = []
    for t in items:
        off, size = _get(t, "offset"), _get(t, "nbytes", "size")
        start, end = _get(t, "start"), _get(t, "end")
        if None in (off, size, start, end):
            continue
        rows.append((str(_get(t, "name", default="?")), int(off), int(size), int(start), int(end)))
    arena = int(
        _get(memory, "arena_bytes", default=0) or max((r[1] + r[2] for r in rows), default=0)
    )
    steps = int(_get(memory, "steps", default=0) or max((r[4] for r in rows), default=0) + 1)
    return rows, arena, steps


def memory_svg(rows: Sequence[tuple[str, int, int, int, int]], arena: int, steps: int) -> str:
    w, h, pad = 1000, 360, 40
    sx = (w - pad - 10) / max(steps, 1)
    sy = (h - pad) / max(arena, 1)
    parts = [
        f'<svg id="memory" class="chart" xmlns="http://www.w3.org/2000/svg" width="{w}" '
        f'height="{h}"><rect class="arena" x="{pad}" y="4" width="{w - pad - 10}" '
        f'height="{arena * sy:.1f}"/>'
    ]
    for i, (name, off, size, start, end) in enumerate(rows):
        hue = (i * 47) % 360
        parts.append(
            f'<rect class="tensor" x="{pad + start * sx:.1f}" y="{4 + off * sy:.1f}" '
            f'width="{max((end - start + 1) * sx, 1):.1f}" '
            f'height="{max(size * sy, 0.8):.1f}" style="fill:hsl({hue},60%,60%)">'
            f"<title>{html.escape(name)}: {size} B at offset {off}, steps {start}-{end}"
            f"</title></rect>"
        )
    parts.append(
        f'<text x="{pad}" y="{h - 8}" class="axis">execution step 0 .. {steps - 1}'
        f" (x), offset in the {arena:,} B arena (y)</text></svg>"
    )
    return "".join(parts)


def scan_points(scan: Any) -> tuple[str, dict[str, list[tuple[float, float]]]]:
    """x label and series from a list of dicts/objects with a ratio, or {ratio: value}."""
    pts = _get(scan, "points", "scan", default=scan)
    series: dict[str, list[tuple[float, float]]] = {}
    if isinstance(pts, Mapping):
        for x, y in pts.items():
            if isinstance(y, (int, float)):
                series.setdefault("metric", []).append((float(x), float(y)))
            elif isinstance(y, Mapping):
                for k, v in y.items():
                    if isinstance(v, (int, float)) and math.isfinite(float(v)):
                        series.setdefault(k, []).append((float(x), float(v)))
        return "ratio", series
    for p in pts or []:
        d = (
            dict(p)
            if isinstance(p, Mapping)
            else (dict(vars(p)) if hasattr(p, "__dict__") else {"ratio": p[0], "metric": p[1]})
        )
        fid = d.pop("fidelity", None)  # jobs.prune.ScanPoint: SQNR of its first output
        if isinstance(fid, (list, tuple)) and fid and hasattr(fid[0], "sqnr_db"):
            d["sqnr_db"] = fid[0].sqnr_db
        x = d.get("ratio")
        if not isinstance(x, (int, float)):
            continue
        for k, v in d.items():
            if (
                k != "ratio"
                and isinstance(v, (int, float))
                and not isinstance(v, bool)
                and math.isfinite(float(v))
            ):
                series.setdefault(k, []).append((float(x), float(v)))
    return "ratio", series


def scan_svg(series: Mapping[str, list[tuple[float, float]]]) -> str:
    w, h, pad = 720, 300, 50
    parts = [
        f'<svg id="prune" class="chart" xmlns="http://www.w3.org/2000/svg" width="{w}" '
        f'height="{h + 20 * len(series)}">'
    ]
    xs = [x for s in series.values() for x, _ in s]
    x0, x1 = (min(xs), max(xs)) if xs else (0.0, 1.0)
    x1 = x1 if x1 > x0 else x0 + 1
    parts.append(
        f'<line class="ref" x1="{pad}" y1="{h - pad}" x2="{w - 10}" y2="{h - pad}"/>'
        f'<text class="axis" x="{pad}" y="{h - pad + 16}">{x0:g}</text>'
        f'<text class="axis" x="{w - 40}" y="{h - pad + 16}">{x1:g}</text>'
        f'<text class="axis" x="{w / 2:.0f}" y="{h - pad + 30}">pruning ratio</text>'
    )
    for i, (name, pts) in enumerate(series.items()):
        ys = [y for _, y in pts]
        y0, y1 = min(ys), max(ys)
        y1 = y1 if y1 > y0 else y0 + 1

        def p(x: float, y: float, y0: float = y0, y1: float = y1) -> str:
            return (
                f"{pad + (x - x0) / (x1 - x0) * (w - pad - 10):.1f},"
                f"{10 + (1 - (y - y0) / (y1 - y0)) * (h - pad - 20):.1f}"
            )

        hue = (i * 120 + 210) % 360
        pts = sorted(pts)
        parts.append(
            f'<polyline class="curve" style="stroke:hsl({hue},70%,45%)" points="'
            + " ".join(p(x, y) for x, y in pts)
            + '"/>'
        )
        for x, y in pts:
            parts.append(
                f'<circle r="3" cx="{p(x, y).split(",")[0]}" cy="{p(x, y).split(",")[1]}"'
                f' style="fill:hsl({hue},70%,45%)"><title>{html.escape(name)} at '
                f"{x:g}: {y:.4g}</title></circle>"
            )
        parts.append(
            f'<text class="axis" x="{pad}" y="{h + 14 + 20 * i}" style="fill:hsl({hue},'
            f'70%,40%)">{html.escape(name)}: {y0:.4g} .. {max(ys):.4g}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


# ------------------------------------------------------------------ page


CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:16px;color:#1d232b;
background:#fafbfc}h1{font-size:20px;margin:0 0 6px}h2{font-size:16px;margin:22px 0 6px}
table{border-collapse:collapse;font-size:13px;background:#fff}td,th{border:1px solid #d6dbe1;
padding:3px 8px;text-align:right}td:first-child,th:first-child{text-align:left}
th{background:#eef1f5}.note{color:#5b6672;font-size:12px}.cols{display:flex;gap:12px}
.col{flex:1;min-width:0}.scroll{max-height:1100px;overflow:auto;border:1px solid #d6dbe1;
background:#fff}svg text{font-size:10px;text-anchor:middle;fill:#1d232b}
.node rect{fill:#e8eef7;stroke:#7d8fa8}.node.block rect{fill:#dfe6d8;stroke:#7f9671}
.node.fused rect{fill:#ffd98a;stroke:#b7791f;stroke-width:2}
.node.replaced rect{fill:#ffe9c2;stroke:#d69e2e;stroke-dasharray:3 2}
.node.pruned rect{fill:#f9b4b4;stroke:#c53030;stroke-width:2}
.node.added rect{fill:#c6f6d5;stroke:#2f855a}.node.removed rect{fill:#e2e8f0;stroke:#a0aec0;
stroke-dasharray:2 2}.edge{fill:none;stroke:#9aa5b1;stroke-width:1}
.legend span{display:inline-block;padding:1px 6px;margin-right:6px;border:1px solid #999;
font-size:12px}.bar rect{fill:#48bb78}.bar.warn rect{fill:#ed8936}.bar.bad rect{fill:#e53e3e}
.bar text{text-anchor:start;font-size:10px}.bar text.lab{text-anchor:end}
.ref{stroke:#718096;stroke-dasharray:4 3}.axis{text-anchor:start;font-size:11px;fill:#4a5568}
.arena{fill:#f7fafc;stroke:#a0aec0}.tensor{stroke:#2d3748;stroke-width:.3}
.curve{fill:none;stroke-width:2}.ok{color:#2f855a}.bad{color:#c53030}
"""

SCRIPT = """
(function(){try{var g=document.querySelectorAll('svg.graph');
var n=document.querySelectorAll('svg.graph g.node').length;
document.body.dataset.graphs=String(g.length);document.body.dataset.boxes=String(n);
document.body.dataset.sections=String(document.querySelectorAll('section').length);
document.querySelectorAll('svg.graph g.node').forEach(function(e){
e.addEventListener('mouseenter',function(){e.style.opacity=.7});
e.addEventListener('mouseleave',function(){e.style.opacity=1});});
document.body.dataset.ok=(g.length>0&&n>0)?'1':'0';}catch(err){
document.body.dataset.ok='error: '+err;}})();
"""


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isinf(v):
            return "inf"
        if math.isnan(v):
            return "-"
        return f"{v:,.4g}" if abs(v) < 1e6 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return html.escape(str(v)) if v is not None else "-"


def table_html(rows: Sequence[Mapping[str, Any]], table_id: str = "") -> str:
    """An HTML table from a list of dicts (columns: union of keys, in first-seen order)."""
    cols: list[str] = list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{_fmt(r.get(c))}</td>" for c in cols) + "</tr>" for r in rows
    )
    ident = f' id="{table_id}"' if table_id else ""
    return f"<table{ident}><tr>{head}</tr>{body}</table>"


def summary_rows(
    before: Model, after: Model | None, summary: Mapping[str, Any] | None
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    cb = model_cost(before)
    ca = model_cost(after) if after is not None else None
    for label, attr in (
        ("nodes", None),
        ("params", "params"),
        ("weights (bytes)", "param_bytes"),
        ("MACs", "macs"),
        ("activation peak (bytes)", "activation_bytes_peak"),
    ):
        vb = before.num_nodes() if attr is None else getattr(cb, attr)
        row: dict[str, Any] = {"": label, "before": vb}
        if after is not None and ca is not None:
            va = after.num_nodes() if attr is None else getattr(ca, attr)
            row["after"] = va
            row["change"] = f"{(va - vb) / vb * 100:+.1f}%" if vb else "-"
        rows.append(row)
    for k, v in (summary or {}).items():
        if isinstance(v, (list, dict)) and not (isinstance(v, (list, tuple)) and len(v) == 2):
            continue
        if isinstance(v, (list, tuple)):
            rows.append({"": k, "before": v[0], "after": v[1]})
        else:
            rows.append({"": k, "before": "", "after": v})
    return rows


def render_report(
    before: Model,
    after: Model | None = None,
    *,
    summary: Mapping[str, Any] | None = None,
    quant: Any = None,
    memory: Any = None,
    prune_scan: Any = None,
    tables: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    verify: Any = None,
    title: str = "graphopt report",
    max_nodes: int = MAX_NODES,
) -> str:
    """The report as an HTML string (see the module docstring for the sections)."""
    tb, ta, d = highlight_tags(before, after)
    out = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"
    ]
    out.append(
        "<section id='summary'><h2>Summary</h2>"
        + table_html(summary_rows(before, after, summary), "summary-table")
        + "</section>"
    )
    if verify is not None:
        outs = _get(verify, "outputs", default=[])
        rows = [
            {
                "output": _get(o, "name"),
                "max abs err": _get(o, "max_abs_err"),
                "cosine": _get(o, "cosine"),
                "SQNR dB": _get(o, "sqnr_db"),
                "ok": _get(o, "ok"),
            }
            for o in outs
        ]
        out.append(
            "<section id='verify'><h2>Verification (onnxruntime)</h2>"
            + table_html(rows)
            + "</section>"
        )
    for name, extra in (tables or {}).items():
        out.append(
            f"<section class='extra'><h2>{html.escape(name)}</h2>"
            + table_html(list(extra))
            + "</section>"
        )
    if d is not None and d.fused_groups:
        counts = Counter(g.label for g in d.fused_groups)
        out.append(
            "<section id='groups'><h2>Fused groups</h2>"
            + table_html([{"group": k, "count": v} for k, v in counts.most_common()])
            + "</section>"
        )
    svg_b, note_b = graph_svg(before, tb, max_nodes, "graph-before")
    legend = (
        "<div class='legend'><span style='background:#ffd98a'>fused</span>"
        "<span style='background:#ffe9c2'>replaced by a fused node</span>"
        "<span style='background:#f9b4b4'>pruned</span>"
        "<span style='background:#c6f6d5'>added</span>"
        "<span style='background:#dfe6d8'>collapsed block</span></div>"
    )
    out.append("<section id='graphs'><h2>Graph</h2>" + legend + "<div class='cols'>")
    out.append(
        f"<div class='col'><h3>before</h3><p class='note'>{html.escape(note_b)}</p>"
        f"<div class='scroll'>{svg_b}</div></div>"
    )
    if after is not None:
        svg_a, note_a = graph_svg(after, ta, max_nodes, "graph-after")
        out.append(
            f"<div class='col'><h3>after</h3><p class='note'>{html.escape(note_a)}</p>"
            f"<div class='scroll'>{svg_a}</div></div>"
        )
    out.append("</div></section>")
    if quant is not None:
        rows_q = quant_rows(quant)
        if rows_q:
            worst = min(rows_q, key=lambda r: r[2])
            out.append(
                "<section id='quantization'><h2>Quantization error per layer</h2>"
                f"<p class='note'>SQNR of each layer's output against float32 "
                f"({len(rows_q)} layers; worst {html.escape(worst[0])}: "
                f"{worst[2]:.1f} dB)</p>{quant_svg(rows_q)}</section>"
            )
    if memory is not None:
        rows_m, arena, steps = memory_rows(memory)
        if rows_m:
            out.append(
                "<section id='memory-plan'><h2>Memory arena timeline</h2>"
                f"<p class='note'>{len(rows_m)} tensors in a {arena:,} B arena over "
                f"{steps} steps</p>{memory_svg(rows_m, arena, steps)}</section>"
            )
    if prune_scan is not None:
        _, series = scan_points(prune_scan)
        if series:
            out.append(
                "<section id='prune-scan'><h2>Pruning scan</h2>" + scan_svg(series) + "</section>"
            )
    out.append(f"<script>{SCRIPT}</script></body></html>")
    return "".join(out)


def write_report(
    path: str | os.PathLike[str],
    before: Model,
    after: Model | None = None,
    *,
    summary: Mapping[str, Any] | None = None,
    quant: Any = None,
    memory: Any = None,
    prune_scan: Any = None,
    tables: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    verify: Any = None,
    title: str = "graphopt report",
    max_nodes: int = MAX_NODES,
) -> Path:
    """Write the self-contained HTML report atomically and return its path.

    Args:
        before, after: the model before and after (after may be None, e.g. for ``plan``).
        summary: extra summary rows, ``{label: value}`` or ``{label: (before, after)}``.
        quant: a ``QuantizeResult``, a list of per-layer reports/dicts with ``name``/``op``/
            ``sqnr_db``, or ``{layer: sqnr_db}``.
        memory: a ``MemoryPlan`` (or a dict with ``tensors`` of name/offset/nbytes/start/end and
            ``arena_bytes``/``steps``).
        prune_scan: list of dicts with ``ratio`` and metric keys, or ``{ratio: metric}``.
        tables: extra titled tables (lists of dicts), e.g. a recipe's per-step table.
        verify: a ``VerifyReport``.
    """
    text = render_report(
        before,
        after,
        summary=summary,
        quant=quant,
        memory=memory,
        prune_scan=prune_scan,
        tables=tables,
        verify=verify,
        title=title,
        max_nodes=max_nodes,
    )
    return atomic_write_text(path, text)
