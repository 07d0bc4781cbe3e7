"""Written-out LayerNorm and RMSNorm -> one normalisation op.

* **LayerNorm** over the last ``k`` axes::

      d = x - ReduceMean(x);  y = d / Sqrt(ReduceMean(d^2) + eps) * gamma + beta
        -> LayerNormalization(x, gamma, beta, axis=-k, epsilon=eps)          (opset >= 17)

  (``Pow(d, 2)`` or ``d * d``; ``Div`` or ``Mul(Reciprocal)``; gamma/beta optional, constant,
  broadcasting to the normalised shape only.) Below opset 17 the nodes are kept (refusal: opset).
* **RMSNorm** ``y = x / Sqrt(ReduceMean(x^2) + eps) * gamma`` (also ``x * Reciprocal(.)`` and
  ``x * (1 / .)``; ``Pow(x, 2)`` or ``x * x``) is ``x / rms(x) * gamma``, exactly
  ``RMSNormalization(x, gamma, axis=-k, epsilon=eps)`` of ONNX opset 23 (emitted when the installed
  onnxruntime has its kernel); below opset 23 it is kept for the portable target and, for
  ``target='ort'``, becomes onnxruntime's ``SimplifiedLayerNormalization`` (same maths, float
  kernels in the ONNX domain; that model no longer passes ``onnx.checker``, which does not know the
  op, but runs in onnxruntime, the ort target's promise).

Reductions must be ``keepdims=1`` over the same last axes (attribute before opset 18, constant
input from 18); intermediate tensors used elsewhere and a centred input to the RMS form (that is a
LayerNorm) are refused; a gamma or beta that is not a constant stays a Mul/Add after the fused
norm. The patterns are shared with
``recognize-activations`` (:mod:`graphopt.algorithms.transformer_patterns`), which also recognises
LayerNorm; this pass adds RMSNorm and the ort lowering.
"""

from __future__ import annotations

from graphopt.algorithms.transformer_patterns import (
    LayerNormRule,
    RmsNormRule,
    layernorm_patterns,
    rmsnorm_patterns,
)
from graphopt.core.errors import OptionError
from graphopt.core.model import Model
from graphopt.core.pass_manager import PassResult, register_pass
from graphopt.core.pattern import RewritePass, Rule, RuleSet

TARGETS = ("portable", "ort")


def build_rules(opset: int, target: str = "portable") -> list[Rule]:
    """The LayerNorm and RMSNorm rules for a model of ``opset`` and a target."""
    rules: list[Rule] = []
    for form, p in layernorm_patterns():
        rules.append(LayerNormRule("layernorm", p, form=form, opset=opset))
    for form, p in rmsnorm_patterns():
        rules.append(RmsNormRule("rmsnorm", p, form=form, opset=opset, target=target))
    return rules


@register_pass
class FuseLayerNormPass(RewritePass):
    """Written-out LayerNorm -> LayerNormalization, RMSNorm -> RMSNormalization (opset >= 23) or,
    for ``target='ort'``, SimplifiedLayerNormalization."""

    name = "fuse-layernorm"

    def __init__(self, target: str = "portable") -> None:
        if target not in TARGETS:
            raise OptionError(f"fuse-layernorm: target must be one of {TARGETS}, not {target!r}")
        self.target = target
        self._opset = 17

    def rule_set(self) -> RuleSet:
        return RuleSet(build_rules(self._opset, self.target))

    def call(self, model: Model) -> PassResult:
        if not {"ReduceMean", "Sqrt"} <= {n.op for _, n in model.walk_nodes()}:
            return PassResult(model, False, {})
        self._opset = model.opset
        return super().call(model)
