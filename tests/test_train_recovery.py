"""The jobs' training options on the digits fixture: ``prune(recover="distill")`` beats
least squares on the fixture labels, ``quantize(qat=True)`` writes the static path's QDQ graph
with better fidelity; the written files are standard ONNX that onnxruntime runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

pytest.importorskip("torch")
import torch  # noqa: E402

torch.set_num_threads(1)  # the machine is shared; OpenMP threads contend under load

from graphopt.algorithms.train.export import ort_run  # noqa: E402
from graphopt.core.verify import sqnr_db  # noqa: E402
from graphopt.fixtures import fixture_path  # noqa: E402
from graphopt.jobs.prune import prune  # noqa: E402
from graphopt.jobs.quantize import quantize  # noqa: E402

MODEL = str(fixture_path("digits_cnn.onnx"))
CALIB = str(fixture_path("digits_calib.npz"))


def accuracy(path: Path) -> float:
    ev = np.load(fixture_path("digits_eval.npz"))
    logits = ort_run(onnx.load(str(path)), {"x": ev["x"]}, level="all")[0]
    return float((logits.argmax(1) == ev["y"]).mean())


def ops(path: Path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def test_distill_beats_least_squares_after_pruning(tmp_path: Path) -> None:
    """40% of the channels pruned (0.26x MACs): least squares 0.93 on the labels, 150 steps of
    distillation on the 96 unlabeled calibration samples 0.95-0.97 (fp32: 0.994)."""
    ls, dist = tmp_path / "ls.onnx", tmp_path / "distill.onnx"
    r_ls = prune(MODEL, 0.4, CALIB, round_to=8, recover="least-squares", output=ls, min_sqnr=0)
    r_d = prune(
        MODEL, 0.4, CALIB, round_to=8, recover="distill", steps=150, output=dist, min_sqnr=0
    )
    assert r_ls.recovery == "least-squares" and r_d.recovery == "distill"
    assert r_d.training is not None and r_d.training.steps == 150
    assert r_d.training.train_samples == 96 and r_d.training.held_out_samples == 32
    assert r_d.training.export_rel_err < 1e-5
    acc_ls, acc_d = accuracy(ls), accuracy(dist)
    assert acc_d >= acc_ls + 0.01, (acc_ls, acc_d)
    # the same pruned graph, other weights; standard ONNX
    onnx.checker.check_model(onnx.load(str(dist)), full_check=True)
    assert ops(dist) == ops(ls)
    assert r_d.macs_ratio == r_ls.macs_ratio
    held = r_d.fidelity[0]
    assert held.sqnr_db > r_ls.fidelity[0].sqnr_db  # judged by the job on the held-out quarter
    assert (
        r_d.to_json()["training"]["final_sqnr_db"] >= r_d.to_json()["training"]["initial_sqnr_db"]
    )


def test_distill_stops_at_the_time_budget() -> None:
    r = prune(MODEL, 0.3, calib=CALIB, recover="distill", steps=100_000, time_budget=0.5)
    assert r.training is not None and r.training.stopped == "time"
    assert r.training.steps < 100_000


def test_distill_trains_on_every_feed_least_squares_on_the_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """More unlabeled feeds than least squares needs: the least-squares start sees the first
    DISTILL_LSQ_FEEDS, distillation all of them; without distillation least squares sees all."""
    import graphopt.passes.prune_channels as pc
    from graphopt.jobs.prune import DISTILL_LSQ_FEEDS

    seen: list[int] = []
    real = pc.recover

    def spy(model: object, work: object, calib: list, *args: object) -> object:
        seen.append(len(calib))
        return real(model, work, calib, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(pc, "recover", spy)
    x = np.concatenate([np.load(CALIB)["x"], np.load(fixture_path("digits_eval.npz"))["x"][:72]])
    feeds = [{"x": x[i : i + 1]} for i in range(len(x))]  # 200 unlabeled samples
    r = prune(MODEL, 0.3, feeds, round_to=8, recover="distill", steps=2, calib_limit=200)
    assert r.training is not None
    assert r.training.train_samples == 150 and r.training.held_out_samples == 50
    assert seen == [DISTILL_LSQ_FEEDS]
    seen.clear()
    prune(MODEL, 0.3, feeds, round_to=8, recover="least-squares", calib_limit=200)
    assert seen == [150]


def test_distill_stops_at_the_target() -> None:
    """A target the least-squares start already meets stops at the first evaluation."""
    r = prune(MODEL, 0.3, calib=CALIB, recover="distill", steps=500, target_sqnr=-100.0)
    assert r.training is not None and r.training.stopped == "target"
    assert r.training.steps == 50


def test_qat_writes_the_static_graph_with_better_fidelity(tmp_path: Path) -> None:
    static, qat = tmp_path / "static.onnx", tmp_path / "qat.onnx"
    quantize(MODEL, CALIB, output=static)
    r_q = quantize(MODEL, CALIB, output=qat, qat=True, steps=60)
    assert r_q.training is not None and r_q.training.method == "qat"
    a, b = onnx.load(str(static)), onnx.load(str(qat))
    assert ops(static) == ops(qat)
    sa = {t.name: (t.data_type, tuple(t.dims)) for t in a.graph.initializer}
    sb = {t.name: (t.data_type, tuple(t.dims)) for t in b.graph.initializer}
    assert sa == sb  # same initializers: names, types (int8 weights, int32 biases), shapes
    onnx.checker.check_model(b, full_check=True)
    ev = np.load(fixture_path("digits_eval.npz"))["x"][:200]
    ref = ort_run(onnx.load(MODEL), {"x": ev})[0]
    s_static = sqnr_db(ref, ort_run(a, {"x": ev}, level="all")[0])
    s_qat = sqnr_db(ref, ort_run(b, {"x": ev}, level="all")[0])
    assert s_qat > s_static + 1.0, (s_static, s_qat)


def test_recipe_prune_step_distills() -> None:
    """A recipe's prune step takes recover = "distill" (and steps); a bad value is refused."""
    from graphopt.core.errors import RecipeError
    from graphopt.core.loader import load
    from graphopt.jobs.recipe import run_recipe

    step = {"kind": "prune", "ratio": 0.3, "round_to": 8, "min_sqnr": 10}
    model = load(fixture_path("digits_cnn.onnx"))
    res = run_recipe(model, {"step": [{**step, "recover": "distill", "steps": 30}]}, calib=CALIB)
    assert res.ok
    with pytest.raises(RecipeError, match="distill"):
        run_recipe(model, {"step": [{**step, "recover": "distil"}]}, calib=CALIB)


