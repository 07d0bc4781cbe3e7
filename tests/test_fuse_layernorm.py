"""fuse-layernorm: written-out LayerNorm -> LayerNormalization, RMSNorm -> RMSNormalization
(opset >= 23) or, for the ort target, onnxruntime's SimplifiedLayerNormalization."""

from __future__ import annotations

import numpy as np
import pytest
from fusion_graphs import build, node

from graphopt.core.errors import OptionError
from graphopt.core.kernels import ort_runs
from graphopt.passes import get_pass
from graphopt.testing import check_pass, op_counts

P = "fuse-layernorm"
X: dict[str, tuple[int, ...]] = {"x": (2, 3, 4, 8)}
RNG = np.random.default_rng(7)
GAMMA = RNG.uniform(0.5, 1.5, (8,)).astype(np.float32)
BETA = RNG.uniform(-0.5, 0.5, (8,)).astype(np.float32)


def counts(expected: dict[str, int]):
    def check(model) -> None:
        assert op_counts(model) == expected, op_counts(model)

    return check


def _mean(src: str, out: str, opset: int, axes: list[int]) -> list:
    """ReduceMean with axes as an attribute (opset < 18) or as a constant input."""
    if opset >= 18:
        return [node("ReduceMean", [src, f"{out}_axes"], out)]
    return [node("ReduceMean", [src], out, axes=axes)]


def _axes_inits(names: list[str], opset: int, axes: list[int]) -> dict:
    return {f"{n}_axes": np.array(axes, np.int64) for n in names} if opset >= 18 else {}


def ln_model(
    *,
    opset: int = 17,
    axes: list[int] | None = None,
    square: str = "pow",
    div: bool = True,
    outputs: tuple[str, ...] = ("y",),
    gamma_input: bool = False,
):
    axes = axes or [-1]
    sq = node("Pow", ["d", "two"], "sq") if square == "pow" else node("Mul", ["d", "d"], "sq")
    norm = (
        [node("Div", ["d", "std"], "n")]
        if div
        else [node("Reciprocal", ["std"], "r"), node("Mul", ["d", "r"], "n")]
    )
    nodes = [
        *_mean("x", "mu", opset, axes),
        node("Sub", ["x", "mu"], "d"),
        sq,
        *_mean("sq", "var", opset, axes),
        node("Add", ["var", "eps"], "ve"),
        node("Sqrt", ["ve"], "std"),
        *norm,
        node("Mul", ["n", "g"], "ng"),
        node("Add", ["ng", "b"], "y"),
    ]
    inits = {"two": 2.0, "eps": 1e-5, "b": BETA, **_axes_inits(["mu", "var"], opset, axes)}
    inputs = dict(X)
    if gamma_input:
        inputs["g"] = (8,)
    else:
        inits["g"] = GAMMA
    return build(nodes, inputs, list(outputs), inits, opset=opset)


def rms_model(
    *,
    opset: int = 23,
    axes: list[int] | None = None,
    form: str = "reciprocal",
    square: str = "pow",
    gamma: bool = True,
    outputs: tuple[str, ...] = ("y",),
    gamma_input: bool = False,
    centered: bool = False,
):
    axes = axes or [-1]
    nodes: list = []
    x = "x"
    inits: dict = {"two": 2.0, "eps": 1e-6, "one": 1.0}
    if centered:  # (x - mean(x)) normalised by its RMS: a LayerNorm
        nodes += [*_mean("x", "mu", opset, axes), node("Sub", ["x", "mu"], "xc")]
        inits.update(_axes_inits(["mu"], opset, axes))
        x = "xc"
    sq = node("Pow", [x, "two"], "sq") if square == "pow" else node("Mul", [x, x], "sq")
    nodes += [sq, *_mean("sq", "ms", opset, axes)]
    nodes += [node("Add", ["ms", "eps"], "mse"), node("Sqrt", ["mse"], "rms")]
    n = "y" if not gamma else "n"
    if form == "div":
        nodes.append(node("Div", [x, "rms"], n))
    elif form == "reciprocal":
        nodes += [node("Reciprocal", ["rms"], "r"), node("Mul", [x, "r"], n)]
    else:  # x * (1 / rms)
        nodes += [node("Div", ["one", "rms"], "r"), node("Mul", ["r", x], n)]
    if gamma:
        nodes.append(node("Mul", ["g", "n"], "y"))
    inits.update(_axes_inits(["ms"], opset, axes))
    inputs = dict(X)
    if gamma_input:
        inputs["g"] = (8,)
    elif gamma:
        inits["g"] = GAMMA
    m = build(nodes, inputs, list(outputs), inits, opset=opset)
    if opset >= 21:  # onnx wants a newer IR version for opset 21+
        m.ir_version = max(getattr(m, "ir_version", 10) or 10, 10)
    return m


# ---------------------------------------------------------------------------------- LayerNorm


@pytest.mark.parametrize(
    "opset,square,div", [(17, "pow", True), (17, "mul", False), (18, "pow", False)]
)
def test_layernorm_forms(opset: int, square: str, div: bool) -> None:
    m = ln_model(opset=opset, square=square, div=div)
    res, _ = check_pass(m, P, structure=counts({"LayerNormalization": 1}))
    ln = res.model.graph.nodes[0]
    assert ln.attrs["axis"] == -1 and abs(ln.attrs["epsilon"] - 1e-5) < 1e-12
    np.testing.assert_array_equal(ln.inputs[1].values, GAMMA)


@pytest.mark.parametrize("case", ["opset16", "axis_not_last", "escaping"])
def test_layernorm_negatives(case: str) -> None:
    m = ln_model(
        opset=16 if case == "opset16" else 17,
        axes=[2] if case == "axis_not_last" else None,
        outputs=("y", "var") if case == "escaping" else ("y",),
    )
    check_pass(m, P, expect_modified=False)


