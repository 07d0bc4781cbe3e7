"""Symbolic-shape simplification: fold the run-time index and shape arithmetic that a model with
dynamic dims (``batch``, ``seq``) keeps after constant folding, using the symbolic shapes of the IR.

With fixed input shapes, constant folding turns a model's shape subgraphs into constants. With
symbolic dims they stay, and exporters build index tensors from them: ``transformers`` builds the
attention mask as ``mask.flatten()[b * seq + s]`` over ``Range`` grids, PyTorch's ``expand`` adds
an ``Expand`` to a shape computed at run time. Every rewrite below is exact for every value of the
symbolic dims; a dim is *known* when it is an int or a name from shape inference (two tensors
with the same dim name have that dim equal, which is what symbolic inference derives), never a
fresh ``unk__N``.

Rewrites:

* **Index grids.** An integer tensor built from ``Range(0, n, 1)``, ``Unsqueeze``, ``Mul`` by a
  scalar and ``Add`` is an *affine grid*: ``g[i] = c0 + sum_j c_j * i[a_j]`` with axis ``a_j`` of
  length ``n_j`` (other axes length 1); scalars come from ``Gather(Shape(t), k)`` (the dim name of
  ``t``) and constants. ``Gather(Flatten(X, axis=k), g, axis=0)`` with ``c0 = 0``, the grid axes
  in increasing order holding ``X``'s leading dims ``D_0..D_{k-1}`` and ``c_j = prod(D_{j+1:})``
  (row-major strides) reads ``X[i_0, .., i_{k-1}]`` at grid position ``(i_0, .., i_{k-1})``: it is
  ``Unsqueeze(X)`` at the grid's unit axes (and the unit tail ``Flatten`` adds when ``X`` has
  rank ``k``).
* **Comparisons that a grid always satisfies.** ``GreaterOrEqual(g, c)`` with ``c <= c0`` and
  every ``c_j >= 0`` (dims are non-negative) is all-true; ``And(t, x)`` with ``t`` all-true (or a
  constant all-true) is ``x`` up to broadcasting (below).
* **Broadcasts nobody needs.** ``Expand(x, s)`` and ``And(all-true, x)`` are ``x`` broadcast to a
  larger shape. They are replaced by ``x`` when every reader is an elementwise op whose output
  shape does not change (its other operands already span that shape), following chains of
  elementwise readers whose shapes do change until one absorbs the broadcast (e.g. the
  ``[B,1,1,S]`` mask that an additive ``[B,H,S,S]`` score takes as well as ``[B,1,S,S]``). The
  shapes of the tensors on the way are updated.
* **Reshapes that only add or remove unit dims.** ``Reshape`` (after a chain of pure reshapes)
  whose known output shape is its chain source's known shape with 1s inserted or removed becomes
  ``Unsqueeze`` / ``Squeeze`` (constant axes) of the source, or the source itself: the shape
  tensor it read (``Shape(y)``, a ``Concat`` of dims) is no longer needed.

Nothing is rewritten when a shape is unknown; graph outputs keep their names and shapes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import numpy as np
import onnx_graphsurgeon as gs
import sympy

from graphopt.core.graph import bypass_node, insert_nodes, make_node, unique_name
from graphopt.core.model import Model, all_graph_output_ids
from graphopt.core.pass_manager import Pass, PassResult, register_pass
from graphopt.core.pattern import const_value, node_axes

logger = logging.getLogger(__name__)

Dim: TypeAlias = int | str
#: a sympy expression over dim names (sympy ships no type information)
Expr: TypeAlias = Any

#: elementwise ops with numpy broadcasting (every input), whose output shape is the broadcast
ELEMENTWISE = frozenset(
    {
        "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Mod", "And", "Or", "Xor", "Where",
        "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "BitShift", "Sum", "Mean",
    }
)  # fmt: skip
#: elementwise ops of one input (output shape = input shape)
UNARY = frozenset(
    {"Not", "Neg", "Cast", "Abs", "Relu", "Sigmoid", "Tanh", "Exp", "Log", "Sqrt", "Identity"}
)
PURE_RESHAPES = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze"})
DEFAULT_DOMAINS = ("", "ai.onnx", None)
INT_KINDS = "iu"
#: how many elementwise readers deep an unneeded broadcast is followed
SLACK_DEPTH = 8


def _known_dim(d: object) -> bool:
    if isinstance(d, (int, np.integer)):
        return int(d) >= 0
    return isinstance(d, str) and bool(d) and not d.startswith("unk__")


def known_shape(t: gs.Tensor) -> list[Dim] | None:
    """``t``'s shape when every dim is an int or a derived name (else None)."""
    if isinstance(t, gs.Constant):
        return [int(d) for d in t.values.shape]
    if t.shape is None or not all(_known_dim(d) for d in t.shape):
        return None
    return [int(d) if isinstance(d, (int, np.integer)) else str(d) for d in t.shape]


