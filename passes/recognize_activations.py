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

Only ops the installed onnxruntime runs are emitted (:func:`graphopt.core.kernels.ort_runs`, its
kernel registry read once): ``Swish`` at opset 25+ has no kernel in onnxruntime 1.32, so there
``x * Sigmoid(x)`` is kept.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.core.graph import const, make_node, unique_name
from graphopt.core.kernels import ort_runs
from graphopt.core.model import Model
from graphopt.core.pass_manager import PassResult, register_pass
from graphopt.core.pattern import Const, Match, Op, Refusal, RewritePass, Rule, RuleSet, scalar

logger = logging.getLogger(__name__)

TOL = 1e-5


def C(name: str, value: float) -> Const:
    """A single-element constant equal to ``value`` (relative tolerance ``TOL``)."""
    return Const(name, scalar(value, tol=TOL))


def mul(a: Any, b: Any, name: str | None = None) -> Op:
    return Op("Mul", [a, b], name=name, commutative=True)


def add(a: Any, b: Any, name: str | None = None) -> Op:
    return Op("Add", [a, b], name=name, commutative=True)


def _float(t: gs.Tensor) -> np.dtype | None:
    if isinstance(t, gs.Constant):
        return np.asarray(t.values).dtype
    return np.dtype(t.dtype) if t.dtype is not None else None


def _fresh(like: gs.Tensor, base: str) -> gs.Variable:
    return gs.Variable(
        unique_name(f"{base}_{like.name}"),
        dtype=getattr(like, "dtype", None),
        shape=getattr(like, "shape", None),
    )


class ActivationRule(Rule):
    """A rule whose rewrite depends on the model's opset; common checks on ``x`` and constants."""

    min_opset: int = 1
    max_opset: int = 10**6
    opset: int = 13
    #: the op the rewrite emits (checked against the installed onnxruntime's kernels)
    emits: str | None = None

    def __init__(self, name: str, pattern: Op, **kw: Any) -> None:
        super().__init__(pattern, name=name)
        for k, v in kw.items():
            setattr(self, k, v)

    def check(self, m: Match) -> bool | Refusal:
        if not (self.min_opset <= self.opset <= self.max_opset):
            return Refusal(f"opset {self.opset} outside {self.min_opset}..{self.max_opset}")
        x = m.tensors.get("x")
        if x is None:
            return True
        xd = _float(x)
        if xd is None:  # shapes not inferred: the constants' dtype (ONNX makes them agree)
            xd = next(
                (
                    np.asarray(t.values).dtype
                    for t in m.tensors.values()
                    if isinstance(t, gs.Constant)
                ),
                None,
            )
        if xd is None or xd not in (
            np.dtype(np.float16),
            np.dtype(np.float32),
            np.dtype(np.float64),
        ):
            return Refusal(f"input type {xd} is not float16/32/64")
        op = self.emitted_op()
        if op is not None and not ort_runs(op, self.opset, dtype=xd):
            return Refusal(f"the installed onnxruntime cannot run {op} at opset {self.opset}")
        rank = len(x.shape) if getattr(x, "shape", None) is not None else 1
        for key, t in m.tensors.items():
            if key == "x" or not isinstance(t, gs.Constant):
                continue
            v = np.asarray(t.values)
            if v.size == 1 and (v.ndim > rank or v.dtype != xd):
                return Refusal(f"constant '{t.name}' would change the result's rank or type")
        return self.extra_check(m)

    def extra_check(self, m: Match) -> bool:
        return True

    def emitted_op(self) -> str | None:
        """The op the rewrite emits at this opset."""
        return self.emits


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


# ---------------------------------------------------------------------------------- LayerNorm


def _axes(node: gs.Node) -> list[int] | None:
    if "axes" in node.attrs:
        return [int(a) for a in node.attrs["axes"]]
    if len(node.inputs) >= 2 and isinstance(node.inputs[1], gs.Constant):
        return [int(a) for a in np.asarray(node.inputs[1].values).reshape(-1)]
    return None


def layernorm_patterns() -> Iterator[tuple[str, Op]]:
    mean = Op("ReduceMean", ["x"], name="mean1", extra_inputs=True)
    sub = Op("Sub", ["x", mean], name="sub")
    for sq in (Op("Pow", ["d", C("two", 2.0)]), Op("Mul", ["d", "d"])):
        var = Op("ReduceMean", [sq], name="mean2", extra_inputs=True)
        std = Op("Sqrt", [add(var, Const("eps", scalar()))])
        for norm in (Op("Div", [sub, std]), mul(sub, Op("Reciprocal", [std]))):
            yield "full", add(mul(norm, Const("gamma")), Const("beta"))
            yield "gamma", mul(norm, Const("gamma"))
            yield "plain", norm


