"""fuse-matmul-add: rank-2 MatMul with constant weight + constant Add -> Gemm."""

from __future__ import annotations

import pytest
from fusion_graphs import build, node, rand

from graphopt.testing import check_pass, op_counts

P = "fuse-matmul-add"


def gemm_only(model) -> None:
    assert op_counts(model) == {"Gemm": 1}, op_counts(model)


@pytest.mark.parametrize("bias_shape", [(6,), (1, 6), (3, 6), (3, 1), ()])
def test_matmul_add_to_gemm(bias_shape: tuple[int, ...]) -> None:
    m = build(
        [node("MatMul", ["x", "w"], "mm"), node("Add", ["c", "mm"], "y")],
        {"x": (3, 5)},
        ["y"],
        {"w": rand(5, 6), "c": rand(*bias_shape)},
    )
    check_pass(m, P, structure=gemm_only)


def test_batched_matmuls_left_alone(load_fixture) -> None:
    """Every MatMul of the transformer fixture is rank 3: Gemm cannot express them."""
    m = load_fixture("transformer_block.onnx")
    check_pass(m, P, expect_modified=False)


@pytest.mark.parametrize("case", ["rank3", "bias_rank3", "bias_wrong", "escaping", "w_input"])
def test_negatives(case: str) -> None:
    nodes = [node("MatMul", ["x", "w"], "mm"), node("Add", ["mm", "c"], "y")]
    inputs: dict = {"x": (3, 5)}
    inits = {"w": rand(5, 6), "c": rand(6)}
    outputs = ["y"]
    if case == "rank3":
        inputs = {"x": (2, 3, 5)}
    elif case == "bias_rank3":
        inits["c"] = rand(1, 1, 6)
    elif case == "bias_wrong":
        inits["c"] = rand(2, 6)
        inputs = {"x": (1, 5)}  # [1,6] + [2,6] broadcasts to [2,6]: Gemm's C cannot
    elif case == "escaping":
        outputs = ["y", "mm"]
    else:
        del inits["w"]
        inputs["w"] = (5, 6)
    check_pass(build(nodes, inputs, outputs, inits), P, expect_modified=False)
