"""Channel-dependency analysis for structured pruning of ONNX graphs.

Every output channel of a *producer* (Conv, ConvTranspose, Gemm, MatMul with a constant weight) is
an *element*. Walking the graph in topological order, each tensor that carries channels gets a label
array along one axis: ``labels[i]`` is the element that position ``i`` of that axis holds, or -1
for a position that no producer owns (graph inputs, constants). Handlers (one per op type, table
``HANDLERS``) map labels from inputs to outputs:

* identity along the axis: activations, BatchNormalization, pooling, Resize, Pad, depthwise convs
  (group == channels), Transpose (axis permuted), Squeeze/Unsqueeze, Reduce*/Softmax on other axes;
* offsets and segments: Concat on the channel axis concatenates label arrays, Split and Slice cut
  them (their size/start/end constants are rewritten);
* channel blocks: Flatten/Reshape that merge the channel axis with the following dims repeat each
  label over the block (``np.tile(np.repeat(labels, inner), outer)``), so a Gemm/MatMul consumer
  drops whole row blocks; a Reshape target that hard-codes the merged width (a constant, or a piece
  of a ``Concat``-built shape vector as in the PP-OCR classifier head) is rewritten;
* ties: elementwise ops with several labelled inputs (residual Add, squeeze-excitation Mul) union
  their elements position by position (union-find); a per-channel constant operand (bias, BN
  parameter, PRelu slope, Paddle's ``Reshape(Constant)`` SE bias) is sliced along the same labels.

A *unit* is a union-find class of elements: removing it removes one position from every tensor that
holds one of its elements and the matching slice of every weight. A unit tied to the special FIXED
element cannot be removed: it reaches a graph output, an op with no handler, a channel-mixing op
that is not a weight layer (LayerNorm over channels, Softmax over channels, ...), or a shape
computation that cannot be rewritten; each such block keeps its reason. A *group* is a connected
component of producers sharing units (networkx), the thing the report lists.

Removal is exact when the removed channels are zero: consumers' weights for those input channels are
dropped, producers' weights, biases and BN parameters for them are dropped, and every hard-coded
width is rewritten. ``zero_pruned`` builds that zeroed original for the exactness tests.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt.core.model import Model

logger = logging.getLogger(__name__)

Labels = np.ndarray  # int64, -1 = position owned by no producer


# ---------------------------------------------------------------------------------- constants
_CONST_OPS = {"Constant", "Identity", "Cast", "Reshape", "Unsqueeze", "Squeeze", "Transpose",
              "Flatten", "Concat", "Add", "Sub", "Mul", "Div", "Neg"}


def const_value(t: gs.Tensor | None, _depth: int = 0) -> np.ndarray | None:
    """The value of ``t`` when it is a constant or a small constant subgraph (Constant nodes,
    Reshape or Cast of constants, ...); None when it depends on a graph input."""
    if t is None:
        return None
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    if not t.inputs or _depth > 8:
        return None
    node = t.inputs[0]
    if node.op not in _CONST_OPS or node.domain not in ("", "ai.onnx", None):
        return None
    if node.op == "Constant":
        a = node.attrs
        if "value" in a:
            v = a["value"]
            return np.asarray(v.values if isinstance(v, gs.Constant) else v)
        for k, dt in (("value_float", np.float32), ("value_floats", np.float32),
                      ("value_int", np.int64), ("value_ints", np.int64)):
            if k in a:
                return np.asarray(a[k], dtype=dt)
        return None
    vals = []
    for i in node.inputs:
        v = const_value(i, _depth + 1)
        if v is None:
            return None
        vals.append(v)
    try:
        return _eval_const(node, vals)
    except Exception as exc:  # noqa: BLE001 - an odd constant subgraph is simply not a constant
        logger.debug("cannot evaluate constant %s (%s): %s", t.name, node.op, exc)
        return None


def _eval_const(node: gs.Node, v: list[np.ndarray]) -> np.ndarray | None:
    op = node.op
    if op == "Identity":
        return v[0]
    if op == "Cast":
        return v[0].astype(onnx.helper.tensor_dtype_to_np_dtype(node.attrs["to"]))
    if op == "Reshape":
        shape = [int(d) for d in v[1]]
        shape = [v[0].shape[i] if d == 0 and not node.attrs.get("allowzero", 0) else d
                 for i, d in enumerate(shape)]
        return v[0].reshape(shape)
    if op == "Unsqueeze":
        axes = v[1] if len(v) > 1 else node.attrs["axes"]
        out = v[0]
        rank = out.ndim + len(axes)
        for a in sorted(int(x) % rank for x in axes):
            out = np.expand_dims(out, a)
        return out
    if op == "Squeeze":
        axes = v[1] if len(v) > 1 else node.attrs.get("axes")
        if axes is None:
            return np.squeeze(v[0])
        return np.squeeze(v[0], axis=tuple(int(a) for a in axes))
    if op == "Transpose":
        return np.transpose(v[0], node.attrs.get("perm"))
    if op == "Flatten":
        ax = int(node.attrs.get("axis", 1)) % max(v[0].ndim, 1)
        return v[0].reshape(int(np.prod(v[0].shape[:ax])), -1)
    if op == "Concat":
        return np.concatenate(v, axis=int(node.attrs["axis"]))
    if op == "Neg":
        return -v[0]
    fn = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}[op]
    return fn(v[0], v[1]).astype(v[0].dtype)


def _shape(t: gs.Tensor) -> tuple[int, ...] | None:
    s = t.shape
    if s is None or not all(isinstance(d, (int, np.integer)) and d >= 0 for d in s):
        return None
    return tuple(int(d) for d in s)


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
class ShapeFix:
    """A hard-coded width to rewrite: ``kind`` says how (see ``apply_pruning``)."""

    kind: str  # reshape | split | slice | resize | group
    node: gs.Node
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Analysis:
    """Result of :func:`analyze`."""

    producers: list[Producer]
    n_elements: int
    parent: np.ndarray  # union-find over elements + FIXED (last)
    labels: dict[str, tuple[int, Labels]]
    slices: list[ConstSlice]
    fixes: list[ShapeFix]
    blocks: list[tuple[Labels, str]]
    touched: dict[str, list[Labels]]  # compute node name -> labels it depends on
    gammas: list[tuple[Labels, np.ndarray]]  # BN gamma per labelled position
    coupled: np.ndarray | None = None  # per element: class under ties alone (FIXED ignored)

    @property
    def fixed(self) -> int:
        return self.n_elements

    def root(self) -> np.ndarray:
        """Canonical unit id of every element (and FIXED) after full path compression."""
        p = self.parent
        while True:
            q = p[p]
            if np.array_equal(q, p):
                return p
            p = q


class _UF:
    def __init__(self) -> None:
        self.p: list[int] = []

    def add(self, n: int) -> int:
        s = len(self.p)
        self.p.extend(range(s, s + n))
        return s

    def find(self, a: int) -> int:
        p = self.p
        while p[a] != a:
            p[a] = p[p[a]]
            a = p[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            if ra < rb:
                ra, rb = rb, ra
            self.p[rb] = ra  # the larger id wins, so FIXED (largest) is always a root


class _Ctx:
    """Analysis state handed to the op handlers."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.uf = _UF()
        self.fixed_pending: list[tuple[Labels, str]] = []
        self.labels: dict[str, tuple[int, Labels]] = {}
        self.producers: list[Producer] = []
        self.slices: list[ConstSlice] = []
        self.fixes: list[ShapeFix] = []
        self.ties: list[tuple[Labels, Labels]] = []
        self.touched: dict[str, list[Labels]] = defaultdict(list)
        self.gammas: list[tuple[Labels, np.ndarray]] = []

    # -- labels
    def get(self, t: gs.Tensor | None) -> tuple[int, Labels] | None:
        if t is None or not t.name:
            return None
        return self.labels.get(t.name)

    def set(self, t: gs.Tensor, axis: int, labels: Labels) -> None:
        if (labels >= 0).any():
            self.labels[t.name] = (axis, labels)

    def new_source(self, node: gs.Node, kind: str, size: int, out: gs.Tensor, weight: np.ndarray,
                   weight_axis: int) -> Labels:
        start = self.uf.add(size)
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
        v = const_value(t)
        if v is None or v.ndim == 0:
            return False
        axis = axis % v.ndim
        if v.shape[axis] != len(labels):
            return False
        self.slices.append(ConstSlice(node, index, axis, labels, role))
        return True

    def touch(self, node: gs.Node, labels: Labels) -> None:
        self.touched[node.name].append(labels)


