"""Static int8 quantization of an ONNX graph as QuantizeLinear/DequantizeLinear (QDQ) pairs.

Planning (:func:`plan_quantization`) decides which nodes run quantized and which activation tensors
carry a Q/DQ pair; emission (:func:`apply_quantization`) rewrites the graph given each tensor's
calibrated range.

Arithmetic. An activation tensor with calibrated range ``[lo, hi]`` (widened to contain 0) is
quantized affinely, ``q = clamp(round(x / s) + z, qmin, qmax)`` with ``s = (hi - lo) / 255`` and ``z
= qmin - round(lo / s)`` (uint8: ``[0, 255]``; int8: ``[-128, 127]``), so a range starting at 0
(after Relu/Clip) has ``z = qmin`` exactly. Weights are symmetric int8, per output channel by
default: ``s_c = max|W_c| / qmax`` with ``qmax = 127`` (``63`` with ``reduce_range``, the 7-bit
weights that keep the AVX2 ``vpmaddubsw`` u8 x s8 pair sums from saturating on CPUs without VNNI),
``W_q = round(W / s_c)``. A Conv/Gemm bias becomes int32 with scale ``s_x * s_c`` and zero point 0,
which is what an integer kernel adds to its int32 accumulator.

Placement. Every quantized tensor ``T`` becomes ``T -> Q -> DQ -> T'``; a quantized producer hands
all its consumers ``T'``, a float producer only its quantized consumers. Onnxruntime's QDQ
transformer then fuses each ``{DQ inputs, op, Q output}`` group into an integer kernel (QLinearConv,
QLinearMatMul, QGemm, QLinearAdd, QLinearMul, QLinearConcat, QLinearAveragePool,
QLinearGlobalAveragePool, QLinearSigmoid, QLinearLeakyRelu) and drops DQ/Q around data-movement ops
(MaxPool, Resize, Reshape, Transpose, ...), which therefore get exactly their input's scale and zero
point. A Relu or Clip right after a quantized op is absorbed: the Q goes after the activation (its
range starts at 0, ``z = qmin``) and onnxruntime removes the activation, so ``Conv -> Relu -> Q``
runs as one QLinearConv. Graph outputs stay float. Per-channel DequantizeLinear needs opset 13; the
caller raises the opset first.
"""

from __future__ import annotations

import logging
import math
import platform
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt.core.const_eval import literal_value
from graphopt.core.errors import GraphoptError
from graphopt.core.graph import insert_nodes
from graphopt.core.model import Model
from graphopt.core.shapes import infer_shapes

logger = logging.getLogger(__name__)

COMPUTE_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
BINARY_OPS = {"Add", "Mul"}
#: single-input ops with an onnxruntime integer kernel (HardSigmoid/HardSwish have none: they run in
#: float between the DQ of their input and the Q of their consumer, which costs no more Q/DQ pairs)
UNARY_OPS = {"AveragePool", "GlobalAveragePool", "Sigmoid", "LeakyRelu"}
CONCAT_OPS = {"Concat"}
#: data-movement ops that run on the integer tensor unchanged (same scale and zero point)
SHARED_OPS = {
    "MaxPool",
    "Resize",
    "Reshape",
    "Transpose",
    "Flatten",
    "Squeeze",
    "Unsqueeze",
    "Slice",
    "Pad",
    "DepthToSpace",
    "SpaceToDepth",
    "Upsample",
}
#: activations onnxruntime folds into the following QuantizeLinear
ABSORBED_OPS = {"Relu", "Clip"}
QUANTIZABLE_OPS = COMPUTE_OPS | BINARY_OPS | UNARY_OPS | CONCAT_OPS | SHARED_OPS


@dataclass
class QNode:
    """One node planned to run quantized."""

    name: str
    op: str
    kind: str  # compute, binary, unary, concat, shared
    inputs: list[str]  # activation inputs that get a Q/DQ pair
    output: str | None  # the tensor quantized after it (after an absorbed Relu/Clip), or None
    absorbed: str | None = None  # name of the absorbed Relu/Clip node
    weight: str | None = None  # constant weight input (compute ops)
    bias: str | None = None


