"""fuse-slices: Slices that partition an axis -> one Split."""

from __future__ import annotations

import numpy as np
import pytest
from fusion_graphs import build, node

from graphopt.testing import check_pass, op_counts

P = "fuse-slices"
I64 = np.int64


def _slices(ranges: list[tuple[int, int]], axis: int = 1, opset: int = 17, outputs=None):
    inits: dict = {"ax": np.array([axis], I64)}
    nodes = []
    for i, (s, e) in enumerate(ranges):
        inits[f"s{i}"], inits[f"e{i}"] = np.array([s], I64), np.array([e], I64)
        nodes.append(node("Slice", ["x", f"s{i}", f"e{i}", "ax"], f"y{i}"))
    outs = outputs or [f"y{i}" for i in range(len(ranges))]
    return build(nodes, {"x": (2, 10, 3)}, outs, inits, opset=opset)


@pytest.mark.parametrize("opset", [11, 17])
def test_halves_become_split(opset: int) -> None:
    m = _slices([(5, 2**63 - 1), (0, 5)], opset=opset)
    res, _ = check_pass(
        m, P, structure=lambda mm: op_counts(mm) == {"Split": 1} or pytest.fail(str(op_counts(mm)))
    )
    assert [o.name for o in res.model.graph.nodes[0].outputs] == ["y1", "y0"]


def test_three_parts_negative_indices() -> None:
    check_pass(
        _slices([(0, 3), (3, -2), (-2, 10)]),
        P,
        structure=lambda mm: op_counts(mm) == {"Split": 1} or pytest.fail("no split"),
    )


@pytest.mark.parametrize(
    "ranges", [[(0, 5), (6, 10)], [(0, 6), (5, 10)], [(0, 5)], [(0, 5), (5, 9)]]
)
def test_negative_not_a_partition(ranges: list[tuple[int, int]]) -> None:
    check_pass(_slices(ranges), P, expect_modified=False)


def test_negative_different_axes() -> None:
    inits = {
        "a1": np.array([1], I64),
        "a2": np.array([2], I64),
        "s": np.array([0], I64),
        "e": np.array([1], I64),
        "e2": np.array([10], I64),
        "s2": np.array([1], I64),
    }
    m = build(
        [node("Slice", ["x", "s", "e", "a2"], "y0"), node("Slice", ["x", "s2", "e2", "a1"], "y1")],
        {"x": (2, 10, 3)},
        ["y0", "y1"],
        inits,
    )
    check_pass(m, P, expect_modified=False)


def test_negative_bound_is_graph_input() -> None:
    from onnx import TensorProto, helper

    inits = {
        "ax": np.array([1], I64),
        "s0": np.array([0], I64),
        "e0": np.array([5], I64),
        "e1": np.array([10], I64),
    }
    m = build(
        [
            node("Slice", ["x", "s0", "e0", "ax"], "y0"),
            node("Slice", ["x", "start", "e1", "ax"], "y1"),
        ],
        {"x": (2, 10, 3)},
        ["y0", "y1"],
        inits,
        graph_inputs_extra=[helper.make_tensor_value_info("start", TensorProto.INT64, [1])],
    )
    check_pass(
        m,
        P,
        expect_modified=False,
        feeds={"x": np.ones((2, 10, 3), np.float32), "start": np.array([5], I64)},
    )
