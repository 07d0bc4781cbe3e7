"""Torch implementations of ONNX operators, for :class:`~.module.OnnxModule`.

Each entry of :data:`OPS` is a *builder*: called once per node with a :class:`NodeSpec` (parsed
attributes, opset, the values of inputs that are constant at build time), it returns the runtime
callable ``fn(*inputs) -> Tensor | tuple[Tensor, ...]`` (a missing optional input is ``None``).
Attribute parsing and opset differences (``axes`` as attribute or input, Slice before opset 10,
Softmax's 2-D coercion before opset 13, ...) are resolved in the builder, so the per-call work is
only the torch call. Semantics follow the ONNX specification and onnxruntime's CPU kernels
(nearest Resize coordinates in float32, round half to even in QuantizeLinear, integer Div
truncates).

Every builder is differentiable where the ONNX op is (w.r.t. float inputs); integer shape
arithmetic (Shape, Gather on shapes, Concat of sizes) runs on small int64 CPU tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

Fn = Callable[..., Any]
Builder = Callable[["NodeSpec"], Fn]

#: (domain, op_type) -> builder; the default domain is ``""``
OPS: dict[tuple[str, str], Builder] = {}

DTYPES: dict[int, torch.dtype] = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.INT16: torch.int16,
    onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.BOOL: torch.bool,
    onnx.TensorProto.UINT16: torch.uint16,
    onnx.TensorProto.UINT32: torch.uint32,
    onnx.TensorProto.UINT64: torch.uint64,
}


class UnsupportedOp(NotImplementedError):
    """An operator (or an attribute value of one) has no torch implementation here."""


@dataclass
class NodeSpec:
    """What a builder sees of one node."""

    op: str
    domain: str
    name: str
    attrs: dict[str, Any]
    opset: int
    #: input index -> value, for inputs that are constant (folded) at build time
    consts: dict[int, torch.Tensor] = field(default_factory=dict)
    num_inputs: int = 0
    num_outputs: int = 1

    def attr(self, key: str, default: Any = None) -> Any:
        return self.attrs.get(key, default)

    def const_list(self, idx: int) -> list[int] | None:
        """A constant int input as a Python list (None when absent or not constant)."""
        v = self.consts.get(idx)
        return None if v is None else [int(i) for i in v.reshape(-1).tolist()]


def parse_attrs(node: onnx.NodeProto) -> dict[str, Any]:
    """Attribute name -> Python value (strings decoded, tensors as numpy, graphs as protos)."""
    out: dict[str, Any] = {}
    for a in node.attribute:
        v = onnx.helper.get_attribute_value(a)
        if isinstance(v, bytes):
            v = v.decode()
        elif isinstance(v, list) and v and isinstance(v[0], bytes):
            v = [s.decode() for s in v]
        elif isinstance(v, onnx.TensorProto):
            v = numpy_helper.to_array(v)
        out[a.name] = v
    return out


def register(*ops: str, domain: str = "") -> Callable[[Builder], Builder]:
    def deco(fn: Builder) -> Builder:
        for op in ops:
            OPS[(domain, op)] = fn
        return fn

    return deco


def to_tensor(a: np.ndarray) -> torch.Tensor:
    a = np.asarray(a)
    if a.dtype == np.uint16 or a.dtype.kind in "OSU":
        raise UnsupportedOp(f"constant of dtype {a.dtype}")
    return torch.from_numpy(np.array(a, copy=True))


def _ints(t: torch.Tensor | None) -> list[int] | None:
    return None if t is None else [int(i) for i in t.reshape(-1).tolist()]


# ---------------------------------------------------------------------------- elementwise
def _unary(fn: Fn) -> Builder:
    """A builder for an op without attributes: the torch function itself."""
    return lambda spec: fn


_PLAIN: dict[str, Fn] = {
    "Relu": torch.relu,
    "Sigmoid": torch.sigmoid,
    "Tanh": torch.tanh,
    "Exp": torch.exp,
    "Log": torch.log,
    "Sqrt": torch.sqrt,
    "Neg": torch.neg,
    "Abs": torch.abs,
    "Reciprocal": torch.reciprocal,
    "Floor": torch.floor,
    "Ceil": torch.ceil,
    "Round": torch.round,
    "Sign": torch.sign,
    "Erf": torch.erf,
    "Not": torch.logical_not,
    "Sin": torch.sin,
    "Cos": torch.cos,
    "Softplus": F.softplus,
    "Softsign": F.softsign,
    "IsNaN": torch.isnan,
    "Identity": lambda x: x,
    "Mish": F.mish,
}


def _div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


def _pow(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if b.dim() == 0 and not b.requires_grad:
        e = float(b)
        if e == 2.0:
            return a * a
        if e == 0.5:
            return torch.sqrt(a)
    return torch.pow(a, b.to(a.dtype) if a.is_floating_point() else b).to(a.dtype)


_PLAIN.update(
    {
        "Add": torch.add,
        "Sub": torch.sub,
        "Mul": torch.mul,
        "Div": _div,
        "Pow": _pow,
        "Equal": torch.eq,
        "Greater": torch.gt,
        "Less": torch.lt,
        "GreaterOrEqual": torch.ge,
        "LessOrEqual": torch.le,
        "And": torch.logical_and,
        "Or": torch.logical_or,
        "Xor": torch.logical_xor,
        "PRelu": lambda x, s: torch.where(x >= 0, x, x * s),
    }
)
for _name, _fn in _PLAIN.items():
    OPS[("", _name)] = _unary(_fn)


def _variadic(
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], mean: bool = False
) -> Builder:
    def build(spec: NodeSpec) -> Fn:
        def run(*xs: torch.Tensor) -> torch.Tensor:
            out = xs[0]
            for x in xs[1:]:
                out = fn(out, x)
            return out / len(xs) if mean else out

        return run

    return build


OPS[("", "Sum")] = _variadic(torch.add)
OPS[("", "Mean")] = _variadic(torch.add, mean=True)
OPS[("", "Max")] = _variadic(torch.maximum)
OPS[("", "Min")] = _variadic(torch.minimum)


@register("Mod")
def _mod(spec: NodeSpec) -> Fn:
    return torch.fmod if spec.attr("fmod", 0) else torch.remainder


@register("Where")
def _where(spec: NodeSpec) -> Fn:
    return torch.where


@register("LeakyRelu")
def _leaky(spec: NodeSpec) -> Fn:
    alpha = float(spec.attr("alpha", 0.01))
    return lambda x: F.leaky_relu(x, alpha)


@register("Elu")
def _elu(spec: NodeSpec) -> Fn:
    alpha = float(spec.attr("alpha", 1.0))
    return lambda x: F.elu(x, alpha)


@register("Celu")
def _celu(spec: NodeSpec) -> Fn:
    alpha = float(spec.attr("alpha", 1.0))
    return lambda x: F.celu(x, alpha)


@register("Selu")
def _selu(spec: NodeSpec) -> Fn:
    alpha = float(spec.attr("alpha", 1.67326319217681884765625))
    gamma = float(spec.attr("gamma", 1.05070102214813232421875))
    return lambda x: gamma * torch.where(x > 0, x, alpha * (torch.exp(x) - 1))


@register("ThresholdedRelu")
def _threlu(spec: NodeSpec) -> Fn:
    alpha = float(spec.attr("alpha", 1.0))
    return lambda x: torch.where(x > alpha, x, torch.zeros_like(x))


@register("HardSigmoid")
def _hardsigmoid(spec: NodeSpec) -> Fn:
    alpha, beta = float(spec.attr("alpha", 0.2)), float(spec.attr("beta", 0.5))
    return lambda x: torch.clamp(x * alpha + beta, 0.0, 1.0)


@register("HardSwish")
def _hardswish(spec: NodeSpec) -> Fn:
    return lambda x: x * torch.clamp(x * (1.0 / 6.0) + 0.5, 0.0, 1.0)


@register("Gelu")
def _gelu(spec: NodeSpec) -> Fn:
    approx = spec.attr("approximate", "none")
    return lambda x: F.gelu(x, approximate=approx)


@register("Clip")
def _clip(spec: NodeSpec) -> Fn:
    if spec.opset < 11:
        lo, hi = spec.attr("min", -math.inf), spec.attr("max", math.inf)
        return lambda x: torch.clamp(x, lo, hi)

    def run(
        x: torch.Tensor, lo: torch.Tensor | None = None, hi: torch.Tensor | None = None
    ) -> torch.Tensor:
        if lo is not None:
            x = torch.maximum(x, lo.to(x.dtype))
        if hi is not None:
            x = torch.minimum(x, hi.to(x.dtype))
        return x

    # constant bounds (the usual case) become a single clamp
    if all(i in spec.consts or i >= spec.num_inputs for i in (1, 2)):
        lo_t, hi_t = spec.consts.get(1), spec.consts.get(2)
        lo_v = None if lo_t is None else float(lo_t)
        hi_v = None if hi_t is None else float(hi_t)
        return lambda x, *_: torch.clamp(x, lo_v, hi_v)
    return run


def _coerced(fn: Callable[[torch.Tensor, int], torch.Tensor], spec: NodeSpec) -> Fn:
    axis = int(spec.attr("axis", -1 if spec.opset >= 13 else 1))
    if spec.opset >= 13:
        return lambda x: fn(x, axis)

    def run(x: torch.Tensor) -> torch.Tensor:
        a = axis % x.dim() if x.dim() else 0
        if a == x.dim() - 1:
            return fn(x, -1)
        shape = x.shape
        return fn(x.reshape(int(np.prod(shape[:a], dtype=np.int64)), -1), 1).reshape(shape)

    return run


@register("Softmax")
def _softmax(spec: NodeSpec) -> Fn:
    return _coerced(lambda x, a: torch.softmax(x, a), spec)


@register("LogSoftmax")
def _logsoftmax(spec: NodeSpec) -> Fn:
    return _coerced(lambda x, a: torch.log_softmax(x, a), spec)


# ---------------------------------------------------------------------------- linear algebra
@register("MatMul")
def _matmul(spec: NodeSpec) -> Fn:
    return torch.matmul


@register("Gemm")
def _gemm(spec: NodeSpec) -> Fn:
    alpha, beta = float(spec.attr("alpha", 1.0)), float(spec.attr("beta", 1.0))
    ta, tb = int(spec.attr("transA", 0)), int(spec.attr("transB", 0))

    def run(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        a = a.t() if ta else a
        if c is not None and alpha == 1.0 and beta == 1.0:
            return F.linear(a, b, c) if tb else torch.addmm(c, a, b)
        y = a @ (b.t() if tb else b)
        if alpha != 1.0:
            y = y * alpha
        if c is not None:
            y = y + (c * beta if beta != 1.0 else c)
        return y

    return run


@register("Einsum")
def _einsum(spec: NodeSpec) -> Fn:
    eq = spec.attr("equation").replace(" ", "")
    return lambda *xs: torch.einsum(eq, *xs)


# ---------------------------------------------------------------------------- convolution
def _same_pads(
    in_sz: Sequence[int], k: Sequence[int], s: Sequence[int], d: Sequence[int], upper: bool
) -> list[int]:
    begins, ends = [], []
    for i, n in enumerate(in_sz):
        out = -(-n // s[i])
        total = max((out - 1) * s[i] + (k[i] - 1) * d[i] + 1 - n, 0)
        small = total // 2
        begins.append(small if upper else total - small)
        ends.append(total - small if upper else small)
    return begins + ends


def _torch_pad(pads: Sequence[int]) -> list[int]:
    """ONNX ``[b1..bn, e1..en]`` -> F.pad's ``(bn, en, ..., b1, e1)``."""
    n = len(pads) // 2
    out: list[int] = []
    for i in reversed(range(n)):
        out += [int(pads[i]), int(pads[i + n])]
    return out


