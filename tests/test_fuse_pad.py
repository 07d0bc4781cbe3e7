"""fuse-pad: constant Pad folded into Conv / AveragePool / MaxPool padding where exact."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from fusion_graphs import build, node, rand

from graphopt.testing import check_pass, op_counts

P = "fuse-pad"
PADS = np.array([0, 0, 1, 2, 0, 0, 2, 1], dtype=np.int64)


def no_pad(model) -> None:
    assert "Pad" not in op_counts(model), op_counts(model)


def _pad_model(
    consumer: onnx.NodeProto,
    value: float | None = None,
    pads: np.ndarray = PADS,
    mode: str = "constant",
    extra: dict | None = None,
):
    inits = {"pads": pads, **(extra or {})}
    ins = ["x", "pads"]
    if value is not None:
        inits["v"] = np.array(value, dtype=np.float32)
        ins.append("v")
    return build([node("Pad", ins, "p", mode=mode), consumer], {"x": (1, 3, 7, 7)}, ["y"], inits)


@pytest.mark.parametrize("value", [None, 0.0])
def test_pad_into_conv(value: float | None) -> None:
    conv = node("Conv", ["p", "w", "b"], "y", pads=[1, 1, 1, 1])
    m = _pad_model(conv, value, extra={"w": rand(4, 3, 3, 3), "b": rand(4)})
    res, _ = check_pass(m, P, structure=no_pad)
    (c,) = res.model.graph.nodes
    assert c.attrs["pads"] == [2, 3, 3, 2]


def test_pad_into_maxpool_with_minus_inf() -> None:
    pool = node("MaxPool", ["p"], "y", kernel_shape=[3, 3])
    check_pass(_pad_model(pool, -np.inf), P, structure=no_pad)


def test_pad_into_average_pool_counts_padding() -> None:
    pool = node("AveragePool", ["p"], "y", kernel_shape=[3, 3])
    res, _ = check_pass(_pad_model(pool, 0.0), P, structure=no_pad)
    assert res.model.graph.nodes[0].attrs["count_include_pad"] == 1


def test_opset10_pad_attributes() -> None:
    m = build(
        [node("Pad", ["x"], "p", pads=PADS.tolist(), value=0.0), node("Conv", ["p", "w"], "y")],
        {"x": (1, 3, 7, 7)},
        ["y"],
        {"w": rand(4, 3, 3, 3)},
        opset=10,
    )
    check_pass(m, P, structure=no_pad)


@pytest.mark.parametrize(
    "case",
    [
        "value1",
        "channel",
        "negative",
        "reflect",
        "maxpool0",
        "avg_excl",
        "ceil",
        "too_big",
        "escaping",
    ],
)
def test_negatives(case: str) -> None:
    conv = node("Conv", ["p", "w"], "y")
    w = {"w": rand(4, 3, 3, 3)}
    if case == "value1":
        m = _pad_model(conv, 1.0, extra=w)
    elif case == "channel":
        m = _pad_model(
            conv, 0.0, pads=np.array([0, 1, 0, 0, 0, 0, 0, 0]), extra={"w": rand(4, 4, 3, 3)}
        )
    elif case == "negative":
        m = _pad_model(conv, 0.0, pads=np.array([0, 0, -1, 0, 0, 0, 1, 0]), extra=w)
    elif case == "reflect":
        m = _pad_model(conv, None, mode="reflect", extra=w)
    elif case == "maxpool0":  # zero padding before MaxPool is not MaxPool's -inf padding
        m = _pad_model(node("MaxPool", ["p"], "y", kernel_shape=[3, 3]), 0.0)
    elif case == "avg_excl":  # the pool's own padding is excluded from the divisor
        m = _pad_model(node("AveragePool", ["p"], "y", kernel_shape=[3, 3], pads=[1, 1, 1, 1]), 0.0)
    elif case == "ceil":
        m = _pad_model(
            node("AveragePool", ["p"], "y", kernel_shape=[3, 3], ceil_mode=1, strides=[2, 2]), 0.0
        )
    elif case == "too_big":  # pads >= kernel are refused by onnxruntime's pools
        m = _pad_model(node("AveragePool", ["p"], "y", kernel_shape=[2, 2]), 0.0)
    else:
        m = build(
            [node("Pad", ["x", "pads"], "p"), node("Conv", ["p", "w"], "y")],
            {"x": (1, 3, 7, 7)},
            ["y", "p"],
            {"pads": PADS, **w},
        )
    check_pass(m, P, expect_modified=False)
