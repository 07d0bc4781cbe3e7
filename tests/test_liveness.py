"""One liveness model: ``inspect``'s activation peak (cost model) and the memory plan's lower bound
are the same figure of :mod:`graphopt.core.liveness` (the plan rounds sizes up to its alignment)."""

from __future__ import annotations

import numpy as np
import pytest

from graphopt.algorithms.memory.planner import ALIGNMENT, align, plan_order
from graphopt.core.cost import model_cost
from graphopt.core.liveness import liveness
from graphopt.core.loader import load
from graphopt.core.shapes import prepare
from graphopt.fixtures import FIXTURES, fixture_path

#: fixtures with dynamic inputs get these shapes
SHAPES = {"digits_cnn.onnx": {"x": (1, 1, 8, 8)}}


@pytest.mark.parametrize("name", FIXTURES)
def test_inspect_peak_equals_plan_lower_bound(name: str) -> None:
    m = prepare(load(fixture_path(name)), SHAPES.get(name))
    live = liveness(m)
    assert not live.unplanned, live.unplanned
    cost = model_cost(m)
    exact = plan_order(m, alignment=1)
    assert cost.activation_bytes_peak == exact.lower_bound_bytes == live.peak()[0] > 0
    # the default plan: the same model with every size rounded up to the alignment
    plan = plan_order(m)
    sizes = align(live.nbytes, ALIGNMENT)
    assert plan.lower_bound_bytes == live.peak(ALIGNMENT)[0] == int(live.live_bytes(sizes).max())
    assert cost.activation_bytes_peak <= plan.lower_bound_bytes
    assert plan.lower_bound_bytes - cost.activation_bytes_peak < ALIGNMENT * len(live.names)
    # both name the same node: the main-graph node that holds the peak step
    assert cost.peak_node == live.step_owners[live.peak()[1]]


def test_if_model_peak_inside_a_branch_is_named_by_its_if() -> None:
    """The peak of if_model is at the exit of the second If (its branch outputs and the first
    If's output live together, beside the graph input x, held for the whole run); inspect names
    the main-graph node, the plan the step."""
    m = prepare(load(fixture_path("if_model.onnx")))
    live = liveness(m)
    peak, step = live.peak()
    assert model_cost(m).peak_node == live.step_owners[step] == "if2"
    assert peak == 256 + 32  # + x (8 float32), the caller's input
    assert np.all(live.live_bytes() <= peak)


@pytest.mark.parametrize("name", FIXTURES)
def test_inspect_and_plan_jobs_report_the_same_figure(name: str) -> None:
    """What ``graphopt inspect --json`` and ``graphopt plan --json`` print, through the jobs."""
    from graphopt.jobs.inspect import inspect
    from graphopt.jobs.plan import plan_memory

    path = fixture_path(name)
    peak = inspect(path, input_shapes=SHAPES.get(name)).to_json()["activation_bytes"]["peak"]
    plan = plan_memory(path, SHAPES.get(name), reorder=False, inplace=False, alignment=1)
    assert plan.lower_bound_bytes == peak > 0