def test_adaround_keeps_the_grid_and_lowers_layer_error(tmp_path: Path) -> None:
    """Learned rounding changes only weight integers, each at most one step from nearest, and
    every layer's held-out reconstruction error is at most nearest's (a layer where learned
    rounding does worse keeps nearest; short run: 80 steps)."""
    static, ada = tmp_path / "static.onnx", tmp_path / "ada.onnx"
    quantize(MODEL, CALIB, output=static)
    r = quantize(MODEL, CALIB, output=ada, rounding="adaround", rounding_iters=80)
    assert r.rounding is not None and r.rounding.layers == 4
    assert all(b <= a for _, a, b, _ in r.rounding.per_layer), r.rounding.per_layer
    assert any(b < a for _, a, b, _ in r.rounding.per_layer), r.rounding.per_layer
    a, b = onnx.load(str(static)), onnx.load(str(ada))
    assert ops(static) == ops(ada)
    changed = 0
    for x, y in zip(a.graph.initializer, b.graph.initializer):
        u, v = onnx.numpy_helper.to_array(x), onnx.numpy_helper.to_array(y)
        assert x.name == y.name and u.dtype == v.dtype and u.shape == v.shape
        if u.dtype == np.int8:
            assert np.abs(u.astype(int) - v.astype(int)).max() <= 1
            changed += int((u != v).sum())
        elif u.dtype == np.float32:
            np.testing.assert_array_equal(u, v)  # scales stay the static path's
    assert changed > 0
    onnx.checker.check_model(b, full_check=True)


