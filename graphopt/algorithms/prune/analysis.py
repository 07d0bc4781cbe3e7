"""Channel-dependency analysis for structured pruning of ONNX graphs: the walk and its context.

Every output channel of a *producer* (Conv, ConvTranspose, Gemm, MatMul with a constant weight) is
an *element*. Walking the graph in topological order, each tensor that carries channels gets a label
array along one axis: ``labels[i]`` is the element that position ``i`` of that axis holds, or -1
for a position that no producer owns (graph inputs, constants). The op handlers
(:mod:`graphopt.algorithms.prune.handlers`, one per op type) map labels from inputs to outputs:

* identity along the axis: activations, BatchNormalization, pooling, Resize, Pad, depthwise convs
  (group == channels), Transpose (axis permuted), Squeeze/Unsqueeze, Reduce*/Softmax on other axes;
* offsets and segments: Concat on the channel axis concatenates label arrays, Split and Slice cut
  them (their size/start/end constants are rewritten);
* channel blocks: Flatten/Reshape that merge the channel axis with the following dims repeat each
  label over the block (``np.tile(np.repeat(labels, inner), outer)``), so a Gemm/MatMul consumer
  drops whole row blocks; a Reshape target that hard-codes the merged width (a constant, or a piece
  of a ``Concat``-built shape vector as in the PP-OCR classifier head) is rewritten;
* ties: elementwise ops with several labelled inputs (residual Add, squeeze-excitation Mul) tie
  their elements position by position; a per-channel constant operand (bias, BN parameter, PRelu
  slope, Paddle's ``Reshape(Constant)`` SE bias) is sliced along the same labels.

A *unit* is a class of elements under the ties (a connected component, networkx), named by its
largest element: removing it removes one position from every tensor that holds one of its
elements and the matching slice of every weight. A unit tied to the special FIXED element (id
``n_elements``, the largest) cannot be removed: it reaches a graph output, an op with no handler, a
channel-mixing op that is not a weight layer (LayerNorm over channels, Softmax over channels, ...),
or a shape computation that cannot be rewritten; each such block keeps its reason. Groups of
producers sharing units are built by :mod:`graphopt.algorithms.prune.groups`.

Removal is exact when the removed channels are zero (:mod:`graphopt.algorithms.prune.apply`).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import networkx as nx
import numpy as np
import onnx_graphsurgeon as gs

from graphopt.algorithms.prune.handlers import (
    HANDLERS,
    Labels,
    ShapeFix,
    constant,
)
from graphopt.core.const_eval import DEFAULT_DOMAINS
from graphopt.core.graph import node_subgraphs
from graphopt.core.model import Model

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------- data types
@dataclass
class Producer:
    """A weight layer whose output channels are pruning elements."""

    node: gs.Node
    kind: str  # Conv, ConvTranspose, Gemm, MatMul
    start: int  # first element id
    size: int
    out_name: str
    weight: np.ndarray  # value of the weight input (for l1/l2)
    weight_axis: int  # the weight's output-channel axis


@dataclass
class ConstSlice:
    """A constant input of ``node`` that must be cut along ``axis`` by ``labels``."""

    node: gs.Node
    index: int
    axis: int
    labels: Labels
    role: str  # producer | consumer | bn | bias | scale | other


@dataclass
class Analysis:
    """Result of :func:`analyze`."""

    producers: list[Producer]
    n_elements: int
    unit: np.ndarray  # unit id (largest element of its class) of every element and FIXED (last)
    labels: dict[str, tuple[int, Labels]]
    slices: list[ConstSlice]
    fixes: list[ShapeFix]
    blocks: list[tuple[Labels, str]]
    touched: dict[str, list[Labels]]  # compute node name -> labels it depends on
    gammas: list[tuple[Labels, np.ndarray]]  # BN gamma per labelled position
    coupled: np.ndarray  # per element: its class under ties alone (FIXED ignored)

    @property
    def fixed(self) -> int:
        """The id of the FIXED element (and of the unit of everything that cannot go)."""
        return self.n_elements


class AnalysisContext:
    """The state of the walk, handed to the op handlers (implements ``handlers.Context``)."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.n_elements = 0
        self.fixed_pending: list[tuple[Labels, str]] = []
        self.labels: dict[str, tuple[int, Labels]] = {}
        self.producers: list[Producer] = []
        self.slices: list[ConstSlice] = []
        self.fixes: list[ShapeFix] = []
        self.ties: list[tuple[Labels, Labels]] = []
        self.touched: dict[str, list[Labels]] = defaultdict(list)
        self.gammas: list[tuple[Labels, np.ndarray]] = []
        self._values: dict[int, np.ndarray | None] = {}

    def value(self, t: gs.Tensor | None) -> np.ndarray | None:
        if t is None:
            return None
        key = id(t)
        if key not in self._values:  # the walk changes nothing: a tensor's value is stable
            self._values[key] = constant(t, self.model.opset)
        return self._values[key]

    # -- labels
    def get(self, t: gs.Tensor | None) -> tuple[int, Labels] | None:
        if t is None or not t.name:
            return None
        return self.labels.get(t.name)

    def set(self, t: gs.Tensor, axis: int, labels: Labels) -> None:
        if (labels >= 0).any():
            self.labels[t.name] = (axis, labels)

    def new_source(
        self,
        node: gs.Node,
        kind: str,
        size: int,
        out: gs.Tensor,
        weight: np.ndarray,
        weight_axis: int,
    ) -> Labels:
        start = self.n_elements
        self.n_elements += size
        self.producers.append(Producer(node, kind, start, size, out.name, weight, weight_axis))
        return np.arange(start, start + size, dtype=np.int64)

    def tie(self, a: Labels, b: Labels) -> None:
        self.ties.append((a, b))

    def block(self, labels: Labels | None, reason: str) -> None:
        if labels is not None and (labels >= 0).any():
            self.fixed_pending.append((labels, reason))

    def block_inputs(self, node: gs.Node, reason: str) -> None:
        for i in node.inputs:
            lab = self.get(i)
            if lab is not None:
                self.block(lab[1], reason)

    def slice_const(self, node: gs.Node, index: int, axis: int, labels: Labels, role: str) -> bool:
        t = node.inputs[index] if index < len(node.inputs) else None
        v = self.value(t)
        if v is None or v.ndim == 0:
            return False
        axis = axis % v.ndim
        if v.shape[axis] != len(labels):
            return False
        self.slices.append(ConstSlice(node, index, axis, labels, role))
        return True

    def touch(self, node: gs.Node, labels: Labels) -> None:
        self.touched[node.name].append(labels)


