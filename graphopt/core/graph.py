"""Graph helpers shared by the passes and algorithms, on onnx-graphsurgeon graphs and nodes.

Walks (subgraphs of a node, what they capture), sizes (bytes of a constant), the stable topological
sort (the given order is kept when valid; subgraph captures are dependencies), node bypass (remove a
node whose output equals one of its inputs), and fresh names, nodes and constants for rewrites.
"""

from __future__ import annotations

import contextlib
import contextvars
import heapq
import itertools
from collections.abc import Collection, Iterator, Sequence
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs


def node_subgraphs(node: gs.Node) -> list[gs.Graph]:
    """The graphs held in a node's attributes (If branches, Loop/Scan bodies)."""
    subs: list[gs.Graph] = []
    attrs = node.attrs
    if not attrs:  # most nodes: called for every node of every walk, so kept cheap
        return subs
    for attr in attrs.values():
        if isinstance(attr, gs.Graph):
            subs.append(attr)
        elif isinstance(attr, (list, tuple)):
            subs.extend(a for a in attr if isinstance(a, gs.Graph))
    return subs


def tensor_map(graph: gs.Graph) -> dict[str, gs.Tensor]:
    """The tensors ``graph`` uses, by name: what graphsurgeon's ``Graph.tensors()`` returns (graph
    inputs, then every node's inputs and outputs in node order, then graph outputs; empty names
    left out; a later tensor of the same name wins), built several times faster (``tensors()``
    concatenates synchronized lists and checks duplicates for every tensor, which dominates
    whole-graph walks of large models). It does not log graphsurgeon's duplicate-name warning."""
    found: dict[str, gs.Tensor] = {}
    for t in graph.inputs:
        if t.name != "":
            found[t.name] = t
    for n in graph.nodes:
        for t in n.inputs:
            if t.name != "":
                found[t.name] = t
        for t in n.outputs:
            if t.name != "":
                found[t.name] = t
    for t in graph.outputs:
        if t.name != "":
            found[t.name] = t
    return found


def constant_nbytes(t: gs.Constant) -> int:
    """Bytes of a constant's values, from its dims when they are still lazy (nothing is read)."""
    v = t._values
    if isinstance(v, gs.ir.tensor.LazyValues):
        return int(v.nbytes)
    return int(np.asarray(v).nbytes)


def captured_names(node: gs.Node) -> list[str]:
    """Names read inside ``node``'s subgraphs (recursively) that those subgraphs do not define:
    the node's captures from enclosing scopes, in first-read order."""
    defined: set[str] = set()
    read: list[str] = []
    stack = node_subgraphs(node)
    while stack:
        g = stack.pop()
        defined.update(t.name for t in g.inputs)
        for n in g.nodes:
            defined.update(t.name for t in n.outputs)
            read.extend(t.name for t in n.inputs if t.name and not isinstance(t, gs.Constant))
            stack.extend(node_subgraphs(n))
        read.extend(t.name for t in g.outputs if not isinstance(t, gs.Constant))
    return [r for r in dict.fromkeys(read) if r not in defined]


def _local_predecessors(nodes: Sequence[gs.Node]) -> list[set[int]]:
    """For every node, the indices of the nodes of the same list it depends on: the producers of
    its inputs and, for a node with subgraphs, of the outer tensors its subgraphs read."""
    index = {id(n): i for i, n in enumerate(nodes)}
    by_name = {t.name: i for i, n in enumerate(nodes) for t in n.outputs if t.name}
    preds: list[set[int]] = []
    for i, n in enumerate(nodes):
        p = {index[id(q)] for t in n.inputs for q in t.inputs if id(q) in index}
        if node_subgraphs(n):
            p.update(by_name[name] for name in captured_names(n) if name in by_name)
        p.discard(i)
        preds.append(p)
    return preds


def _plainly_in_order(nodes: Sequence[gs.Node]) -> bool:
    """True when no node holds a subgraph and every node's inputs are produced by nodes before
    it (or outside the list): the order is then valid as it is. False means "not shown"
    (:func:`local_topo_order` then decides on the full dependencies). One cheap pass, since the
    order is usually valid already."""
    listed = {id(n) for n in nodes}
    placed: set[int] = set()
    for n in nodes:
        if n.attrs and node_subgraphs(n):
            return False
        for t in n.inputs:
            for q in t.inputs:
                if id(q) in listed and id(q) not in placed:
                    return False
        placed.add(id(n))
    return True


