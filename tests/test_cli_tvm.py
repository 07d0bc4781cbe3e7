"""`graphopt compile`, `run` and `bench` through the CLI (TVM tests skip without apache-tvm)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from graphopt.cli import main
from graphopt.fixtures import fixture_path

tvm = pytest.importorskip("tvm", reason="apache-tvm is not installed (the 'tvm' extra)")

pytestmark = pytest.mark.tvm


def test_compile_run_bench(capsys, tmp_path: Path) -> None:
    lib = tmp_path / "cnn.so"
    assert main(["compile", str(fixture_path("cnn.onnx")), "-o", str(lib), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {"target", "artifact", "verify"} <= set(info)
    assert lib.is_file() and Path(str(lib) + ".json").is_file()
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "o.npz"
    assert main(["run", str(lib), "--input", f"x={tmp_path / 'x.npy'}", "-o", str(out)]) == 0
    ref = tmp_path / "r.npz"
    assert (
        main(
            [
                "run",
                str(fixture_path("cnn.onnx")),
                "--input",
                f"x={tmp_path / 'x.npy'}",
                "-o",
                str(ref),
            ]
        )
        == 0
    )
    a, b = np.load(out), np.load(ref)
    np.testing.assert_allclose(a["logits"], b["logits"], rtol=1e-4, atol=1e-5)
    capsys.readouterr()
    assert main(["bench", str(lib), str(fixture_path("cnn.onnx")), "--runs", "5", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["tvm_ms"] > 0 and res["ort_ms"] > 0


def test_bad_target_and_missing_artifact(capsys, tmp_path: Path) -> None:
    assert (
        main(
            [
                "compile",
                str(fixture_path("cnn.onnx")),
                "-o",
                str(tmp_path / "a.so"),
                "--target",
                "sparc",
            ]
        )
        == 2
    )
    assert "unknown target" in capsys.readouterr().err
    assert not (tmp_path / "a.so").exists()
    assert main(["run", str(tmp_path / "nope.so")]) == 2
    assert main(["run", str(fixture_path("cnn.onnx")), "--input", "x"]) == 2
