"""OnnxModule reproduces onnxruntime (ORT_DISABLE_ALL) and trains the right tensors."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

pytest.importorskip("torch")
import torch  # noqa: E402

torch.set_num_threads(1)  # the machine is shared; OpenMP threads contend under load

from graphopt.algorithms.train import OnnxModule  # noqa: E402
from graphopt.algorithms.train.export import max_rel_err, ort_run  # noqa: E402
from graphopt.algorithms.train.ops import UnsupportedOp  # noqa: E402
from graphopt.fixtures import FIXTURES_DIR  # noqa: E402

__all__ = ["conv_model", "random_feeds", "with_outputs"]


def random_feeds(proto: onnx.ModelProto, seed: int = 0, batch: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    inits = {t.name for t in proto.graph.initializer}
    out = {}
    for i in proto.graph.input:
        if i.name in inits:
            continue
        dims = [
            d.dim_value if d.HasField("dim_value") else batch for d in i.type.tensor_type.shape.dim
        ]
        out[i.name] = rng.standard_normal(dims).astype(np.float32)
    return out


def with_outputs(proto: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    p = onnx.ModelProto()
    p.CopyFrom(proto)
    for n in names:
        p.graph.output.append(onnx.ValueInfoProto(name=n))
    return p


def conv_model(weights_as_constant_nodes: bool = False, seed: int = 0) -> onnx.ModelProto:
    """x[1,4,8,8] -> Conv(8, 3x3, pad 1) -> BN -> Relu -> Conv(4, 1x1) -> y (opset 13)."""
    rng = np.random.default_rng(seed)
    vals: Mapping[str, np.ndarray] = {
        "w1": rng.standard_normal((8, 4, 3, 3)).astype(np.float32) * 0.3,
        "b1": rng.standard_normal(8).astype(np.float32) * 0.1,
        "g": rng.uniform(0.5, 1.5, 8).astype(np.float32),
        "beta": rng.standard_normal(8).astype(np.float32) * 0.1,
        "mean": rng.standard_normal(8).astype(np.float32) * 0.1,
        "var": rng.uniform(0.5, 1.5, 8).astype(np.float32),
        "w2": rng.standard_normal((4, 8, 1, 1)).astype(np.float32) * 0.3,
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1] * 4),
        helper.make_node(
            "BatchNormalization", ["c1", "g", "beta", "mean", "var"], ["bn"], name="bn"
        ),
        helper.make_node("Relu", ["bn"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2"),
    ]
    inits = []
    if weights_as_constant_nodes:
        nodes = [
            helper.make_node(
                "Constant", [], [k], name=f"const_{k}", value=numpy_helper.from_array(v, k)
            )
            for k, v in vals.items()
        ] + nodes
    else:
        inits = [numpy_helper.from_array(v, k) for k, v in vals.items()]
    g = helper.make_graph(
        nodes,
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        inits,
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


FIXTURE_NAMES = [
    "cnn",
    "digits_cnn",
    "external_data",
    "if_model",
    "mobilenet_block",
    "residual",
    "transformer_block",
]


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixtures_match_onnxruntime(name: str) -> None:
    proto = onnx.load(str(FIXTURES_DIR / f"{name}.onnx"))
    m = OnnxModule(proto).eval()
    for seed in (0, 1):
        f = random_feeds(proto, seed)
        ref = ort_run(proto, f)
        with torch.no_grad():
            out = m.run(f)
        for o, r in zip(m.output_names, ref):
            assert max_rel_err(r, out[o].numpy()) < 1e-5, (name, o)


def test_trainable_selection() -> None:
    m = OnnxModule(conv_model())
    assert set(m.trainable_names) == {"w1", "b1", "g", "beta", "w2"}
    assert not {"mean", "var"} & set(m.trainable_names)  # BN statistics are buffers
    assert OnnxModule(conv_model(), trainable="none").trainable_names == []
    assert OnnxModule(conv_model(), trainable=["w2"]).trainable_names == ["w2"]
    assert set(OnnxModule(conv_model(), trainable=lambda n: n.startswith("w")).trainable_names) == {
        "w1",
        "w2",
    }
    with pytest.raises(KeyError):
        OnnxModule(conv_model(), trainable=["nope"])


def test_constant_node_weights_train_and_match() -> None:
    """Paddle exports keep weights in Constant nodes: they must train like initializers."""
    a, b = conv_model(False), conv_model(True)
    ma, mb = OnnxModule(a), OnnxModule(b)
    assert ma.trainable_names == mb.trainable_names
    assert {s.kind for s in mb.sources.values()} == {"constant_node"}
    f = random_feeds(b)
    with torch.no_grad():
        np.testing.assert_allclose(mb.run(f)["y"].numpy(), ort_run(b, f)[0], rtol=1e-5, atol=1e-5)


def test_gradients_reach_every_parameter() -> None:
    m = OnnxModule(onnx.load(str(FIXTURES_DIR / "digits_cnn.onnx")))
    x = torch.from_numpy(random_feeds(onnx.load(str(FIXTURES_DIR / "digits_cnn.onnx")))["x"])
    m(x).square().mean().backward()
    for name, p in m.named_onnx_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_intermediate_outputs_match() -> None:
    proto = onnx.load(str(FIXTURES_DIR / "mobilenet_block.onnx"))
    m = OnnxModule(proto, fuse=False)
    names = [o for s in m.steps for o in s.outputs][:-1]
    f = random_feeds(proto)
    ref = dict(
        zip(
            [o.name for o in with_outputs(proto, names).graph.output],
            ort_run(with_outputs(proto, names), f),
        )
    )
    with torch.no_grad():
        got = m.run(f, names)
    for n in names:
        assert max_rel_err(ref[n], got[n].numpy()) < 1e-5, n


def test_fused_hardswish_is_exact_and_guards_intermediates() -> None:
    proto = onnx.load(str(FIXTURES_DIR / "mobilenet_block.onnx"))
    fused, plain = OnnxModule(proto), OnnxModule(proto, fuse=False)
    assert sum(s.op == "HardSwish(fused)" for s in fused.steps) == 2
    assert not any(s.op == "HardSwish(fused)" for s in plain.steps)
    f = random_feeds(proto)
    with torch.no_grad():
        a, b = fused.run(f), plain.run(f)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="fused"):
        fused.run(f, [next(iter(fused.fused_away))])


def test_no_fusion_where_an_intermediate_escapes() -> None:
    """Negative case: the Clip output is also a graph output, so the chain must stay."""
    from onnx import TensorProto, helper, numpy_helper

    c = {
        k: numpy_helper.from_array(np.array(v, np.float32), k)
        for k, v in {"three": 3.0, "zero": 0.0, "six": 6.0}.items()
    }
    nodes = [
        helper.make_node("Add", ["x", "three"], ["a"]),
        helper.make_node("Clip", ["a", "zero", "six"], ["c"]),
        helper.make_node("Mul", ["x", "c"], ["m"]),
        helper.make_node("Div", ["m", "six"], ["y"]),
    ]
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [4]) for n in ("x", "y", "c")]
    g = helper.make_graph(nodes, "hs", [vi[0]], [vi[1], vi[2]], list(c.values()))
    m = OnnxModule(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]))
    assert not m.fused_away and len(m.steps) == 4


def test_unsupported_op_is_named() -> None:
    from onnx import TensorProto, helper

    g = helper.make_graph(
        [helper.make_node("NonMaxSuppression", ["x", "s"], ["y"])],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4]),
            helper.make_tensor_value_info("s", TensorProto.FLOAT, [1, 1, 1]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.INT64, [1, 3])],
    )
    with pytest.raises(UnsupportedOp, match="NonMaxSuppression"):
        OnnxModule(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]))


REAL_SHAPES = {"det": (1, 3, 160, 224), "rec": (2, 3, 48, 160), "cls": (2, 3, 48, 192)}


@pytest.mark.real
@pytest.mark.parametrize("name", list(REAL_SHAPES))
def test_ppocr_models_match_onnxruntime(name: str) -> None:
    from conftest import real_or_skip

    path = real_or_skip(name)[0]
    proto = onnx.load(str(path))
    m = OnnxModule(proto).eval()
    x = np.random.default_rng(0).uniform(-1, 1, REAL_SHAPES[name]).astype(np.float32)
    ref = ort_run(proto, {"x": x})[0]
    with torch.no_grad():
        out = m(torch.from_numpy(x)).numpy()
    # float32 accumulation order differs (MLAS vs oneDNN): ~1e-6 of the range before the
    # final Sigmoid/Softmax
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=5e-4)
