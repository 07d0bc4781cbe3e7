"""Residual ``Add`` read only by a ``LayerNormalization`` -> ``Sum`` (the portable target).

::

    s = Add(a, b);  y = LayerNormalization(s, gamma, beta)
      -> s = Sum(a, b);  y = LayerNormalization(s, gamma, beta)

``Sum`` of two operands is ``Add``: the same multidirectional broadcasting and the same float
addition, bit for bit, so the rewrite is exact. It exists for onnxruntime, where most portable
models are run: its ``SkipLayerNormFusion`` (extended level and above) turns ``Add`` +
``LayerNormalization`` into ``com.microsoft.SkipLayerNormalization``, whose CPU kernel is slower
than the two kernels it replaces (3.8x at [4, 64, 384], 10.7x at [1, 1500, 384]; the table and the
exact conditions are in :mod:`graphopt.algorithms.residual_sum`), and the fusion does not match
``Sum``. Only the Adds that fusion would take are rewritten (two non-constant float operands of one
3-D shape, the sum read by the norm alone and not a graph output); the ``ort`` target does not run
this pass (it emits ``SkipLayerNormalization`` itself, as onnxruntime's transformer optimizer does).
"""

from __future__ import annotations

from graphopt.algorithms.residual_sum import sum_residual_adds
from graphopt.core.model import Model
from graphopt.core.pass_manager import Pass, PassResult, register_pass


@register_pass
class SumResidualAddsPass(Pass):
    """Residual Add before a LayerNormalization -> Sum (exact; keeps onnxruntime off its slow
    SkipLayerNormalization)."""

    name = "sum-residual-adds"

    def call(self, model: Model) -> PassResult:
        done = sum_residual_adds(model)
        return PassResult(model, bool(done), {"adds_to_sum": len(done)})
