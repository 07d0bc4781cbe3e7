"""The committed fixtures are valid, run in onnxruntime, and are reproduced by fixtures/build.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from graphopt.fixtures import FIXTURES, FIXTURES_DIR, fixture_path

BUILD_SCRIPT = FIXTURES_DIR / "build.py"
# Everything a plain `python fixtures/build.py` writes (the digits files need --digits).
REPRODUCIBLE = (
    "cnn.onnx",
    "residual.onnx",
    "mobilenet_block.onnx",
    "transformer_block.onnx",
    "if_model.onnx",
    "external_data.onnx",
    "external_data.onnx.data",
)


def _session(path: Path) -> ort.InferenceSession:
    """An onnxruntime CPU session with every graph optimization off."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _random_feeds(session: ort.InferenceSession, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded N(0, 1) float32 inputs; symbolic dims (the digits batch) become 2."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for inp in session.get_inputs():
        assert inp.type == "tensor(float)", inp
        shape = [d if isinstance(d, int) else 2 for d in inp.shape]
        feeds[inp.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_is_valid_and_runs(name: str) -> None:
    path = fixture_path(name)
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path), load_external_data=False)
    assert model.ir_version == 8
    assert {op.domain: op.version for op in model.opset_import} == {"": 17}

    session = _session(path)
    outputs = session.run(None, _random_feeds(session))
    assert len(outputs) == len(model.graph.output)
    for out in outputs:
        assert out.size > 0
        assert np.isfinite(out).all()
        assert np.abs(out).max() > 0  # not a dead model


def test_residual_exposes_intermediate_output() -> None:
    model = onnx.load(str(fixture_path("residual.onnx")))
    outputs = [o.name for o in model.graph.output]
    assert "conv1_out" in outputs
    consumers = [n.op_type for n in model.graph.node if "conv1_out" in n.input]
    assert consumers == ["BatchNormalization"]


def test_if_model_takes_both_branches_of_data_dependent_if() -> None:
    session = _session(fixture_path("if_model.onnx"))
    pos = np.full((1, 8), 0.5, dtype=np.float32)
    y_pos = session.run(None, {"x": pos})[0]
    y_neg = session.run(None, {"x": -pos})[0]
    assert y_pos.shape == y_neg.shape == (1, 16)
    assert not np.allclose(y_pos, y_neg)


def test_external_data_is_external() -> None:
    model = onnx.load(str(fixture_path("external_data.onnx")), load_external_data=False)
    initializers = model.graph.initializer
    external = [t.name for t in initializers if t.data_location == onnx.TensorProto.EXTERNAL]
    assert len(external) >= 3
    assert fixture_path("external_data.onnx.data").stat().st_size > 300_000


def test_digits_accuracy() -> None:
    data = np.load(fixture_path("digits_eval.npz"))
    x, y = data["x"], data["y"]
    assert x.dtype == np.float32 and x.shape[1:] == (1, 8, 8)
    assert y.dtype == np.int64 and len(y) == len(x)
    logits = _session(fixture_path("digits_cnn.onnx")).run(None, {"x": x})[0]
    accuracy = float((logits.argmax(axis=1) == y).mean())
    assert accuracy >= 0.97, accuracy

    calib = np.load(fixture_path("digits_calib.npz"))["x"]
    assert calib.shape == (128, 1, 8, 8) and calib.dtype == np.float32


def test_build_reproduces_committed_fixtures(tmp_path: Path) -> None:
    # Built twice into the same folder: a re-run must overwrite, not append to, the .data file.
    for _ in range(2):
        subprocess.run(
            [sys.executable, str(BUILD_SCRIPT), "--out", str(tmp_path)],
            check=True,
            capture_output=True,
            timeout=120,
        )
    for name in REPRODUCIBLE:
        rebuilt = (tmp_path / name).read_bytes()
        assert rebuilt == fixture_path(name).read_bytes(), f"{name} differs from the rebuild"
    assert not list(tmp_path.glob("digits*")), "digits files must need --digits"


def test_fixture_path_errors_helpfully() -> None:
    with pytest.raises(FileNotFoundError, match="fixtures/build.py"):
        fixture_path("no_such_model.onnx")
