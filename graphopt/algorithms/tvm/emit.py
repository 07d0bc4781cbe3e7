"""Compile a model to a native library through Apache TVM (Relax), for x86, AArch64 or CUDA.

Flow: graphopt's passes first (input shapes fixed, shape arithmetic folded, BatchNormalization
folded into Conv, activations recognized, Conv+activation(+pool) groups recorded), then Relax's ONNX
importer, then a Relax pipeline that TVM's default ``tvm.compile`` does not run on CPU:
legalization, constant folding, operator fusion (graphopt's fusion groups become single kernels),
TIR fusion, then graphopt's own CPU schedules (:mod:`graphopt.algorithms.tvm.schedules`) or DLight's GPU
rules, then the VM lowering passes. The result is exported as a shared library beside a JSON
manifest (inputs, outputs, target) that :func:`load_artifact` and :mod:`graphopt.algorithms.tvm.runner` read.

Why graphopt goes first: as published, PP-OCR's ``Shape -> Slice -> Concat -> Reshape`` chains and
YOLO-style dynamic shapes fail in Relax's importer ("Reshape requires the input new shape to be
Shape", "emit_te now only supports Tensor that has ShapeExpr shape"); after fixing input shapes and
folding they import and build.

TVM is imported lazily: ``import graphopt`` never needs it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from graphopt.algorithms.tvm.runner import (
    MANIFEST_SUFFIX,
    Artifact,
    load_artifact,
    manifest_path_for,
)
from graphopt.core.errors import GraphoptError, VerificationError
from graphopt.core.model import Model

logger = logging.getLogger(__name__)

__all__ = [
    "ARM64_ROOT",
    "Artifact",
    "CompileResult",
    "TVMUnavailableError",
    "TargetSpec",
    "bench_artifact",
    "compile_model",
    "import_relax",
    "load_artifact",
    "parse_target",
    "prepare_model",
    "qemu_unavailable_reason",
    "run_under_qemu",
    "tvm_available",
]

#: names accepted by ``--target``
TARGETS = ("llvm", "aarch64", "cuda")


class TVMUnavailableError(GraphoptError):
    """apache-tvm is not installed (``pip install 'graphopt[tvm]'``)."""


class TVMCompileError(GraphoptError):
    """TVM could not import or build the model; the message names the stage."""

    exit_code = 1


def tvm_available() -> bool:
    """Whether ``import tvm`` works in this interpreter."""
    try:
        _tvm()
    except TVMUnavailableError:
        return False
    return True


def _tvm() -> Any:
    try:
        import tvm  # noqa: PLC0415
        from tvm import relax  # noqa: F401, PLC0415
    except Exception as exc:  # ImportError, or a broken native library
        raise TVMUnavailableError(
            f"apache-tvm is not usable here ({type(exc).__name__}: {exc}); "
            "install it with: pip install 'graphopt[tvm]'") from None
    return tvm


# ---------------------------------------------------------------------- targets


@dataclass
class TargetSpec:
    """A resolved compilation target."""

    name: str                       # llvm | aarch64 | cuda
    target: dict[str, Any]          # TVM target dict (``{"kind": "llvm", ...}``)
    host: dict[str, Any] | None     # host target for device targets
    cross_cc: str | None = None     # C compiler used to link the exported library
    vector_lanes: int = 8           # float32 lanes of the widest vector unit
    num_cores: int = 1

    def tvm_target(self) -> Any:
        tvm = _tvm()
        if self.host is not None:
            return tvm.target.Target(self.target, host=self.host)
        return tvm.target.Target(self.target)


def _host_llvm() -> tuple[dict[str, Any], int]:
    tvm = _tvm()
    cpu = str(tvm.target.codegen.llvm_get_system_cpu())
    lanes = 8
    try:
        feats = Path("/proc/cpuinfo").read_text().split()
        if "avx512f" in feats:
            lanes = 16
        elif "avx2" not in feats and "avx" not in feats:
            lanes = 4
    except OSError:
        pass
    target: dict[str, Any] = {"kind": "llvm", "mcpu": cpu, "num-cores": os.cpu_count() or 1}
    return target, lanes


def parse_target(target: str) -> TargetSpec:
    """Resolve ``llvm``, ``aarch64``, ``cuda``, ``cuda:sm_80`` (or ``cuda -arch=sm_80``).

    Raises:
        GraphoptError: for an unknown target name.
    """
    t = target.strip().lower().replace(" -arch=", ":")
    cores = os.cpu_count() or 1
    if t in ("llvm", "x86", "x86_64", "host", "cpu"):
        tgt, lanes = _host_llvm()
        return TargetSpec("llvm", tgt, None, None, lanes, cores)
    if t in ("aarch64", "arm64", "arm"):
        tgt = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"],
               "num-cores": 4}
        return TargetSpec("aarch64", tgt, None, "aarch64-linux-gnu-gcc", 4, 4)
    if t.startswith("cuda"):
        arch = t.split(":", 1)[1] if ":" in t else "sm_80"
        if not arch.startswith("sm_"):
            arch = "sm_" + arch
        host, lanes = _host_llvm()
        cuda = {"kind": "cuda", "arch": arch, "max_shared_memory_per_block": 49152,
                "max_threads_per_block": 1024, "thread_warp_size": 32}
        return TargetSpec("cuda", cuda, host, None, lanes, cores)
    raise GraphoptError(f"unknown target '{target}'; use one of: llvm, aarch64, cuda[:sm_80|sm_90]")


# ---------------------------------------------------------------------- graphopt's passes


def _parse_shapes(model: Model, input_shapes: Mapping[str, Sequence[int]] | None
                  ) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for t in model.graph.inputs:
        if input_shapes and t.name in input_shapes:
            shapes[t.name] = tuple(int(d) for d in input_shapes[t.name])
        else:
            dims = list(t.shape or [])
            if not dims or not all(isinstance(d, int) and d > 0 for d in dims):
                raise GraphoptError(
                    f"input '{t.name}' has dynamic shape {dims}; TVM needs a fixed shape: pass "
                    f"--input-shape {t.name}:1x3x640x640 (input_shapes={{'{t.name}': (...)}})")
            shapes[t.name] = tuple(int(d) for d in dims)
    unknown = set(input_shapes or {}) - {t.name for t in model.graph.inputs}
    if unknown:
        raise GraphoptError(f"--input-shape names unknown inputs {sorted(unknown)}; inputs are "
                            f"{[t.name for t in model.graph.inputs]}")
    return shapes


_POOL_OPS = ("MaxPool", "AveragePool")


def prepare_model(model: Model, input_shapes: Mapping[str, Sequence[int]] | None = None
                  ) -> tuple[Model, dict[str, Any]]:
    """Run graphopt's default pipeline for TVM on a copy of ``model``: fix input shapes, infer and
    fold shapes, fold BatchNormalization, recognize activations, record Conv+activation(+pool)
    groups.

    Returns:
        (prepared model, info) where info holds the fixed shapes, per-pass stats and fusion groups.
    """
    from graphopt.jobs.optimize import optimize_model  # noqa: PLC0415

    shapes = _parse_shapes(model, input_shapes)
    res = optimize_model(model, target="portable", input_shapes=shapes, verify_output=False)
    m = res.model
    info: dict[str, Any] = {"input_shapes": {k: list(v) for k, v in shapes.items()},
                            "passes": res.stats(), "nodes_before": model.num_nodes(),
                            "nodes_after": m.num_nodes()}
    if _has_shape_ops(m):
        # what the folding passes left (shapes they could not prove static): fold with the exact
        # values onnxruntime computes for the fixed input shapes
        logger.info("folding %d Shape/Size nodes left after graphopt's passes",
                    sum(1 for n in m.graph.nodes if n.op in ("Shape", "Size")))
        _fold_shape_computations(m, shapes)
    groups = m.metadata.get("graphopt.fusion_groups")
    info["fusion_groups"] = json.loads(groups) if groups else []
    try:
        from graphopt.core.cost import model_cost  # noqa: PLC0415

        info["macs"] = int(model_cost(m).macs)
    except Exception as exc:  # noqa: BLE001 - cost analysis is advisory here
        logger.debug("cost analysis failed: %s", exc)
        info["macs"] = None
    ops = {n.name: n.op for n in m.graph.nodes}
    info["pool_groups"] = sum(1 for g in info["fusion_groups"]
                              if any(ops.get(n) in _POOL_OPS for n in g))
    return m, info


def _has_shape_ops(m: Model) -> bool:
    return any(n.op in ("Shape", "Size") for n in m.graph.nodes)


def _fold_shape_computations(m: Model, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Replace ``Shape``/``Size`` outputs by constants (the values onnxruntime computes for the
    input shapes) and fold the constant subgraphs that hang off them."""
    import onnx_graphsurgeon as gs  # noqa: PLC0415
    import onnxruntime as ort  # noqa: PLC0415

    nodes = [n for n in m.graph.nodes if n.op in ("Shape", "Size")]
    if not nodes:
        return
    probe = m.to_onnx()
    del probe.graph.value_info[:]
    for n in nodes:
        probe.graph.output.append(
            onnx.helper.make_tensor_value_info(n.outputs[0].name, onnx.TensorProto.INT64, None))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feeds = {i.name: np.zeros(shapes[i.name], _ort_dtype(i.type)) for i in sess.get_inputs()}
    names = [o.name for o in sess.get_outputs()]
    values = dict(zip(names, sess.run(None, feeds), strict=True))
    for n in nodes:
        out = n.outputs[0]
        const = gs.Constant(out.name + "__folded", np.asarray(values[out.name], dtype=np.int64))
        for consumer in list(out.outputs):
            for i, t in enumerate(consumer.inputs):
                if t is out:
                    consumer.inputs[i] = const
        n.outputs.clear()
    m.graph.cleanup().toposort()
    try:
        m.graph.fold_constants(fold_shapes=True)
    except Exception as exc:  # graphsurgeon's folding is best effort
        logger.debug("graphsurgeon fold_constants failed: %s", exc)
    m.graph.cleanup().toposort()


