"""Conv + activation -> onnxruntime's fused ops (the ``ort`` target's lowering).

* ``Conv -> act`` becomes ``com.microsoft.FusedConv`` with ``activation`` in {Relu, Tanh, Sigmoid,
  LeakyRelu, Clip, HardSigmoid} and ``activation_params`` (LeakyRelu: alpha; Clip: min, max;
  HardSigmoid: alpha, beta), float32 only (the only type of its CPU kernel). The Conv's output must
  feed only the activation and must not be a graph output (the engine refuses escaping values).
* Any SiLU unit ``y * Sigmoid(y)`` becomes ``com.microsoft.QuickGelu(alpha=1)``, which is
  ``y * Sigmoid(alpha * y)``.

``FusedConv(x) = act(Conv(x))`` exactly as the two nodes compute it (onnxruntime's own
``ConvActivationFusion`` emits the same node). The output runs only in onnxruntime, so the pass
exists for ``target='ort'`` only. The fusion groups the TVM back end compiles as single kernels are
an analysis of their own (``annotate-fusion-groups``), run by the compile job.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.core.errors import OptionError
from graphopt.core.graph import make_node
from graphopt.core.model import Model
from graphopt.core.pass_manager import Pass, PassResult, register_pass
from graphopt.core.pattern import Const, Match, Op, Opt, Refusal, Rule, RuleSet

logger = logging.getLogger(__name__)

TARGETS = ("ort",)
F32_MIN, F32_MAX = float(np.finfo(np.float32).min), float(np.finfo(np.float32).max)


# ---------------------------------------------------------------------------------- ORT rules


def _f32(t: gs.Tensor | None) -> bool:
    if t is None:
        return True
    if isinstance(t, gs.Constant):
        return np.asarray(t.values).dtype == np.float32
    return t.dtype is None or np.dtype(t.dtype) == np.float32


class FusedConvRule(Rule):
    """``act(Conv(x, W[, B])) -> com.microsoft.FusedConv(x, W[, B], activation=act)``."""

    def params(self, m: Match) -> list[float] | None:
        act = m["act"]
        if act.op == "LeakyRelu":
            return [float(act.attrs.get("alpha", 0.01))]
        if act.op == "HardSigmoid":
            return [float(act.attrs.get("alpha", 0.2)), float(act.attrs.get("beta", 0.5))]
        if act.op == "Clip":
            lo = (
                float(m.value("lo").reshape(-1)[0])
                if "lo" in m.tensors
                else float(act.attrs.get("min", F32_MIN))
            )
            hi = (
                float(m.value("hi").reshape(-1)[0])
                if "hi" in m.tensors
                else float(act.attrs.get("max", F32_MAX))
            )
            for k in ("lo", "hi"):
                if k in m.tensors and m.value(k).size != 1:
                    return None
            return [max(lo, F32_MIN), min(hi, F32_MAX)]
        return []

    def check(self, m: Match) -> bool | Refusal:
        conv = m["conv"]
        if len(conv.outputs) != 1:
            return Refusal("Conv has more than one output")
        if not all(_f32(m.tensors.get(k)) for k in ("x", "w", "b")):
            return Refusal("FusedConv's CPU kernel is float32 only")
        if self.params(m) is None:
            return Refusal("Clip bounds are not scalars")
        return True

    def rewrite(self, m: Match, outputs: list[gs.Variable]) -> list[gs.Node]:
        conv, act = m["conv"], m["act"]
        attrs: dict[str, Any] = dict(conv.attrs)
        attrs["activation"] = act.op
        params = self.params(m)
        if params:
            attrs["activation_params"] = params
        inputs = [m["x"], m["w"]] + ([m["b"]] if "b" in m.tensors else [])
        return [
            make_node("FusedConv", inputs, outputs, attrs, name=conv.name, domain="com.microsoft")
        ]


class QuickGeluRule(Rule):
    """``y * Sigmoid(y) -> com.microsoft.QuickGelu(y, alpha=1)``."""

    name = "silu-to-quickgelu"
    pattern = Op("Mul", ["x", Op("Sigmoid", ["x"])])

    def check(self, m: Match) -> bool | Refusal:
        return True if _f32(m["x"]) else Refusal("QuickGelu's CPU kernel is float32 only")

    def rewrite(self, m: Match, outputs: list[gs.Variable]) -> list[gs.Node]:
        return [
            make_node(
                "QuickGelu",
                [m["x"]],
                outputs,
                {"alpha": 1.0},
                name="quickgelu",
                domain="com.microsoft",
            )
        ]


def ort_rules() -> list[Rule]:
    conv = Op("Conv", ["x", "w", Opt("b")], name="conv")
    rules: list[Rule] = [
        FusedConvRule(Op(op, [conv], name="act"), name=f"fused-conv-{op.lower()}")
        for op in ("Relu", "Tanh", "Sigmoid", "LeakyRelu", "HardSigmoid")
    ]
    clip = Op("Clip", [conv, Opt(Const("lo")), Opt(Const("hi"))], name="act")
    rules.append(FusedConvRule(clip, name="fused-conv-clip"))
    rules.append(QuickGeluRule())
    return rules


# ---------------------------------------------------------------------------------- pass


@register_pass
class FuseConvActivationPass(Pass):
    """Conv+activation -> com.microsoft.FusedConv, SiLU -> com.microsoft.QuickGelu (ort target)."""

    name = "fuse-conv-activation"

    def __init__(self, target: str = "ort") -> None:
        if target not in TARGETS:
            raise OptionError(
                f"fuse-conv-activation lowers to onnxruntime's fused ops: target must be 'ort', "
                f"not {target!r} (the TVM fusion groups are 'annotate-fusion-groups')"
            )
        self.target = target

    def call(self, model: Model) -> PassResult:
        stats: dict[str, int] = {}
        modified = False
        rs = RuleSet(ort_rules())
        for g in list(model.walk_graphs()):
            while rs.apply(g, stats):
                modified = True
        return PassResult(model, modified, stats)
