"""Data safety (issue 18): the input is never written, a failed check writes nothing, a model and
its external data are published together, device nodes and FIFOs are never replaced, the output
comparison sees NaN and inf, memory plans never write into caller-owned inputs or graph outputs,
signals and full disks leave nothing behind, and model names cannot drive the terminal.

Each case runs the real command line (``graphopt.cli.main`` in process, or ``python -m
graphopt.cli`` in a subprocess where signals are involved) and ends with: the input byte-identical,
no broken or mixed output, no file left behind, and the right exit code (2 for the user's mistake,
1 for a failed check).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.cli import main
from graphopt.fixtures import fixture_path
from graphopt.testing import read_tag, tagged_model

DIGITS = fixture_path("digits_cnn.onnx")
CALIB = fixture_path("digits_calib.npz")
EVAL = fixture_path("digits_eval.npz")
DIGITS_SHAPE = ["--input-shape", "x:1x1x8x8"]


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _snapshot(folder: Path) -> dict[str, str]:
    """name -> sha256 of every file in ``folder`` (hidden temporaries included)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(folder))] = _sha(p)
        elif p.is_symlink() or not p.is_dir():
            out[str(p.relative_to(folder))] = "special"
    return out


def _run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _one_error_line(err: str) -> str:
    """The one ``graphopt: error/interrupted`` line of ``err`` (warning lines aside)."""
    lines = [
        ln
        for ln in err.splitlines()
        if ln.startswith("graphopt:") and not ln.startswith("graphopt: warning: ")
    ]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    return lines[0]


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".graphopt-*"))


# ------------------------------------------------------------- 1. side output onto an input


def _case1_argv(case: str, d: Path) -> list[object]:
    m, out, dig = d / "in.onnx", d / "out.onnx", d / "digits.onnx"
    calib = d / "calib.npz"
    x = d / "x.npy"
    cases: dict[str, list[object]] = {
        "optimize-report": ["optimize", m, "-o", out, "--report", m],
        "optimize-report-symlink": ["optimize", m, "-o", out, "--report", d / "link.onnx"],
        "optimize-report-hardlink": ["optimize", m, "-o", out, "--report", d / "hard.onnx"],
        "optimize-report-is-output": ["optimize", m, "-o", out, "--report", out],
        "optimize-recipe-report": ["optimize", m, "-o", out, "--recipe", "simplify", "--report", m],
        "quantize-report": ["quantize", dig, "-o", out, "--calib", calib, "--report", dig],
        "quantize-report-calib": ["quantize", dig, "-o", out, "--calib", calib, "--report", calib],
        "quantize-output-calib": ["quantize", dig, "-o", calib, "--calib", calib],
        "fp16-report": ["fp16", m, "-o", out, "--report", m],
        "prune-report": ["prune", m, "-o", out, "--ratio", "0.25", "--report", m],
        "prune-scan-plot": ["prune", m, "--scan", "--ratios", "0.2,0.4", "--plot", m],
        "plan-plot": ["plan", m, "--plot", m],
        "plan-report": ["plan", m, "--report", m],
        "plan-memplan-json": ["plan", d / "p.memplan.json", "-o", d / "p"],
        "plan-output-plot": ["plan", m, "-o", out, "--plot", out],
        "run-output": ["run", m, "-o", m],
        "run-output-input-array": ["run", m, "--input", f"x={x}", "-o", x],
        "external-data-report": ["optimize", d / "ext.onnx", "-o", out, "--report", d / "ext.data"],
    }
    return cases[case]


CASE1 = [
    "optimize-report",
    "optimize-report-symlink",
    "optimize-report-hardlink",
    "optimize-report-is-output",
    "optimize-recipe-report",
    "quantize-report",
    "quantize-report-calib",
    "quantize-output-calib",
    "fp16-report",
    "prune-report",
    "prune-scan-plot",
    "plan-plot",
    "plan-report",
    "plan-memplan-json",
    "plan-output-plot",
    "run-output",
    "run-output-input-array",
    "external-data-report",
]


