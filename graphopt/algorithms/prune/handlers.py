"""The table of op handlers of the channel-dependency analysis: one handler per op type.

A handler holds both halves of what pruning does to one kind of op:

* ``analyze(ctx, node)``: how channel labels flow from the node's inputs to its outputs (see
  :mod:`graphopt.algorithms.prune.analysis` for labels, elements and units): it passes them on,
  ties them, blocks them with a reason, records the constant inputs to slice with them
  (``ctx.slice_const``) and the hard-coded widths to rewrite (a :class:`ShapeFix`);
* ``apply(model, fix, keep_elem)``: the rewrite of such a hard-coded width once the kept elements
  are known (Split sizes, Slice bounds, Resize sizes, Reshape targets, a depthwise ``group``).

``HANDLERS`` maps an op type to its handler; an op missing from it blocks the channels it reads.
Handlers see the walk through the :class:`Context` protocol, which the analysis implements.

Constant inputs (weights, shape vectors) are read with :func:`constant`: an initializer, a
``Constant`` node, or a value computed from those by the few ops exporters put in front of weights
and shape vectors (``CONST_OPS``), evaluated by :mod:`graphopt.core.const_eval`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.algorithms.prune.heads import RESIDUAL_REASON, batched_matmul, split_heads
from graphopt.core.const_eval import const_value
from graphopt.core.graph import insert_nodes
from graphopt.core.model import Model

logger = logging.getLogger(__name__)

Labels = np.ndarray  # int64, -1 = position owned by no producer

#: ops through which a constant input may be computed (Reshape or Cast of a weight, a shape vector
#: built by Concat, ...); a value computed by any other op does not count as a constant
CONST_OPS: frozenset[str] = frozenset(
    {
        "Constant",
        "Identity",
        "Cast",
        "Reshape",
        "Unsqueeze",
        "Squeeze",
        "Transpose",
        "Flatten",
        "Concat",
        "Add",
        "Sub",
        "Mul",
        "Div",
        "Neg",
    }
)


def constant(t: gs.Tensor | None, opset: int) -> np.ndarray | None:
    """The value of ``t`` when it is a constant or a small constant subgraph of ``CONST_OPS``
    (at most 8 nodes deep); None when it depends on a graph input."""
    return const_value(t, opset, ops=CONST_OPS, max_depth=8)


def kept_positions(labels: Labels, keep_elem: np.ndarray) -> np.ndarray:
    """Positions of ``labels`` that survive (unowned positions always do)."""
    ok = np.ones(len(labels), dtype=bool)
    m = labels >= 0
    ok[m] = keep_elem[labels[m]]
    return np.nonzero(ok)[0]


def replace_input(node: gs.Node, index: int, value: np.ndarray, tag: str) -> None:
    """Give ``node`` a new constant input ``index`` holding ``value`` (named after ``tag``)."""
    old = node.inputs[index]
    name = f"{old.name or 'const'}_{tag}_{node.name or id(node)}"
    node.inputs[index] = gs.Constant(name, np.ascontiguousarray(value))


def static_shape(t: gs.Tensor) -> tuple[int, ...] | None:
    """The shape of ``t`` when every dim is a known integer, else None."""
    s = t.shape
    if s is None or not all(isinstance(d, (int, np.integer)) and d >= 0 for d in s):
        return None
    return tuple(int(d) for d in s)


def rank(t: gs.Tensor) -> int | None:
    """The rank of ``t``, None when unknown."""
    return len(t.shape) if t.shape is not None else None


def _shape_of(t: gs.Tensor) -> tuple[object, ...] | None:
    """The shape of a variable or constant (dims may be symbolic), None when unknown."""
    if isinstance(t, gs.Constant):
        return tuple(np.shape(t.values))
    return tuple(t.shape) if t.shape is not None else None


@dataclass
class ShapeFix:
    """A hard-coded width to rewrite once the kept channels are known: ``handler.apply`` does it."""

    handler: OpHandler
    node: gs.Node
    info: dict[str, Any] = field(default_factory=dict)


class Context(Protocol):
    """What a handler sees of the analysis walk (implemented in ``analysis``)."""

    model: Model
    fixes: list[ShapeFix]
    gammas: list[tuple[Labels, np.ndarray]]

    def value(self, t: gs.Tensor | None) -> np.ndarray | None:
        """:func:`constant` of ``t`` in the analysed model."""
        ...

    def get(self, t: gs.Tensor | None) -> tuple[int, Labels] | None:
        """(axis, labels) of ``t``, None when it carries no channels."""
        ...

    def set(self, t: gs.Tensor, axis: int, labels: Labels) -> None:
        """Give ``t`` the labels ``labels`` along ``axis``."""
        ...

    def new_source(
        self,
        node: gs.Node,
        kind: str,
        size: int,
        out: gs.Tensor,
        weight: np.ndarray,
        weight_axis: int,
    ) -> Labels:
        """Register ``node`` as a producer of ``size`` new elements; returns their labels."""
        ...

    def tie(self, a: Labels, b: Labels) -> None:
        """Elements at the same position of ``a`` and ``b`` are removed together."""
        ...

    def block(self, labels: Labels | None, reason: str) -> None:
        """The elements of ``labels`` cannot be removed, because of ``reason``."""
        ...

    def block_inputs(self, node: gs.Node, reason: str) -> None:
        """Block every labelled input of ``node``."""
        ...

    def slice_const(self, node: gs.Node, index: int, axis: int, labels: Labels, role: str) -> bool:
        """Cut constant input ``index`` of ``node`` along ``axis`` by ``labels`` when channels
        go; False when it is not a constant of that width."""
        ...

    def touch(self, node: gs.Node, labels: Labels) -> None:
        """``node``'s work depends on the elements of ``labels`` (for prunable MACs)."""
        ...