def test_qat_and_adaround_are_exclusive() -> None:
    from graphopt.core.errors import OptionError

    with pytest.raises(OptionError, match="not both"):
        quantize(MODEL, CALIB, qat=True, rounding="adaround")


def _conv_net(dense: bool, seed: int = 0) -> onnx.ModelProto:
    """Conv 3x3 -> Relu -> Conv 3x3 -> Sigmoid on a declared 1x3x64x64 input: a dense map of
    the input's size (``dense``), or its global average (a vector, like a classifier)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(0, 0.3, (2, 8, 3, 3)).astype(np.float32), "w2")
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["c2"], ["m" if dense else "s"]),
    ]
    out_shape = [1, 2, 64, 64]
    if not dense:
        nodes += [
            helper.make_node("GlobalAveragePool", ["s"], ["g"]),
            helper.make_node("Flatten", ["g"], ["m"]),
        ]
        out_shape = [1, 2]
    g = helper.make_graph(
        nodes,
        "conv_net",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 64, 64])],
        [helper.make_tensor_value_info("m", TensorProto.FLOAT, out_shape)],
        [w1, w2],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


def test_crop_size_keeps_the_strides_the_input_has() -> None:
    from graphopt.algorithms.train.recover import crop_size

    assert crop_size(320) == 160 and crop_size(64) == 32 and crop_size(96) == 32
    assert crop_size(8) == 8  # too small to halve on its stride: no crop
    assert crop_size(321) == 160  # odd: any size


def test_dense_maps_train_on_crops_classifiers_do_not() -> None:
    """Only a model whose outputs are maps that shrink with the input trains on crops; its
    declared fixed shape does not stop it (shapes fixed with --input-shape)."""
    from graphopt.algorithms.train import OnnxModule
    from graphopt.algorithms.train.recover import crop_inputs, dense_on_crops

    feed = {"x": np.random.default_rng(0).normal(size=(1, 3, 64, 64)).astype(np.float32)}
    dense, vec = OnnxModule(_conv_net(True)), OnnxModule(_conv_net(False))
    assert crop_inputs(dense) == ["x"]
    assert dense_on_crops(dense, dense, ["x"], feed)
    assert not dense_on_crops(vec, vec, ["x"], feed)
    digits = OnnxModule(onnx.load(MODEL))  # 8x8: no smaller crop keeps its stride
    assert not dense_on_crops(digits, digits, ["x"], {"x": np.zeros((1, 1, 8, 8), np.float32)})


def test_distill_trains_a_dense_model_on_crops() -> None:
    """Asked to (crop=True), a damaged fully convolutional student trains on random 32x32
    crops (the report names the cropped input), gains on the full-size held-out maps, and
    exports exactly; by default it trains on the full inputs."""
    from graphopt.algorithms.train.recover import distill_model
    from graphopt.core.model import Model

    rng = np.random.default_rng(1)
    teacher = _conv_net(True)
    student = _conv_net(True)
    for t in student.graph.initializer:
        a = onnx.numpy_helper.to_array(t)
        a = a + 0.2 * a.std() * rng.normal(size=a.shape).astype(np.float32)
        t.CopyFrom(onnx.numpy_helper.from_array(a.astype(np.float32), t.name))
    x = rng.normal(size=(24, 3, 64, 64)).astype(np.float32)
    feeds = [{"x": x[i : i + 1]} for i in range(24)]
    out, rep = distill_model(
        Model.from_onnx(student),
        Model.from_onnx(teacher),
        feeds[:16],
        feeds[16:],
        steps=60,
        lr=3e-3,
        batch_size=4,
        eval_every=20,
        crop=True,
    )
    assert rep.crop_inputs == ["x"]
    assert rep.final_sqnr_db is not None and rep.initial_sqnr_db is not None
    assert rep.final_sqnr_db > rep.initial_sqnr_db + 3
    assert rep.export_rel_err < 1e-5
    _, rep_full = distill_model(
        Model.from_onnx(student),
        Model.from_onnx(teacher),
        feeds[:16],
        feeds[16:],
        steps=2,
    )
    assert rep_full.crop_inputs == []  # not by default


def test_weights_in_constant_nodes_count_for_the_thread_choice() -> None:
    """A model whose weights are Constant nodes (PP-OCR's exports) is as big as its weights:
    over SMALL_MODEL_BYTES it keeps torch's threads (it was pinned to one: 0 bytes read)."""
    from onnx import TensorProto, helper, numpy_helper

    from graphopt.algorithms.train.recover import SMALL_MODEL_BYTES, _threads, weight_bytes
    from graphopt.core.model import Model

    n = SMALL_MODEL_BYTES // 4 // 64 + 1
    w = numpy_helper.from_array(np.zeros((n, 64), np.float32), "w")
    g = helper.make_graph(
        [
            helper.make_node("Constant", [], ["w"], value=w),
            helper.make_node("MatMul", ["x", "w"], ["y"]),
        ],
        "const_weights",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
    )
    m = Model.from_onnx(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]))
    assert weight_bytes(m) == n * 64 * 4 > SMALL_MODEL_BYTES
    import graphopt.algorithms.train.recover as rec

    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(rec, "busy", lambda: False)
            _threads(None, m)
            assert torch.get_num_threads() == 2
            mp.setattr(rec, "busy", lambda: True)  # other work on most cores: one thread
            _threads(None, m)
            assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        _threads(None, Model.from_onnx(onnx.load(MODEL)))  # the digits CNN: small, one thread
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(old)