def test_layernorm_gamma_not_constant_stays_outside() -> None:
    # gamma a graph input: the norm is fused without it, the Mul (and the beta Add) stay
    m = ln_model(gamma_input=True)
    check_pass(m, P, structure=counts({"LayerNormalization": 1, "Mul": 1, "Add": 1}))


# ---------------------------------------------------------------------------------- RMSNorm


needs_rms = pytest.mark.skipif(
    not ort_runs("RMSNormalization", 23), reason="onnxruntime has no RMSNormalization kernel"
)


@needs_rms
@pytest.mark.parametrize(
    "form,square,gamma",
    [
        ("reciprocal", "pow", True),
        ("div", "mul", True),
        ("one_div", "pow", True),
        ("div", "pow", False),
    ],
)
def test_rmsnorm_opset23(form: str, square: str, gamma: bool) -> None:
    m = rms_model(form=form, square=square, gamma=gamma)
    res, _ = check_pass(m, P, structure=counts({"RMSNormalization": 1}))
    rn = res.model.graph.nodes[0]
    assert rn.attrs["axis"] == -1 and abs(rn.attrs["epsilon"] - 1e-6) < 1e-12
    np.testing.assert_allclose(rn.inputs[1].values, GAMMA if gamma else np.ones(8), rtol=0)


@needs_rms
def test_rmsnorm_two_last_axes() -> None:
    m = rms_model(axes=[-2, -1], gamma=False)
    res, _ = check_pass(m, P, structure=counts({"RMSNormalization": 1}))
    assert res.model.graph.nodes[0].attrs["axis"] == -2


def test_rmsnorm_ort_target_below_opset23() -> None:
    m = rms_model(opset=17)
    # SimplifiedLayerNormalization is onnxruntime's op in the ONNX domain: onnx.checker does not
    # know it (checker=False); onnxruntime runs it, which check_pass compares
    check_pass(
        m, P, target="ort", checker=False, structure=counts({"SimplifiedLayerNormalization": 1})
    )


def test_rmsnorm_portable_below_opset23_is_kept() -> None:
    check_pass(rms_model(opset=17), P, expect_modified=False)


def test_centered_rms_is_a_layernorm() -> None:
    # mean(x) subtracted first: the LayerNorm rule takes it (no beta), never RMSNormalization
    m = rms_model(opset=23 if ort_runs("RMSNormalization", 23) else 17, centered=True)
    check_pass(m, P, structure=counts({"LayerNormalization": 1}))


@pytest.mark.parametrize("case", ["axis_not_last", "escaping", "opset22"])
def test_rmsnorm_negatives(case: str) -> None:
    m = rms_model(
        opset=22 if case == "opset22" else 23,
        axes=[1] if case == "axis_not_last" else None,
        outputs=("y", "ms") if case == "escaping" else ("y",),
    )
    check_pass(m, P, expect_modified=False)


@needs_rms
def test_rmsnorm_gamma_not_constant_stays_outside() -> None:
    check_pass(rms_model(gamma_input=True), P, structure=counts({"RMSNormalization": 1, "Mul": 1}))


def test_bad_target() -> None:
    with pytest.raises(OptionError):
        get_pass(P, target="tvm")


def test_llama_rmsnorm_export_ort_target(tmp_path) -> None:
    """A real export: transformers' LlamaRMSNorm (Pow, ReduceMean, Add, Sqrt, Div(1, .), Mul, Mul)
    in a residual block at opset 17 -> SimplifiedLayerNormalization, then, with the residual Add,
    SkipSimplifiedLayerNormalization (the sum, read again, as its 4th output)."""
    pytest.importorskip("torch")
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    import torch

    from graphopt.jobs.optimize import optimize

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = llama.LlamaRMSNorm(16, eps=1e-6)
            self.proj = torch.nn.Linear(16, 16)
            with torch.no_grad():
                self.norm.weight.uniform_(0.5, 1.5)

        def forward(self, a, b):  # noqa: ANN001, ANN202
            h = a + b
            return self.proj(self.norm(h)) + h

    torch.manual_seed(0)
    path = tmp_path / "rms.onnx"
    args = (torch.randn(2, 5, 16), torch.randn(2, 5, 16))
    torch.onnx.export(
        Block().eval(),
        args,
        str(path),
        opset_version=17,
        dynamo=False,
        input_names=["a", "b"],
        dynamic_axes={"a": {0: "B", 1: "S"}, "b": {0: "B", 1: "S"}},
    )
    portable = optimize(str(path))
    assert "ReduceMean" in op_counts(portable.model)  # no RMSNormalization before opset 23
    res = optimize(str(path), target="ort", output=tmp_path / "out.onnx")
    assert res.verify is not None and res.verify.ok
    c = op_counts(res.model)
    assert c.get("com.microsoft.SkipSimplifiedLayerNormalization") == 1, c
    assert "ReduceMean" not in c and "Sqrt" not in c


def test_rms_without_kernel_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """An onnxruntime without RMSNormalization: the portable output keeps the nodes; the ort
    target emits SimplifiedLayerNormalization even at opset 23."""
    import graphopt.algorithms.transformer_patterns as tp

    real = tp.ort_runs
    monkeypatch.setattr(
        tp, "ort_runs", lambda op, *a, **k: op != "RMSNormalization" and real(op, *a, **k)
    )
    check_pass(rms_model(), P, expect_modified=False)
    check_pass(
        rms_model(),
        P,
        target="ort",
        checker=False,
        structure=counts({"SimplifiedLayerNormalization": 1}),
    )