class OpHandler:
    """Channel labels through one kind of op, and the rewrite of its hard-coded widths."""

    #: the op types this handler serves
    ops: ClassVar[tuple[str, ...]] = ()

    def analyze(self, ctx: Context, node: gs.Node) -> None:
        """Map the labels of ``node``'s inputs to its outputs (block, tie, record slices/fixes)."""
        raise NotImplementedError

    def apply(self, model: Model, fix: ShapeFix, keep_elem: np.ndarray) -> None:
        """Rewrite the width ``fix`` (recorded by :meth:`analyze`) for the kept elements."""
        raise NotImplementedError(f"{type(self).__name__} records no shape fix")


#: op type -> its handler
HANDLERS: dict[str, OpHandler] = {}


def register(cls: type[OpHandler]) -> type[OpHandler]:
    """Class decorator: put one instance of ``cls`` in ``HANDLERS`` for each op of ``cls.ops``."""
    inst = cls()
    for op in cls.ops:
        if op in HANDLERS:
            raise ValueError(f"two pruning handlers for op {op}")
        HANDLERS[op] = inst
    return cls


# ---------------------------------------------------------------------------------- pass-through
#: ops that act on the spatial axes (>= 2) of an NCHW tensor and pass the channel axis through
SPATIAL_OPS = frozenset(
    {
        "MaxPool",
        "AveragePool",
        "GlobalAveragePool",
        "GlobalMaxPool",
        "LpPool",
        "GlobalLpPool",
        "Upsample",
        "Resize",
    }
)


@register
class Passthrough(OpHandler):
    """Unary elementwise ops and pooling: the labels pass through unchanged (for pooling and
    resizing only on axis 1, since they act on the axes >= 2). Channels in a parameter input
    block."""

    ops: ClassVar[tuple[str, ...]] = (
        "Relu",
        "Clip",
        "Sigmoid",
        "HardSigmoid",
        "HardSwish",
        "Tanh",
        "LeakyRelu",
        "Elu",
        "Selu",
        "Celu",
        "Softplus",
        "Softsign",
        "Erf",
        "Exp",
        "Log",
        "Abs",
        "Neg",
        "Sqrt",
        "Reciprocal",
        "Identity",
        "Cast",
        "Dropout",
        "Gelu",
        "Mish",
        "Floor",
        "Ceil",
        "Round",
        "Sign",
        "Sin",
        "Cos",
        "ThresholdedRelu",
        "Shrink",
        "IsNaN",
        "IsInf",
        "Not",
        "MaxPool",
        "AveragePool",
        "GlobalAveragePool",
        "GlobalMaxPool",
        "LpPool",
        "GlobalLpPool",
    )

    def analyze(self, ctx: Context, node: gs.Node) -> None:
        lab = ctx.get(node.inputs[0]) if node.inputs else None
        others = [ctx.get(i) for i in node.inputs[1:]]
        if any(o is not None for o in others):
            ctx.block_inputs(node, f"{node.op} '{node.name}' takes channels in a parameter input")
            return
        if lab is None:
            return
        axis, labels = lab
        if node.op in SPATIAL_OPS and axis != 1:
            # pooling and resizing work on axes >= 2: labels there would be pooled, not passed
            ctx.block(labels, f"{node.op} '{node.name}' acts on the labelled axis {axis}")
            return
        if node.op == "MaxPool" and len(node.outputs) > 1 and node.outputs[1].outputs:
            ctx.block(labels, f"MaxPool '{node.name}' indices output is used")
            return
        if not self.record(ctx, node, axis, labels):
            return
        ctx.set(node.outputs[0], axis, labels)

    def record(self, ctx: Context, node: gs.Node, axis: int, labels: Labels) -> bool:
        """Record what the op needs besides passing labels on; False if it blocked them."""
        return True


