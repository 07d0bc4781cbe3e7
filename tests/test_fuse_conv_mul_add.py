"""fuse-conv-mul-add: constant per-channel/scalar Mul, Div, Add, Sub folded into Conv/Gemm."""

from __future__ import annotations

import numpy as np
import pytest
from fusion_graphs import build, node, rand

from graphopt.passes import get_pass
from graphopt.testing import check_pass, op_counts

P = "fuse-conv-mul-add"


def only(*ops: str):
    def check(model) -> None:
        assert set(op_counts(model)) == set(ops), op_counts(model)

    return check


def test_mobilenet_lcnet_affine_block(load_fixture) -> None:
    m = load_fixture("mobilenet_block.onnx")
    before = op_counts(m)
    res, _ = check_pass(m, P)
    after = op_counts(res.model)
    assert res.stats == {"fold-linear-mul": 1, "fold-linear-add": 1}
    assert after["Mul"] == before["Mul"] - 1 and after["Add"] == before["Add"] - 1
    assert all(n.name != "lab_mul" for n in res.model.graph.nodes)


@pytest.mark.parametrize(
    "op,shape",
    [("Mul", (1, 8, 1, 1)), ("Div", (8, 1, 1)), ("Add", ()), ("Sub", (1,)), ("Mul", (1, 1, 1, 1))],
)
@pytest.mark.parametrize("bias", [True, False])
def test_conv_elementwise(op: str, shape: tuple[int, ...], bias: bool) -> None:
    inits = {"w": rand(8, 4, 3, 3), "c": rand(*shape, lo=0.5, hi=1.5)}
    ins = ["x", "w"] + (["b"] if bias else [])
    if bias:
        inits["b"] = rand(8)
    m = build(
        [node("Conv", ins, "y0"), node(op, ["y0", "c"], "y")], {"x": (1, 4, 6, 6)}, ["y"], inits
    )
    check_pass(m, P, structure=only("Conv"))


def test_constant_minus_conv() -> None:
    m = build(
        [node("Conv", ["x", "w", "b"], "y0"), node("Sub", ["c", "y0"], "y")],
        {"x": (1, 4, 6, 6)},
        ["y"],
        {"w": rand(8, 4, 1, 1), "b": rand(8), "c": rand(1, 8, 1, 1)},
    )
    check_pass(m, P, structure=only("Conv"))


def test_chain_mul_then_add_and_conv_transpose_group() -> None:
    m = build(
        [
            node("ConvTranspose", ["x", "w"], "y0", group=2, strides=[2, 2]),
            node("Mul", ["s", "y0"], "y1"),
            node("Add", ["y1", "t"], "y"),
        ],
        {"x": (1, 4, 3, 3)},
        ["y"],
        {"w": rand(4, 3, 2, 2), "s": rand(1, 6, 1, 1), "t": rand(6, 1, 1)},
    )
    res, _ = check_pass(m, P, structure=only("ConvTranspose"))
    assert res.stats == {"fold-linear-mul": 1, "fold-linear-add": 1}


def test_gemm_mul() -> None:
    m = build(
        [node("Gemm", ["x", "w", "b"], "y0", transB=1), node("Mul", ["y0", "s"], "y")],
        {"x": (2, 5)},
        ["y"],
        {"w": rand(3, 5), "b": rand(3), "s": rand(3)},
    )
    check_pass(m, P, structure=only("Gemm"))


@pytest.mark.parametrize("shape", [(1, 1, 6, 1), (1, 8, 1, 1, 1), (2, 1, 1, 1)])
def test_negative_broadcast_over_other_axis(shape: tuple[int, ...]) -> None:
    """Constant varies along a spatial/batch axis, or would raise the output's rank."""
    m = build(
        [node("Conv", ["x", "w", "b"], "y0"), node("Mul", ["y0", "c"], "y")],
        {"x": (1, 4, 6, 6)},
        ["y"],
        {"w": rand(8, 4, 1, 1), "b": rand(8), "c": rand(*shape)},
    )
    check_pass(m, P, expect_modified=False)


def test_negative_escaping_shared_and_graph_input_weight() -> None:
    inits = {"w": rand(8, 4, 1, 1), "b": rand(8), "c": np.float32(2.0)}
    escaping = build(
        [node("Conv", ["x", "w", "b"], "y0"), node("Mul", ["y0", "c"], "y")],
        {"x": (1, 4, 6, 6)},
        ["y", "y0"],
        inits,
    )
    check_pass(escaping, P, expect_modified=False)
    shared = build(
        [
            node("Conv", ["x", "w", "b"], "y0"),
            node("Mul", ["y0", "c"], "y"),
            node("Conv", ["x", "w"], "z"),
        ],
        {"x": (1, 4, 6, 6)},
        ["y", "z"],
        inits,
    )
    check_pass(shared, P, expect_modified=False)
    no_w = dict(inits)
    del no_w["w"]
    w_input = build(
        [node("Conv", ["x", "w", "b"], "y0"), node("Mul", ["y0", "c"], "y")],
        {"x": (1, 4, 6, 6), "w": (8, 4, 1, 1)},
        ["y"],
        no_w,
    )
    check_pass(w_input, P, expect_modified=False)


def test_negative_div_by_zero_channel() -> None:
    c = rand(1, 8, 1, 1, lo=0.5, hi=1.5)
    c[0, 3] = 0.0
    m = build(
        [node("Conv", ["x", "w", "b"], "y0"), node("Div", ["y0", "c"], "y")],
        {"x": (1, 4, 6, 6)},
        ["y"],
        {"w": rand(8, 4, 1, 1), "b": rand(8), "c": c},
    )
    # x / 0 is inf/nan at runtime: nothing to compare, and nothing may change
    res = get_pass(P)(m.clone())
    assert not res.modified