Handler = Callable[[_Ctx, gs.Node], None]
HANDLERS: dict[str, Handler] = {}


def handles(*ops: str) -> Callable[[Handler], Handler]:
    def deco(fn: Handler) -> Handler:
        for op in ops:
            HANDLERS[op] = fn
        return fn
    return deco


def _rank(t: gs.Tensor) -> int | None:
    return len(t.shape) if t.shape is not None else None


# ---------------------------------------------------------------------------------- handlers
#: ops that act on the spatial axes (>= 2) of an NCHW tensor and pass the channel axis through
_SPATIAL_OPS = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool",
                          "GlobalLpPool", "Upsample", "Resize"})


@handles("Relu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "LeakyRelu", "Elu", "Selu",
         "Celu", "Softplus", "Softsign", "Erf", "Exp", "Log", "Abs", "Neg", "Sqrt", "Reciprocal",
         "Identity", "Cast", "Dropout", "Gelu", "Mish", "Floor", "Ceil", "Round", "Sign", "Sin",
         "Cos", "ThresholdedRelu", "Shrink", "IsNaN", "IsInf", "Not", "MaxPool", "AveragePool",
         "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool", "Upsample", "Resize")
def _passthrough(ctx: _Ctx, node: gs.Node) -> None:
    lab = ctx.get(node.inputs[0]) if node.inputs else None
    others = [ctx.get(i) for i in node.inputs[1:]]
    if any(o is not None for o in others):
        ctx.block_inputs(node, f"{node.op} '{node.name}' takes channels in a parameter input")
        return
    if lab is None:
        return
    axis, labels = lab
    if node.op in _SPATIAL_OPS and axis != 1:
        # pooling and resizing work on axes >= 2: labels there would be pooled, not passed
        ctx.block(labels, f"{node.op} '{node.name}' acts on the labelled axis {axis}")
        return
    if node.op == "MaxPool" and len(node.outputs) > 1 and node.outputs[1].outputs:
        ctx.block(labels, f"MaxPool '{node.name}' indices output is used")
        return
    if node.op in ("Resize", "Upsample") and len(node.inputs) >= 4 and node.inputs[3].name:
        sizes = const_value(node.inputs[3])
        if sizes is None:
            ctx.block(labels, f"Resize '{node.name}' has runtime sizes")
            return
        ctx.fixes.append(ShapeFix("resize", node, {"axis": axis, "labels": labels}))
    ctx.set(node.outputs[0], axis, labels)


@handles("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu", "Equal",
         "Greater", "Less", "And", "Or", "Where")
def _elementwise(ctx: _Ctx, node: gs.Node) -> None:
    out = node.outputs[0]
    out_rank = _rank(out)
    labelled = [(i, t, ctx.get(t)) for i, t in enumerate(node.inputs)]
    labelled = [(i, t, lab) for i, t, lab in labelled if lab is not None]
    if not labelled:
        return
    if out_rank is None or any(_rank(t) is None for _, t, _ in labelled):
        ctx.block_inputs(node, f"{node.op} '{node.name}': unknown ranks")
        return
    axes = {lab[0] + out_rank - _rank(t) for _, t, lab in labelled}  # type: ignore[operator]
    if len(axes) != 1:
        ctx.block_inputs(node, f"{node.op} '{node.name}' mixes channels of different axes")
        return
    axis = axes.pop()
    labels = labelled[0][2][1]
    for _, _, lab in labelled[1:]:
        if len(lab[1]) != len(labels):
            ctx.block_inputs(node, f"{node.op} '{node.name}' broadcasts a channel axis")
            return
        ctx.tie(labels, lab[1])
    done = {i for i, _, _ in labelled}
    for i, t in enumerate(node.inputs):
        if i in done or not t.name:
            continue
        shp = t.shape if isinstance(t, gs.Variable) else np.shape(t.values)
        if shp is None:
            v = const_value(t)
            shp = None if v is None else v.shape
        if shp is None:
            ctx.block(labels, f"{node.op} '{node.name}': operand '{t.name}' has unknown shape")
            return
        ax = axis - (out_rank - len(shp))
        if ax < 0 or shp[ax] == 1:
            continue
        role = "bias" if node.op in ("Add", "Sub") else "scale" if node.op in ("Mul", "PRelu") \
            else "other"
        if not ctx.slice_const(node, i, ax, labels, role):
            ctx.block(labels, f"{node.op} '{node.name}' ties channels to the unprunable tensor "
                              f"'{t.name}'")
            return
    ctx.set(out, axis, labels)


