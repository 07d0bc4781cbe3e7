"""fuse-skip-layernorm: residual Add (+ bias) + LayerNorm -> com.microsoft.SkipLayerNormalization,
RMS forms -> SkipSimplifiedLayerNormalization (the ort target's lowering)."""

from __future__ import annotations

import numpy as np
import pytest
from fusion_graphs import build, node

from graphopt.core.errors import OptionError
from graphopt.core.kernels import ort_runs
from graphopt.passes import get_pass
from graphopt.testing import check_pass, op_counts

P = "fuse-skip-layernorm"
H = 8
RNG = np.random.default_rng(5)
GAMMA = RNG.uniform(0.5, 1.5, (H,)).astype(np.float32)
BETA = RNG.uniform(-0.5, 0.5, (H,)).astype(np.float32)
BIAS = RNG.uniform(-0.5, 0.5, (H,)).astype(np.float32)
W = RNG.uniform(-1, 1, (H, H)).astype(np.float32)
SKLN = "com.microsoft.SkipLayerNormalization"


def counts(expected: dict[str, int]):
    def check(model) -> None:
        assert op_counts(model) == expected, op_counts(model)

    return check


def model(
    *,
    a_shape: tuple = (2, 5, H),
    b_shape: tuple = (2, 5, H),
    bias: bool = False,
    outputs: tuple[str, ...] = ("y",),
    extra: list | None = None,
    norm: str = "ln",
    axis: int = -1,
    gamma_input: bool = False,
    opset: int = 17,
    const_skip: bool = False,
):
    nodes = []
    a = "a"
    if bias:  # a = x @ W + bias, the projection before the residual
        nodes += [node("MatMul", ["a", "w"], "mm"), node("Add", ["mm", "bias"], "ab")]
        a = "ab"
    nodes.append(node("Add", [a, "b"], "s"))
    if norm == "ln":
        nodes.append(node("LayerNormalization", ["s", "g", "beta"], "y", axis=axis, epsilon=1e-5))
    elif norm == "simplified":
        nodes.append(node("SimplifiedLayerNormalization", ["s", "g"], "y", axis=axis, epsilon=1e-5))
    else:
        nodes.append(node("RMSNormalization", ["s", "g"], "y", axis=axis, epsilon=1e-5))
    nodes += extra or []
    inits: dict = {"beta": BETA, "w": W, "bias": BIAS}
    inputs = {"a": a_shape}
    if const_skip:
        inits["b"] = RNG.uniform(-1, 1, b_shape).astype(np.float32)
    else:
        inputs["b"] = b_shape
    if gamma_input:
        inputs["g"] = (H,)
    else:
        inits["g"] = GAMMA
    m = build(nodes, inputs, list(outputs), inits, opset=opset)
    return m


def test_post_ln_residual() -> None:
    res, _ = check_pass(model(), P, structure=counts({SKLN: 1}))
    n = res.model.graph.nodes[0]
    assert len(n.outputs) == 1 and abs(n.attrs["epsilon"] - 1e-5) < 1e-12
    np.testing.assert_array_equal(n.inputs[2].values, GAMMA)
    np.testing.assert_array_equal(n.inputs[3].values, BETA)
    assert n.inputs[2].name == "g" and n.inputs[3].name == "beta"  # 1-D weights reused, not copied


def test_bias_folded() -> None:
    res, _ = check_pass(model(bias=True), P, structure=counts({"MatMul": 1, SKLN: 1}))
    n = next(n for n in res.model.graph.nodes if n.op == "SkipLayerNormalization")
    np.testing.assert_array_equal(n.inputs[4].values, BIAS)


@pytest.mark.parametrize("how", ["other_reader", "graph_output"])
def test_sum_exposed(how: str) -> None:
    # pre-LN stream: the sum is also the next residual (or a graph output) -> 4th output
    extra = [node("Add", ["s", "y"], "z")] if how == "other_reader" else []
    outputs = ("z",) if how == "other_reader" else ("y", "s")
    res, _ = check_pass(
        model(extra=extra, outputs=outputs),
        P,
        structure=counts({SKLN: 1, "Add": 1} if extra else {SKLN: 1}),
    )
    n = next(n for n in res.model.graph.nodes if n.op == "SkipLayerNormalization")
    assert len(n.outputs) == 4 and n.outputs[3].name == "s"


@pytest.mark.parametrize("b_shape", [(1, 5, H), (5, H)])
def test_broadcast_skip(b_shape: tuple) -> None:
    check_pass(model(b_shape=b_shape), P, structure=counts({SKLN: 1}))


def test_constant_skip() -> None:
    # a position-embedding-like constant of shape (S, H) is a skip
    check_pass(model(b_shape=(5, H), const_skip=True), P, structure=counts({SKLN: 1}))


def test_two_d_input() -> None:
    check_pass(model(a_shape=(5, H), b_shape=(5, H)), P, structure=counts({SKLN: 1}))


def test_simplified() -> None:
    # onnxruntime's SimplifiedLayerNormalization (ONNX domain, unknown to onnx.checker)
    check_pass(
        model(norm="simplified"),
        P,
        checker=False,
        structure=counts({"com.microsoft.SkipSimplifiedLayerNormalization": 1}),
    )


@pytest.mark.skipif(not ort_runs("RMSNormalization", 23), reason="no RMSNormalization kernel")
def test_rmsnormalization() -> None:
    m = model(norm="rms", opset=23)
    check_pass(m, P, structure=counts({"com.microsoft.SkipSimplifiedLayerNormalization": 1}))


@pytest.mark.parametrize(
    "case", ["axis_not_last", "rank4", "skip_broadcast_batch", "gamma_input", "mean_output_used"]
)
def test_negatives(case: str) -> None:
    kw: dict = {}
    if case == "axis_not_last":
        kw["axis"] = -2
    elif case == "rank4":
        kw.update(a_shape=(2, 3, 5, H), b_shape=(2, 3, 5, H))
    elif case == "skip_broadcast_batch":  # (B, 1, H): a broadcast the kernel does not do
        kw["b_shape"] = (2, 1, H)
    elif case == "gamma_input":
        kw["gamma_input"] = True
    if case == "mean_output_used":
        m = build(
            [
                node("Add", ["a", "b"], "s"),
                node("LayerNormalization", ["s", "g", "beta"], ["y", "mean"], epsilon=1e-5),
            ],
            {"a": (2, 5, H), "b": (2, 5, H)},
            ["y", "mean"],
            {"g": GAMMA, "beta": BETA},
        )
    else:
        m = model(**kw)
    check_pass(m, P, expect_modified=False)


def test_portable_target_refused() -> None:
    with pytest.raises(OptionError):
        get_pass(P, target="portable")


def test_optimize_ort_target_on_transformer_block(load_fixture) -> None:
    # the whole ort lowering on the fixture: written-out LayerNorm/GELU -> LayerNormalization,
    # then BiasGelu and SkipLayerNormalization; outputs equal at fp32 tolerance
    from graphopt.jobs.optimize import optimize

    res = optimize(load_fixture("transformer_block.onnx"), target="ort")
    assert res.verify is not None and res.verify.ok
    c = op_counts(res.model)
    assert c.get("com.microsoft.BiasGelu") == 1 and c.get(SKLN) == 1, c
    assert "Erf" not in c and "ReduceMean" not in c