@pytest.fixture
def inputs_dir(tmp_path: Path) -> Path:
    """A folder with the inputs of the case-1 commands (links to the model included)."""
    d = tmp_path / "in"
    d.mkdir()
    shutil.copy(fixture_path("cnn.onnx"), d / "in.onnx")
    shutil.copy(fixture_path("cnn.onnx"), d / "p.memplan.json")
    shutil.copy(DIGITS, d / "digits.onnx")
    shutil.copy(CALIB, d / "calib.npz")
    (d / "link.onnx").symlink_to(d / "in.onnx")
    os.link(d / "in.onnx", d / "hard.onnx")
    np.save(d / "x.npy", np.zeros((1, 3, 8, 8), np.float32))
    ext = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        [numpy_helper.from_array(np.eye(64, dtype=np.float32), "w")],
    )
    proto = helper.make_model(ext, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(proto, str(d / "ext.onnx"), save_as_external_data=True, location="ext.data")
    return d


@pytest.mark.parametrize("case", CASE1)
def test_1_side_output_onto_an_input_is_refused(capsys, inputs_dir: Path, case: str) -> None:
    before = _snapshot(inputs_dir.parent)
    rc, _, err = _run(capsys, *_case1_argv(case, inputs_dir))
    assert rc == 2, err
    line = _one_error_line(err)
    assert "output" in line
    assert _snapshot(inputs_dir.parent) == before  # nothing written, nothing changed


# ------------------------------------------------------------ 2. verification that decides


def _scaled_calib(tmp_path: Path, scale: float, name: str) -> Path:
    x = np.load(CALIB)["x"]
    p = tmp_path / name
    np.savez(p, x=(x * scale).astype(np.float32))
    return p


def test_2_quantize_refuses_tiny_range_calibration(capsys, tmp_path: Path) -> None:
    """x * 1e-9: the int8 model's logits have SQNR about -4 dB and cosine about -0.14."""
    calib = _scaled_calib(tmp_path, 1e-9, "tiny.npz")
    out, rep = tmp_path / "q.onnx", tmp_path / "q.html"
    before = _sha(DIGITS)
    rc, _, err = _run(capsys, "quantize", DIGITS, "-o", out, "--calib", calib, "--report", rep)
    assert rc == 1, err
    line = _one_error_line(err)
    assert "SQNR" in line and "not written" in line
    assert "--min-sqnr" in line and "--force" in line and "calibration" in line
    assert not out.exists() and not rep.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.npz"]
    assert _sha(DIGITS) == before


def test_2_quantize_refuses_nan_from_extreme_calibration(capsys, tmp_path: Path) -> None:
    """x * 1e37 overflows float32 inside the model: the check sees NaN/inf and says NO."""
    calib = _scaled_calib(tmp_path, 1e37, "huge.npz")
    out = tmp_path / "q.onnx"
    rc, _, err = _run(capsys, "quantize", DIGITS, "-o", out, "--calib", calib)
    assert rc == 1, err
    _one_error_line(err)
    assert not out.exists()


def test_2_quantize_refuses_extreme_range_calibration_judged_on_feeds(capsys, tmp_path) -> None:
    """x * 1000: int8 matches fp32 on the calibration data itself (about 32 dB) but the digits
    accuracy drops from 0.994 to about 0.1; judged on real inputs (--feeds) it is refused."""
    calib = _scaled_calib(tmp_path, 1000.0, "big.npz")
    feeds = tmp_path / "feeds.npz"
    np.savez(feeds, x=np.load(EVAL)["x"][:64])
    out = tmp_path / "q.onnx"
    rc, _, err = _run(capsys, "quantize", DIGITS, "-o", out, "--calib", calib, "--feeds", feeds)
    assert rc == 1, err
    line = _one_error_line(err)
    assert "feeds" in line
    assert not out.exists()


def test_2_quantize_refuses_calibration_with_outliers(capsys, tmp_path: Path) -> None:
    """One sample 10^4 times louder than the others: the pooled SQNR is dominated by it, the other
    samples quantize to zero; the per-sample check refuses."""
    x = np.load(CALIB)["x"].copy()
    x[0] *= 1e4
    calib = tmp_path / "outlier.npz"
    np.savez(calib, x=x)
    out = tmp_path / "q.onnx"
    rc, _, err = _run(capsys, "quantize", DIGITS, "-o", out, "--calib", calib)
    assert rc == 1, err
    assert "sample" in _one_error_line(err)
    assert not out.exists()


@pytest.mark.parametrize("how", [["--force"], ["--min-sqnr", "0"]])
def test_2_quantize_writes_anyway_with_a_warning(capsys, caplog, tmp_path: Path, how) -> None:
    calib = _scaled_calib(tmp_path, 1e-9, "tiny.npz")
    out = tmp_path / "q.onnx"
    rc, _, err = _run(capsys, "quantize", DIGITS, "-o", out, "--calib", calib, *how)
    assert rc == 0, err
    warned = [r for r in caplog.records if r.levelname == "WARNING"]
    assert warned and ("--force" in warned[0].getMessage() or "floor" in warned[0].getMessage())
    assert out.is_file()
    onnx.checker.check_model(str(out))


def test_2_quantize_good_calibration_passes_the_default_floor(capsys, tmp_path: Path) -> None:
    out = tmp_path / "q.onnx"
    rc, _, err = _run(capsys, "quantize", DIGITS, "-o", out, "--calib", CALIB, "--json")
    assert rc == 0, err
    assert out.is_file()


def test_2_quantize_api_raises_and_writes_nothing(tmp_path: Path) -> None:
    import graphopt
    from graphopt.core.errors import VerificationError

    calib = _scaled_calib(tmp_path, 1e-9, "tiny.npz")
    with pytest.raises(VerificationError, match="SQNR"):
        graphopt.quantize(str(DIGITS), str(calib), output=tmp_path / "q.onnx")
    assert not (tmp_path / "q.onnx").exists()
    res = graphopt.quantize(str(DIGITS), str(calib), output=tmp_path / "q.onnx", force=True)
    assert res.verify is not None and not res.verify.ok and (tmp_path / "q.onnx").is_file()


def test_2_fp16_failed_check_writes_nothing(capsys, caplog, tmp_path: Path) -> None:
    out = tmp_path / "h.onnx"
    m = fixture_path("cnn.onnx")
    rc, _, err = _run(capsys, "fp16", m, "-o", out, "--min-sqnr", "200")
    assert rc == 1, err
    line = _one_error_line(err)
    assert "not written" in line and "--force" in line
    assert not out.exists() and list(tmp_path.iterdir()) == []
    rc, _, err = _run(capsys, "fp16", m, "-o", out, "--min-sqnr", "200", "--force")
    assert rc == 0 and out.is_file()
    assert any("--force" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")


def test_2_prune_default_floor(capsys, tmp_path: Path) -> None:
    """Pruning without recovery wrecks the digits classifier (SQNR about 1 dB, top-1 agreement
    about 0.1): refused by the default floor; with recovery it passes."""
    out = tmp_path / "p.onnx"
    rc, _, err = _run(capsys, "prune", DIGITS, "-o", out, "--ratio", "0.3", *DIGITS_SHAPE)
    assert rc == 1, err
    line = _one_error_line(err)
    assert "not written" in line and "--calib" in line
    assert not out.exists() and list(tmp_path.iterdir()) == []
    rc, _, err = _run(
        capsys, "prune", DIGITS, "-o", out, "--ratio", "0.3", "--calib", CALIB, *DIGITS_SHAPE
    )
    assert rc == 0, err
    assert out.is_file()


def test_2_optimize_wrong_pass_writes_nothing(tmp_path: Path) -> None:
    """A pass that changes the numbers is caught at fp32 tolerance; nothing is written."""
    from graphopt.core.errors import VerificationError
    from graphopt.core.pass_manager import Pass, PassResult
    from graphopt.jobs.optimize import optimize

    class Nudge(Pass):
        name = "nudge-weights"

        def call(self, model):  # type: ignore[no-untyped-def]
            for t in model.graph.tensors().values():
                if hasattr(t, "values") and np.asarray(t.values).dtype == np.float32:
                    t.values = np.asarray(t.values) * np.float32(1.001)
            return PassResult(model, True)

    out = tmp_path / "o.onnx"
    with pytest.raises(VerificationError, match="not written"):
        optimize(str(fixture_path("cnn.onnx")), [Nudge()], output=out)
    assert list(tmp_path.iterdir()) == []


def test_2_exact_tolerance_is_dtype_aware() -> None:
    from graphopt.core.verify import compare, tolerance

    assert tolerance(np.float16) > tolerance(np.float32) == (1e-4, 1e-5)
    ref = np.linspace(-1, 1, 100).astype(np.float16)
    assert compare("y", ref, ref + np.float16(1e-3)).ok  # fp16 rounding: accepted
    ref32 = ref.astype(np.float32)
    assert not compare("y", ref32, ref32 + np.float32(1e-3)).ok  # not at fp32 tolerance
    assert compare("y", ref32, ref32 + np.float32(1e-6)).ok
    d = compare("y", ref32, ref32 + np.float32(1e-3))
    assert d.limit is not None and "max abs error" in d.reason()


# ----------------------------------------------------------- 4. device nodes and FIFOs


CASE4 = ["optimize", "quantize", "fp16", "prune", "plan", "run", "optimize-report"]


def _case4_argv(case: str, model: Path, target: Path) -> list[object]:
    return {
        "optimize": ["optimize", model, "-o", target],
        "optimize-report": ["optimize", model, "-o", target.parent / "o.onnx", "--report", target],
        "quantize": ["quantize", DIGITS, "-o", target, "--calib", CALIB],
        "fp16": ["fp16", model, "-o", target],
        "prune": ["prune", model, "-o", target, "--ratio", "0.25", "--force"],
        "plan": ["plan", model, "-o", target],
        "run": ["run", model, "-o", target],
    }[case]


@pytest.mark.parametrize("case", CASE4)
@pytest.mark.parametrize("kind", ["fifo", "devnull"])
def test_4_device_or_fifo_output_is_refused(capsys, tmp_path: Path, case: str, kind: str) -> None:
    model = tmp_path / "m.onnx"
    shutil.copy(fixture_path("cnn.onnx"), model)
    if kind == "fifo":
        target = tmp_path / "fifo"
        os.mkfifo(target)
    else:
        target = Path("/dev/null")
    before = _snapshot(tmp_path)
    rc, _, err = _run(capsys, *_case4_argv(case, model, target))
    assert rc == 2, err
    line = _one_error_line(err)
    assert ("FIFO" if kind == "fifo" else "device") in line
    assert _snapshot(tmp_path) == before
    mode = os.stat(target).st_mode
    assert stat.S_ISFIFO(mode) if kind == "fifo" else stat.S_ISCHR(mode)


# ------------------------------------------------------------------ 5. NaN and inf compare


def test_5_compare_non_finite_positions() -> None:
    from graphopt.core.verify import compare

    inf, nan = np.inf, np.nan
    a = np.array([1.0, inf, -inf, nan, 2.0], np.float32)
    assert compare("y", a, a.copy()).ok  # same NaN mask, same signed infs
    for b in (
        np.array([1.0, -inf, -inf, nan, 2.0], np.float32),  # +inf vs -inf
        np.array([1.0, 3.0, -inf, nan, 2.0], np.float32),  # inf vs finite
        np.array([1.0, inf, -inf, 0.0, 2.0], np.float32),  # NaN vs finite
        np.array([1.0, inf, -inf, inf, 2.0], np.float32),  # NaN vs inf
    ):
        for x, y in ((a, b), (b, a)):
            d = compare("y", x, y)
            assert not d.ok, (x, y)
            assert d.max_abs_err == np.inf and "non-finite" in d.note
            d = compare("y", x, y, min_sqnr_db=-1e9, min_cosine=-1.0)  # lossy: still refused
            assert not d.ok
    one = np.array([inf], np.float32)
    assert not compare("y", one, -one).ok
    assert compare("y", one, one).ok


def _inf_model(path: Path, sign: float) -> Path:
    """y = sign * x / 0 (+-inf for nonzero x), z = x."""
    g = helper.make_graph(
        [
            helper.make_node("Mul", ["x", "s"], ["xs"]),
            helper.make_node("Div", ["xs", "zero"], ["y"]),
            helper.make_node("Identity", ["x"], ["z"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 3]),
        ],
        [
            numpy_helper.from_array(np.array(sign, np.float32), "s"),
            numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        ],
    )
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_5_diff_sees_plus_inf_against_minus_inf(capsys, tmp_path: Path) -> None:
    import json

    a = _inf_model(tmp_path / "a.onnx", 1.0)
    b = _inf_model(tmp_path / "b.onnx", -1.0)
    rc, out, err = _run(capsys, "diff", a, b, "--json")
    assert rc == 0, err
    res = json.loads(out)
    assert res["outputs_equal"] is False
    assert res["outputs"]["y"]["ok"] is False and res["outputs"]["z"]["ok"] is True
    rc, out, _ = _run(capsys, "diff", a, b)
    assert "outputs differ" in out and "outputs equal" not in out
    rc, out, _ = _run(capsys, "diff", a, b, "--check")
    assert rc == 1
    rc, out, _ = _run(capsys, "diff", a, a, "--json")
    assert json.loads(out)["outputs_equal"] is True  # the same infs on both sides


# -------------------------------------------------- 6. memory plans and caller-owned tensors


def _input_is_output_model() -> onnx.ModelProto:
    """x is a graph input AND a graph output; y = Relu(x), the only node, is a candidate for an
    in-place write over x (x's last use is that step, which is also the last step)."""
    g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64]),
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64]),
        ],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _assert_caller_tensors_untouched(plan, model) -> None:  # type: ignore[no-untyped-def]
    """No reuse writes into a graph input or a graph output; a graph input's bytes are never
    shared with another tensor at any time."""
    ins = {t.name for t in model.graph.inputs}
    outs = {t.name for t in model.graph.outputs}
    for dst, (src, how) in plan.reuses.items():
        if how == "inplace":
            assert src not in ins, f"{dst} written in place over graph input {src}"
            assert src not in outs, f"{dst} written in place over graph output {src}"
    tensors = plan.tensors
    for name in ins:
        t = tensors.get(name)
        if t is None:
            continue
        for o in tensors.values():
            if o.name == name or o.buffer == t.buffer:
                continue
            overlap = o.offset < t.offset + t.nbytes and t.offset < o.offset + o.nbytes
            assert not overlap, f"{o.name} shares bytes with graph input {name}"