@dataclass
class QuantPlan:
    nodes: dict[str, QNode] = field(default_factory=dict)
    #: nodes left in float and why (only for quantizable op types)
    skipped: dict[str, str] = field(default_factory=dict)

    def tensors(self, only: Iterable[str] | None = None) -> list[str]:
        """Activation tensors that carry a Q/DQ pair, for all planned nodes or only some."""
        names = self.nodes if only is None else [n for n in only if n in self.nodes]
        out: dict[str, None] = {}
        for n in names:
            q = self.nodes[n]
            for t in q.inputs:
                out[t] = None
            if q.output:
                out[q.output] = None
        return list(out)

    def observed(self) -> list[str]:
        """Tensors whose range calibration must measure (shared-op outputs inherit theirs)."""
        inherited = {q.output for q in self.nodes.values() if q.kind == "shared" and q.output}
        return [t for t in self.tensors() if t not in inherited]

    def layers(self) -> list[str]:
        """Nodes that count as layers for sensitivity analysis (not data movement)."""
        return [n for n, q in self.nodes.items() if q.kind != "shared"]

    def drop(self, names: Iterable[str], reason: str) -> None:
        """Keep these nodes float, and shared ops that only followed them."""
        for n in list(names):
            if n in self.nodes:
                del self.nodes[n]
                self.skipped[n] = reason
        self._prune_shared()

    def _prune_shared(self) -> None:
        changed = True
        while changed:
            changed = False
            produced = {q.output for q in self.nodes.values() if q.kind != "shared" and q.output}
            consumed = {t for q in self.nodes.values() if q.kind != "shared" for t in q.inputs}
            for n, q in list(self.nodes.items()):
                if (
                    q.kind == "shared"
                    and q.inputs[0] not in produced
                    and q.inputs[0] not in consumed
                    and not any(
                        q.inputs[0] == o.output
                        for o in self.nodes.values()
                        if o.kind == "shared" and o is not q
                    )
                ):
                    del self.nodes[n]
                    self.skipped[n] = "its input is not quantized"
                    changed = True


def _is_float_act(t: gs.Tensor) -> bool:
    if not isinstance(t, gs.Variable) or literal_value(t) is not None:
        return False
    return t.dtype is not None and np.dtype(t.dtype) == np.float32


def _is_hardswish_mul(a: gs.Tensor, b: gs.Tensor) -> bool:
    for x, y in ((a, b), (b, a)):
        if (
            len(y.inputs) == 1
            and y.inputs[0].op in ("HardSigmoid", "Sigmoid")
            and y.inputs[0].inputs[0] is x
        ):
            return True
    return False


