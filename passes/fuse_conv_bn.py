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

All folding is computed in float64 and cast back to the weight's dtype. The per-channel weight
arithmetic is :mod:`graphopt.algorithms.linear` (shared with ``fuse-conv-mul-add``).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.algorithms.linear import (
    LINEAR_OPS,
    bias_of,
    is_float,
    linear_ok,
    out_channels,
    rebuild_linear,
    scale_out_channels,
)
from graphopt.core.graph import const, make_node
from graphopt.core.pass_manager import register_pass
from graphopt.core.pattern import Const, Match, Op, Opt, Pattern, Refusal, RewritePass, Rule, Var

logger = logging.getLogger(__name__)


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
    return Op(
        "BatchNormalization",
        [producer, Const("gamma"), Const("beta"), Const("mean"), Const("var")],
        name="bn",
    )


class _FoldBN(Rule):
    """BN(Linear(x, W[, B])) -> Linear(x, W', B')."""

    modifies = ("w", "b")

    def check(self, m: Match) -> bool | Refusal:
        node, bn = m["lin"], m["bn"]
        w = m.value("w")
        if not _bn_ok(bn):
            return Refusal("BatchNormalization in training mode or with used extra outputs")
        if not linear_ok(node, w):
            return Refusal(f"{node.op} weight of this layout or type is not supported")
        aff = _bn_affine(m)
        n = out_channels(node, w)
        if aff is None:
            return Refusal(
                "BN parameters are not 1-D float vectors of one length, or var + eps <= 0"
            )
        if n is None or aff[0].size != n:
            return Refusal(f"BN has {aff[0].size} channels, the {node.op} {n} output channels")
        if node.op == "Gemm" and "b" in m.tensors:
            try:
                np.broadcast_shapes(m.value("b").shape, (1, n))
            except ValueError:
                return Refusal("Gemm bias does not broadcast to [1, N]")
        elif "b" in m.tensors and m.value("b").size != n:
            return Refusal("bias size differs from the output channels")
        if "b" in m.tensors and not is_float(m.value("b")):
            return Refusal("bias is not float")
        return True

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
    return [
        _FoldBN(
            _bn_pattern(Op(op, ["x", Const("w"), Opt(Const("b"))], name="lin")),
            name=f"fold-{op.lower()}-bn",
        )
        for op in LINEAR_OPS
    ]


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
            return [
                make_node(
                    "Add", [x, const("bn_shift", t.reshape(shape), dt)], outputs, name="bn_add"
                )
            ]
        return [
            make_node("Mul", [x, const("bn_scale", s.reshape(shape), dt)], outputs, name="bn_mul")
        ]


@register_pass
class FuseConvBatchNormPass(RewritePass):
    """Fold BatchNormalization into the preceding Conv/ConvTranspose/Gemm weights and bias."""

    name = "fuse-conv-bn"
    rules = (*_fold_rules(), SimplifyStandaloneBN())
