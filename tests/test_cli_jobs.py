"""The CLI prints the job layer's results: ``graphopt CMD --json`` is exactly ``job(...).to_json()``
(timings aside), the facade returns the typed results, every user mistake in every command exits 2
with one line, and ``graphopt --help`` loads no command module."""

from __future__ import annotations

import json
import subprocess
import sys
import typing
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import graphopt
from graphopt.cli import COMMANDS, main
from graphopt.core.errors import GraphoptError, OptionError
from graphopt.fixtures import fixture_path
from graphopt.passes import get_pass

DIGITS = fixture_path("digits_cnn.onnx")
CALIB = fixture_path("digits_calib.npz")
CNN = fixture_path("cnn.onnx")
MOBILE = fixture_path("mobilenet_block.onnx")

#: keys whose values are wall times
TIMES = {"seconds", "calib_seconds", "compile_seconds", "stages", "latency_ms"}


def _cli_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    rc = main([*argv, "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return json.loads(out)  # type: ignore[no-any-return]


def _strip_times(d: Any) -> Any:
    """Without wall times (the names passes create, ``base__goN``, are the same in every run)."""
    if isinstance(d, dict):
        return {_strip_times(k): _strip_times(v) for k, v in d.items() if k not in TIMES}
    if isinstance(d, list):
        return [_strip_times(v) for v in d]
    return d


def _same(cli: dict[str, Any], job: dict[str, Any]) -> None:
    """Equal key sets and figures (the job's dict through JSON, as the CLI prints it)."""
    job = json.loads(json.dumps(job, allow_nan=False))
    assert set(cli) == set(job)
    assert _strip_times(cli) == _strip_times(job)


# ------------------------------------------------------------------ --json is the job's to_json()


def test_plan_json_is_plan_memory(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cli = _cli_json(capsys, "plan", str(MOBILE), "-o", str(tmp_path / "m.onnx"))
    job = graphopt.plan_memory(str(MOBILE), output=tmp_path / "m.onnx")
    assert isinstance(job, graphopt.PlanResult)
    _same(cli, job.to_json())
    for key in ("arena_bytes", "lower_bound_bytes", "naive_bytes", "inplace", "order_changed"):
        assert cli[key] == job.to_json()[key]
    assert cli["plan_file"] == str(tmp_path / "m.onnx.memplan.json")


@pytest.mark.parametrize(
    "case",
    ["inspect", "optimize", "quantize", "prune", "prune-scan", "fp16", "diff", "run", "recipe"],
)
def test_json_is_the_job_result(
    case: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = str(tmp_path / "out.onnx")
    shapes = {"x": (1, 1, 8, 8)}
    fixed = ["--input-shape", "x:1x1x8x8"]
    argv: list[str]
    job: Callable[[], Any]
    if case == "inspect":
        argv = ["inspect", str(MOBILE), "--per-node"]
        job = partial(graphopt.inspect, str(MOBILE), per_node=True)
    elif case == "optimize":
        argv = ["optimize", str(MOBILE), "-o", out, "--target", "ort"]
        job = partial(graphopt.optimize, str(MOBILE), target="ort", output=out)
    elif case == "quantize":
        argv = ["quantize", str(DIGITS), "-o", out, "--calib", str(CALIB), "--method", "minmax"]
        argv += fixed
        job = partial(
            graphopt.quantize,
            str(DIGITS),
            str(CALIB),
            method="minmax",
            input_shapes=shapes,
            output=out,
        )
    elif case == "prune":
        argv = ["prune", str(DIGITS), "-o", out, "--ratio", "0.25", "--calib", str(CALIB), *fixed]
        job = partial(
            graphopt.prune, str(DIGITS), 0.25, calib=str(CALIB), input_shapes=shapes, output=out
        )
    elif case == "prune-scan":
        argv = ["prune", str(DIGITS), "--scan", "--ratios", "0.2,0.4", "--no-recover", *fixed]
        job = partial(
            graphopt.prune_scan, str(DIGITS), [0.2, 0.4], recover=False, input_shapes=shapes
        )
    elif case == "fp16":
        argv = ["fp16", str(MOBILE), "-o", out, "--keep-fp32", "Conv"]
        job = partial(graphopt.fp16, str(MOBILE), keep_fp32="Conv", output=out)
    elif case == "diff":
        graphopt.save(graphopt.optimize(str(MOBILE)).model, out)
        argv = ["diff", str(MOBILE), out, "--per-layer"]
        job = partial(graphopt.diff, str(MOBILE), out, per_layer=True)
    elif case == "run":
        x = tmp_path / "x.npy"
        np.save(x, np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32))
        argv = ["run", str(CNN), "--input", f"x={x}"]
        job = partial(graphopt.run, str(CNN), {"x": str(x)})
    else:
        argv = ["optimize", str(CNN), "-o", out, "--recipe", "fast-fp16"]
        job = partial(graphopt.run_recipe, str(CNN), "fast-fp16", output=out)
    cli = _cli_json(capsys, *argv)
    _same(cli, job().to_json())


def test_shared_block_keys(tmp_path: Path) -> None:
    """optimize, quantize, prune and fp16 share the before/after keys of DESIGN.md."""
    keys = {
        "input",
        "output",
        "nodes_before",
        "nodes_after",
        "macs_before",
        "macs_after",
        "verify",
        "passes",
    }
    shapes = {"x": (1, 1, 8, 8)}
    results = [
        graphopt.optimize(str(DIGITS), input_shapes=shapes),
        graphopt.quantize(str(DIGITS), str(CALIB), input_shapes=shapes, method="minmax"),
        graphopt.prune(str(DIGITS), 0.3, input_shapes=shapes),
        graphopt.fp16(str(DIGITS), input_shapes=shapes, output=tmp_path / "f.onnx"),
    ]
    for res in results:
        d = res.to_json()
        assert keys <= set(d), type(res).__name__
        assert d["input"] == str(DIGITS) and d["nodes_before"] > 0
        assert d["verify"] and all("sqnr_db" in v for v in d["verify"].values())
    assert "kept_fp32" in results[3].to_json()
    assert results[3].to_json()["output"] == str(tmp_path / "f.onnx")


# ------------------------------------------------------------------ facade: typed results


@pytest.mark.parametrize(
    "name, result",
    [
        ("inspect", "InspectResult"),
        ("optimize", "OptimizeResult"),
        ("quantize", "QuantizeResult"),
        ("prune", "PruneResult"),
        ("prune_scan", "PruneScanResult"),
        ("plan_memory", "PlanResult"),
        ("fp16", "Fp16Result"),
        ("compile", "CompileResult"),
        ("run", "RunResult"),
        ("diff", "DiffResult"),
        ("run_recipe", "RecipeResult"),
    ],
)
def test_facade_return_types(name: str, result: str) -> None:
    func = getattr(graphopt, name)
    cls = getattr(graphopt, result)
    assert typing.get_type_hints(func)["return"] is cls
    assert callable(cls.to_json)


def test_facade_returns_the_types(tmp_path: Path) -> None:
    m = graphopt.load(CNN)
    assert isinstance(graphopt.inspect(m), graphopt.InspectResult)
    opt = graphopt.optimize(m)
    assert isinstance(opt, graphopt.OptimizeResult) and opt.output is None
    assert isinstance(graphopt.fp16(m), graphopt.Fp16Result)
    assert isinstance(graphopt.plan_memory(m), graphopt.PlanResult)
    assert isinstance(graphopt.diff(m, opt.model), graphopt.DiffResult)
    res = graphopt.run(m)
    assert isinstance(res, graphopt.RunResult) and res.outputs["logits"].shape == (1, 10)
    assert graphopt.load(CNN).num_nodes() == m.num_nodes()  # the given Model is not changed


def test_fp16_job_refuses_below_min_sqnr(tmp_path: Path) -> None:
    out = tmp_path / "f.onnx"
    with pytest.raises(graphopt.VerificationError, match="SQNR"):
        graphopt.fp16(str(CNN), min_sqnr=200, output=out)
    assert not out.exists()


def test_plan_job_writes_planned_model(tmp_path: Path) -> None:
    res = graphopt.plan_memory(str(MOBILE), output=tmp_path / "m.onnx", prove_plan=True)
    assert res.proof is not None and res.proof.ok
    written = graphopt.load(tmp_path / "m.onnx")
    meta = json.loads(written.metadata["graphopt.memory_plan"])
    assert meta["arena_bytes"] == res.arena_bytes
    assert json.loads(Path(str(res.plan_file)).read_text())["arena_bytes"] == res.arena_bytes


# ------------------------------------------------------------------ user mistakes: exit 2


def _not_a_model(tmp_path: Path) -> Path:
    p = tmp_path / "notes.onnx"
    p.write_text("this is not an ONNX model\n")
    return p


def _argv_for(command: str, model: str, tmp_path: Path) -> list[str]:
    out = str(tmp_path / "out.onnx")
    return {
        "inspect": ["inspect", model],
        "optimize": ["optimize", model, "-o", out],
        "quantize": ["quantize", model, "-o", out, "--calib", str(CALIB)],
        "prune": ["prune", model, "-o", out, "--ratio", "0.3"],
        "plan": ["plan", model],
        "fp16": ["fp16", model, "-o", out],
        "compile": ["compile", model, "-o", str(tmp_path / "out.so")],
        "tune": ["tune", model, "--db", str(tmp_path / "tuning.json"), "--trials", "2"],
        "run": ["run", model],
        "bench": ["bench", str(tmp_path / "missing.so"), model],
        "diff": ["diff", str(CNN), model],
    }[command]


def _assert_user_error(rc: int, err: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("graphopt: error: "), err
    assert "Traceback" not in err


MODEL_COMMANDS = [c for c in COMMANDS if not c.startswith("list-")]


@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_non_model_file_exit_2(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = _not_a_model(tmp_path)
    rc = main(_argv_for(command, str(bad), tmp_path))
    _assert_user_error(rc, capsys.readouterr().err)
    assert not (tmp_path / "out.onnx").exists() and not (tmp_path / "out.so").exists()
    assert not (tmp_path / "tuning.json").exists()


def _corrupt_npz(tmp_path: Path) -> Path:
    good = CALIB.read_bytes()
    p = tmp_path / "calib.npz"
    p.write_bytes(good[: len(good) // 3])
    return p


def _mistakes(tmp_path: Path) -> dict[str, list[str]]:
    x = tmp_path / "x.npy"
    np.save(x, np.zeros((1, 3, 32, 32), np.float32))
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((1, 3, 16), np.float32))
    ints = tmp_path / "ints.npy"
    np.save(ints, np.zeros((1, 3, 32, 32), np.int64))
    junk = tmp_path / "junk.npy"
    junk.write_bytes(b"\x93NUMPY garbage")
    feeds = tmp_path / "feeds.npz"
    np.savez(feeds, y=np.zeros((1, 3, 32, 32), np.float32))
    text_calib = tmp_path / "calib.txt.npz"
    text_calib.write_text("not numpy")
    out = str(tmp_path / "out.onnx")
    return {
        "run-wrong-shape": ["run", str(CNN), "--input", f"x={wrong}"],
        "run-unknown-input": ["run", str(CNN), "--input", f"nope={x}"],
        "run-wrong-dtype": ["run", str(CNN), "--input", f"x={ints}"],
        "run-unreadable-input": ["run", str(CNN), "--input", f"x={junk}"],
        "run-missing-input-file": ["run", str(CNN), "--input", f"x={tmp_path / 'no.npy'}"],
        "run-bad-input-spec": ["run", str(CNN), "--input", "x"],
        "quantize-corrupt-calib": [
            "quantize",
            str(DIGITS),
            "-o",
            out,
            "--calib",
            str(_corrupt_npz(tmp_path)),
        ],
        "quantize-text-calib": ["quantize", str(DIGITS), "-o", out, "--calib", str(text_calib)],
        "quantize-calib-wrong-model": ["quantize", str(CNN), "-o", out, "--calib", str(CALIB)],
        "prune-ratio-1.5": ["prune", str(DIGITS), "-o", out, "--ratio", "1.5"],
        "prune-ratio-negative": ["prune", str(DIGITS), "-o", out, "--ratio", "-0.1"],
        "prune-scan-bad-ratio": ["prune", str(DIGITS), "--scan", "--ratios", "0.2,2"],
        "prune-no-output": ["prune", str(DIGITS), "--ratio", "0.2"],
        "plan-feeds-wrong-input": ["plan", str(CNN), "--feeds", str(feeds)],
        "plan-feeds-unreadable": ["plan", str(CNN), "--feeds", str(junk)],
        "optimize-unknown-pass": ["optimize", str(CNN), "-o", out, "--passes", "fuse-everything"],
        "optimize-bad-shape": ["optimize", str(CNN), "-o", out, "--input-shape", "x:1x3"],
        "inspect-unknown-input": ["inspect", str(CNN), "--input-shape", "nope:1x3x32x32"],
        "fp16-output-is-input": ["fp16", str(CNN), "-o", str(CNN)],
        "diff-bad-shape": ["diff", str(CNN), str(CNN), "--input-shape", "x:1x2x3"],
        "compile-bad-target": [
            "compile",
            str(CNN),
            "-o",
            str(tmp_path / "a.so"),
            "--target",
            "sparc",
        ],
        "bench-not-a-library": ["bench", str(CNN), str(CNN)],
    }


MISTAKES = [
    "run-wrong-shape",
    "run-unknown-input",
    "run-wrong-dtype",
    "run-unreadable-input",
    "run-missing-input-file",
    "run-bad-input-spec",
    "quantize-corrupt-calib",
    "quantize-text-calib",
    "quantize-calib-wrong-model",
    "prune-ratio-1.5",
    "prune-ratio-negative",
    "prune-scan-bad-ratio",
    "prune-no-output",
    "plan-feeds-wrong-input",
    "plan-feeds-unreadable",
    "optimize-unknown-pass",
    "optimize-bad-shape",
    "inspect-unknown-input",
    "fp16-output-is-input",
    "diff-bad-shape",
    "compile-bad-target",
    "bench-not-a-library",
]


@pytest.mark.parametrize("case", MISTAKES)
def test_user_mistake_exit_2(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = _mistakes(tmp_path)[case]
    sha = CNN.read_bytes()
    rc = main(argv)
    _assert_user_error(rc, capsys.readouterr().err)
    assert not (tmp_path / "out.onnx").exists()
    assert CNN.read_bytes() == sha


@pytest.mark.parametrize(
    "name, options",
    [
        ("fp16", {"kernels": "gpu"}),
        ("fuse-conv-activation", {"target": "tvm"}),
        ("plan-memory", {"strategy": "magic"}),
        ("reorder-memory", {"strategy": "magic"}),
        ("eliminate-cse", {"max_const_bytes": "a lot"}),
        ("quantize-int8", {"method": "kl"}),
        ("quantize-int8", {"activations": "int4"}),
        ("prune-channels", {"ratio": 1.5}),
        ("toposort", {"no_such_option": 1}),
    ],
)
def test_pass_options_raise_graphopt_errors(name: str, options: dict[str, Any]) -> None:
    with pytest.raises(GraphoptError):
        get_pass(name, **options)


def test_bad_pass_option_is_an_option_error() -> None:
    with pytest.raises(OptionError, match="kernels"):
        get_pass("fp16", kernels="gpu")


# ------------------------------------------------------------------ fast --help


def test_help_loads_no_command_module() -> None:
    code = (
        "import sys\n"
        "from graphopt.cli import build_parser\n"
        "build_parser([]).format_help()\n"
        "heavy = [m for m in sys.modules if m.startswith(('graphopt.jobs', 'graphopt.cli.',"
        " 'onnx', 'numpy', 'rich'))]\n"
        "print(','.join(sorted(heavy)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_command_help_lists_its_options(capsys: pytest.CaptureFixture[str]) -> None:
    for command in COMMANDS:
        with pytest.raises(SystemExit) as exc:
            main([command, "--help"])
        assert exc.value.code == 0
        text = capsys.readouterr().out
        assert "--json" in text and "--input-shape" in text
