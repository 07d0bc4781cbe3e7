"""Static cost model: MACs, FLOPs, parameters and activation memory of an ONNX model.

What is counted, and how:

* **MACs** (multiply-accumulates) for the ops whose work is a contraction, from tensor shapes only:

  - ``Conv`` / ``ConvInteger`` / ``QLinearConv`` / ``DeformConv`` / ``com.microsoft.FusedConv``:
    ``prod(Y.shape) * prod(W.shape[1:])`` = ``N * Cout * prod(out spatial) * Cin/group *
    prod(kernel)``. Strides, pads and dilations enter through the output shape; groups through
    ``W.shape[1] == Cin/group``.
  - ``ConvTranspose``: ``prod(X.shape) * prod(W.shape[1:])`` = ``N * Cin * prod(in spatial) *
    Cout/group * prod(kernel)`` (every input pixel is scattered through the kernel).
  - ``Gemm`` / ``com.microsoft.FusedGemm``: ``M * N * K``, ``K`` read from ``A`` (or ``B``)
    honouring ``transA`` / ``transB``.
  - ``MatMul`` / ``MatMulInteger`` / ``QLinearMatMul`` / ``com.microsoft.FusedMatMul``:
    ``prod(Y.shape) * K``, which is ``prod(broadcast batch dims) * M * N * K`` and is also right
    for 1-D operands (their dimension is dropped from ``Y``).
  - ``LSTM`` / ``GRU`` / ``RNN``: ``seq * batch * (prod(W.shape) + prod(R.shape))`` (input and
    recurrent projections of every gate and direction; the gate nonlinearities are in FLOPs).

* **FLOPs** = ``2 * MACs`` for those ops, plus one add per output element for a bias input, plus
  per-element estimates for everything else: elementwise arithmetic 1 per output element,
  transcendental activations (Exp, Sigmoid, Tanh, Erf, ...) a few (see ``_ELEMENTWISE``),
  pooling ``prod(kernel_shape)`` per output element, global pooling and reductions 1 per input
  element, BatchNormalization 2 per element, Layer/Instance/Group normalization 5, Softmax 3,
  Resize 1 per output element. Data movement (Reshape, Transpose, Concat, Gather, Slice, Cast,
  ...) is 0. These are the usual rough conventions (as in fvcore / onnx-tool), not exact counts.

* **Parameters**: elements and bytes of every unique constant of the model (initializers of the
  main graph and of subgraphs, counted once by name however many nodes read them) plus the value
  of every ``Constant`` node. Per node, ``params`` is the size of the constant inputs the node
  reads (a ``gs.Constant`` or the output of a ``Constant`` node), so a shared weight shows up in
  each of its readers' rows but only once in the model total; ``Constant`` nodes themselves are
  given 0 so that their values are attributed to the ops that use them.

* **Activation memory**, over the tensors that are not parameters (graph inputs and outputs of
  non-``Constant`` nodes):

  - ``activation_bytes_naive``: one buffer per tensor, all summed (subgraph tensors included).
  - ``activation_bytes_peak``: the largest live total over the steps of the node order, from
    the liveness model the memory planner uses (:mod:`graphopt.core.liveness`): a tensor is live
    from the step of its producer to its last reader, graph inputs from the first step, graph
    outputs to the last; a node's inputs and outputs are live together; a node with subgraphs
    (If/Loop/Scan) has an enter and an exit step around its bodies' steps (the branches of an If
    one after the other), and the outer tensors its bodies read stay live up to its exit step. It
    equals the memory plan's plain lower bound at alignment 1 (``graphopt plan`` rounds every
    tensor up to 64 bytes first).

Shapes come from the tensors (``gs.Variable.shape``/``dtype``), so run shape inference first
(:func:`graphopt.core.shapes.infer_shapes`). Where a shape is symbolic or missing the node's
MACs/FLOPs are 0 (logged at DEBUG) and the tensor's bytes are left out of the activation totals and
counted in ``unknown_shapes``. Everything is one pass over the nodes: linear in the model size.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt.core.graph import constant_nbytes, node_subgraphs
from graphopt.core.liveness import liveness
from graphopt.core.model import Model

logger = logging.getLogger(__name__)

__all__ = ["ModelCost", "NodeCost", "model_cost", "node_flops", "node_macs", "tensor_bytes"]

#: data types packed two to a byte
_HALF_BYTE_TYPES = frozenset({"int4", "uint4", "float4_e2m1fn"})


# ---------------------------------------------------------------------------------- results


@dataclass
class NodeCost:
    """Cost of one node.

    Attributes:
        name: node name.
        op: op type, prefixed with its domain outside the default one
            (``com.microsoft.FusedConv``).
        macs: multiply-accumulates (0 for ops without a contraction or with unknown shapes).
        flops: floating point operations (estimate, see the module docstring).
        params: elements of the constant inputs this node reads.
        param_bytes: bytes of those constant inputs.
        output_bytes: bytes of the node's outputs whose size is known.
    """

    name: str
    op: str
    macs: int
    flops: int
    params: int
    param_bytes: int
    output_bytes: int


@dataclass
class ModelCost:
    """Cost of a whole model (see the module docstring for what each figure means).

    Attributes:
        nodes: per-node costs, main graph in graph order, each node followed by the nodes of its
            subgraphs (both If branches, Loop/Scan bodies once).
        params: elements of the unique constants (initializers and Constant-node values).
        param_bytes: bytes of the same.
        macs: total multiply-accumulates.
        flops: total FLOPs.
        activation_bytes_naive: bytes of every activation tensor, one buffer each.
        activation_bytes_peak: largest live total of the liveness model (see the module docstring).
        peak_node: name of the main-graph node at which the peak happens (the node holding the
            subgraph when it happens inside one; None when the graph has no nodes).
        unknown_shapes: activation tensors whose size could not be computed.
    """

    nodes: list[NodeCost]
    params: int
    param_bytes: int
    macs: int
    flops: int
    activation_bytes_naive: int
    activation_bytes_peak: int
    peak_node: str | None
    unknown_shapes: int

    def by_op(self) -> dict[str, dict[str, int]]:
        """Totals per op type.

        Returns:
            ``op -> {"count", "macs", "flops", "params"}``, ops sorted by MACs then count,
            descending.
        """
        acc: dict[str, dict[str, int]] = {}
        for nc in self.nodes:
            row = acc.setdefault(nc.op, {"count": 0, "macs": 0, "flops": 0, "params": 0})
            row["count"] += 1
            row["macs"] += nc.macs
            row["flops"] += nc.flops
            row["params"] += nc.params
        return dict(sorted(acc.items(), key=lambda kv: (-kv[1]["macs"], -kv[1]["count"], kv[0])))


# ---------------------------------------------------------------------------------- tensors


def _static_shape(t: gs.Tensor | None) -> tuple[int, ...] | None:
    """The tensor's shape when every dim is a known non-negative int, else None."""
    if t is None:
        return None
    if isinstance(t, gs.Constant):
        return tuple(int(d) for d in t.shape)
    shape = t.shape
    if shape is None:
        producer = t.inputs[0] if len(t.inputs) == 1 else None
        value = producer.attrs.get("value") if producer is not None else None
        if producer is None or producer.op != "Constant" or not isinstance(value, gs.Constant):
            return None
        shape = value.shape  # a Constant node's output that shape inference did not annotate
    out = []
    for d in shape:
        if type(d) is int:  # the common case, without the isinstance chain
            if d < 0:
                return None
            out.append(d)
        elif not isinstance(d, (int, np.integer)) or isinstance(d, bool) or d < 0:
            return None
        else:
            out.append(int(d))
    return tuple(out)


