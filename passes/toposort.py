"""Topological sort: reorder nodes so that every node comes after the producers of its inputs.

A node with subgraphs (If/Loop/Scan) depends on the producers of the outer tensors its bodies read
(captures), not only on its explicit inputs. The sort is stable
(:func:`graphopt.core.graph.toposort_graph`): a graph whose order is already valid is left exactly
as it is (``modified=False``), so the pass never undoes a deliberate order such as the one
``reorder-memory`` chose; otherwise Kahn's algorithm with the original position as priority moves
only the misplaced nodes.
"""

from __future__ import annotations

from graphopt.core.graph import toposort_graph
from graphopt.core.model import Model
from graphopt.core.pass_manager import Pass, PassResult, register_pass


@register_pass
class ToposortPass(Pass):
    """Order nodes so that producers precede consumers (stable; subgraph captures respected)."""

    name = "toposort"

    def call(self, model: Model) -> PassResult:
        moved = toposort_graph(model.graph, recurse=True)
        return PassResult(model, moved > 0, {"graphs_reordered": moved})
