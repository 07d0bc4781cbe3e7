"""Patterns of the normalisations and activations that exporters write out elementwise, shared by
the passes that replace them (``recognize-activations``, ``fuse-layernorm``, ``fuse-gelu``).

* **LayerNorm** ``(x - mean(x)) / sqrt(mean((x - mean(x))^2) + eps) * gamma + beta`` over the last
  ``k`` axes (``Pow(d, 2)`` or ``d * d``; ``Div`` or ``Mul(Reciprocal)``; gamma/beta optional) ->
  ``LayerNormalization(x, gamma, beta, axis=-k, epsilon=eps)`` (opset >= 17).
* **RMSNorm** ``x / sqrt(mean(x^2) + eps) * gamma`` (``Pow(x, 2)`` or ``x * x``; ``Div``,
  ``Mul(Reciprocal)`` or ``Mul(1 / .)``; gamma optional) over the last ``k`` axes, i.e.
  ``RMSNormalization(x, gamma, axis=-k, epsilon=eps)`` (ONNX opset >= 23) and onnxruntime's
  ``SimplifiedLayerNormalization`` (same maths, registered by onnxruntime in the ONNX domain at
  every opset). An input that is itself ``x - mean(x)`` is a LayerNorm and is left to that rule.
* **GELU** ``x * 0.5 * (1 + erf(x / sqrt 2))`` (PyTorch and TF orders, ``Div`` by sqrt 2 or ``Mul``
  by its inverse) and the tanh form ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``
  (:func:`gelu_patterns`; the rules that emit ONNX ``Gelu`` or onnxruntime's ``Gelu``/``FastGelu``
  live in the passes).

:class:`ActivationRule` holds the checks every such rule makes: the opset window, a float input,
single-element constants that do not change the result's rank or type, and a kernel for the
emitted op in the installed onnxruntime (:mod:`graphopt.core.kernels`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.core.graph import const, make_node
from graphopt.core.kernels import ort_contrib_runs, ort_runs
from graphopt.core.pattern import Const, Match, Op, Refusal, Rule, scalar

TOL = 1e-5
FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def C(name: str, value: float) -> Const:
    """A single-element constant equal to ``value`` (relative tolerance ``TOL``)."""
    return Const(name, scalar(value, tol=TOL))


def mul(a: Any, b: Any, name: str | None = None) -> Op:
    """A commutative ``Mul`` pattern."""
    return Op("Mul", [a, b], name=name, commutative=True)


def add(a: Any, b: Any, name: str | None = None) -> Op:
    """A commutative ``Add`` pattern."""
    return Op("Add", [a, b], name=name, commutative=True)


def float_dtype(t: gs.Tensor) -> np.dtype | None:
    """The element type of a tensor (None when unknown)."""
    if isinstance(t, gs.Constant):
        return np.asarray(t.values).dtype
    return np.dtype(t.dtype) if t.dtype is not None else None


class ActivationRule(Rule):
    """A rule whose rewrite depends on the model's opset; common checks on ``x`` and constants."""

    min_opset: int = 1
    max_opset: int = 10**6
    opset: int = 13
    #: the op the rewrite emits (checked against the installed onnxruntime's kernels)
    emits: str | None = None
    #: the emitted op's domain (``""``: ONNX; ``com.microsoft``: onnxruntime's contrib ops)
    emits_domain: str = ""

    def __init__(self, name: str, pattern: Op, **kw: Any) -> None:
        super().__init__(pattern, name=name)
        for k, v in kw.items():
            setattr(self, k, v)

    def x_dtype(self, m: Match) -> np.dtype | None:
        """The element type of ``x`` (or of the match's constants when shapes are unknown)."""
        xd = float_dtype(m["x"])
        if xd is None:  # shapes not inferred: the constants' dtype (ONNX makes them agree)
            xd = next(
                (
                    np.asarray(t.values).dtype
                    for t in m.tensors.values()
                    if isinstance(t, gs.Constant)
                ),
                None,
            )
        return xd

    def check(self, m: Match) -> bool | Refusal:
        if not (self.min_opset <= self.opset <= self.max_opset):
            return Refusal(f"opset {self.opset} outside {self.min_opset}..{self.max_opset}")
        x = m.tensors.get("x")
        if x is None:
            return True
        xd = self.x_dtype(m)
        if xd is None or xd not in FLOATS:
            return Refusal(f"input type {xd} is not float16/32/64")
        op = self.emitted_op()
        if op is not None and not self.runs(op, xd):
            return Refusal(f"the installed onnxruntime cannot run {op} at opset {self.opset}")
        rank = len(x.shape) if getattr(x, "shape", None) is not None else 1
        for key, t in m.tensors.items():
            if key == "x" or not isinstance(t, gs.Constant):
                continue
            v = np.asarray(t.values)
            if v.size == 1 and (v.ndim > rank or v.dtype != xd):
                return Refusal(f"constant '{t.name}' would change the result's rank or type")
        return self.extra_check(m)

    def runs(self, op: str, dtype: np.dtype) -> bool:
        """Whether the installed onnxruntime runs the emitted ``op`` on ``dtype``."""
        if self.emits_domain:
            return ort_contrib_runs(op, self.emits_domain, dtype)
        return ort_runs(op, self.opset, dtype=dtype)

    def extra_check(self, m: Match) -> bool | Refusal:
        return True

    def emitted_op(self) -> str | None:
        """The op the rewrite emits at this opset."""
        return self.emits


