"""Without torch (the ``graphopt[train]`` extra) every command works, and the training options
exit 2 naming the extra. Runs whether or not torch is installed: torch is blocked in a subprocess.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from graphopt.cli import main
from graphopt.fixtures import fixture_path

BLOCK_TORCH = "import sys; sys.modules['torch'] = None\n"


def run_without_torch(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH + code], capture_output=True, text=True, timeout=300
    )


def test_prune_without_torch(tmp_path: Path) -> None:
    model, calib = fixture_path("digits_cnn.onnx"), fixture_path("digits_calib.npz")
    out = tmp_path / "p.onnx"
    code = (
        "from graphopt.cli import main\n"
        "import graphopt.algorithms.train as t\n"
        "assert not t.available()\n"
        f"args = [{str(model)!r}, '-o', {str(out)!r}, '--ratio', '0.3',"
        f" '--calib', {str(calib)!r}]\n"
        "rc1 = main(['prune', *args, '--json'])\n"
        "rc2 = main(['prune', *args, '--recover', 'distill'])\n"
        "rc3 = main(['quantize', {m!r}, '-o', {q!r}, '--calib', {c!r}, '--qat'])\n"
        "print('RC', rc1, rc2, rc3)\n"
    ).format(m=str(model), q=str(tmp_path / "q.onnx"), c=str(calib))
    r = run_without_torch(code)
    assert "RC 0 2 2" in r.stdout, r.stdout + r.stderr
    assert r.stderr.count("pip install graphopt[train]") == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert out.is_file() and not (tmp_path / "q.onnx").exists()


def test_import_graphopt_loads_no_torch() -> None:
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, graphopt, graphopt.algorithms.train, graphopt.jobs.prune, "
            "graphopt.jobs.quantize, graphopt.cli.prune, graphopt.cli.quantize\n"
            "print('torch' in sys.modules)",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert r.stdout.strip() == "False"


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "--calib"),  # distillation trains on unlabeled inputs: calib is required
        (["--calib", "CALIB", "--steps", "0"], "--steps"),
        (["--calib", "CALIB", "--no-recover"], "contradicts"),
    ],
)
def test_distill_option_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    calib = str(fixture_path("digits_calib.npz"))
    extra = [calib if a == "CALIB" else a for a in extra]
    out = tmp_path / "p.onnx"
    argv = ["prune", str(fixture_path("digits_cnn.onnx")), "-o", str(out), "--ratio", "0.3"]
    rc = main([*argv, "--recover", "distill", *extra])
    err = capsys.readouterr().err
    if "pip install graphopt[train]" in err:
        pytest.skip("torch is not installed")
    assert rc == 2 and message in err, err
    assert not out.exists()