class _Window:
    """kernel/stride/dilation/pads of a Conv or pool node, with auto_pad resolved per call."""

    def __init__(self, spec: NodeSpec, k: Sequence[int] | None) -> None:
        self.k = list(k) if k is not None else None
        nd = len(self.k) if self.k is not None else None
        self.auto = spec.attr("auto_pad", "NOTSET")
        self.s = list(spec.attr("strides", [1] * (nd or 0)))
        self.d = list(spec.attr("dilations", [1] * (nd or 0)))
        self.pads = list(spec.attr("pads", [0] * 2 * (nd or 0)))

    def resolve(self, x: torch.Tensor) -> tuple[list[int], list[int], list[int], list[int]]:
        """(kernel, strides, dilations, pads) for this input."""
        assert self.k is not None
        nd = len(self.k)
        s = self.s or [1] * nd
        d = self.d or [1] * nd
        if self.auto in ("SAME_UPPER", "SAME_LOWER"):
            pads = _same_pads(list(x.shape[2:]), self.k, s, d, self.auto == "SAME_UPPER")
        elif self.auto == "VALID":
            pads = [0] * 2 * nd
        else:
            pads = self.pads or [0] * 2 * nd
        return self.k, s, d, pads


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONVT = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def conv_forward(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, win: _Window, group: int
) -> torch.Tensor:
    """ONNX Conv with torch: symmetric pads go to the kernel, asymmetric ones to F.pad."""
    if win.k is None:
        win.k = list(w.shape[2:])
    k, s, d, pads = win.resolve(x)
    nd = len(k)
    sym = pads[:nd] == pads[nd:]
    if not sym:
        x = F.pad(x, _torch_pad(pads))
    return _CONV[nd](x, w, b, s, pads[:nd] if sym else 0, d, group)


