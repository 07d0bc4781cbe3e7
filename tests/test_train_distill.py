"""Distillation reduces the student's held-out loss and exports into the same graph."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

pytest.importorskip("torch")
import torch  # noqa: E402

torch.set_num_threads(1)  # the machine is shared; OpenMP threads contend under load

from graphopt.algorithms.train import OnnxModule, same_structure, verify_export, write_back  # noqa: E402
from graphopt.algorithms.train.distill import DistillConfig, distill, output_kind  # noqa: E402
from graphopt.fixtures import FIXTURES_DIR  # noqa: E402


def test_output_kinds() -> None:
    assert output_kind(torch.randn(4, 10)) == "logits"
    assert output_kind(torch.softmax(torch.randn(2, 5, 7), -1)) == "probs"
    assert output_kind(torch.rand(1, 1, 8, 8)) == "map"


def test_distill_recovers_a_damaged_student() -> None:
    proto = onnx.load(str(FIXTURES_DIR / "digits_cnn.onnx"))
    calib = np.load(FIXTURES_DIR / "digits_calib.npz")["x"]
    teacher = OnnxModule(proto)
    student = OnnxModule(proto)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in student.named_onnx_parameters():
            p.add_(0.3 * p.std() * torch.randn(p.shape, generator=g))
    train = [{"x": calib[i : i + 1]} for i in range(96)]
    held = [{"x": calib[i : i + 1]} for i in range(96, 128)]

    def agree(s: dict, t: dict) -> float:
        return float((s["logits"].argmax(1) == t["logits"].argmax(1)).float().mean())

    res = distill(
        student,
        teacher,
        train,
        held,
        DistillConfig(steps=150, lr=3e-3, eval_every=25),
        metric=agree,
    )
    assert res.best_loss is not None and res.initial_loss is not None
    assert res.best_loss < 0.5 * res.initial_loss
    assert res.best_metric is not None and res.initial_metric is not None
    assert res.best_metric >= res.initial_metric
    out = write_back(student, proto)
    assert same_structure(proto, out) == []
    verify_export(student, out, [{"x": calib[:16]}], rtol=1e-5)


def test_time_budget_stops_early() -> None:
    proto = onnx.load(str(FIXTURES_DIR / "digits_cnn.onnx"))
    calib = np.load(FIXTURES_DIR / "digits_calib.npz")["x"]
    res = distill(
        OnnxModule(proto),
        OnnxModule(proto),
        [{"x": calib[:32]}],
        [],
        DistillConfig(steps=10_000, time_budget_s=0.5),
    )
    assert res.stopped == "time" and res.steps < 10_000


@pytest.mark.parametrize("target", [0.5])
def test_target_stops_early(target: float) -> None:
    """A student already at the target stops at the first evaluation."""
    proto = onnx.load(str(FIXTURES_DIR / "digits_cnn.onnx"))
    calib = np.load(FIXTURES_DIR / "digits_calib.npz")["x"]
    res = distill(
        OnnxModule(proto),
        OnnxModule(proto),
        [{"x": calib[:32]}],
        [{"x": calib[32:48]}],
        DistillConfig(steps=500, eval_every=5, target=target),
        metric=lambda s, t: 1.0,
    )
    assert res.stopped == "target" and res.steps == 5