# ---------------------------------------------------------------------------------- norms


def reduce_axes(node: gs.Node) -> list[int] | None:
    """The constant axes of a ``ReduceMean`` (attribute before opset 18, input from 18)."""
    if "axes" in node.attrs:
        return [int(a) for a in node.attrs["axes"]]
    if len(node.inputs) >= 2 and isinstance(node.inputs[1], gs.Constant):
        return [int(a) for a in np.asarray(node.inputs[1].values).reshape(-1)]
    return None


def last_axes(x: gs.Tensor, means: list[gs.Node]) -> int | Refusal:
    """``k`` when every ``ReduceMean`` of ``means`` reduces the same last ``k`` axes of ``x``
    (static sizes, ``keepdims=1``); else why not."""
    if x.shape is None:
        return Refusal("the input's shape is unknown")
    r = len(x.shape)
    if r == 0:
        return Refusal("the input is a scalar")
    sets = []
    for n in means:
        a = reduce_axes(n)
        if a is None:
            return Refusal(f"'{n.name}' has no constant axes")
        if int(n.attrs.get("keepdims", 1)) != 1 or int(n.attrs.get("noop_with_empty_axes", 0)):
            return Refusal(f"'{n.name}' drops its axes")
        sets.append(sorted(i % r for i in a))
    if not sets[0] or any(s != sets[0] for s in sets):
        return Refusal("the reductions' axes differ or are empty")
    k = len(sets[0])
    if sets[0] != list(range(r - k, r)):
        return Refusal(f"axes {sets[0]} are not the last axes of a rank-{r} input")
    if any(not isinstance(d, int) for d in x.shape[r - k :]):
        return Refusal("the normalised axes are not static")
    return k


def norm_param(
    m: Match, key: str, norm_shape: tuple[int, ...], rank: int, default: float
) -> np.ndarray | None:
    """A constant gamma/beta broadcast to the normalised shape (``default`` when absent); None
    when it would broadcast over other axes or change the output's shape."""
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


def layernorm_patterns() -> Iterator[tuple[str, Op]]:
    """``(form, pattern)`` of written-out LayerNorm; forms ``full`` (gamma and beta), ``gamma``,
    ``plain``."""
    mean = Op("ReduceMean", ["x"], name="mean1", extra_inputs=True)
    sub = Op("Sub", ["x", mean], name="sub")
    for sq in (Op("Pow", ["d", C("two", 2.0)]), Op("Mul", ["d", "d"])):
        var = Op("ReduceMean", [sq], name="mean2", extra_inputs=True)
        std = Op("Sqrt", [add(var, Const("eps", scalar()))])
        for norm in (Op("Div", [sub, std]), mul(sub, Op("Reciprocal", [std]))):
            yield "full", add(mul(norm, Const("gamma")), Const("beta"))
            yield "gamma", mul(norm, Const("gamma"))
            yield "plain", norm


def rmsnorm_patterns() -> Iterator[tuple[str, Op]]:
    """``(form, pattern)`` of written-out RMSNorm; forms ``gamma`` and ``plain``."""
    for sq in (Op("Pow", ["x", C("two", 2.0)]), Op("Mul", ["x", "x"])):
        ms = Op("ReduceMean", [sq], name="mean2", extra_inputs=True)
        rms = Op("Sqrt", [add(ms, Const("eps", scalar()))])
        for norm in (
            Op("Div", ["x", rms]),
            mul("x", Op("Reciprocal", [rms])),
            mul("x", Op("Div", [C("one", 1.0), rms])),
        ):
            yield "gamma", mul(norm, Const("gamma"))
            yield "plain", norm