@handles("BatchNormalization", "InstanceNormalization")
def _norm(ctx: _Ctx, node: gs.Node) -> None:
    lab = ctx.get(node.inputs[0])
    if lab is None:
        return
    axis, labels = lab
    if axis != 1:
        ctx.block(labels, f"{node.op} '{node.name}' normalizes another axis")
        return
    n_params = 4 if node.op == "BatchNormalization" else 2
    for i in range(1, 1 + n_params):
        if not ctx.slice_const(node, i, 0, labels, "bn"):
            ctx.block(labels, f"{node.op} '{node.name}' has a non-constant parameter")
            return
    g = const_value(node.inputs[1])
    if g is not None:
        ctx.gammas.append((labels, np.abs(g.astype(np.float64))))
    ctx.set(node.outputs[0], axis, labels)


@handles("LayerNormalization", "MeanVarianceNormalization", "LpNormalization")
def _layer_norm(ctx: _Ctx, node: gs.Node) -> None:
    lab = ctx.get(node.inputs[0])
    if lab is None:
        return
    axis, labels = lab
    rank = _rank(node.inputs[0]) or 0
    if node.op == "LayerNormalization":
        a = int(node.attrs.get("axis", -1)) % rank
        axes = set(range(a, rank))
    elif node.op == "LpNormalization":
        axes = {int(node.attrs.get("axis", -1)) % rank}
    else:
        axes = {int(x) % rank for x in node.attrs.get("axes", [0, 2, 3])}
    if axis in axes:
        ctx.block(labels, f"{node.op} '{node.name}' normalizes over the channel axis")
        return
    if any(ctx.get(i) is not None for i in node.inputs[1:]):
        ctx.block(labels, f"{node.op} '{node.name}' takes channels in a parameter")
        return
    ctx.set(node.outputs[0], axis, labels)


def _axes_of(node: gs.Node, index: int, attr: str) -> list[int] | None:
    if attr in node.attrs:
        return [int(a) for a in node.attrs[attr]]
    if len(node.inputs) > index and node.inputs[index].name:
        v = const_value(node.inputs[index])
        return None if v is None else [int(a) for a in np.atleast_1d(v)]
    return []


@handles("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
         "ReduceL2", "ReduceSumSquare", "ReduceLogSum", "ReduceLogSumExp", "ArgMax", "ArgMin")
def _reduce(ctx: _Ctx, node: gs.Node) -> None:
    lab = ctx.get(node.inputs[0])
    if lab is None:
        return
    axis, labels = lab
    rank = _rank(node.inputs[0])
    if node.op in ("ArgMax", "ArgMin"):
        axes: list[int] | None = [int(node.attrs.get("axis", 0))]
    else:
        axes = _axes_of(node, 1, "axes")
    if rank is None or axes is None:
        ctx.block(labels, f"{node.op} '{node.name}' has runtime axes")
        return
    axes = [a % rank for a in axes] if axes else (
        [] if node.attrs.get("noop_with_empty_axes", 0) else list(range(rank)))
    if axis in axes:
        ctx.block(labels, f"{node.op} '{node.name}' reduces over the channel axis")
        return
    keep = int(node.attrs.get("keepdims", 1))
    new_axis = axis if keep else axis - sum(1 for a in axes if a < axis)
    ctx.set(node.outputs[0], new_axis, labels)


@handles("Softmax", "LogSoftmax", "Hardmax")
def _softmax(ctx: _Ctx, node: gs.Node) -> None:
    lab = ctx.get(node.inputs[0])
    if lab is None:
        return
    axis, labels = lab
    rank = _rank(node.inputs[0]) or 1
    opset = ctx.model.opset
    a = int(node.attrs.get("axis", -1 if opset >= 13 else 1)) % rank
    if axis == a or (opset < 13 and axis >= a):
        ctx.block(labels, f"{node.op} '{node.name}' normalizes over the channel axis")
        return
    ctx.set(node.outputs[0], axis, labels)


@handles("Transpose")
def _transpose(ctx: _Ctx, node: gs.Node) -> None:
    lab = ctx.get(node.inputs[0])
    if lab is None:
        return
    axis, labels = lab
    rank = _rank(node.inputs[0]) or 0
    perm = list(node.attrs.get("perm", list(range(rank))[::-1]))
    ctx.set(node.outputs[0], perm.index(axis), labels)


@handles("Squeeze", "Unsqueeze")
def _squeeze(ctx: _Ctx, node: gs.Node) -> None:
    lab = ctx.get(node.inputs[0])
    if lab is None:
        return
    axis, labels = lab
    rank = _rank(node.inputs[0])
    axes = _axes_of(node, 1, "axes")
    if rank is None or axes is None or (node.op == "Squeeze" and not axes):
        ctx.block(labels, f"{node.op} '{node.name}' has unknown axes")
        return
    if node.op == "Squeeze":
        axes = [a % rank for a in axes]
        if axis in axes:
            ctx.block(labels, f"Squeeze '{node.name}' removes the channel axis")
            return
        ctx.set(node.outputs[0], axis - sum(1 for a in axes if a < axis), labels)
    else:
        out_rank = rank + len(axes)
        new = axis
        for a in sorted(x % out_rank for x in axes):
            if a <= new:
                new += 1
        ctx.set(node.outputs[0], new, labels)


def _merge_labels(in_shape: tuple[int, ...], axis: int, labels: Labels,
                  out_shape: tuple[int, ...]) -> tuple[int, Labels] | None:
    """Where the channel axis lands after a reshape, and its label array (channel blocks)."""
    prefix = int(np.prod(in_shape[:axis]))
    b, acc = 0, 1
    while b < len(out_shape) and acc < prefix:
        acc *= out_shape[b]
        b += 1
    if acc != prefix or b >= len(out_shape):
        return None  # the outer dims are regrouped with the channel axis: not a channel block
    # absorb size-1 output dims before the channel block
    while b < len(out_shape) - 1 and out_shape[b] == 1 and in_shape[axis] != 1:
        b += 1
    c = in_shape[axis]
    inner = 1
    j = axis + 1
    while out_shape[b] != c * inner:
        if j >= len(in_shape) or c * inner > out_shape[b]:
            return None
        inner *= in_shape[j]
        j += 1
    return b, np.repeat(labels, inner)