def broadcast(shapes: Sequence[Sequence[Dim]]) -> list[Dim] | None:
    """Numpy broadcast of known symbolic shapes; None when two dims may differ."""
    rank = max((len(s) for s in shapes), default=0)
    out: list[Dim] = []
    for k in range(rank):
        dim: Dim = 1
        for s in shapes:
            i = k - (rank - len(s))
            if i < 0:
                continue
            d = s[i]
            if d == 1 or d == dim:
                continue
            if dim == 1:
                dim = d
            else:
                return None
        out.append(dim)
    return out


def _dim_expr(d: Dim) -> Expr:
    return (
        sympy.Integer(d) if isinstance(d, int) else sympy.Symbol(d, integer=True, nonnegative=True)
    )


def _producer(t: gs.Tensor) -> gs.Node | None:
    if isinstance(t, gs.Constant) or len(t.inputs) != 1:
        return None
    n = t.inputs[0]
    return n if n.domain in DEFAULT_DOMAINS else None


@dataclass(frozen=True)
class Grid:
    """``g[i] = offset + sum(coef * i[axis])``; ``terms``: axis -> (length, coef); other axes 1."""

    rank: int
    offset: Expr
    terms: tuple[tuple[int, Expr, Expr], ...]  # (axis, length, coef), sorted by axis

    def shape(self) -> list[Expr]:
        dims: list[Expr] = [sympy.Integer(1)] * self.rank
        for a, n, _ in self.terms:
            dims[a] = n
        return dims