class NormRule(ActivationRule):
    """Common parts of the LayerNorm and RMSNorm rules."""

    form = "full"
    #: form -> the op a larger form would take next (the rule then leaves the match to it)
    grows: dict[str, str] = {}
    _checked: tuple[gs.Node | None, int | None] = (None, None)

    def _extends(self, m: Match) -> bool:
        """The root feeds a constant Mul (gamma) / Add (beta) that a larger form takes."""
        want = self.grows.get(self.form)
        outs = m.root.outputs
        if want is None or len(outs) != 1 or len(outs[0].outputs) != 1:
            return False
        nxt = outs[0].outputs[0]
        return nxt.op == want and any(isinstance(t, gs.Constant) for t in nxt.inputs)

    def means(self, m: Match) -> list[gs.Node]:
        return [m["mean2"]]

    def params_ok(self, m: Match) -> bool | Refusal:
        if self._extends(m):
            return Refusal("a larger form (with gamma/beta) matches here")
        k = last_axes(m["x"], self.means(m))
        self._checked = (m.root, k if isinstance(k, int) else None)
        if not isinstance(k, int):
            return k
        x = m["x"]
        ns = tuple(int(d) for d in x.shape[-k:])
        for key, default in (("gamma", 1.0), ("beta", 0.0)):
            if norm_param(m, key, ns, len(x.shape), default) is None:
                return Refusal(f"{key} does not broadcast to the normalised shape {ns}")
        if float(m.value("eps").reshape(-1)[0]) < 0:
            return Refusal("epsilon is negative")
        return True

    def checked_axes(self, m: Match) -> int:
        root, k = self._checked  # the matched nodes are detached by now (axes may be inputs)
        assert root is m.root and k is not None
        return k


class LayerNormRule(NormRule):
    """Written-out LayerNorm -> ``LayerNormalization`` (opset >= 17)."""

    min_opset = 17
    emits = "LayerNormalization"
    grows = {"plain": "Mul", "gamma": "Add"}

    def means(self, m: Match) -> list[gs.Node]:
        return [m["mean1"], m["mean2"]]

    def extra_check(self, m: Match) -> bool | Refusal:
        if not m["sub"].outputs or m.tensors.get("d") is not m["sub"].outputs[0]:
            return Refusal("the variance is not of x - mean(x)")
        return self.params_ok(m)

    def rewrite(self, m: Match, outputs: list[gs.Variable]) -> list[gs.Node]:
        x = m["x"]
        k = self.checked_axes(m)
        ns = tuple(int(d) for d in x.shape[-k:])
        dt = float_dtype(x)
        g = norm_param(m, "gamma", ns, len(x.shape), 1.0)
        b = norm_param(m, "beta", ns, len(x.shape), 0.0)
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


def is_centered(x: gs.Tensor) -> bool:
    """Whether ``x`` is ``Sub(y, ReduceMean(y))`` (then an RMSNorm of it is a LayerNorm of y)."""
    prod = x.inputs[0] if len(x.inputs) == 1 else None
    if prod is None or prod.op != "Sub" or len(prod.inputs) != 2:
        return False
    y, mean = prod.inputs
    mp = mean.inputs[0] if len(mean.inputs) == 1 else None
    return mp is not None and mp.op == "ReduceMean" and mp.inputs[0] is y


class RmsNormRule(NormRule):
    """Written-out RMSNorm -> ``RMSNormalization`` (opset >= 23), or for ``target='ort'`` below
    opset 23 (or where onnxruntime has no RMSNormalization kernel) onnxruntime's
    ``SimplifiedLayerNormalization`` (ONNX domain, onnxruntime-only)."""

    grows = {"plain": "Mul"}
    target = "portable"

    def emitted_op(self) -> str | None:
        if self.opset >= 23 and (self.target != "ort" or ort_runs("RMSNormalization", self.opset)):
            return "RMSNormalization"
        return "SimplifiedLayerNormalization" if self.target == "ort" else None

    def runs(self, op: str, dtype: np.dtype) -> bool:
        if op == "SimplifiedLayerNormalization":
            return ort_contrib_runs(op, "", dtype)
        return ort_runs(op, self.opset, dtype=dtype)

    def extra_check(self, m: Match) -> bool | Refusal:
        if self.emitted_op() is None:
            return Refusal(f"no RMSNormalization before opset 23 (model: {self.opset})")
        if is_centered(m["x"]):
            return Refusal("the input is x - mean(x): a LayerNorm")
        return self.params_ok(m)

    def rewrite(self, m: Match, outputs: list[gs.Variable]) -> list[gs.Node]:
        x = m["x"]
        k = self.checked_axes(m)
        ns = tuple(int(d) for d in x.shape[-k:])
        g = norm_param(m, "gamma", ns, len(x.shape), 1.0)
        eps = float(m.value("eps").reshape(-1)[0])
        op = self.emitted_op()
        assert op is not None
        return [
            make_node(
                op,
                [x, const("rms_scale", np.ascontiguousarray(g), float_dtype(x))],
                outputs,
                {"axis": -k, "epsilon": eps},
                name="rmsnorm",
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
    """``(name, pattern)``: ``gelu`` (erf form) and ``gelu-tanh`` (tanh approximation)."""
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