@handles("Reshape", "Flatten")
def _reshape(ctx: _Ctx, node: gs.Node) -> None:
    lab = ctx.get(node.inputs[0])
    if lab is None:
        return
    axis, labels = lab
    in_shape, out_shape = _shape(node.inputs[0]), _shape(node.outputs[0])
    if in_shape is None or out_shape is None:
        ctx.block(labels, f"{node.op} '{node.name}' has unknown shapes")
        return
    if node.op == "Flatten":
        k = int(node.attrs.get("axis", 1)) % max(len(in_shape), 1)
        if axis < k:
            ctx.block(labels, f"Flatten '{node.name}' merges channels into the batch axis")
            return
        outer = int(np.prod(in_shape[k:axis]))
        inner = int(np.prod(in_shape[axis + 1:]))
        ctx.set(node.outputs[0], 1, np.tile(np.repeat(labels, inner), outer))
        return
    got = _merge_labels(in_shape, axis, labels, out_shape)
    if got is None:
        ctx.block(labels, f"Reshape '{node.name}' splits the channel axis {in_shape}->{out_shape}")
        return
    b, out_labels = got
    # the target shape must be rewritable at position b
    plan = _shape_vector_plan(node.inputs[1], b, ctx, out_labels)
    if plan is None:
        ctx.block(labels, f"Reshape '{node.name}': its shape computation cannot be rewritten")
        return
    if plan != "keep":
        ctx.fixes.append(ShapeFix("reshape", node, {"pos": b, "labels": out_labels, "plan": plan}))
    ctx.set(node.outputs[0], b, out_labels)


def _runtime_dim(ctx: _Ctx, piece: gs.Tensor, k: int, labels: Labels) -> bool:
    """True when entry ``k`` of ``piece`` is read at run time from a dim that carries ``labels``
    (``Shape(t)`` or ``Slice(Shape(t), a, b)``): it follows the pruned width by itself."""
    node = piece.inputs[0] if piece.inputs else None
    start = 0
    if node is not None and node.op == "Slice" and len(node.inputs) >= 3:
        st, en = const_value(node.inputs[1]), const_value(node.inputs[2])
        n_in = len(node.inputs)
        axes = const_value(node.inputs[3]) if n_in > 3 and node.inputs[3].name else None
        steps = const_value(node.inputs[4]) if n_in > 4 and node.inputs[4].name else None
        if st is None or en is None or (axes is not None and int(np.ravel(axes)[0]) != 0) or \
                (steps is not None and int(np.ravel(steps)[0]) != 1):
            return False
        start = int(np.ravel(st)[0])
        node = node.inputs[0].inputs[0] if node.inputs[0].inputs else None
    if node is None or node.op != "Shape":
        return False
    start += int(node.attrs.get("start", 0))
    src = ctx.get(node.inputs[0])
    return src is not None and src[0] == start + k and np.array_equal(src[1], labels)


def _shape_vector_plan(t: gs.Tensor, pos: int, ctx: _Ctx | None = None,
                       labels: Labels | None = None) -> Any:
    """How to rewrite entry ``pos`` of a shape vector: 'keep' (entry is -1, or read at run time
    from the pruned tensor's shape), ('const', pos) for a constant vector, ('concat', input_index,
    offset) for a constant piece of a Concat-built vector, or None."""
    v = const_value(t)
    if v is not None:
        v = np.atleast_1d(v)
        if pos < len(v) and int(v[pos]) == -1:
            return "keep"
        return ("const", pos)
    node = t.inputs[0] if t.inputs else None
    if node is None or node.op != "Concat":
        return None
    off = 0
    for k, piece in enumerate(node.inputs):
        pv = const_value(piece)
        n = len(np.atleast_1d(pv)) if pv is not None else (
            int(np.prod(_shape(piece) or (-1,))) if _shape(piece) is not None else None)
        if n is None or n < 0:
            return None
        if off <= pos < off + n:
            if pv is None:
                if ctx is not None and labels is not None and \
                        _runtime_dim(ctx, piece, pos - off, labels):
                    return "keep"
                return None
            if int(np.atleast_1d(pv)[pos - off]) == -1:
                return "keep"
            return ("concat", k, pos - off)
        off += n
    return None


@handles("Concat")
def _concat(ctx: _Ctx, node: gs.Node) -> None:
    labs = [ctx.get(i) for i in node.inputs]
    if all(lab is None for lab in labs):
        return
    rank = _rank(node.outputs[0])
    if rank is None:
        ctx.block_inputs(node, f"Concat '{node.name}' has an unknown rank")
        return
    cat = int(node.attrs["axis"]) % rank
    axes = {lab[0] for lab in labs if lab is not None}
    if len(axes) != 1:
        ctx.block_inputs(node, f"Concat '{node.name}' mixes channel axes")
        return
    axis = axes.pop()
    if axis == cat:
        parts = []
        for t, lab in zip(node.inputs, labs):
            if lab is not None:
                parts.append(lab[1])
            else:
                s = _shape(t) if isinstance(t, gs.Variable) else np.shape(t.values)
                if s is None:
                    ctx.block_inputs(node, f"Concat '{node.name}' input of unknown shape")
                    return
                parts.append(np.full(s[cat], -1, dtype=np.int64))
        ctx.set(node.outputs[0], axis, np.concatenate(parts))
        return
    # concatenation along another axis: every input holds the same channels
    base = next(lab for lab in labs if lab is not None)[1]
    for t, lab in zip(node.inputs, labs):
        if lab is None:
            ctx.block(base, f"Concat '{node.name}' joins channels with the unprunable '{t.name}'")
            return
        if len(lab[1]) != len(base):
            ctx.block_inputs(node, f"Concat '{node.name}' widths differ")
            return
        ctx.tie(base, lab[1])
    ctx.set(node.outputs[0], axis, base)


@handles("Split")
def _split(ctx: _Ctx, node: gs.Node) -> None:
    lab = ctx.get(node.inputs[0])
    if lab is None:
        return
    axis, labels = lab
    rank = _rank(node.inputs[0]) or 0
    a = int(node.attrs.get("axis", 0)) % rank
    if a != axis:
        for o in node.outputs:
            ctx.set(o, axis, labels)
        return
    sizes = []
    for o in node.outputs:
        s = _shape(o)
        if s is None:
            ctx.block(labels, f"Split '{node.name}' has unknown output shapes")
            return
        sizes.append(s[axis])
    if len(node.inputs) > 1 and node.inputs[1].name and const_value(node.inputs[1]) is None:
        ctx.block(labels, f"Split '{node.name}' has runtime split sizes")
        return
    outs = np.split(labels, np.cumsum(sizes)[:-1])
    for o, part in zip(node.outputs, outs):
        ctx.set(o, axis, part)
    ctx.fixes.append(ShapeFix("split", node, {"parts": outs}))


