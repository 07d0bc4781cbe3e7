"""Identity elimination: ``Identity(x) -> x`` and inference-mode ``Dropout(x) -> x``.

Every reader of the Identity's output reads ``x`` instead. When the output is a graph output, the
producer of ``x`` is made to write the graph output directly (so output names are kept); when ``x``
is
itself a graph input or another graph output, the node is kept (an ONNX graph cannot return its
input
under another name without one). Dropout is removed only when its mask output is unused and it is
not
in training mode (``training_mode`` input absent or constant false).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.core.model import Model
from graphopt.core.pass_manager import Pass, PassResult, register_pass

logger = logging.getLogger(__name__)


def _is_noop_dropout(node: gs.Node) -> bool:
    if len(node.outputs) > 1 and node.outputs[1].outputs:
        return False
    if len(node.inputs) >= 3 and node.inputs[2].name:
        t = node.inputs[2]
        if not isinstance(t, gs.Constant) or bool(np.asarray(t.values).any()):
            return False
    return True


def bypass_node(
    graph: gs.Graph,
    node: gs.Node,
    src: gs.Tensor | None = None,
    local_nodes: set[int] | None = None,
) -> bool:
    """Remove a single-output node whose output equals ``src`` (default: its first input).

    Returns False (and changes nothing) when that is impossible without renaming a graph output.
    ``local_nodes`` (ids of ``graph.nodes``) avoids a scan per call when bypassing many nodes.
    """
    src = src if src is not None else node.inputs[0]
    out = node.outputs[0]
    graph_outputs = {id(t) for t in graph.outputs}
    graph_inputs = {id(t) for t in graph.inputs}
    if id(out) in graph_outputs:
        # keep the output's name: the producer of src must write it directly
        if (
            isinstance(src, gs.Constant)
            or id(src) in graph_inputs
            or id(src) in graph_outputs
            or len(src.inputs) != 1
            or len(src.outputs) != 1
        ):
            return False
        producer = src.inputs[0]
        local = local_nodes if local_nodes is not None else {id(n) for n in graph.nodes}
        if id(producer) not in local:  # produced in an enclosing graph: cannot rename it
            return False
        idx = producer.outputs.index(src)
        node.inputs.clear()
        node.outputs.clear()
        producer.outputs[idx] = out
        out.dtype = out.dtype if out.dtype is not None else src.dtype
        if out.shape is None:
            out.shape = src.shape
        return True
    for consumer in list(out.outputs):
        for i, t in enumerate(consumer.inputs):
            if t is out:
                consumer.inputs[i] = src
    # subgraph nodes may read `out` implicitly by name; the Tensor object is shared, so the
    # loop above covered them.
    node.inputs.clear()
    node.outputs.clear()
    return True


@register_pass
class EliminateIdentityPass(Pass):
    """Remove Identity and inference-mode Dropout nodes."""

    name = "eliminate-identity"

    def call(self, model: Model) -> PassResult:
        removed = 0
        for g in model.walk_graphs():
            changed = False
            local = {id(n) for n in g.nodes}
            for node in list(g.nodes):
                if node.op == "Identity" or (node.op == "Dropout" and _is_noop_dropout(node)):
                    if (
                        node.inputs
                        and node.inputs[0].name
                        and bypass_node(g, node, local_nodes=local)
                    ):
                        removed += 1
                        changed = True
            if changed:
                g.cleanup(remove_unused_graph_inputs=False, recurse_subgraphs=False)
        return PassResult(model, removed > 0, {"removed": removed})