@register("Conv")
def _conv(spec: NodeSpec) -> Fn:
    win = _Window(spec, spec.attr("kernel_shape"))
    group = int(spec.attr("group", 1))
    return lambda x, w, b=None: conv_forward(x, w, b, win, group)


_FUSED_ACTS: dict[str, Callable[[torch.Tensor, list[float]], torch.Tensor]] = {
    "Relu": lambda x, p: torch.relu(x),
    "Tanh": lambda x, p: torch.tanh(x),
    "Sigmoid": lambda x, p: torch.sigmoid(x),
    "LeakyRelu": lambda x, p: F.leaky_relu(x, p[0] if p else 0.01),
    "Clip": lambda x, p: torch.clamp(x, p[0], p[1]),
    "HardSigmoid": lambda x, p: torch.clamp(x * (p[0] if p else 0.2) + (p[1] if p else 0.5), 0, 1),
}


@register("FusedConv", domain="com.microsoft")
def _fused_conv(spec: NodeSpec) -> Fn:
    win = _Window(spec, spec.attr("kernel_shape"))
    group = int(spec.attr("group", 1))
    act = spec.attr("activation")
    params = [float(p) for p in spec.attr("activation_params", [])]
    if act and act not in _FUSED_ACTS:
        raise UnsupportedOp(f"FusedConv activation {act}")

    def run(
        x: torch.Tensor,
        w: torch.Tensor,
        b: torch.Tensor | None = None,
        z: torch.Tensor | None = None,
    ) -> torch.Tensor:
        y = conv_forward(x, w, b, win, group)
        if z is not None:
            y = y + z
        return _FUSED_ACTS[act](y, params) if act else y

    return run


