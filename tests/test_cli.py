"""The command line: inspect/optimize/list-passes output, JSON keys, exit codes, input untouched."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from conftest import REAL_NAMES, real_or_skip

from graphopt.cli import main
from graphopt.fixtures import FIXTURES, fixture_path

INSPECT_KEYS = {
    "nodes",
    "ops",
    "params",
    "param_bytes",
    "macs",
    "activation_bytes",
    "inputs",
    "outputs",
    "opset",
}
OPTIMIZE_KEYS = {
    "input",
    "output",
    "nodes_before",
    "nodes_after",
    "macs_before",
    "macs_after",
    "verify",
    "passes",
}


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _shape_args(name: str) -> list[str]:
    return ["--input-shape", "x:4x1x8x8"] if name == "digits_cnn.onnx" else []


@pytest.mark.parametrize("name", FIXTURES)
def test_inspect_json_fixture(capsys, name: str) -> None:
    rc, out, err = _run(capsys, "inspect", str(fixture_path(name)), "--json", *_shape_args(name))
    assert rc == 0, err
    info = json.loads(out)
    assert INSPECT_KEYS <= set(info)
    assert {"naive", "peak"} <= set(info["activation_bytes"])
    assert info["nodes"] == sum(info["ops"].values())
    assert info["activation_bytes"]["peak"] <= info["activation_bytes"]["naive"]


@pytest.mark.real
@pytest.mark.parametrize("name", REAL_NAMES)
def test_inspect_json_real(capsys, name: str) -> None:
    path, shapes = real_or_skip(name)
    specs = []
    for k, v in shapes.items():
        specs += ["--input-shape", f"{k}:" + "x".join(map(str, v))]
    rc, out, err = _run(capsys, "inspect", str(path), "--json", *specs)
    assert rc == 0, err
    info = json.loads(out)
    assert INSPECT_KEYS <= set(info)
    if name in ("det", "rec", "cls"):
        assert info["macs"] > 1e7
        assert info["params"] > 1e5


def test_inspect_tables(capsys) -> None:
    rc, out, _ = _run(capsys, "inspect", str(fixture_path("cnn.onnx")), "--per-node")
    assert rc == 0
    for word in ("inputs and outputs", "summary", "operators", "MACs", "Conv", "per node"):
        assert word in out


def test_optimize_json_and_output(capsys, tmp_path: Path) -> None:
    src = fixture_path("if_model.onnx")
    before = _sha(src)
    out_path = tmp_path / "o.onnx"
    rc, out, err = _run(capsys, "optimize", str(src), "-o", str(out_path), "--json")
    assert rc == 0, err
    info = json.loads(out)
    assert OPTIMIZE_KEYS <= set(info)
    assert all(v["max_abs_err"] is not None for v in info["verify"].values())
    assert out_path.is_file() and _sha(src) == before


def test_optimize_tables(capsys, tmp_path: Path) -> None:
    rc, out, err = _run(
        capsys, "optimize", str(fixture_path("cnn.onnx")), "-o", str(tmp_path / "o.onnx")
    )
    assert rc == 0, err
    assert "verification" in out and "nodes" in out


def test_list_passes(capsys) -> None:
    rc, out, _ = _run(capsys, "list-passes", "--json")
    assert rc == 0
    names = {p["name"] for p in json.loads(out)["passes"]}
    assert {"eliminate-dead", "eliminate-identity", "toposort"} <= names


# ------------------------------------------------------------------- bad input: exit 2, one line


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[Path, list[str]]]:
    data = fixture_path("cnn.onnx").read_bytes()
    trunc = tmp_path / "trunc.onnx"
    trunc.write_bytes(data[: len(data) // 2])
    text = tmp_path / "text.onnx"
    text.write_text("just some text, renamed to .onnx\n")
    ext_dir = tmp_path / "ext"
    ext_dir.mkdir()
    ext = ext_dir / "external_data.onnx"
    ext.write_bytes(fixture_path("external_data.onnx").read_bytes())  # .data not copied
    good = tmp_path / "good.onnx"
    good.write_bytes(data)
    return {
        "missing": (tmp_path / "missing.onnx", []),
        "truncated": (trunc, []),
        "text": (text, []),
        "missing-external-data": (ext, []),
        "unknown-pass": (good, ["--passes", "no-such-pass"]),
        "bad-shape": (good, ["--input-shape", "x:1x3"]),
        "unknown-input": (good, ["--input-shape", "nope:1x3x32x32"]),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "truncated",
        "text",
        "missing-external-data",
        "unknown-pass",
        "bad-shape",
        "unknown-input",
    ],
)
@pytest.mark.parametrize("command", ["optimize", "inspect"])
def test_bad_input_exit_2(capsys, tmp_path: Path, case: str, command: str) -> None:
    path, extra = _bad_inputs(tmp_path)[case]
    if command == "inspect" and case == "unknown-pass":
        pytest.skip("inspect takes no passes")
    before = _sha(path) if path.exists() else None
    out_path = tmp_path / "out.onnx"
    argv = [command, str(path), *extra]
    if command == "optimize":
        argv += ["-o", str(out_path)]
    rc, out, err = _run(capsys, *argv)
    assert rc == 2, (out, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("graphopt: error: "), err
    assert "Traceback" not in err
    assert not out_path.exists()
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".graphopt-")]
    if before is not None:
        assert _sha(path) == before


def test_output_equal_to_input_refused(capsys, tmp_path: Path) -> None:
    p = tmp_path / "m.onnx"
    p.write_bytes(fixture_path("cnn.onnx").read_bytes())
    before = _sha(p)
    rc, _, err = _run(capsys, "optimize", str(p), "-o", str(p))
    assert rc == 2 and "input" in err
    assert _sha(p) == before
