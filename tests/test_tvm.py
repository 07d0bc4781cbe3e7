"""graphopt.algorithms.tvm.emit: compile through Apache TVM (Relax) for llvm, aarch64 (qemu) and
cuda (nvcc).

Compiles are the slow part (seconds each on two cores), so each artifact is built once per module
and shared; shapes are the small test shapes. Speed is never asserted here (see bench/tvm.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from graphopt.core.errors import GraphoptError
from graphopt.core.feeds import random_feeds
from graphopt.core.loader import load
from graphopt.core.session import run_model
from graphopt.core.verify import compare
from graphopt.fixtures import FIXTURES, fixture_path

tvm = pytest.importorskip("tvm", reason="apache-tvm is not installed (pip install 'graphopt[tvm]')")

from graphopt.algorithms.tvm import emit as gtvm  # noqa: E402
from graphopt.algorithms.tvm import qemu as gqemu  # noqa: E402
from graphopt.algorithms.tvm import runner as grunner  # noqa: E402
from graphopt.jobs import compile as gcompile  # noqa: E402

pytestmark = pytest.mark.tvm

RTOL, ATOL = 1e-4, 1e-5


def _real(name: str) -> tuple[Path, dict[str, tuple[int, ...]]]:
    from graphopt.fixtures import real_model

    try:
        return real_model(name)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


def _assert_matches_ort(
    model_path: Path, artifact: Path, shapes: Mapping[str, tuple[int, ...]], seed: int = 1
) -> None:
    model = load(model_path)
    feeds = random_feeds(model, seed=seed, shapes=shapes)
    ref = run_model(model, feeds)
    out = grunner.load_artifact(artifact).run(feeds)
    assert set(out) == set(ref)
    for name, r in ref.items():
        diff = compare(name, r, out[name], RTOL, ATOL)
        assert diff.ok, f"{name}: max abs err {diff.max_abs_err:.3g}, cosine {diff.cosine:.6f}"


@pytest.fixture(scope="module")
def cls_llvm(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[gcompile.CompileResult, Path, dict]:
    path, shapes = _real("cls")
    out = tmp_path_factory.mktemp("tvm") / "cls.so"
    res = gcompile.compile_model(path, target="llvm", output=out, input_shapes=shapes)
    return res, path, shapes


# ---------------------------------------------------------------------- llvm


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_compiles_for_llvm_and_matches_onnxruntime(tmp_path: Path, name: str) -> None:
    path = fixture_path(name)
    shapes = {"x": (2, 1, 8, 8)} if name == "digits_cnn.onnx" else None  # dynamic batch
    res = gcompile.compile_model(path, target="llvm", output=tmp_path / "m.so", input_shapes=shapes)
    assert res.artifact.is_file() and res.artifact_bytes == res.artifact.stat().st_size > 0
    assert res.verify is not None and res.verify.ok and res.verified_on == "host"
    man = json.loads(res.manifest.read_text())
    assert man["target"] == "llvm" and man["inputs"]
    assert man["schedules"] is True and "none" not in res.schedules
    shapes = {i["name"]: tuple(i["shape"]) for i in man["inputs"]}
    _assert_matches_ort(path, res.artifact, shapes, seed=3)


@pytest.mark.real
def test_cls_compiles_for_llvm_and_matches_onnxruntime(cls_llvm) -> None:
    res, path, shapes = cls_llvm
    assert res.verify.ok
    assert res.fusion_groups, "graphopt's Conv+activation groups reach the compiler"
    # the Conv+HardSwish+MaxPool group is one kernel, and every kernel got a graphopt schedule
    assert any("conv2d" in k and "pool" in k for k in res.kernels), res.kernels
    assert "none" not in res.schedules and sum(res.schedules.values()) == len(res.kernels)
    man = json.loads(res.manifest.read_text())
    assert man["inputs"] == [{"name": "x", "shape": [1, 3, 48, 192], "dtype": "float32"}]
    assert len(man["outputs"]) == 1
    assert res.to_json()["verify"]
    _assert_matches_ort(path, res.artifact, shapes)


@pytest.mark.real
def test_runner_script_runs_artifact_without_graphopt(cls_llvm, tmp_path: Path) -> None:
    """graphopt/algorithms/tvm/runner.py needs only numpy and TVM's runtime (what a deployment
    box has)."""
    res, path, shapes = cls_llvm
    x = np.random.default_rng(0).standard_normal(shapes["x"]).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    runner = Path(grunner.__file__).resolve()
    env = dict(os.environ, TVM_USE_RUNTIME_LIB="1")
    proc = subprocess.run(
        [
            sys.executable,
            str(runner),
            str(res.artifact),
            "--input",
            f"x={tmp_path / 'x.npy'}",
            "--output",
            str(tmp_path / "o.npz"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    ref = run_model(load(path), {"x": x})
    with np.load(tmp_path / "o.npz") as z:
        for name, r in ref.items():
            assert compare(name, r, z[name], RTOL, ATOL).ok


def test_bench_artifact_reports_latency_and_error(tmp_path: Path) -> None:
    path = fixture_path("cnn.onnx")
    res = gcompile.compile_model(path, output=tmp_path / "c.so", verify=False)
    rep = gcompile.bench_artifact(res.artifact, path, runs=5, warmup=1)
    assert rep.tvm_ms > 0 and rep.ort_ms > 0 and rep.ratio_tvm_vs_ort > 0
    assert all(v["ok"] for v in rep.verify.values())


def test_artifact_rejects_wrong_input_shape(tmp_path: Path) -> None:
    res = gcompile.compile_model(
        fixture_path("residual.onnx"), output=tmp_path / "r.so", verify=False
    )
    art = grunner.load_artifact(res.artifact)
    with pytest.raises(ValueError, match="compiled for"):
        art.run({"x": np.zeros((1, 16, 8, 8), np.float32)})
    with pytest.raises(KeyError, match="missing input"):
        art.run({})


@pytest.mark.real
def test_published_rec_fails_in_relax_importer_and_imports_after_graphopt() -> None:
    """As published, PP-OCR's Shape->Slice->Concat->Reshape chains break Relax's importer."""
    path, shapes = _real("rec")
    model = load(path)
    with pytest.raises(gtvm.TVMCompileError, match="importer"):
        gtvm.import_relax(model.to_onnx(), shapes)
    prepared, info = gcompile.prepare_model(model, shapes)
    assert not any(n.op in ("Shape", "Size") for n in prepared.graph.nodes)
    mod = gtvm.import_relax(prepared.to_onnx(), info["input_shapes"])
    assert "main" in [gv.name_hint for gv in mod.get_global_vars()]


# ---------------------------------------------------------------------- errors


def test_dynamic_input_without_shape_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(GraphoptError, match="--input-shape"):
        gcompile.compile_model(fixture_path("digits_cnn.onnx"), output=tmp_path / "d.so")


def test_unknown_target_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(GraphoptError, match="unknown target"):
        gcompile.compile_model(fixture_path("cnn.onnx"), target="riscv", output=tmp_path / "c.so")


def test_parse_target() -> None:
    assert gtvm.parse_target("aarch64").target["mtriple"] == "aarch64-linux-gnu"
    assert gtvm.parse_target("cuda:sm_90").target["arch"] == "sm_90"
    assert gtvm.parse_target("cuda -arch=sm_80").target["arch"] == "sm_80"
    assert gtvm.parse_target("llvm").target["kind"] == "llvm"


# ---------------------------------------------------------------------- aarch64 under qemu


@pytest.mark.real
@pytest.mark.slow
def test_cls_aarch64_runs_under_qemu_and_matches_onnxruntime(tmp_path: Path) -> None:
    if shutil.which("aarch64-linux-gnu-gcc") is None:
        pytest.skip(
            "no AArch64 cross compiler (apt-get install gcc-aarch64-linux-gnu; "
            "scripts/install-tvm-deps.sh)"
        )
    why = gqemu.qemu_unavailable_reason()
    if why:
        pytest.skip(why)
    path, shapes = _real("cls")
    res = gcompile.compile_model(
        path, target="aarch64", output=tmp_path / "cls_arm.so", input_shapes=shapes
    )
    out = (
        subprocess.run(["file", str(res.artifact)], capture_output=True, text=True).stdout
        if shutil.which("file")
        else "aarch64"
    )
    assert "aarch64" in out.lower()
    # compile_model ran it under qemu on seeded inputs; check the figures it recorded
    assert res.verified_on == "qemu-aarch64"
    assert res.verify is not None and res.verify.ok
    for d in res.verify.outputs:
        assert d.max_abs_err <= ATOL + RTOL * d.max_ref


# ---------------------------------------------------------------------- cuda (no GPU needed)


def test_cuda_builds_and_nvcc_compiles_its_source(tmp_path: Path) -> None:
    res = gcompile.compile_model(
        fixture_path("mobilenet_block.onnx"), target="cuda:sm_90", output=tmp_path / "mb_cuda.so"
    )
    assert res.artifact.is_file()
    assert json.loads(res.manifest.read_text())["target"] == "cuda"
    if shutil.which("nvcc") is None:
        assert res.cuda_source_checked is None
        pytest.skip("nvcc not on PATH: CUDA library built, generated source not compiled")
    assert res.cuda_source_checked is True


@pytest.mark.real
def test_rec_lowers_to_the_kernels_its_latency_was_measured_with() -> None:
    """The structure behind rec's TVM latency (bench/tvm.py; bench/tvm_revisions.py times the
    library of every revision side by side): the graph that reaches Relax has no shape
    arithmetic, BatchNormalization or data-dependent ops left, every fused kernel gets a graphopt
    rule with static shapes and vector loops, and rec, above the small-model threshold, keeps
    parallel loops in its convolutions. The histogram of rules is the one of the 2026-11-22
    library (59 kernels); a change of it on purpose is re-measured with bench/tvm_revisions.py."""
    from collections import Counter

    from graphopt.algorithms.tvm.schedules import ApplyCPUSchedules

    path, _ = _real("rec")
    shapes = {"x": (1, 3, 48, 320)}
    prepared, info = gcompile.prepare_model(load(path), shapes)
    ops = Counter(n.op for n in prepared.graph.nodes)
    left = {"Shape", "Size", "BatchNormalization", "Gather", "ConstantOfShape", "Expand", "Range"}
    assert not left & set(ops), ops
    spec = gcompile.schedule_spec(gtvm.parse_target("llvm"), info["macs"])
    assert spec.num_cores == gtvm.parse_target("llvm").num_cores  # not treated as a small model
    fused = gtvm.fused_module(
        gtvm.import_relax(prepared.to_onnx(), info["input_shapes"]),
        spec,
        info["pool_groups"] > 0,
    )
    sched = ApplyCPUSchedules(lanes=spec.vector_lanes, cores=spec.num_cores)
    with spec.tvm_target():  # as in the compile pipeline
        mod = sched(fused)  # type: ignore[operator]  # a TVM module pass
    # 2026-12-04: the two attention matmuls ([1, 8, 40, 15] x [1, 8, 15, 40] and back) went to
    # the conv template (the matmul template runs them 1.7x / 3.5x faster), the three
    # squeeze-excitation 1x1 convs on the pooled vector go to the dot template
    assert dict(sched.stats) == {
        "conv": 30,
        "dot": 3,
        "injective": 14,
        "matmul": 7,
        "dlight-reduction": 5,
    }
    kernels = {
        gv.name_hint: f.script()
        for gv, f in mod.functions_items()
        if isinstance(f, tvm.tirx.PrimFunc)
    }
    assert len(kernels) == 59
    for name, text in kernels.items():
        assert "T.int64()" not in text and "T.var(" not in text, f"{name} has a dynamic shape"
    convs = {k: t for k, t in kernels.items() if "conv2d" in k}
    assert len(convs) == 30
    if spec.num_cores > 1:
        # small ones stay under the work threshold that makes waking the pool worth it: three,
        # and two of the squeeze-excitation matrix-vector products (dot template, 2026-12-04)
        serial = [k for k, t in convs.items() if "T.parallel(" not in t]
        assert len(serial) <= 5, f"convolutions without parallel loops: {serial}"
    scalar = [k for k, t in convs.items() if "T.vectorized(" not in t]
    assert not scalar, f"convolutions without vector loops: {scalar}"