def plan_quantization(
    model: Model, keep_float: Iterable[str] = (), op_types: Iterable[str] | None = None
) -> QuantPlan:
    """Decide which nodes of the main graph run quantized (If/Loop bodies stay float)."""
    g = model.graph
    keep = set(keep_float)
    allowed = set(op_types) if op_types is not None else QUANTIZABLE_OPS
    outputs = {t.name for t in g.outputs}
    plan = QuantPlan()
    quantized_tensors: set[str] = set()  # outputs of quantized nodes
    for node in g.nodes:
        op = node.op
        if op not in QUANTIZABLE_OPS or node.domain not in (None, "", "ai.onnx"):
            continue
        if node.name in keep:
            plan.skipped[node.name] = "kept float on request"
            continue
        if op not in allowed:
            plan.skipped[node.name] = f"{op} not in the quantized op types"
            continue
        reason = None
        weight = bias = None
        acts: list[str] = []
        if op in COMPUTE_OPS:
            if op == "MatMul":
                a, b = node.inputs[0], node.inputs[1]
                if not _is_float_act(a):
                    reason = "input A is not a float activation"
                elif isinstance(b, gs.Constant) and b.dtype == np.float32 and len(b.shape) == 2:
                    acts, weight = [a.name], b.name
                elif _is_float_act(b):
                    acts = [a.name, b.name]
                else:
                    reason = "input B is neither a 2-D float weight nor a float activation"
            else:
                x = node.inputs[0]
                w = node.inputs[1] if len(node.inputs) > 1 else None
                if not _is_float_act(x):
                    reason = "input is not a float activation"
                elif not isinstance(w, gs.Constant) or w.dtype != np.float32:
                    reason = "weight is not a float constant initializer"
                elif op == "Gemm" and (node.attrs.get("transA", 0) or len(w.shape) != 2):
                    reason = "Gemm with transA"
                else:
                    acts, weight = [x.name], w.name
                    if len(node.inputs) > 2 and node.inputs[2].name:
                        b = node.inputs[2]
                        ok_bias = (
                            isinstance(b, gs.Constant)
                            and b.dtype == np.float32
                            and len(b.shape) == 1
                        )
                        if op == "Gemm" and float(node.attrs.get("beta", 1.0)) != 1.0:
                            ok_bias = False
                        if not ok_bias:
                            reason = "bias is not a 1-D float constant"
                        bias = b.name
            kind = "compute"
        elif op in BINARY_OPS:
            a, b = node.inputs[0], node.inputs[1]
            if not (_is_float_act(a) and _is_float_act(b)):
                reason = "one input is a constant (only activation x activation is quantized)"
            elif op == "Mul" and _is_hardswish_mul(a, b):
                reason = "x * HardSigmoid(x) is a HardSwish: stays float with its HardSigmoid"
            elif a.shape is not None and b.shape is not None and len(a.shape) != len(b.shape):
                reason = "inputs of different rank"
            acts, kind = [a.name, b.name], "binary"
        elif op in UNARY_OPS:
            if not _is_float_act(node.inputs[0]):
                reason = "input is not a float activation"
            acts, kind = [node.inputs[0].name], "unary"
        elif op in CONCAT_OPS:
            if not all(_is_float_act(t) for t in node.inputs):
                reason = "an input is a constant"
            acts, kind = [t.name for t in node.inputs], "concat"
        else:  # shared
            x = node.inputs[0]
            if not _is_float_act(x) or x.name not in quantized_tensors:
                continue  # only continues an integer path, never starts one
            if len(node.outputs) != 1:
                continue
            acts, kind = [x.name], "shared"
        if reason:
            plan.skipped[node.name] = reason
            logger.debug("quantize: %s (%s) stays float: %s", node.name, op, reason)
            continue
        out = node.outputs[0]
        out_name: str | None = out.name
        absorbed = None
        if out.dtype is None or np.dtype(out.dtype) != np.float32 or out.name in outputs:
            out_name = None
        elif kind != "shared" and len(out.outputs) == 1 and out.outputs[0].op in ABSORBED_OPS:
            act = out.outputs[0]
            aout = act.outputs[0]
            lo_ok = True
            if act.op == "Clip":
                lo = (
                    literal_value(act.inputs[1])
                    if len(act.inputs) > 1 and act.inputs[1].name
                    else np.float32(act.attrs.get("min", -np.inf))
                )
                lo_ok = (
                    lo is not None
                    and float(np.asarray(lo)) == 0.0
                    and (
                        len(act.inputs) < 3
                        or not act.inputs[2].name
                        or literal_value(act.inputs[2]) is not None
                    )
                )
            if lo_ok and aout.name not in outputs:
                out_name, absorbed = aout.name, act.name
        plan.nodes[node.name] = QNode(node.name, op, kind, acts, out_name, absorbed, weight, bias)
        if out_name:
            quantized_tensors.add(out_name)
    plan._prune_shared()
    return plan


# ---------------------------------------------------------------------- parameters


@dataclass
class QParams:
    scale: float
    zero_point: int
    dtype: np.dtype  # uint8 or int8


