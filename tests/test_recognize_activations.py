"""recognize-activations: hardswish, hardsigmoid, SiLU unit, LayerNorm and GELU forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
from fusion_graphs import build, node

from graphopt.core.shapes import prepare
from graphopt.testing import check_pass, op_counts

P = "recognize-activations"
X = {"x": (2, 3, 4, 5)}


def counts(expected: dict[str, int]):
    def check(model) -> None:
        assert op_counts(model) == expected, op_counts(model)

    return check


def hswish_nodes(form: str, opset: int = 17) -> tuple[list, dict]:
    """Written-out hardswish in one of the forms exporters produce."""
    inits: dict = {"three": 3.0, "lo": 0.0, "hi": 6.0, "six": 6.0, "sixth": 1.0 / 6.0}
    nodes = [node("Add", ["three", "x"], "a")]
    clip = "k"
    if form == "clip_attrs":
        nodes.append(node("Clip", ["a"], "k", min=0.0, max=6.0))
    elif form == "minmax":
        nodes += [node("Max", ["a", "lo"], "k0"), node("Min", ["hi", "k0"], "k")]
    elif form == "relu_min":
        nodes += [node("Relu", ["a"], "k0"), node("Min", ["k0", "hi"], "k")]
    else:
        nodes.append(node("Clip", ["a", "lo", "hi"], "k"))
    if form in ("paddle", "clip_attrs", "minmax", "relu_min"):
        nodes += [node("Mul", ["x", clip], "m"), node("Div", ["m", "six"], "y")]
    elif form == "mul_sixth":
        nodes += [node("Mul", [clip, "x"], "m"), node("Mul", ["sixth", "m"], "y")]
    elif form == "inner_div":
        nodes += [node("Div", [clip, "six"], "d"), node("Mul", ["x", "d"], "y")]
    elif form == "x_div_first":
        nodes += [node("Div", ["x", "six"], "d"), node("Mul", ["d", clip], "y")]
    return nodes, inits


@pytest.mark.parametrize(
    "form", ["paddle", "mul_sixth", "inner_div", "x_div_first", "minmax", "relu_min"]
)
def test_hardswish_forms_opset14(form: str) -> None:
    nodes, inits = hswish_nodes(form)
    m = build(nodes, X, ["y"], inits, opset=14)
    check_pass(m, P, structure=counts({"HardSwish": 1}))


def test_hardswish_clip_attributes_opset10() -> None:
    nodes, inits = hswish_nodes("clip_attrs")
    m = build(nodes, X, ["y"], inits, opset=10)
    # no HardSwish before opset 14: x * HardSigmoid(x, 1/6, 1/2), two nodes instead of four
    res, _ = check_pass(m, P, structure=counts({"HardSigmoid": 1, "Mul": 1}))
    hs = next(n for n in res.model.graph.nodes if n.op == "HardSigmoid")
    assert abs(hs.attrs["alpha"] - 1 / 6) < 1e-7 and hs.attrs["beta"] == 0.5


def test_mobilenet_fixture(load_fixture) -> None:
    m = load_fixture("mobilenet_block.onnx")
    res, _ = check_pass(m, P)
    c = op_counts(res.model)
    assert c["HardSwish"] == 2 and "Clip" not in c and "Div" not in c
    # the SE gate multiplies a *different* tensor by HardSigmoid: not a hardswish
    assert c["HardSigmoid"] == 1


def test_hardsigmoid_times_x_and_hardsigmoid_written_out() -> None:
    inits = {"three": 3.0, "lo": 0.0, "hi": 6.0, "six": 6.0}
    m = build(
        [
            node("HardSigmoid", ["x"], "h", alpha=1 / 6, beta=0.5),
            node("Mul", ["h", "x"], "y1"),
            node("Add", ["x", "three"], "a"),
            node("Clip", ["a", "lo", "hi"], "k"),
            node("Div", ["k", "six"], "y2"),
        ],
        X,
        ["y1", "y2"],
        inits,
        opset=14,
    )
    check_pass(m, P, structure=counts({"HardSwish": 1, "HardSigmoid": 1}))


@pytest.mark.parametrize(
    "case", ["three_is_2", "six_is_5", "alpha_0.2", "opset13_hsig", "escaping", "shared_x"]
)
def test_hardswish_negatives(case: str) -> None:
    if case in ("alpha_0.2", "opset13_hsig"):
        alpha = 0.2 if case == "alpha_0.2" else 1 / 6
        m = build(
            [node("HardSigmoid", ["x"], "h", alpha=alpha, beta=0.5), node("Mul", ["x", "h"], "y")],
            X,
            ["y"],
            {},
            opset=17 if case == "alpha_0.2" else 13,
        )
    else:
        nodes, inits = hswish_nodes("paddle")
        outputs = ["y"]
        if case == "three_is_2":
            inits["three"] = 2.0
        elif case == "six_is_5":
            inits["six"] = 5.0
        elif case == "escaping":
            outputs = ["y", "k"]
        else:  # the Mul reads another tensor than the Add: not x * f(x)
            nodes[1:] = []
            nodes += [
                node("Clip", ["a", "lo", "hi"], "k"),
                node("Mul", ["z", "k"], "m"),
                node("Div", ["m", "six"], "y"),
            ]
        m = build(nodes, {**X, "z": X["x"]} if case == "shared_x" else X, outputs, inits)
    check_pass(m, P, expect_modified=False)


def test_sigmoid_of_x_times_one() -> None:
    m = build(
        [node("Mul", ["x", "one"], "a"), node("Sigmoid", ["a"], "s"), node("Mul", ["x", "s"], "y")],
        X,
        ["y"],
        {"one": 1.0},
    )
    check_pass(m, P, structure=counts({"Sigmoid": 1, "Mul": 1}))


def test_layernorm_fixture(load_fixture) -> None:
    res, _ = check_pass(prepare(load_fixture("transformer_block.onnx")), P)
    c = op_counts(res.model)
    assert c["LayerNormalization"] == 2 and "ReduceMean" not in c and "Sqrt" not in c


def ln_nodes(square: str = "pow", axes: list[int] | None = None) -> list:
    axes = axes or [-1]
    sq = node("Pow", ["d", "two"], "sq") if square == "pow" else node("Mul", ["d", "d"], "sq")
    return [
        node("ReduceMean", ["x"], "mu", axes=axes),
        node("Sub", ["x", "mu"], "d"),
        sq,
        node("ReduceMean", ["sq"], "var", axes=axes),
        node("Add", ["var", "eps"], "ve"),
        node("Sqrt", ["ve"], "std"),
        node("Reciprocal", ["std"], "r"),
        node("Mul", ["d", "r"], "n"),
        node("Mul", ["n", "g"], "y"),
    ]


def test_layernorm_two_axes_mul_square_reciprocal() -> None:
    inits = {
        "two": 2.0,
        "eps": 1e-5,
        "g": np.random.default_rng(0).uniform(0.5, 1.5, (4, 5)).astype(np.float32),
    }
    m = build(ln_nodes("mul", [-2, -1]), X, ["y"], inits)
    res, _ = check_pass(m, P, structure=counts({"LayerNormalization": 1}))
    assert res.model.graph.nodes[0].attrs["axis"] == -2


@pytest.mark.parametrize("case", ["axis_not_last", "opset16", "gamma_raises_rank"])
def test_layernorm_negatives(case: str) -> None:
    inits = {"two": 2.0, "eps": 1e-5, "g": np.full((5,), 1.5, np.float32)}
    axes = [1] if case == "axis_not_last" else None
    if case == "gamma_raises_rank":
        inits["g"] = np.full((1, 1, 1, 1, 5), 1.5, np.float32)
    m = build(ln_nodes("pow", axes), X, ["y"], inits, opset=16 if case == "opset16" else 17)
    check_pass(m, P, expect_modified=False)


def gelu_erf(order: str) -> tuple[list, dict]:
    inits = {"sqrt2": math.sqrt(2.0), "one": 1.0, "half": 0.5}
    nodes = [
        node("Div", ["x", "sqrt2"], "s"),
        node("Erf", ["s"], "e"),
        node("Add", ["e", "one"], "t"),
    ]
    if order == "pytorch":
        nodes += [node("Mul", ["x", "t"], "m"), node("Mul", ["m", "half"], "y")]
    else:  # TF: 0.5 * x * (1 + erf(x / sqrt 2))
        nodes += [node("Mul", ["half", "x"], "m"), node("Mul", ["m", "t"], "y")]
    return nodes, inits


def gelu_tanh() -> tuple[list, dict]:
    inits = {"three": 3.0, "k": 0.044715, "c": math.sqrt(2 / math.pi), "one": 1.0, "half": 0.5}
    nodes = [
        node("Pow", ["x", "three"], "x3"),
        node("Mul", ["k", "x3"], "kx3"),
        node("Add", ["x", "kx3"], "in"),
        node("Mul", ["in", "c"], "arg"),
        node("Tanh", ["arg"], "th"),
        node("Add", ["th", "one"], "t"),
        node("Mul", ["x", "half"], "hx"),
        node("Mul", ["hx", "t"], "y"),
    ]
    return nodes, inits


@pytest.mark.parametrize("form", ["pytorch", "tf", "tanh"])
def test_gelu_opset20(form: str) -> None:
    nodes, inits = gelu_tanh() if form == "tanh" else gelu_erf(form)
    m = build(nodes, X, ["y"], inits, opset=20)
    res, _ = check_pass(m, P, structure=counts({"Gelu": 1}))
    assert res.model.graph.nodes[0].attrs.get("approximate", "none") == (
        "tanh" if form == "tanh" else "none"
    )


def test_gelu_below_opset20_left_alone(load_fixture) -> None:
    nodes, inits = gelu_erf("pytorch")
    check_pass(build(nodes, X, ["y"], inits, opset=17), P, expect_modified=False)
