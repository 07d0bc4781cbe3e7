"""Fold inference-mode BatchNormalization into the Conv, ConvTranspose or Gemm before it.

``BatchNormalization(y, gamma, beta, mean, var, epsilon)`` computes per output channel ``c`` ``(y_c
- mean_c) * s_c + beta_c`` with ``s = gamma / sqrt(var + epsilon)``. When ``y`` is the output of a
linear producer with constant weights, the affine map folds into them:

* ``Conv(x, W, B)``: ``W'[c] = W[c] * s_c`` (weight layout ``[Cout, Cin/g, k...]``), ``B' = (B -
  mean) * s + beta`` (``B = 0`` when absent);
* ``ConvTranspose(x, W, B)``: weight layout ``[Cin, Cout/g, k...]``, output channel ``c = grp *
  Cout/g + j`` reads ``W[grp * Cin/g : (grp+1) * Cin/g, j]``, so ``W`` is scaled along axis 1 per
  group;
* ``Gemm(A, B, C, alpha, beta_g, transB)`` (``Y = alpha * A B + beta_g * C``, channel = column
  ``n``): ``B'[:, n] = B[:, n] * s_n`` (rows when ``transB=1``), ``C' = beta_g * C * s + (beta -
  mean * s)`` and ``beta_g' = 1``.

A BatchNormalization with nothing foldable before it is kept as one node (it is standard ONNX and
onnxruntime runs it as one fused per-channel kernel; rewriting it into Mul + Add would add a node
and a memory pass). It is simplified only when that is strictly cheaper: ``s == 1`` and ``beta -
mean == 0`` removes it, ``s == 1`` makes it one Add, ``beta - mean * s == 0`` one Mul.

All folding is computed in float64 and cast back to the weight's dtype. The helpers
:func:`out_channels` and :func:`scale_out_channels` are shared with ``fuse-conv-mul-add``.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.core.pass_manager import register_pass
from graphopt.core.pattern import (
    Const,
    Match,
    Op,
    Pattern,
    RewritePass,
    Rule,
    Var,
    const,
    make_node,
)

logger = logging.getLogger(__name__)

#: producers whose output channels can absorb a per-channel affine map
LINEAR_OPS = ("Conv", "ConvTranspose", "Gemm")
FLOAT_DTYPES = (np.float16, np.float32, np.float64)


def is_float(values: np.ndarray) -> bool:
    return values.dtype in [np.dtype(d) for d in FLOAT_DTYPES]


def out_channels(node: gs.Node, w: np.ndarray) -> int | None:
    """Output channels of a Conv/ConvTranspose/Gemm with weight ``w`` (None if unknown)."""
    if node.op == "Conv":
        return int(w.shape[0]) if w.ndim >= 3 else None
    if node.op == "ConvTranspose":
        return int(w.shape[1]) * int(node.attrs.get("group", 1)) if w.ndim >= 3 else None
    if node.op == "Gemm":
        if w.ndim != 2:
            return None
        return int(w.shape[0] if node.attrs.get("transB", 0) else w.shape[1])
    return None


def scale_out_channels(node: gs.Node, w: np.ndarray, s: np.ndarray) -> np.ndarray:
    """``w`` with output channel ``c`` multiplied by ``s[c]`` (float64 result)."""
    w64 = w.astype(np.float64)
    s = np.asarray(s, dtype=np.float64).reshape(-1)
    if node.op == "Conv":
        return w64 * s.reshape((-1,) + (1,) * (w.ndim - 1))
    if node.op == "ConvTranspose":
        g = int(node.attrs.get("group", 1))
        cin, cog = w.shape[0], w.shape[1]
        grouped = w64.reshape((g, cin // g, cog) + w.shape[2:])
        grouped = grouped * s.reshape((g, 1, cog) + (1,) * (w.ndim - 2))
        return grouped.reshape(w.shape)
    if node.op == "Gemm":
        return w64 * (s[:, None] if node.attrs.get("transB", 0) else s[None, :])
    raise ValueError(node.op)


def linear_ok(node: gs.Node, w: np.ndarray) -> bool:
    """The producer is a supported linear op with a float weight of a known layout."""
    if node.op not in LINEAR_OPS or not is_float(w) or len(node.outputs) > 1:
        return False
    if node.op == "ConvTranspose":
        g = int(node.attrs.get("group", 1))
        if w.ndim < 3 or w.shape[0] % g:
            return False
    if node.op == "Gemm":
        return w.ndim == 2
    return w.ndim >= 3


def bias_of(node: gs.Node, m: Match, n_out: int) -> np.ndarray:
    """The producer's additive term as float64, shaped for broadcasting against its output."""
    if node.op == "Gemm":
        if "b" not in m.tensors:
            return np.zeros(n_out)
        return float(node.attrs.get("beta", 1.0)) * m.value("b").astype(np.float64)
    if "b" not in m.tensors:
        return np.zeros(n_out)
    return m.value("b").astype(np.float64).reshape(-1)


def rebuild_linear(m: Match, node: gs.Node, w_new: np.ndarray | None, b_new: np.ndarray,
                   outputs: list[gs.Variable], dtype: Any) -> gs.Node:
    """A copy of the producer ``node`` (already detached) with new weight (None: keep) and bias."""
    attrs = dict(node.attrs)
    if node.op == "Gemm":
        attrs["beta"] = 1.0
    w = m["w"] if w_new is None else const(m["w"].name, w_new.astype(dtype), dtype=dtype)
    b = const(m["b"].name if "b" in m.tensors else f"{node.name}.bias", b_new.astype(dtype),
              dtype=dtype)
    return make_node(node.op, [m["x"], w, b], outputs, attrs, name=node.name)


