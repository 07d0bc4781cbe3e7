"""Identity elimination: ``Identity(x) -> x`` and inference-mode ``Dropout(x) -> x``.

Every reader of the Identity's output reads ``x`` instead. When the output is a graph output, the
producer of ``x`` is made to write the graph output directly (so output names are kept); when ``x``
is itself a graph input or another graph output, the node is kept (an ONNX graph cannot return its
input under another name without one). Dropout is removed only when its mask output is unused and it
is not in training mode (``training_mode`` input absent or constant false).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.core.graph import bypass_node
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