def _ort_dtype(t: str) -> Any:
    return {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(int64)": np.int64,
            "tensor(int32)": np.int32, "tensor(uint8)": np.uint8, "tensor(int8)": np.int8,
            "tensor(bool)": np.bool_, "tensor(float16)": np.float16}.get(t, np.float32)


# ---------------------------------------------------------------------- Relax


def import_relax(proto: onnx.ModelProto, shapes: Mapping[str, Sequence[int]]) -> Any:
    """Relax's ONNX importer with fixed shapes; errors become :class:`TVMCompileError`."""
    _tvm()
    from tvm.relax.frontend.onnx import from_onnx  # noqa: PLC0415

    dtypes = {}
    for i in proto.graph.input:
        dtypes[i.name] = onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type).name
    try:
        mod = from_onnx(proto, shape_dict={k: list(v) for k, v in shapes.items()},
                        dtype_dict=dtypes, opset=_default_opset(proto))
    except Exception as exc:
        msg = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise TVMCompileError(f"TVM's ONNX importer failed: {type(exc).__name__}: {msg}") from exc
    return mod


def _default_opset(proto: onnx.ModelProto) -> int | None:
    for o in proto.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    return None


def relax_pipeline(spec: TargetSpec, schedules: bool = True, fuse_pools: bool = False,
                   record: dict[str, Any] | None = None) -> Any:
    """graphopt's Relax pipeline for ``spec``: legalize, fold, fuse, schedule, lower.

    ``fuse_pools``: graphopt recorded Conv+activation+pool groups; compile each as one kernel.
    ``record``: filled with ``kernels`` (fused kernel names) and ``schedules`` (rule -> count)."""
    tvm = _tvm()
    from tvm import relax  # noqa: PLC0415

    target = spec.tvm_target()

    @tvm.transform.module_pass(opt_level=0, name="GraphoptRelaxPipeline")
    def _pipeline(mod: Any, _ctx: Any) -> Any:
        with target:
            passes = [
                relax.transform.DecomposeOpsForInference(),
                relax.transform.CanonicalizeBindings(),
                relax.transform.FoldConstant(),
                relax.backend.DispatchSampling(),
                relax.backend.DispatchSortScan(),
                relax.transform.LegalizeOps(),
                relax.transform.AnnotateTIROpPattern(),
                *([_FusePoolIntoProducer()] if fuse_pools else []),
                relax.transform.FoldConstant(),
                relax.transform.FuseOps(),
                relax.transform.FuseTIR(),
                relax.transform.DeadCodeElimination(),
            ]
            mod = tvm.transform.Sequential(passes)(mod)
            if record is not None:
                record["kernels"] = sorted(gv.name_hint for gv, f in mod.functions_items()
                                           if isinstance(f, tvm.tirx.PrimFunc))
            if spec.name == "cuda":
                from tvm.s_tir import dlight as dl  # noqa: PLC0415

                mod = dl.ApplyDefaultSchedule(
                    dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                    dl.gpu.GeneralReduction(), dl.gpu.Fallback())(mod)
            elif schedules:
                from graphopt.algorithms.tvm.schedules import ApplyCPUSchedules  # noqa: PLC0415

                sched = ApplyCPUSchedules(lanes=spec.vector_lanes, cores=spec.num_cores)
                mod = sched(mod)  # type: ignore[operator]  # a TVM module pass
                if record is not None:
                    record["schedules"] = dict(sched.stats)
            lower = [
                relax.transform.RewriteDataflowReshape(),
                relax.transform.ToNonDataflow(),
                relax.transform.RemovePurityChecking(),
                relax.transform.CallTIRRewrite(),
                relax.transform.StaticPlanBlockMemory(),
            ]
            if spec.name == "cuda":
                lower.append(relax.transform.RewriteCUDAGraph())
            lower += [
                relax.transform.LowerAllocTensor(),
                relax.transform.KillAfterLastUse(),
                relax.transform.LowerRuntimeBuiltin(),
                relax.transform.ComputePrimValue(),
                relax.transform.VMShapeLower(),
                relax.transform.AttachGlobalSymbol(),
            ]
            mod = tvm.transform.Sequential(lower)(mod)
        return mod

    return _pipeline