@register
class Resize(Passthrough):
    """Resize/Upsample: as pooling; constant ``sizes`` get the kept width at the channel axis,
    runtime ``sizes`` block."""

    ops = ("Upsample", "Resize")

    def record(self, ctx: Context, node: gs.Node, axis: int, labels: Labels) -> bool:
        if len(node.inputs) >= 4 and node.inputs[3].name:
            sizes = ctx.value(node.inputs[3])
            if sizes is None:
                ctx.block(labels, f"Resize '{node.name}' has runtime sizes")
                return False
            ctx.fixes.append(ShapeFix(self, node, {"axis": axis, "labels": labels}))
        return True

    def apply(self, model: Model, fix: ShapeFix, keep_elem: np.ndarray) -> None:
        node = fix.node
        sizes = np.array(constant(node.inputs[3], model.opset), dtype=np.int64).copy()
        sizes[fix.info["axis"]] = len(kept_positions(fix.info["labels"], keep_elem))
        replace_input(node, 3, sizes, "sizes")


# ---------------------------------------------------------------------------------- elementwise
@register
class Elementwise(OpHandler):
    """Ops with several inputs broadcast together: labelled inputs tie their elements position
    by position; a per-channel constant operand is sliced along the same labels (bias, scale,
    PRelu slope); an operand of the full width that is not a constant blocks."""

    ops = (
        "Add",
        "Sub",
        "Mul",
        "Div",
        "Pow",
        "Max",
        "Min",
        "Sum",
        "Mean",
        "PRelu",
        "Equal",
        "Greater",
        "Less",
        "And",
        "Or",
        "Where",
    )

    def analyze(self, ctx: Context, node: gs.Node) -> None:
        out = node.outputs[0]
        out_rank = rank(out)
        labelled: list[tuple[int, int | None, tuple[int, Labels]]] = []  # (input, rank, labels)
        for i, t in enumerate(node.inputs):
            lab = ctx.get(t)
            if lab is not None:
                labelled.append((i, rank(t), lab))
        if not labelled:
            return
        ranks = [r for _, r, _ in labelled if r is not None]
        if out_rank is None or len(ranks) < len(labelled):
            ctx.block_inputs(node, f"{node.op} '{node.name}': unknown ranks")
            return
        axes = {lab[0] + out_rank - r for (_, _, lab), r in zip(labelled, ranks)}
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
                v = ctx.value(t)
                shp = None if v is None else v.shape
            if shp is None:
                ctx.block(labels, f"{node.op} '{node.name}': operand '{t.name}' has unknown shape")
                return
            ax = axis - (out_rank - len(shp))
            if ax < 0 or shp[ax] == 1:
                continue
            role = (
                "bias"
                if node.op in ("Add", "Sub")
                else "scale"
                if node.op in ("Mul", "PRelu")
                else "other"
            )
            if not ctx.slice_const(node, i, ax, labels, role):
                why = f"{node.op} '{node.name}' ties channels to the unprunable tensor '{t.name}'"
                src = t.inputs[0] if isinstance(t, gs.Variable) and t.inputs else None
                if src is not None and src.op in LayerNorm.ops:  # a post-LN residual Add
                    why += f" ({RESIDUAL_REASON})"
                ctx.block(labels, why)
                return
        ctx.set(out, axis, labels)


# ---------------------------------------------------------------------------------- normalization
@register
class ChannelNorm(OpHandler):
    """BatchNormalization/InstanceNormalization over axis 1: per-channel parameters are sliced
    (BN gamma also feeds the ``bn`` criterion); another labelled axis blocks."""

    ops = ("BatchNormalization", "InstanceNormalization")

    def analyze(self, ctx: Context, node: gs.Node) -> None:
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
        g = ctx.value(node.inputs[1])
        if g is not None:
            ctx.gammas.append((labels, np.abs(g.astype(np.float64))))
        ctx.set(node.outputs[0], axis, labels)


@register
class LayerNorm(OpHandler):
    """Normalizations over chosen axes: labels on a normalized axis block (the op mixes
    channels), others pass through."""

    ops = ("LayerNormalization", "MeanVarianceNormalization", "LpNormalization")

    def analyze(self, ctx: Context, node: gs.Node) -> None:
        lab = ctx.get(node.inputs[0])
        if lab is None:
            return
        axis, labels = lab
        r = rank(node.inputs[0]) or 0
        if node.op == "LayerNormalization":
            a = int(node.attrs.get("axis", -1)) % r
            axes = set(range(a, r))
        elif node.op == "LpNormalization":
            axes = {int(node.attrs.get("axis", -1)) % r}
        else:
            axes = {int(x) % r for x in node.attrs.get("axes", [0, 2, 3])}
        if axis in axes:
            ctx.block(
                labels,
                f"{node.op} '{node.name}' normalizes over the channel axis ({RESIDUAL_REASON})",
            )
            return
        if any(ctx.get(i) is not None for i in node.inputs[1:]):
            ctx.block(labels, f"{node.op} '{node.name}' takes channels in a parameter")
            return
        ctx.set(node.outputs[0], axis, labels)


