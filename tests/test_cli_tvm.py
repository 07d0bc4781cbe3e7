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


def test_tune_then_compile_with_the_database(capsys, tmp_path: Path) -> None:
    """`graphopt tune` fills the database (progress bar on stderr, not in --json); `graphopt
    compile --db` schedules from it and measures nothing more."""
    db = tmp_path / "tuning.json"
    model = str(fixture_path("cnn.onnx"))
    assert main(["tune", model, "--db", str(db), "--trials", "3", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["db"] == str(db) and res["target"] == "llvm" and res["measurements"] > 0
    assert res["kernels"] == len(res["per_kernel"]) and db.is_file()
    assert set(res["status"]) <= {"tuned", "skipped", "baseline", "failed"}
    lib = tmp_path / "cnn.so"
    assert main(["compile", model, "-o", str(lib), "--db", str(db), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["tuning"]["measurements"] == 0
    assert info["tuned_kernels"] == res["status"].get("tuned", 0)
    assert info["verify"] and all(o["ok"] for o in info["verify"].values())
    # tables, not JSON: the tune summary lists every kernel
    assert main(["tune", model, "--db", str(db), "--trials", "3"]) == 0
    out = capsys.readouterr().out
    assert "candidates measured" in out and "cached" in out


def test_tune_option_errors(capsys, tmp_path: Path) -> None:
    model = str(fixture_path("cnn.onnx"))
    assert main(["tune", model, "--trials", "0", "--db", str(tmp_path / "d.json")]) == 2
    assert "--trials" in capsys.readouterr().err
    assert main(["tune", model, "--rpc", "localhost", "--key", "k"]) == 2
    assert "HOST:PORT" in capsys.readouterr().err
    assert main(["tune", model, "--target", "cuda", "--db", str(tmp_path / "d.json")]) == 2
    assert "cuda" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2")
    assert main(["tune", model, "--db", str(bad)]) == 2
    assert "tuning database" in capsys.readouterr().err
    assert main(["tune", model, "--db", model]) == 2  # the database may not be the model
    assert bad.read_text() == "[1, 2"


def test_bench_per_kernel(capsys, tmp_path: Path) -> None:
    lib = tmp_path / "cnn.so"
    model = str(fixture_path("cnn.onnx"))
    assert main(["compile", model, "-o", str(lib), "--no-verify", "--json"]) == 0
    capsys.readouterr()
    assert main(["bench", str(lib), model, "--runs", "3", "--per-kernel", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    prof = res["per_kernel"]
    names = [k["name"] for k in prof["kernels"]]
    assert any("conv2d" in n for n in names) and prof["runs"] == 3
    assert abs(sum(k["share"] for k in prof["kernels"]) - 1.0) < 1e-6
    assert all(k["ms"] >= 0 and k["calls"] >= 1 for k in prof["kernels"])
    assert prof["kernels_ms"] > 0 and prof["total_ms"] > 0
    assert main(["bench", str(lib), model, "--runs", "3", "--per-kernel"]) == 0
    out = capsys.readouterr().out
    assert "per kernel" in out and "cumulative" in out
