"""Compare two models: what changed in the graph.

Structural diff. Nodes are matched by their output tensor names, which graphopt's rewrites keep (a
rewrite produces exactly the root's outputs). For every node of B whose outputs A also produces, the
A nodes that produced tensors which no longer exist in B, walking back from those outputs, form the
*group* B's node replaced: ``Conv+BatchNormalization -> Conv``, ``Add+Clip+Mul+Div -> HardSwish``. A
group of one node of the same op type is a *changed* node (attributes or inputs differ). Op counts
added/removed are the difference of the two op histograms. Initializers are compared by name and
value, tensor shapes/dtypes by name.

Numerical diff: :func:`graphopt.jobs.diff.diff_models` runs both models on the same inputs and
compares every output (and, per layer, every tensor both produce).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.core.model import Model
from graphopt.core.verify import OutputDiff

logger = logging.getLogger(__name__)


@dataclass
class FusedGroup:
    """Nodes of A replaced by one node of B (matched through B's output names)."""

    node: str  #: B's node (the one that writes the group's output names)
    op: str  #: B's op types, joined by '+' (new nodes feeding only ``node`` included)
    replaced: list[str]  #: A's nodes, topological order
    replaced_ops: list[str]
    nodes: list[str] = field(default_factory=list)  #: B's nodes of the group

    @property
    def label(self) -> str:
        ops = [o for o in self.replaced_ops if o != "Constant"] or self.replaced_ops
        new = self.op.split("+")
        core = [o for o in new if o not in ("QuantizeLinear", "DequantizeLinear")] or new
        qdq = " (QDQ)" if len(core) < len(new) else ""
        return f"{'+'.join(ops)} -> {'+'.join(core)}{qdq}"


@dataclass
class LayerDiff:
    """One tensor compared in a per-layer diff."""

    tensor: str
    node: str
    op: str
    max_abs_err: float
    sqnr_db: float
    ok: bool


@dataclass
class DiffReport:
    """Structural and numerical differences between models A and B."""

    nodes_a: int = 0
    nodes_b: int = 0
    nodes_added: dict[str, int] = field(default_factory=dict)
    nodes_removed: dict[str, int] = field(default_factory=dict)
    added: list[str] = field(default_factory=list)  #: B nodes that produce only new tensors
    removed: list[str] = field(default_factory=list)  #: A nodes whose outputs are all gone
    changed: list[str] = field(default_factory=list)  #: same outputs and op, other attrs/inputs
    fused_groups: list[FusedGroup] = field(default_factory=list)
    initializers_added: list[str] = field(default_factory=list)
    initializers_removed: list[str] = field(default_factory=list)
    initializers_changed: list[str] = field(default_factory=list)
    shapes_changed: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[OutputDiff] = field(default_factory=list)
    rtol: float = 1e-4
    atol: float = 1e-5
    layers: list[LayerDiff] = field(default_factory=list)
    first_divergent_node: str | None = None
    first_divergent_tensor: str | None = None

    @property
    def outputs_equal(self) -> bool:
        return bool(self.outputs) and all(o.ok for o in self.outputs)

    def to_json(self) -> dict[str, Any]:
        return {
            "outputs_equal": self.outputs_equal,
            "outputs": {o.name: o.to_json() for o in self.outputs},
            "first_divergent_node": self.first_divergent_node,
            "first_divergent_tensor": self.first_divergent_tensor,
            "nodes_added": self.nodes_added,
            "nodes_removed": self.nodes_removed,
            "nodes_a": self.nodes_a,
            "nodes_b": self.nodes_b,
            "fused_groups": [
                {
                    "node": g.node,
                    "label": g.label,
                    "replaced": g.replaced,
                    "replaced_ops": g.replaced_ops,
                    "nodes": g.nodes,
                }
                for g in self.fused_groups
            ],
            "added": self.added,
            "removed": self.removed,
            "changed": self.changed,
            "initializers_added": self.initializers_added,
            "initializers_removed": self.initializers_removed,
            "initializers_changed": self.initializers_changed,
            "shapes_changed": self.shapes_changed,
            "rtol": self.rtol,
            "atol": self.atol,
            "layers": [asdict(x) for x in self.layers],
        }


# ------------------------------------------------------------------ structure


def input_dependent_nodes(graph: gs.Graph) -> list[gs.Node]:
    """Nodes that depend on a graph input, in order; the others (Constant nodes and subgraphs that
    only compute weights, e.g. ``Reshape(Constant)``) are weights rather than layers."""
    live = {t.name for t in graph.inputs}
    out = []
    for n in graph.nodes:  # ONNX keeps nodes in topological order
        if n.op != "Constant" and any(t.name in live for t in n.inputs):
            out.append(n)
            live.update(o.name for o in n.outputs)
    return out


def producers(graph: gs.Graph) -> dict[str, gs.Node]:
    """Tensor name -> the node of ``graph`` that produces it."""
    return {o.name: n for n in graph.nodes for o in n.outputs if o.name}


def _node_signature(n: gs.Node) -> tuple[Any, ...]:
    attrs = []
    for k, v in sorted(n.attrs.items()):
        if isinstance(v, gs.Constant):
            v = (
                "const",
                v.dtype.name if hasattr(v.dtype, "name") else str(v.dtype),
                tuple(v.shape),
                np.asarray(v.values).tobytes(),
            )
        elif isinstance(v, gs.Graph):
            v = ("graph", len(v.nodes))
        elif isinstance(v, (list, np.ndarray)):
            v = tuple(np.asarray(v).ravel().tolist())
        attrs.append((k, repr(v)))
    return (n.op, tuple(t.name for t in n.inputs), tuple(attrs))


def _const_equal(a: gs.Constant, b: gs.Constant) -> bool:
    va, vb = np.asarray(a.values), np.asarray(b.values)
    nan = va.dtype.kind in "fc"  # NaN exists only there (isnan refuses strings, ml_dtypes)
    return va.dtype == vb.dtype and va.shape == vb.shape and np.array_equal(va, vb, equal_nan=nan)


def structural_diff(a: Model, b: Model, report: DiffReport | None = None) -> DiffReport:
    """Fill ``report`` (or a new one) with the graph-level differences of A and B."""
    r = report or DiffReport()
    r.nodes_a, r.nodes_b = a.num_nodes(), b.num_nodes()
    ha, hb = a.op_histogram(), b.op_histogram()
    r.nodes_added = {
        op: hb.get(op, 0) - ha.get(op, 0)
        for op in sorted(set(ha) | set(hb))
        if hb.get(op, 0) > ha.get(op, 0)
    }
    r.nodes_removed = {
        op: ha.get(op, 0) - hb.get(op, 0)
        for op in sorted(set(ha) | set(hb))
        if ha.get(op, 0) > hb.get(op, 0)
    }

    ga, gb = a.graph, b.graph
    prod_a, prod_b = producers(ga), producers(gb)
    tensors_b = set(gb.tensors().keys())
    order_a = {id(n): i for i, n in enumerate(ga.nodes)}
    layers_a = {id(n) for n in input_dependent_nodes(ga)}
    claimed: set[int] = set()
    tensors_a = set(ga.tensors().keys())
    order_b = {id(n): i for i, n in enumerate(gb.nodes)}
    absorbed: set[int] = set()
    unmatched: list[gs.Node] = []
    for nb in gb.nodes:
        outs = [o.name for o in nb.outputs if o.name]
        matched = [prod_a[o] for o in outs if o in prod_a]
        if not matched:
            unmatched.append(nb)
            continue
        # walk back from the matched A nodes through tensors that vanished in B
        group: dict[int, gs.Node] = {}
        stack = list(matched)
        while stack:
            n = stack.pop()
            if id(n) in group:
                continue
            group[id(n)] = n
            for t in n.inputs:
                if t.name and t.name not in tensors_b and t.name in prod_a:
                    stack.append(prod_a[t.name])
        claimed.update(group)
        # weight computations folded into the new node are not part of the group's name
        nodes = sorted(
            (n for n in group.values() if id(n) in layers_a), key=lambda n: order_a[id(n)]
        ) or list(group.values())
        if len(nodes) == 1 and nodes[0].op == nb.op:
            if _node_signature(nodes[0]) != _node_signature(nb):
                r.changed.append(nb.name)
            continue
        # new B nodes whose outputs only this node reads belong to the group (HardSigmoid+Mul)
        side: dict[int, gs.Node] = {id(nb): nb}
        stack_b = [nb]
        while stack_b:
            n = stack_b.pop()
            for t in n.inputs:
                p = prod_b.get(t.name) if t.name and t.name not in tensors_a else None
                if (
                    p is not None
                    and id(p) not in side
                    and p.op != "Constant"
                    and all(id(c) in side for o in p.outputs for c in o.outputs)
                ):
                    side[id(p)] = p
                    stack_b.append(p)
        nodes_b = sorted(side.values(), key=lambda n: order_b[id(n)])
        absorbed.update(id(n) for n in nodes_b if n is not nb)
        r.fused_groups.append(
            FusedGroup(
                nb.name,
                "+".join(n.op for n in nodes_b),
                [n.name for n in nodes],
                [n.op for n in nodes],
                [n.name for n in nodes_b],
            )
        )
    r.added = [n.name for n in unmatched if id(n) not in absorbed]
    r.removed = [n.name for n in ga.nodes if id(n) not in claimed]

    ia, ib = a.initializers(), b.initializers()
    r.initializers_added = sorted(set(ib) - set(ia))
    r.initializers_removed = sorted(set(ia) - set(ib))
    r.initializers_changed = sorted(k for k in set(ia) & set(ib) if not _const_equal(ia[k], ib[k]))

    ta, tb = ga.tensors(), gb.tensors()
    for name in ta:
        if name not in tb or isinstance(ta[name], gs.Constant):
            continue
        x, y = ta[name], tb[name]
        sa = list(x.shape) if x.shape is not None else None
        sb = list(y.shape) if y.shape is not None else None
        da = str(np.dtype(x.dtype)) if x.dtype is not None else None
        db = str(np.dtype(y.dtype)) if y.dtype is not None else None
        if sa != sb or da != db:
            r.shapes_changed.append(
                {"tensor": name, "a": sa, "b": sb, "dtype_a": da, "dtype_b": db}
            )
    return r