class _Analysis:
    """Memoized scalar and grid values of integer tensors."""

    def __init__(self) -> None:
        self._scalars: dict[int, Expr | None] = {}
        self._grids: dict[int, Grid | None] = {}

    def scalar(self, t: gs.Tensor) -> Expr | None:
        """The value of a one-element integer tensor as an expression of dim names."""
        key = id(t)
        if key not in self._scalars:
            self._scalars[key] = None  # cycles cannot happen in a DAG; guards re-entry anyway
            self._scalars[key] = self._scalar(t)
        return self._scalars[key]

    def _scalar(self, t: gs.Tensor) -> Expr | None:
        v = const_value(t)
        if v is not None:
            if v.size == 1 and v.dtype.kind in INT_KINDS:
                return sympy.Integer(int(v.reshape(-1)[0]))
            return None
        n = _producer(t)
        if n is None or len(n.outputs) != 1:
            return None
        if n.op == "Gather" and len(n.inputs) == 2:
            src, idx = n.inputs
            k = const_value(idx)
            sp = _producer(src)
            if k is None or k.size != 1 or sp is None or sp.op != "Shape":
                return None
            dims = sp.inputs[0].shape
            if dims is None:
                return None
            start = int(sp.attrs.get("start", 0))
            start = start + len(dims) if start < 0 else start
            i = int(k.reshape(-1)[0])
            end = int(sp.attrs.get("end", len(dims)))
            end = end + len(dims) if end < 0 else min(end, len(dims))
            width = end - start
            i = i + width if i < 0 else i
            if not 0 <= i < width or not _known_dim(dims[start + i]):
                return None
            d = dims[start + i]
            return _dim_expr(int(d) if isinstance(d, (int, np.integer)) else str(d))
        if n.op == "Shape":  # Shape(t, start=k, end=k+1): one dim
            dims = n.inputs[0].shape
            if dims is None:
                return None
            r = len(dims)
            start = int(n.attrs.get("start", 0))
            start = max(0, start + r if start < 0 else start)
            end = int(n.attrs.get("end", r))
            end = end + r if end < 0 else min(end, r)
            if end - start != 1 or not _known_dim(dims[start]):
                return None
            d = dims[start]
            return _dim_expr(int(d) if isinstance(d, (int, np.integer)) else str(d))
        if n.op in ("Unsqueeze", "Squeeze", "Reshape", "Identity", "Flatten"):
            return self.scalar(n.inputs[0])
        if n.op == "Cast":
            dt = n.outputs[0].dtype
            try:
                ok = dt is not None and np.dtype(dt).kind in INT_KINDS
            except TypeError:
                ok = False
            return self.scalar(n.inputs[0]) if ok else None
        if n.op in ("Mul", "Add", "Sub") and len(n.inputs) == 2:
            a, b = self.scalar(n.inputs[0]), self.scalar(n.inputs[1])
            if a is None or b is None:
                return None
            return a * b if n.op == "Mul" else a + b if n.op == "Add" else a - b
        return None

    def grid(self, t: gs.Tensor) -> Grid | None:
        """``t`` as an affine grid of Range indices (None when it is not one)."""
        key = id(t)
        if key not in self._grids:
            self._grids[key] = None
            self._grids[key] = self._grid(t)
        return self._grids[key]

    def _grid(self, t: gs.Tensor) -> Grid | None:
        if t.dtype is not None:
            try:
                if np.dtype(t.dtype).kind not in INT_KINDS:
                    return None
            except TypeError:
                return None
        n = _producer(t)
        if n is None or len(n.outputs) != 1:
            return None
        if n.op == "Range" and len(n.inputs) == 3:
            start, limit, delta = (self.scalar(x) for x in n.inputs)
            if start is None or limit is None or delta != 1 or start != 0:
                return None
            return Grid(1, sympy.Integer(0), ((0, limit, sympy.Integer(1)),))
        if n.op == "Unsqueeze":
            g = self.grid(n.inputs[0])
            axes = node_axes(n)
            if g is None or axes is None:
                return None
            rank = g.rank + len(axes)
            axes = sorted(a + rank if a < 0 else a for a in axes)
            if len(set(axes)) != len(axes) or any(not 0 <= a < rank for a in axes):
                return None
            kept = [a for a in range(rank) if a not in axes]  # old axis i -> kept[i]
            terms = tuple((kept[a], ln, c) for a, ln, c in g.terms)
            return Grid(rank, g.offset, terms)
        if n.op == "Cast":
            return self.grid(n.inputs[0])
        if n.op == "Mul" and len(n.inputs) == 2:
            for gi, si in ((0, 1), (1, 0)):
                g = self.grid(n.inputs[gi])
                s = self.scalar(n.inputs[si])
                other = n.inputs[si].shape
                if g is not None and s is not None and other is not None and len(other) <= g.rank:
                    return Grid(g.rank, g.offset * s, tuple((a, ln, c * s) for a, ln, c in g.terms))
            return None
        if n.op == "Add" and len(n.inputs) == 2:
            ga, gb = self.grid(n.inputs[0]), self.grid(n.inputs[1])
            if ga is not None and gb is not None:
                rank = max(ga.rank, gb.rank)
                merged: dict[int, tuple[Expr, Expr]] = {}
                for g in (ga, gb):
                    for a, ln, c in g.terms:
                        a += rank - g.rank
                        if a in merged:
                            if sympy.simplify(merged[a][0] - ln) != 0:
                                return None
                            merged[a] = (ln, merged[a][1] + c)
                        else:
                            merged[a] = (ln, c)
                return Grid(
                    rank,
                    ga.offset + gb.offset,
                    tuple((a, ln, c) for a, (ln, c) in sorted(merged.items())),
                )
            for gi, si in ((0, 1), (1, 0)):
                g = self.grid(n.inputs[gi])
                s = self.scalar(n.inputs[si])
                other = n.inputs[si].shape
                if g is not None and s is not None and other is not None and len(other) <= g.rank:
                    return Grid(g.rank, g.offset + s, g.terms)
        return None


def _is_nonneg(e: Expr) -> bool:
    return bool(e.is_nonnegative)


def _same(a: Expr, b: Expr) -> bool:
    return sympy.simplify(a - b) == 0


@register_pass
class SimplifySymbolicShapesPass(Pass):
    """Fold run-time index grids, unneeded broadcasts and unit-dim reshapes of dynamic shapes."""

    name = "simplify-symbolic-shapes"

    def call(self, model: Model) -> PassResult:
        stats: dict[str, int] = {}
        escaping = all_graph_output_ids(model)
        for g in model.walk_graphs():
            _Sweep(g, escaping, stats, model.opset).run()
        return PassResult(model, modified=bool(stats), stats=stats)