def _numel(shape: Sequence[int]) -> int:
    return math.prod(shape)


#: :func:`_itemsize` by ``(type(dtype), dtype)``: asked for every tensor of every walk, from a
#: handful of dtypes (numpy's ``dtype.name`` alone costs microseconds)
_ITEMSIZES: dict[tuple[type, object], tuple[int, int] | None] = {}


def _itemsize(dtype: object) -> tuple[int, int] | None:
    """(numerator, denominator) bytes per element, or None when unknown."""
    try:
        return _ITEMSIZES[(type(dtype), dtype)]
    except (KeyError, TypeError):  # not seen yet, or unhashable
        pass
    size = _itemsize_uncached(dtype)
    try:
        _ITEMSIZES[(type(dtype), dtype)] = size
    except TypeError:
        pass
    return size


def _itemsize_uncached(dtype: object) -> tuple[int, int] | None:
    if dtype is None:
        return None
    if isinstance(dtype, (int, np.integer)) and not isinstance(dtype, bool):  # onnx enum
        name = onnx.TensorProto.DataType.Name(int(dtype)).lower()
        if name in ("int4", "uint4", "float4e2m1"):
            return (1, 2)
        if name in ("undefined", "string"):
            return None
        try:
            return (onnx.helper.tensor_dtype_to_np_dtype(int(dtype)).itemsize, 1)
        except (KeyError, TypeError, ValueError):
            return None
    try:
        dt = np.dtype(dtype)  # type: ignore[call-overload]
    except TypeError:
        return None
    if dt.name in _HALF_BYTE_TYPES:
        return (1, 2)
    if dt.kind in ("O", "U", "S", "V"):
        return None
    return (dt.itemsize, 1)


