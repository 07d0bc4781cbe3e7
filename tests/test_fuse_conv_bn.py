"""fuse-conv-bn: BatchNormalization folded into Conv / ConvTranspose / Gemm."""

from __future__ import annotations

import numpy as np
import pytest
from fusion_graphs import bn_inputs, bn_params, build, node, rand

from graphopt.testing import check_pass, op_counts

P = "fuse-conv-bn"


def no_bn(model) -> None:
    assert "BatchNormalization" not in op_counts(model)


def test_cnn_fixture_folds_both(load_fixture) -> None:
    res, _ = check_pass(load_fixture("cnn.onnx"), P, structure=no_bn)
    assert res.stats["fold-conv-bn"] == 2
    assert op_counts(res.model)["Conv"] == 2


def test_residual_keeps_escaping_conv(load_fixture) -> None:
    # conv1_out is a graph output: conv1+bn1 must stay; conv2+bn2 folds
    res, _ = check_pass(
        load_fixture("residual.onnx"),
        P,
        structure=lambda m: (
            op_counts(m)["BatchNormalization"] == 1 or pytest.fail(str(op_counts(m)))
        ),
    )
    assert res.stats["fold-conv-bn"] == 1
    bn = [n for n in res.model.graph.nodes if n.op == "BatchNormalization"]
    assert bn[0].inputs[0].name == "conv1_out"


@pytest.mark.parametrize("bias", [True, False])
def test_conv_bn(bias: bool) -> None:
    inits = {"w": rand(8, 4, 3, 3), **bn_params("bn", 8)}
    ins = ["x", "w"]
    if bias:
        inits["b"] = rand(8)
        ins.append("b")
    m = build(
        [
            node("Conv", ins, "c", pads=[1, 1, 1, 1]),
            node("BatchNormalization", ["c", *bn_inputs("bn")], "y", epsilon=1e-3),
        ],
        {"x": (1, 4, 8, 8)},
        ["y"],
        inits,
    )
    check_pass(m, P, structure=no_bn)


@pytest.mark.parametrize("group", [1, 2])
def test_conv_transpose_bn(group: int) -> None:
    cin, cout = 4, 6
    inits = {"w": rand(cin, cout // group, 2, 2), "b": rand(cout), **bn_params("bn", cout)}
    m = build(
        [
            node("ConvTranspose", ["x", "w", "b"], "c", strides=[2, 2], group=group),
            node("BatchNormalization", ["c", *bn_inputs("bn")], "y"),
        ],
        {"x": (1, cin, 5, 5)},
        ["y"],
        inits,
    )
    check_pass(m, P, structure=no_bn)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_bn(trans_b: int) -> None:
    w = rand(6, 5) if trans_b else rand(5, 6)
    inits = {"w": w, "c": rand(1, 6), **bn_params("bn", 6)}
    m = build(
        [
            node("Gemm", ["x", "w", "c"], "g", transB=trans_b, alpha=0.5, beta=2.0),
            node("BatchNormalization", ["g", *bn_inputs("bn")], "y"),
        ],
        {"x": (3, 5)},
        ["y"],
        inits,
    )
    check_pass(m, P, structure=no_bn)


def _conv_bn_model(**kw):
    inits = {"w": rand(8, 4, 1, 1), **bn_params("bn", 8)}
    return inits


def test_negative_conv_output_is_graph_output() -> None:
    m = build(
        [node("Conv", ["x", "w"], "c"), node("BatchNormalization", ["c", *bn_inputs("bn")], "y")],
        {"x": (1, 4, 4, 4)},
        ["y", "c"],
        _conv_bn_model(),
    )
    check_pass(m, P, expect_modified=False)


def test_negative_shared_weight() -> None:
    m = build(
        [
            node("Conv", ["x", "w"], "c1"),
            node("BatchNormalization", ["c1", *bn_inputs("bn")], "y1"),
            node("Conv", ["x", "w"], "y2"),
        ],
        {"x": (1, 4, 4, 4)},
        ["y1", "y2"],
        _conv_bn_model(),
    )
    check_pass(m, P, expect_modified=False)


def test_negative_weight_is_graph_input() -> None:
    inits = _conv_bn_model()
    del inits["w"]
    m = build(
        [node("Conv", ["x", "w"], "c"), node("BatchNormalization", ["c", *bn_inputs("bn")], "y")],
        {"x": (1, 4, 4, 4), "w": (8, 4, 1, 1)},
        ["y"],
        inits,
    )
    check_pass(m, P, expect_modified=False)


def test_standalone_bn_kept_unless_cheaper() -> None:
    params = bn_params("bn", 4)
    m = build(
        [node("Relu", ["x"], "r"), node("BatchNormalization", ["r", *bn_inputs("bn")], "y")],
        {"x": (1, 4, 3, 3)},
        ["y"],
        params,
    )
    check_pass(m, P, expect_modified=False)
    # gamma = sqrt(var + eps): unit scale, the BN is a per-channel Add
    params["bn.g"] = np.sqrt(params["bn.v"] + np.float32(1e-5)).astype(np.float32)
    m2 = build(
        [node("Relu", ["x"], "r"), node("BatchNormalization", ["r", *bn_inputs("bn")], "y")],
        {"x": (1, 4, 3, 3)},
        ["y"],
        params,
    )
    check_pass(
        m2,
        P,
        structure=lambda mm: (
            op_counts(mm) == {"Relu": 1, "Add": 1} or pytest.fail(str(op_counts(mm)))
        ),
    )