_POOL_PREFIXES = ("max_pool", "avg_pool", "pool")


def _FusePoolIntoProducer() -> Any:  # noqa: N802 - a pass constructor
    """Let FuseOps put a pooling kernel into its producer's group, so that graphopt's
    Conv+activation+pool groups become one kernel (TVM marks pooling ``OutEWiseFusable``, which
    FuseOps never merges with a convolution)."""
    tvm = _tvm()

    @tvm.transform.module_pass(opt_level=0, name="GraphoptFusePoolIntoProducer")
    def _pass(mod: Any, _ctx: Any) -> Any:
        for gv, func in list(mod.functions_items()):
            if isinstance(func, tvm.tirx.PrimFunc) and gv.name_hint.startswith(_POOL_PREFIXES):
                # kElemWise: may join a convolution group as its last stage (FuseTIR composes
                # the real loop nests, so the result is exact)
                mod[gv] = func.with_attr("op_pattern", 0)
        return mod

    return _pass


def build_relax(mod: Any, spec: TargetSpec, pipeline: str = "graphopt", schedules: bool = True,
                fuse_pools: bool = False, record: dict[str, Any] | None = None) -> Any:
    """Build a Relax module; ``pipeline`` is ``graphopt`` or ``tvm-default`` (``tvm.compile``)."""
    tvm = _tvm()
    from tvm import relax  # noqa: PLC0415

    target = spec.tvm_target()
    mod, _params = relax.frontend.detach_params(mod)
    try:
        if pipeline == "tvm-default":
            return tvm.compile(mod, target=target)
        return tvm.compile(mod, target=target,
                           relax_pipeline=relax_pipeline(spec, schedules, fuse_pools, record))
    except Exception as exc:
        msg = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise TVMCompileError(f"TVM build for {spec.name} failed: {type(exc).__name__}: {msg}"
                              ) from exc


