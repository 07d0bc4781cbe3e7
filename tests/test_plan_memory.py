"""The plan-memory pass: an analysis (the model is not changed) whose stats are its plan's figures.
The planner itself is tested in tests/test_memory.py."""

from __future__ import annotations

from graphopt.passes import get_pass
from graphopt.testing import check_pass


def test_plan_memory_pass_is_analysis(load_fixture):
    p = get_pass("plan-memory")
    res, _ = check_pass(load_fixture("mobilenet_block.onnx"), p, expect_modified=False)
    assert res.stats["arena_bytes"] == p.last_plan.arena_bytes > 0
    assert res.stats["inplace_lower_bound_bytes"] < res.stats["lower_bound_bytes"]
    res2, _ = check_pass(
        load_fixture("if_model.onnx"), "plan-memory", expect_modified=False, inplace=False
    )
    assert res2.stats["arena_bytes"] == res2.stats["lower_bound_bytes"]