class LayerNormRule(ActivationRule):
    min_opset = 17
    emits = "LayerNormalization"
    form = "full"  # full (gamma and beta) | gamma | plain
    _checked: tuple[gs.Node | None, int | None] = (None, None)

    def _norm_axes(self, m: Match) -> int | None:
        x = m["x"]
        if x.shape is None:
            return None
        r = len(x.shape)
        a1, a2 = _axes(m["mean1"]), _axes(m["mean2"])
        if a1 is None or a2 is None:
            return None
        for n in (m["mean1"], m["mean2"]):
            if int(n.attrs.get("keepdims", 1)) != 1 or int(n.attrs.get("noop_with_empty_axes", 0)):
                return None
        s1 = sorted(a % r for a in a1)
        if s1 != sorted(a % r for a in a2) or not s1:
            return None
        k = len(s1)
        if s1 != list(range(r - k, r)) or any(not isinstance(d, int) for d in x.shape[r - k :]):
            return None
        return k

    def _param(
        self, m: Match, key: str, norm_shape: tuple[int, ...], rank: int, default: float
    ) -> np.ndarray | None:
        if key not in m.tensors:
            return np.full(norm_shape, default)
        v = m.value(key)
        if v.ndim > rank or any(d != 1 for d in v.shape[: max(0, v.ndim - len(norm_shape))]):
            return None
        tail = v.reshape(v.shape[max(0, v.ndim - len(norm_shape)) :])
        try:
            return np.broadcast_to(tail, norm_shape)
        except ValueError:
            return None

    def _extends(self, m: Match) -> bool:
        """The root feeds a constant Mul (gamma) / Add (beta) that a larger form takes."""
        outs = m.root.outputs
        if self.form == "full" or len(outs) != 1 or len(outs[0].outputs) != 1:
            return False
        nxt = outs[0].outputs[0]
        want = "Mul" if self.form == "plain" else "Add"
        return nxt.op == want and any(isinstance(t, gs.Constant) for t in nxt.inputs)

    def extra_check(self, m: Match) -> bool:
        if self._extends(m):
            return False
        if not m["sub"].outputs or m.tensors.get("d") is not m["sub"].outputs[0]:
            return False
        k = self._norm_axes(m)
        self._checked = (m.root, k)
        if k is None:
            return False
        x = m["x"]
        ns = tuple(int(d) for d in x.shape[-k:])
        return (
            self._param(m, "gamma", ns, len(x.shape), 1.0) is not None
            and self._param(m, "beta", ns, len(x.shape), 0.0) is not None
            and float(m.value("eps").reshape(-1)[0]) >= 0
        )

    def rewrite(self, m: Match, outputs: list[gs.Variable]) -> list[gs.Node]:
        x = m["x"]
        root, k = self._checked  # the matched nodes are detached by now (axes may be inputs)
        assert root is m.root and k is not None
        ns = tuple(int(d) for d in x.shape[-k:])
        dt = _float(x)
        g = self._param(m, "gamma", ns, len(x.shape), 1.0)
        b = self._param(m, "beta", ns, len(x.shape), 0.0)
        eps = float(m.value("eps").reshape(-1)[0])
        return [
            make_node(
                "LayerNormalization",
                [
                    x,
                    const("ln_scale", np.ascontiguousarray(g), dt),
                    const("ln_bias", np.ascontiguousarray(b), dt),
                ],
                outputs,
                {"axis": -k, "epsilon": eps},
                name="layernorm",
            )
        ]


# ---------------------------------------------------------------------------------- GELU


def _halves(x: Any, t: Op) -> Iterator[Op]:
    """``x * 0.5 * t`` in the orders exporters use."""
    yield mul(mul(x, t), C("half", 0.5))
    yield mul(mul(x, C("half", 0.5)), t)
    yield mul(x, mul(t, C("half", 0.5)))
    yield Op("Div", [mul(x, t), C("two", 2.0)])


def gelu_patterns() -> Iterator[tuple[str, Op]]:
    for scaled in (
        Op("Div", ["x", C("sqrt2", math.sqrt(2.0))]),
        mul("x", C("isqrt2", 1.0 / math.sqrt(2.0))),
    ):
        t = add(Op("Erf", [scaled]), C("one", 1.0))
        for p in _halves("x", t):
            yield "gelu", p
    cubes = (Op("Pow", ["x", C("three", 3.0)]), mul("x", mul("x", "x")), mul(mul("x", "x"), "x"))
    for cube in cubes:
        inner = add("x", mul(cube, C("k", 0.044715)))
        arg = mul(inner, C("c", math.sqrt(2.0 / math.pi)))
        t = add(Op("Tanh", [arg]), C("one", 1.0))
        for p in _halves("x", t):
            yield "gelu-tanh", p


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
