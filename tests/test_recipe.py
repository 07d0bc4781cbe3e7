"""Recipes: validation errors (clear messages, exit 2 through the CLI), simplify -> fp16 on a
fixture, and int8 / pruning / memory-plan / compile recipes when those capabilities are
installed."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from graphopt.cli import main
from graphopt.core.errors import RecipeError
from graphopt.core.loader import load
from graphopt.fixtures import fixture_path
from graphopt.jobs.recipe import (
    BUILTIN_RECIPES,
    STEP_MODULES,
    load_recipe,
    parse_recipe,
    run_recipe,
)


def _has(mod: str) -> bool:
    try:
        return importlib.util.find_spec(mod) is not None
    except ModuleNotFoundError:
        return False


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    "data, message",
    [
        (
            {"step": [{"kind": "quantise"}]},
            "unknown step kind 'quantise' (did you mean 'quantize'?)",
        ),
        (
            {"step": [{"kind": "prune", "ratio": 0.3, "recovr": True}]},
            "unknown option 'recovr' (did you mean 'recover'?)",
        ),
        (
            {"step": [{"kind": "prune", "ratio": "0.3"}]},
            "option 'ratio' must be an integer or a number",
        ),
        ({"step": [{"kind": "prune", "ratio": 1.5}]}, "must be between 0 and 1"),
        ({"step": [{"kind": "prune"}]}, "option 'ratio' is required"),
        ({"step": [{"kind": "fp16", "keep_io_types": 1}]}, "must be a boolean"),
        ({"step": [{"kind": "quantize", "method": "kl"}]}, "must be one of minmax, percentile"),
        (
            {"step": [{"kind": "compile", "target": "aarch64"}, {"kind": "simplify"}]},
            "compile must be the last step",
        ),
        ({"step": [{"kind": "compile", "target": "riscv"}]}, "must be llvm, aarch64"),
        ({"step": [{"kind": "quantize"}, {"kind": "fp16"}]}, "cannot be combined"),
        (
            {"step": [{"kind": "quantize"}, {"kind": "prune", "ratio": 0.2}]},
            "prune must come before quantize",
        ),
        ({"steps": [{"kind": "simplify"}]}, "unknown top-level key 'steps' (did you mean 'step'?)"),
        ({"name": "x"}, "no steps"),
        ({"step": [{"ratio": 0.2}]}, "step 1 has no kind"),
        ({"step": [{"kind": "simplify"}], "input_shapes": {"x": [1, -3]}}, "positive integers"),
        ({"step": [{"kind": "fp16", "keep_fp32": ["Softmax", 3]}]}, "list of strings"),
    ],
)
def test_validation_errors(data: dict, message: str) -> None:
    with pytest.raises(RecipeError) as exc:
        parse_recipe(data, "r.toml")
    assert message in str(exc.value)
    assert str(exc.value).startswith("r.toml: ")


def test_builtin_recipes_valid_and_documented() -> None:
    assert {"simplify", "fast-fp16", "edge-int8", "prune-int8-arm"} <= set(BUILTIN_RECIPES)
    for name, (desc, _) in BUILTIN_RECIPES.items():
        r = load_recipe(name)
        assert r.steps and desc and r.description == desc
    kinds = [s.kind for s in load_recipe("prune-int8-arm").steps]
    assert kinds == ["simplify", "prune", "quantize", "plan-memory", "compile"]
    assert load_recipe("prune-int8-arm").steps[1].options["ratio"] == 0.3
    with pytest.raises(RecipeError, match="did you mean 'edge-int8'"):
        load_recipe("edge-int9")


def test_toml_file_and_shapes(tmp_path: Path) -> None:
    p = tmp_path / "r.toml"
    p.write_text(
        'input_shapes = { x = "1x3x32x32" }\n[[step]]\nkind = "simplify"\n'
        '[[step]]\nkind = "fp16"\nkeep_fp32 = ["Gemm"]\nmin_sqnr = 35\n'
    )
    r = load_recipe(p)
    assert r.name == "r" and r.input_shapes == {"x": (1, 3, 32, 32)}
    assert r.steps[1].options["keep_fp32"] == ["Gemm"] and r.steps[1].label.startswith("fp16(")
    p.write_text('[[step]\nkind = "simplify"\n')
    with pytest.raises(RecipeError, match="not valid TOML"):
        load_recipe(p)


def test_cli_recipe_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = str(fixture_path("cnn.onnx"))
    bad = tmp_path / "bad.toml"
    bad.write_text('[[step]]\nkind = "simplyfy"\n')
    for argv in (
        ["--recipe", str(bad)],
        ["--recipe", "no-such-recipe"],
        ["--recipe", "simplify", "--passes", "toposort"],
        ["--recipe", "edge-int8"],
    ):  # edge-int8 without --calib
        if argv[-1] == "edge-int8" and not _has("graphopt.jobs.quantize"):
            continue
        rc = main(["optimize", model, "-o", str(tmp_path / "o.onnx"), *argv])
        err = capsys.readouterr().err
        assert rc == 2, (argv, err)
        assert err.startswith("graphopt: error: ") and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.onnx").exists()


def test_missing_capability_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(STEP_MODULES, "prune", "graphopt.prune_api_not_here")
    with pytest.raises(
        RecipeError, match="step 'prune' needs graphopt.prune_api_not_here, not available"
    ):
        run_recipe(load(fixture_path("cnn.onnx")), "prune-int8-arm", calib=[])


# ------------------------------------------------------------------ runs


def test_fast_fp16_recipe_on_fixture() -> None:
    res = run_recipe(load(fixture_path("transformer_block.onnx")), "fast-fp16", bench=True)
    assert res.ok and [s.kind for s in res.steps] == ["simplify", "fp16"]
    simp, half = res.steps
    assert simp.check.startswith("exact") and all(v > 80 for v in simp.step_sqnr.values())
    assert half.check == "SQNR >= 30 dB" and all(v >= 40 for v in half.fidelity.values())
    assert half.model_bytes < 0.6 * simp.model_bytes  # weights halved
    assert half.latency_ms is not None and half.latency_ms > 0
    assert all(s.arena_bytes for s in res.steps) or not _has("graphopt.jobs.plan")
    row = res.table()[1]
    for key in (
        "step",
        "ok",
        "check",
        "nodes",
        "params",
        "macs",
        "model_bytes",
        "arena_bytes",
        "fidelity_sqnr_db",
        "latency_ms",
    ):
        assert key in row


def test_cli_recipe_json_and_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o.onnx"
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        '[[step]]\nkind = "simplify"\n[[step]]\nkind = "fp16"\nkeep_fp32 = "Softmax"\n'
    )
    rc = main(
        [
            "optimize",
            str(fixture_path("mobilenet_block.onnx")),
            "-o",
            str(out),
            "--recipe",
            str(recipe),
            "--json",
            "--report",
            str(tmp_path / "r.html"),
        ]
    )
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    info = json.loads(cap.out)
    assert info["ok"] and info["recipe"] == "r" and len(info["steps"]) == 2
    for key in (
        "input",
        "output",
        "nodes_before",
        "nodes_after",
        "macs_before",
        "macs_after",
        "verify",
        "passes",
    ):
        assert key in info
    assert load(out).op_histogram().get("Cast", 0) >= 2
    html = (tmp_path / "r.html").read_text()
    assert "fp16" in html and "id='graphs'" in html


def test_verification_failure_names_the_step() -> None:
    from graphopt.core.errors import VerificationError

    recipe = {"step": [{"kind": "fp16", "min_sqnr": 200}]}
    with pytest.raises(VerificationError, match=r"recipe step 1 \(fp16\(min_sqnr=200\)\)"):
        run_recipe(load(fixture_path("cnn.onnx")), recipe)


@pytest.mark.skipif(
    not (_has("graphopt.jobs.quantize") and _has("graphopt.jobs.plan")),
    reason="int8 quantization or memory planning not available",
)
def test_edge_int8_recipe_digits() -> None:
    calib = str(fixture_path("digits_calib.npz"))
    res = run_recipe(
        load(fixture_path("digits_cnn.onnx")),
        "edge-int8",
        calib=calib,
        input_shapes={"x": (1, 1, 8, 8)},
    )
    assert res.ok and [s.kind for s in res.steps] == ["simplify", "quantize", "plan-memory"]
    q, plan = res.steps[1], res.steps[2]
    assert q.check == "SQNR >= 10 dB" and min(q.fidelity.values()) >= 20
    assert res.plan is not None
    assert plan.arena_bytes == res.plan.arena_bytes and "arena execution" in plan.check
    assert all(math.isinf(v) or v > 80 for v in plan.step_sqnr.values())
    assert res.model.metadata.get("graphopt.memory_plan")
    assert res.quant is not None


@pytest.mark.skipif(not _has("graphopt.jobs.prune"), reason="channel pruning not available")
def test_prune_recipe_digits() -> None:
    calib = str(fixture_path("digits_calib.npz"))
    recipe = {
        "input_shapes": {"x": [1, 1, 8, 8]},
        "step": [
            {"kind": "simplify"},
            {"kind": "prune", "ratio": 0.25, "recover": True, "min_sqnr": 10},
        ],
    }
    res = run_recipe(load(fixture_path("digits_cnn.onnx")), recipe, calib=calib)
    assert res.ok
    simp, pr = res.steps
    assert pr.params < simp.params and pr.macs < simp.macs


def test_compile_without_tvm_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    tvm_mod = pytest.importorskip("graphopt.jobs.compile")
    monkeypatch.setattr(tvm_mod, "tvm_available", lambda: False)
    recipe = {"step": [{"kind": "simplify"}, {"kind": "compile", "target": "llvm"}]}
    with pytest.raises(RecipeError, match="step 'compile' needs apache-tvm"):
        run_recipe(load(fixture_path("cnn.onnx")), recipe)


def test_compile_step_runs_library_on_host(tmp_path: Path) -> None:
    tvm_mod = pytest.importorskip("graphopt.jobs.compile")
    if not tvm_mod.tvm_available():
        pytest.skip("apache-tvm not installed")
    recipe = {"step": [{"kind": "simplify"}, {"kind": "compile", "target": "llvm"}]}
    res = run_recipe(load(fixture_path("cnn.onnx")), recipe, output=tmp_path / "m.onnx")
    assert res.ok and res.artifact == tmp_path / "m.llvm.so" and res.artifact.is_file()
    comp = res.steps[-1]
    assert comp.check.startswith("ran on this host") and min(comp.fidelity.values()) > 60
    assert comp.model_bytes == res.artifact.stat().st_size and comp.latency_ms
    assert res.model is not None and res.model.num_nodes() == res.steps[0].nodes


@pytest.mark.parametrize("recipe, keeps", [("simplify", True), ("fast-fp16", False)])
def test_bench_says_when_the_recipe_made_it_slower(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, recipe: str, keeps: bool
) -> None:
    """``--bench`` compares the final model with the input as ``optimize --bench`` does: slower
    beyond noise twice in a row is said; an exact recipe then hands back the input's graph, a
    lossy one keeps its result (its steps may be wanted for size)."""
    import graphopt.jobs.recipe.runner as runner
    from graphopt.jobs.optimize import BenchResult

    calls = []

    def slower(before, after, feed, *a, **k):  # noqa: ANN001, ANN002, ANN003
        calls.append(1)
        return BenchResult(
            {"before": {"all": 1.0}, "after": {"all": 1.5}}, {"all": 1.5}, {"all": 0.03}
        )

    monkeypatch.setattr(runner, "bench_models", slower)
    model = load(fixture_path("transformer_block.onnx"))
    res = runner.run_recipe(model, recipe, bench=True)
    assert len(calls) == 2  # confirmed once
    assert res.slower_than_input == ["all"] and res.latency_ratio == {"all": 1.5}
    assert res.kept_input is keeps
    assert (res.model is res.original) is keeps
    assert "slower than the input" in caplog.text
    assert res.to_json()["slower_than_input"] == ["all"]
    # the negative: not slower -> nothing said, the result kept
    monkeypatch.setattr(
        runner,
        "bench_models",
        lambda *a, **k: BenchResult(
            {"before": {"all": 1.0}, "after": {"all": 0.9}}, {"all": 0.9}, {"all": 0.03}
        ),
    )
    caplog.clear()
    res2 = runner.run_recipe(model, recipe, bench=True)
    assert not res2.slower_than_input and not res2.kept_input and res2.model is not res2.original
    assert "slower" not in caplog.text
