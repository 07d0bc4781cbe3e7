"""Conv + activation (+ pool) fusion groups for the TVM back end.

A group is a Conv whose output feeds only an activation unit, optionally followed by a MaxPool or
AveragePool that alone reads the activation's output. Activation units: Relu, LeakyRelu, Clip,
HardSigmoid, HardSwish, Sigmoid, Tanh, and the two-node units SiLU ``y * Sigmoid(y)`` and hardswish
``y * HardSigmoid(y, 1/6, 1/2)`` (what ``recognize-activations`` emits below opset 14). No value
inside a group may be a graph output or be read outside the group.

The groups are recorded (``annotate-fusion-groups``) as a JSON list of lists of node names in
``model.metadata[METADATA_KEY]``; the compile job reads them (a group with a pool makes Relax's
FuseOps put the pool into its producer's kernel). Nothing here imports TVM.
"""

from __future__ import annotations

import json

import onnx_graphsurgeon as gs

from graphopt.core.model import Model

#: metadata key of the recorded groups (JSON list of lists of node names)
METADATA_KEY = "graphopt.fusion_groups"
SINGLE_ACTS = ("Relu", "LeakyRelu", "Clip", "HardSigmoid", "HardSwish", "Sigmoid", "Tanh")
POOLS = ("MaxPool", "AveragePool")


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
        gate: gs.Node | None = next(
            (n for n in readers if n.op in ("Sigmoid", "HardSigmoid")), None
        )
        mul: gs.Node | None = next((n for n in readers if n.op == "Mul"), None)
        if gate is None or mul is None or gate.inputs[0] is not y:
            return None
        if gate.op == "HardSigmoid" and not (
            abs(float(gate.attrs.get("alpha", 0.2)) - 1 / 6) <= 1e-6
            and abs(float(gate.attrs.get("beta", 0.5)) - 0.5) <= 1e-6
        ):
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


def recorded_groups(model: Model) -> list[list[str]]:
    """The groups recorded in ``model``'s metadata (empty when none are)."""
    value = model.metadata.get(METADATA_KEY)
    return json.loads(value) if value else []
