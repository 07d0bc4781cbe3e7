"""No-op elimination: remove nodes whose output equals their input, and collapse layout chains.

Rewrites (``x`` has a static shape where a rule needs one; shapes come from the IR):

* ``Cast(x, to=dtype(x)) -> x``
* ``Reshape(x, s) -> x`` when ``s`` (0 copies a dim unless ``allowzero``, -1 inferred) resolves to
  ``shape(x)``; likewise ``Flatten``, ``Squeeze``/``Unsqueeze`` and ``Expand`` whose result has
  ``x``'s shape, ``Tile`` with all repeats 1, ``Slice`` that takes every element in order, ``Pad``
  with all-zero pads, ``Concat``/``Sum``/``Max``/``Min``/``Mean`` of one input, and a ``Transpose``
  with the identity permutation.
* ``Transpose(Transpose(x, p1), p2) -> Transpose(x, q)`` with ``q[i] = p1[p2[i]]``, and ``-> x``
  when ``q`` is the identity.
* ``Reshape(R(x), s) -> Reshape(x, s)`` for ``R`` in Reshape/Flatten/Squeeze/Unsqueeze (all are
  row-major reinterpretations of the same data), when ``s`` has no copy-dim 0.
* ``Squeeze(Unsqueeze(x, a), a) -> x``; ``Unsqueeze(Squeeze(x, a), a) -> x`` (axes normalized),
  and in general ``R2(R1(x)) -> x`` for pure reshapes R1, R2 whose result has ``x``'s static
  shape (``Unsqueeze(Squeeze(x, [0]), [1])`` on a ``1x1xC`` tensor).
* ``x * 1``, ``x / 1``, ``x + 0``, ``x - 0``, ``0 + x``, ``1 * x`` -> ``x`` when the constant
  broadcast leaves ``x``'s shape and dtype unchanged.

Inner nodes of a collapsed chain are only rewired when nothing else reads them; removed outputs
that are graph outputs keep their names (``bypass_node``), and a node is left alone when that is
impossible.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt.core.graph import bypass_node, local_topo_order
from graphopt.core.model import Model, all_graph_output_ids
from graphopt.core.pass_manager import Pass, PassResult, register_pass
from graphopt.core.pattern import const_value, node_axes, normalize_axes
from graphopt.core.shapes import is_static

logger = logging.getLogger(__name__)

DEFAULT_DOMAINS = ("", "ai.onnx", None)

#: ops that only reinterpret the row-major data of their first input under another shape
PURE_RESHAPES = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze"})


def _shape(t: gs.Tensor) -> list[int] | None:
    return [int(d) for d in t.shape] if is_static(t.shape) else None


def _rank(t: gs.Tensor) -> int | None:
    return len(t.shape) if t.shape is not None else None


def _axes(node: gs.Node, rank: int | None) -> list[int] | None:
    """Normalized (non-negative, sorted) axes of Squeeze/Unsqueeze/ReduceX; None if unknown."""
    return normalize_axes(node_axes(node), rank)


def _dtype(t: gs.Tensor) -> np.dtype | None:
    if t.dtype is None:
        return None
    try:
        return np.dtype(t.dtype)
    except TypeError:
        return None


def _perm(node: gs.Node, rank: int | None) -> list[int] | None:
    if "perm" in node.attrs:
        return [int(p) for p in node.attrs["perm"]]
    return list(range(rank))[::-1] if rank is not None else None


def _resolve_reshape(in_shape: list[int], target: np.ndarray, allowzero: bool) -> list[int] | None:
    dims = [int(d) for d in target.reshape(-1)]
    out: list[int] = []
    for i, d in enumerate(dims):
        if d == 0 and not allowzero:
            if i >= len(in_shape):
                return None
            out.append(in_shape[i])
        else:
            out.append(d)
    if out.count(-1) > 1:
        return None
    if -1 in out:
        known = int(np.prod([d for d in out if d != -1], dtype=np.int64))
        total = int(np.prod(in_shape, dtype=np.int64))
        if known == 0 or total % known:
            return None
        out[out.index(-1)] = total // known
    return out


def _broadcast(a: Sequence[int], b: Sequence[int]) -> list[int] | None:
    try:
        return list(np.broadcast_shapes(tuple(a), tuple(b)))
    except ValueError:
        return None


class _Graph:
    """Per-graph state for one sweep."""

    def __init__(self, graph: gs.Graph, escaping: set[int]) -> None:
        self.graph = graph
        self.local = {id(n) for n in graph.nodes}
        self.outputs = {id(t) for t in graph.outputs}
        self.escaping = escaping  # outputs of any graph: never rewired away

    def private(self, t: gs.Tensor) -> bool:
        """``t`` is read by exactly one node and is no graph's output."""
        return len(t.outputs) == 1 and id(t) not in self.escaping

    def producer(self, t: gs.Tensor) -> gs.Node | None:
        if isinstance(t, gs.Constant) or not t.inputs:
            return None
        p = t.inputs[0]
        return p if id(p) in self.local else None


