"""Fold a constant per-channel (or scalar) Mul, Div, Add or Sub after Conv/ConvTranspose/Gemm.

With ``y = Linear(x, W, B)`` (output channel axis 1) and a constant ``c`` that broadcasts only along
that axis (shapes ``[]``, ``[1]``, ``[C,1,1]``, ``[1,C,1,1]``, ... with each non-channel dim 1):

* ``y * c  -> Linear(x, W * c, B * c)``       (``W`` scaled per output channel)
* ``y / c  -> Linear(x, W / c, B / c)``       (``c`` finite and non-zero)
* ``y + c  -> Linear(x, W, B + c)``
* ``y - c  -> Linear(x, W, B - c)``
* ``c - y  -> Linear(x, -W, c - B)``

This is the PP-LCNetV3 "learnable affine block" (``Conv -> Mul(scalar) -> Add(scalar)``), which
becomes a plain Conv after two rewrites. The constant must not change the output's shape (its rank
is at most the output's) or dtype (same float dtype as the weight). Folding is computed in float64.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.algorithms.linear import (
    LINEAR_OPS,
    bias_of,
    linear_ok,
    out_channels,
    rebuild_linear,
    scale_out_channels,
)
from graphopt.core.pass_manager import register_pass
from graphopt.core.pattern import Const, Match, Op, Opt, Pattern, Refusal, RewritePass, Rule

logger = logging.getLogger(__name__)


def channel_vector(c: np.ndarray, out_rank: int, n: int) -> np.ndarray | None:
    """``c`` as a length-``n`` float64 vector if it broadcasts only along axis 1 of a rank
    ``out_rank`` tensor with ``n`` channels; None otherwise."""
    if c.ndim > out_rank or out_rank < 2:
        return None
    shape = (1,) * (out_rank - c.ndim) + tuple(c.shape)
    if any(d != 1 for i, d in enumerate(shape) if i != 1) or shape[1] not in (1, n):
        return None
    return np.broadcast_to(c.astype(np.float64).reshape(-1), (n,)).copy()


def _out_rank(node: gs.Node, w: np.ndarray) -> int:
    return 2 if node.op == "Gemm" else w.ndim


class _FoldAffine(Rule):
    """Elementwise(Linear(x, W[, B]), c) -> Linear(x, W', B')."""

    kind = "mul"  # mul | div | add | sub | rsub

    def __init__(self, kind: str, pattern: Op) -> None:
        mods = ("w", "b") if kind in ("mul", "div", "rsub") else ("b",)
        super().__init__(pattern, name=f"fold-linear-{kind}", modifies=mods)
        self.kind = kind

    def vector(self, m: Match) -> np.ndarray | None:
        node = m["lin"]
        w = m.value("w")
        if not linear_ok(node, w):
            return None
        c = m.value("c")
        if c.dtype != w.dtype or ("b" in m.tensors and m.value("b").dtype != w.dtype):
            return None
        n = out_channels(node, w)
        if n is None:
            return None
        if "b" in m.tensors:
            b = m.value("b")
            if node.op == "Gemm":
                try:
                    np.broadcast_shapes(b.shape, (1, n))
                except ValueError:
                    return None
            elif b.size != n:
                return None
        outs = m["root"].outputs  # empty once detached for the rewrite
        if outs and outs[0].dtype is not None and np.dtype(outs[0].dtype) != w.dtype:
            return None
        v = channel_vector(c, _out_rank(node, w), n)
        if v is None or not np.all(np.isfinite(v)):
            return None
        if self.kind == "div" and np.any(v == 0):
            return None
        return v

    def check(self, m: Match) -> bool | Refusal:
        if self.vector(m) is None:
            return Refusal(
                "the constant is not a finite per-channel or scalar value of the "
                "weight's type (or a zero divisor), or the weight layout is unsupported"
            )
        return True

    def rewrite(self, m: Match, outputs: list[gs.Variable]) -> list[gs.Node]:
        node = m["lin"]
        w = m.value("w")
        v = self.vector(m)
        assert v is not None
        n = v.size
        b = bias_of(node, m, n)
        w_new: np.ndarray | None
        if self.kind in ("mul", "div"):
            f = v if self.kind == "mul" else 1.0 / v
            w_new, b_new = scale_out_channels(node, w, f), b * f
        elif self.kind == "add":
            w_new, b_new = None, b + v
        elif self.kind == "sub":
            w_new, b_new = None, b - v
        else:  # rsub
            w_new, b_new = -w.astype(np.float64), v - b
        return [rebuild_linear(m, node, w_new, b_new, outputs, w.dtype)]


def _rules() -> list[Rule]:
    forms: list[tuple[str, str, Callable[[Op], list[Pattern | str | None]]]] = [
        ("mul", "Mul", lambda p: [p, Const("c")]),
        ("div", "Div", lambda p: [p, Const("c")]),
        ("add", "Add", lambda p: [p, Const("c")]),
        ("sub", "Sub", lambda p: [p, Const("c")]),
        ("rsub", "Sub", lambda p: [Const("c"), p]),
    ]
    lin = Op(LINEAR_OPS, ["x", Const("w"), Opt(Const("b"))], name="lin")
    # Mul and Add also match with the constant first (commutative ops); Div and Sub do not
    return [_FoldAffine(kind, Op(op, inputs(lin), name="root")) for kind, op, inputs in forms]


@register_pass
class FuseConvMulAddPass(RewritePass):
    """Fold per-channel/scalar constant Mul, Div, Add, Sub after Conv/ConvTranspose/Gemm."""

    name = "fuse-conv-mul-add"
    rules = tuple(_rules())
