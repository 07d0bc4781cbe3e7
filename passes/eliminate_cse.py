"""Common-subexpression elimination: compute each distinct value once.

Two nodes compute the same value when they have the same op, domain, attributes and the very same
input tensors (for commutative ops Add/Mul/Max/Min/Sum/Mean/And/Or/Xor/Equal, the same inputs in
any order; Sum/Mean only with two inputs, where floating point is exactly commutative), so ``f(a,
b)`` seen twice becomes one node whose outputs the second one's readers read.
Found by hash-consing in one topological sweep (O(n)): a node's key is built from the canonical ids
of its inputs, so chains of duplicates collapse in the same sweep.

Identical constants (same dtype, shape and bytes, hashed; up to ``max_const_bytes``) are merged
first, so that ``Add(x, c1)`` and ``Add(x, c2)`` with equal ``c1``/``c2`` are recognised as one
value.

Never merged: nodes with subgraph attributes, random ops, nodes without outputs, and two nodes
whose corresponding outputs are both graph outputs (one name would be lost). When only the
duplicate's output is a graph output, the kept node writes that output and the other name's readers
are redirected.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.core.const_eval import RANDOM_OPS
from graphopt.core.errors import OptionError
from graphopt.core.graph import constant_nbytes, local_topo_order, node_subgraphs
from graphopt.core.model import Model, all_graph_output_ids
from graphopt.core.pass_manager import Pass, PassResult, register_pass

logger = logging.getLogger(__name__)

#: ops whose two evaluations may differ
NONDETERMINISTIC = RANDOM_OPS | {"Dropout"}
COMMUTATIVE = frozenset({"Add", "Mul", "Max", "Min", "Sum", "Mean", "And", "Or", "Xor", "Equal"})
#: variadic ops whose result does not depend on the input order even in floating point (a sum of
#: three or more terms does: (a + b) + c may differ from (c + b) + a in the last bit)
EXACT_VARIADIC = frozenset({"Max", "Min"})


def _attr_key(v: Any) -> Any:
    """A hashable, exact key for an attribute value (tensors by dtype/shape/bytes)."""
    if isinstance(v, gs.Constant):
        arr = np.asarray(v.values)
        return ("tensor", str(arr.dtype), arr.shape, _digest(arr))
    if isinstance(v, np.ndarray):
        arr = np.asarray(v)
        return ("array", str(arr.dtype), arr.shape, _digest(arr))
    if isinstance(v, (list, tuple)):
        return ("list", tuple(_attr_key(x) for x in v))
    if isinstance(v, float):
        return ("float", np.float64(v).tobytes())  # NaN-safe and exact
    if isinstance(v, (bytes, str, int, bool)) or v is None:
        return (type(v).__name__, v)
    if isinstance(v, np.generic):
        return ("scalar", str(v.dtype), v.tobytes())
    return ("other", type(v).__name__, repr(v))


def _digest(arr: np.ndarray) -> bytes:
    if arr.dtype == object:
        return hashlib.blake2b(repr(arr.tolist()).encode(), digest_size=16).digest()
    return hashlib.blake2b(arr.tobytes(order="C"), digest_size=16).digest()


@register_pass
class EliminateCsePass(Pass):
    """Merge nodes that compute the same value, and identical constants.

    Args:
        max_const_bytes: constants up to this size are compared by content (bytes hashed).
    """

    name = "eliminate-cse"

    def __init__(self, max_const_bytes: int = 1 << 20) -> None:
        if (
            isinstance(max_const_bytes, bool)
            or not isinstance(max_const_bytes, int)
            or max_const_bytes < 0
        ):
            raise OptionError(
                f"eliminate-cse: max_const_bytes must be a non-negative integer, "
                f"got {max_const_bytes!r}"
            )
        self.max_const_bytes = max_const_bytes
        self._keys: dict[int, tuple[Any, tuple[Any, ...]]] = {}

    def call(self, model: Model) -> PassResult:
        stats = {"nodes_merged": 0, "constants_merged": 0}
        escaping = all_graph_output_ids(model)
        for g in model.walk_graphs():
            self._graph(g, escaping, stats)
        return PassResult(model, any(stats.values()), stats)

    def _graph(self, graph: gs.Graph, escaping: set[int], stats: dict[str, int]) -> None:
        outputs = {id(t) for t in graph.outputs}
        # ---- constants: canonical object per (dtype, shape, bytes); only constants that share
        # dtype and shape with another one are read and hashed (weights are mostly unique)
        nodes = local_topo_order(graph)
        by_meta: dict[tuple[Any, ...], list[gs.Constant]] = {}
        seen: set[int] = set()
        for node in nodes:
            for t in node.inputs:
                if isinstance(t, gs.Constant) and id(t) not in seen:
                    seen.add(id(t))
                    if constant_nbytes(t) <= self.max_const_bytes:
                        by_meta.setdefault((str(t.dtype), tuple(t.shape)), []).append(t)
        canon_of: dict[int, gs.Constant] = {}
        for group in by_meta.values():
            if len(group) < 2:
                continue
            canon: dict[tuple[Any, ...], gs.Constant] = {}
            for t in group:
                c = canon.setdefault(self._const_key(t), t)
                if c is not t:
                    canon_of[id(t)] = c
        if canon_of:
            for node in nodes:
                for i, t in enumerate(node.inputs):
                    c = canon_of.get(id(t))
                    if c is not None:
                        node.inputs[i] = c
                        stats["constants_merged"] += 1
        # ---- nodes: hash-consing in topological order
        table: dict[tuple[Any, ...], gs.Node] = {}
        removed: set[int] = set()
        for node in nodes:
            key = self._node_key(node)
            if key is None:
                continue
            first = table.get(key)
            if first is None:
                table[key] = node
                continue
            if self._merge(first, node, outputs, escaping):
                removed.add(id(node))
                stats["nodes_merged"] += 1
            else:
                logger.debug(
                    "not merging %s into %s: both outputs are graph outputs", node.name, first.name
                )
        if removed:
            graph.nodes = [n for n in graph.nodes if id(n) not in removed]

    def _const_key(self, t: gs.Constant) -> tuple[Any, ...]:
        # constants are never written in place (a new array is assigned), so the key of a
        # constant whose values object is unchanged can be reused across fixed-point steps
        cached = self._keys.get(id(t))
        if cached is not None and cached[0] is t._values:
            return cached[1]
        arr = np.asarray(t.values)
        key = (str(arr.dtype), arr.shape, _digest(arr))
        self._keys[id(t)] = (t._values, key)
        return key

    @staticmethod
    def _node_key(node: gs.Node) -> tuple[Any, ...] | None:
        if not node.outputs or node.op in NONDETERMINISTIC or node_subgraphs(node):
            return None
        if any(o.is_empty() for o in node.outputs):
            return None
        ins = [id(t) if not t.is_empty() else None for t in node.inputs]
        if (
            node.op in COMMUTATIVE
            and node.domain in ("", "ai.onnx", None)
            and (len(ins) == 2 or node.op in EXACT_VARIADIC)
        ):
            ins = sorted(ins, key=lambda v: -1 if v is None else v)
        try:
            attrs = tuple(sorted((k, _attr_key(v)) for k, v in node.attrs.items()))
        except TypeError:
            return None
        return (node.domain or "", node.op, attrs, tuple(ins), len(node.outputs))

    @staticmethod
    def _merge(keep: gs.Node, dup: gs.Node, outputs: set[int], escaping: set[int]) -> bool:
        """Make ``dup``'s readers read ``keep``'s outputs; False (nothing changed) if impossible."""
        pairs = list(zip(keep.outputs, dup.outputs))
        for a, b in pairs:
            a_out = id(a) in escaping
            b_out = id(b) in escaping
            if a_out and b_out:
                return False
            if b_out and id(b) not in outputs:
                return False  # returned by a subgraph by name: leave it
            if a_out and id(a) not in outputs:
                return False
        dup.inputs.clear()
        dup.outputs.clear()
        for idx, (a, b) in enumerate(pairs):
            if id(b) in outputs:
                # keep the graph output's name: ``keep`` now writes b, a's readers read b
                for consumer in list(a.outputs):
                    for i, t in enumerate(consumer.inputs):
                        if t is a:
                            consumer.inputs[i] = b
                keep.outputs[idx] = b
                if b.dtype is None:
                    b.dtype = a.dtype
                if b.shape is None:
                    b.shape = a.shape
            else:
                for consumer in list(b.outputs):
                    for i, t in enumerate(consumer.inputs):
                        if t is b:
                            consumer.inputs[i] = a
        return True