@register_pass
class EliminateNoopPass(Pass):
    """Remove no-op nodes (same-type Cast, same-shape Reshape, cancelling Transposes, x*1, ...)."""

    name = "eliminate-noop"

    def call(self, model: Model) -> PassResult:
        stats: dict[str, int] = {}
        escaping = all_graph_output_ids(model)
        for g in model.walk_graphs():
            st = _Graph(g, escaping)
            removed: set[int] = set()
            for node in local_topo_order(g):
                if id(node) in removed or not node.outputs or node.domain not in DEFAULT_DOMAINS:
                    continue
                kind = self._visit(st, node, removed)
                if kind:
                    stats[kind] = stats.get(kind, 0) + 1
            if removed:
                g.nodes = [n for n in g.nodes if id(n) not in removed]
        return PassResult(model, bool(stats), stats)

    # ------------------------------------------------------------------ dispatch
    def _visit(self, st: _Graph, node: gs.Node, removed: set[int]) -> str | None:
        op = node.op
        if len(node.outputs) != 1 or not node.inputs or node.inputs[0].is_empty():
            return None
        x = node.inputs[0]
        y = node.outputs[0]
        if id(y) in st.escaping and id(y) not in st.outputs:
            return None  # returned by a subgraph by name: leave it
        kind: str | None = None
        if op == "Cast":
            dt = _dtype(x)
            to = node.attrs.get("to")
            if (
                dt is not None
                and to is not None
                and dt == onnx.helper.tensor_dtype_to_np_dtype(int(to))
            ):
                kind = "cast"
        elif op in ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Expand", "Tile"):
            out = self._out_shape(node)
            if (
                out is not None
                and out == _shape(x)
                and (op != "Tile" or bool(np.all(const_value(node.inputs[1]) == 1)))
            ):
                kind = op.lower()
            elif out is not None and op in PURE_RESHAPES and self._undo(st, node, out, removed):
                return "reshape_pair"
            elif op == "Reshape":
                return self._reshape_chain(st, node, removed)
            elif op == "Squeeze":
                return self._unsqueeze_squeeze(st, node, removed)
            elif op == "Unsqueeze":
                return self._squeeze_unsqueeze(st, node, removed)
        elif op == "Transpose":
            return self._transpose(st, node, removed)
        elif op == "Slice":
            kind = "slice" if self._slice_all(node) else None
        elif op == "Pad":
            pads = const_value(node.inputs[1]) if len(node.inputs) > 1 else None
            if pads is None and "pads" in node.attrs:
                pads = np.asarray(node.attrs["pads"])
            if pads is not None and not pads.any():
                kind = "pad"
        elif op in ("Concat", "Sum", "Max", "Min", "Mean") and len(node.inputs) == 1:
            kind = "single_input"
        elif op in ("Mul", "Div", "Add", "Sub") and len(node.inputs) == 2:
            src = self._neutral(node)
            if src is not None:
                x = src
                kind = "neutral_arith"
        if kind and self._bypass(st, node, x, removed):
            return kind
        return None

    def _bypass(self, st: _Graph, node: gs.Node, src: gs.Tensor, removed: set[int]) -> bool:
        if bypass_node(st.graph, node, src=src, local_nodes=st.local):
            removed.add(id(node))
            return True
        return False

    # ------------------------------------------------------------------ rules
    def _out_shape(self, node: gs.Node) -> list[int] | None:
        """The output shape of a layout op computed from its static input shape and constants."""
        x = node.inputs[0]
        s = _shape(x)
        if s is None:
            return None
        op = node.op
        if op == "Reshape":
            target = const_value(node.inputs[1]) if len(node.inputs) > 1 else None
            if target is None:
                return None
            return _resolve_reshape(s, target, bool(node.attrs.get("allowzero", 0)))
        if op == "Flatten":
            axis = int(node.attrs.get("axis", 1))
            axis = axis + len(s) if axis < 0 else axis
            return [int(np.prod(s[:axis], dtype=np.int64)), int(np.prod(s[axis:], dtype=np.int64))]
        if op == "Squeeze":
            has_axes = "axes" in node.attrs or (
                len(node.inputs) > 1 and not node.inputs[1].is_empty()
            )
            axes = _axes(node, len(s)) if has_axes else []
            if axes == []:  # no axes, or an empty axes list: squeeze every 1-dim
                axes = [i for i, d in enumerate(s) if d == 1]
            if axes is None or any(a >= len(s) or s[a] != 1 for a in axes):
                return None
            return [d for i, d in enumerate(s) if i not in set(axes)]
        if op == "Unsqueeze":
            rank = None
            if "axes" in node.attrs or len(node.inputs) > 1:
                raw = node.attrs.get("axes")
                if raw is None:
                    v = const_value(node.inputs[1])
                    if v is None:
                        return None
                    raw = v.reshape(-1).tolist()
                rank = len(s) + len(raw)
            axes = _axes(node, rank)
            if not axes:
                return None
            return _unsqueeze(s, axes)
        if op == "Expand":
            shp = const_value(node.inputs[1]) if len(node.inputs) > 1 else None
            if shp is None:
                return None
            return _broadcast(s, [int(d) for d in shp.reshape(-1)])
        if op == "Tile":
            reps = const_value(node.inputs[1]) if len(node.inputs) > 1 else None
            if reps is None or reps.size != len(s):
                return None
            return [d * int(r) for d, r in zip(s, reps.reshape(-1))]
        return None

    def _undo(self, st: _Graph, node: gs.Node, out: list[int], removed: set[int]) -> bool:
        """R2(R1(x)) -> x for pure reshapes R1, R2 when the result has x's (static) shape."""
        inner = st.producer(node.inputs[0])
        if (
            inner is None
            or id(inner) in removed
            or inner.op not in PURE_RESHAPES
            or inner.domain not in DEFAULT_DOMAINS
            or len(inner.outputs) != 1
            or not inner.inputs
            or _shape(inner.inputs[0]) != out
        ):
            return False
        if self._bypass(st, node, inner.inputs[0], removed):
            self._drop_if_dead(st, inner, removed)
            return True
        return False

    def _reshape_chain(self, st: _Graph, node: gs.Node, removed: set[int]) -> str | None:
        inner_out = node.inputs[0]
        inner = st.producer(inner_out)
        target = const_value(node.inputs[1]) if len(node.inputs) > 1 else None
        if inner is None or target is None or id(inner) in removed:
            return None
        if (
            inner.op not in ("Reshape", "Flatten", "Squeeze", "Unsqueeze")
            or inner.domain not in DEFAULT_DOMAINS
            or len(inner.outputs) != 1
        ):
            return None
        if not st.private(inner_out) or id(inner_out) in st.outputs:
            return None
        if (target == 0).any() and not node.attrs.get("allowzero", 0):
            return None  # a copy-dim refers to the inner result's dims
        node.inputs[0] = inner.inputs[0]
        inner.inputs.clear()
        inner.outputs.clear()
        removed.add(id(inner))
        return "reshape_chain"

    def _unsqueeze_squeeze(self, st: _Graph, node: gs.Node, removed: set[int]) -> str | None:
        """Squeeze(Unsqueeze(x, a), a) -> x."""
        mid = node.inputs[0]
        inner = st.producer(mid)
        if inner is None or inner.op != "Unsqueeze" or id(inner) in removed:
            return None
        rank = _rank(mid)
        a1 = _axes(inner, rank)
        a2 = _axes(node, rank)
        if not a1 or not a2 or a1 != a2:
            return None
        src = inner.inputs[0]
        if bypass_node(st.graph, node, src=src, local_nodes=st.local):
            removed.add(id(node))
            self._drop_if_dead(st, inner, removed)
            return "squeeze_pair"
        return None

    def _squeeze_unsqueeze(self, st: _Graph, node: gs.Node, removed: set[int]) -> str | None:
        """Unsqueeze(Squeeze(x, a), a) -> x when x has 1s at a (a Squeeze guarantees it)."""
        mid = node.inputs[0]
        inner = st.producer(mid)
        if inner is None or inner.op != "Squeeze" or id(inner) in removed:
            return None
        src = inner.inputs[0]
        rank = _rank(src)
        has_axes = "axes" in inner.attrs or (
            len(inner.inputs) > 1 and not inner.inputs[1].is_empty()
        )
        if not has_axes:
            return None
        a1 = _axes(inner, rank)
        a2 = _axes(node, rank)
        if not a1 or not a2 or a1 != a2:
            return None
        if bypass_node(st.graph, node, src=src, local_nodes=st.local):
            removed.add(id(node))
            self._drop_if_dead(st, inner, removed)
            return "squeeze_pair"
        return None

    def _transpose(self, st: _Graph, node: gs.Node, removed: set[int]) -> str | None:
        x = node.inputs[0]
        rank = _rank(x)
        p2 = _perm(node, rank)
        if p2 is None:
            return None
        if p2 == list(range(len(p2))):
            return "transpose" if self._bypass(st, node, x, removed) else None
        inner = st.producer(x)
        if (
            inner is None
            or inner.op != "Transpose"
            or id(inner) in removed
            or inner.domain not in DEFAULT_DOMAINS
        ):
            return None
        p1 = _perm(inner, _rank(inner.inputs[0]))
        if p1 is None or len(p1) != len(p2):
            return None
        q = [p1[i] for i in p2]
        src = inner.inputs[0]
        if q == list(range(len(q))):
            if self._bypass(st, node, src, removed):
                self._drop_if_dead(st, inner, removed)
                return "transpose_pair"
            return None
        if not st.private(x):
            return None  # composing would keep the inner Transpose alive: no gain
        node.inputs[0] = src
        node.attrs["perm"] = q
        inner.inputs.clear()
        inner.outputs.clear()
        removed.add(id(inner))
        return "transpose_composed"

    def _drop_if_dead(self, st: _Graph, inner: gs.Node, removed: set[int]) -> None:
        if all(not o.outputs and id(o) not in st.escaping for o in inner.outputs):
            inner.inputs.clear()
            inner.outputs.clear()
            removed.add(id(inner))

    def _slice_all(self, node: gs.Node) -> bool:
        x = node.inputs[0]
        s = _shape(x)
        if s is None:
            if x.shape is None:
                return False
            # unknown dims: only a [0, INT64_MAX) range is certainly the whole axis
            s = [
                2**63 - 1 if not isinstance(d, (int, np.integer)) or d < 0 else int(d)
                for d in x.shape
            ]
        if "starts" in node.attrs:  # opset < 10
            starts = list(node.attrs["starts"])
            ends = list(node.attrs["ends"])
            axes = list(node.attrs.get("axes", range(len(starts))))
            steps = [1] * len(starts)
        else:
            vals = [
                const_value(t) if i < len(node.inputs) and not node.inputs[i].is_empty() else None
                for i, t in enumerate(node.inputs[1:5], start=1)
            ]
            if len(node.inputs) < 3 or vals[0] is None or vals[1] is None:
                return False
            starts = vals[0].reshape(-1).tolist()
            ends = vals[1].reshape(-1).tolist()
            axes = (
                vals[2].reshape(-1).tolist()
                if len(vals) > 2 and vals[2] is not None
                else list(range(len(starts)))
            )
            if len(node.inputs) > 3 and not node.inputs[3].is_empty() and vals[2] is None:
                return False
            if len(node.inputs) > 4 and not node.inputs[4].is_empty():
                if vals[3] is None:
                    return False
                steps = vals[3].reshape(-1).tolist()
            else:
                steps = [1] * len(starts)
        for st_, en, ax, sp in zip(starts, ends, axes, steps):
            ax = ax + len(s) if ax < 0 else ax
            if ax < 0 or ax >= len(s) or sp != 1:
                return False
            d = s[ax]
            start = st_ + d if st_ < 0 else st_
            end = en + d if en < 0 else en
            if max(start, 0) != 0 or min(end, d) < d:
                return False
        return True

    def _neutral(self, node: gs.Node) -> gs.Tensor | None:
        """The non-constant operand when the other is a neutral element that changes nothing."""
        a, b = node.inputs[0], node.inputs[1]
        y = node.outputs[0]
        cands: list[tuple[gs.Tensor, gs.Tensor]] = [(a, b)]
        if node.op in ("Mul", "Add"):
            cands.append((b, a))
        neutral = {"Mul": 1, "Div": 1, "Add": 0, "Sub": 0}[node.op]
        for x, c in cands:
            v = const_value(c)
            if v is None or v.size == 0 or not np.all(v == neutral):
                continue
            dx = _dtype(x)
            dy = _dtype(y)
            if dx is None or dx != v.dtype or (dy is not None and dy != dx):
                continue
            if v.ndim == 0 or (v.size == 1 and x.shape is not None and v.ndim <= len(x.shape)):
                return x
            s = _shape(x)
            if s is not None and _broadcast(s, v.shape) == s:
                return x
            if s is None and _keeps_shape(x.shape, v.shape):
                return x
        return None


def _keeps_shape(shape: Sequence[object] | None, other: Sequence[int]) -> bool:
    """Broadcasting ``other`` against a tensor of ``shape`` (symbolic dims allowed: ``batch``,
    ``seq``) leaves ``shape`` as it is, whatever values its symbolic dims take: ``other`` has no
    higher rank, and each of its dims is 1 or equals the fixed dim it lines up with."""
    if shape is None or len(other) > len(shape):
        return False
    for d, o in zip(list(shape)[len(shape) - len(other) :], other):
        if int(o) == 1:
            continue
        if not (isinstance(d, (int, np.integer)) and int(d) == int(o)):
            return False
    return True


def _unsqueeze(shape: Sequence[int], axes: Sequence[int]) -> list[int]:
    out = list(shape)
    for a in sorted(axes):
        out.insert(a, 1)
    return out