def activation_params(lo: float, hi: float, dtype: np.dtype) -> QParams:
    """Affine parameters for a real range (widened to contain 0)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    qmin, qmax = (0, 255) if np.dtype(dtype) == np.uint8 else (-128, 127)
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi - lo <= 0:
        return QParams(
            1.0, qmin if hi >= 0 and lo >= 0 else (qmin + qmax + 1) // 2, np.dtype(dtype)
        )
    scale = (hi - lo) / (qmax - qmin)
    zp = int(np.clip(round(qmin - lo / scale), qmin, qmax))
    return QParams(float(np.float32(scale)), zp, np.dtype(dtype))


#: weights are processed in blocks of about this many elements (bounded temporaries on huge layers)
_BLOCK_ELEMENTS = 1 << 22


def _blocks(w: np.ndarray) -> list[slice]:
    """Slices along axis 0 covering ``w`` in blocks of about ``_BLOCK_ELEMENTS`` elements."""
    rows = w.shape[0] if w.ndim else 1
    per_row = max(1, w.size // max(rows, 1))
    step = max(1, _BLOCK_ELEMENTS // per_row)
    return [slice(i, min(i + step, rows)) for i in range(0, rows, step)]


def weight_params(w: np.ndarray, axis: int | None, qmax: int) -> np.ndarray:
    """Symmetric scales (1-D per channel along ``axis``, or a 0-d per tensor).

    max|w| is exact in the weight's own precision, so it is taken block by block without a
    float64 copy of the whole tensor.
    """
    if w.ndim == 0 or w.size == 0:
        m = np.asarray(float(np.abs(w).max()) if w.size else 0.0, dtype=np.float64)
    elif axis is None:
        m = np.asarray(max(float(np.abs(w[b]).max()) for b in _blocks(w)), dtype=np.float64)
    else:
        wa = np.moveaxis(w, axis, 0)
        m = np.empty(wa.shape[0], dtype=np.float64)
        for b in _blocks(wa):
            m[b] = np.abs(wa[b]).reshape(b.stop - b.start, -1).max(axis=1)
    s = m / qmax
    s = np.where(s > 0, s, 1.0)
    return s.astype(np.float32)


def quantize_weight(w: np.ndarray, scales: np.ndarray, axis: int | None, qmax: int) -> np.ndarray:
    """``clip(round(w / s), -qmax, qmax)`` as int8, in float64, block by block."""
    if w.ndim == 0:
        return np.asarray(np.clip(np.round(float(w) / float(scales)), -qmax, qmax), np.int8)
    out = np.empty(w.shape, dtype=np.int8)
    if axis is None:
        src, dst, scale = w, out, np.float64(scales)
        for b in _blocks(src):
            dst[b] = np.clip(np.round(src[b].astype(np.float64) / scale), -qmax, qmax)
        return out
    src, dst = np.moveaxis(w, axis, 0), np.moveaxis(out, axis, 0)
    per = scales.astype(np.float64).reshape([-1] + [1] * (w.ndim - 1))
    for b in _blocks(src):
        dst[b] = np.clip(np.round(src[b].astype(np.float64) / per[b]), -qmax, qmax)
    return out


def weight_axis(q: QNode, w: np.ndarray, node: gs.Node, per_channel: bool) -> int | None:
    if not per_channel or w.ndim < 2:
        return None
    if q.op == "Conv":
        return 0
    if q.op == "ConvTranspose":
        return None  # output channels are split over groups on axis 1: keep per tensor
    if q.op == "Gemm":
        return 0 if node.attrs.get("transB", 0) else 1
    return w.ndim - 1  # MatMul: one scale per output column


# ---------------------------------------------------------------------- emission


@dataclass
class QuantConfig:
    activation_dtype: np.dtype = field(default_factory=lambda: np.dtype(np.uint8))
    per_channel: bool = True
    reduce_range: bool = False


@dataclass
class EmitStats:
    nodes: int = 0
    tensors: int = 0
    weights: int = 0
    biases: int = 0
    absorbed: int = 0
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)


def _unique(g: gs.Graph, base: str, taken: set[str]) -> str:
    name = base
    k = 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    taken.add(name)
    return name


def apply_quantization(
    model: Model,
    plan: QuantPlan,
    ranges: Mapping[str, tuple[float, float]],
    config: QuantConfig,
    only: Iterable[str] | None = None,
) -> EmitStats:
    """Insert Q/DQ pairs and quantized weights in place for the planned nodes (or ``only`` some).

    ``ranges`` gives the calibrated (lo, hi) of every observed tensor; a node whose tensors lack a
    range stays float. The caller makes sure the opset is >= 13 when ``per_channel`` is on.
    """
    g = model.graph
    tensors = g.tensors()
    node_by_name = {n.name: n for n in g.nodes}
    selected = [n for n in (plan.nodes if only is None else only) if n in plan.nodes]
    act_dtype = np.dtype(config.activation_dtype)
    qmax_w = 63 if config.reduce_range else 127
    stats = EmitStats()

    # parameters per tensor, shared ops inheriting their input's
    params: dict[str, QParams] = {}

    def tensor_params(t: str) -> QParams | None:
        if t in params:
            return params[t]
        for q in plan.nodes.values():
            if q.kind == "shared" and q.output == t:
                p = tensor_params(q.inputs[0])
                if p is not None:
                    params[t] = p
                return p
        if t not in ranges:
            return None
        lo, hi = ranges[t]
        params[t] = activation_params(lo, hi, act_dtype)
        return params[t]

    active: list[QNode] = []
    for n in selected:
        q = plan.nodes[n]
        needed = q.inputs + ([q.output] if q.output else [])
        if all(tensor_params(t) is not None for t in needed):
            active.append(q)
        else:
            logger.debug("quantize: %s has an uncalibrated tensor, stays float", n)
    qtensors: dict[str, None] = {}
    for q in active:
        for t in q.inputs + ([q.output] if q.output else []):
            qtensors[t] = None
    producer_quantized = {q.output for q in active if q.output}
    active_names = {q.name for q in active}
    consumers_quantized: dict[str, set[str]] = {}
    for q in active:
        for t in q.inputs:
            consumers_quantized.setdefault(t, set()).add(q.name)
        if q.absorbed:
            consumers_quantized.setdefault("", set())
    taken = set(tensors) | {n.name for n in g.nodes if n.name}
    dq_out: dict[str, gs.Variable] = {}
    new_nodes: list[gs.Node] = []
    for t in qtensors:
        var = tensors[t]
        p = params[t]
        scale = gs.Constant(_unique(g, f"{t}_scale", taken), np.array(p.scale, np.float32))
        zp = gs.Constant(_unique(g, f"{t}_zero_point", taken), np.array(p.zero_point, p.dtype))
        qv = gs.Variable(_unique(g, f"{t}_quantized", taken), dtype=p.dtype, shape=var.shape)
        dqv = gs.Variable(_unique(g, f"{t}_dequantized", taken), dtype=np.float32, shape=var.shape)
        qn = gs.Node(
            "QuantizeLinear",
            _unique(g, f"{t}_QuantizeLinear", taken),
            inputs=[var, scale, zp],
            outputs=[qv],
        )
        dqn = gs.Node(
            "DequantizeLinear",
            _unique(g, f"{t}_DequantizeLinear", taken),
            inputs=[qv, scale, zp],
            outputs=[dqv],
        )
        redirect_all = t in producer_quantized
        quantized_consumers = consumers_quantized.get(t, set())
        for c in list(var.outputs):
            if c is qn:
                continue
            if redirect_all or c.name in quantized_consumers:
                for i, inp in enumerate(c.inputs):
                    if inp is var:
                        c.inputs[i] = dqv
        new_nodes += [qn, dqn]
        dq_out[t] = dqv
        stats.tensors += 1
    # weights and biases
    for q in active:
        node = node_by_name[q.name]
        info: dict[str, Any] = {
            "op": q.op,
            "inputs": {t: params[t].scale for t in q.inputs},
            "output_scale": params[q.output].scale if q.output else None,
            "absorbed": q.absorbed,
        }
        if q.weight:
            widx = 1
            wt = node.inputs[widx]
            w = np.asarray(wt.values)
            axis = weight_axis(q, w, node, config.per_channel)
            ws = weight_params(w, axis, qmax_w)
            wq = quantize_weight(w, ws, axis, qmax_w)
            wc = gs.Constant(_unique(g, f"{wt.name}_quantized", taken), wq)
            sc = gs.Constant(_unique(g, f"{wt.name}_scale", taken), ws)
            zc = gs.Constant(
                _unique(g, f"{wt.name}_zero_point", taken), np.zeros(ws.shape, np.int8)
            )
            wdq = gs.Variable(
                _unique(g, f"{wt.name}_dequantized", taken), dtype=np.float32, shape=list(w.shape)
            )
            attrs = {"axis": int(axis)} if axis is not None else {}
            new_nodes.append(
                gs.Node(
                    "DequantizeLinear",
                    _unique(g, f"{wt.name}_DequantizeLinear", taken),
                    attrs=attrs,
                    inputs=[wc, sc, zc],
                    outputs=[wdq],
                )
            )
            node.inputs[widx] = wdq
            stats.weights += 1
            info["weight_scale"] = [float(ws.min()), float(ws.max())]
            info["per_channel"] = axis is not None
            if q.bias and q.op != "MatMul":
                bt = node.inputs[2]
                b = np.asarray(bt.values).astype(np.float64)
                sx = params[q.inputs[0]].scale
                bs = np.asarray(sx * ws.astype(np.float64), np.float32)  # 0-d when per tensor
                bq = np.clip(np.round(b / bs.astype(np.float64)), -(2**31), 2**31 - 1)
                bq = bq.astype(np.int32)
                bc = gs.Constant(_unique(g, f"{bt.name}_quantized", taken), bq)
                bsc = gs.Constant(_unique(g, f"{bt.name}_scale", taken), bs)
                bzc = gs.Constant(
                    _unique(g, f"{bt.name}_zero_point", taken), np.zeros(bs.shape, np.int32)
                )
                bdq = gs.Variable(
                    _unique(g, f"{bt.name}_dequantized", taken),
                    dtype=np.float32,
                    shape=list(b.shape),
                )
                new_nodes.append(
                    gs.Node(
                        "DequantizeLinear",
                        _unique(g, f"{bt.name}_DequantizeLinear", taken),
                        attrs={"axis": 0} if bs.ndim else {},
                        inputs=[bc, bsc, bzc],
                        outputs=[bdq],
                    )
                )
                node.inputs[2] = bdq
                stats.biases += 1
        if q.absorbed:
            stats.absorbed += 1
        stats.layers[q.name] = info
        stats.nodes += 1
    # every Q/DQ node goes right before the first node that reads it; the rest keep their order
    insert_nodes(g, new_nodes)
    g.cleanup(remove_unused_graph_inputs=False)
    _ = active_names
    return stats


# ---------------------------------------------------------------------- types and opset


def cpu_flags(path: str = "/proc/cpuinfo") -> set[str]:
    """CPU feature flags (x86 ``flags`` / ARM ``Features``) of the first CPU; empty if unknown."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, val = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(val.split())
    except OSError:
        pass
    return set()