def _axes_of(ctx: Context, node: gs.Node, index: int, attr: str) -> list[int] | None:
    """Axes from attribute ``attr`` or constant input ``index``; [] when neither is given, None
    when the input is computed at run time."""
    if attr in node.attrs:
        return [int(a) for a in node.attrs[attr]]
    if len(node.inputs) > index and node.inputs[index].name:
        v = ctx.value(node.inputs[index])
        return None if v is None else [int(a) for a in np.atleast_1d(v)]
    return []


@register
class Reduce(OpHandler):
    """Reductions: reducing the labelled axis blocks; other axes move it by ``keepdims``."""

    ops = (
        "ReduceMean",
        "ReduceSum",
        "ReduceMax",
        "ReduceMin",
        "ReduceProd",
        "ReduceL1",
        "ReduceL2",
        "ReduceSumSquare",
        "ReduceLogSum",
        "ReduceLogSumExp",
        "ArgMax",
        "ArgMin",
    )

    def analyze(self, ctx: Context, node: gs.Node) -> None:
        lab = ctx.get(node.inputs[0])
        if lab is None:
            return
        axis, labels = lab
        r = rank(node.inputs[0])
        if node.op in ("ArgMax", "ArgMin"):
            axes: list[int] | None = [int(node.attrs.get("axis", 0))]
        else:
            axes = _axes_of(ctx, node, 1, "axes")
        if r is None or axes is None:
            ctx.block(labels, f"{node.op} '{node.name}' has runtime axes")
            return
        axes = (
            [a % r for a in axes]
            if axes
            else ([] if node.attrs.get("noop_with_empty_axes", 0) else list(range(r)))
        )
        if axis in axes:
            ctx.block(labels, f"{node.op} '{node.name}' reduces over the channel axis")
            return
        keep = int(node.attrs.get("keepdims", 1))
        new_axis = axis if keep else axis - sum(1 for a in axes if a < axis)
        ctx.set(node.outputs[0], new_axis, labels)


@register
class Softmax(OpHandler):
    """Softmax-like ops: normalizing over the labelled axis blocks (before opset 13, over the
    flattened axes from ``axis`` on)."""

    ops = ("Softmax", "LogSoftmax", "Hardmax")

    def analyze(self, ctx: Context, node: gs.Node) -> None:
        lab = ctx.get(node.inputs[0])
        if lab is None:
            return
        axis, labels = lab
        r = rank(node.inputs[0]) or 1
        opset = ctx.model.opset
        a = int(node.attrs.get("axis", -1 if opset >= 13 else 1)) % r
        if axis == a or (opset < 13 and axis >= a):
            ctx.block(labels, f"{node.op} '{node.name}' normalizes over the channel axis")
            return
        ctx.set(node.outputs[0], axis, labels)


# ---------------------------------------------------------------------------------- layout
@register
class Transpose(OpHandler):
    """Transpose: the labelled axis moves to where ``perm`` puts it."""

    ops = ("Transpose",)

    def analyze(self, ctx: Context, node: gs.Node) -> None:
        lab = ctx.get(node.inputs[0])
        if lab is None:
            return
        axis, labels = lab
        r = rank(node.inputs[0]) or 0
        perm = list(node.attrs.get("perm", list(range(r))[::-1]))
        ctx.set(node.outputs[0], perm.index(axis), labels)


@register
class Squeeze(OpHandler):
    """Squeeze/Unsqueeze: the labelled axis moves with the removed or inserted axes; squeezing
    it, or axes unknown at analysis time, block."""

    ops = ("Squeeze", "Unsqueeze")

    def analyze(self, ctx: Context, node: gs.Node) -> None:
        lab = ctx.get(node.inputs[0])
        if lab is None:
            return
        axis, labels = lab
        r = rank(node.inputs[0])
        axes = _axes_of(ctx, node, 1, "axes")
        if r is None or axes is None or (node.op == "Squeeze" and not axes):
            ctx.block(labels, f"{node.op} '{node.name}' has unknown axes")
            return
        if node.op == "Squeeze":
            axes = [a % r for a in axes]
            if axis in axes:
                ctx.block(labels, f"Squeeze '{node.name}' removes the channel axis")
                return
            ctx.set(node.outputs[0], axis - sum(1 for a in axes if a < axis), labels)
        else:
            out_rank = r + len(axes)
            new = axis
            for a in sorted(x % out_rank for x in axes):
                if a <= new:
                    new += 1
            ctx.set(node.outputs[0], new, labels)


def merge_labels(
    in_shape: tuple[int, ...], axis: int, labels: Labels, out_shape: tuple[int, ...]
) -> tuple[int, Labels] | None:
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