# ---------------------------------------------------------------------- compile


@dataclass
class CompileResult:
    """What :func:`compile_model` produced."""

    target: str
    artifact: Path
    manifest: Path
    compile_seconds: float
    artifact_bytes: int
    stages: dict[str, float] = field(default_factory=dict)
    #: True when nvcc compiled the generated CUDA source; None when not checked
    cuda_source_checked: bool | None = None
    #: comparison with onnxruntime on seeded inputs (None when the library could not be run here)
    verify: Any = None
    #: where the library ran for verification: "host", "qemu-aarch64", or None
    verified_on: str | None = None
    passes: dict[str, Any] = field(default_factory=dict)
    fusion_groups: list[list[str]] = field(default_factory=list)
    #: the fused TIR kernels of the library (one per graphopt fusion group, plus the rest)
    kernels: list[str] = field(default_factory=list)
    #: graphopt CPU schedule rule -> number of kernels it scheduled ("none": left as TVM wrote it)
    schedules: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """JSON for ``graphopt compile --json`` (keys ``target``, ``artifact``, ``verify`` as in the
        CLI contract, plus ``manifest``, ``compile_seconds``, ``artifact_bytes``, ``stages``...)."""
        return {
            "target": self.target,
            "artifact": str(self.artifact),
            "manifest": str(self.manifest),
            "compile_seconds": round(self.compile_seconds, 3),
            "artifact_bytes": self.artifact_bytes,
            "stages": {k: round(v, 3) for k, v in self.stages.items()},
            "verify": self.verify.to_json() if self.verify is not None else None,
            "verified_on": self.verified_on,
            "cuda_source_checked": self.cuda_source_checked,
            "fusion_groups": len(self.fusion_groups),
            "kernels": len(self.kernels),
            "schedules": self.schedules,
        }


