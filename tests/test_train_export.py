"""Trained tensors go back into the same graph, by name, and the result runs as trained."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

pytest.importorskip("torch")
import torch  # noqa: E402

torch.set_num_threads(1)  # the machine is shared; OpenMP threads contend under load

from test_train_module import conv_model, random_feeds  # noqa: E402

from graphopt.algorithms.train import (  # noqa: E402
    OnnxModule,
    replace_tensors,
    same_structure,
    verify_export,
    write_back,
)
from graphopt.fixtures import FIXTURES_DIR  # noqa: E402


def perturb(m: OnnxModule, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in m.named_onnx_parameters():
            p.mul_(1 + 0.05 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("constant_nodes", [False, True])
def test_write_back_same_graph_new_values(constant_nodes: bool) -> None:
    proto = conv_model(constant_nodes)
    m = OnnxModule(proto)
    perturb(m)
    out = write_back(m, proto)
    assert same_structure(proto, out) == []
    onnx.checker.check_model(out, full_check=True)
    err = verify_export(m, out, [random_feeds(proto, s) for s in range(2)], rtol=1e-5)
    assert max(err.values()) < 1e-5
    before = OnnxModule(proto).run(random_feeds(proto))["y"]
    after = OnnxModule(out).run(random_feeds(proto))["y"]
    assert not torch.allclose(before, after)  # the values did change


def test_untrained_write_back_is_byte_identical() -> None:
    """Negative case: nothing trained, nothing changes."""
    proto = onnx.load(str(FIXTURES_DIR / "digits_cnn.onnx"))
    out = write_back(OnnxModule(proto), proto)
    for a, b in zip(proto.graph.initializer, out.graph.initializer):
        assert np.array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b))
        assert onnx.numpy_helper.to_array(a).dtype == onnx.numpy_helper.to_array(b).dtype
    assert same_structure(proto, out) == []


def test_replace_tensors_refuses_bad_input() -> None:
    proto = conv_model()
    with pytest.raises(ValueError, match="shape"):
        replace_tensors(proto, {"w1": np.zeros((2, 2), np.float32)})
    with pytest.raises(KeyError):
        replace_tensors(proto, {"not_there": np.zeros(1, np.float32)})
    scalar = replace_tensors(conv_model(), {"b1": np.ones(8, np.float32)})
    assert tuple(next(t for t in scalar.graph.initializer if t.name == "b1").dims) == (8,)


def test_same_structure_sees_a_changed_graph() -> None:
    a, b = conv_model(), conv_model()
    b.graph.node[2].op_type = "Sigmoid"
    assert same_structure(a, b)