@register("ConvTranspose")
def _convt(spec: NodeSpec) -> Fn:
    win = _Window(spec, spec.attr("kernel_shape"))
    group = int(spec.attr("group", 1))
    out_pad = spec.attr("output_padding")
    out_shape = spec.attr("output_shape")

    def run(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        k = win.k or list(w.shape[2:])
        nd = len(k)
        s = win.s or [1] * nd
        d = win.d or [1] * nd
        op = list(out_pad) if out_pad else [0] * nd
        ins = list(x.shape[2:])
        if out_shape is not None or win.auto in ("SAME_UPPER", "SAME_LOWER"):
            target = (
                list(out_shape)[-nd:]
                if out_shape is not None
                else [i * si for i, si in zip(ins, s)]
            )
            pads_b, pads_e = [], []
            for i in range(nd):
                total = s[i] * (ins[i] - 1) + op[i] + ((k[i] - 1) * d[i] + 1) - target[i]
                small = total // 2
                upper = win.auto != "SAME_LOWER"
                pads_b.append(total - small if upper else small)
                pads_e.append(small if upper else total - small)
            pads = pads_b + pads_e
        elif win.auto == "VALID":
            pads = [0] * 2 * nd
        else:
            pads = win.pads or [0] * 2 * nd
        sym = pads[:nd] == pads[nd:]
        y = _CONVT[nd](x, w, b if sym else None, s, pads[:nd] if sym else 0, op, group, d)
        if not sym:
            sl = [slice(None), slice(None)] + [
                slice(pads[i], y.shape[2 + i] - pads[i + nd]) for i in range(nd)
            ]
            y = y[tuple(sl)]
            if b is not None:
                y = y + b.reshape([1, -1] + [1] * nd)
        return y

    return run


# ---------------------------------------------------------------------------- normalization
@register("BatchNormalization")
def _bn(spec: NodeSpec) -> Fn:
    eps = float(spec.attr("epsilon", 1e-5))

    def run(
        x: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor,
        mean: torch.Tensor,
        var: torch.Tensor,
    ) -> torch.Tensor:
        # inference semantics always (running statistics); see OnnxModule.bn_stats for refresh
        return F.batch_norm(x, mean, var, scale, bias, False, 0.0, eps)

    return run


@register("InstanceNormalization")
def _instnorm(spec: NodeSpec) -> Fn:
    eps = float(spec.attr("epsilon", 1e-5))
    return lambda x, s, b: F.instance_norm(x, weight=s, bias=b, eps=eps)


@register("LayerNormalization")
def _layernorm(spec: NodeSpec) -> Fn:
    axis, eps = int(spec.attr("axis", -1)), float(spec.attr("epsilon", 1e-5))

    def run(x: torch.Tensor, s: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        a = axis % x.dim()
        shape = list(x.shape[a:])
        return F.layer_norm(x, shape, s.expand(shape), None if b is None else b.expand(shape), eps)

    return run


# ---------------------------------------------------------------------------- pooling
@register("GlobalAveragePool")
def _gap(spec: NodeSpec) -> Fn:
    return lambda x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


@register("GlobalMaxPool")
def _gmp(spec: NodeSpec) -> Fn:
    return lambda x: x.amax(dim=tuple(range(2, x.dim())), keepdim=True)


_MAXPOOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVGPOOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


@register("MaxPool")
def _maxpool(spec: NodeSpec) -> Fn:
    win = _Window(spec, spec.attr("kernel_shape"))
    ceil = bool(spec.attr("ceil_mode", 0))
    if spec.num_outputs > 1:
        raise UnsupportedOp("MaxPool with an Indices output")

    def run(x: torch.Tensor) -> torch.Tensor:
        k, s, d, pads = win.resolve(x)
        nd = len(k)
        sym = pads[:nd] == pads[nd:] and all(p <= kk // 2 for p, kk in zip(pads[:nd], k))
        if not sym:
            x = F.pad(x, _torch_pad(pads), value=-math.inf)
        return _MAXPOOL[nd](x, k, s, pads[:nd] if sym else 0, d, ceil_mode=ceil)

    return run


@register("AveragePool")
def _avgpool(spec: NodeSpec) -> Fn:
    win = _Window(spec, spec.attr("kernel_shape"))
    ceil = bool(spec.attr("ceil_mode", 0))
    incl = bool(spec.attr("count_include_pad", 0))
    if any(d != 1 for d in spec.attr("dilations", [])):
        raise UnsupportedOp("AveragePool with dilations")

    def run(x: torch.Tensor) -> torch.Tensor:
        k, s, _, pads = win.resolve(x)
        nd = len(k)
        sym = pads[:nd] == pads[nd:] and all(p <= kk // 2 for p, kk in zip(pads[:nd], k))
        if sym:
            if nd == 1:
                return F.avg_pool1d(x, k, s, pads[:nd], ceil, incl)
            return _AVGPOOL[nd](x, k, s, pads[:nd], ceil, incl)
        if not incl:
            raise UnsupportedOp("AveragePool with asymmetric pads and count_include_pad=0")
        return _AVGPOOL[nd](F.pad(x, _torch_pad(pads)), k, s, 0, ceil, True)

    return run


# ---------------------------------------------------------------------------- reductions
def _reduce(fn: Callable[..., torch.Tensor], axes_input_from: int) -> Builder:
    def build(spec: NodeSpec) -> Fn:
        keep = bool(spec.attr("keepdims", 1))
        noop = bool(spec.attr("noop_with_empty_axes", 0))
        as_input = spec.opset >= axes_input_from
        attr_axes = spec.const_list(1) if as_input else spec.attr("axes")
        dynamic = as_input and spec.num_inputs > 1 and attr_axes is None

        def run(x: torch.Tensor, axes_t: torch.Tensor | None = None) -> torch.Tensor:
            axes = _ints(axes_t) if dynamic else attr_axes
            if not axes:
                if noop:
                    return x
                axes = list(range(x.dim()))
            return fn(x, [a % max(x.dim(), 1) for a in axes], keep)

        return run

    return build


def _logsumexp(x: torch.Tensor, axes: list[int], keep: bool) -> torch.Tensor:
    return torch.logsumexp(x, axes, keep)


OPS[("", "ReduceMean")] = _reduce(lambda x, a, k: x.mean(a, keepdim=k), 18)
OPS[("", "ReduceSum")] = _reduce(lambda x, a, k: x.sum(a, keepdim=k), 13)
OPS[("", "ReduceMax")] = _reduce(lambda x, a, k: x.amax(a, keepdim=k), 18)
OPS[("", "ReduceMin")] = _reduce(lambda x, a, k: x.amin(a, keepdim=k), 18)
OPS[("", "ReduceProd")] = _reduce(lambda x, a, k: _prod(x, a, k), 18)
OPS[("", "ReduceL1")] = _reduce(lambda x, a, k: x.abs().sum(a, keepdim=k), 18)
OPS[("", "ReduceL2")] = _reduce(lambda x, a, k: (x * x).sum(a, keepdim=k).sqrt(), 18)
OPS[("", "ReduceSumSquare")] = _reduce(lambda x, a, k: (x * x).sum(a, keepdim=k), 18)
OPS[("", "ReduceLogSumExp")] = _reduce(_logsumexp, 18)


def _prod(x: torch.Tensor, axes: list[int], keep: bool) -> torch.Tensor:
    for a in sorted(axes, reverse=True):
        x = x.prod(a, keepdim=keep)
    return x


@register("ArgMax", "ArgMin")
def _argmax(spec: NodeSpec) -> Fn:
    axis, keep = int(spec.attr("axis", 0)), bool(spec.attr("keepdims", 1))
    last = bool(spec.attr("select_last_index", 0))
    fn = torch.argmax if spec.op == "ArgMax" else torch.argmin

    def run(x: torch.Tensor) -> torch.Tensor:
        if last:
            n = x.shape[axis]
            return (n - 1 - fn(x.flip(axis), axis, keep)).to(torch.int64)
        return fn(x, axis, keep)

    return run


@register("CumSum")
def _cumsum(spec: NodeSpec) -> Fn:
    excl, rev = bool(spec.attr("exclusive", 0)), bool(spec.attr("reverse", 0))

    def run(x: torch.Tensor, axis_t: torch.Tensor) -> torch.Tensor:
        a = int(axis_t)
        if rev:
            x = x.flip(a)
        y = torch.cumsum(x, a)
        if excl:
            y = y - x
        return y.flip(a) if rev else y

    return run


@register("TopK")
def _topk(spec: NodeSpec) -> Fn:
    axis = int(spec.attr("axis", -1))
    largest, srt = bool(spec.attr("largest", 1)), bool(spec.attr("sorted", 1))

    def run(x: torch.Tensor, k: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        kk = int(k) if spec.opset >= 10 and k is not None else int(spec.attr("k"))
        v, i = torch.topk(x, kk, axis, largest, srt)
        return v, i

    return run


# ---------------------------------------------------------------------------- shape and data
@register("Shape")
def _shape(spec: NodeSpec) -> Fn:
    start, end = spec.attr("start", 0), spec.attr("end")
    return lambda x: torch.tensor(list(x.shape)[start:end], dtype=torch.int64)


@register("Size")
def _size(spec: NodeSpec) -> Fn:
    return lambda x: torch.tensor(x.numel(), dtype=torch.int64)


@register("Cast")
def _cast(spec: NodeSpec) -> Fn:
    dt = DTYPES.get(int(spec.attr("to")))
    if dt is None:
        raise UnsupportedOp(f"Cast to {spec.attr('to')}")
    return lambda x: x.to(dt)


@register("CastLike")
def _castlike(spec: NodeSpec) -> Fn:
    return lambda x, like: x.to(like.dtype)


@register("Reshape")
def _reshape(spec: NodeSpec) -> Fn:
    allowzero = bool(spec.attr("allowzero", 0))
    if spec.opset < 5:
        fixed = list(spec.attr("shape"))
        return lambda x: x.reshape(_reshape_dims(x, fixed, allowzero))

    fixed_shape = spec.const_list(1)
    if fixed_shape is not None:
        return lambda x, _: x.reshape(_reshape_dims(x, fixed_shape, allowzero))

    def run(x: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
        return x.reshape(_reshape_dims(x, _ints(shape) or [], allowzero))

    return run


def _reshape_dims(x: torch.Tensor, dims: list[int], allowzero: bool) -> list[int]:
    if allowzero:
        return dims
    return [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]


@register("Flatten")
def _flatten(spec: NodeSpec) -> Fn:
    axis = int(spec.attr("axis", 1))

    def run(x: torch.Tensor) -> torch.Tensor:
        a = axis % x.dim() if axis < 0 else axis
        lead = int(np.prod(x.shape[:a], dtype=np.int64))
        return x.reshape(lead, -1) if x.numel() else x.reshape(lead, 0)

    return run


@register("Transpose")
def _transpose(spec: NodeSpec) -> Fn:
    perm = spec.attr("perm")
    return lambda x: x.permute(perm if perm is not None else list(range(x.dim()))[::-1])


@register("Squeeze")
def _squeeze(spec: NodeSpec) -> Fn:
    attr_axes = spec.attr("axes") if spec.opset < 13 else spec.const_list(1)
    dynamic = spec.opset >= 13 and spec.num_inputs > 1 and attr_axes is None

    def run(x: torch.Tensor, axes_t: torch.Tensor | None = None) -> torch.Tensor:
        axes = _ints(axes_t) if dynamic else attr_axes
        if axes is None:
            return x.squeeze()
        return x.squeeze(tuple(a % x.dim() for a in axes)) if axes else x

    return run


@register("Unsqueeze")
def _unsqueeze(spec: NodeSpec) -> Fn:
    attr_axes = spec.attr("axes") if spec.opset < 13 else spec.const_list(1)

    def run(x: torch.Tensor, axes_t: torch.Tensor | None = None) -> torch.Tensor:
        axes = attr_axes if attr_axes is not None else _ints(axes_t)
        assert axes is not None
        rank = x.dim() + len(axes)
        for a in sorted(a % rank for a in axes):
            x = x.unsqueeze(a)
        return x

    return run


@register("Concat")
def _concat(spec: NodeSpec) -> Fn:
    axis = int(spec.attr("axis"))
    return lambda *xs: torch.cat(xs, axis)


@register("Split")
def _split(spec: NodeSpec) -> Fn:
    axis = int(spec.attr("axis", 0))
    attr_split = spec.attr("split")
    n_out = spec.num_outputs

    def run(x: torch.Tensor, split_t: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        sizes = attr_split if spec.opset < 13 else _ints(split_t)
        if not sizes:
            dim = x.shape[axis]
            step = -(-dim // n_out)
            sizes = [min(step, dim - i * step) for i in range(n_out)]
        return tuple(torch.split(x, list(sizes), axis))

    return run


def _slice_axis(x: torch.Tensor, axis: int, start: int, end: int, step: int) -> torch.Tensor:
    dim = x.shape[axis]
    start = max(min(start, 2**62), -(2**62))
    end = max(min(end, 2**62), -(2**62))
    rng = range(*slice(start, end, step).indices(dim))
    if step > 0:
        return (
            x.narrow(axis, rng.start, len(rng))
            if step == 1
            else x[(slice(None),) * axis + (slice(rng.start, rng.stop, step),)]
        )
    idx = torch.tensor(list(rng), dtype=torch.int64)
    return x.index_select(axis, idx)


@register("Slice")
def _slice(spec: NodeSpec) -> Fn:
    if spec.opset < 10:
        st, en = list(spec.attr("starts")), list(spec.attr("ends"))
        ax = spec.attr("axes")

        def run_old(x: torch.Tensor) -> torch.Tensor:
            axes = list(ax) if ax is not None else list(range(len(st)))
            for a, s, e in zip(axes, st, en):
                x = _slice_axis(x, a % x.dim(), s, e, 1)
            return x

        return run_old

    if all(i in spec.consts for i in range(1, spec.num_inputs)):
        cst, cen = spec.const_list(1) or [], spec.const_list(2) or []
        cax = spec.const_list(3) or list(range(len(cst)))
        csp = spec.const_list(4) or [1] * len(cst)

        def run_const(x: torch.Tensor, *_: torch.Tensor | None) -> torch.Tensor:
            for a, s_, e, k in zip(cax, cst, cen, csp):
                x = _slice_axis(x, a % x.dim(), s_, e, k)
            return x

        return run_const

    def run(
        x: torch.Tensor,
        starts: torch.Tensor,
        ends: torch.Tensor,
        axes_t: torch.Tensor | None = None,
        steps_t: torch.Tensor | None = None,
    ) -> torch.Tensor:
        st, en = _ints(starts) or [], _ints(ends) or []
        axes = _ints(axes_t) or list(range(len(st)))
        steps = _ints(steps_t) or [1] * len(st)
        for a, s, e, k in zip(axes, st, en, steps):
            x = _slice_axis(x, a % x.dim(), s, e, k)
        return x

    return run


@register("Gather")
def _gather(spec: NodeSpec) -> Fn:
    axis = int(spec.attr("axis", 0))

    def run(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        a = axis % x.dim()
        i = idx.to(torch.int64)
        i = torch.where(i < 0, i + x.shape[a], i)
        out = x.index_select(a, i.reshape(-1))
        return out.reshape(list(x.shape[:a]) + list(idx.shape) + list(x.shape[a + 1 :]))

    return run


@register("GatherElements")
def _gather_el(spec: NodeSpec) -> Fn:
    axis = int(spec.attr("axis", 0))

    def run(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        i = idx.to(torch.int64)
        return torch.gather(x, axis, torch.where(i < 0, i + x.shape[axis], i))

    return run


@register("Expand")
def _expand(spec: NodeSpec) -> Fn:
    def run(x: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
        out = torch.broadcast_shapes(tuple(x.shape), tuple(_ints(shape) or []))
        return x.expand(out)

    return run


@register("Tile")
def _tile(spec: NodeSpec) -> Fn:
    return lambda x, reps: x.repeat(_ints(reps))


@register("ConstantOfShape")
def _const_of_shape(spec: NodeSpec) -> Fn:
    v = spec.attr("value")
    val = to_tensor(np.asarray(v).reshape(-1)[:1]) if v is not None else torch.zeros(1)

    def run(shape: torch.Tensor) -> torch.Tensor:
        return val.reshape(()).expand(_ints(shape) or []).clone()

    return run


@register("Range")
def _range(spec: NodeSpec) -> Fn:
    def run(start: torch.Tensor, limit: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)

    return run


@register("Pad")
def _pad(spec: NodeSpec) -> Fn:
    mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}[
        spec.attr("mode", "constant")
    ]

    def apply(x: torch.Tensor, pads: list[int], value: float) -> torch.Tensor:
        tp = _torch_pad(pads)
        while len(tp) > 2 and tp[-1] == 0 and tp[-2] == 0:  # unpadded leading dims
            tp = tp[:-2]
        if mode == "constant":
            return F.pad(x, tp, value=value)
        return F.pad(x, tp, mode=mode)

    if spec.opset < 11:
        pads_a, val_a = list(spec.attr("pads")), float(spec.attr("value", 0.0))
        return lambda x: apply(x, pads_a, val_a)

    def run(
        x: torch.Tensor,
        pads: torch.Tensor,
        value: torch.Tensor | None = None,
        axes_t: torch.Tensor | None = None,
    ) -> torch.Tensor:
        p = _ints(pads) or []
        if axes_t is not None:
            axes = [a % x.dim() for a in _ints(axes_t) or []]
            full = [0] * 2 * x.dim()
            for j, a in enumerate(axes):
                full[a], full[a + x.dim()] = p[j], p[j + len(axes)]
            p = full
        return apply(x, p, float(value) if value is not None and value.numel() else 0.0)

    return run


@register("DepthToSpace")
def _d2s(spec: NodeSpec) -> Fn:
    b, mode = int(spec.attr("blocksize")), spec.attr("mode", "DCR")

    def run(x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        if mode == "DCR":
            y = x.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
        else:
            y = x.reshape(n, c // (b * b), b, b, h, w).permute(0, 1, 4, 2, 5, 3)
        return y.reshape(n, c // (b * b), h * b, w * b)

    return run


@register("SpaceToDepth")
def _s2d(spec: NodeSpec) -> Fn:
    b = int(spec.attr("blocksize"))

    def run(x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        y = x.reshape(n, c, h // b, b, w // b, b).permute(0, 3, 5, 1, 2, 4)
        return y.reshape(n, c * b * b, h // b, w // b)

    return run


@register("Dropout")
def _dropout(spec: NodeSpec) -> Fn:
    if spec.num_outputs > 1:
        return lambda x, *_: (x, torch.ones_like(x, dtype=torch.bool))
    return lambda x, *_: x


# ---------------------------------------------------------------------------- Resize
def _source_coords(out_n: int, in_n: int, scale: float, mode: str) -> torch.Tensor:
    """ONNX Resize's coordinate transform, in float32 as onnxruntime computes it."""
    x = torch.arange(out_n, dtype=torch.float32)
    s = torch.tensor(scale, dtype=torch.float32)
    if mode == "asymmetric":
        return x / s
    if mode == "half_pixel":
        return (x + 0.5) / s - 0.5
    if mode == "pytorch_half_pixel":
        return (x + 0.5) / s - 0.5 if out_n > 1 else torch.zeros(out_n)
    if mode == "tf_half_pixel_for_nn":
        return (x + 0.5) / s
    if mode == "align_corners":
        return x * ((in_n - 1) / (out_n - 1)) if out_n > 1 else torch.zeros(out_n)
    if mode == "half_pixel_symmetric":
        adj = out_n / (scale * in_n)
        center = in_n / 2.0
        offset = center * (1 - adj)
        return offset + (x + 0.5) / s - 0.5
    raise UnsupportedOp(f"Resize coordinate_transformation_mode={mode}")


def _nearest_index(c: torch.Tensor, in_n: int, mode: str) -> torch.Tensor:
    if mode == "round_prefer_floor":
        i = torch.ceil(c - 0.5)
    elif mode == "round_prefer_ceil":
        i = torch.floor(c + 0.5)
    elif mode == "floor":
        i = torch.floor(c)
    elif mode == "ceil":
        i = torch.ceil(c)
    else:
        raise UnsupportedOp(f"Resize nearest_mode={mode}")
    return i.clamp(0, in_n - 1).to(torch.int64)


@register("Resize", "Upsample")
def _resize(spec: NodeSpec) -> Fn:
    mode = spec.attr("mode", "nearest")
    if spec.op == "Upsample" or spec.opset < 11:
        ctm = "asymmetric"
        nmode = "floor" if spec.op == "Upsample" or spec.opset < 11 else "round_prefer_floor"
    else:
        ctm = spec.attr("coordinate_transformation_mode", "half_pixel")
        nmode = spec.attr("nearest_mode", "round_prefer_floor")
    if mode not in ("nearest", "linear", "bilinear"):
        raise UnsupportedOp(f"Resize mode={mode}")
    if (
        spec.attr("antialias", 0)
        or spec.attr("axes") is not None
        or spec.attr("keep_aspect_ratio_policy", "stretch") != "stretch"
    ):
        raise UnsupportedOp("Resize with antialias/axes/keep_aspect_ratio_policy")
    if ctm == "tf_crop_and_resize":
        raise UnsupportedOp("Resize tf_crop_and_resize")
    cache: dict[tuple[Any, ...], list[Any]] = {}

    def plan(
        shape: tuple[int, ...], scales: list[float] | None, sizes: list[int] | None
    ) -> list[Any]:
        key = (shape, tuple(scales or ()), tuple(sizes or ()))
        if key in cache:
            return cache[key]
        steps: list[Any] = []
        for ax in range(len(shape)):
            n = shape[ax]
            if sizes:
                out_n, sc = sizes[ax], sizes[ax] / n
            else:
                assert scales is not None
                sc = scales[ax]
                out_n = int(math.floor(n * sc))
            if out_n == n and sc == 1.0:
                continue
            c = _source_coords(out_n, n, sc, ctm)
            if mode == "nearest":
                steps.append((ax, _nearest_index(c, n, nmode), None, None))
            else:
                c = c.clamp(0, n - 1)
                i0 = torch.floor(c).to(torch.int64)
                i1 = torch.clamp(i0 + 1, max=n - 1)
                w = c - i0.to(torch.float32)
                steps.append((ax, i0, i1, w))
        cache[key] = steps
        return steps

    def params(rest: Sequence[torch.Tensor | None]) -> tuple[list[float] | None, list[int] | None]:
        if spec.op == "Upsample" and spec.opset < 9:
            return [float(v) for v in spec.attr("scales")], None
        if spec.op == "Upsample" or spec.opset < 11:
            assert rest[0] is not None
            return [float(v) for v in rest[0].reshape(-1).tolist()], None
        sc_t = rest[1] if len(rest) > 1 else None
        sz_t = rest[2] if len(rest) > 2 else None
        scales = (
            [float(v) for v in sc_t.reshape(-1).tolist()]
            if sc_t is not None and sc_t.numel()
            else None
        )
        sizes = _ints(sz_t) if sz_t is not None and sz_t.numel() else None
        return scales, sizes

    fixed: tuple[list[float] | None, list[int] | None] | None = None
    if all(i in spec.consts for i in range(1, spec.num_inputs) if i != 1 or spec.opset < 11):
        fixed = params([spec.consts.get(i) for i in range(1, spec.num_inputs)])

    def integer_upsample(
        shape: tuple[int, ...], scales: list[float] | None, sizes: list[int] | None
    ) -> list[int] | None:
        """Spatial output size when F.interpolate(mode="nearest") computes exactly this Resize:
        nearest, asymmetric, floor, batch and channels unchanged, integer factors."""
        if (
            mode != "nearest"
            or ctm != "asymmetric"
            or nmode != "floor"
            or len(shape) not in (3, 4, 5)
        ):
            return None
        outs = sizes or [int(math.floor(n * sc)) for n, sc in zip(shape, scales or [])]
        if len(outs) != len(shape) or list(outs[:2]) != list(shape[:2]):
            return None
        if (
            sizes is None
            and scales is not None
            and any(sc != o / n for sc, o, n in zip(scales[2:], outs[2:], shape[2:]))
        ):
            return None
        if any(o % n for o, n in zip(outs[2:], shape[2:])):
            return None
        return list(outs[2:])

    def run(x: torch.Tensor, *rest: torch.Tensor | None) -> torch.Tensor:
        scales, sizes = fixed if fixed is not None else params(rest)
        up = integer_upsample(tuple(x.shape), scales, sizes)
        if up is not None:
            return F.interpolate(x, size=up, mode="nearest")
        for ax, i0, i1, w in plan(tuple(x.shape), scales, sizes):
            if i1 is None:
                x = x.index_select(ax, i0)
            else:
                shp = [1] * x.dim()
                shp[ax] = -1
                wv = w.to(x.dtype).reshape(shp)
                a, b = x.index_select(ax, i0), x.index_select(ax, i1)
                x = a + (b - a) * wv
        return x

    return run


# ---------------------------------------------------------------------------- quantization
def _qparams(
    x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None, axis: int
) -> tuple[torch.Tensor, torch.Tensor]:
    if scale.dim() == 1 and scale.numel() > 1:
        shp = [1] * x.dim()
        shp[axis % x.dim()] = -1
        scale = scale.reshape(shp)
        zp = zp.reshape(shp) if zp is not None else None
    return scale, zp if zp is not None else torch.zeros((), dtype=torch.uint8)


@register("QuantizeLinear")
def _quantize(spec: NodeSpec) -> Fn:
    axis = int(spec.attr("axis", 1))
    if spec.attr("block_size", 0):
        raise UnsupportedOp("blocked QuantizeLinear")

    def run(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None = None) -> torch.Tensor:
        s, z = _qparams(x, scale, zp, axis)
        info = torch.iinfo(z.dtype)
        q = torch.round(x / s) + z.to(torch.float32)
        return q.clamp(info.min, info.max).to(z.dtype)

    return run


@register("DequantizeLinear")
def _dequantize(spec: NodeSpec) -> Fn:
    axis = int(spec.attr("axis", 1))
    if spec.attr("block_size", 0):
        raise UnsupportedOp("blocked DequantizeLinear")

    def run(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None = None) -> torch.Tensor:
        s, z = _qparams(x, scale, zp, axis)
        if x.dtype == torch.int32:  # onnxruntime: float(x - zp) * scale
            return (x - z.to(torch.int32)).to(s.dtype) * s
        return (x.to(s.dtype) - z.to(s.dtype)) * s

    return run


def builder(op: str, domain: str = "") -> Builder:
    """The builder of ``domain::op`` or :class:`UnsupportedOp`."""
    b = OPS.get(("" if domain in ("", "ai.onnx") else domain, op))
    if b is None:
        raise UnsupportedOp(f"no torch implementation of {domain + '::' if domain else ''}{op}")
    return b
