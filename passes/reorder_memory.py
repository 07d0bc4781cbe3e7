"""Memory-aware node order (pass ``reorder-memory``): reorder the main graph's nodes for a lower
activation peak, never a worse one.

The rewrite: a topological order ``pi`` of the main graph's nodes is replaced by another one
``pi'`` when the planned arena of ``pi'`` is strictly smaller (ties: its lower bound strictly
smaller); otherwise nothing changes. Numerics are untouched (same nodes, same edges). The search
(exact over down-sets for small graphs, list-scheduling heuristics otherwise) is
:mod:`graphopt.algorithms.memory.order`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from graphopt.algorithms.memory.arena import probe_unknown
from graphopt.algorithms.memory.order import reorder_for_memory
from graphopt.algorithms.memory.planner import STRATEGIES
from graphopt.core.errors import OptionError
from graphopt.core.model import Model
from graphopt.core.pass_manager import Pass, PassResult, register_pass
from graphopt.core.shapes import inputs_static, prepare

logger = logging.getLogger(__name__)


@register_pass
class ReorderMemoryPass(Pass):
    """Reorder nodes for a lower activation-memory peak (never a worse one)."""

    name = "reorder-memory"

    def __init__(
        self,
        inplace: bool = True,
        strategy: str = "best",
        input_shapes: Mapping[str, Any] | None = None,
        max_states: int = 50_000,
        feeds: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        if strategy not in STRATEGIES:
            raise OptionError(
                f"reorder-memory: unknown strategy {strategy!r}; choose one of "
                f"{', '.join(STRATEGIES)}"
            )
        self.inplace = inplace
        self.strategy = strategy
        self.input_shapes = dict(input_shapes) if input_shapes else None
        self.max_states = max_states
        self.feeds = feeds

    def call(self, model: Model) -> PassResult:
        work = prepare(model.clone(), self.input_shapes)
        if not inputs_static(work):
            logger.debug("reorder-memory: input shapes are not static; skipped (give input_shapes)")
            return PassResult(model, False, {"order_changed": 0})
        observed = probe_unknown(work, self.feeds)
        info: dict[str, Any] = {}
        # graph.copy keeps the node order: position i of the clone is node i of the model
        orig_pos = {id(n): i for i, n in enumerate(work.graph.nodes)}
        changed = reorder_for_memory(
            work,
            inplace=self.inplace,
            strategy=self.strategy,
            observed=observed,
            max_states=self.max_states,
            info=info,
        )
        stats: dict[str, Any] = {
            "order_changed": int(changed),
            "arena_before": info.get("arena_before", 0),
            "arena_after": info.get("arena_after", 0),
            "exact_searched": int(bool(info.get("exact_searched"))),
        }
        if not changed:
            return PassResult(model, False, stats)
        nodes = list(model.graph.nodes)
        model.graph.nodes = [nodes[orig_pos[id(n)]] for n in work.graph.nodes]
        return PassResult(model, True, stats)