class _Sweep:
    def __init__(
        self, graph: gs.Graph, escaping: set[int], stats: dict[str, int], opset: int
    ) -> None:
        self.graph = graph
        self.opset = opset
        self.escaping = escaping
        self.stats = stats
        self.an = _Analysis()
        self.all_true: set[int] = set()
        self.new: list[gs.Node] = []
        self.dead: set[int] = set()

    def count(self, key: str) -> None:
        self.stats[key] = self.stats.get(key, 0) + 1

    def run(self) -> None:
        for node in list(self.graph.nodes):
            if id(node) in self.dead or node.domain not in DEFAULT_DOMAINS:
                continue
            if len(node.outputs) != 1:
                continue
            if not node.outputs[0].outputs and id(node.outputs[0]) not in self.escaping:
                continue  # dead: eliminate-dead removes it
            if node.op == "Gather":
                self._gather(node)
            elif node.op == "GreaterOrEqual":
                self._compare(node)
            elif node.op == "And":
                self._and(node)
            elif node.op == "Expand":
                self._expand(node)
            elif node.op == "Reshape":
                self._reshape(node)
            elif node.op == "Unsqueeze":
                self._unsqueeze(node)
        if self.new or self.dead:
            nodes = [n for n in self.graph.nodes if id(n) not in self.dead]
            self.graph.nodes = nodes
            if self.new:
                insert_nodes(self.graph, self.new)

    # -- replacing a node's output ------------------------------------------------------------
    def _replace(self, node: gs.Node, op: str, src: gs.Tensor, axes: list[int] | None) -> None:
        """Make ``node`` compute ``op(src, axes)`` (Unsqueeze/Squeeze) into its own output."""
        out = node.outputs[0]
        node.inputs.clear()
        node.outputs.clear()
        self.dead.add(id(node))
        inputs = [src]
        attrs: dict[str, object] = {}
        if axes is not None and self.opset >= 13:
            inputs.append(gs.Constant(unique_name(f"{out.name}_axes"), np.asarray(axes, np.int64)))
        elif axes is not None:
            attrs["axes"] = list(axes)
        self.new.append(make_node(op, inputs, [out], attrs=attrs, name=out.name))

    def _bypass(
        self, node: gs.Node, src: gs.Tensor, updates: list[tuple[gs.Tensor, list[Dim]]]
    ) -> bool:
        if id(node.outputs[0]) in self.escaping:
            return False
        if not bypass_node(self.graph, node, src):
            return False
        for t, shape in updates:  # only once the rewrite is made
            t.shape = list(shape)
        self.dead.add(id(node))
        return True

    # -- the rewrites ---------------------------------------------------------------------------
    def _gather(self, node: gs.Node) -> None:
        if int(node.attrs.get("axis", 0)) != 0 or len(node.inputs) != 2:
            return
        data, idx = node.inputs
        if self._gather_arange(node, data, idx):
            return
        g = self.an.grid(idx)
        fl = _producer(data)
        if g is None or fl is None or fl.op != "Flatten" or not _same(g.offset, sympy.Integer(0)):
            return
        x = fl.inputs[0]
        xs = known_shape(x)
        if xs is None:
            return
        k = int(fl.attrs.get("axis", 1))
        k = k + len(xs) if k < 0 else k
        lead, tail = xs[:k], xs[k:]
        if len(tail) > 1 or len(g.terms) != len(lead) or not lead:
            return
        stride = sympy.Integer(1)
        for (_, ln, c), d in zip(reversed(g.terms), reversed(lead)):
            if not (_same(ln, _dim_expr(d)) and _same(c, stride)):
                return
            stride = stride * _dim_expr(d)
        grid_axes = {a for a, _, _ in g.terms}
        axes = [a for a in range(g.rank) if a not in grid_axes]
        if not tail:
            axes.append(g.rank)  # Flatten's unit second dim
        self._replace(node, "Unsqueeze", x, axes)
        self.count("gather_index_grid")

    def _gather_arange(self, node: gs.Node, data: gs.Tensor, idx: gs.Tensor) -> bool:
        """``Gather(C, Slice(arange, 0, n))`` -> ``Unsqueeze(Slice(C, 0, n))``."""
        sl = _producer(idx)
        if self.opset < 13 or sl is None or sl.op != "Slice" or len(sl.inputs) < 3:
            return False
        a = const_value(sl.inputs[0])
        if a is None or a.dtype.kind not in INT_KINDS or a.ndim < 1 or a.size != a.shape[-1]:
            return False
        if not np.array_equal(a.reshape(-1), np.arange(a.size)):
            return False
        starts = const_value(sl.inputs[1])
        axes = (
            const_value(sl.inputs[3])
            if len(sl.inputs) > 3 and not sl.inputs[3].is_empty()
            else None
        )
        steps = (
            const_value(sl.inputs[4])
            if len(sl.inputs) > 4 and not sl.inputs[4].is_empty()
            else None
        )
        ends = sl.inputs[2]
        rank = a.ndim
        if starts is None or starts.size != 1 or int(starts.reshape(-1)[0]) != 0:
            return False
        if (
            axes is None
            and rank != 1
            or axes is not None
            and (axes.size != 1 or int(axes.reshape(-1)[0]) % rank != rank - 1)
        ):
            return False
        if steps is not None and (steps.size != 1 or int(steps.reshape(-1)[0]) != 1):
            return False
        if ends.shape is None or list(ends.shape) != [1]:
            return False
        out = node.outputs[0]
        os_ = known_shape(out)
        if os_ is None or len(os_) < rank:
            return False
        zero = gs.Constant(unique_name("slice_start"), np.zeros(1, np.int64))
        axis0 = gs.Constant(unique_name("slice_axis"), np.zeros(1, np.int64))
        if rank == 1:
            self._retarget(node, "Slice", [data, zero, ends, axis0])
        else:
            part = gs.Variable(
                unique_name(f"{out.name}_rows"), dtype=out.dtype, shape=os_[rank - 1 :]
            )
            self.new.append(make_node("Slice", [data, zero, ends, axis0], [part]))
            self._replace(node, "Unsqueeze", part, list(range(rank - 1)))
        self.count("gather_arange_slice")
        return True

    def _retarget(self, node: gs.Node, op: str, inputs: list[gs.Tensor]) -> None:
        out = node.outputs[0]
        node.inputs.clear()
        node.outputs.clear()
        self.dead.add(id(node))
        self.new.append(make_node(op, inputs, [out], name=out.name))

    def _unsqueeze(self, node: gs.Node) -> None:
        """``Unsqueeze(Gather(Shape(t), k), [0])`` -> ``Shape(t, start=k, end=k+1)``; an
        Unsqueeze of leading axes that every reader broadcasts anyway is dropped."""
        x = node.inputs[0]
        axes = node_axes(node)
        if axes is None:
            return
        g = _producer(x)
        if (
            self.opset >= 15
            and axes in ([0], [-1])
            and g is not None
            and g.op == "Gather"
            and int(g.attrs.get("axis", 0)) == 0
            and x.shape is not None
            and len(x.shape) == 0
        ):
            sp = _producer(g.inputs[0])
            k = const_value(g.inputs[1])
            if sp is not None and sp.op == "Shape" and k is not None and k.size == 1:
                t = sp.inputs[0]
                if t.shape is not None:
                    r = len(t.shape)
                    start = int(sp.attrs.get("start", 0))
                    start = start + r if start < 0 else start
                    end = int(sp.attrs.get("end", r))
                    end = end + r if end < 0 else min(end, r)
                    i = int(k.reshape(-1)[0])
                    i = i + (end - start) if i < 0 else i
                    if 0 <= i < end - start:
                        out = node.outputs[0]
                        node.inputs.clear()
                        node.outputs.clear()
                        self.dead.add(id(node))
                        self.new.append(
                            make_node(
                                "Shape",
                                [t],
                                [out],
                                attrs={"start": start + i, "end": start + i + 1},
                                name=out.name,
                            )
                        )
                        self.count("shape_slice")
                        return
        xs = known_shape(x)
        if xs is None:
            return
        rank = len(xs) + len(axes)
        norm = sorted(a + rank if a < 0 else a for a in axes)
        if norm != list(range(len(norm))):
            return
        updates = self._slack(node.outputs[0], xs)
        if updates is not None and self._bypass(node, x, updates):
            self.count("unsqueeze_unneeded")

    def _compare(self, node: gs.Node) -> None:
        g = self.an.grid(node.inputs[0])
        c = self.an.scalar(node.inputs[1])
        if g is None or c is None or not _is_nonneg(g.offset - c):
            return
        if all(_is_nonneg(coef) for _, _, coef in g.terms):
            self.all_true.add(id(node.outputs[0]))

    def _true(self, t: gs.Tensor) -> bool:
        v = const_value(t)
        if v is not None:
            return v.dtype == np.bool_ and bool(v.all())
        return id(t) in self.all_true

    def _and(self, node: gs.Node) -> None:
        a, b = node.inputs
        out = node.outputs[0]
        if self._true(a) and self._true(b):
            self.all_true.add(id(out))
            return
        for t, x in ((a, b), (b, a)):
            if self._true(t):
                xs = known_shape(x)
                updates = self._slack(out, xs) if xs is not None else None
                if updates is not None and self._bypass(node, x, updates):
                    self.count("and_all_true")
                return

    def _expand(self, node: gs.Node) -> None:
        x = node.inputs[0]
        xs = known_shape(x)
        if xs is None:
            return
        updates = self._slack(node.outputs[0], xs)
        if updates is not None and self._bypass(node, x, updates):
            self.count("expand_unneeded")

    def _slack(
        self, t: gs.Tensor, shape: list[Dim], depth: int = 0
    ) -> list[tuple[gs.Tensor, list[Dim]]] | None:
        """Shape updates that let ``t`` take ``shape`` (which broadcasts to ``t``'s shape) without
        changing any result; None when some reader needs the broadcast."""
        ts = known_shape(t)
        if ts is None or depth > SLACK_DEPTH:
            return None
        if ts == shape:
            return []
        if id(t) in self.escaping:
            return None
        if broadcast([shape, ts]) != ts:
            return None
        updates: list[tuple[gs.Tensor, list[Dim]]] = [(t, shape)]
        for reader in t.outputs:
            if reader.domain not in DEFAULT_DOMAINS or len(reader.outputs) != 1:
                return None
            out = reader.outputs[0]
            if reader.op == "Expand" and reader.inputs[0] is t:
                # it still broadcasts to its own shape when its target shape is that shape
                target = self._shape_value(reader.inputs[1])
                if target is None or broadcast([shape, target]) != known_shape(out):
                    return None
                continue
            if reader.op in UNARY:
                more = self._slack(out, shape, depth + 1)
            elif reader.op in ELEMENTWISE:
                shapes = []
                for i in reader.inputs:
                    s = shape if i is t else known_shape(i)
                    if s is None:
                        return None
                    shapes.append(s)
                new = broadcast(shapes)
                if new is None:
                    return None
                more = self._slack(out, new, depth + 1)
            else:
                return None
            if more is None:
                return None
            updates += more
        return updates

    def _shape_value(self, t: gs.Tensor) -> list[Dim] | None:
        """The value of a 1-D shape tensor as known dims: a constant, ``Shape(x)`` of a known
        shape, or a Concat of such parts and one-element dims; None otherwise."""
        v = const_value(t)
        if v is not None:
            return [int(x) for x in v.reshape(-1)] if v.dtype.kind in INT_KINDS else None
        n = _producer(t)
        if n is None:
            return None
        if n.op == "Shape" and not n.attrs.get("start") and "end" not in n.attrs:
            return known_shape(n.inputs[0])
        if n.op != "Concat" or int(n.attrs.get("axis", 0)) not in (0, -1):
            return None
        out: list[Dim] = []
        for part in n.inputs:
            pv = const_value(part)
            if pv is not None:
                out += [int(x) for x in pv.reshape(-1)]
                continue
            e = self.an.scalar(part)
            if e is None or not (e.is_Integer or e.is_Symbol):
                return None
            out.append(int(e) if e.is_Integer else str(e))
        return out

    def _reshape(self, node: gs.Node) -> None:
        out = node.outputs[0]
        os_ = known_shape(out)
        if os_ is None:
            return
        src = node.inputs[0]
        while True:  # the start of a chain of pure reshapes
            p = _producer(src)
            if p is None or p.op not in PURE_RESHAPES or len(p.outputs) != 1:
                break
            src = p.inputs[0]
        ss = known_shape(src)
        if ss is None:
            return
        if ss == os_:
            if self._bypass(node, src, []):
                self.count("reshape_identity")
            return
        a = [d for d in ss if d != 1]
        b = [d for d in os_ if d != 1]
        if a != b:
            return
        # squeeze every unit dim of the source, then insert the output's unit dims
        squeeze = [i for i, d in enumerate(ss) if d == 1]
        unsq = [i for i, d in enumerate(os_) if d == 1]
        if not squeeze:
            self._replace(node, "Unsqueeze", src, unsq)
        elif not unsq:
            self._replace(node, "Squeeze", src, squeeze)
        else:
            return  # both ways: left to eliminate-noop's static rules
        self.count("reshape_unit_dims")