def _bn_ok(bn: gs.Node) -> bool:
    if int(bn.attrs.get("training_mode", 0)) != 0:
        return False
    return len(bn.outputs) == 1 or all(not o.outputs for o in bn.outputs[1:])


def _bn_affine(m: Match) -> tuple[np.ndarray, np.ndarray] | None:
    """(s, t) with BN(y) = y * s + t per channel, or None when the parameters do not fit."""
    vals = [m.value(k) for k in ("gamma", "beta", "mean", "var")]
    if not all(is_float(v) for v in vals):
        return None
    n = vals[0].size
    if any(v.ndim != 1 or v.size != n for v in vals):
        return None
    gamma, beta, mean, var = (v.astype(np.float64) for v in vals)
    eps = float(m["bn"].attrs.get("epsilon", 1e-5))
    if np.any(var + eps <= 0):
        return None
    s = gamma / np.sqrt(var + eps)
    return s, beta - mean * s


def _bn_pattern(producer: Pattern | str) -> Op:
    return Op("BatchNormalization",
              [producer, Const("gamma"), Const("beta"), Const("mean"), Const("var")], name="bn")


class _FoldBN(Rule):
    """BN(Linear(x, W[, B])) -> Linear(x, W', B')."""

    modifies = ("w", "b")
    with_bias = True

    def check(self, m: Match) -> bool:
        node, bn = m["lin"], m["bn"]
        w = m.value("w")
        if not _bn_ok(bn) or not linear_ok(node, w):
            return False
        aff = _bn_affine(m)
        n = out_channels(node, w)
        if aff is None or n is None or aff[0].size != n:
            return False
        if node.op == "Gemm" and "b" in m.tensors:
            try:
                np.broadcast_shapes(m.value("b").shape, (1, n))
            except ValueError:
                return False
        elif "b" in m.tensors and m.value("b").size != n:
            return False
        return "b" not in m.tensors or is_float(m.value("b"))

    def rewrite(self, m: Match, outputs: list[gs.Variable]) -> list[gs.Node]:
        node = m["lin"]
        w = m.value("w")
        aff = _bn_affine(m)
        assert aff is not None
        s, t = aff
        n = s.size
        w_new = scale_out_channels(node, w, s)
        b_new = bias_of(node, m, n) * s + t
        return [rebuild_linear(m, node, w_new, b_new, outputs, w.dtype)]


def _fold_rules() -> list[Rule]:
    rules: list[Rule] = []
    for op in LINEAR_OPS:
        with_b = Op(op, ["x", Const("w"), Const("b")], name="lin")
        without = Op(op, ["x", Const("w")], name="lin")
        for bias, pat in ((True, with_b), (False, without)):
            cls = type(f"Fold{op}BatchNorm{'Bias' if bias else ''}", (_FoldBN,),
                       {"name": f"fold-{op.lower()}-bn", "pattern": _bn_pattern(pat),
                        "with_bias": bias})
            rules.append(cls())
    return rules


_ULP = 4 * float(np.finfo(np.float32).eps)


def _unit(s: np.ndarray) -> bool:
    """Scale is one within fp32 rounding of the BN's own arithmetic."""
    return bool(np.all(np.abs(s - 1.0) <= _ULP))


def _zero(t: np.ndarray, ref: np.ndarray) -> bool:
    return bool(np.all(np.abs(t) <= _ULP * np.maximum(np.abs(ref), 1e-30)))


class SimplifyStandaloneBN(Rule):
    """BN(x) with unit scale or zero shift -> one Add, one Mul, or nothing (never more nodes).

    Only applies when the input's channel axis is known to be axis 1 of a rank >= 2 tensor.
    """

    name = "simplify-standalone-bn"
    pattern = _bn_pattern(Var("x"))

    def check(self, m: Match) -> bool:
        if not _bn_ok(m["bn"]):
            return False
        aff = _bn_affine(m)
        if aff is None:
            return False
        s, t = aff
        x = m["x"]
        if x.shape is None or len(x.shape) < 2 or x.shape[1] != s.size:
            return False
        if x.dtype is not None and np.dtype(x.dtype) != m.value("gamma").dtype:
            return False
        # must be strictly cheaper than one BN node: at most one elementwise op left
        return _unit(s) or _zero(t, m.value("beta"))

    def rewrite(self, m: Match, outputs: list[gs.Variable]) -> list[gs.Node]:
        aff = _bn_affine(m)
        assert aff is not None
        s, t = aff
        x = m["x"]
        dt = m.value("gamma").dtype
        shape = (-1,) + (1,) * (len(x.shape) - 2)
        zero = _zero(t, m.value("beta"))
        if _unit(s) and zero:
            # identity: eliminate-identity removes it (keeping graph output names)
            return [make_node("Identity", [x], outputs, name="bn_id")]
        if not zero:
            return [make_node("Add", [x, const("bn_shift", t.reshape(shape), dt)], outputs,
                              name="bn_add")]
        return [make_node("Mul", [x, const("bn_scale", s.reshape(shape), dt)], outputs,
                          name="bn_mul")]


@register_pass
class FuseConvBatchNormPass(RewritePass):
    """Fold BatchNormalization into the preceding Conv/ConvTranspose/Gemm weights and bias."""

    name = "fuse-conv-bn"
    rules = (*_fold_rules(), SimplifyStandaloneBN())