def _class_names(n: int, edges: np.ndarray) -> np.ndarray:
    """Every node 0..n-1 of the graph with ``edges`` ([k, 2]) mapped to the largest node of its
    connected component."""
    edges = edges[edges[:, 0] != edges[:, 1]]
    g = nx.Graph()
    g.add_edges_from(np.unique(np.sort(edges, axis=1), axis=0).tolist())
    out = np.arange(n, dtype=np.int64)  # a node on no edge is its own component
    for members in nx.connected_components(g):
        idx = np.fromiter(members, dtype=np.int64, count=len(members))
        out[idx] = idx.max()
    return out


def units(
    n: int, ties: Iterable[tuple[Labels, Labels]], blocks: Iterable[tuple[Labels, str]]
) -> tuple[np.ndarray, np.ndarray]:
    """Units of ``n`` elements: (unit id of every element and of FIXED = ``n``; class of every
    element under the ties alone), each named by its largest element. Elements tied position by
    position are one unit; an element tied to an unowned position (-1), or blocked, is FIXED's.
    """
    fixed = n
    pairs = [np.stack([a, b], axis=1) for a, b in ties]
    tied = np.concatenate(pairs) if pairs else np.zeros((0, 2), dtype=np.int64)
    both = (tied >= 0).all(axis=1)
    coupled = tied[both]  # ties between elements only: what the report calls a group
    one = tied[~both & (tied >= 0).any(axis=1)].max(axis=1)
    blocked = [lab[lab >= 0] for lab, _reason in blocks]
    to_fixed = np.concatenate([one, *blocked]).astype(np.int64)
    edges = np.concatenate([coupled, np.stack([to_fixed, np.full_like(to_fixed, fixed)], axis=1)])
    return _class_names(n + 1, edges), _class_names(n, coupled)


def analyze(model: Model) -> Analysis:
    """Build the channel-dependency structure of ``model``'s main graph.

    ``model`` must have shapes inferred (:func:`graphopt.core.shapes.infer_shapes`). Nothing is
    changed.
    """
    ctx = AnalysisContext(model)
    g = model.graph
    sub_names: set[str] = set()
    for node in g.nodes:
        for sg in node_subgraphs(node):
            for sn in sg.nodes:
                sub_names.update(i.name for i in sn.inputs)
    for node in g.nodes:
        if node.op == "Constant":
            continue
        if node.domain not in DEFAULT_DOMAINS:
            ctx.block_inputs(node, f"no handler for op {node.domain}.{node.op} '{node.name}'")
            continue
        h = HANDLERS.get(node.op)
        if h is None:
            ctx.block_inputs(node, f"no handler for op {node.op} '{node.name}'")
            continue
        h.analyze(ctx, node)
    for t in g.outputs:
        lab = ctx.get(t)
        if lab is not None:
            ctx.block(lab[1], f"reaches the graph output '{t.name}'")
    for name in sub_names & set(ctx.labels):
        ctx.block(ctx.labels[name][1], f"'{name}' is used inside a subgraph")
    unit, coupled = units(ctx.n_elements, ctx.ties, ctx.fixed_pending)
    return Analysis(
        ctx.producers,
        ctx.n_elements,
        unit,
        ctx.labels,
        ctx.slices,
        ctx.fixes,
        ctx.fixed_pending,
        dict(ctx.touched),
        ctx.gammas,
        coupled,
    )