def test_6_plan_never_writes_over_an_input_that_is_an_output(capsys, tmp_path: Path) -> None:
    from graphopt.algorithms.memory.arena import prove
    from graphopt.core.model import Model
    from graphopt.jobs.plan import plan_model

    m = Model.from_onnx(_input_is_output_model())
    plan = plan_model(m, inplace=True)
    assert plan.model is not None
    _assert_caller_tensors_untouched(plan, plan.model)
    rep = prove(plan.model, plan)
    assert rep.ok, rep.to_json()
    src = tmp_path / "m.onnx"
    onnx.save(_input_is_output_model(), str(src))
    before = _sha(src)
    rc, _, err = _run(capsys, "plan", src, "-o", tmp_path / "p.onnx", "--prove")
    assert rc == 0, err
    assert _sha(src) == before


def test_6_plan_never_reuses_a_graph_input() -> None:
    """x -> Relu -> Relu -> y: the first Relu may not overwrite x (the caller's), even though x
    dies there; nothing else may take x's bytes later either."""
    from graphopt.algorithms.memory.arena import prove
    from graphopt.core.model import Model
    from graphopt.jobs.plan import plan_model

    g = helper.make_graph(
        [
            helper.make_node("Relu", ["x"], ["a"]),
            helper.make_node("Neg", ["a"], ["b"]),
            helper.make_node("Exp", ["b"], ["c"]),
            helper.make_node("Sigmoid", ["c"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 256])],
    )
    m = Model.from_onnx(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    plan = plan_model(m, inplace=True)
    assert plan.model is not None
    _assert_caller_tensors_untouched(plan, plan.model)
    assert plan.inplace_reused >= 1  # a -> b -> c -> y still reuse each other
    assert prove(plan.model, plan).ok


def test_6_proof_fails_when_a_plan_overwrites_a_graph_input() -> None:
    """The execution proof checks that the caller's inputs are unchanged after the run."""
    from graphopt.algorithms.memory.arena import prove
    from graphopt.core.model import Model
    from graphopt.jobs.plan import plan_model

    g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Neg", ["a"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
    )
    m = Model.from_onnx(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    plan = plan_model(m, inplace=False)
    assert plan.model is not None
    bad = plan.with_offsets({"y": plan.tensors["x"].offset})  # y on top of the dead input
    rep = prove(plan.model, bad)
    assert not rep.ok and "input" in (rep.error or "")


# --------------------------------------------------------------- 8. names from the model


EVIL = "\x1b[31mRED\x1b[0m[bold]b[/bold]\x9b2J\x07\r"


def _evil_model(path: Path) -> Path:
    g = helper.make_graph(
        [
            helper.make_node("Relu", [EVIL], ["t" + EVIL], name="n" + EVIL),
            helper.make_node("Add", ["t" + EVIL, "t" + EVIL], ["y" + EVIL], name="m" + EVIL),
        ],
        "g" + EVIL,
        [helper.make_tensor_value_info(EVIL, TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y" + EVIL, TensorProto.FLOAT, [1, 4])],
    )
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _assert_clean(text: str) -> None:
    for bad in ("\x1b", "\x9b", "\x07", "\r"):
        assert bad not in text, repr(text)


def test_8_fmt_name_escapes_markup_and_control_characters() -> None:
    from graphopt.cli.common import fmt_name, terminal_safe

    s = fmt_name(EVIL)
    _assert_clean(s)
    assert "\\x1b" in s and "\\[bold]" in s
    assert terminal_safe("a\u202eb\tc") == "a\\u202eb\\tc"  # bidi override, tab
    assert terminal_safe("plain name/with.dots:0") == "plain name/with.dots:0"


@pytest.mark.parametrize("command", ["inspect", "optimize", "plan", "run", "fp16"])
def test_8_tables_escape_names(capsys, tmp_path: Path, command: str) -> None:
    m = _evil_model(tmp_path / "evil.onnx")
    argv: list[object] = [command, m]
    if command in ("optimize", "fp16"):
        argv += ["-o", tmp_path / "o.onnx"]
    rc, out, err = _run(capsys, *argv)
    assert rc == 0, err
    _assert_clean(out + err)
    assert "\\x1b[31mRED" in out


def test_8_error_messages_escape_names(capsys, tmp_path: Path) -> None:
    m = _evil_model(tmp_path / "evil.onnx")
    x = tmp_path / "x.npy"
    np.save(x, np.zeros((1, 4), np.float32))
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((2, 2, 2), np.float32))
    for argv in (
        ["run", m, "--input", f"nope{EVIL}={x}"],  # unknown input name (from the command line)
        ["inspect", m, "--input-shape", f"{EVIL}:1x2x3"],  # wrong rank for the evil input
        ["run", m, "--input", f"{EVIL}={bad}"],  # wrong rank: the message names the input
    ):
        rc, out, err = _run(capsys, *argv)
        assert rc == 2, err
        _one_error_line(err)
        _assert_clean(out + err)
        assert "\\x1b" in err


def test_8_log_messages_escape_names(capsys) -> None:
    """Warnings logged with a model name go through the same escaping (the CLI's handler)."""
    import logging

    from graphopt.cli import log_handler

    log = logging.getLogger("graphopt.test_data_safety")
    handler = log_handler()
    log.addHandler(handler)
    try:
        log.warning("node %s is odd", EVIL)
    finally:
        log.removeHandler(handler)
    _, err = capsys.readouterr()
    _assert_clean(err)
    assert "\\x1b" in err


def test_8_log_messages_are_one_line(capsys) -> None:
    """A warning is one line on stderr however long (no wrapping, no columns), in the form of the
    error lines; ``-vv`` adds the logger's name."""
    import logging

    from graphopt.cli import log_handler

    log = logging.getLogger("graphopt.test_data_safety")
    long_path = "/tmp/" + "a-long-folder-name/" * 12 + "out.onnx"
    for verbose, prefix in ((0, "graphopt: warning: "), (2, "graphopt: warning: graphopt.test_")):
        handler = log_handler(verbose)
        log.addHandler(handler)
        try:
            log.warning("%s is written unverified (--no-verify)\nsecond line", long_path)
        finally:
            log.removeHandler(handler)
        _, err = capsys.readouterr()
        assert len(err.splitlines()) == 1, err
        assert err.startswith(prefix) and long_path in err and "\\nsecond line" in err, err


# ---------------------------------------------------------------- helpers for 3 and 7

PY = sys.executable


def _cli(*argv: object, **kw) -> subprocess.Popen:  # type: ignore[no-untyped-def]
    return subprocess.Popen(
        [PY, "-m", "graphopt.cli", *map(str, argv)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def _wait(p: subprocess.Popen, timeout: float = 120) -> tuple[int, str, str]:  # type: ignore[type-arg]
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


# ------------------------------------------- 3. model + external data: writers and kills


def _save_forever(path: str, value: float, ready: int) -> None:
    """Child of a fork: save a tagged model with external data to ``path`` again and again, with
    the command line's signal handling, until a signal ends it (exit 128 + signal). Writes one
    byte to the ``ready`` pipe once the handlers are in place."""
    code = 0
    try:
        from graphopt.cli import handle_signals
        from graphopt.core.model import Model
        from graphopt.core.saver import save

        with handle_signals():
            model = Model.from_onnx(tagged_model(value))
            os.write(ready, b"1")
            while True:
                save(model, path, external=True)
    except KeyboardInterrupt as exc:
        code = 128 + int(getattr(exc, "signum", signal.SIGINT))
    except BaseException:  # noqa: BLE001 - any other failure is a test failure
        import traceback

        traceback.print_exc()
        code = 99
    finally:
        os._exit(code)


def _fork(target: Callable[..., None], *args: object) -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        target(*args)
        os._exit(98)
    return pid


def test_3_writers_and_kills_never_leave_a_mix(tmp_path: Path) -> None:
    """100 tries: two processes save different models with external data to the same output and
    are killed (SIGTERM or SIGKILL, each at its own random moment). After every try the output is
    a complete model whose data is its own write's: the old one or one of the new ones. After
    SIGTERM no temporary is left; what a SIGKILL leaves is removed by the next write."""
    from graphopt.core.model import Model
    from graphopt.core.output import data_file_pattern
    from graphopt.core.saver import save

    rng = np.random.default_rng(18)
    out = tmp_path / "m.onnx"
    save(Model.from_onnx(tagged_model(0.0)), out, external=True)
    seen = {0.0}
    pattern = data_file_pattern(out.name)
    counts = {"SIGTERM": 0, "SIGKILL": 0, "changed": 0}
    killed: set[int] = set()
    for i in range(100):
        values = (2.0 * i + 1.0, 2.0 * i + 2.0)
        r, w = os.pipe()
        pids = [_fork(_save_forever, str(out), v, w) for v in values]
        os.close(w)
        assert os.read(r, 1) and os.read(r, 1)  # both children handle signals now
        os.close(r)
        sigs = [signal.SIGTERM if rng.random() < 0.5 else signal.SIGKILL for _ in pids]
        delays = sorted(zip(rng.uniform(0.0, 0.06, len(pids)), pids, sigs))
        start = time.perf_counter()
        for delay, pid, sig in delays:
            time.sleep(max(0.0, start + delay - time.perf_counter()))
            os.kill(pid, sig)
        for pid, sig in zip(pids, sigs):
            _, status = os.waitpid(pid, 0)
            if sig == signal.SIGKILL:
                assert os.WIFSIGNALED(status) or os.waitstatus_to_exitcode(status) == 143
                counts["SIGKILL"] += 1
            else:
                assert os.waitstatus_to_exitcode(status) == 143, status
                counts["SIGTERM"] += 1
        tag = read_tag(out)  # complete, its own data
        assert tag in seen or tag in values
        counts["changed"] += tag in values
        seen.update(values)
        # only SIGKILL may leave a temporary behind (.graphopt-<pid>-...: of this try, or of an
        # earlier one when this try's writers were stopped before their first clean-up)
        killed.update(pid for pid, sig in zip(pids, sigs) if sig == signal.SIGKILL)
        for name in _leftovers(tmp_path):
            assert int(name.split("-")[1]) in killed, (i, name, pids, sigs)
    save(Model.from_onnx(tagged_model(-1.0)), out, external=True)  # the next write cleans up
    assert read_tag(out) == -1.0
    assert _leftovers(tmp_path) == []
    assert len([p for p in tmp_path.iterdir() if pattern.match(p.name)]) == 1
    assert counts["changed"] > 10, counts  # the kills did land during and after writes


def test_3_cli_writers_and_kills_short_run() -> None:
    """The same through the command line's code path, SHORT: two tries of
    ``bench/data_safety.py`` (two ``graphopt.cli.main`` runs, forked, writing one ``-o`` with
    external data, each given SIGTERM, SIGKILL or nothing at a random moment of its save). The
    100-try run is ``python bench/data_safety.py`` (bench/results/data_safety.md); here the script
    only must not rot."""
    script = Path(__file__).resolve().parent.parent / "bench" / "data_safety.py"
    if not script.is_file():
        pytest.skip("bench/data_safety.py is not in this checkout")
    r = subprocess.run(
        [PY, str(script), "--tries", "2", "--no-write"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "| tries | 2 |" in r.stdout and "failures" in r.stdout and "**0**" in r.stdout, r.stdout


# ----------------------------------------------------- 7. signals and a full disk


def _big_external_model(path: Path, n: int = 2048) -> Path:
    """Identity-like model with about 16 MB of weights in external data (a save takes time)."""
    proto = tagged_model(1.0, n)
    onnx.save(proto, str(path), save_as_external_data=True, location=path.name + ".data")
    return path


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_7_signal_during_a_run_cleans_up(tmp_path: Path, sig: int) -> None:
    """A signal at random moments of ``graphopt optimize`` (loading, passes, verification,
    saving): exit 128 + signal with one line, no traceback, no temporary; the output is absent or
    complete."""
    src = _big_external_model(tmp_path / "big.onnx")
    before = _snapshot(tmp_path)
    rng = np.random.default_rng(int(sig))
    codes = []
    for _ in range(4):
        out = tmp_path / "o" / "out.onnx"
        # a crash of the child (it once died of SIGSEGV here) prints its Python stack to stderr,
        # which the assertions below show
        p = _cli("optimize", src, "-o", out, env={**os.environ, "PYTHONFAULTHANDLER": "1"})
        # before its handlers are installed the interpreter dies of the signal itself (exit -15
        # on a loaded machine where starting Python takes longer than the delay)
        _wait_for_handlers(p.pid)
        time.sleep(float(rng.uniform(0.2, 2.5)))
        p.send_signal(sig)
        rc, _, err = _wait(p)
        codes.append(rc)
        assert rc in (0, 128 + sig), f"exit {rc}: {err}"
        if rc:
            line = _one_error_line(err)
            assert "interrupted" in line, f"exit {rc}: {err}"
        assert _leftovers(tmp_path) == []
        if out.exists():
            read_tag(out)
        shutil.rmtree(out.parent, ignore_errors=True)
        assert _snapshot(tmp_path) == before
    assert 128 + sig in codes, codes


def _wait_for_handlers(pid: int, timeout: float = 30.0) -> None:
    """Wait until ``graphopt`` has installed its signal handlers (SIGTERM caught: the first thing
    main() does, before it imports the command), so that the signal lands in the imports."""
    status = Path(f"/proc/{pid}/status")
    if not status.exists():
        pytest.skip("needs /proc")
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        for line in status.read_text().splitlines():
            if line.startswith("SigCgt:") and int(line.split()[1], 16) & (
                1 << (signal.SIGTERM - 1)
            ):
                return
        time.sleep(0.005)
    raise AssertionError("graphopt never installed its signal handlers")


@pytest.mark.parametrize("delay", [0.0, 0.3, 1.0])
def test_7_early_ctrl_c_prints_no_traceback(tmp_path: Path, delay: float) -> None:
    """Ctrl-C while the command's modules are being imported (numpy, onnx, onnxruntime: the
    first seconds): exit 130 with one line, no KeyboardInterrupt traceback."""
    p = _cli("optimize", fixture_path("cnn.onnx"), "-o", tmp_path / "o.onnx")
    _wait_for_handlers(p.pid)
    time.sleep(delay)
    p.send_signal(signal.SIGINT)
    rc, _, err = _wait(p)
    assert "Traceback" not in err, err
    assert rc in (0, 130), err
    if rc == 130:
        _one_error_line(err)
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("writer", ["model", "staged_files", "atomic_path"])
def test_7_signal_at_the_start_of_a_clean_up_leaves_nothing(
    monkeypatch, tmp_path: Path, writer: str
) -> None:
    """A signal whose exception lands between a writer's ``finally:`` and the critical section
    that removes its temporary (CI saw it once in test_3_writers_and_kills_never_leave_a_mix: a
    SIGTERM'd writer left ``.graphopt-<pid>-*``): the clean-up is skipped there, and the command
    line's signal handling removes what is left when the interruption reaches it."""
    import graphopt.core.output as output
    from graphopt.cli import handle_signals
    from graphopt.core.interrupt import Interrupted

    real_critical = output.critical
    armed: list[int] = []

    def critical_after_the_signal():  # the clean-up's section: the signal came just before it
        if armed:
            armed.clear()
            raise Interrupted(signal.SIGTERM)
        return real_critical()

    monkeypatch.setattr(output, "critical", critical_after_the_signal)
    dest = tmp_path / "out.bin"
    with pytest.raises(Interrupted), handle_signals():
        if writer == "model":
            with output.staged_model_output(dest) as st:
                st.model_path.write_bytes(b"x")
                armed.append(1)
                raise Interrupted(signal.SIGTERM)
        elif writer == "staged_files":
            with output.staged_files(dest) as (tmp,):
                tmp.write_bytes(b"x")
                armed.append(1)
                raise Interrupted(signal.SIGTERM)
        else:
            with output.atomic_path(dest) as tmp:
                tmp.write_bytes(b"x")
                armed.append(1)
                raise Interrupted(signal.SIGTERM)
    assert not armed  # the simulated signal did land at the start of the clean-up
    assert _leftovers(tmp_path) == [] and not dest.exists()


def test_7_signal_while_the_handlers_are_put_back(capsys, monkeypatch, tmp_path: Path) -> None:
    """SIGTERM in the last instants of a run, while ``handle_signals`` puts the old handlers back
    (found by bench/data_safety.py: 1 run in 60): one ``interrupted`` line naming what was
    written, exit 143, no exception out of ``main``."""
    import graphopt.cli as cli
    from graphopt.core.interrupt import Interrupted

    real_reset = cli.reset
    calls = []

    def reset_then_signal() -> None:  # the 2nd call is the one in handle_signals' finally
        calls.append(1)
        real_reset()
        if len(calls) == 2:
            raise Interrupted(signal.SIGTERM)

    monkeypatch.setattr(cli, "reset", reset_then_signal)
    out = tmp_path / "o.onnx"
    rc, _, err = _run(capsys, "optimize", fixture_path("cnn.onnx"), "-o", out)
    assert rc == 143, err
    line = _one_error_line(err)
    assert "interrupted (SIGTERM); already written" in line and str(out) in line
    onnx.checker.check_model(str(out))  # complete


def test_7_signal_during_the_imports_waits_for_them(capsys, monkeypatch) -> None:
    """A signal while the command's modules import (numpy, onnx, onnxruntime initialize C code)
    is held until the imports end, then stops the run: 130 and one line, the import whole (cut
    in two it was 'internal error: ImportError: initialization failed', exit 1, 1 in 40 tries)."""
    import importlib

    import graphopt.cli as cli
    from graphopt.core.interrupt import on_signal

    real_import = importlib.import_module
    finished = []

    def import_with_a_signal(name: str, package: str | None = None):  # type: ignore[no-untyped-def]
        on_signal(signal.SIGINT, None)  # arrives mid-import: held, not raised here
        module = real_import(name, package)
        finished.append(name)
        return module

    monkeypatch.setattr(cli.importlib, "import_module", import_with_a_signal)
    rc, _, err = _run(capsys, "optimize", fixture_path("cnn.onnx"), "-o", "/nonexistent/o.onnx")
    assert rc == 130, err
    assert "interrupted (SIGINT); no output written" in _one_error_line(err)
    # third-party lazy loaders (networkx) import through importlib too when not yet loaded
    assert [n for n in finished if n.startswith("graphopt")] == ["graphopt.cli.optimize"]


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs interval timers")
def test_7_signal_during_a_lazy_import_waits_for_it(tmp_path: Path, monkeypatch) -> None:
    """A signal that lands while a module imported in the middle of a run executes its body
    (numpy.random, sympy, onnx.reference are imported on first use; a C extension cut in two can
    crash the interpreter at exit) is held until the import is over, then raised: the module is
    whole, and the run stops right after."""
    import graphopt.cli as cli
    from graphopt.core.interrupt import Interrupted

    (tmp_path / "slow_module_for_signal_test.py").write_text(
        "import os, signal\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "total = sum(i * i for i in range(300_000))  # the signal is handled in here\n"
        "WHOLE = True\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    reached = []
    with pytest.raises(Interrupted) as info, cli.handle_signals():
        import slow_module_for_signal_test  # noqa: F401, PLC0415

        reached.append("after the import")
        t0 = time.process_time()
        while time.process_time() - t0 < 5.0:  # the retry timer counts CPU time
            sum(range(1000))
        reached.append("never: the held signal was not raised")
    assert info.value.signum == signal.SIGTERM
    assert sys.modules["slow_module_for_signal_test"].WHOLE is True
    assert reached == ["after the import"]
    assert signal.getitimer(signal.ITIMER_VIRTUAL) == (0.0, 0.0)  # the timer is taken down


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_7_signal_after_the_run_says_so_on_one_line(sig: int) -> None:
    """A signal after main() put its handlers back, while the interpreter ends (a run that had
    just finished; test_7_signal_during_a_run_cleans_up saw exit -15 with nothing said on a quiet
    machine): the process entry's handler ends it with 128 + signal and the one line, not a death
    by the signal or a KeyboardInterrupt traceback."""
    code = (
        "import os, signal, graphopt.cli as c\n"
        f"c.main = lambda: (os.kill(os.getpid(), {int(sig)}), 0)[1]\n"
        "c.entry()\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert p.returncode == 128 + sig, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr
    line = _one_error_line(p.stderr)
    assert "interrupted" in line and "no output written" in line, line


def test_7_signal_outside_an_import_is_raised_at_once() -> None:
    """The negative case: a signal in ordinary code is raised where it lands (no timer)."""
    import graphopt.cli as cli
    from graphopt.core.interrupt import Interrupted

    with pytest.raises(Interrupted), cli.handle_signals():
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(10_000):  # a few bytecodes later at most
            pass
        raise AssertionError("the signal was not raised in ordinary code")
    if hasattr(signal, "setitimer"):
        assert signal.getitimer(signal.ITIMER_VIRTUAL) == (0.0, 0.0)


def test_7_error_caused_by_a_signal_is_an_interruption(capsys, monkeypatch) -> None:
    """Library code that turns the interruption into another exception (a C extension's
    ImportError) still ends as an interruption: 130, one line, not 'internal error'."""
    import graphopt.cli as cli
    from graphopt.core.interrupt import Interrupted, on_signal

    def setup_logging_cut(verbose: int) -> None:
        try:
            on_signal(signal.SIGINT, None)
        except Interrupted:
            raise ImportError("initialization failed") from None

    monkeypatch.setattr(cli, "setup_logging", setup_logging_cut)
    rc, _, err = _run(capsys, "inspect", fixture_path("cnn.onnx"))
    assert rc == 130, err
    line = _one_error_line(err)
    assert "interrupted (SIGINT)" in line and "internal error" not in line


class _FullDisk:
    """Writes under ``folder`` fail with ENOSPC once ``limit`` bytes were written there."""

    def __init__(self, folder: Path, limit: int) -> None:
        self.folder = str(folder.resolve())
        self.limit = limit
        self.written = 0


@pytest.fixture
def full_disk(monkeypatch: pytest.MonkeyPatch) -> Callable[[Path, int], None]:
    import builtins
    import errno

    real_open = builtins.open

    def install(folder: Path, limit: int) -> None:
        disk = _FullDisk(folder, limit)

        class Proxy:
            def __init__(self, f) -> None:  # type: ignore[no-untyped-def]
                self._f = f

            def write(self, data) -> int:  # type: ignore[no-untyped-def]
                n = len(memoryview(data).cast("B")) if not isinstance(data, str) else len(data)
                if disk.written + n > disk.limit:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                disk.written += n
                return self._f.write(data)

            def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
                return getattr(self._f, name)

            def __enter__(self):  # type: ignore[no-untyped-def]
                return self

            def __exit__(self, *exc) -> None:  # type: ignore[no-untyped-def]
                self._f.close()

        def fake_open(file, mode="r", *args, **kwargs):  # type: ignore[no-untyped-def]
            f = real_open(file, mode, *args, **kwargs)
            where = os.path.realpath(os.fspath(file)) if not isinstance(file, int) else ""
            if any(c in mode for c in "wax+") and where.startswith(disk.folder + os.sep):
                return Proxy(f)
            return f

        monkeypatch.setattr(builtins, "open", fake_open)

    return install


@pytest.mark.parametrize("case", ["model", "external-data", "report", "memplan", "run-npz", "plot"])
def test_7_full_disk_exit_2_names_the_path_and_leaves_nothing(
    capsys, tmp_path: Path, full_disk, case: str
) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    src = tmp_path / "m.onnx"
    shutil.copy(fixture_path("cnn.onnx"), src)
    ext = _big_external_model(tmp_path / "ext.onnx", 256)
    argv: list[object] = {
        "model": ["optimize", src, "-o", disk / "o.onnx"],
        "external-data": ["optimize", ext, "-o", disk / "o.onnx"],
        "report": ["optimize", src, "-o", tmp_path / "o.onnx", "--report", disk / "r.html"],
        "memplan": ["plan", src, "-o", disk / "p.onnx"],
        "run-npz": ["run", src, "-o", disk / "o.npz"],
        "plot": ["plan", src, "--plot", disk / "p.png"],
    }[case]
    before = _snapshot(tmp_path)
    full_disk(disk, 100)
    rc, _, err = _run(capsys, *argv)
    assert rc == 2, err
    line = _one_error_line(err)
    assert str(disk) in line and "No space left on device" in line
    assert sorted(p.name for p in disk.iterdir()) == []  # no temporary, no zero-byte file
    after = _snapshot(tmp_path)
    for name, sha in before.items():
        assert after.get(name) == sha


def test_7_plan_and_its_json_are_published_together(
    capsys, tmp_path: Path, full_disk, monkeypatch
) -> None:
    """A planned model and its OUT.memplan.json: a run that fails after the model was staged
    (full disk on the plan, or a crash before publishing) leaves the previous pair intact."""
    src = tmp_path / "m.onnx"
    shutil.copy(fixture_path("residual.onnx"), src)
    out = tmp_path / "o" / "p.onnx"
    rc, _, err = _run(capsys, "plan", src, "-o", out)
    assert rc == 0, err
    side = Path(str(out) + ".memplan.json")
    pair = (_sha(out), _sha(side))
    full_disk(out.parent, 2_000)  # the JSON (written first) fits, the model does not
    rc, _, err = _run(capsys, "plan", src, "-o", out, "--no-inplace")
    assert rc == 2 and "No space left on device" in err
    assert (_sha(out), _sha(side)) == pair
    assert sorted(p.name for p in out.parent.iterdir()) == ["p.onnx", "p.onnx.memplan.json"]


def test_7_full_disk_on_a_real_tiny_filesystem(tmp_path: Path) -> None:
    """The same with a real 32 KiB tmpfs (needs unshare + mount in a user namespace)."""
    if not shutil.which("unshare") or sys.platform != "linux":
        pytest.skip("unshare not available")
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=32k tmpfs {tmp_path}"],
        capture_output=True,
    )
    if probe.returncode != 0:
        pytest.skip("cannot mount a tmpfs in a user namespace here")
    disk = tmp_path / "disk"
    disk.mkdir()
    ext = _big_external_model(tmp_path / "ext.onnx", 256)
    script = (
        f"mount -t tmpfs -o size=32k tmpfs {disk} && "
        f"{PY} -m graphopt.cli optimize {ext} -o {disk}/o.onnx; echo rc=$?; ls -A {disk}"
    )
    r = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True)
    assert "rc=2" in r.stdout, (r.stdout, r.stderr)
    assert "No space left on device" in r.stderr and f"{disk}/o.onnx" in r.stderr
    assert r.stdout.strip().splitlines()[-1] == "rc=2"  # ls -A printed nothing
    assert "Traceback" not in r.stderr