def test_sigmoid_maps_distill_on_their_logits() -> None:
    """A map output under a Sigmoid in both graphs is compared on the Sigmoid's input with the
    Bernoulli KL (zero at a match; a confidently wrong pixel keeps a full gradient, where the
    MSE of the probabilities vanishes); by default (``sigmoid_kl=False``) the map's MSE."""
    from graphopt.algorithms.train import OnnxModule
    from graphopt.algorithms.train.distill import DistillConfig, distill, output_loss

    cfg = DistillConfig()
    t = torch.tensor([8.0, -8.0, 0.5])
    assert float(output_loss(t.clone(), t, "bernoulli", cfg)) == pytest.approx(0.0, abs=1e-6)
    s = torch.tensor([-8.0, -8.0, 0.5], requires_grad=True)
    output_loss(s, t, "bernoulli", cfg).backward()
    assert s.grad is not None and float(s.grad[0]) == pytest.approx(-1 / 3, rel=1e-3)
    s2 = torch.tensor([-8.0, -8.0, 0.5], requires_grad=True)
    output_loss(torch.sigmoid(s2), torch.sigmoid(t), "map", cfg).backward()
    assert s2.grad is not None and abs(float(s2.grad[0])) < 1e-2  # saturated: no gradient

    feed = [{"x": np.random.default_rng(0).normal(size=(1, 3, 64, 64)).astype(np.float32)}]
    proto = _conv_net(True)
    cfg_kl = DistillConfig(steps=1, sigmoid_kl=True)
    res = distill(OnnxModule(proto), OnnxModule(proto), feed, [], cfg_kl)
    assert res.loss_kinds == {"c2": "bernoulli"}
    res = distill(OnnxModule(proto), OnnxModule(proto), feed, [], DistillConfig(steps=1))
    assert res.loss_kinds == {"m": "map"}  # the default
