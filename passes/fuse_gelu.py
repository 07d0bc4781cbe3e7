"""GELU -> onnxruntime's fused GELU ops (the ``ort`` target's lowering).

* ``x * 0.5 * (1 + erf(x / sqrt 2))`` (every order of :func:`gelu_patterns`), exact GELU
  ``x * Phi(x)``, -> ``com.microsoft.Gelu(x)``;
* ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``, the tanh approximation, ->
  ``com.microsoft.FastGelu(x)``, which computes exactly that formula;
* when ``x = y + b`` with ``b`` a constant of ``x``'s last-axis size (1-D, or leading ones) and the
  sum read by nothing else: ``com.microsoft.BiasGelu(y, b)`` (= ``Gelu(y + b)``) and
  ``com.microsoft.FastGelu(y, b)`` (= ``FastGelu(y + b)``), one kernel for the bias add and the
  activation (what onnxruntime's transformer optimizer emits after a MatMul);
* an ONNX ``Gelu`` node (opset >= 20, written by ``recognize-activations``) is lowered only when a
  bias can be folded in (``approximate='none'``: BiasGelu; ``'tanh'``: FastGelu with bias); alone it
  already has a kernel.

The portable form (ONNX ``Gelu`` at opset >= 20, with ``approximate``) is
``recognize-activations``' rewrite; below opset 20 the portable output keeps the nodes. These ops
run only in onnxruntime, float32 only (their CPU kernels' one type), and only when the installed
onnxruntime registers them (:func:`graphopt.core.kernels.ort_contrib_runs`); else the nodes stay.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.algorithms.transformer_patterns import ActivationRule, gelu_patterns
from graphopt.core.errors import OptionError
from graphopt.core.graph import const, make_node
from graphopt.core.model import Model
from graphopt.core.pass_manager import PassResult, register_pass
from graphopt.core.pattern import Match, Op, Refusal, RewritePass, Rule, RuleSet

logger = logging.getLogger(__name__)

TARGETS = ("ort",)
MS = "com.microsoft"


def bias_of(x: gs.Tensor, inside: list[gs.Node], graph: gs.Graph | None) -> tuple[gs.Node, int]:
    """``(add, i)`` when ``x = Add(y, b)`` with constant ``b`` at input ``i`` foldable as a GELU
    bias: ``b`` has ``x``'s last-axis size (leading ones allowed), ``y`` is not constant and has
    ``x``'s shape, and ``x`` is read only by ``inside`` and is not a graph output. Raises
    ValueError with the reason otherwise."""
    prod = x.inputs[0] if len(x.inputs) == 1 else None
    if prod is None or prod.op != "Add" or (prod.domain or "") != "" or len(prod.inputs) != 2:
        raise ValueError("no Add before the GELU")
    consts = [i for i, t in enumerate(prod.inputs) if isinstance(t, gs.Constant)]
    if len(consts) != 1:
        raise ValueError("the Add does not have exactly one constant input")
    i = consts[0]
    b = np.asarray(prod.inputs[i].values)
    y = prod.inputs[1 - i]
    shape = getattr(x, "shape", None)
    if not shape or not isinstance(shape[-1], int) or b.size != shape[-1] or b.size < 1:
        raise ValueError("the bias is not of the last axis' size")
    if b.shape[-1:] != (b.size,) or b.ndim > len(shape):
        raise ValueError("the bias broadcasts over more than the last axis")
    if getattr(y, "shape", None) is None or list(y.shape) != list(shape):
        raise ValueError("the Add broadcasts its other input")
    ids = {id(n) for n in inside}
    if any(id(c) not in ids for c in x.outputs):
        raise ValueError("the biased sum is read elsewhere")
    if graph is not None and any(o is x for o in graph.outputs):
        raise ValueError("the biased sum is a graph output")
    return prod, i


class OrtGeluRule(ActivationRule):
    """Written-out GELU (erf or tanh form) or ONNX ``Gelu`` -> onnxruntime's GELU ops."""

    emits_domain = MS
    _bias: tuple[gs.Node | None, gs.Node | None, int] = (None, None, 0)

    @property
    def tanh(self) -> bool:
        return self.name in ("gelu-tanh", "onnx-gelu-tanh")

    def emitted_op(self) -> str | None:
        return "FastGelu" if self.tanh else "Gelu"

    def extra_check(self, m: Match) -> bool | Refusal:
        if self.x_dtype(m) != np.dtype(np.float32):
            return Refusal("onnxruntime's GELU kernels are float32 only")
        try:
            add, i = bias_of(m["x"], m.nodes, m.graph)
        except ValueError as exc:
            self._bias = (m.root, None, 0)
            if self.name.startswith("onnx-"):
                return Refusal(f"ONNX Gelu already has a kernel and no bias folds in: {exc}")
            return True
        if not self.tanh and not self.runs("BiasGelu", np.dtype(np.float32)):
            self._bias = (m.root, None, 0)
            return not self.name.startswith("onnx-")
        self._bias = (m.root, add, i)
        return True

    def rewrite(self, m: Match, outputs: list[gs.Variable]) -> list[gs.Node]:
        root, add, i = self._bias
        assert root is m.root
        if add is None:
            op = self.emitted_op()
            assert op is not None
            return [make_node(op, [m["x"]], outputs, name=op.lower(), domain=MS)]
        y, bias = add.inputs[1 - i], add.inputs[i]
        b = np.asarray(bias.values)
        if b.ndim != 1:  # a 1-D bias is reused as it is (shared constants stay shared)
            bias = const("gelu_bias", np.ascontiguousarray(b.reshape(-1)), np.float32)
        add.inputs.clear()  # the Add is folded in: detached, removed by the engine's cleanup
        add.outputs.clear()
        op = "FastGelu" if self.tanh else "BiasGelu"
        return [make_node(op, [y, bias], outputs, name=op.lower(), domain=MS)]


def build_rules() -> list[Rule]:
    """Rules for the written-out forms and for ONNX ``Gelu`` nodes."""
    rules: list[Rule] = [OrtGeluRule(name, p) for name, p in gelu_patterns()]
    rules.append(
        OrtGeluRule(
            "onnx-gelu",
            Op("Gelu", ["x"], attrs=lambda a: a.get("approximate", "none") == "none"),
            min_opset=20,
        )
    )
    rules.append(
        OrtGeluRule(
            "onnx-gelu-tanh",
            Op("Gelu", ["x"], attrs=lambda a: a.get("approximate", "none") == "tanh"),
            min_opset=20,
        )
    )
    return rules


@register_pass
class FuseGeluPass(RewritePass):
    """GELU (written out or ONNX Gelu) -> com.microsoft Gelu/FastGelu/BiasGelu (ort target)."""

    name = "fuse-gelu"

    def __init__(self, target: str = "ort") -> None:
        if target not in TARGETS:
            raise OptionError(
                f"fuse-gelu lowers to onnxruntime's fused ops: target must be 'ort', not "
                f"{target!r} (the portable ONNX Gelu is 'recognize-activations')"
            )
        self.target = target
        self._opset = 17

    def rule_set(self) -> RuleSet:
        rules = build_rules()
        for r in rules:
            assert isinstance(r, OrtGeluRule)
            r.opset = self._opset
        return RuleSet(rules)

    def call(self, model: Model) -> PassResult:
        ops = {n.op for _, n in model.walk_nodes()}
        if not ops & {"Erf", "Tanh", "Gelu"}:
            return PassResult(model, False, {})
        self._opset = model.opset
        return super().call(model)