def _runtime_dim(ctx: Context, piece: gs.Tensor, k: int, labels: Labels) -> bool:
    """True when entry ``k`` of ``piece`` is read at run time from a dim that carries ``labels``
    (``Shape(t)``, ``Slice(Shape(t), a, b)`` with negative or clamped bounds, or
    ``Unsqueeze(Gather(Shape(t), i))`` / ``Unsqueeze(Squeeze(Slice(Shape(t), -1)))`` as
    ``x.size(-1)`` exports): it follows the pruned width by itself."""
    node = piece.inputs[0] if piece.inputs else None
    window: tuple[int, int] | None = None
    # one entry: Unsqueeze/Squeeze of a scalar or 1-element piece pass it through
    while node is not None and node.op in ("Unsqueeze", "Squeeze") and k == 0:
        node = node.inputs[0].inputs[0] if node.inputs[0].inputs else None
    if node is not None and node.op == "Gather" and k == 0:
        if int(node.attrs.get("axis", 0)) != 0:
            return False
        idx = ctx.value(node.inputs[1])
        if idx is None or idx.size != 1:
            return False
        i = int(np.ravel(idx)[0])
        window = (i, i + 1 if i != -1 else (1 << 62))  # one entry; -1 -> the last
        node = node.inputs[0].inputs[0] if node.inputs[0].inputs else None
    elif node is not None and node.op == "Slice" and len(node.inputs) >= 3:
        st, en = ctx.value(node.inputs[1]), ctx.value(node.inputs[2])
        n_in = len(node.inputs)
        axes = ctx.value(node.inputs[3]) if n_in > 3 and node.inputs[3].name else None
        steps = ctx.value(node.inputs[4]) if n_in > 4 and node.inputs[4].name else None
        if (
            st is None
            or en is None
            or (axes is not None and int(np.ravel(axes)[0]) != 0)
            or (steps is not None and int(np.ravel(steps)[0]) != 1)
        ):
            return False
        window = (int(np.ravel(st)[0]), int(np.ravel(en)[0]))
        node = node.inputs[0].inputs[0] if node.inputs[0].inputs else None
    if node is None or node.op != "Shape":
        return False
    src = ctx.get(node.inputs[0])
    r = rank(node.inputs[0])
    if src is None or r is None:
        return False
    end = node.attrs.get("end")
    dims = list(range(r))[int(node.attrs.get("start", 0)) : None if end is None else int(end)]
    if window is not None:  # Python slicing clamps as ONNX Slice does (INT64_MIN/MAX included)
        dims = dims[window[0] : window[1]]
    return k < len(dims) and src[0] == dims[k] and np.array_equal(src[1], labels)


def _shape_vector_plan(ctx: Context, t: gs.Tensor, pos: int, labels: Labels) -> Any:
    """How to rewrite entry ``pos`` of a shape vector: 'keep' (entry is -1, or read at run time
    from the pruned tensor's shape), ('const', pos) for a constant vector, ('concat', input_index,
    offset) for a constant piece of a Concat-built vector, or None."""
    v = ctx.value(t)
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
        pv = ctx.value(piece)
        shp = static_shape(piece)
        n = (
            len(np.atleast_1d(pv))
            if pv is not None
            else (int(np.prod(shp)) if shp is not None else None)
        )
        if n is None or n < 0:
            return None
        if off <= pos < off + n:
            if pv is None:
                if _runtime_dim(ctx, piece, pos - off, labels):
                    return "keep"
                return None
            if int(np.atleast_1d(pv)[pos - off]) == -1:
                return "keep"
            return ("concat", k, pos - off)
        off += n
    return None


