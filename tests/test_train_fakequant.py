"""Fake quantization equals onnxruntime's Q/DQ forward; STE and LSQ gradients."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

pytest.importorskip("torch")
import torch  # noqa: E402

torch.set_num_threads(1)  # the machine is shared; OpenMP threads contend under load

from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from test_train_module import ort_run  # noqa: E402

from graphopt.algorithms.train.fakequant import fake_quant, quantize_int  # noqa: E402


def qdq_model(scale: float, zp: int, dtype: type) -> onnx.ModelProto:
    inits = [
        numpy_helper.from_array(np.array(scale, np.float32), "s"),
        numpy_helper.from_array(np.array(zp, dtype), "z"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
    ]
    g = helper.make_graph(
        nodes,
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64])],
        inits,
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


def test_forward_matches_onnxruntime_including_ties() -> None:
    s = 0.05
    for zp, dtype, lo, hi in ((128, np.uint8, 0, 255), (0, np.int8, -128, 127)):
        x = np.concatenate(
            [
                (np.arange(-16, 16) + 0.5) * s,  # exact ties
                np.random.default_rng(0).uniform(-12, 12, 32),
            ]
        ).astype(np.float32)
        ref = ort_run(qdq_model(s, zp, dtype), {"x": x})[0]
        got = fake_quant(torch.from_numpy(x), torch.tensor(s), torch.tensor(zp), lo, hi)
        np.testing.assert_array_equal(got.numpy(), ref)


def test_ste_and_lsq_gradients() -> None:
    x = torch.tensor([-10.0, -0.26, 0.0, 0.31, 0.39, 10.0], requires_grad=True)
    s = torch.tensor(0.1, requires_grad=True)
    y = fake_quant(x, s, torch.tensor(0), -4, 4, lsq=False)
    y.sum().backward()
    # STE: 1 inside the range, 0 where clamped
    assert x.grad is not None and s.grad is not None
    np.testing.assert_array_equal(x.grad.numpy(), [0, 1, 1, 1, 1, 0])
    # LSQ: round(v) - v inside, qmin/qmax where clamped
    v = x.detach() / 0.1
    inside = torch.round(v) - v
    expect = torch.where(
        v < -4, torch.tensor(-4.0), torch.where(v > 4, torch.tensor(4.0), inside)
    ).sum()
    assert abs(float(s.grad) - float(expect)) < 1e-4


def test_per_channel_and_integer_export_agree() -> None:
    w = torch.randn(8, 3, 3, 3)
    s = w.abs().amax(dim=(1, 2, 3)) / 127
    z = torch.zeros(8, dtype=torch.int8)
    fq = fake_quant(w, s, z, -127, 127, axis=0)
    ints = quantize_int(w, s, z, -127, 127, axis=0)
    torch.testing.assert_close(fq, ints.to(torch.float32) * s.reshape(-1, 1, 1, 1))
    assert int(ints.abs().max()) == 127
