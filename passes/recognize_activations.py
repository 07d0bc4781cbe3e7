"""Recognise activations that exporters write out elementwise and replace them with one ONNX op.

Forms (``x`` any float tensor; constants are single-element, of ``x``'s dtype, and may not raise the
output's rank; all Mul/Add operands in either order):

* **hardswish** ``x * Clip(x + 3, 0, 6) / 6`` (Paddle), also ``x * (Clip(..) / 6)``, ``* 1/6``,
  ``Clip`` with ``min``/``max`` attributes (opset < 11) or as ``Min(Max(., 0), 6)``,
  ``Max(Min(..))``, ``Min(Relu(.), 6)``. ``HardSwish(x) = x * max(0, min(1, x / 6 + 1/2))``, so the
  result is ``HardSwish(x)`` at opset >= 14 and ``Mul(x, HardSigmoid(x, alpha=1/6, beta=1/2))``
  below (two standard nodes instead of four).
* **hardsigmoid** ``Clip(x + 3, 0, 6) / 6`` (and the ``* 1/6`` form) -> ``HardSigmoid(x, 1/6,
  1/2)``.
* ``HardSigmoid(x, alpha=1/6, beta=1/2) * x`` -> ``HardSwish(x)`` (opset >= 14). Only these
  constants are exact: Paddle's SE ``HardSigmoid`` uses ``alpha = 0.2``, which is *not* a hardswish
  and is kept.
* **SiLU** ``x * Sigmoid(x)``: ONNX has ``Swish`` only from opset 24, so below that the two nodes
  are kept (``fuse-conv-activation`` treats Sigmoid + Mul as one activation unit). A ``Sigmoid(x *
  1)`` (PP-OCRv4 rec's Swish) loses its Mul by one so that the unit is recognisable.
* **LayerNorm** ``(x - mean(x)) / sqrt(mean((x - mean(x))^2) + eps) * gamma + beta`` over the last
  ``k`` axes (``Pow(d, 2)`` or ``d * d``; ``Div`` or ``Mul(Reciprocal)``; gamma/beta optional) ->
  ``LayerNormalization(x, gamma, beta, axis=-k, epsilon=eps)`` at opset >= 17, when gamma and beta
  broadcast to the normalised shape without changing the output shape.
* **GELU** ``x * 0.5 * (1 + erf(x / sqrt 2))`` (PyTorch and TF orders, ``Div`` by sqrt 2 or ``Mul``
  by its inverse) -> ``Gelu(x)``; the tanh form ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``
  -> ``Gelu(x, approximate='tanh')``; both at opset >= 20, left alone below.

The LayerNorm and GELU patterns (and the checks every rule makes) live in
:mod:`graphopt.algorithms.transformer_patterns`, shared with ``fuse-layernorm`` and ``fuse-gelu``.
Only ops the installed onnxruntime runs are emitted (:func:`graphopt.core.kernels.ort_runs`, its
kernel registry read once): ``Swish`` at opset 25+ has no kernel in onnxruntime 1.32, so there
``x * Sigmoid(x)`` is kept.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.algorithms.transformer_patterns import (
    ActivationRule,
    C,
    LayerNormRule,
    add,
    gelu_patterns,
    layernorm_patterns,
    mul,
)
from graphopt.core.graph import make_node, unique_name
from graphopt.core.model import Model
from graphopt.core.pass_manager import PassResult, register_pass
from graphopt.core.pattern import Match, Op, RewritePass, Rule, RuleSet

logger = logging.getLogger(__name__)


def _fresh(like: gs.Tensor, base: str) -> gs.Variable:
    return gs.Variable(
        unique_name(f"{base}_{like.name}"),
        dtype=getattr(like, "dtype", None),
        shape=getattr(like, "shape", None),
    )


# ---------------------------------------------------------------------------------- hardswish


def _clip_forms(x: str = "x") -> Iterator[Op]:
    a = add(x, C("three", 3.0))
    yield Op("Clip", [a, C("lo", 0.0), C("hi", 6.0)])
    yield Op(
        "Clip",
        [a],
        attrs=lambda at: (
            float(at.get("min", -np.inf)) == 0.0 and float(at.get("max", np.inf)) == 6.0
        ),
    )
    yield Op(
        "Min", [Op("Max", [a, C("lo", 0.0)], commutative=True), C("hi", 6.0)], commutative=True
    )
    yield Op(
        "Max", [Op("Min", [a, C("hi", 6.0)], commutative=True), C("lo", 0.0)], commutative=True
    )
    yield Op("Min", [Op("Relu", [a]), C("hi", 6.0)], commutative=True)


def _sixth(k: Op) -> Iterator[Op]:
    """``k / 6`` written as Div or as Mul by 1/6."""
    yield Op("Div", [k, C("six", 6.0)])
    yield mul(k, C("sixth", 1.0 / 6.0))


def hardswish_patterns() -> Iterator[Op]:
    for k in _clip_forms():
        yield Op("Div", [mul("x", k), C("six", 6.0)])  # x * k / 6
        yield mul(mul("x", k), C("sixth", 1.0 / 6.0))  # x * k * (1/6)
        for s in _sixth(k):
            yield mul("x", s)  # x * (k / 6)
        yield mul(Op("Div", ["x", C("six", 6.0)]), k)  # (x / 6) * k
        yield mul(mul("x", C("sixth", 1.0 / 6.0)), k)  # (x * 1/6) * k


def hardsigmoid_patterns() -> Iterator[Op]:
    for k in _clip_forms():
        yield from _sixth(k)


def _is_hswish_hsig(at: dict[str, Any]) -> bool:
    return (
        abs(float(at.get("alpha", 0.2)) - 1.0 / 6.0) <= 1e-6
        and abs(float(at.get("beta", 0.5)) - 0.5) <= 1e-6
    )


def _hardswish_nodes(x: gs.Tensor, outputs: list[gs.Variable], opset: int) -> list[gs.Node]:
    if opset >= 14:
        return [make_node("HardSwish", [x], outputs, name="hardswish")]
    hs = make_node(
        "HardSigmoid",
        [x],
        [_fresh(x, "hsig")],
        {"alpha": 1.0 / 6.0, "beta": 0.5},
        name="hardswish_hsig",
    )
    return [hs, make_node("Mul", [x, hs.outputs[0]], outputs, name="hardswish_mul")]


class HardSwishRule(ActivationRule):
    def emitted_op(self) -> str | None:
        return "HardSwish" if self.opset >= 14 else "HardSigmoid"

    def rewrite(self, m: Match, outputs: list[gs.Variable]) -> list[gs.Node]:
        return _hardswish_nodes(m["x"], outputs, self.opset)


class HardSigmoidRule(ActivationRule):
    emits = "HardSigmoid"

    def rewrite(self, m: Match, outputs: list[gs.Variable]) -> list[gs.Node]:
        return [
            make_node(
                "HardSigmoid",
                [m["x"]],
                outputs,
                {"alpha": 1.0 / 6.0, "beta": 0.5},
                name="hardsigmoid",
            )
        ]


class SiluUnitRule(ActivationRule):
    """``Sigmoid(x * 1) -> Sigmoid(x)`` so that ``x * Sigmoid(x)`` is one recognisable unit; at
    opset >= 24 ``x * Sigmoid(x) -> Swish(x)``."""

    def emitted_op(self) -> str | None:
        return "Swish" if self.name == "swish" else "Sigmoid"

    def rewrite(self, m: Match, outputs: list[gs.Variable]) -> list[gs.Node]:
        if self.name == "swish":
            return [make_node("Swish", [m["x"]], outputs, {"alpha": 1.0}, name="swish")]
        return [make_node("Sigmoid", [m["x"]], outputs, name="sigmoid")]


# ---------------------------------------------------------------------------------- GELU


class GeluRule(ActivationRule):
    min_opset = 20
    emits = "Gelu"

    def rewrite(self, m: Match, outputs: list[gs.Variable]) -> list[gs.Node]:
        attrs = {"approximate": "tanh"} if self.name == "gelu-tanh" else {}
        return [make_node("Gelu", [m["x"]], outputs, attrs, name="gelu")]


# ---------------------------------------------------------------------------------- pass


def build_rules(opset: int) -> list[Rule]:
    """Every rule instance, configured for ``opset``."""
    rules: list[ActivationRule] = []
    for p in hardswish_patterns():
        rules.append(HardSwishRule("hardswish", p))
    rules.append(
        HardSwishRule(
            "hardsigmoid-mul",
            mul("x", Op("HardSigmoid", ["x"], attrs=_is_hswish_hsig)),
            min_opset=14,
        )
    )
    for p in hardsigmoid_patterns():
        rules.append(HardSigmoidRule("hardsigmoid", p))
    rules.append(SiluUnitRule("sigmoid-mul-one", Op("Sigmoid", [mul("x", C("one", 1.0))])))
    rules.append(SiluUnitRule("swish", mul("x", Op("Sigmoid", ["x"])), min_opset=24))
    for form, p in layernorm_patterns():
        rules.append(LayerNormRule("layernorm", p, form=form))
    for name, p in gelu_patterns():
        rules.append(GeluRule(name, p))
    for r in rules:
        r.opset = opset
    return list(rules)


def required_ops(p: Op) -> set[str]:
    """Op types every match of ``p`` contains (alternatives given as a tuple are not required)."""
    ops = {p.op} if isinstance(p.op, str) else set()
    for q in p.inputs:
        if isinstance(q, Op):
            ops |= required_ops(q)
    return ops


@register_pass
class RecognizeActivationsPass(RewritePass):
    """Replace written-out hardswish/hardsigmoid/LayerNorm/GELU with single ONNX ops."""

    name = "recognize-activations"

    def __init__(self) -> None:
        self._opset = 13
        self._present: set[str] | None = None

    def rule_set(self) -> RuleSet:
        """Only the rules that can apply: right opset, every op of the pattern in the model."""
        rules = [
            r
            for r in build_rules(self._opset)
            if isinstance(r, ActivationRule)
            and r.min_opset <= self._opset <= r.max_opset
            and (self._present is None or required_ops(r.pattern) <= self._present)
        ]
        return RuleSet(rules)

    def call(self, model: Model) -> PassResult:
        self._opset = model.opset
        # plus what the rules themselves emit for other rules (hardsigmoid -> hardsigmoid-mul)
        self._present = {n.op for _, n in model.walk_nodes()} | {"HardSigmoid"}
        return super().call(model)
