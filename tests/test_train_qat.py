"""QAT on graphopt's static QDQ output: exact before training, same graph after."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

pytest.importorskip("torch")
import torch  # noqa: E402

torch.set_num_threads(1)  # the machine is shared; OpenMP threads contend under load

from graphopt.algorithms.train import OnnxModule, same_structure, verify_export  # noqa: E402
from graphopt.algorithms.train.distill import DistillConfig, distill  # noqa: E402
from graphopt.algorithms.train.export import ort_run  # noqa: E402
from graphopt.algorithms.train.qat import QatModule, export_qdq, prepare_qat  # noqa: E402
from graphopt.fixtures import FIXTURES_DIR  # noqa: E402
from graphopt.jobs.quantize import quantize  # noqa: E402


@pytest.fixture(scope="module")
def static(request: pytest.FixtureRequest) -> tuple[onnx.ModelProto, onnx.ModelProto, np.ndarray]:
    calib = np.load(FIXTURES_DIR / "digits_calib.npz")["x"]
    res = quantize(
        str(FIXTURES_DIR / "digits_cnn.onnx"),
        [{"x": calib[i : i + 1]} for i in range(64)],
        input_shapes={"x": (1, 1, 8, 8)},
    )
    return res.model.to_onnx(), res.float_model.to_onnx(), calib


def test_prepare_rewrites_every_pair(static: tuple) -> None:
    qdq, fmodel, _ = static
    proto, qmap = prepare_qat(qdq, fmodel)
    ops = [n.op_type for n in proto.graph.node]
    assert "QuantizeLinear" not in ops and "DequantizeLinear" not in ops
    assert ops.count("FakeQuant") == len(qmap.act_scales) > 0
    assert ops.count("FakeQuantWeight") == len(qmap.weights) == 4
    assert ops.count("FakeQuantBias") == len(qmap.biases) == 4
    assert all(b.act_scale and b.weight_scale for b in qmap.biases.values())
    assert all(w.qmin == -w.qmax for w in qmap.weights.values())


def test_untrained_module_is_the_static_graph(static: tuple) -> None:
    qdq, fmodel, calib = static
    m = QatModule(qdq, fmodel).eval()
    for i in range(8):
        ref = ort_run(qdq, {"x": calib[i : i + 1]})[0]
        with torch.no_grad():
            out = m(torch.from_numpy(calib[i : i + 1])).numpy()
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    # exporting without training gives back the static initializers exactly
    out = export_qdq(m)
    assert same_structure(qdq, out) == []
    for a, b in zip(qdq.graph.initializer, out.graph.initializer):
        x, y = onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b)
        assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), a.name


def test_trained_export_runs_as_trained(static: tuple) -> None:
    qdq, fmodel, calib = static
    student = QatModule(qdq, fmodel)
    scales0 = {n: student.tensor(n).detach().clone() for n in student.scale_names()}
    teacher = OnnxModule(fmodel)
    train = [{"x": calib[i : i + 1]} for i in range(48)]
    held = [{"x": calib[i : i + 1]} for i in range(48, 64)]
    res = distill(
        student,
        teacher,
        train,
        held,
        DistillConfig(steps=100, eval_every=20),
        params=student.param_groups(1e-4),
    )
    assert res.best_loss is not None and res.initial_loss is not None
    assert res.best_loss < res.initial_loss
    assert any(not torch.equal(student.tensor(n), v) for n, v in scales0.items())  # LSQ
    out = export_qdq(student)
    assert same_structure(qdq, out) == []
    onnx.checker.check_model(out, full_check=True)
    err = verify_export(student, out, [{"x": calib[i : i + 1]} for i in range(64, 72)], rtol=1e-4)
    assert max(err.values()) < 1e-4
    # int8 weights and int32 biases stay integers in range
    for w in student.qmap.weights.values():
        q = onnx.numpy_helper.to_array(
            next(t for t in out.graph.initializer if t.name == w.int_name)
        )
        assert q.dtype == np.int8 and np.abs(q.astype(int)).max() <= w.qmax
