"""Cutting a large ONNX graph into consecutive standalone models (segments).

onnxruntime's session creation grows faster than the graph: a chain of small nodes with one
initializer each takes (``ORT_DISABLE_ALL``, one thread, CPU s) 1.2 s at 20,000 nodes, 3.0 s at
40,000, 7.7 s at 80,000 and 329 s at 200,000; it is quadratic in the number of initializers (a
chain of 80,000 Mul nodes with an initializer each: 13 s; sharing one: 3 s) and superlinear in
nodes too (Relu chain 80,000 -> 160,000: 3.3x). A graph of ``n`` nodes run as ``n / k`` sessions
of ``k`` nodes each opens in time linear in ``n``.

:func:`segment_model` cuts the top-level node list, in its (topological) order, into pieces of at
most ``max_nodes`` nodes. Each piece is a standalone ``ModelProto``:

- inputs: the graph inputs it reads, and the tensors it reads that earlier pieces produce (the live
  tensors crossing the cut), typed as the model declares them;
- outputs: what it produces that later pieces read, and the graph outputs it produces;
- initializers: those its nodes read (a shared one travels with every piece that reads it);
- a node is never split, so an If/Loop/Scan node's subgraphs stay whole in one piece; what they
  read from the outer scope counts as the node's input.

Run in order, each piece fed the graph's inputs and what earlier pieces produced, the pieces compute
what the whole graph computes; at ``ORT_DISABLE_ALL`` (no fusion across nodes) bit for bit, since
every node runs the same kernel on the same inputs.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import onnx
import onnx.shape_inference

from graphopt.core.model import PROTO_LIMIT

logger = logging.getLogger(__name__)


@dataclass
class Segment:
    """One piece of a cut graph.

    Attributes:
        proto: the piece as a standalone model.
        inputs: names it is fed, in its graph-input order (graph inputs and crossing tensors).
        outputs: names it returns (crossing tensors later pieces read, and graph outputs).
        release: crossing tensors no later piece reads once this one has run.
    """

    proto: onnx.ModelProto
    inputs: list[str]
    outputs: list[str]
    release: list[str] = field(default_factory=list)


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    out = [a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH]
    out += [g for a in node.attribute if a.type == onnx.AttributeProto.GRAPHS for g in a.graphs]
    return out


def outer_reads(node: onnx.NodeProto) -> set[str]:
    """Names read inside a node's subgraphs (recursively) that those subgraphs do not define: what
    the node captures from the scope around it."""
    defined: set[str] = set()
    read: set[str] = set()
    stack = _subgraphs(node)
    while stack:
        g = stack.pop()
        defined.update(i.name for i in g.input)
        defined.update(t.name for t in g.initializer)
        defined.update(t.values.name for t in g.sparse_initializer)
        for n in g.node:
            defined.update(n.output)
            read.update(x for x in n.input if x)
            stack += _subgraphs(n)
        read.update(o.name for o in g.output)
    return read - defined


def _reads(node: onnx.NodeProto) -> list[str]:
    names = [x for x in node.input if x]
    if any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute
    ):
        names += sorted(outer_reads(node))
    return list(dict.fromkeys(names))


def _inferred_types(proto: onnx.ModelProto, names: list[str]) -> dict[str, onnx.ValueInfoProto]:
    """Types of ``names`` by ONNX shape inference (the model's declared types are kept where it
    has them); empty when inference fails or the model is over protobuf's 2 GB."""
    try:
        if proto.ByteSize() >= PROTO_LIMIT:
            return {}
        inferred = onnx.shape_inference.infer_shapes(proto)
    except Exception as exc:  # noqa: BLE001 - then the model is run whole
        logger.debug("shape inference for segmenting failed: %s", exc)
        return {}
    wanted = set(names)
    return {
        vi.name: vi
        for vi in inferred.graph.value_info
        if vi.name in wanted and vi.type.WhichOneof("value") is not None
    }


