"""Model load/save/clone: round trips keep everything, bad files fail with a clear GraphoptError."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import REAL_NAMES, real_or_skip
from onnx import helper

from graphopt.core.errors import GraphoptError, ModelLoadError
from graphopt.core.feeds import random_feeds
from graphopt.core.loader import load
from graphopt.core.saver import save
from graphopt.core.shapes import prepare
from graphopt.core.verify import verify
from graphopt.fixtures import FIXTURES, fixture_path, real_model_feeds


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_round_trip(name: str, tmp_path: Path) -> None:
    src = fixture_path(name)
    before = _sha(src)
    m = load(src)
    out = save(m, tmp_path / name)
    m2 = load(out)
    assert m2.num_nodes() == m.num_nodes()
    assert m2.opset_imports == m.opset_imports
    assert m2.num_subgraphs() == m.num_subgraphs()
    shapes = {"x": (2, 1, 8, 8)} if name == "digits_cnn.onnx" else None
    ref = prepare(load(src), shapes)
    rep = verify(ref, m2, feeds=random_feeds(ref, seed=1), rtol=0, atol=0)
    assert rep.ok, rep.to_json()
    assert _sha(src) == before


def test_external_data_round_trip(tmp_path: Path) -> None:
    m = load(fixture_path("external_data.onnx"))
    assert m.external_data
    out = save(m, tmp_path / "ext.onnx")
    (data,) = tmp_path.glob("ext.onnx.*.data")  # one data file, named per write
    assert data.stat().st_size > 300_000
    assert out.stat().st_size < 50_000  # the weights are outside the proto
    proto = onnx.load(str(out), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    rep = verify(load(fixture_path("external_data.onnx")), out, rtol=0, atol=0)
    assert rep.ok


def test_metadata_opsets_functions_kept(tmp_path: Path) -> None:
    # a model-local function, a custom-domain opset and metadata must survive a round trip
    fn = helper.make_function(
        "local",
        "Twice",
        ["a"],
        ["b"],
        [helper.make_node("Add", ["a", "a"], ["b"])],
        [helper.make_opsetid("", 17)],
    )
    node = helper.make_node("Twice", ["x"], ["y"], domain="local")
    g = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", 1, [2])],
        [helper.make_tensor_value_info("y", 1, [2])],
    )
    proto = helper.make_model(
        g,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
        functions=[fn],
        ir_version=8,
    )
    helper.set_model_props(proto, {"author": "me", "k": "v"})
    p = tmp_path / "f.onnx"
    onnx.save(proto, str(p))
    m = load(p)
    m2 = load(save(m, tmp_path / "g.onnx"))
    assert m2.metadata == {"author": "me", "k": "v"}
    assert m2.opset_imports == {"": 17, "local": 1}
    assert [f.name for f in m2.functions] == ["Twice"]
    x = np.arange(2, dtype=np.float32)
    assert verify(m, m2, feeds={"x": x}, rtol=0, atol=0).ok


def test_clone_is_independent(load_fixture) -> None:
    m = load_fixture("cnn.onnx")
    c = m.clone()
    c.graph.nodes.pop()
    c.metadata["x"] = "1"
    assert len(m.graph.nodes) == len(c.graph.nodes) + 1
    assert "x" not in m.metadata


@pytest.mark.real
@pytest.mark.parametrize("name", REAL_NAMES)
def test_real_round_trip(name: str, tmp_path: Path) -> None:
    path, shapes = real_or_skip(name)
    before = _sha(path)
    m = load(path)
    out = save(m, tmp_path / "rt.onnx")
    ref = prepare(load(path), shapes)
    rep = verify(ref, out, feeds=real_model_feeds(name), rtol=0, atol=0)
    assert rep.ok, rep.to_json()
    assert load(out).num_subgraphs() == m.num_subgraphs()
    assert _sha(path) == before


# ---------------------------------------------------------------- bad input


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no such file"):
        load(tmp_path / "nope.onnx")


def test_truncated_file(tmp_path: Path) -> None:
    data = fixture_path("cnn.onnx").read_bytes()
    p = tmp_path / "t.onnx"
    for cut in (len(data) // 3, len(data) - 7, 40):
        p.write_bytes(data[:cut])
        with pytest.raises(ModelLoadError):
            load(p)


def test_text_file(tmp_path: Path) -> None:
    p = tmp_path / "readme.onnx"
    p.write_text("this is not a model\n" * 20)
    with pytest.raises(ModelLoadError, match="not"):
        load(p)


def test_empty_file(tmp_path: Path) -> None:
    p = tmp_path / "e.onnx"
    p.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="empty"):
        load(p)


def _copy_external(tmp_path: Path) -> Path:
    for f in ("external_data.onnx", "external_data.onnx.data"):
        (tmp_path / f).write_bytes(fixture_path(f).read_bytes())
    return tmp_path / "external_data.onnx"


def test_missing_external_data(tmp_path: Path) -> None:
    p = _copy_external(tmp_path)
    os.remove(tmp_path / "external_data.onnx.data")
    with pytest.raises(ModelLoadError, match="missing"):
        load(p)


def test_short_external_data(tmp_path: Path) -> None:
    p = _copy_external(tmp_path)
    d = tmp_path / "external_data.onnx.data"
    d.write_bytes(d.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="too short"):
        load(p)


@pytest.mark.parametrize("location", ["../secret.bin", "/etc/passwd", "sub/../../x.bin"])
def test_external_data_outside_folder_refused(tmp_path: Path, location: str) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (tmp_path / "secret.bin").write_bytes(b"\0" * 4096)
    p = _copy_external(folder)
    proto = onnx.load(str(p), load_external_data=False)
    for t in proto.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    onnx.save(proto, str(p))
    with pytest.raises(ModelLoadError, match="refusing"):
        load(p)


def test_save_refuses_to_overwrite_input(tmp_path: Path) -> None:
    p = tmp_path / "cnn.onnx"
    p.write_bytes(fixture_path("cnn.onnx").read_bytes())
    before = _sha(p)
    m = load(p)
    with pytest.raises(GraphoptError, match="overwrite"):
        save(m, p)
    assert _sha(p) == before


def test_save_is_atomic_no_temp_left(tmp_path: Path) -> None:
    m = load(fixture_path("cnn.onnx"))
    save(m, tmp_path / "a.onnx")
    assert sorted(os.listdir(tmp_path)) == ["a.onnx"]