def _io_desc(values: Sequence[Any], shapes: Mapping[str, Sequence[int]] | None = None
             ) -> list[dict[str, Any]]:
    out = []
    for v in values:
        shape = list(shapes[v.name]) if shapes and v.name in shapes else list(v.shape or [])
        dtype = np.dtype(v.dtype).name if v.dtype is not None else "float32"
        out.append({"name": v.name, "shape": [int(d) if isinstance(d, int) else str(d)
                                              for d in shape], "dtype": dtype})
    return out


def compile_model(model: Model | str | os.PathLike[str], target: str = "llvm",
                  output: str | os.PathLike[str] = "model.so",
                  input_shapes: Mapping[str, Sequence[int]] | None = None,
                  schedules: bool = True, check_cuda_source: bool = True,
                  verify: bool = True) -> CompileResult:
    """Compile ``model`` into a native library ``output`` plus a JSON manifest beside it.

    Args:
        model: a :class:`Model` or the path of an ONNX file.
        target: ``llvm`` (this host, its CPU), ``aarch64`` (cross-compiled for AArch64 Linux with
            NEON), or ``cuda`` / ``cuda:sm_80`` / ``cuda:sm_90``.
        output: the library to write (``.so``); the manifest goes to ``<output>.json``.
        input_shapes: fixed shapes for dynamic inputs, ``{name: (1, 3, 640, 640)}``.
        schedules: apply graphopt's CPU schedules (False leaves TVM's naive loops, for comparison).
        check_cuda_source: for CUDA, compile the generated source with ``nvcc -cubin`` when nvcc is
            on PATH (the result is recorded in ``CompileResult.cuda_source_checked``).
        verify: run the library on seeded random inputs and compare with onnxruntime (on this host
            for llvm, under qemu-user for aarch64 when available; CUDA needs a GPU and is skipped).

    Returns:
        A :class:`CompileResult`.

    Raises:
        TVMUnavailableError: apache-tvm is not installed.
        TVMCompileError: import or build failed (the message names the stage).
        VerificationError: the library's outputs differ from onnxruntime's (nothing is written).
        GraphoptError: bad target, or dynamic inputs without ``input_shapes``.
    """
    tvm = _tvm()
    if not isinstance(model, Model):
        model = Model.load(model)
    spec = parse_target(target)
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    stages: dict[str, float] = {}
    prepared, info = prepare_model(model, input_shapes)
    stages["graphopt_passes"] = time.perf_counter() - t0
    proto = prepared.to_onnx()
    shapes = info["input_shapes"]
    t1 = time.perf_counter()
    mod = import_relax(proto, shapes)
    stages["relax_import"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    record: dict[str, Any] = {}
    sched_spec = spec
    if info["macs"] is not None and info["macs"] < SMALL_MODEL_MACS and spec.name != "cuda":
        # a small model runs faster on one thread than waking the pool for every kernel
        sched_spec = replace(spec, num_cores=1)
    ex = build_relax(mod, sched_spec, schedules=schedules, fuse_pools=info["pool_groups"] > 0,
                     record=record)
    stages["build"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    tmpdir = Path(tempfile.mkdtemp(prefix=".graphopt-tvm-", dir=out.parent))
    try:
        tmp_lib = tmpdir / out.name
        if spec.cross_cc:
            if shutil.which(spec.cross_cc) is None:
                raise GraphoptError(
                    f"target {spec.name} needs the cross compiler {spec.cross_cc} "
                    "(Debian: apt-get install gcc-aarch64-linux-gnu; or "
                    "scripts/install-tvm-deps.sh)")
            from tvm.support import cc  # noqa: PLC0415

            ex.export_library(str(tmp_lib), fcompile=cc.cross_compiler(spec.cross_cc))
        else:
            ex.export_library(str(tmp_lib))
        cuda_checked = None
        if spec.name == "cuda" and check_cuda_source:
            cuda_checked = check_cuda_with_nvcc(ex, spec.target["arch"], tmpdir)
        manifest = {
            "format": "graphopt-tvm/1",
            "target": spec.name,
            "tvm_target": str(spec.tvm_target()),
            "tvm_version": str(tvm.__version__),
            "entry": "main",
            "inputs": _io_desc(prepared.graph.inputs, shapes),
            "outputs": _io_desc(prepared.graph.outputs),
            "schedules": bool(schedules) and spec.name != "cuda",
            "fusion_groups": info["fusion_groups"],
            "source_sha256": hashlib.sha256(model.to_onnx().SerializeToString()).hexdigest(),
            "library": out.name,
        }
        tmp_man = tmpdir / (out.name + MANIFEST_SUFFIX)
        tmp_man.write_text(json.dumps(manifest, indent=2))
        stages["export"] = time.perf_counter() - t1
        report, verified_on = None, None
        if verify:
            t1 = time.perf_counter()
            report, verified_on = _verify_artifact(model, tmp_lib, spec, shapes)
            stages["verify"] = time.perf_counter() - t1
            if report is not None and not report.ok:
                bad = report.worst()
                assert bad is not None
                raise VerificationError(
                    f"the {spec.name} library differs from onnxruntime on output '{bad.name}' "
                    f"(max abs err {bad.max_abs_err:.3g}, cosine {bad.cosine:.6f}); not written. "
                    "Re-run with --no-schedules to tell a schedule bug from an importer bug")
        os.replace(tmp_lib, out)
        man = manifest_path_for(out)
        os.replace(tmp_man, man)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    total = time.perf_counter() - t0
    logger.info("compiled for %s in %.1fs -> %s (%d bytes)", spec.name, total, out,
                out.stat().st_size)
    return CompileResult(spec.name, out, man, total, out.stat().st_size, stages, cuda_checked,
                         report, verified_on, info["passes"], info["fusion_groups"],
                         record.get("kernels", []), record.get("schedules", {}))


def _verify_artifact(model: Model, lib: Path, spec: TargetSpec, shapes: Mapping[str, Sequence[int]]
                     ) -> tuple[Any, str | None]:
    """Run the library (here, or under qemu for AArch64) and onnxruntime on the same seeded
    inputs."""
    from graphopt.core.verify import VerifyReport, compare, random_feeds, run_model  # noqa: PLC0415

    feeds = random_feeds(model, seed=0, shapes=shapes)
    if spec.name == "llvm":
        outs = load_artifact(lib).run(feeds)
        where = "host"
    elif spec.name == "aarch64":
        why = qemu_unavailable_reason()
        if why:
            logger.info("AArch64 library not run: %s", why)
            return None, None
        outs = run_under_qemu(lib, feeds)
        where = "qemu-aarch64"
    else:
        return None, None  # needs a GPU
    ref = run_model(model, feeds)
    report = VerifyReport(rtol=VERIFY_RTOL, atol=VERIFY_ATOL)
    for name, r in ref.items():
        if name not in outs:
            raise TVMCompileError(f"the library has no output '{name}'")
        report.outputs.append(compare(name, r, outs[name], VERIFY_RTOL, VERIFY_ATOL))
    return report, where


#: fp32 tolerance against onnxruntime (relative to max |reference|): TVM reassociates reductions
VERIFY_RTOL = 1e-4
VERIFY_ATOL = 1e-5

#: below this many multiply-adds a model's kernels are scheduled without parallel loops
SMALL_MODEL_MACS = 50_000_000

#: where scripts/install-tvm-deps.sh unpacks Debian's arm64 python and the aarch64 wheels
ARM64_ROOT = Path(os.environ.get("GRAPHOPT_ARM64_ROOT", "/opt/graphopt-arm64"))


def qemu_unavailable_reason() -> str | None:
    """Why an AArch64 library cannot be run here under qemu-user, or None when it can."""
    if shutil.which("qemu-aarch64") is None:
        return "qemu-aarch64 is not installed (Debian: apt-get install qemu-user)"
    py = ARM64_ROOT / "usr" / "bin" / "python3"
    if not py.exists():
        return (f"no arm64 Python under {ARM64_ROOT} (run scripts/install-tvm-deps.sh, or set "
                "GRAPHOPT_ARM64_ROOT)")
    if not (ARM64_ROOT / "opt" / "site-packages" / "tvm").is_dir():
        return f"no aarch64 apache-tvm wheel unpacked under {ARM64_ROOT}/opt/site-packages"
    return None


def run_under_qemu(artifact: str | os.PathLike[str], feeds: Mapping[str, np.ndarray],
                   timeout: float = 300.0) -> dict[str, np.ndarray]:
    """Run an AArch64 library with Debian's arm64 Python and TVM's aarch64 runtime under qemu-user
    (``graphopt/algorithms/tvm/runner.py`` as the script). Emulated: correctness only, timings mean nothing."""
    why = qemu_unavailable_reason()
    if why:
        raise GraphoptError(why)
    import graphopt.algorithms.tvm.runner as runner_mod  # noqa: PLC0415

    art = Path(artifact).resolve()
    with tempfile.TemporaryDirectory(prefix="graphopt-qemu-") as td:
        args: list[str] = []
        for name, arr in feeds.items():
            f = Path(td) / f"in{len(args)}.npy"
            np.save(f, arr)
            args += ["--input", f"{name}={f}"]
        out = Path(td) / "out.npz"
        env = dict(os.environ, TVM_USE_RUNTIME_LIB="1", PYTHONHOME=str(ARM64_ROOT / "usr"),
                   PYTHONPATH=str(ARM64_ROOT / "opt" / "site-packages"), PYTHONNOUSERSITE="1")
        env.pop("VIRTUAL_ENV", None)
        cmd = ["qemu-aarch64", "-L", str(ARM64_ROOT), str(ARM64_ROOT / "usr" / "bin" / "python3"),
               str(Path(runner_mod.__file__).resolve()), str(art), *args, "--output", str(out)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise TVMCompileError(f"the AArch64 library failed under qemu: "
                                  f"{proc.stderr.strip()[-1500:]}")
        with np.load(out) as z:
            return {k: z[k] for k in z.files}


def bench_artifact(artifact: str | os.PathLike[str], model: Model | str | os.PathLike[str],
                   runs: int = 50, warmup: int = 5, threads: int = 2, seed: int = 0
                   ) -> dict[str, Any]:
    """Latency of a host library against onnxruntime on the same seeded input (``graphopt bench``).

    The two run interleaved (A, B, B, A, ...), ``runs`` times each after ``warmup`` runs;
    onnxruntime
    with ORT_ENABLE_ALL, ``threads`` intra-op threads and spinning off. Returns medians in ms, the
    ratio tvm/ort, and the max abs error of the library's outputs against onnxruntime's.
    """
    import statistics  # noqa: PLC0415

    from graphopt.core.verify import compare, make_session, random_feeds  # noqa: PLC0415

    art = load_artifact(artifact)
    if art.target != "llvm":
        raise GraphoptError(f"{artifact} was compiled for {art.target}; only host (llvm) libraries "
                            "can be timed here")
    if not isinstance(model, Model):
        model = Model.load(model)
    shapes = {i["name"]: [int(d) for d in i["shape"]] for i in art.inputs}
    feeds = random_feeds(model, seed=seed, shapes=shapes)
    sess = make_session(model, "all", threads=threads)
    args = art._to_device(feeds)
    ref = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True))
    outs = art.run(feeds)
    errs = {n: compare(n, r, outs[n], VERIFY_RTOL, VERIFY_ATOL).to_json() for n, r in ref.items()}
    t_tvm: list[float] = []
    t_ort: list[float] = []

    def _tvm_once() -> None:
        t = time.perf_counter()
        art.run_device(args)
        t_tvm.append(time.perf_counter() - t)

    def _ort_once() -> None:
        t = time.perf_counter()
        sess.run(None, feeds)
        t_ort.append(time.perf_counter() - t)

    for _ in range(warmup):
        art.run_device(args)
        sess.run(None, feeds)
    for i in range(runs):
        first, second = (_tvm_once, _ort_once) if i % 2 == 0 else (_ort_once, _tvm_once)
        first()
        second()
    tvm_ms = statistics.median(t_tvm) * 1e3
    ort_ms = statistics.median(t_ort) * 1e3
    return {"artifact": str(artifact), "runs": runs, "threads": threads, "tvm_ms": tvm_ms,
            "ort_ms": ort_ms, "ratio_tvm_vs_ort": tvm_ms / ort_ms, "verify": errs}


def check_cuda_with_nvcc(ex: Any, arch: str, workdir: Path) -> bool | None:
    """Compile the CUDA source TVM generated with ``nvcc -cubin``; None when nvcc is absent.

    Raises:
        TVMCompileError: nvcc rejected the source.
    """
    src = cuda_source(ex)
    if src is None:
        return None
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        logger.info("nvcc not on PATH: generated CUDA source not compiled")
        return None
    cu = workdir / "kernels.cu"
    cu.write_text(src)
    proc = subprocess.run([nvcc, f"-arch={arch}", "-cubin", "-O3", "-o", str(workdir / "k.cubin"),
                           str(cu)], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise TVMCompileError(f"nvcc -arch={arch} rejected TVM's CUDA source: "
                              f"{proc.stderr.strip()[-2000:]}")
    return True


def cuda_source(ex: Any) -> str | None:
    """The CUDA C source inside a built executable, if any."""
    mod = ex.mod if hasattr(ex, "mod") else ex
    stack = [mod]
    while stack:
        m = stack.pop()
        if str(getattr(m, "kind", "")) == "cuda":
            src = m.inspect_source("")
            if src:
                return str(src)
        stack.extend(list(m.imports))
    return None
