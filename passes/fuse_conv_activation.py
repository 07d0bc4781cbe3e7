"""Conv + activation (+ pool) fusion groups.

A group is a Conv whose output feeds only an activation unit, optionally followed by a MaxPool or
AveragePool that alone reads the activation's output. Activation units: Relu, LeakyRelu, Clip,
HardSigmoid, HardSwish, Sigmoid, Tanh, and the two-node units SiLU ``y * Sigmoid(y)`` and hardswish
``y * HardSigmoid(y, 1/6, 1/2)`` (what ``recognize-activations`` emits below opset 14). No value
inside a group may be a graph output or be read outside the group.

* ``target='portable'`` (default): the graph stays standard ONNX; the groups are recorded as a JSON
  list of lists of node names in ``model.metadata['graphopt.fusion_groups']`` (the TVM backend
  compiles each group as one kernel). Nodes of a group without a name get a unique one.
* ``target='ort'``: ``Conv -> act`` becomes onnxruntime's ``com.microsoft.FusedConv`` with
  ``activation`` in {Relu, Tanh, Sigmoid, LeakyRelu, Clip, HardSigmoid} and ``activation_params``
  (LeakyRelu: alpha; Clip: min, max; HardSigmoid: alpha, beta), float32 only (the only type of its
  CPU kernel). Any SiLU unit ``y * Sigmoid(y)`` becomes ``com.microsoft.QuickGelu(alpha=1)``, which
  is ``y * Sigmoid(alpha * y)``. The output runs only in onnxruntime.

``FusedConv(x) = act(Conv(x))`` exactly as the two nodes compute it (onnxruntime's own
``ConvActivationFusion`` emits the same node).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.core.errors import OptionError
from graphopt.core.graph import make_node, unique_name
from graphopt.core.model import Model
from graphopt.core.pass_manager import Pass, PassResult, register_pass
from graphopt.core.pattern import Const, Match, Op, Rule, RuleSet

logger = logging.getLogger(__name__)

METADATA_KEY = "graphopt.fusion_groups"
TARGETS = ("portable", "ort")
SINGLE_ACTS = ("Relu", "LeakyRelu", "Clip", "HardSigmoid", "HardSwish", "Sigmoid", "Tanh")
POOLS = ("MaxPool", "AveragePool")
F32_MIN, F32_MAX = float(np.finfo(np.float32).min), float(np.finfo(np.float32).max)


# ---------------------------------------------------------------------------------- groups


def _sole_consumer(t: gs.Tensor, graph_outputs: set[int]) -> gs.Node | None:
    if id(t) in graph_outputs or len(t.outputs) != 1:
        return None
    return t.outputs[0]


def _activation_unit(y: gs.Tensor, graph_outputs: set[int]) -> list[gs.Node] | None:
    """The nodes of the activation unit reading ``y`` (which nothing else reads), or None."""
    if id(y) in graph_outputs:
        return None
    readers = list(y.outputs)
    if len(readers) == 1 and readers[0].op in SINGLE_ACTS and readers[0].inputs[0] is y:
        return readers
    if len(readers) == 2:
        gate: gs.Node | None = next((n for n in readers if n.op in ("Sigmoid", "HardSigmoid")),
                                    None)
        mul: gs.Node | None = next((n for n in readers if n.op == "Mul"), None)
        if gate is None or mul is None or gate.inputs[0] is not y:
            return None
        if gate.op == "HardSigmoid" and not (
                abs(float(gate.attrs.get("alpha", 0.2)) - 1 / 6) <= 1e-6
                and abs(float(gate.attrs.get("beta", 0.5)) - 0.5) <= 1e-6):
            return None
        g = gate.outputs[0]
        if {id(t) for t in mul.inputs} != {id(y), id(g)}:
            return None
        if _sole_consumer(g, graph_outputs) is not mul:
            return None
        return [gate, mul]
    return None


def find_groups(graph: gs.Graph) -> list[list[gs.Node]]:
    """Conv + activation unit (+ pool) groups of one graph, in graph order."""
    outs = {id(t) for t in graph.outputs}
    groups: list[list[gs.Node]] = []
    for node in graph.nodes:
        if node.op != "Conv" or len(node.outputs) != 1:
            continue
        unit = _activation_unit(node.outputs[0], outs)
        if unit is None:
            continue
        group = [node, *unit]
        pool = _sole_consumer(unit[-1].outputs[0], outs)
        if pool is not None and pool.op in POOLS and len(pool.outputs) == 1:
            group.append(pool)
        groups.append(group)
    return groups


# ---------------------------------------------------------------------------------- ORT rules


def _f32(t: gs.Tensor | None) -> bool:
    if t is None:
        return True
    if isinstance(t, gs.Constant):
        return np.asarray(t.values).dtype == np.float32
    return t.dtype is None or np.dtype(t.dtype) == np.float32


class FusedConvRule(Rule):
    """``act(Conv(x, W[, B])) -> com.microsoft.FusedConv(x, W[, B], activation=act)``."""

    def __init__(self, name: str, pattern: Op) -> None:
        self.name = name  # type: ignore[misc]
        self.pattern = pattern  # type: ignore[misc]

    def params(self, m: Match) -> list[float] | None:
        act = m["act"]
        if act.op == "LeakyRelu":
            return [float(act.attrs.get("alpha", 0.01))]
        if act.op == "HardSigmoid":
            return [float(act.attrs.get("alpha", 0.2)), float(act.attrs.get("beta", 0.5))]
        if act.op == "Clip":
            lo = float(m.value("lo").reshape(-1)[0]) if "lo" in m.tensors else float(
                act.attrs.get("min", F32_MIN))
            hi = float(m.value("hi").reshape(-1)[0]) if "hi" in m.tensors else float(
                act.attrs.get("max", F32_MAX))
            for k in ("lo", "hi"):
                if k in m.tensors and m.value(k).size != 1:
                    return None
            return [max(lo, F32_MIN), min(hi, F32_MAX)]
        return []

    def check(self, m: Match) -> bool:
        conv = m["conv"]
        if len(conv.outputs) != 1 or not all(_f32(m.tensors.get(k)) for k in ("x", "w", "b")):
            return False
        return self.params(m) is not None

    def rewrite(self, m: Match, outputs: list[gs.Variable]) -> list[gs.Node]:
        conv, act = m["conv"], m["act"]
        attrs: dict[str, Any] = dict(conv.attrs)
        attrs["activation"] = act.op
        params = self.params(m)
        if params:
            attrs["activation_params"] = params
        inputs = [m["x"], m["w"]] + ([m["b"]] if "b" in m.tensors else [])
        return [make_node("FusedConv", inputs, outputs, attrs, name=conv.name,
                          domain="com.microsoft")]


class QuickGeluRule(Rule):
    """``y * Sigmoid(y) -> com.microsoft.QuickGelu(y, alpha=1)``."""

    name = "silu-to-quickgelu"
    pattern = Op("Mul", ["x", Op("Sigmoid", ["x"])], commutative=True)

    def check(self, m: Match) -> bool:
        return _f32(m["x"])

    def rewrite(self, m: Match, outputs: list[gs.Variable]) -> list[gs.Node]:
        return [make_node("QuickGelu", [m["x"]], outputs, {"alpha": 1.0}, name="quickgelu",
                          domain="com.microsoft")]


def ort_rules() -> list[Rule]:
    rules: list[Rule] = []
    for bias in (True, False):
        conv = Op("Conv", ["x", "w", "b"] if bias else ["x", "w"], name="conv")
        for op in ("Relu", "Tanh", "Sigmoid", "LeakyRelu", "HardSigmoid"):
            rules.append(FusedConvRule(f"fused-conv-{op.lower()}", Op(op, [conv], name="act")))
        clips = [Op("Clip", [conv, Const("lo"), Const("hi")], name="act"),
                 Op("Clip", [conv, Const("lo")], name="act"),
                 Op("Clip", [conv], name="act")]
        rules.extend(FusedConvRule("fused-conv-clip", p) for p in clips)
    rules.append(QuickGeluRule())
    return rules


# ---------------------------------------------------------------------------------- pass


@register_pass
class FuseConvActivationPass(Pass):
    """Conv+activation(+pool) groups: metadata (portable) or com.microsoft.FusedConv (ort)."""

    name = "fuse-conv-activation"

    def __init__(self, target: str = "portable") -> None:
        if target not in TARGETS:
            raise OptionError(f"fuse-conv-activation: target must be one of "
                              f"{', '.join(TARGETS)}, not {target!r}")
        self.target = target

    def call(self, model: Model) -> PassResult:
        stats: dict[str, int] = {}
        modified = False
        if self.target == "ort":
            rs = RuleSet(ort_rules())
            for g in list(model.walk_graphs()):
                while rs.apply(g, stats):
                    modified = True
            return PassResult(model, modified, stats)
        groups: list[list[str]] = []
        with_pool = 0
        for g in model.walk_graphs():
            for group in find_groups(g):
                for n in group:
                    if not n.name:
                        n.name = unique_name(n.op.lower())
                        modified = True
                groups.append([n.name for n in group])
                with_pool += group[-1].op in POOLS
        stats["groups"] = len(groups)
        stats["with_pool"] = with_pool
        value = json.dumps(groups, separators=(",", ":"))
        if groups and model.metadata.get(METADATA_KEY) != value:
            model.metadata[METADATA_KEY] = value
            modified = True
        elif not groups and METADATA_KEY in model.metadata:
            del model.metadata[METADATA_KEY]
            modified = True
        return PassResult(model, modified, stats)

