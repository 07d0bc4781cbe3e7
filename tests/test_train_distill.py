"""Distillation reduces the student's held-out loss and exports into the same graph."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

pytest.importorskip("torch")
import torch  # noqa: E402

torch.set_num_threads(1)  # the machine is shared; OpenMP threads contend under load

from graphopt.algorithms.train import OnnxModule, same_structure, verify_export, write_back  # noqa: E402
from graphopt.algorithms.train.distill import (  # noqa: E402
    DistillConfig,
    distill,
    feature_loss,
    lr_factor,
    matched_channels,
    output_kind,
    schedule_step,
    shared_features,
)
from graphopt.fixtures import FIXTURES_DIR  # noqa: E402


def test_output_kinds() -> None:
    assert output_kind(torch.randn(4, 10)) == "logits"
    assert output_kind(torch.softmax(torch.randn(2, 5, 7), -1)) == "probs"
    assert output_kind(torch.rand(1, 1, 8, 8)) == "map"


def test_lr_schedule_warms_up_then_decays() -> None:
    """Linear warmup over 5% of the steps, then cosine to 0; no warmup starts at the full rate."""
    f = [lr_factor(i, 100, 0.05) for i in range(101)]
    assert f[0] == pytest.approx(0.2) and f[4] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(f[:4], f[1:5]))  # rising
    assert f[5] == pytest.approx(1.0) and f[100] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(f[5:], f[6:]))  # then never rising
    assert f[52] == pytest.approx(0.5 * (1 + np.cos(np.pi * 47 / 95)))
    assert lr_factor(0, 100, 0.0) == 1.0 and lr_factor(50, 100, 0.0) == pytest.approx(0.5)
    assert lr_factor(0, 1, 0.05) == 1.0  # too few steps for a warmup


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


def test_schedule_follows_the_time_budget() -> None:
    """With a wall-clock budget the schedule runs on whichever budget is further along."""
    assert schedule_step(10, 100, 5.0, None) == 10
    assert schedule_step(10, 10_000, 5.0, 10.0) == 5_000
    assert schedule_step(9_000, 10_000, 5.0, 10.0) == 9_000  # the steps are further along
    assert schedule_step(10, 10_000, 12.0, 10.0) == 10_000  # never past the end


def test_time_budget_run_decays_its_learning_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    """A run stopped by the clock long before its step budget ends near a zero learning rate
    (it ended at the full rate: the cosine followed the 10,000 steps it never reached). The
    clock is simulated (every reading 10 ms later), so the machine's load cannot change it."""
    import types

    import graphopt.algorithms.train.distill as distill_mod

    clock = iter(range(10**9))
    fake = types.SimpleNamespace(perf_counter=lambda: next(clock) * 0.01)
    monkeypatch.setattr(distill_mod, "time", fake)
    proto = onnx.load(str(FIXTURES_DIR / "digits_cnn.onnx"))
    calib = np.load(FIXTURES_DIR / "digits_calib.npz")["x"]
    res = distill(
        OnnxModule(proto),
        OnnxModule(proto),
        [{"x": calib[:32]}],
        [],
        DistillConfig(steps=10_000, time_budget_s=0.5, warmup=0.0),
    )
    assert res.stopped == "time" and 5 <= res.steps < 10_000
    assert res.final_lr_factor < 0.25


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


def test_matched_channels_finds_the_kept_channels() -> None:
    g = torch.Generator().manual_seed(0)
    t = torch.randn(4, 12, 5, 5, generator=g)
    kept = [7, 0, 3, 11, 5]
    s = 2.0 * t[:, kept] + 0.5 + 0.05 * torch.randn(4, 5, 5, 5, generator=g)
    assert matched_channels(t, s) == kept
    # negative cases: an unrelated channel, a teacher channel taken twice, other positions
    other = torch.cat([s[:, :4], torch.randn(4, 1, 5, 5, generator=g)], 1)
    assert matched_channels(t, other) is None
    assert matched_channels(t, t[:, [1, 1, 2]]) is None
    assert matched_channels(t, s[:, :, :4]) is None
    assert matched_channels(t[:, :3], s) is None  # more student channels than teacher ones


def test_feature_distillation_on_a_pruned_student() -> None:
    """The pruned digits CNN (least squares, 30%): its three Relu outputs pair with the original's
    kept channels; distillation with the feature term lowers their error and exports into the
    same graph, which onnxruntime (ORT_DISABLE_ALL) runs as the module does."""
    from graphopt.jobs.prune import prune

    calib = np.load(FIXTURES_DIR / "digits_calib.npz")["x"]
    r = prune(
        str(FIXTURES_DIR / "digits_cnn.onnx"),
        0.3,
        [{"x": calib}],
        round_to=8,
        recover="least-squares",
        min_sqnr=0,
        measure=False,
    )
    proto = r.model.to_onnx()
    student, teacher = OnnxModule(proto), OnnxModule(r.kept_original().to_onnx())
    pairs = dict(shared_features(teacher, student, [{"x": torch.from_numpy(calib[:16])}]))
    assert set(pairs) == {"relu1_out", "relu2_out", "relu3_out"}
    assert [len(c or []) for c in pairs.values()] == [8, 24, 24]
    assert pairs["relu1_out"] == sorted(pairs["relu1_out"] or [])  # first layer: kept in order
    seen = {"x": torch.from_numpy(calib[:96])}
    train = [{"x": calib[i : i + 1]} for i in range(96)]

    def feature_error(m: OnnxModule) -> float:
        with torch.no_grad():
            t, s = teacher.run(seen, list(pairs)), m.run(seen, list(pairs))
        return sum(float(feature_loss(s[n], t[n], torch.tensor(c))) for n, c in pairs.items())

    before = feature_error(student)
    plain = OnnxModule(proto)
    for m, weight in ((student, 1.0), (plain, 0.0)):
        cfg = DistillConfig(steps=60, lr=1e-3, feature_weight=weight)
        assert distill(m, teacher, train, [], cfg).steps == 60
    # the feature term pulls the pruned features towards the teacher's kept channels
    assert feature_error(student) < min(before, feature_error(plain))
    out = write_back(student, proto)
    assert same_structure(proto, out) == []
    verify_export(student, out, [{"x": calib[:16]}], rtol=1e-5)
    # unpruned tensors pair as they are (no channel map)
    same = shared_features(teacher, teacher, [{"x": torch.from_numpy(calib[:4])}])
    assert len(same) == 3 and all(ch is None for _, ch in same)