@handles("Slice")
def _slice(ctx: _Ctx, node: gs.Node) -> None:
    lab = ctx.get(node.inputs[0])
    if lab is None:
        return
    axis, labels = lab
    rank = _rank(node.inputs[0]) or 0
    if len(node.inputs) > 1:
        vals = [const_value(node.inputs[i]) if len(node.inputs) > i and node.inputs[i].name
                else None for i in range(1, 5)]
        if vals[0] is None or vals[1] is None:
            ctx.block(labels, f"Slice '{node.name}' has runtime bounds")
            return
        starts, ends = list(vals[0]), list(vals[1])
        axes = list(vals[2]) if vals[2] is not None else list(range(len(starts)))
        steps = list(vals[3]) if vals[3] is not None else [1] * len(starts)
    else:
        starts, ends = node.attrs["starts"], node.attrs["ends"]
        axes = node.attrs.get("axes", list(range(len(starts))))
        steps = [1] * len(starts)
    axes = [int(a) % rank for a in axes]
    if axis not in axes:
        ctx.set(node.outputs[0], axis, labels)
        return
    k = axes.index(axis)
    if int(steps[k]) != 1:
        ctx.block(labels, f"Slice '{node.name}' steps over the channel axis")
        return
    c = len(labels)
    s, e = int(starts[k]), int(ends[k])
    s = max(0, min(c, s + c if s < 0 else s))
    e = max(0, min(c, e + c if e < 0 else e))
    ctx.fixes.append(ShapeFix("slice", node, {"k": k, "labels": labels, "s": s, "e": e,
                                              "opset10": len(node.inputs) > 1}))
    ctx.set(node.outputs[0], axis, labels[s:e])


@handles("Pad")
def _pad(ctx: _Ctx, node: gs.Node) -> None:
    lab = ctx.get(node.inputs[0])
    if lab is None:
        return
    axis, labels = lab
    rank = _rank(node.inputs[0]) or 0
    pads = node.attrs.get("pads")
    if pads is None and len(node.inputs) > 1:
        pads = const_value(node.inputs[1])
    pad_axes = _axes_of(node, 3, "__none__") if len(node.inputs) > 3 else list(range(rank))
    if pads is None or pad_axes is None:
        ctx.block(labels, f"Pad '{node.name}' has runtime pads")
        return
    pad_axes = [a % rank for a in pad_axes] or list(range(rank))
    pads = [int(p) for p in pads]
    n = len(pad_axes)
    if axis in pad_axes:
        k = pad_axes.index(axis)
        if pads[k] or pads[k + n]:
            ctx.block(labels, f"Pad '{node.name}' pads the channel axis")
            return
    ctx.set(node.outputs[0], axis, labels)


@handles("Gather")
def _gather(ctx: _Ctx, node: gs.Node) -> None:
    lab = ctx.get(node.inputs[0])
    if ctx.get(node.inputs[1]) is not None:
        ctx.block_inputs(node, f"Gather '{node.name}' indexes with channels")
        return
    if lab is None:
        return
    axis, labels = lab
    rank = _rank(node.inputs[0]) or 0
    a = int(node.attrs.get("axis", 0)) % rank
    if a == axis:
        ctx.block(labels, f"Gather '{node.name}' gathers along the channel axis")
        return
    irank = _rank(node.inputs[1])
    if irank is None:
        ctx.block(labels, f"Gather '{node.name}' indices of unknown rank")
        return
    ctx.set(node.outputs[0], axis if axis < a else axis + irank - 1, labels)


@handles("Shape", "Size")
def _shape_of(ctx: _Ctx, node: gs.Node) -> None:
    """Runtime shapes follow the pruned tensors by themselves."""


@handles("Conv", "ConvTranspose")
def _conv(ctx: _Ctx, node: gs.Node) -> None:
    """Conv weights are [Cout, Cin/g, k...]; ConvTranspose weights are [Cin, Cout/g, k...]: the
    output channels sit on weight axis 0 or 1 and the input channels on the other one. A depthwise
    layer (weight [C, 1, k...], group == C) passes its input's channel set through."""
    lab = ctx.get(node.inputs[0])
    w = const_value(node.inputs[1])
    group = int(node.attrs.get("group", 1))
    if w is None:
        ctx.block(lab[1] if lab else None, f"{node.op} '{node.name}' has a non-constant weight")
        return
    out_axis, in_axis = (0, 1) if node.op == "Conv" else (1, 0)
    if group == 1:
        if lab is not None:
            if lab[0] != 1 or not ctx.slice_const(node, 1, in_axis, lab[1], "consumer"):
                ctx.block(lab[1], f"{node.op} '{node.name}' input channels misaligned")
            else:
                ctx.touch(node, lab[1])
        out = ctx.new_source(node, node.op, w.shape[out_axis], node.outputs[0], w, out_axis)
        ctx.slice_const(node, 1, out_axis, out, "producer")
        _slice_bias(ctx, node, out)
        ctx.touch(node, out)
        ctx.set(node.outputs[0], 1, out)
        return
    if w.shape[1] == 1 and w.shape[0] == group:  # depthwise: channels pass through
        if lab is None:
            return
        if lab[0] != 1:  # the labelled axis is not the channel axis (e.g. MatMul on the last)
            ctx.block(lab[1], f"{node.op} '{node.name}' input channels misaligned")
            return
        labels = lab[1]
        ctx.slice_const(node, 1, 0, labels, "producer")
        _slice_bias(ctx, node, labels)
        ctx.fixes.append(ShapeFix("group", node, {"labels": labels}))
        ctx.touch(node, labels)
        ctx.set(node.outputs[0], 1, labels)
        return
    ctx.block(lab[1] if lab else None,
              f"grouped {node.op} '{node.name}' (group={group}) is not handled")


