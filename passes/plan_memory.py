"""Memory plan (analysis): liveness, lower bound and arena offsets of every activation.

Nothing in the model changes. The figures (see :mod:`graphopt.algorithms.memory.planner` for the
maths):

    naive       = sum_t align(bytes(t))                       one buffer per tensor
    lower bound = max_step sum_{t live at step} align(bytes(t))
    arena       = max_b offset(b) + size(b)                   best-fit offsets, 64-byte aligned

with the in-place bound (aliases and in-place writes merged into buffers) when ``inplace``. The
plan itself is kept on the pass instance (``last_plan``) for the CLI and API.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from graphopt.algorithms.memory.arena import probe_unknown
from graphopt.algorithms.memory.planner import STRATEGIES, MemoryPlan, plan_order
from graphopt.core.errors import OptionError
from graphopt.core.model import Model
from graphopt.core.pass_manager import Pass, PassResult, register_pass
from graphopt.core.shapes import prepare

logger = logging.getLogger(__name__)


@register_pass
class PlanMemoryPass(Pass):
    """Plan activations into one arena (liveness, offsets, in-place reuse); report the figures."""

    name = "plan-memory"
    analysis = True

    def __init__(
        self,
        strategy: str = "best",
        inplace: bool = True,
        input_shapes: Mapping[str, Sequence[int]] | None = None,
        feeds: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        if strategy not in STRATEGIES:
            raise OptionError(
                f"plan-memory: unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}"
            )
        self.strategy = strategy
        self.inplace = inplace
        self.input_shapes = dict(input_shapes) if input_shapes else None
        self.feeds = feeds
        self.last_plan: MemoryPlan | None = None

    def call(self, model: Model) -> PassResult:
        # the model keeps its order; a prepared copy is planned (``last_plan.model``)
        work = prepare(model.clone(), self.input_shapes)
        plan = plan_order(
            work,
            inplace=self.inplace,
            strategy=self.strategy,
            observed=probe_unknown(work, self.feeds),
        )
        plan.order_index = list(range(len(work.graph.nodes)))
        self.last_plan = plan
        s = plan.summary()
        stats: dict[str, Any] = {
            k: s[k]
            for k in (
                "arena_bytes",
                "lower_bound_bytes",
                "inplace_lower_bound_bytes",
                "naive_bytes",
                "arena_over_bound",
                "aliased",
                "inplace_reused",
                "unplanned",
                "peak_step",
            )
        }
        return PassResult(model, False, stats)
