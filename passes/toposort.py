"""Topological sort: reorder nodes so that every node comes after the producers of its inputs.

Subgraph nodes that read outer-scope tensors count as readers of those tensors, so an If/Loop node
is
placed after everything its bodies capture. The sort is stable (Kahn's algorithm over the original
order), so an already sorted graph is left unchanged and ``modified`` is exact.
"""

from __future__ import annotations

from graphopt.core.model import Model
from graphopt.core.pass_manager import Pass, PassResult, register_pass


@register_pass
class ToposortPass(Pass):
    """Order nodes so that producers precede consumers (stable; subgraph captures respected)."""

    name = "toposort"

    def call(self, model: Model) -> PassResult:
        before = [[id(n) for n in g.nodes] for g in model.walk_graphs()]
        model.graph.toposort(recurse_subgraphs=True)
        after = [[id(n) for n in g.nodes] for g in model.walk_graphs()]
        moved = sum(1 for a, b in zip(before, after) if a != b)
        return PassResult(model, before != after, {"graphs_reordered": moved})
