"""fuse-gelu: GELU (written out, or ONNX Gelu with a foldable bias) -> onnxruntime's Gelu,
FastGelu and BiasGelu (the ort target's lowering)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from fusion_graphs import build, node

from graphopt.core.errors import OptionError
from graphopt.passes import get_pass
from graphopt.testing import check_pass, op_counts

P = "fuse-gelu"
X = {"x": (2, 5, 8)}
RNG = np.random.default_rng(11)
W = RNG.uniform(-1, 1, (8, 16)).astype(np.float32)
BIAS = RNG.uniform(-0.5, 0.5, (16,)).astype(np.float32)


def counts(expected: dict[str, int]):
    def check(model) -> None:
        assert op_counts(model) == expected, op_counts(model)

    return check


def gelu_nodes(form: str, x: str = "x") -> tuple[list, dict]:
    """Written-out GELU on ``x``: erf in PyTorch or TF order, or the tanh approximation."""
    if form == "tanh":
        inits = {"three": 3.0, "k": 0.044715, "c": math.sqrt(2 / math.pi), "one": 1.0, "half": 0.5}
        return [
            node("Pow", [x, "three"], "x3"),
            node("Mul", ["k", "x3"], "kx3"),
            node("Add", [x, "kx3"], "in"),
            node("Mul", ["in", "c"], "arg"),
            node("Tanh", ["arg"], "th"),
            node("Add", ["th", "one"], "t"),
            node("Mul", [x, "half"], "hx"),
            node("Mul", ["hx", "t"], "y"),
        ], inits
    inits = {"sqrt2": math.sqrt(2.0), "one": 1.0, "half": 0.5}
    nodes = [
        node("Div", [x, "sqrt2"], "s"),
        node("Erf", ["s"], "e"),
        node("Add", ["e", "one"], "t"),
    ]
    if form == "pytorch":
        nodes += [node("Mul", [x, "t"], "m"), node("Mul", ["m", "half"], "y")]
    else:  # TF: 0.5 * x * (1 + erf(x / sqrt 2))
        nodes += [node("Mul", ["half", x], "m"), node("Mul", ["m", "t"], "y")]
    return nodes, inits


def biased(form: str, outputs: tuple[str, ...] = ("y",), opset: int = 17):
    """``GELU(x @ W + b)``; form ``onnx``/``onnx-tanh``: the ONNX Gelu op (opset 20)."""
    pre = [node("MatMul", ["x", "w"], "mm"), node("Add", ["mm", "bias"], "h")]
    if form.startswith("onnx"):
        approx = "tanh" if form == "onnx-tanh" else "none"
        nodes, inits = [node("Gelu", ["h"], "y", approximate=approx)], dict[str, float]()
    else:
        nodes, inits = gelu_nodes(form, "h")
    return build(pre + nodes, X, list(outputs), {**inits, "w": W, "bias": BIAS}, opset=opset)


@pytest.mark.parametrize("form,op", [("pytorch", "Gelu"), ("tf", "Gelu"), ("tanh", "FastGelu")])
def test_written_out_gelu(form: str, op: str) -> None:
    nodes, inits = gelu_nodes(form)
    res, _ = check_pass(
        build(nodes, X, ["y"], inits),
        P,
        target="ort",
        structure=counts({f"com.microsoft.{op}": 1}),
    )
    assert len(res.model.graph.nodes[0].inputs) == 1


@pytest.mark.parametrize(
    "form,op,opset",
    [
        ("pytorch", "BiasGelu", 17),
        ("tanh", "FastGelu", 17),
        ("onnx", "BiasGelu", 20),
        ("onnx-tanh", "FastGelu", 20),
    ],
)
def test_bias_folded(form: str, op: str, opset: int) -> None:
    res, _ = check_pass(
        biased(form, opset=opset),
        P,
        target="ort",
        structure=counts({"MatMul": 1, f"com.microsoft.{op}": 1}),
    )
    g = next(n for n in res.model.graph.nodes if n.op == op)
    np.testing.assert_array_equal(g.inputs[1].values, BIAS)
    assert g.inputs[1].name == "bias"  # the 1-D constant itself


def test_bias_with_leading_ones_is_folded_as_1d() -> None:
    pre = [node("MatMul", ["x", "w"], "mm"), node("Add", ["mm", "bias"], "h")]
    nodes, inits = gelu_nodes("pytorch", "h")
    m = build(pre + nodes, X, ["y"], {**inits, "w": W, "bias": BIAS.reshape(1, 1, 16)})
    res, _ = check_pass(
        m, P, target="ort", structure=counts({"MatMul": 1, "com.microsoft.BiasGelu": 1})
    )
    g = next(n for n in res.model.graph.nodes if n.op == "BiasGelu")
    assert g.inputs[1].values.shape == (16,)


def test_bias_read_elsewhere_is_not_folded() -> None:
    # the biased sum is a graph output: Gelu alone, the Add stays
    check_pass(
        biased("pytorch", outputs=("y", "h")),
        P,
        target="ort",
        structure=counts({"MatMul": 1, "Add": 1, "com.microsoft.Gelu": 1}),
    )


@pytest.mark.parametrize("case", ["onnx_gelu_alone", "wrong_constant", "escaping"])
def test_negatives(case: str) -> None:
    if case == "onnx_gelu_alone":  # ONNX Gelu has a kernel; with no bias there is nothing to do
        m = build([node("Gelu", ["x"], "y")], X, ["y"], {}, opset=20)
    else:
        nodes, inits = gelu_nodes("pytorch")
        outputs = ["y"]
        if case == "wrong_constant":
            inits["half"] = 0.4
        elif case == "escaping":
            outputs = ["y", "e"]
        m = build(nodes, X, outputs, inits)
    check_pass(m, P, target="ort", expect_modified=False)


def test_portable_target_refused() -> None:
    with pytest.raises(OptionError):
        get_pass(P, target="portable")