@register
class Reshape(OpHandler):
    """Flatten/Reshape that merge the channel axis with the following dims repeat each label over
    the block (``np.tile(np.repeat(labels, inner), outer)``); a Reshape target that hard-codes
    the merged width (a constant, or a constant piece of a ``Concat``-built shape vector) is
    rewritten; one that splits the channel axis into attention heads makes each head a unit
    (:meth:`split`), any other split blocks."""

    ops = ("Reshape", "Flatten")

    def analyze(self, ctx: Context, node: gs.Node) -> None:
        lab = ctx.get(node.inputs[0])
        if lab is None:
            return
        axis, labels = lab
        in_shape, out_shape = static_shape(node.inputs[0]), static_shape(node.outputs[0])
        if in_shape is None or out_shape is None:
            ctx.block(labels, f"{node.op} '{node.name}' has unknown shapes")
            return
        if node.op == "Flatten":
            k = int(node.attrs.get("axis", 1)) % max(len(in_shape), 1)
            if axis < k:
                ctx.block(labels, f"Flatten '{node.name}' merges channels into the batch axis")
                return
            outer = int(np.prod(in_shape[k:axis]))
            inner = int(np.prod(in_shape[axis + 1 :]))
            ctx.set(node.outputs[0], 1, np.tile(np.repeat(labels, inner), outer))
            return
        got = merge_labels(in_shape, axis, labels, out_shape)
        if got is None:
            self.split(ctx, node, in_shape, axis, labels, out_shape)
            return
        b, out_labels = got
        # the target shape must be rewritable at position b
        plan = _shape_vector_plan(ctx, node.inputs[1], b, out_labels)
        if plan is None:
            ctx.block(labels, f"Reshape '{node.name}': its shape computation cannot be rewritten")
            return
        if plan != "keep":
            ctx.fixes.append(ShapeFix(self, node, {"pos": b, "labels": out_labels, "plan": plan}))
        ctx.set(node.outputs[0], b, out_labels)

    def split(
        self,
        ctx: Context,
        node: gs.Node,
        in_shape: tuple[int, ...],
        axis: int,
        labels: Labels,
        out_shape: tuple[int, ...],
    ) -> None:
        """A Reshape that splits the channel axis into attention heads ``(H, Dh)``
        (:func:`heads.split_heads`): the elements of each head become one unit, the head axis
        carries one label per head and a hard-coded head count is rewritten; other splits
        block."""
        sp = split_heads(in_shape, axis, labels, out_shape)
        if sp is None:
            ctx.block(
                labels, f"Reshape '{node.name}' splits the channel axis {in_shape}->{out_shape}"
            )
            return
        plan = _shape_vector_plan(ctx, node.inputs[1], sp.axis, sp.head_labels)
        if plan is None:
            ctx.block(
                labels, f"Reshape '{node.name}': its head count cannot be rewritten (computed)"
            )
            return
        ctx.tie(*sp.ties)
        if plan != "keep":
            info = {"pos": sp.axis, "labels": sp.head_labels, "plan": plan}
            ctx.fixes.append(ShapeFix(self, node, info))
        ctx.set(node.outputs[0], sp.axis, sp.head_labels)

    def apply(self, model: Model, fix: ShapeFix, keep_elem: np.ndarray) -> None:
        node, info = fix.node, fix.info
        width = len(kept_positions(info["labels"], keep_elem))
        plan = info["plan"]
        if plan[0] == "const":
            shape = constant(node.inputs[1], model.opset)
            assert shape is not None  # the analysis found it constant
            v = np.array(np.atleast_1d(shape), copy=True)
            v[plan[1]] = width
            replace_input(node, 1, v, "shape")
            return
        cat = node.inputs[1].inputs[0]
        k, off = plan[1], plan[2]
        piece = cat.inputs[k]
        piece_value = constant(piece, model.opset)
        assert piece_value is not None  # the analysis found it constant
        pv = np.array(np.atleast_1d(piece_value), copy=True)
        dtype = piece.dtype if piece.dtype is not None else pv.dtype
        pv = pv.astype(dtype)
        pv[off] = width
        # the Concat may feed other consumers: give this Reshape its own copy
        if len(cat.outputs[0].outputs) > 1:
            new_out = gs.Variable(
                f"{cat.outputs[0].name}_pruned_{node.name}", dtype=cat.outputs[0].dtype
            )
            new_cat = gs.Node(
                "Concat",
                f"{cat.name}_pruned_{node.name}",
                attrs=dict(cat.attrs),
                inputs=list(cat.inputs),
                outputs=[new_out],
            )
            node.inputs[1] = new_out
            # right before the Reshape, not at the end: the written model was not sorted
            # (bench/corpus.py: nudenet-yolov8n prune refused its own file, exit 2)
            insert_nodes(model.graph, [new_cat])
            cat = new_cat
        replace_input(cat, k, pv, "shape")


# ---------------------------------------------------------------------------------- concat, split
@register
class Concat(OpHandler):
    """Concat on the labelled axis concatenates label arrays (unlabelled inputs give -1
    positions); on another axis every input must hold the same channels, which are tied."""

    ops = ("Concat",)

    def analyze(self, ctx: Context, node: gs.Node) -> None:
        labs = [ctx.get(i) for i in node.inputs]
        if all(lab is None for lab in labs):
            return
        r = rank(node.outputs[0])
        if r is None:
            ctx.block_inputs(node, f"Concat '{node.name}' has an unknown rank")
            return
        cat = int(node.attrs["axis"]) % r
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
                    s = static_shape(t) if isinstance(t, gs.Variable) else np.shape(t.values)
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
                ctx.block(
                    base, f"Concat '{node.name}' joins channels with the unprunable '{t.name}'"
                )
                return
            if len(lab[1]) != len(base):
                ctx.block_inputs(node, f"Concat '{node.name}' widths differ")
                return
            ctx.tie(base, lab[1])
        ctx.set(node.outputs[0], axis, base)


