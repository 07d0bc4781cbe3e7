"""The plan job: prepare a model (fixed input shapes, inferred shapes), size the tensors shape
inference leaves unknown by one node-by-node run, search a node order with a lower peak, and plan
every activation into one arena (:mod:`graphopt.algorithms.memory.planner`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from graphopt.algorithms.memory.arena import probe_unknown
from graphopt.algorithms.memory.order import reorder_for_memory
from graphopt.algorithms.memory.planner import ALIGNMENT, MemoryPlan, plan_order
from graphopt.core.model import Model
from graphopt.core.shapes import prepare
from graphopt.jobs.common import ModelLike, as_model


def plan_memory(model: ModelLike, input_shapes: Mapping[str, Sequence[int]] | None = None, *,
                strategy: str = "best", inplace: bool = True, reorder: bool = True,
                feeds: Mapping[str, np.ndarray] | None = None, alignment: int = ALIGNMENT,
                prepared: bool = False) -> MemoryPlan:
    """Plan the activation memory of a model into one arena.

    Args:
        model: the model (or its path); it is not changed (a prepared copy is planned, see
            ``plan.model``).
        input_shapes: fixed shapes for dynamic inputs (``{"x": (1, 3, 640, 640)}``).
        strategy: ``greedy-size``, ``greedy-breadth`` or ``best`` (try all, keep the smallest).
        inplace: let elementwise ops overwrite a dying input and reshapes alias their input.
        reorder: search a node order with a lower peak first (never accepting a worse one).
        feeds: inputs for the one node-by-node run that sizes tensors shape inference cannot
            (data-dependent branches); random inputs when None.
        prepared: ``model`` already has its shapes inferred: plan it as it is (no copy unless
            ``reorder``, which works on a copy).

    Returns:
        The :class:`MemoryPlan`; ``plan.model`` is the model it refers to (planned node order).
    """
    model = as_model(model)
    if prepared:
        work = model.clone() if reorder else model
    else:
        work = prepare(model.clone(), input_shapes)
    positions = {id(n): i for i, n in enumerate(work.graph.nodes)}
    observed = probe_unknown(work, feeds)
    before = plan_order(work, inplace=inplace, strategy=strategy, alignment=alignment,
                        observed=observed)
    before.order_index = list(range(len(work.graph.nodes)))
    if not reorder:
        return before
    changed = reorder_for_memory(work, inplace=inplace, strategy=strategy, alignment=alignment,
                                 observed=observed, baseline=before)
    if not changed:
        return before
    after = plan_order(work, inplace=inplace, strategy=strategy, alignment=alignment,
                       observed=observed)
    after.order_changed = True
    after.order_before_lower_bound = before.bound
    after.order_before_arena = before.arena_bytes
    after.order_index = [positions[id(n)] for n in work.graph.nodes]
    return after


def apply_order(model: Model, plan: MemoryPlan) -> Model:
    """Put ``model``'s main-graph nodes in ``plan``'s order (``model`` is the one that was given
    to :func:`plan_memory`, or a copy of it); in place, returns ``model``."""
    nodes = list(model.graph.nodes)
    if plan.order_index and len(plan.order_index) == len(nodes):
        model.graph.nodes = [nodes[i] for i in plan.order_index]
    return model
