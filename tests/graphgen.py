"""Hypothesis strategies that generate random *valid* ONNX models (opset 17) for property tests.

``onnx_models()`` draws a small graph (a handful of nodes, tensors of a few hundred elements, so
each model runs in milliseconds) built from a menu of "blocks": Conv with groups / depthwise /
strides / padding / dilation, ConvTranspose, BatchNormalization, Gemm and MatMul(+Add), elementwise
ops with broadcasting constants, activations and their written-out forms (``x*Clip(x+3,0,6)/6``,
``x*Sigmoid(x)``, erf and tanh GELU, decomposed LayerNorm, Mish), pooling, Concat / Split / Slice /
Reshape / Transpose / Flatten, Resize, residual adds, squeeze-excitation blocks, Conv followed by
scalar or per-channel Mul/Add, Pad before Conv, Identity / Dropout / Cast no-ops, shape subgraphs
(Shape -> Gather -> Concat -> Reshape), If with constant and data-dependent conditions (with
weights in the branches), shared weights, intermediate tensors that are also graph outputs, weights
that are graph inputs (with and without a default initializer), and dead branches.

Each block picks one of the tensors produced so far (mostly the latest: chains; sometimes an
earlier one: DAGs), checks that it applies to its rank and shape, and records the shapes it
produces, computed here independently of ONNX. Graph outputs are declared with those shapes, so a
shape slip in the generator fails ``onnx.checker``'s strict shape inference; ``tests/test_fuzz.py``
asserts that every generated model passes ``onnx.checker.check_model(full_check=True)`` and runs in
onnxruntime with the declared output shapes.

Not a test module: import it (``from graphgen import onnx_models``) from tests.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8
#: keep tensors small so that every model runs in milliseconds
MAX_ELEMS = 2048
MAX_CHANNELS = 16

Shape = tuple[int, ...]


@dataclass
class _T:
    name: str
    shape: Shape


@dataclass
class Builder:
    """Accumulates nodes, initializers and graph inputs while blocks draw decisions."""

    draw: Callable[[st.SearchStrategy[Any]], Any]
    seed: int
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    inits: list[onnx.TensorProto] = field(default_factory=list)
    inputs: list[onnx.ValueInfoProto] = field(default_factory=list)
    tensors: list[_T] = field(default_factory=list)
    consumed: set[str] = field(default_factory=set)
    shared: dict[tuple[Shape, str], list[str]] = field(default_factory=dict)
    counter: int = 0
    used_blocks: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)

    # ------------------------------------------------------------------ names and constants
    def name(self, hint: str) -> str:
        self.counter += 1
        return f"{hint}_{self.counter}"

    def node(
        self, op: str, inputs: list[str], n_out: int = 1, hint: str | None = None, **attrs: Any
    ) -> list[str]:
        outs = [self.name((hint or op).lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=self.name(f"n_{op}"), **attrs))
        self.consumed.update(i for i in inputs if i)
        return outs

    def flag(self, p_true: float = 0.5) -> bool:
        """A boolean that shrinks to False; ``p_true`` is only a hint for the unshrunk draw."""
        del p_true
        return bool(self.draw(st.booleans()))

    def choice(self, options: list[Any]) -> Any:
        return self.draw(st.sampled_from(options))

    def integer(self, lo: int, hi: int) -> int:
        return int(self.draw(st.integers(lo, hi)))

    def array(self, shape: Shape, kind: str = "weight") -> np.ndarray:
        if kind == "positive":  # BN variance, LayerNorm scale
            a = self.rng.uniform(0.5, 2.0, size=shape)
        elif kind == "divisor":  # away from zero
            a = self.rng.uniform(0.5, 2.0, size=shape) * self.rng.choice([-1.0, 1.0], size=shape)
        elif kind == "weight":
            fan = int(np.prod(shape[1:])) if len(shape) > 1 else 1
            a = self.rng.standard_normal(shape) / math.sqrt(max(fan, 1))
        else:  # "small"
            a = self.rng.standard_normal(shape) * 0.5
        return np.asarray(a, dtype=np.float32)

    def const(
        self,
        arr: np.ndarray,
        hint: str = "w",
        kind: str = "weight",
        may_be_input: bool = False,
        may_share: bool = True,
    ) -> str:
        """An initializer; sometimes a shared one of the same shape, sometimes a graph input."""
        key = (tuple(arr.shape), kind)
        if may_share and key in self.shared and self.draw(st.integers(0, 3)) == 3:
            return self.draw(st.sampled_from(self.shared[key]))
        name = self.name(hint)
        mode = self.draw(st.integers(0, 9)) if may_be_input and arr.dtype == np.float32 else 0
        if mode == 9:  # a weight fed at run time (no default)
            self.inputs.append(
                helper.make_tensor_value_info(
                    name, helper.np_dtype_to_tensor_dtype(arr.dtype), list(arr.shape)
                )
            )
            return name
        self.inits.append(numpy_helper.from_array(np.array(arr, order="C"), name))
        if mode == 8:  # an initializer that is also a graph input (an overridable default)
            self.inputs.append(
                helper.make_tensor_value_info(
                    name, helper.np_dtype_to_tensor_dtype(arr.dtype), list(arr.shape)
                )
            )
            return name
        if may_share:
            self.shared.setdefault(key, []).append(name)
        return name

    def ints(self, values: int | Sequence[int], hint: str = "i") -> str:
        return self.const(np.asarray(values, dtype=np.int64), hint, kind="int", may_share=False)

    def scalar(self, value: float, hint: str = "s") -> str:
        return self.const(np.asarray(value, dtype=np.float32), hint, kind="scalar", may_share=False)

    def add(self, name: str, shape: Shape) -> _T:
        t = _T(name, tuple(int(d) for d in shape))
        self.tensors.append(t)
        return t


def _elems(shape: Shape) -> int:
    return int(np.prod(shape)) if shape else 1


def _conv_out(h: int, k: int, s: int, d: int, p0: int, p1: int) -> int:
    return (h + p0 + p1 - d * (k - 1) - 1) // s + 1


# ---------------------------------------------------------------------- blocks
# Each block takes (builder, input tensor) and returns the new tensor, or None if it does not apply.


def _conv(
    b: Builder,
    x: _T,
    cout: int | None = None,
    allow_pads: bool = True,
    weights_may_be_inputs: bool = True,
) -> _T | None:
    if len(x.shape) != 4:
        return None
    n, c, h, w = x.shape
    kind = b.integer(0, 2)  # 0 dense, 1 depthwise, 2 grouped
    if kind == 1:
        group = c
        cout = cout or c * b.integer(1, 2)
        if cout % c:
            cout = c
    elif kind == 2:
        divs = [g for g in range(2, c + 1) if c % g == 0]
        group = b.choice(divs) if divs else 1
        cout = cout or group * b.integer(1, max(1, MAX_CHANNELS // max(group, 1)))
        if cout % group:
            cout = group
    else:
        group = 1
        cout = cout or b.integer(1, MAX_CHANNELS)
    kh, kw = b.integer(1, 3), b.integer(1, 3)
    s = b.integer(1, 2)
    d = b.integer(1, 2)
    pads = (
        [b.integer(0, 1), b.integer(0, 1), b.integer(0, 1), b.integer(0, 1)]
        if allow_pads
        else [0, 0, 0, 0]
    )
    oh, ow = _conv_out(h, kh, s, d, pads[0], pads[2]), _conv_out(w, kw, s, d, pads[1], pads[3])
    if oh < 1 or ow < 1:
        kh = kw = s = d = 1
        oh, ow = _conv_out(h, 1, 1, 1, pads[0], pads[2]), _conv_out(w, 1, 1, 1, pads[1], pads[3])
    if n * cout * oh * ow > MAX_ELEMS:
        return None
    wt = b.const(b.array((cout, c // group, kh, kw)), "conv_w", may_be_input=weights_may_be_inputs)
    ins = [x.name, wt]
    if b.flag():
        ins.append(b.const(b.array((cout,), "small"), "conv_b", may_be_input=weights_may_be_inputs))
    attrs: dict[str, Any] = {
        "kernel_shape": [kh, kw],
        "strides": [s, s],
        "dilations": [d, d],
        "group": group,
    }
    if any(pads):
        attrs["pads"] = pads
    (y,) = b.node("Conv", ins, **attrs)
    return b.add(y, (n, cout, oh, ow))


def _conv_transpose(b: Builder, x: _T) -> _T | None:
    if len(x.shape) != 4:
        return None
    n, c, h, w = x.shape
    group = c if (c > 1 and b.flag()) else 1
    cout = group * b.integer(1, 2) if group > 1 else b.integer(1, 8)
    k = b.integer(1, 3)
    s = b.integer(1, 2)
    p = b.integer(0, k - 1) if k > 1 else 0
    op = b.integer(0, s - 1) if s > 1 else 0
    oh, ow = s * (h - 1) + k - 2 * p + op, s * (w - 1) + k - 2 * p + op
    if oh < 1 or ow < 1 or n * cout * oh * ow > MAX_ELEMS:
        return None
    wt = b.const(b.array((c, cout // group, k, k)), "convt_w")
    ins = [x.name, wt] + ([b.const(b.array((cout,), "small"), "convt_b")] if b.flag() else [])
    attrs: dict[str, Any] = {
        "kernel_shape": [k, k],
        "strides": [s, s],
        "group": group,
        "pads": [p, p, p, p],
    }
    if op:
        attrs["output_padding"] = [op, op]
    (y,) = b.node("ConvTranspose", ins, **attrs)
    return b.add(y, (n, cout, oh, ow))


def _batchnorm(b: Builder, x: _T) -> _T | None:
    if len(x.shape) not in (2, 3, 4):
        return None
    c = x.shape[1]
    ins = [
        x.name,
        b.const(b.array((c,), "small") + 1.0, "bn_scale"),
        b.const(b.array((c,), "small"), "bn_bias"),
        b.const(b.array((c,), "small"), "bn_mean"),
        b.const(b.array((c,), "positive"), "bn_var", kind="positive"),
    ]
    (y,) = b.node("BatchNormalization", ins, epsilon=b.choice([1e-5, 1e-3]))
    return b.add(y, x.shape)


def _conv_bn(b: Builder, x: _T) -> _T | None:
    y = _conv(b, x)
    return _batchnorm(b, y) if y is not None else None


def _conv_scale_shift(b: Builder, x: _T) -> _T | None:
    """Conv, then Mul and/or Add with a scalar or per-channel constant (either operand order)."""
    y = _conv(b, x)
    if y is None:
        return None
    c = y.shape[1]
    for op in b.draw(st.sampled_from([["Mul"], ["Add"], ["Mul", "Add"], ["Add", "Mul"]])):
        shape = b.choice([(), (1,), (c, 1, 1), (1, c, 1, 1)])
        k = b.const(b.array(shape, "small") + (1.0 if op == "Mul" else 0.0), "k", kind="small")
        (o,) = b.node(op, [y.name, k] if b.flag() else [k, y.name])
        y = b.add(o, y.shape)
    return y


def _pad_conv(b: Builder, x: _T) -> _T | None:
    if len(x.shape) != 4:
        return None
    n, c, h, w = x.shape
    pads = [0, 0, b.integer(0, 2), b.integer(0, 2), 0, 0, b.integer(0, 2), b.integer(0, 2)]
    ins = [x.name, b.ints(pads, "pads")]
    if b.flag():
        ins.append(b.scalar(0.0, "pad_value"))
    (p,) = b.node("Pad", ins, mode="constant")
    padded = b.add(p, (n, c, h + pads[2] + pads[6], w + pads[3] + pads[7]))
    return _conv(b, padded, allow_pads=b.flag())


def _conv_act(b: Builder, x: _T) -> _T | None:
    y = _conv(b, x)
    return _activation(b, y) if y is not None else None


def _activation(b: Builder, x: _T) -> _T | None:
    op = b.choice(
        [
            "Relu",
            "Sigmoid",
            "Tanh",
            "LeakyRelu",
            "Clip",
            "HardSigmoid",
            "HardSwish",
            "Elu",
            "Softplus",
            "PRelu",
            "Relu6",
            "Abs",
            "Neg",
            "Softsign",
        ]
    )
    if op == "LeakyRelu":
        (y,) = b.node(op, [x.name], alpha=b.choice([0.01, 0.1, 0.2]))
    elif op in ("Clip", "Relu6"):
        lo, hi = (0.0, 6.0) if op == "Relu6" else b.choice([(0.0, 6.0), (-1.0, 1.0), (0.0, 1.0)])
        ins = [x.name, b.scalar(lo, "lo")]
        form = b.integer(0, 2)
        ins = (
            ins + [b.scalar(hi, "hi")]
            if form == 0
            else ([x.name, "", b.scalar(hi, "hi")] if form == 1 else ins)
        )
        (y,) = b.node("Clip", ins)
    elif op == "HardSigmoid":
        (y,) = b.node(op, [x.name], alpha=b.choice([0.2, 1 / 6]), beta=0.5)
    elif op == "Elu":
        (y,) = b.node(op, [x.name], alpha=1.0)
    elif op == "PRelu":
        if len(x.shape) == 4:
            slope_shape: Shape = b.choice([(x.shape[1], 1, 1), (1,)])
        else:
            slope_shape = (x.shape[-1],)
        (y,) = b.node(op, [x.name, b.const(b.array(slope_shape, "small"), "slope")])
    else:
        (y,) = b.node(op, [x.name])
    return b.add(y, x.shape)


def _written_activation(b: Builder, x: _T) -> _T | None:
    """Activations written out with elementwise ops, in the forms exporters produce."""
    form = b.choice(
        [
            "hardswish",
            "hardswish_relu6",
            "hardswish_hsig",
            "swish",
            "gelu_erf",
            "gelu_erf_mul",
            "gelu_tanh",
            "mish",
            "hardsigmoid",
        ]
    )
    s = x.shape
    if form in ("hardswish", "hardswish_relu6", "hardsigmoid"):
        (a,) = b.node("Add", [x.name, b.scalar(3.0, "three")])
        if form == "hardswish_relu6":
            (r,) = b.node("Relu", [a])
            (c,) = b.node("Clip", [r, "", b.scalar(6.0, "six")])
        else:
            (c,) = b.node("Clip", [a, b.scalar(0.0, "zero"), b.scalar(6.0, "six")])
        if form == "hardsigmoid":
            (y,) = b.node("Div", [c, b.scalar(6.0, "six")])
            return b.add(y, s)
        if b.flag():
            (m,) = b.node("Mul", [x.name, c])
            (y,) = b.node("Div", [m, b.scalar(6.0, "six")])
        else:
            (d,) = b.node("Mul", [c, b.scalar(1 / 6, "sixth")])
            (y,) = b.node("Mul", [x.name, d] if b.flag() else [d, x.name])
    elif form == "hardswish_hsig":
        (h,) = b.node("HardSigmoid", [x.name], alpha=1 / 6, beta=0.5)
        (y,) = b.node("Mul", [x.name, h])
    elif form == "swish":
        (g,) = b.node("Sigmoid", [x.name])
        (y,) = b.node("Mul", [x.name, g] if b.flag() else [g, x.name])
    elif form in ("gelu_erf", "gelu_erf_mul"):
        if form == "gelu_erf":
            (d,) = b.node("Div", [x.name, b.scalar(math.sqrt(2.0), "sqrt2")])
        else:
            (d,) = b.node("Mul", [x.name, b.scalar(1 / math.sqrt(2.0), "rsqrt2")])
        (e,) = b.node("Erf", [d])
        (a,) = b.node("Add", [e, b.scalar(1.0, "one")])
        if b.flag():
            (m,) = b.node("Mul", [x.name, a])
            (y,) = b.node("Mul", [m, b.scalar(0.5, "half")])
        else:
            (h,) = b.node("Mul", [x.name, b.scalar(0.5, "half")])
            (y,) = b.node("Mul", [h, a])
    elif form == "gelu_tanh":
        (p,) = b.node("Pow", [x.name, b.scalar(3.0, "three")])
        (m,) = b.node("Mul", [p, b.scalar(0.044715, "c")])
        (a,) = b.node("Add", [x.name, m])
        (k,) = b.node("Mul", [a, b.scalar(math.sqrt(2 / math.pi), "k")])
        (t,) = b.node("Tanh", [k])
        (o,) = b.node("Add", [t, b.scalar(1.0, "one")])
        (h,) = b.node("Mul", [x.name, b.scalar(0.5, "half")])
        (y,) = b.node("Mul", [h, o])
    else:  # mish
        (sp,) = b.node("Softplus", [x.name])
        (t,) = b.node("Tanh", [sp])
        (y,) = b.node("Mul", [x.name, t])
    return b.add(y, s)


def _layernorm(b: Builder, x: _T) -> _T | None:
    """LayerNorm over the last axis: decomposed (ReduceMean/Sub/Pow/Sqrt/Div/Mul/Add) or the op."""
    if len(x.shape) < 2 or x.shape[-1] < 2:
        return None
    d = x.shape[-1]
    gamma = b.const(b.array((d,), "positive"), "ln_g", kind="positive")
    beta = b.const(b.array((d,), "small"), "ln_b")
    eps = b.choice([1e-5, 1e-6])
    if b.integer(0, 3) == 3:
        (y,) = b.node("LayerNormalization", [x.name, gamma, beta], axis=-1, epsilon=eps)
        return b.add(y, x.shape)
    (mu,) = b.node("ReduceMean", [x.name], axes=[-1], keepdims=1)
    (dv,) = b.node("Sub", [x.name, mu])
    if b.flag():
        (sq,) = b.node("Mul", [dv, dv])
    else:
        (sq,) = b.node("Pow", [dv, b.scalar(2.0, "two")])
    (var,) = b.node("ReduceMean", [sq], axes=[-1], keepdims=1)
    (ve,) = b.node("Add", [var, b.scalar(eps, "eps")])
    (sd,) = b.node("Sqrt", [ve])
    (nrm,) = b.node("Div", [dv, sd])
    (g,) = b.node("Mul", [nrm, gamma])
    (y,) = b.node("Add", [g, beta])
    return b.add(y, x.shape)


def _broadcast_const_shapes(shape: Shape) -> list[Shape]:
    out: list[Shape] = [(), (1,), (shape[-1],) if shape else (), tuple(shape)]
    if len(shape) == 4:
        out += [(shape[1], 1, 1), (1, shape[1], 1, 1)]
    if len(shape) >= 2:
        out.append((1,) * (len(shape) - 1) + (shape[-1],))
    return out


def _binary_const(b: Builder, x: _T) -> _T | None:
    op = b.choice(["Add", "Mul", "Sub", "Div"])
    shape = b.choice(_broadcast_const_shapes(x.shape))
    if op == "Div":
        k = b.const(b.array(shape, "divisor"), "k", kind="divisor")
        (y,) = b.node(op, [x.name, k])
    else:
        k = b.const(b.array(shape, "small"), "k", kind="small", may_be_input=True)
        (y,) = b.node(op, [x.name, k] if b.flag() else [k, x.name])
    return b.add(y, x.shape)


def _binary_tensors(b: Builder, x: _T) -> _T | None:
    """Residual Add / Mul / Sub / Max between x and an earlier tensor that broadcasts to it."""
    partners = [t for t in b.tensors if t.name != x.name and _broadcasts_to(t.shape, x.shape)]
    if not partners and not b.flag():
        return None
    other = b.choice(partners) if partners else x  # x + x when nothing else fits
    op = b.choice(["Add", "Add", "Mul", "Sub", "Max"])
    (y,) = b.node(op, [x.name, other.name] if b.flag() else [other.name, x.name])
    return b.add(y, x.shape)


def _broadcasts_to(a: Shape, target: Shape) -> bool:
    try:
        return tuple(np.broadcast_shapes(a, target)) == tuple(target)
    except ValueError:
        return False


def _se_block(b: Builder, x: _T) -> _T | None:
    """Squeeze-excitation: x * Sigmoid(Conv(Relu(Conv(GlobalAveragePool(x)))))."""
    if len(x.shape) != 4:
        return None
    n, c, _, _ = x.shape
    r = max(1, c // 2)
    (p,) = (
        b.node("GlobalAveragePool", [x.name])
        if b.flag()
        else b.node("ReduceMean", [x.name], axes=[2, 3], keepdims=1)
    )
    (c1,) = b.node(
        "Conv",
        [p, b.const(b.array((r, c, 1, 1)), "se_w1"), b.const(b.array((r,), "small"), "se_b1")],
        kernel_shape=[1, 1],
    )
    (a,) = b.node("Relu", [c1])
    (c2,) = b.node(
        "Conv",
        [a, b.const(b.array((c, r, 1, 1)), "se_w2"), b.const(b.array((c,), "small"), "se_b2")],
        kernel_shape=[1, 1],
    )
    (g,) = b.node(b.choice(["Sigmoid", "HardSigmoid"]), [c2])
    (y,) = b.node("Mul", [x.name, g] if b.flag() else [g, x.name])
    return b.add(y, x.shape)


def _pool(b: Builder, x: _T) -> _T | None:
    if len(x.shape) != 4:
        return None
    n, c, h, w = x.shape
    kind = b.choice(["MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool"])
    if kind.startswith("Global"):
        (y,) = b.node(kind, [x.name])
        return b.add(y, (n, c, 1, 1))
    k = b.integer(1, 3)
    s = b.integer(1, 2)
    p = b.integer(0, k // 2)
    oh, ow = _conv_out(h, k, s, 1, p, p), _conv_out(w, k, s, 1, p, p)
    if oh < 1 or ow < 1:
        return None
    attrs: dict[str, Any] = {"kernel_shape": [k, k], "strides": [s, s], "pads": [p, p, p, p]}
    if kind == "AveragePool":
        attrs["count_include_pad"] = int(b.flag())
    (y,) = b.node(kind, [x.name], **attrs)
    return b.add(y, (n, c, oh, ow))


def _concat(b: Builder, x: _T) -> _T | None:
    axis = b.integer(0, len(x.shape) - 1) if x.shape else 0
    if not x.shape:
        return None
    partners = [
        t
        for t in b.tensors
        if len(t.shape) == len(x.shape)
        and all(a == c for i, (a, c) in enumerate(zip(t.shape, x.shape)) if i != axis)
    ]
    other = b.choice(partners)  # x itself is always a partner
    shape = list(x.shape)
    shape[axis] += other.shape[axis]
    if _elems(tuple(shape)) > MAX_ELEMS:
        return None
    (y,) = b.node("Concat", [x.name, other.name] if b.flag() else [other.name, x.name], axis=axis)
    return b.add(y, tuple(shape))


def _split(b: Builder, x: _T) -> _T | None:
    axes = [i for i, d in enumerate(x.shape) if d >= 2]
    if not axes:
        return None
    axis = b.choice(axes)
    dim = x.shape[axis]
    first = b.integer(1, dim - 1)
    if dim % 2 == 0 and b.flag():
        outs = b.node("Split", [x.name], n_out=2, axis=axis)
        sizes = [dim // 2, dim // 2]
    else:
        outs = b.node("Split", [x.name, b.ints([first, dim - first], "split")], n_out=2, axis=axis)
        sizes = [first, dim - first]
    res = None
    for o, sz in zip(outs, sizes):
        shape = list(x.shape)
        shape[axis] = sz
        res = b.add(o, tuple(shape))
    return res


def _slice(b: Builder, x: _T) -> _T | None:
    axes = [i for i, d in enumerate(x.shape) if d >= 2]
    if not axes:
        return None
    axis = b.choice(axes)
    dim = x.shape[axis]
    start = b.integer(0, dim - 1)
    end = b.integer(start + 1, dim)
    step = b.integer(1, 2)
    neg = b.flag()
    starts, ends = [start - dim if neg else start], [end - dim if (neg and end < dim) else end]
    if end == dim and b.flag():
        ends = [2**62]  # "to the end", as exporters write it
    ins = [x.name, b.ints(starts, "starts"), b.ints(ends, "ends")]
    if b.flag() or step != 1:
        ax = axis - len(x.shape) if b.flag() else axis
        ins += [b.ints([ax], "axes"), b.ints([step], "steps")]
    else:
        if axis != 0:
            ins.append(b.ints([axis], "axes"))
        else:
            ins = ins  # axes default to 0..len(starts)-1 == [0]
    shape = list(x.shape)
    shape[axis] = len(range(start, end, step))
    (y,) = b.node("Slice", ins)
    return b.add(y, tuple(shape))


def _reshape(b: Builder, x: _T) -> _T | None:
    if len(x.shape) < 2:
        return None
    n = x.shape[0]
    rest = _elems(x.shape[1:])
    form = b.integer(0, 3)
    target: tuple[int, ...]
    if form == 0:
        target, spec = (n, rest), [n, -1]
    elif form == 1:
        target, spec = (n, rest), [0, -1]
    elif form == 2 and len(x.shape) == 4:
        target = (n, x.shape[1], x.shape[2] * x.shape[3])
        spec = [0, 0, -1]
    else:
        (y,) = b.node("Flatten", [x.name], axis=1)
        return b.add(y, (n, rest))
    (y,) = b.node("Reshape", [x.name, b.ints(spec, "shape")])
    return b.add(y, target)


def _transpose(b: Builder, x: _T) -> _T | None:
    if len(x.shape) < 2:
        return None
    perm = list(b.draw(st.permutations(list(range(len(x.shape))))))
    (y,) = b.node("Transpose", [x.name], perm=perm)
    return b.add(y, tuple(x.shape[p] for p in perm))


def _resize(b: Builder, x: _T) -> _T | None:
    if len(x.shape) != 4 or _elems(x.shape) * 4 > MAX_ELEMS:
        return None
    mode = b.choice(["nearest", "linear"])
    attrs: dict[str, Any] = {"mode": mode}
    if mode == "nearest":
        attrs["coordinate_transformation_mode"] = "asymmetric"
        attrs["nearest_mode"] = "floor"
    else:
        attrs["coordinate_transformation_mode"] = b.choice(["half_pixel", "align_corners"])
    (y,) = b.node(
        "Resize",
        [
            x.name,
            "",
            b.const(np.array([1, 1, 2, 2], np.float32), "scales", kind="scales", may_share=False),
        ],
        **attrs,
    )
    n, c, h, w = x.shape
    return b.add(y, (n, c, 2 * h, 2 * w))


def _gemm(b: Builder, x: _T) -> _T | None:
    if len(x.shape) != 2:
        return None
    n, f = x.shape
    o = b.integer(1, 16)
    trans_b = b.integer(0, 1)
    wt = b.const(b.array((o, f) if trans_b else (f, o)), "gemm_w", may_be_input=True)
    ins = [x.name, wt]
    if b.flag():
        ins.append(b.const(b.array(b.choice([(o,), (1, o), (1,)]), "small"), "gemm_c"))
    attrs: dict[str, Any] = {"transB": trans_b}
    if b.flag():
        attrs["alpha"], attrs["beta"] = b.choice([(0.5, 2.0), (1.0, 1.0), (2.0, 0.5)])
    (y,) = b.node("Gemm", ins, **attrs)
    return b.add(y, (n, o))


def _matmul(b: Builder, x: _T) -> _T | None:
    """MatMul with a weight on the last axis, often followed by a bias Add (either order)."""
    if len(x.shape) < 2:
        return None
    f = x.shape[-1]
    o = b.integer(1, 16)
    shape = x.shape[:-1] + (o,)
    if _elems(shape) > MAX_ELEMS:
        return None
    (y,) = b.node("MatMul", [x.name, b.const(b.array((f, o)), "mm_w", may_be_input=True)])
    t = b.add(y, shape)
    if b.flag():
        bias = b.const(b.array(b.choice([(o,), (1, o)]), "small"), "mm_b")
        (z,) = b.node("Add", [t.name, bias] if b.flag() else [bias, t.name])
        t = b.add(z, shape)
    return t


def _softmax(b: Builder, x: _T) -> _T | None:
    if not x.shape:
        return None
    (y,) = b.node(b.choice(["Softmax", "LogSoftmax"]), [x.name], axis=-1)
    return b.add(y, x.shape)


def _noop(b: Builder, x: _T) -> _T | None:
    """Ops that compute nothing: Identity, inference Dropout, Cast to float, Mul 1, Add 0..."""
    form = b.choice(
        [
            "Identity",
            "Dropout",
            "Dropout_ratio",
            "Cast",
            "Mul1",
            "Add0",
            "Pad0",
            "SliceAll",
            "Reshape_same",
            "Transpose_id",
            "Expand_same",
            "Concat1",
        ]
    )
    if form == "Identity":
        (y,) = b.node("Identity", [x.name])
    elif form == "Dropout":
        (y,) = b.node("Dropout", [x.name])
    elif form == "Dropout_ratio":
        y, _mask = b.node("Dropout", [x.name, b.scalar(0.5, "ratio")], n_out=2)
    elif form == "Cast":
        (y,) = b.node("Cast", [x.name], to=TensorProto.FLOAT)
    elif form == "Mul1":
        (y,) = b.node("Mul", [x.name, b.scalar(1.0, "one")])
    elif form == "Add0":
        (y,) = b.node("Add", [b.scalar(0.0, "zero"), x.name])
    elif form == "Pad0":
        (y,) = b.node("Pad", [x.name, b.ints([0] * (2 * len(x.shape)), "pads")])
    elif form == "SliceAll" and x.shape:
        (y,) = b.node("Slice", [x.name, b.ints([0], "starts"), b.ints([2**62], "ends")])
    elif form == "Reshape_same":
        (y,) = b.node("Reshape", [x.name, b.ints(list(x.shape), "shape")])
    elif form == "Transpose_id" and x.shape:
        (y,) = b.node("Transpose", [x.name], perm=list(range(len(x.shape))))
    elif form == "Expand_same":
        (y,) = b.node("Expand", [x.name, b.ints(list(x.shape), "shape")])
    else:
        (y,) = b.node("Concat", [x.name], axis=0)
    return b.add(y, x.shape)


def _shape_subgraph(b: Builder, x: _T) -> _T | None:
    """Reshape driven by a shape computation: Shape -> Gather -> Concat -> Reshape."""
    if len(x.shape) < 2:
        return None
    (s,) = b.node("Shape", [x.name])
    form = b.integer(0, 2)
    if form == 0:  # flatten to (N, -1)
        (g,) = b.node("Gather", [s, b.ints([0], "idx")], axis=0)
        (c,) = b.node("Concat", [g, b.ints([-1], "minus1")], axis=0)
        (y,) = b.node("Reshape", [x.name, c])
        return b.add(y, (x.shape[0], _elems(x.shape[1:])))
    if form == 1:  # rebuild the same shape from its pieces (a no-op reshape)
        (g0,) = b.node("Gather", [s, b.ints([0], "idx")], axis=0)
        (g1,) = b.node("Slice", [s, b.ints([1], "starts"), b.ints([len(x.shape)], "ends")])
        (c,) = b.node("Concat", [g0, g1], axis=0)
        (y,) = b.node("Reshape", [x.name, c])
        return b.add(y, x.shape)
    # scalar Gather + Unsqueeze, then (N, C, -1)
    if len(x.shape) < 3:
        return None
    (g0,) = b.node("Gather", [s, b.ints(0, "idx0")], axis=0)
    (g1,) = b.node("Gather", [s, b.ints(1, "idx1")], axis=0)
    (u0,) = b.node("Unsqueeze", [g0, b.ints([0], "ax")])
    (u1,) = b.node("Unsqueeze", [g1, b.ints([0], "ax")])
    (c,) = b.node("Concat", [u0, u1, b.ints([-1], "minus1")], axis=0)
    (y,) = b.node("Reshape", [x.name, c])
    return b.add(y, (x.shape[0], x.shape[1], _elems(x.shape[2:])))


def _if(b: Builder, x: _T) -> _T | None:
    """If with a constant condition (initializer or Constant node) or a data-dependent one."""
    form = b.integer(0, 2)
    if form == 0:
        cond = b.const(np.array(b.flag()), "cond", kind="bool", may_share=False)
    elif form == 1:
        (cond,) = b.node("Constant", [], value=numpy_helper.from_array(np.array(b.flag()), "c"))
    else:
        # decided far from the threshold so that float rounding can never flip the branch
        (m,) = b.node("ReduceMean", [x.name], keepdims=0)
        (cond,) = b.node("Greater", [m, b.scalar(b.choice([-1e6, 1e6]), "thr")])
        b.consumed.add(cond)
    out_info = helper.make_tensor_value_info("unused", TensorProto.FLOAT, list(x.shape))

    def branch(kind: int, tag: str) -> onnx.GraphProto:
        out = b.name(f"{tag}_out")
        inits: list[onnx.TensorProto] = []
        if kind == 0:
            nodes = [helper.make_node("Relu", [x.name], [out], name=b.name(f"{tag}_relu"))]
        elif kind == 1:
            k = b.name(f"{tag}_k")
            inits.append(numpy_helper.from_array(b.array((), "small") + 1.0, k))
            mid = b.name(f"{tag}_mid")
            nodes = [
                helper.make_node("Mul", [x.name, k], [mid], name=b.name(f"{tag}_mul")),
                helper.make_node("Sigmoid", [mid], [out], name=b.name(f"{tag}_sig")),
            ]
        elif kind == 2 and len(x.shape) == 4:
            c = x.shape[1]
            w, bb = b.name(f"{tag}_w"), b.name(f"{tag}_b")
            inits.append(numpy_helper.from_array(b.array((c, c, 1, 1)), w))
            inits.append(numpy_helper.from_array(b.array((c,), "small"), bb))
            mid = b.name(f"{tag}_conv")
            nodes = [
                helper.make_node(
                    "Conv", [x.name, w, bb], [mid], name=b.name(f"{tag}_c"), kernel_shape=[1, 1]
                ),
                helper.make_node("Relu", [mid], [out], name=b.name(f"{tag}_r")),
            ]
        else:
            nodes = [helper.make_node("Identity", [x.name], [out], name=b.name(f"{tag}_id"))]
        vi = onnx.ValueInfoProto()
        vi.CopyFrom(out_info)
        vi.name = out
        return helper.make_graph(nodes, b.name(tag), [], [vi], initializer=inits)

    then_g = branch(b.integer(0, 3), "then")
    else_g = branch(b.integer(0, 3), "else")
    (y,) = b.node("If", [cond], then_branch=then_g, else_branch=else_g)
    b.consumed.add(x.name)
    return b.add(y, x.shape)


BLOCKS: dict[str, Callable[[Builder, _T], _T | None]] = {
    "conv": _conv,
    "conv_transpose": _conv_transpose,
    "batchnorm": _batchnorm,
    "conv_bn": _conv_bn,
    "conv_scale_shift": _conv_scale_shift,
    "pad_conv": _pad_conv,
    "conv_act": _conv_act,
    "activation": _activation,
    "written_activation": _written_activation,
    "layernorm": _layernorm,
    "binary_const": _binary_const,
    "binary_tensors": _binary_tensors,
    "se_block": _se_block,
    "pool": _pool,
    "concat": _concat,
    "split": _split,
    "slice": _slice,
    "reshape": _reshape,
    "transpose": _transpose,
    "resize": _resize,
    "gemm": _gemm,
    "matmul": _matmul,
    "softmax": _softmax,
    "noop": _noop,
    "shape_subgraph": _shape_subgraph,
    "if": _if,
}


@dataclass
class Generated:
    """A generated model with what the generator knows about it."""

    model: onnx.ModelProto
    output_shapes: dict[str, Shape]
    blocks: list[str]

    def __repr__(self) -> str:  # what hypothesis prints for a falsifying example
        return (
            f"Generated(blocks={self.blocks}, nodes={len(self.model.graph.node)})\n"
            + onnx.printer.to_text(self.model.graph)
        )


@st.composite
def generated_models(
    draw: Callable[[st.SearchStrategy[Any]], Any],
    max_blocks: int = 8,
    blocks: tuple[str, ...] | None = None,
    kinds: tuple[str, ...] = ("image", "image", "image", "sequence", "matrix"),
    min_blocks: int = 1,
) -> Generated:
    """A random valid opset-17 model with float32 inputs of static shape, and its output shapes.

    Args:
        max_blocks, min_blocks: how many blocks to draw (inapplicable draws are skipped).
        blocks: restrict the menu to these block names (keys of ``BLOCKS``).
        kinds: input kinds to draw from: "image" (N,C,H,W), "sequence" (N,T,D), "matrix" (N,F).
    """
    b = Builder(draw=draw, seed=draw(st.integers(0, 2**31 - 1)))
    menu = sorted(blocks or BLOCKS)
    kind = draw(st.sampled_from(list(kinds)))
    n = draw(st.integers(1, 2))
    if kind == "image":
        shape: Shape = (
            n,
            draw(st.integers(1, 8)),
            draw(st.integers(3, 9)),
            draw(st.integers(3, 9)),
        )
    elif kind == "sequence":
        shape = (n, draw(st.integers(1, 8)), draw(st.integers(2, 16)))
    else:
        shape = (n, draw(st.integers(1, 32)))
    x = b.add("x", shape)
    b.inputs.append(helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape)))
    if draw(st.integers(0, 4)) == 4:  # a second data input of the same shape
        b.add("x2", shape)
        b.inputs.append(helper.make_tensor_value_info("x2", TensorProto.FLOAT, list(shape)))
    count = draw(st.integers(min_blocks, max_blocks))
    for _ in range(count):
        back = draw(st.integers(0, min(3, len(b.tensors) - 1)))
        x = b.tensors[len(b.tensors) - 1 - back]
        name = draw(st.sampled_from(menu))
        before = (len(b.nodes), len(b.inits), len(b.inputs), len(b.tensors), set(b.consumed))
        y = BLOCKS[name](b, x)
        if y is None:  # not applicable here: undo whatever the block started
            b.nodes[before[0] :] = []
            b.inits[before[1] :] = []
            b.inputs[before[2] :] = []
            b.tensors[before[3] :] = []
            b.consumed = before[4]
            known = {i.name for i in b.inits}
            for key in list(b.shared):
                b.shared[key] = [nm for nm in b.shared[key] if nm in known]
            continue
        b.used_blocks.append(name)
    last = b.tensors[-1]
    outputs = [last]
    inputs = {i.name for i in b.inputs}
    for t in b.tensors[:-1]:
        if t.name in inputs:
            continue
        if t.name not in b.consumed:
            if draw(st.integers(0, 2)) > 0:  # otherwise a dead branch
                outputs.append(t)
        elif draw(st.integers(0, 7)) == 7:  # an intermediate that is also a graph output
            outputs.append(t)
    if last.name in inputs:  # no block applied: return the input through a node
        (relu,) = b.node("Relu", [last.name])
        outputs = [b.add(relu, last.shape)]
    out_vis = [
        helper.make_tensor_value_info(t.name, TensorProto.FLOAT, list(t.shape)) for t in outputs
    ]
    graph = helper.make_graph(b.nodes, "fuzz", b.inputs, out_vis, initializer=b.inits)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="graphgen"
    )
    model.ir_version = IR_VERSION
    return Generated(model, {t.name: t.shape for t in outputs}, b.used_blocks)


def onnx_models(max_blocks: int = 8) -> st.SearchStrategy[onnx.ModelProto]:
    """Random valid ``onnx.ModelProto`` objects (opset 17, float32 inputs of static shape)."""
    return generated_models(max_blocks=max_blocks).map(lambda g: g.model)