def choose_activation_type(
    activations: str = "auto",
    reduce_range: bool | None = None,
    flags: set[str] | None = None,
    machine: str | None = None,
) -> tuple[np.dtype, bool, str]:
    """(activation dtype, reduce_range, why) for ``auto``, ``uint8`` or ``int8``."""
    flags = cpu_flags() if flags is None else flags
    machine = (machine or platform.machine()).lower()
    arm = machine.startswith(("arm", "aarch64"))
    vnni = bool({"avx512_vnni", "avx_vnni"} & flags)
    if activations not in ("auto", "uint8", "int8"):
        raise GraphoptError(f"--activations must be auto, uint8 or int8, not '{activations}'")
    dtype: np.dtype[Any]
    if activations == "auto":
        if arm:
            dtype, why = np.dtype(np.int8), "ARM: onnxruntime runs s8s8 kernels"
        else:
            dtype = np.dtype(np.uint8)
            why = "x86: onnxruntime fuses u8s8 QDQ into integer kernels"
    else:
        dtype, why = np.dtype(activations), "requested"
    if reduce_range is None:
        reduce_range = (not arm) and (not vnni) and dtype == np.uint8
        why += "; " + (
            "no VNNI: 7-bit weights (reduce_range)"
            if reduce_range
            else "VNNI or ARM: full 8-bit weights"
        )
    return dtype, bool(reduce_range), why


def upgrade_opset(model: Model, target: int = 13) -> Model:
    """Convert the default-domain opset to ``target`` with onnx.version_converter (Clip, Split,
    Squeeze/Unsqueeze, ReduceX attribute -> input changes), shapes re-inferred."""
    if model.opset >= target:
        return model
    proto = model.to_onnx()
    try:
        converted = onnx.version_converter.convert_version(proto, target)
    except Exception as exc:  # noqa: BLE001 - the converter raises assorted errors
        raise GraphoptError(
            f"cannot convert the model from opset {model.opset} to {target} for per-channel "
            f"quantization ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
            f"use --per-tensor"
        ) from None
    out = Model.from_onnx(converted, path=model.path, external_data=model.external_data)
    out.metadata = dict(model.metadata)
    infer_shapes(out)
    return out