def _slice_bias(ctx: _Ctx, node: gs.Node, labels: Any) -> None:
    """Slice a Conv/ConvTranspose bias with its output channels; block if it is fed at run time."""
    if len(node.inputs) > 2 and node.inputs[2].name:
        if not ctx.slice_const(node, 2, 0, labels, "producer"):
            ctx.block(labels, f"{node.op} '{node.name}' has a non-constant bias")


@handles("Gemm")
def _gemm(ctx: _Ctx, node: gs.Node) -> None:
    lab = ctx.get(node.inputs[0])
    if ctx.get(node.inputs[1]) is not None or (len(node.inputs) > 2 and ctx.get(node.inputs[2])):
        ctx.block_inputs(node, f"Gemm '{node.name}' takes channels in B or C")
        return
    w = const_value(node.inputs[1])
    tb = int(node.attrs.get("transB", 0))
    if w is None or node.attrs.get("transA", 0):
        ctx.block(lab[1] if lab else None, f"Gemm '{node.name}' is transposed or has no constant B")
        return
    k_axis, n_axis = (1, 0) if tb else (0, 1)
    if lab is not None:
        if lab[0] != 1 or not ctx.slice_const(node, 1, k_axis, lab[1], "consumer"):
            ctx.block(lab[1], f"Gemm '{node.name}' input width does not match its weight")
        else:
            ctx.touch(node, lab[1])
    out = ctx.new_source(node, "Gemm", w.shape[n_axis], node.outputs[0], w, n_axis)
    ctx.slice_const(node, 1, n_axis, out, "producer")
    if len(node.inputs) > 2 and node.inputs[2].name:
        c = const_value(node.inputs[2])
        if c is not None and c.ndim >= 1 and c.shape[-1] == len(out):
            ctx.slice_const(node, 2, c.ndim - 1, out, "producer")
        elif c is None or c.ndim and c.shape[-1] != 1:
            ctx.block(out, f"Gemm '{node.name}' has a non-constant C")
    ctx.touch(node, out)
    ctx.set(node.outputs[0], 1, out)


@handles("MatMul")
def _matmul(ctx: _Ctx, node: gs.Node) -> None:
    a, b = node.inputs[0], node.inputs[1]
    la, lb = ctx.get(a), ctx.get(b)
    w = const_value(b)
    ra = _rank(a)
    if w is None or w.ndim != 2 or lb is not None or ra is None:
        ctx.block_inputs(node, f"MatMul '{node.name}' multiplies two activations")
        return
    if la is not None:
        axis, labels = la
        if axis == ra - 1:
            if not ctx.slice_const(node, 1, 0, labels, "consumer"):
                ctx.block(labels, f"MatMul '{node.name}' width does not match its weight")
            else:
                ctx.touch(node, labels)
        else:
            # rows / batch dims pass through unchanged
            ctx.touch(node, labels)
            ctx.block(labels, f"MatMul '{node.name}' carries channels on a batch axis")
    out = ctx.new_source(node, "MatMul", w.shape[1], node.outputs[0], w, 1)
    ctx.slice_const(node, 1, 1, out, "producer")
    ctx.touch(node, out)
    ctx.set(node.outputs[0], (_rank(node.outputs[0]) or ra) - 1, out)


# ---------------------------------------------------------------------------------- analysis
def analyze(model: Model) -> Analysis:
    """Build the channel-dependency structure of ``model``'s main graph.

    ``model`` must have shapes inferred (:func:`graphopt.core.shapes.infer_shapes`). Nothing is
    changed.
    """
    ctx = _Ctx(model)
    g = model.graph
    sub_names: set[str] = set()
    for node in g.nodes:
        for attr in node.attrs.values():
            graphs = attr if isinstance(attr, list) else [attr]
            for sg in graphs:
                if isinstance(sg, gs.Graph):
                    for sn in sg.nodes:
                        sub_names.update(i.name for i in sn.inputs)
    for node in g.nodes:
        if node.op == "Constant":
            continue
        if node.domain not in ("", "ai.onnx", None):
            ctx.block_inputs(node, f"no handler for op {node.domain}.{node.op} '{node.name}'")
            continue
        h = HANDLERS.get(node.op)
        if h is None:
            ctx.block_inputs(node, f"no handler for op {node.op} '{node.name}'")
            continue
        h(ctx, node)
    for t in g.outputs:
        lab = ctx.get(t)
        if lab is not None:
            ctx.block(lab[1], f"reaches the graph output '{t.name}'")
    for name in sub_names & set(ctx.labels):
        ctx.block(ctx.labels[name][1], f"'{name}' is used inside a subgraph")

    n = len(ctx.uf.p)
    fixed = ctx.uf.add(1)
    coupled = _UF()  # ties between elements only: what the report calls a group
    coupled.add(n)
    for a, b in ctx.ties:
        for x, y in zip(a.tolist(), b.tolist()):
            if x >= 0 and y >= 0:
                ctx.uf.union(x, y)
                coupled.union(x, y)
            elif x >= 0 or y >= 0:
                ctx.uf.union(max(x, y), fixed)
    for labels, _reason in ctx.fixed_pending:
        for x in labels.tolist():
            if x >= 0:
                ctx.uf.union(x, fixed)
    parent = np.array([ctx.uf.find(i) for i in range(n + 1)], dtype=np.int64)
    coupled_root = np.array([coupled.find(i) for i in range(n)], dtype=np.int64)
    return Analysis(ctx.producers, n, parent, ctx.labels, ctx.slices, ctx.fixes,
                    ctx.fixed_pending, dict(ctx.touched), ctx.gammas, coupled_root)


@dataclass
class Group:
    """A connected set of producers whose channels are pruned together."""

    gid: int
    producers: list[Producer]
    width: int  # number of channel positions (free units + positions tied to FIXED)
    free: np.ndarray  # ids of the units that may be removed
    reasons: list[str]

    @property
    def name(self) -> str:
        return self.producers[0].node.name

    @property
    def blocked(self) -> bool:
        return len(self.free) == 0