@register
class Split(OpHandler):
    """Split on the labelled axis cuts the label array; its sizes (attribute, input, or equal
    parts) are rewritten to the kept widths. Runtime sizes block."""

    ops = ("Split",)

    def analyze(self, ctx: Context, node: gs.Node) -> None:
        lab = ctx.get(node.inputs[0])
        if lab is None:
            return
        axis, labels = lab
        r = rank(node.inputs[0]) or 0
        a = int(node.attrs.get("axis", 0)) % r
        if a != axis:
            for o in node.outputs:
                ctx.set(o, axis, labels)
            return
        sizes = []
        for o in node.outputs:
            s = static_shape(o)
            if s is None:
                ctx.block(labels, f"Split '{node.name}' has unknown output shapes")
                return
            sizes.append(s[axis])
        if len(node.inputs) > 1 and node.inputs[1].name and ctx.value(node.inputs[1]) is None:
            ctx.block(labels, f"Split '{node.name}' has runtime split sizes")
            return
        outs = np.split(labels, np.cumsum(sizes)[:-1])
        for o, part in zip(node.outputs, outs):
            ctx.set(o, axis, part)
        ctx.fixes.append(ShapeFix(self, node, {"parts": outs}))

    def apply(self, model: Model, fix: ShapeFix, keep_elem: np.ndarray) -> None:
        node = fix.node
        sizes = np.array([len(kept_positions(p, keep_elem)) for p in fix.info["parts"]], np.int64)
        if "split" in node.attrs:
            node.attrs["split"] = [int(s) for s in sizes]
        elif len(node.inputs) > 1 and node.inputs[1].name:
            replace_input(node, 1, sizes, "split")
        elif model.opset >= 13:
            node.attrs.pop("num_outputs", None)
            while len(node.inputs) < 2:
                node.inputs.append(gs.Variable.empty())
            node.inputs[1] = gs.Constant(f"{node.name}_split_pruned", sizes)
        else:
            node.attrs["split"] = [int(s) for s in sizes]


@register
class Slice(OpHandler):
    """Slice over the labelled axis (step 1) cuts the label array; its bounds on that axis are
    rewritten to the kept positions. Runtime bounds or other steps block."""

    ops = ("Slice",)

    def analyze(self, ctx: Context, node: gs.Node) -> None:
        lab = ctx.get(node.inputs[0])
        if lab is None:
            return
        axis, labels = lab
        r = rank(node.inputs[0]) or 0
        if len(node.inputs) > 1:
            vals = [
                ctx.value(node.inputs[i]) if len(node.inputs) > i and node.inputs[i].name else None
                for i in range(1, 5)
            ]
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
        axes = [int(a) % r for a in axes]
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
        ctx.fixes.append(
            ShapeFix(
                self,
                node,
                {"k": k, "labels": labels, "s": s, "e": e, "opset10": len(node.inputs) > 1},
            )
        )
        ctx.set(node.outputs[0], axis, labels[s:e])

    def apply(self, model: Model, fix: ShapeFix, keep_elem: np.ndarray) -> None:
        node, info = fix.node, fix.info
        labels, s, e, k = info["labels"], info["s"], info["e"], info["k"]
        ns = len(kept_positions(labels[:s], keep_elem))
        ne = ns + len(kept_positions(labels[s:e], keep_elem))
        if info["opset10"]:
            st0 = constant(node.inputs[1], model.opset)
            en0 = constant(node.inputs[2], model.opset)
            assert st0 is not None and en0 is not None
            st = np.array(st0, dtype=np.int64).copy()
            en = np.array(en0, dtype=np.int64).copy()
            st[k], en[k] = ns, ne
            replace_input(node, 1, st.astype(st0.dtype), "start")
            replace_input(node, 2, en.astype(en0.dtype), "end")
        else:
            sl, el = list(node.attrs["starts"]), list(node.attrs["ends"])
            sl[k], el[k] = ns, ne
            node.attrs["starts"], node.attrs["ends"] = sl, el


@register
class Pad(OpHandler):
    """Pad passes the labels through unless it pads the labelled axis (or pads at run time)."""

    ops = ("Pad",)

    def analyze(self, ctx: Context, node: gs.Node) -> None:
        lab = ctx.get(node.inputs[0])
        if lab is None:
            return
        axis, labels = lab
        r = rank(node.inputs[0]) or 0
        pads = node.attrs.get("pads")
        if pads is None and len(node.inputs) > 1:
            pads = ctx.value(node.inputs[1])
        pad_axes = _axes_of(ctx, node, 3, "__none__") if len(node.inputs) > 3 else list(range(r))
        if pads is None or pad_axes is None:
            ctx.block(labels, f"Pad '{node.name}' has runtime pads")
            return
        pad_axes = [a % r for a in pad_axes] or list(range(r))
        pads = [int(p) for p in pads]
        n = len(pad_axes)
        if axis in pad_axes:
            k = pad_axes.index(axis)
            if pads[k] or pads[k + n]:
                ctx.block(labels, f"Pad '{node.name}' pads the channel axis")
                return
        ctx.set(node.outputs[0], axis, labels)


