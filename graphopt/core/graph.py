"""Graph helpers shared by the passes and algorithms, on onnx-graphsurgeon graphs and nodes.

Walks (subgraphs of a node), sizes (bytes of a constant), a stable topological order of one
graph's explicit edges, node bypass (remove a node whose output equals one of its inputs), and
fresh names, nodes and constants for rewrites.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs


def node_subgraphs(node: gs.Node) -> list[gs.Graph]:
    """The graphs held in a node's attributes (If branches, Loop/Scan bodies)."""
    subs: list[gs.Graph] = []
    for attr in node.attrs.values():
        if isinstance(attr, gs.Graph):
            subs.append(attr)
        elif isinstance(attr, (list, tuple)):
            subs.extend(a for a in attr if isinstance(a, gs.Graph))
    return subs


def constant_nbytes(t: gs.Constant) -> int:
    """Bytes of a constant's values, from its dims when they are still lazy (nothing is read)."""
    v = t._values
    if isinstance(v, gs.ir.tensor.LazyValues):
        return int(v.nbytes)
    return int(np.asarray(v).nbytes)


def has_subgraph(node: gs.Node) -> bool:
    """Whether the node holds a graph in its attributes (If, Loop, Scan)."""
    for a in node.attrs.values():
        if isinstance(a, gs.Graph):
            return True
        if isinstance(a, (list, tuple)) and any(isinstance(x, gs.Graph) for x in a):
            return True
    return False


def local_topo_order(graph: gs.Graph) -> list[gs.Node]:
    """The graph's nodes in a topological order of their explicit edges (stable Kahn sort).

    Returns ``graph.nodes`` itself (as a list) when it is already sorted, which is the common case.
    """
    nodes = list(graph.nodes)
    index = {id(n): i for i, n in enumerate(nodes)}
    if all(index.get(id(p), -1) < i for i, n in enumerate(nodes) for t in n.inputs
           for p in t.inputs):
        return nodes
    succs: list[set[int]] = [set() for _ in nodes]
    indeg = [0] * len(nodes)
    for i, n in enumerate(nodes):
        preds = {index[id(p)] for t in n.inputs for p in t.inputs if id(p) in index}
        indeg[i] = len(preds)
        for j in preds:
            succs[j].add(i)
    ready = [i for i, d in enumerate(indeg) if d == 0]
    heapq.heapify(ready)
    order: list[gs.Node] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(nodes[i])
        for k in succs[i]:
            indeg[k] -= 1
            if indeg[k] == 0:
                heapq.heappush(ready, k)
    if len(order) != len(nodes):  # a cycle: leave the order alone, the ensures check will say
        return nodes
    return order


def bypass_node(
    graph: gs.Graph,
    node: gs.Node,
    src: gs.Tensor | None = None,
    local_nodes: set[int] | None = None,
) -> bool:
    """Remove a single-output node whose output equals ``src`` (default: its first input).

    Returns False (and changes nothing) when that is impossible without renaming a graph output.
    ``local_nodes`` (ids of ``graph.nodes``) avoids a scan per call when bypassing many nodes.
    """
    src = src if src is not None else node.inputs[0]
    out = node.outputs[0]
    graph_outputs = {id(t) for t in graph.outputs}
    graph_inputs = {id(t) for t in graph.inputs}
    if id(out) in graph_outputs:
        # keep the output's name: the producer of src must write it directly
        if (
            isinstance(src, gs.Constant)
            or id(src) in graph_inputs
            or id(src) in graph_outputs
            or len(src.inputs) != 1
            or len(src.outputs) != 1
        ):
            return False
        producer = src.inputs[0]
        local = local_nodes if local_nodes is not None else {id(n) for n in graph.nodes}
        if id(producer) not in local:  # produced in an enclosing graph: cannot rename it
            return False
        idx = producer.outputs.index(src)
        node.inputs.clear()
        node.outputs.clear()
        producer.outputs[idx] = out
        out.dtype = out.dtype if out.dtype is not None else src.dtype
        if out.shape is None:
            out.shape = src.shape
        return True
    for consumer in list(out.outputs):
        for i, t in enumerate(consumer.inputs):
            if t is out:
                consumer.inputs[i] = src
    # subgraph nodes may read `out` implicitly by name; the Tensor object is shared, so the
    # loop above covered them.
    node.inputs.clear()
    node.outputs.clear()
    return True


_counter = itertools.count()


def unique_name(base: str) -> str:
    """A name that no imported model uses (a process-wide counter with a distinctive suffix)."""
    return f"{base}__go{next(_counter)}"


def make_node(
    op: str,
    inputs: Sequence[gs.Tensor],
    outputs: Sequence[gs.Variable] | None = None,
    attrs: dict[str, Any] | None = None,
    name: str | None = None,
    domain: str | None = None,
) -> gs.Node:
    """A new node; fresh output variables are created when ``outputs`` is None."""
    base = unique_name(name or op.lower())
    outs = list(outputs) if outputs is not None else [gs.Variable(f"{base}_out")]
    return gs.Node(
        op=op, name=base, inputs=list(inputs), outputs=outs, attrs=attrs or {}, domain=domain
    )


def const(name: str, values: np.ndarray | float | int, dtype: Any = np.float32) -> gs.Constant:
    """A new constant tensor with a unique name derived from ``name``."""
    return gs.Constant(unique_name(name), np.asarray(values, dtype=dtype))