def segment_model(proto: onnx.ModelProto, max_nodes: int) -> list[Segment] | None:
    """``proto``'s top-level graph cut into consecutive standalone models of at most
    ``max_nodes`` nodes each, balanced (``n`` nodes make ``ceil(n / max_nodes)`` pieces of equal
    size), or None where it is not cut: ``max_nodes`` nodes or fewer, nodes out of topological
    order, a name read that nothing defines, a graph output no node produces, sparse
    initializers, or a crossing tensor whose type neither the model declares nor ONNX shape
    inference finds (a piece's input needs one). None means: run the model whole.
    """
    g = proto.graph
    n = len(g.node)
    if n <= max_nodes or max_nodes < 1:
        return None
    if len(g.sparse_initializer):
        logger.debug("not segmented: sparse initializers")
        return None
    pieces = math.ceil(n / max_nodes)
    size = math.ceil(n / pieces)
    inits = {t.name: t for t in g.initializer}
    graph_inputs = [i.name for i in g.input]
    input_set = set(graph_inputs)
    produced: dict[str, int] = {}  # tensor -> piece producing it
    reads: list[list[str]] = []  # per piece: names read from outside the piece, first-read order
    read_sets: list[set[str]] = []
    init_reads: list[list[str]] = []  # per piece: initializers read
    last_use: dict[str, int] = {}  # crossing tensor / graph input -> last piece reading it
    for i, node in enumerate(g.node):
        s = i // size
        if s == len(reads):
            reads.append([])
            read_sets.append(set())
            init_reads.append([])
        for x in _reads(node):
            p = produced.get(x)
            if p is None:
                if x in inits and x not in input_set:
                    if x not in read_sets[s]:
                        read_sets[s].add(x)
                        init_reads[s].append(x)
                    continue
                if x not in input_set:
                    logger.debug("not segmented: %r is read before it is defined", x)
                    return None
            elif p == s:
                continue
            if x not in read_sets[s]:
                read_sets[s].add(x)
                reads[s].append(x)
                if x in inits:  # an initializer that is also a graph input (overridable)
                    init_reads[s].append(x)
            last_use[x] = s
        for o in node.output:
            if o:
                produced[o] = s
    graph_outputs = [o.name for o in g.output]
    if any(o not in produced for o in graph_outputs):
        logger.debug("not segmented: a graph output is an input or an initializer")
        return None
    types: dict[str, onnx.ValueInfoProto] = {}
    for vi in list(g.value_info) + list(g.output) + list(g.input):
        if vi.HasField("type") and vi.type.WhichOneof("value") is not None:
            types[vi.name] = vi
    crossing = {x for x, s in last_use.items() if x in produced and produced[x] != s}
    untyped = [x for x in crossing if x not in types]
    if untyped:
        types.update(_inferred_types(proto, untyped))
        untyped = sorted(x for x in untyped if x not in types)
    if untyped:
        logger.debug("not segmented: no type for crossing tensors %s", untyped[:5])
        return None
    out_set = set(graph_outputs)
    # what each piece returns: graph outputs it produces, and tensors read by a later piece
    returns: list[list[str]] = [[] for _ in reads]
    for name in graph_outputs:
        returns[produced[name]].append(name)
    for x in sorted(crossing, key=lambda x: (produced[x], x)):
        if x not in out_set:
            returns[produced[x]].append(x)
    # graph inputs no node reads stay inputs of the first piece (a whole session lists them too)
    unread = [x for x in graph_inputs if x not in last_use and x not in inits]
    value_info: list[list[onnx.ValueInfoProto]] = [[] for _ in reads]
    for vi in g.value_info:
        p = produced.get(vi.name)
        if p is not None:
            value_info[p].append(vi)
    release: list[list[str]] = [[] for _ in reads]
    for x, s in last_use.items():
        if x in crossing and x not in out_set:
            release[s].append(x)
    segments: list[Segment] = []
    for s in range(len(reads)):
        seg_inputs = reads[s] + (unread if s == 0 else [])
        piece = onnx.ModelProto()
        piece.ir_version = proto.ir_version
        piece.opset_import.extend(proto.opset_import)
        piece.functions.extend(proto.functions)
        piece.producer_name = proto.producer_name
        sub = piece.graph
        sub.name = f"{g.name}_segment{s}"
        sub.node.extend(g.node[s * size : (s + 1) * size])
        for x in seg_inputs:
            vi = types.get(x)
            if vi is not None:
                sub.input.append(vi)
            else:  # a graph input without a type: as the model has it
                sub.input.add().name = x
        sub.initializer.extend(inits[x] for x in init_reads[s])
        for x in returns[s]:
            if x in types:
                sub.output.append(types[x])
            else:
                sub.output.add().name = x
        returned = set(returns[s])
        sub.value_info.extend(vi for vi in value_info[s] if vi.name not in returned)
        segments.append(Segment(piece, seg_inputs, returns[s], sorted(release[s])))
    return segments