@register
class Gather(OpHandler):
    """Gather along another axis moves the labelled axis by the indices' rank; along it, or with
    labelled indices, it blocks."""

    ops = ("Gather",)

    def analyze(self, ctx: Context, node: gs.Node) -> None:
        lab = ctx.get(node.inputs[0])
        if ctx.get(node.inputs[1]) is not None:
            ctx.block_inputs(node, f"Gather '{node.name}' indexes with channels")
            return
        if lab is None:
            return
        axis, labels = lab
        r = rank(node.inputs[0]) or 0
        a = int(node.attrs.get("axis", 0)) % r
        if a == axis:
            ctx.block(labels, f"Gather '{node.name}' gathers along the channel axis")
            return
        irank = rank(node.inputs[1])
        if irank is None:
            ctx.block(labels, f"Gather '{node.name}' indices of unknown rank")
            return
        ctx.set(node.outputs[0], axis if axis < a else axis + irank - 1, labels)


@register
class ShapeOf(OpHandler):
    """Shape/Size: runtime shapes follow the pruned tensors by themselves."""

    ops = ("Shape", "Size")

    def analyze(self, ctx: Context, node: gs.Node) -> None:
        return


# ---------------------------------------------------------------------------------- weight layers
def _slice_bias(ctx: Context, node: gs.Node, labels: Labels) -> None:
    """Slice a Conv/ConvTranspose bias with its output channels; block if it is fed at run time."""
    if len(node.inputs) > 2 and node.inputs[2].name:
        if not ctx.slice_const(node, 2, 0, labels, "producer"):
            ctx.block(labels, f"{node.op} '{node.name}' has a non-constant bias")


@register
class Conv(OpHandler):
    """Conv weights are [Cout, Cin/g, k...]; ConvTranspose weights are [Cin, Cout/g, k...]: the
    output channels sit on weight axis 0 or 1 and the input channels on the other one. A layer
    with group 1 is a producer (and a consumer of its input's channels). A depthwise layer
    (weight [C, 1, k...], group == C) passes its input's channel set through and gets the kept
    width as ``group``. Other grouped layers block."""

    ops = ("Conv", "ConvTranspose")

    def analyze(self, ctx: Context, node: gs.Node) -> None:
        lab = ctx.get(node.inputs[0])
        w = ctx.value(node.inputs[1])
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
            ctx.fixes.append(ShapeFix(self, node, {"labels": labels}))
            ctx.touch(node, labels)
            ctx.set(node.outputs[0], 1, labels)
            return
        ctx.block(
            lab[1] if lab else None,
            f"grouped {node.op} '{node.name}' (group={group}) is not handled",
        )

    def apply(self, model: Model, fix: ShapeFix, keep_elem: np.ndarray) -> None:
        fix.node.attrs["group"] = int(len(kept_positions(fix.info["labels"], keep_elem)))


@register
class Gemm(OpHandler):
    """Gemm with a constant B (not transposed A): a producer of B's output columns and a
    consumer of A's labelled columns; a per-column C is sliced."""

    ops = ("Gemm",)

    def analyze(self, ctx: Context, node: gs.Node) -> None:
        lab = ctx.get(node.inputs[0])
        if ctx.get(node.inputs[1]) is not None or (
            len(node.inputs) > 2 and ctx.get(node.inputs[2])
        ):
            ctx.block_inputs(node, f"Gemm '{node.name}' takes channels in B or C")
            return
        w = ctx.value(node.inputs[1])
        tb = int(node.attrs.get("transB", 0))
        if w is None or node.attrs.get("transA", 0):
            ctx.block(
                lab[1] if lab else None, f"Gemm '{node.name}' is transposed or has no constant B"
            )
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
            c = ctx.value(node.inputs[2])
            if c is not None and c.ndim >= 1 and c.shape[-1] == len(out):
                ctx.slice_const(node, 2, c.ndim - 1, out, "producer")
            elif c is None or c.ndim and c.shape[-1] != 1:
                ctx.block(out, f"Gemm '{node.name}' has a non-constant C")
        ctx.touch(node, out)
        ctx.set(node.outputs[0], 1, out)


@register
class MatMul(OpHandler):
    """MatMul with a constant 2-D weight: a producer of its columns and a consumer of the labels
    on A's last axis; labels on another axis of A pass through as batch dims (blocked). A MatMul
    of two activations passes labels on a shared batch axis (attention heads,
    :func:`heads.batched_matmul`) and blocks others."""

    ops = ("MatMul",)

    def analyze(self, ctx: Context, node: gs.Node) -> None:
        a, b = node.inputs[0], node.inputs[1]
        la, lb = ctx.get(a), ctx.get(b)
        w = ctx.value(b)
        ra = rank(a)
        if w is None:
            if la is None and lb is None:
                return
            # two activations: attention's q @ k^T and probs @ v carry heads on a batch axis
            got = batched_matmul(la, lb, _shape_of(a), _shape_of(b))
            if isinstance(got, str):
                ctx.block_inputs(node, f"MatMul '{node.name}' multiplies two activations: {got}")
                return
            if got.tie is not None:
                ctx.tie(*got.tie)
            ctx.touch(node, got.labels)
            ctx.set(node.outputs[0], got.axis, got.labels)
            return
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
        ctx.set(node.outputs[0], (rank(node.outputs[0]) or ra) - 1, out)