def groups(an: Analysis) -> list[Group]:
    """Connected components of producers sharing units, with their free units and block reasons."""
    root = an.root()
    fixed_root = root[an.fixed]
    link = an.coupled if an.coupled is not None else root
    gr = nx.Graph()
    unit_owner: dict[int, int] = {}
    for pi, p in enumerate(an.producers):
        gr.add_node(pi)
        for u in np.unique(link[p.start:p.start + p.size]).tolist():
            if an.coupled is None and u == fixed_root:
                continue
            if u in unit_owner:
                gr.add_edge(unit_owner[u], pi)
            else:
                unit_owner[u] = pi
    elem_group = np.full(an.n_elements + 1, -1, dtype=np.int64)
    out: list[Group] = []
    comps = sorted(nx.connected_components(gr), key=min)
    for gid, comp in enumerate(comps):
        prods = [an.producers[i] for i in sorted(comp)]
        elems = np.concatenate([np.arange(p.start, p.start + p.size) for p in prods])
        elem_group[elems] = gid
        units = np.unique(root[elems])
        free = units[units != fixed_root]
        first = root[prods[0].start:prods[0].start + prods[0].size]
        n_fixed = int((first == fixed_root).sum())
        out.append(Group(gid, prods, len(free) + n_fixed, free, []))
    for labels, reason in an.blocks:
        gids = np.unique(elem_group[labels[labels >= 0]])
        for gi in gids.tolist():
            if gi >= 0 and reason not in out[gi].reasons and len(out[gi].reasons) < 8:
                out[gi].reasons.append(reason)
    return out


def group_width(an: Analysis, grp: Group, keep_unit: np.ndarray | None = None) -> tuple[int, int]:
    """Width of the group's first producer before and after pruning."""
    p = grp.producers[0]
    if keep_unit is None:
        return p.size, p.size
    root = an.root()
    return p.size, int(keep_unit[root[p.start:p.start + p.size]].sum())


# ---------------------------------------------------------------------------------- rewriting
def kept_positions(labels: Labels, keep_elem: np.ndarray) -> np.ndarray:
    """Positions of ``labels`` that survive (unowned positions always do)."""
    ok = np.ones(len(labels), dtype=bool)
    m = labels >= 0
    ok[m] = keep_elem[labels[m]]
    return np.nonzero(ok)[0]


def keep_elements(an: Analysis, keep_unit: np.ndarray) -> np.ndarray:
    """Per-element keep flags from per-unit flags (indexed by unit id = root element id)."""
    root = an.root()
    return keep_unit[root[:an.n_elements]]


def _set_input(node: gs.Node, index: int, value: np.ndarray, tag: str) -> None:
    old = node.inputs[index]
    name = f"{old.name or 'const'}_{tag}_{node.name or id(node)}"
    node.inputs[index] = gs.Constant(name, np.ascontiguousarray(value))


def apply_pruning(model: Model, an: Analysis, keep_elem: np.ndarray) -> dict[str, int]:
    """Remove every element with ``keep_elem[e] == False`` from ``model`` (analysed by ``an``)."""
    by_input: dict[tuple[int, int], list[ConstSlice]] = defaultdict(list)
    nodes: dict[int, gs.Node] = {}
    for s in an.slices:
        by_input[(id(s.node), s.index)].append(s)
        nodes[id(s.node)] = s.node
    sliced = 0
    for (nid, index), items in by_input.items():
        node = nodes[nid]
        v = const_value(node.inputs[index])
        assert v is not None
        changed = False
        for s in items:
            idx = kept_positions(s.labels, keep_elem)
            if len(idx) != v.shape[s.axis]:
                v = np.take(v, idx, axis=s.axis)
                changed = True
        if changed:
            _set_input(node, index, v, "pruned")
            sliced += 1
    for fx in an.fixes:
        _apply_fix(model, fx, keep_elem)
    g = model.graph
    for t in g.tensors().values():
        if isinstance(t, gs.Variable) and t not in g.inputs and t not in g.outputs:
            t.shape = None
    g.cleanup(remove_unused_graph_inputs=False)
    return {"weights_sliced": sliced}


def _apply_fix(model: Model, fx: ShapeFix, keep_elem: np.ndarray) -> None:
    node = fx.node
    info = fx.info
    if fx.kind == "group":
        node.attrs["group"] = int(len(kept_positions(info["labels"], keep_elem)))
    elif fx.kind == "split":
        sizes = np.array([len(kept_positions(p, keep_elem)) for p in info["parts"]], np.int64)
        if "split" in node.attrs:
            node.attrs["split"] = [int(s) for s in sizes]
        elif len(node.inputs) > 1 and node.inputs[1].name:
            _set_input(node, 1, sizes, "split")
        elif model.opset >= 13:
            node.attrs.pop("num_outputs", None)
            while len(node.inputs) < 2:
                node.inputs.append(gs.Variable.empty())
            node.inputs[1] = gs.Constant(f"{node.name}_split_pruned", sizes)
        else:
            node.attrs["split"] = [int(s) for s in sizes]
    elif fx.kind == "slice":
        labels, s, e, k = info["labels"], info["s"], info["e"], info["k"]
        ns = len(kept_positions(labels[:s], keep_elem))
        ne = ns + len(kept_positions(labels[s:e], keep_elem))
        if info["opset10"]:
            st = np.array(const_value(node.inputs[1]), dtype=np.int64).copy()
            en = np.array(const_value(node.inputs[2]), dtype=np.int64).copy()
            st[k], en[k] = ns, ne
            _set_input(node, 1, st.astype(const_value(node.inputs[1]).dtype), "start")
            _set_input(node, 2, en.astype(const_value(node.inputs[2]).dtype), "end")
        else:
            st, en = list(node.attrs["starts"]), list(node.attrs["ends"])
            st[k], en[k] = ns, ne
            node.attrs["starts"], node.attrs["ends"] = st, en
    elif fx.kind == "resize":
        sizes = np.array(const_value(node.inputs[3]), dtype=np.int64).copy()
        sizes[info["axis"]] = len(kept_positions(info["labels"], keep_elem))
        _set_input(node, 3, sizes, "sizes")
    elif fx.kind == "reshape":
        width = len(kept_positions(info["labels"], keep_elem))
        plan = info["plan"]
        if plan[0] == "const":
            v = np.array(np.atleast_1d(const_value(node.inputs[1])), copy=True)
            v[plan[1]] = width
            _set_input(node, 1, v, "shape")
        else:
            cat = node.inputs[1].inputs[0]
            k, off = plan[1], plan[2]
            piece = cat.inputs[k]
            pv = np.array(np.atleast_1d(const_value(piece)), copy=True)
            dtype = piece.dtype if piece.dtype is not None else pv.dtype
            pv = pv.astype(dtype)
            pv[off] = width
            # the Concat may feed other consumers: give this Reshape its own copy
            if len(cat.outputs[0].outputs) > 1:
                new_out = gs.Variable(f"{cat.outputs[0].name}_pruned_{node.name}",
                                      dtype=cat.outputs[0].dtype)
                new_cat = gs.Node("Concat", f"{cat.name}_pruned_{node.name}",
                                  attrs=dict(cat.attrs), inputs=list(cat.inputs),
                                  outputs=[new_out])
                model.graph.nodes.append(new_cat)
                node.inputs[1] = new_out
                cat = new_cat
            _set_input(cat, k, pv, "shape")