def tensor_bytes(t: gs.Tensor) -> int | None:
    """Bytes of a tensor.

    Args:
        t: a ``gs.Constant`` (its stored size) or a ``gs.Variable`` (shape times item size).

    Returns:
        The size in bytes, or None when the shape is not static or the dtype is unknown.
    """
    if isinstance(t, gs.Constant):
        return constant_nbytes(t)
    shape = _static_shape(t)
    if shape is None:
        return None
    size = _itemsize(t.dtype)
    if size is None:
        return None
    num, den = size
    return -(-_numel(shape) * num // den)


# ---------------------------------------------------------------------------------- MACs


def _inp(node: gs.Node, i: int) -> gs.Tensor | None:
    """Input ``i`` of a node, None when absent or left empty."""
    if i < len(node.inputs):
        t = node.inputs[i]
        if t.name or isinstance(t, gs.Constant):
            return t
    return None


def _out_shape(node: gs.Node) -> tuple[int, ...] | None:
    return _static_shape(node.outputs[0]) if node.outputs else None


def _conv_like(w_index: int) -> Callable[[gs.Node], int | None]:
    def macs(node: gs.Node) -> int | None:
        y, w = _out_shape(node), _static_shape(_inp(node, w_index))
        if y is None or w is None or len(w) < 2:
            return None
        return _numel(y) * _numel(w[1:])

    return macs


def _conv_transpose(node: gs.Node) -> int | None:
    x, w = _static_shape(_inp(node, 0)), _static_shape(_inp(node, 1))
    if x is None or w is None or len(w) < 2:
        return None
    return _numel(x) * _numel(w[1:])


def _gemm(node: gs.Node) -> int | None:
    y = _out_shape(node)
    if y is None:
        return None
    a, b = _static_shape(_inp(node, 0)), _static_shape(_inp(node, 1))
    if a is not None and len(a) == 2:
        k = a[0] if node.attrs.get("transA", 0) else a[1]
    elif b is not None and len(b) == 2:
        k = b[1] if node.attrs.get("transB", 0) else b[0]
    else:
        return None
    return _numel(y) * k


def _matmul_like(a_index: int, b_index: int) -> Callable[[gs.Node], int | None]:
    def macs(node: gs.Node) -> int | None:
        y = _out_shape(node)
        if y is None:
            return None
        a, b = _static_shape(_inp(node, a_index)), _static_shape(_inp(node, b_index))
        if a is not None and len(a) >= 1:
            k = a[-2] if len(a) >= 2 and node.attrs.get("transA", 0) else a[-1]
        elif b is not None and len(b) >= 1:
            if len(b) == 1:
                k = b[0]
            else:
                k = b[-1] if node.attrs.get("transB", 0) else b[-2]
        else:
            return None
        return _numel(y) * k

    return macs


def _rnn(node: gs.Node) -> int | None:
    x = _static_shape(_inp(node, 0))
    w, r = _static_shape(_inp(node, 1)), _static_shape(_inp(node, 2))
    if x is None or w is None or r is None or len(x) < 2:
        return None
    return x[0] * x[1] * (_numel(w) + _numel(r))


#: op (with domain prefix outside the default domain) -> (MACs function, bias input index or -1)
_MAC_OPS: dict[str, tuple[Callable[[gs.Node], int | None], int]] = {
    "Conv": (_conv_like(1), 2),
    "ConvInteger": (_conv_like(1), -1),
    "QLinearConv": (_conv_like(3), 8),
    "DeformConv": (_conv_like(1), 3),
    "com.microsoft.FusedConv": (_conv_like(1), 2),
    "com.microsoft.NhwcConv": (_conv_like(1), 2),
    "ConvTranspose": (_conv_transpose, 2),
    "Gemm": (_gemm, 2),
    "com.microsoft.FusedGemm": (_gemm, 2),
    "MatMul": (_matmul_like(0, 1), -1),
    "MatMulInteger": (_matmul_like(0, 1), -1),
    "QLinearMatMul": (_matmul_like(0, 3), -1),
    "com.microsoft.FusedMatMul": (_matmul_like(0, 1), -1),
    "LSTM": (_rnn, -1),
    "GRU": (_rnn, -1),
    "RNN": (_rnn, -1),
}

#: per-output-element FLOPs of the gate nonlinearities of recurrent ops, per hidden unit and gate
_RNN_GATE_FLOPS = {"LSTM": 4 * 4 + 3, "GRU": 3 * 4 + 4, "RNN": 4}


def _op_key(node: gs.Node) -> str:
    dom = node.domain
    return node.op if dom in (None, "", "ai.onnx") else f"{dom}.{node.op}"


def node_macs(node: gs.Node) -> int:
    """Multiply-accumulates of one node (0 for non-contraction ops and unknown shapes).

    Args:
        node: a graphsurgeon node whose input/output tensors carry shapes.

    Returns:
        The MAC count.
    """
    entry = _MAC_OPS.get(_op_key(node))
    if entry is None:
        return 0
    macs = entry[0](node)
    if macs is None:
        logger.debug(
            "cost: %s '%s' has symbolic or missing shapes; MACs counted as 0", node.op, node.name
        )
        return 0
    return int(macs)


# ---------------------------------------------------------------------------------- FLOPs

#: FLOPs per output element of elementwise ops
_ELEMENTWISE: dict[str, int] = {
    **dict.fromkeys(
        [
            "Add",
            "Sub",
            "Mul",
            "Div",
            "Mod",
            "Pow",
            "Max",
            "Min",
            "Mean",
            "Sum",
            "Where",
            "Equal",
            "Greater",
            "GreaterOrEqual",
            "Less",
            "LessOrEqual",
            "And",
            "Or",
            "Xor",
            "Not",
            "BitShift",
            "BitwiseAnd",
            "BitwiseOr",
            "BitwiseXor",
            "BitwiseNot",
            "Abs",
            "Neg",
            "Sign",
            "Relu",
            "LeakyRelu",
            "PRelu",
            "ThresholdedRelu",
            "Clip",
            "Floor",
            "Ceil",
            "Round",
            "Reciprocal",
            "IsNaN",
            "IsInf",
            "Shrink",
        ],
        1,
    ),
    **dict.fromkeys(["HardSigmoid", "Sqrt", "Celu", "Elu", "Selu"], 3),
    **dict.fromkeys(
        ["HardSwish", "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"], 2
    ),
    **dict.fromkeys(
        [
            "Exp",
            "Log",
            "Sigmoid",
            "Tanh",
            "Erf",
            "Sin",
            "Cos",
            "Tan",
            "Asin",
            "Acos",
            "Atan",
            "Sinh",
            "Cosh",
            "Asinh",
            "Acosh",
            "Atanh",
            "Softplus",
            "Softsign",
            "com.microsoft.QuickGelu",
        ],
        4,
    ),
    **dict.fromkeys(
        ["Mish", "Gelu", "com.microsoft.Gelu", "com.microsoft.BiasGelu", "com.microsoft.FastGelu"],
        8,
    ),
    "BatchNormalization": 2,
    **dict.fromkeys(
        [
            "LayerNormalization",
            "InstanceNormalization",
            "GroupNormalization",
            "LpNormalization",
            "MeanVarianceNormalization",
            "com.microsoft.SimplifiedLayerNormalization",
            "RMSNormalization",
        ],
        5,
    ),
    "com.microsoft.SkipLayerNormalization": 6,
    **dict.fromkeys(["Softmax", "LogSoftmax", "Hardmax"], 3),
    **dict.fromkeys(["Resize", "Upsample"], 1),
}

#: FLOPs per input element of reductions and global pooling
_PER_INPUT: dict[str, int] = {
    **dict.fromkeys(
        [
            "GlobalAveragePool",
            "GlobalMaxPool",
            "ReduceMean",
            "ReduceSum",
            "ReduceMax",
            "ReduceMin",
            "ReduceProd",
            "ReduceL1",
            "ArgMax",
            "ArgMin",
            "ReduceLogSumExp",
            "CumSum",
        ],
        1,
    ),
    **dict.fromkeys(["ReduceL2", "ReduceSumSquare", "GlobalLpPool", "ReduceLogSum"], 2),
}

_POOL = frozenset({"MaxPool", "AveragePool", "LpPool", "MaxRoiPool", "QLinearAveragePool"})


def node_flops(node: gs.Node, macs: int | None = None) -> int:
    """Floating point operations of one node (an estimate, see the module docstring).

    Args:
        node: a graphsurgeon node whose tensors carry shapes.
        macs: the node's MACs when already known (saves recomputing them).

    Returns:
        The FLOP count (0 for data movement and unknown shapes).
    """
    key = _op_key(node)
    entry = _MAC_OPS.get(key)
    if entry is not None:
        macs = node_macs(node) if macs is None else macs
        flops = 2 * macs
        y = _out_shape(node)
        if y is not None:
            if entry[1] >= 0 and _inp(node, entry[1]) is not None:
                flops += _numel(y)
            if key == "com.microsoft.FusedConv" and node.attrs.get("activation"):
                flops += _numel(y)
            if key in _RNN_GATE_FLOPS:
                flops += _RNN_GATE_FLOPS[key] * _numel(y)
        return flops
    per = _ELEMENTWISE.get(key)
    if per is not None:
        y = _out_shape(node)
        return per * _numel(y) if y is not None else _unknown(node)
    per = _PER_INPUT.get(key)
    if per is not None:
        x = _static_shape(_inp(node, 0))
        return per * _numel(x) if x is not None else _unknown(node)
    if key in _POOL:
        y = _out_shape(node)
        if y is None:
            return _unknown(node)
        kernel = node.attrs.get("kernel_shape") or node.attrs.get("pooled_shape") or [1]
        return _numel(y) * _numel([int(k) for k in kernel])
    return 0


def _unknown(node: gs.Node) -> int:
    logger.debug(
        "cost: %s '%s' has symbolic or missing shapes; FLOPs counted as 0", node.op, node.name
    )
    return 0


# ---------------------------------------------------------------------------------- model


def _constant_node_size(node: gs.Node) -> tuple[int, int]:
    """(elements, bytes) of the value a ``Constant`` node holds."""
    value = node.attrs.get("value")
    if isinstance(value, gs.Constant):
        return _numel(value.shape), constant_nbytes(value)
    if node.outputs:
        shape = _static_shape(node.outputs[0])
        nbytes = tensor_bytes(node.outputs[0])
        if shape is not None and nbytes is not None:
            return _numel(shape), nbytes
    for key in ("value_float", "value_int"):
        if key in node.attrs:
            return 1, 4 if key == "value_float" else 8
    for key in ("value_floats", "value_ints"):
        if key in node.attrs:
            n = len(node.attrs[key])
            return n, n * (4 if key == "value_floats" else 8)
    return 0, 0


@dataclass
class _GraphTotals:
    naive: int = 0
    unknown: int = 0


class _Coster:
    """One walk over the model; holds the maps shared by every graph."""

    def __init__(self) -> None:
        self.nodes: list[NodeCost] = []
        #: name -> (elements, bytes) of every unique constant (initializer or Constant output)
        self.constants: dict[str, tuple[int, int]] = {}
        self.totals = _GraphTotals()

    def _activation_bytes(self, t: gs.Tensor, seen: set[str]) -> int:
        """Bytes of an activation tensor (0 when unknown), counted once per graph into the naive
        totals."""
        nbytes = tensor_bytes(t)
        if t.name not in seen:
            seen.add(t.name)
            if nbytes is None:
                self.totals.unknown += 1
            else:
                self.totals.naive += nbytes
        return nbytes or 0

    def graph(self, g: gs.Graph) -> None:
        """Cost every node of ``g`` (recursing into subgraphs) and count its activations."""
        seen: set[str] = set()
        # constant outputs are parameters, not activations
        for node in g.nodes:
            if node.op == "Constant" and node.outputs and node.outputs[0].name:
                self.constants.setdefault(node.outputs[0].name, _constant_node_size(node))
        for node in g.nodes:
            for t in node.inputs:
                if isinstance(t, gs.Constant) and t.name not in self.constants:
                    self.constants[t.name] = (_numel(t.shape), constant_nbytes(t))
        for t in g.inputs:
            if t.name in self.constants or isinstance(t, gs.Constant):
                continue
            self._activation_bytes(t, seen)
        for node in g.nodes:
            self._node(node)
            for sub in node_subgraphs(node):
                self.graph(sub)
            if node.op != "Constant":
                for t in node.outputs:
                    if t.name:
                        self._activation_bytes(t, seen)

    def _node(self, node: gs.Node) -> None:
        key = _op_key(node)
        if node.op == "Constant":
            macs = flops = params = pbytes = 0
        else:
            macs = node_macs(node)
            flops = node_flops(node, macs)
            params = pbytes = 0
            for t in node.inputs:
                c = self.constants.get(t.name) if t.name else None
                if c is None and isinstance(t, gs.Constant):
                    c = (_numel(t.shape), constant_nbytes(t))
                if c is not None:
                    params += c[0]
                    pbytes += c[1]
        out_bytes = 0
        for t in node.outputs:
            if t.name:
                out_bytes += tensor_bytes(t) or 0
        self.nodes.append(
            NodeCost(
                name=node.name,
                op=key,
                macs=macs,
                flops=flops,
                params=params,
                param_bytes=pbytes,
                output_bytes=out_bytes,
            )
        )


def model_cost(model: Model) -> ModelCost:
    """Cost a whole model. Nothing in the model is changed.

    Args:
        model: the model, with shapes filled in (see :func:`graphopt.core.shapes.infer_shapes`);
            tensors with symbolic shapes are skipped and counted in ``unknown_shapes``.

    Returns:
        The per-node and total costs.
    """
    coster = _Coster()
    coster.graph(model.graph)
    live = liveness(model)
    peak, step = live.peak()
    peak_node = live.step_owners[step] if model.graph.nodes and live.step_owners else None
    nodes = coster.nodes
    macs = sum(nc.macs for nc in nodes)
    flops = sum(nc.flops for nc in nodes)
    params = sum(c[0] for c in coster.constants.values())
    pbytes = sum(c[1] for c in coster.constants.values())
    if coster.totals.unknown:
        logger.debug(
            "cost: %d activation tensors have symbolic or missing shapes", coster.totals.unknown
        )
    return ModelCost(
        nodes=nodes,
        params=params,
        param_bytes=pbytes,
        macs=macs,
        flops=flops,
        activation_bytes_naive=coster.totals.naive,
        activation_bytes_peak=peak,
        peak_node=peak_node,
        unknown_shapes=coster.totals.unknown,
    )
