"""from_torch: a small Conv+BN+ReLU+Linear module exports, matches torch's output in onnxruntime,
and optimizes (Conv+BN folded) with outputs still equal."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import numpy as np
import pytest

from graphopt.core.errors import GraphoptError
from graphopt.core.session import run_model
from graphopt.jobs.optimize import optimize_model

if TYPE_CHECKING:
    import torch
else:
    torch = pytest.importorskip("torch", reason="torch is an optional extra")


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv(x)))
        return self.fc(torch.flatten(y, 1))


def _net() -> Net:
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():  # non-trivial BN statistics so that folding matters
        assert net.bn.running_mean is not None and net.bn.running_var is not None
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
        net.bn.weight.uniform_(0.5, 1.5)
    return net


def test_from_torch_matches_torch_and_optimizes() -> None:
    from graphopt.core import torch_export

    net = _net().train()
    x = torch.randn(2, 3, 8, 8)
    model = torch_export.from_torch(
        net,
        x,
        input_names=["x"],
        output_names=["logits"],
        dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
    )
    assert net.training  # mode restored
    assert [t.name for t in model.graph.inputs] == ["x"]
    assert [t.name for t in model.graph.outputs] == ["logits"]
    ops = model.op_histogram()
    assert ops.get("Conv") == 1 and ops.get("Gemm", 0) + ops.get("MatMul", 0) >= 1
    net.eval()
    with torch.no_grad():
        ref = net(x).numpy()
    got = run_model(model, {"x": x.numpy()})["logits"]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    res = optimize_model(model, input_shapes={"x": (2, 3, 8, 8)})
    assert res.verify is not None and res.verify.ok
    assert "BatchNormalization" not in res.model.op_histogram()  # folded by torch or by us
    assert res.model.num_nodes() <= model.num_nodes()
    out = run_model(res.model, {"x": x.numpy()})["logits"]
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_from_torch_default_names_and_tuple_inputs() -> None:
    from graphopt.core.torch_export import from_torch

    class Two(torch.nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return a * b + a

    a, b = torch.randn(3), torch.randn(3)
    model = from_torch(Two(), (a, b))
    assert [t.name for t in model.graph.inputs] == ["input_0", "input_1"]
    out = list(run_model(model, {"input_0": a.numpy(), "input_1": b.numpy()}).values())[0]
    np.testing.assert_allclose(out, (a * b + a).numpy(), rtol=1e-6)


def test_from_torch_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    from graphopt.core.torch_export import from_torch

    with pytest.raises(GraphoptError, match="nn.Module"):
        from_torch(lambda x: x, torch.randn(1))
    with pytest.raises(GraphoptError, match="input_names"):
        from_torch(_net(), torch.randn(1, 3, 8, 8), input_names=["a", "b"])
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    with pytest.raises(GraphoptError, match="needs PyTorch"):
        from_torch(object(), None)