def zero_pruned(model: Model, an: Analysis, keep_elem: np.ndarray) -> None:
    """Make the channels to be removed exactly zero in ``model`` (the exactness-test reference).

    Producer weights and biases, consumer input weights, BN gamma/beta/mean (var -> 1) and additive
    per-channel constants of removed channels are zeroed: each removed channel is then exactly 0 at
    its producer and ignored by its consumers, so removing it changes no output.
    """
    by_input: dict[tuple[int, int], list[ConstSlice]] = defaultdict(list)
    nodes: dict[int, gs.Node] = {}
    for s in an.slices:
        by_input[(id(s.node), s.index)].append(s)
        nodes[id(s.node)] = s.node
    for (nid, index), items in by_input.items():
        node = nodes[nid]
        v = np.array(const_value(node.inputs[index]), copy=True)
        changed = False
        for s in items:
            if s.role not in ("producer", "consumer", "bn", "bias"):
                continue
            drop = np.setdiff1d(np.arange(len(s.labels)), kept_positions(s.labels, keep_elem))
            if len(drop) == 0:
                continue
            sl = [slice(None)] * v.ndim
            sl[s.axis] = drop
            fill = 1.0 if (s.role == "bn" and index == 4) else 0.0
            v[tuple(sl)] = fill
            changed = True
        if changed:
            _set_input(node, index, v, "zeroed")


# ---------------------------------------------------------------------------------- importance
def weight_importance(an: Analysis, p_norm: int = 1) -> np.ndarray:
    """Per-element Lp norm of the producer's output-channel weight slice, divided by the
    producer's mean (so elements of different layers are comparable when summed into units)."""
    imp = np.zeros(an.n_elements, dtype=np.float64)
    for p in an.producers:
        w = np.moveaxis(p.weight.astype(np.float64), p.weight_axis, 0).reshape(p.size, -1)
        v = np.abs(w).sum(1) if p_norm == 1 else np.sqrt((w * w).sum(1))
        imp[p.start:p.start + p.size] = v / (v.mean() + 1e-12)
    return imp


def bn_importance(an: Analysis) -> np.ndarray:
    """|gamma| of the BatchNorms that scale each element (l1 where none does), normalized per
    producer."""
    imp = np.zeros(an.n_elements, dtype=np.float64)
    seen = np.zeros(an.n_elements, dtype=bool)
    for labels, gamma in an.gammas:
        m = labels >= 0
        np.add.at(imp, labels[m], gamma[m])
        seen[labels[m]] = True
    l1 = weight_importance(an, 1)
    for p in an.producers:
        sl = slice(p.start, p.start + p.size)
        if seen[sl].all():
            imp[sl] = imp[sl] / (imp[sl].mean() + 1e-12)
        else:
            imp[sl] = l1[sl]
    return imp


def unit_scores(an: Analysis, elem_importance: np.ndarray) -> np.ndarray:
    """Importance of every unit (indexed by unit id): the sum over its elements."""
    root = an.root()
    return np.bincount(root[:an.n_elements], weights=elem_importance,
                       minlength=an.n_elements + 1)


def select(an: Analysis, grps: Iterable[Group], scores: np.ndarray,
           ratio: float | dict[str, float], round_to: int | None = None, min_channels: int = 1,
           min_fraction: float = 0.0, scope: str = "group") -> np.ndarray:
    """Per-unit keep flags.

    ``scope="group"``: every group loses its ``ratio`` least important free units (a dict gives
    per-group ratios by first-producer name, ``"*"`` the default). ``scope="global"``: scores are
    divided by their group's mean and the ``ratio`` least important units of the whole model go,
    so groups lose different fractions. Either way a group keeps at least
    ``max(min_channels, min_fraction * width)`` and, with ``round_to``, a multiple of it.
    """
    grps = [g for g in grps if not g.blocked]
    keep = np.ones(an.n_elements + 1, dtype=bool)
    wanted: dict[int, int] = {}
    if scope == "global":
        r = float(ratio.get("*", 0.0)) if isinstance(ratio, dict) else float(ratio)
        norm = {g.gid: scores[g.free] / (scores[g.free].mean() + 1e-12) for g in grps}
        if grps and r > 0:
            allv = np.concatenate(list(norm.values()))
            n_total = int(round(r * sum(g.width for g in grps)))
            thr = np.sort(allv)[min(n_total, len(allv)) - 1] if n_total > 0 else -np.inf
            for g in grps:
                wanted[g.gid] = int((norm[g.gid] <= thr).sum())
    elif scope != "group":
        raise ValueError(f"unknown pruning scope {scope!r} (group or global)")
    for grp in grps:
        n = grp.width
        if scope == "global":
            n_want = wanted.get(grp.gid, 0)
        else:
            r = ratio.get(grp.name, ratio.get("*", 0.0)) if isinstance(ratio, dict) else ratio
            n_want = int(round(r * n))
        if n_want <= 0:
            continue
        n_fixed = n - len(grp.free)
        floor = max(min_channels, int(np.ceil(min_fraction * n)), n_fixed, 1)
        kept = max(floor, n - n_want)
        if round_to and round_to > 1:
            if n <= round_to:
                continue
            kept = max(round_to, int(round(kept / round_to)) * round_to)
            while kept < floor:
                kept += round_to
            kept = min(kept, n)
        n_remove = min(n - kept, len(grp.free))
        if n_remove <= 0:
            continue
        order = np.argsort(scores[grp.free], kind="stable")
        keep[grp.free[order[:n_remove]]] = False
    return keep


def prunable_macs(an: Analysis, node_macs: dict[str, int]) -> tuple[int, int]:
    """(MACs of compute nodes that touch a free unit, total MACs)."""
    root = an.root()
    fixed = root[an.fixed]
    total = sum(node_macs.values())
    pr = 0
    for name, labs in an.touched.items():
        if any(((lab >= 0) & (root[np.maximum(lab, 0)] != fixed)).any() for lab in labs):
            pr += node_macs.get(name, 0)
    return pr, total
