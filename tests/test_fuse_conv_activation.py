"""fuse-conv-activation: Conv+activation -> com.microsoft.FusedConv, SiLU -> QuickGelu (the ort
target's lowering; the TVM fusion groups are tests/test_annotate_fusion_groups.py)."""

from __future__ import annotations

import numpy as np
import pytest
from fusion_graphs import build, node, rand

from graphopt.core.loader import load
from graphopt.core.model import Model
from graphopt.core.shapes import prepare
from graphopt.fixtures import real_model_feeds
from graphopt.jobs.optimize import optimize_model
from graphopt.testing import check_pass, op_counts

P = "fuse-conv-activation"


def _conv_act(
    act: list, inits: dict | None = None, outputs: tuple[str, ...] = ("y",), opset: int = 17
) -> Model:
    base = {"w": rand(4, 3, 3, 3), "b": rand(4)}
    return build(
        [node("Conv", ["x", "w", "b"], "c", pads=[1, 1, 1, 1]), *act],
        {"x": (1, 3, 6, 6)},
        list(outputs),
        {**base, **(inits or {})},
        opset=opset,
    )


ACTS = [
    ("Relu", {}, {}),
    ("Tanh", {}, {}),
    ("Sigmoid", {}, {}),
    ("LeakyRelu", {"alpha": 0.3}, {}),
    ("HardSigmoid", {"alpha": 0.2, "beta": 0.5}, {}),
    ("Clip", {}, {"lo": np.float32(-0.5), "hi": np.float32(0.7)}),
]


@pytest.mark.parametrize("act,attrs,consts", ACTS)
def test_ort_fused_conv(act: str, attrs: dict, consts: dict) -> None:
    ins = ["c", *consts]
    m = _conv_act([node(act, ins, "y", **attrs)], consts)
    res, _ = check_pass(
        m,
        P,
        target="ort",
        structure=lambda mm: (
            op_counts(mm) == {"com.microsoft.FusedConv": 1} or pytest.fail(str(op_counts(mm)))
        ),
    )
    fc = res.model.graph.nodes[0]
    assert fc.attrs["activation"] == act and fc.domain == "com.microsoft"


@pytest.mark.parametrize("form", ["no_bias", "clip_min_only", "clip_no_bounds"])
def test_ort_optional_inputs(form: str) -> None:
    """Conv without bias and Clip with fewer bounds are matched by the same rules (Opt inputs)."""
    if form == "no_bias":
        m = build(
            [node("Conv", ["x", "w"], "c"), node("Relu", ["c"], "y")],
            {"x": (1, 3, 6, 6)},
            ["y"],
            {"w": rand(4, 3, 3, 3)},
        )
        want = []
    elif form == "clip_min_only":
        m = _conv_act([node("Clip", ["c", "lo"], "y")], {"lo": np.float32(0.1)})
        want = [0.1, float(np.finfo(np.float32).max)]
    else:
        m = _conv_act([node("Clip", ["c"], "y")])
        want = [float(np.finfo(np.float32).min), float(np.finfo(np.float32).max)]
    res, _ = check_pass(
        m,
        P,
        target="ort",
        structure=lambda mm: (
            op_counts(mm) == {"com.microsoft.FusedConv": 1} or pytest.fail(str(op_counts(mm)))
        ),
    )
    fc = res.model.graph.nodes[0]
    assert list(fc.attrs.get("activation_params", [])) == pytest.approx(want)


def test_ort_silu_becomes_quickgelu() -> None:
    m = _conv_act([node("Sigmoid", ["c"], "s"), node("Mul", ["s", "c"], "y")])
    check_pass(
        m,
        P,
        target="ort",
        structure=lambda mm: (
            op_counts(mm) == {"Conv": 1, "com.microsoft.QuickGelu": 1}
            or pytest.fail(str(op_counts(mm)))
        ),
    )


def test_ort_negative_escaping_and_hardswish_unit() -> None:
    check_pass(
        _conv_act([node("Relu", ["c"], "y")], outputs=("y", "c")),
        P,
        target="ort",
        expect_modified=False,
    )
    # FusedConv's HardSigmoid cannot multiply by the Conv output again
    m = _conv_act(
        [node("HardSigmoid", ["c"], "s", alpha=1 / 6, beta=0.5), node("Mul", ["s", "c"], "y")]
    )
    check_pass(m, P, target="ort", expect_modified=False)


def test_bad_target() -> None:
    """The lowering exists for onnxruntime only; a portable or TVM target is a user error."""
    from graphopt.core.errors import OptionError
    from graphopt.passes import get_pass

    for target in ("tvm", "portable"):
        with pytest.raises(OptionError, match="annotate-fusion-groups"):
            get_pass(P, target=target)
    assert get_pass(P).target == "ort"


@pytest.mark.parametrize("target", ["portable", "ort"])
def test_optimize_pipeline_mobilenet(load_fixture, target: str) -> None:
    res = optimize_model(load_fixture("mobilenet_block.onnx"), target=target)
    c = res.model.op_histogram()
    assert res.verify is not None and res.verify.ok
    assert "BatchNormalization" not in c and "Clip" not in c and "Div" not in c
    if target == "portable":
        assert not any("." in k for k in c), c
        assert not any(k.startswith("graphopt.fusion") for k in res.model.metadata)
    else:
        assert c.get("com.microsoft.FusedConv", 0) >= 1 and c.get("com.microsoft.QuickGelu") == 1


@pytest.mark.real
@pytest.mark.parametrize("name", ["det", "rec", "cls"])
def test_real_models_optimize_and_verify(name: str) -> None:
    from conftest import real_or_skip

    path, shapes = real_or_skip(name)
    m = load(path)
    res = optimize_model(m, input_shapes=shapes, feeds=real_model_feeds(name))
    assert res.verify is not None and res.verify.ok
    assert res.model.num_nodes() < 0.5 * prepare(m.clone(), shapes).num_nodes()
    c = res.model.op_histogram()
    assert "BatchNormalization" not in c and "Clip" not in c, c


def test_explicit_pass_list_gets_the_target(load_fixture) -> None:
    """``--passes ... --target ort``: the targeted pass is built for the target."""
    res = optimize_model(
        load_fixture("cnn.onnx"), passes=["fuse-conv-bn", "fuse-conv-activation"], target="ort"
    )
    assert res.model.op_histogram().get("com.microsoft.FusedConv") == 2
    assert res.verify is not None and res.verify.ok
