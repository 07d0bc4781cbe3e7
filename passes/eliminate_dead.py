"""Dead-node elimination: remove every node whose outputs reach no graph output.

A node is live iff some graph output (or, in a subgraph, some subgraph output or an outer-scope
reader) depends on one of its outputs; everything else is removed, together with constants that no
remaining node reads. Graph inputs are kept even when unused (removing them would change the model's
signature). Applied to the main graph and every If/Loop/Scan body.
"""

from __future__ import annotations

import logging

import onnx_graphsurgeon as gs

from graphopt.core.model import Model
from graphopt.core.pass_manager import Pass, PassResult, register_pass

logger = logging.getLogger(__name__)


def _sizes(model: Model) -> tuple[int, int]:
    nodes = 0
    consts = 0
    for g in model.walk_graphs():
        nodes += len(g.nodes)
        consts += sum(1 for t in g.tensors().values() if isinstance(t, gs.Constant))
    return nodes, consts


@register_pass
class EliminateDeadPass(Pass):
    """Remove nodes and constants that no graph output depends on."""

    name = "eliminate-dead"

    def call(self, model: Model) -> PassResult:
        n0, c0 = _sizes(model)
        model.graph.cleanup(
            remove_unused_graph_inputs=False,
            recurse_subgraphs=True,
            remove_unused_node_outputs=False,
        )
        n1, c1 = _sizes(model)
        return PassResult(
            model, (n1, c1) != (n0, c0), {"nodes_removed": n0 - n1, "constants_removed": c0 - c1}
        )
