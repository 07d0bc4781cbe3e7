"""``Add(MatMul(A, B), C) -> Gemm(A, B, C)`` for a rank-2 ``A`` and constant ``B`` and ``C``.

Gemm computes ``Y = alpha * A' B' + beta * C`` with ``C`` unidirectionally broadcast to ``[M, N]``;
with ``alpha = beta = 1`` and no transposes this is exactly ``MatMul + Add`` when ``A`` is ``[M,
K]``, ``B`` is ``[K, N]`` and ``C`` (shape ``[]``, ``[N]``, ``[1, N]``, ``[M, 1]`` or ``[M, N]``)
broadcasts to ``[M, N]`` without changing the result's shape. ``A`` of any other rank (batched
MatMul) is left alone: Gemm is rank-2 only. Float dtypes only (Gemm's integer support is uneven
across runtimes).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.core.graph import make_node
from graphopt.core.pass_manager import register_pass
from graphopt.core.pattern import Const, Match, Op, Refusal, RewritePass, Rule

logger = logging.getLogger(__name__)

_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


class MatMulAddToGemm(Rule):
    name = "matmul-add-to-gemm"
    pattern = Op("Add", [Op("MatMul", ["a", Const("w")], name="mm"), Const("c")], name="add")

    def check(self, m: Match) -> bool | Refusal:
        a = m["a"]
        w, c = m.value("w"), m.value("c")
        if a.shape is None or len(a.shape) != 2 or w.ndim != 2:
            return Refusal("MatMul is not rank 2 (Gemm is rank-2 only)")
        if w.dtype not in _FLOATS or c.dtype != w.dtype:
            return Refusal("weight and addend are not of one float type")
        if a.dtype is not None and np.dtype(a.dtype) != w.dtype:
            return Refusal("input type differs from the weight's")
        k, n = (int(d) for d in w.shape)
        mdim = a.shape[0]
        if isinstance(a.shape[1], int) and a.shape[1] != k:
            return Refusal(f"inner dimensions differ ({a.shape[1]} vs {k})")
        if c.ndim > 2:
            return Refusal("addend has rank > 2")
        cs = (1,) * (2 - c.ndim) + tuple(c.shape)
        if cs[1] not in (1, n) or not (cs[0] == 1 or (isinstance(mdim, int) and cs[0] == mdim)):
            return Refusal(
                f"addend of shape {tuple(c.shape)} does not broadcast to [M, {n}] "
                "without changing the result's shape"
            )
        return True

    def rewrite(self, m: Match, outputs: list[gs.Variable]) -> list[gs.Node]:
        return [make_node("Gemm", [m["a"], m["w"], m["c"]], outputs, name=m["mm"].name)]


@register_pass
class FuseMatMulAddPass(RewritePass):
    """Rank-2 MatMul with constant weight followed by a constant Add -> Gemm."""

    name = "fuse-matmul-add"
    rules = (MatMulAddToGemm(),)