def local_topo_order(graph: gs.Graph, new: Collection[gs.Node] = ()) -> list[gs.Node]:
    """The graph's nodes in a stable topological order (this graph only, not its subgraphs).

    A node depends on the producers of its inputs and, when it holds subgraphs (If/Loop/Scan), on
    the producers of the outer tensors its subgraphs read. The given order is returned unchanged
    (as a new list of the same nodes) when it is already valid; otherwise Kahn's algorithm with the
    original position as priority places every node as early as its dependencies allow but never
    before a node that came before it and is ready, so the nodes that were in order keep their
    relative order and only the misplaced ones move. A cycle leaves the order as it is (the pass
    manager's checks report it).

    Args:
        new: nodes just added to the graph (anywhere in ``graph.nodes``, typically at the end):
            each is placed right before the first other node that reads what it computes
            (directly or through other new nodes), so the other nodes keep their order.
    """
    nodes = list(graph.nodes)
    if _plainly_in_order(nodes):
        return nodes
    preds = _local_predecessors(nodes)
    if all(j < i for i, p in enumerate(preds) for j in p):
        return nodes
    succs: list[list[int]] = [[] for _ in nodes]
    indeg = [len(p) for p in preds]
    for i, p in enumerate(preds):
        for j in p:
            succs[j].append(i)
    # priority: (position, 0) for a node in place; (position of its first reader in place, -1,
    # position) for a new node, so that it comes right before that reader
    fresh = {id(n) for n in new}
    key: list[tuple[float, int, int]] = [(float(i), 0, i) for i in range(len(nodes))]
    if fresh:
        anchor: dict[int, float] = {}

        def first_reader(i: int, seen: set[int]) -> float:
            if i in anchor:
                return anchor[i]
            seen.add(i)
            best = float("inf")
            for k in succs[i]:
                if id(nodes[k]) not in fresh:
                    best = min(best, float(k))
                elif k not in seen:
                    best = min(best, first_reader(k, seen))
            anchor[i] = best
            return best

        for i, n in enumerate(nodes):
            if id(n) in fresh:
                key[i] = (first_reader(i, set()), -1, i)
    ready = [(key[i], i) for i, d in enumerate(indeg) if d == 0]
    heapq.heapify(ready)
    order: list[gs.Node] = []
    while ready:
        _, i = heapq.heappop(ready)
        order.append(nodes[i])
        for k in succs[i]:
            indeg[k] -= 1
            if indeg[k] == 0:
                heapq.heappush(ready, (key[k], k))
    if len(order) != len(nodes):
        return nodes
    return order


def insert_nodes(graph: gs.Graph, new: Sequence[gs.Node]) -> None:
    """Add ``new`` nodes to ``graph``, each right before the first node that reads what it
    computes; the graph's other nodes keep their order (see :func:`local_topo_order`)."""
    graph.nodes = list(graph.nodes) + list(new)
    graph.nodes = local_topo_order(graph, new)


def toposort_graph(graph: gs.Graph, recurse: bool = True) -> int:
    """Sort ``graph`` (and, with ``recurse``, every subgraph) with :func:`local_topo_order`, in
    place; return how many graphs changed order (0: nothing was touched)."""
    graphs = [graph]
    if recurse:
        stack = [graph]
        while stack:
            g = stack.pop()
            for n in g.nodes:
                subs = node_subgraphs(n)
                graphs.extend(subs)
                stack.extend(subs)
    changed = 0
    for g in graphs:
        order = local_topo_order(g)
        if any(a is not b for a, b in zip(order, g.nodes)):
            g.nodes = order
            changed += 1
    return changed


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


def graph_names(graph: gs.Graph) -> set[str]:
    """Every node and tensor name of ``graph`` and of the graphs nested in its nodes."""
    names: set[str] = set()
    stack = [graph]
    while stack:
        g = stack.pop()
        names.update(tensor_map(g))
        for node in g.nodes:
            names.add(node.name)
            stack.extend(node_subgraphs(node))
    names.discard("")
    return names


class _NameScope:
    """Fresh names for the graphs of one run: ``base__goN`` with N counted from 0 in the scope,
    skipping every name the graphs hold (computed when the first name is asked for)."""

    def __init__(self) -> None:
        self.graphs: list[gs.Graph] = []
        self.pending: list[gs.Graph] = []
        self.taken: set[str] = set()
        self.next = 0

    def add(self, graph: gs.Graph) -> None:
        if not any(g is graph for g in self.graphs):
            self.graphs.append(graph)
            self.pending.append(graph)

    def fresh(self, base: str) -> str:
        while self.pending:
            self.taken |= graph_names(self.pending.pop())
        while True:
            name = f"{base}__go{self.next}"
            self.next += 1
            if name not in self.taken and f"{name}_out" not in self.taken:
                self.taken.add(name)
                return name


_scope: contextvars.ContextVar[_NameScope | None] = contextvars.ContextVar(
    "graphopt_name_scope", default=None
)
_counter = itertools.count()


@contextlib.contextmanager
def name_scope(graph: gs.Graph) -> Iterator[None]:
    """Make :func:`unique_name` deterministic for the rewrites of ``graph``: inside, names are
    ``base__goN`` with N counted per scope and never a name the graph (subgraphs included) or a
    graph of an enclosing scope already holds. Every pass runs in one (``Pass.__call__``), so the
    same model through the same passes gets the same names in any process. Nested scopes share
    the outermost one's counter."""
    outer = _scope.get()
    if outer is not None:
        outer.add(graph)
        yield
        return
    scope = _NameScope()
    scope.add(graph)
    token = _scope.set(scope)
    try:
        yield
    finally:
        _scope.reset(token)


def unique_name(base: str) -> str:
    """A fresh name derived from ``base`` (suffix ``__goN``): unique in the graphs of the active
    :func:`name_scope`; outside one, from a process-wide counter."""
    scope = _scope.get()
    if scope is None:
        return f"{base}__go{next(_counter)}"
    return scope.fresh(base)


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
