"""Calibration readers: formats, batching, different widths, and clear errors on bad data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from graphopt.core.errors import CalibrationError
from graphopt.core.feeds import input_specs, open_calibration
from graphopt.core.model import Model
from graphopt.core.saver import save


def dynamic_width_model() -> Model:
    """x [N, 3, 8, W] -> Conv 3x3 -> Relu -> GlobalAveragePool -> y [N, 4, 1, 1]."""
    rng = np.random.default_rng(0)
    w = helper.make_tensor(
        "w",
        TensorProto.FLOAT,
        [4, 3, 3, 3],
        rng.standard_normal((4, 3, 3, 3)).astype(np.float32).ravel(),
    )
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["y"], name="gap"),
    ]
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 1, 1])],
        [w],
    )
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(proto)
    return Model.from_onnx(proto)


def _collect(reader) -> list[dict[str, np.ndarray]]:  # noqa: ANN001
    return list(reader)


def test_npz_batches(tmp_path: Path) -> None:
    m = dynamic_width_model()
    x = np.random.default_rng(0).standard_normal((19, 3, 8, 16)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    r = open_calibration(tmp_path / "c.npz", m, batch_size=8)
    assert r.num_samples() == 19
    batches = _collect(r)
    assert [b["x"].shape[0] for b in batches] == [8, 8, 3]
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]), x)
    assert sum(b["x"].shape[0] for b in open_calibration(tmp_path / "c.npz", m, limit=5)) == 5


def test_folder_of_npz_with_different_widths(tmp_path: Path) -> None:
    m = dynamic_width_model()
    rng = np.random.default_rng(1)
    widths = [16, 16, 24, 40, 40, 40]
    for k, w in enumerate(widths):
        np.savez(tmp_path / f"s{k:02d}.npz", x=rng.standard_normal((1, 3, 8, w)).astype(np.float32))
    batches = _collect(open_calibration(tmp_path, m, batch_size=2))
    for b in batches:  # a batch never mixes widths
        assert b["x"].ndim == 4
    assert [b["x"].shape for b in batches] == [
        (2, 3, 8, 16),
        (1, 3, 8, 24),
        (2, 3, 8, 40),
        (1, 3, 8, 40),
    ]


def test_folder_of_npy_and_float64_cast(tmp_path: Path) -> None:
    m = dynamic_width_model()
    np.save(tmp_path / "x.npy", np.ones((5, 3, 8, 12)))  # float64 is converted
    batches = _collect(open_calibration(tmp_path, m, batch_size=4))
    assert [b["x"].shape[0] for b in batches] == [4, 1]
    assert batches[0]["x"].dtype == np.float32


def test_iterable_of_samples_without_batch_axis() -> None:
    m = dynamic_width_model()
    rng = np.random.default_rng(2)
    feeds = [{"x": rng.standard_normal((3, 8, w)).astype(np.float32)} for w in (8, 8, 8, 20)]
    batches = _collect(open_calibration(iter(feeds), m, batch_size=8))
    assert [b["x"].shape for b in batches] == [(3, 3, 8, 8), (1, 3, 8, 20)]


@pytest.mark.parametrize(
    "data, message",
    [
        ({"y": np.zeros((2, 3, 8, 8), np.float32)}, "no array for model input 'x'"),
        ({"x": np.zeros((2, 8, 8), np.float32)}, "rank 3"),
        ({"x": np.zeros((2, 3, 8, 8), np.int64)}, "dtype int64"),
        ({"x": np.zeros((2, 1, 8, 8), np.float32)}, "fixes dim 1 to 3"),
    ],
)
def test_bad_data_is_a_calibration_error(tmp_path: Path, data: dict, message: str) -> None:
    m = dynamic_width_model()
    np.savez(tmp_path / "bad.npz", **data)
    with pytest.raises(CalibrationError, match=message):
        list(open_calibration(tmp_path / "bad.npz", m))


def test_missing_and_empty_sources(tmp_path: Path) -> None:
    m = dynamic_width_model()
    with pytest.raises(CalibrationError, match="does not exist"):
        open_calibration(tmp_path / "nope.npz", m)
    with pytest.raises(CalibrationError, match="no .npz or .npy"):
        open_calibration(tmp_path, m)
    not_dicts: list[Any] = [np.zeros(3)]  # a list of arrays where feed dicts belong
    with pytest.raises(CalibrationError, match="not a dict"):
        list(open_calibration(not_dicts, m))
    with pytest.raises(CalibrationError, match="no samples"):
        list(open_calibration([], m))


def test_input_specs() -> None:
    spec = input_specs(dynamic_width_model())["x"]
    assert spec.dims == (None, 3, 8, None) and spec.dtype == np.float32


def test_cli_exit_2_on_bad_calibration(tmp_path: Path) -> None:
    from graphopt.cli import main

    m = dynamic_width_model()
    save(m, tmp_path / "m.onnx")
    np.savez(tmp_path / "bad.npz", z=np.zeros((2, 3, 8, 8), np.float32))
    rc = main(
        [
            "quantize",
            str(tmp_path / "m.onnx"),
            "-o",
            str(tmp_path / "q.onnx"),
            "--calib",
            str(tmp_path / "bad.npz"),
            "--json",
        ]
    )
    assert rc == 2
    assert not (tmp_path / "q.onnx").exists()


def scalar_input_model() -> Model:
    """y[N, 4] = x[N, 4] * Cast(sr) / 16000: ``sr`` is a scalar input, as silero-vad's sample
    rate."""
    nodes = [
        helper.make_node("Cast", ["sr"], ["srf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["x", "srf"], ["m"]),
        helper.make_node("Div", ["m", "k"], ["y"]),
    ]
    g = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("sr", TensorProto.INT64, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor("k", TensorProto.FLOAT, [], [16000.0])],
    )
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(proto)
    return Model.from_onnx(proto)


def test_scalar_input_goes_with_every_sample(tmp_path: Path) -> None:
    # bench/corpus.py: quantize and prune of silero-vad (its 'sr' input is a scalar) ended in
    # "internal error: IndexError: tuple index out of range" reading --calib
    m = scalar_input_model()
    x = np.arange(40, dtype=np.float32).reshape(10, 4)
    np.savez(tmp_path / "a.npz", x=x[:6], sr=np.array(16000))
    np.savez(tmp_path / "b.npz", x=x[6:], sr=np.array(8000))
    batches = _collect(open_calibration(tmp_path, m, batch_size=4))
    # a chunk's scalar goes with each of its batches; chunks with another value never merge
    assert [(b["x"].shape[0], int(b["sr"])) for b in batches] == [(4, 16000), (2, 16000), (4, 8000)]
    assert all(b["sr"].shape == () for b in batches)
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]), x)
    items = [{"x": x[i], "sr": np.array(16000)} for i in range(3)]  # feed dicts, one sample each
    got = _collect(open_calibration(items, m, batch_size=8))
    assert [(b["x"].shape, int(b["sr"])) for b in got] == [((3, 4), 16000)]
    only = _collect(open_calibration([{"x": x[:2], "sr": np.array(8000)}], m, limit=1))
    assert [b["x"].shape[0] for b in only] == [1]


def test_inputs_whose_samples_disagree_say_samples_are_on_axis_0(tmp_path: Path) -> None:
    m = scalar_input_model()
    np.savez(tmp_path / "c.npz", x=np.zeros((3, 4), np.float32), sr=np.array([1, 2]))
    with pytest.raises(CalibrationError, match="rank 1"):
        _collect(open_calibration(tmp_path / "c.npz", m))
