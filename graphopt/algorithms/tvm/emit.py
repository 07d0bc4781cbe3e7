"""Lower a model to a native library through Apache TVM (Relax), for x86, AArch64 or CUDA.

Flow (driven by :func:`graphopt.jobs.compile.compile_model`): graphopt's passes first (input shapes
fixed, shape arithmetic folded, BatchNormalization folded into Conv, activations recognized,
Conv+activation(+pool) groups recorded), then Relax's ONNX importer (:func:`import_relax`), then a
Relax pipeline that TVM's default ``tvm.compile`` does not run on CPU (:func:`build_relax`):
legalization, constant folding, operator fusion (graphopt's fusion groups become single kernels),
TIR fusion, then graphopt's own CPU schedules (:mod:`graphopt.algorithms.tvm.schedules`) or
DLight's GPU rules, then the VM lowering passes. The job exports the result as a shared library
beside a JSON manifest (inputs, outputs, target) that :mod:`graphopt.algorithms.tvm.runner` reads.

Why graphopt goes first: as published, PP-OCR's ``Shape -> Slice -> Concat -> Reshape`` chains and
YOLO-style dynamic shapes fail in Relax's importer ("Reshape requires the input new shape to be
Shape", "emit_te now only supports Tensor that has ShapeExpr shape"); after fixing input shapes and
folding they import and build.

TVM is imported lazily: ``import graphopt`` never needs it.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt.core.errors import GraphoptError
from graphopt.core.graph import toposort_graph
from graphopt.core.model import Model
from graphopt.core.session import make_session

logger = logging.getLogger(__name__)

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
        require_tvm()
    except TVMUnavailableError:
        return False
    return True


def require_tvm() -> Any:
    try:
        import tvm  # noqa: PLC0415
        from tvm import relax  # noqa: F401, PLC0415
    except Exception as exc:  # ImportError, or a broken native library
        raise TVMUnavailableError(
            f"apache-tvm is not usable here ({type(exc).__name__}: {exc}); "
            "install it with: pip install 'graphopt[tvm]'"
        ) from None
    return tvm


# ---------------------------------------------------------------------- targets


@dataclass
class TargetSpec:
    """A resolved compilation target."""

    name: str  # llvm | aarch64 | cuda
    target: dict[str, Any]  # TVM target dict (``{"kind": "llvm", ...}``)
    host: dict[str, Any] | None  # host target for device targets
    cross_cc: str | None = None  # C compiler used to link the exported library
    vector_lanes: int = 8  # float32 lanes of the widest vector unit
    num_cores: int = 1

    def tvm_target(self) -> Any:
        tvm = require_tvm()
        if self.host is not None:
            return tvm.target.Target(self.target, host=self.host)
        return tvm.target.Target(self.target)


def _host_llvm() -> tuple[dict[str, Any], int]:
    tvm = require_tvm()
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
        tgt = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"], "num-cores": 4}
        return TargetSpec("aarch64", tgt, None, "aarch64-linux-gnu-gcc", 4, 4)
    if t.startswith("cuda"):
        arch = t.split(":", 1)[1] if ":" in t else "sm_80"
        if not arch.startswith("sm_"):
            arch = "sm_" + arch
        host, lanes = _host_llvm()
        cuda = {
            "kind": "cuda",
            "arch": arch,
            "max_shared_memory_per_block": 49152,
            "max_threads_per_block": 1024,
            "thread_warp_size": 32,
        }
        return TargetSpec("cuda", cuda, host, None, lanes, cores)
    raise GraphoptError(f"unknown target '{target}'; use one of: llvm, aarch64, cuda[:sm_80|sm_90]")


# ---------------------------------------------------------------------- shape folding


def fold_shape_computations(m: Model, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Replace ``Shape``/``Size`` outputs by constants (the values onnxruntime computes for the
    input shapes) and fold the constant subgraphs that hang off them."""
    nodes = [n for n in m.graph.nodes if n.op in ("Shape", "Size")]
    if not nodes:
        return
    probe = m.to_onnx()
    del probe.graph.value_info[:]  # onnxruntime derives the shapes for the fixed inputs itself
    names = [n.outputs[0].name for n in nodes]
    sess = make_session(
        probe, outputs=names, truncate=True, types=dict.fromkeys(names, onnx.TensorProto.INT64)
    )
    feeds = {i.name: np.zeros(shapes[i.name], _ort_dtype(i.type)) for i in sess.get_inputs()}
    values = dict(zip(names, sess.run(names, feeds), strict=True))
    for n in nodes:
        out = n.outputs[0]
        const = gs.Constant(out.name + "__folded", np.asarray(values[out.name], dtype=np.int64))
        for consumer in list(out.outputs):
            for i, t in enumerate(consumer.inputs):
                if t is out:
                    consumer.inputs[i] = const
        n.outputs.clear()
    toposort_graph(m.graph.cleanup())
    try:
        m.graph.fold_constants(fold_shapes=True)
    except Exception as exc:  # graphsurgeon's folding is best effort
        logger.debug("graphsurgeon fold_constants failed: %s", exc)
    toposort_graph(m.graph.cleanup())


def _ort_dtype(t: str) -> Any:
    return {
        "tensor(float)": np.float32,
        "tensor(double)": np.float64,
        "tensor(int64)": np.int64,
        "tensor(int32)": np.int32,
        "tensor(uint8)": np.uint8,
        "tensor(int8)": np.int8,
        "tensor(bool)": np.bool_,
        "tensor(float16)": np.float16,
    }.get(t, np.float32)


# ---------------------------------------------------------------------- Relax


#: ONNX element types graphopt compiles through TVM (Relax's importer has no exact lowering of
#: bfloat16, float8, 4/2-bit, complex or string tensors)
_TVM_ELEM_TYPES = frozenset(
    getattr(onnx.TensorProto, t)
    for t in (
        "FLOAT",
        "DOUBLE",
        "FLOAT16",
        "INT8",
        "INT16",
        "INT32",
        "INT64",
        "UINT8",
        "UINT16",
        "UINT32",
        "UINT64",
        "BOOL",
    )
)


def check_importable(proto: onnx.ModelProto) -> None:
    """Refuse, before TVM sees it, a model whose values TVM cannot hold: a graph input or output
    that is not a tensor (sequence, map, optional), or a tensor of an element type outside
    :data:`_TVM_ELEM_TYPES` (declared, stored as a weight or produced by a Cast).

    Raises:
        GraphoptError: (exit 2) naming the value and its type.
    """
    g = proto.graph
    found: list[tuple[str, int]] = []
    for v in (*g.input, *g.output):
        kind = (v.type.WhichOneof("value") or "untyped").removesuffix("_type")
        if kind != "tensor":
            raise GraphoptError(
                f"TVM cannot compile this model: '{v.name}' is a {kind} value "
                "(graphopt compiles models whose inputs and outputs are tensors)"
            )
    for v in (*g.input, *g.output, *g.value_info):
        if v.type.WhichOneof("value") == "tensor_type":
            found.append((v.name, v.type.tensor_type.elem_type))
    found += [(t.name, t.data_type) for t in g.initializer]
    for n in g.node:
        for a in n.attribute:
            if n.op_type == "Cast" and a.name == "to":
                found.append((n.output[0] if n.output else n.name, a.i))
            elif n.op_type == "Constant" and a.name == "value":
                found.append((n.output[0] if n.output else n.name, a.t.data_type))
    for name, elem in found:
        if elem not in _TVM_ELEM_TYPES:
            type_name = onnx.TensorProto.DataType.Name(elem) if elem else "UNDEFINED"
            raise GraphoptError(
                f"TVM cannot compile this model: tensor '{name}' is {type_name.lower()} (graphopt "
                "compiles float, integer and bool tensors); use 'graphopt optimize' for onnxruntime"
            )


def import_relax(proto: onnx.ModelProto, shapes: Mapping[str, Sequence[int]]) -> Any:
    """Relax's ONNX importer with fixed shapes; errors become :class:`TVMCompileError`, except
    what TVM cannot hold at all (:func:`check_importable`) and operators its importer lacks
    (``OpNotImplemented``): the model's, exit 2."""
    check_importable(proto)
    require_tvm()
    from tvm.relax.frontend.onnx import from_onnx  # noqa: PLC0415

    dtypes = {}
    for i in proto.graph.input:
        dtypes[i.name] = onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type).name
    try:
        mod = from_onnx(
            proto,
            shape_dict={k: list(v) for k, v in shapes.items()},
            dtype_dict=dtypes,
            opset=_default_opset(proto),
        )
    except Exception as exc:
        msg = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        if type(exc).__name__ == "OpNotImplemented":
            raise GraphoptError(f"TVM cannot compile this model: {msg}") from None
        raise TVMCompileError(f"TVM's ONNX importer failed: {type(exc).__name__}: {msg}") from exc
    return mod


def _default_opset(proto: onnx.ModelProto) -> int | None:
    for o in proto.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    return None


def fusion_passes(fuse_pools: bool = False) -> list[Any]:
    """The first half of graphopt's Relax pipeline: legalize, fold, fuse (the kernels the
    schedules and the tuning see)."""
    require_tvm()
    from tvm import relax  # noqa: PLC0415

    return [
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


def fused_module(mod: Any, spec: TargetSpec, fuse_pools: bool = False) -> Any:
    """``mod`` (as imported) after :func:`fusion_passes`: the fused PrimFuncs, not scheduled."""
    tvm = require_tvm()
    from tvm import relax  # noqa: PLC0415

    mod, _params = relax.frontend.detach_params(mod)
    try:
        with spec.tvm_target():
            return tvm.transform.Sequential(fusion_passes(fuse_pools))(mod)
    except Exception as exc:
        msg = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise TVMCompileError(f"TVM's fusion failed: {type(exc).__name__}: {msg}") from exc


def relax_pipeline(
    spec: TargetSpec,
    schedules: bool = True,
    fuse_pools: bool = False,
    record: dict[str, Any] | None = None,
    choose: Any = None,
) -> Any:
    """graphopt's Relax pipeline for ``spec``: legalize, fold, fuse, schedule, lower.

    ``fuse_pools``: graphopt recorded Conv+activation+pool groups; compile each as one kernel.
    ``record``: filled with ``kernels`` (fused kernel names), ``schedules`` (template -> count)
    and ``tuned`` (kernels scheduled from the tuning database).
    ``choose``: ``func -> (template, params) | None``, the tuning database's pick per kernel."""
    tvm = require_tvm()
    from tvm import relax  # noqa: PLC0415

    target = spec.tvm_target()

    @tvm.transform.module_pass(opt_level=0, name="GraphoptRelaxPipeline")
    def _pipeline(mod: Any, _ctx: Any) -> Any:
        with target:
            mod = tvm.transform.Sequential(fusion_passes(fuse_pools))(mod)
            if record is not None:
                record["kernels"] = sorted(
                    gv.name_hint
                    for gv, f in mod.functions_items()
                    if isinstance(f, tvm.tirx.PrimFunc)
                )
            if spec.name == "cuda":
                from tvm.s_tir import dlight as dl  # noqa: PLC0415

                mod = dl.ApplyDefaultSchedule(
                    dl.gpu.Matmul(),
                    dl.gpu.GEMV(),
                    dl.gpu.Reduction(),
                    dl.gpu.GeneralReduction(),
                    dl.gpu.Fallback(),
                )(mod)
            elif schedules:
                from graphopt.algorithms.tvm.schedules import ApplyCPUSchedules  # noqa: PLC0415

                sched = ApplyCPUSchedules(
                    lanes=spec.vector_lanes, cores=spec.num_cores, choose=choose
                )
                mod = sched(mod)  # type: ignore[operator]  # a TVM module pass
                if record is not None:
                    record["schedules"] = dict(sched.stats)
                    record["tuned"] = sched.tuned
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
    tvm = require_tvm()

    @tvm.transform.module_pass(opt_level=0, name="GraphoptFusePoolIntoProducer")
    def _pass(mod: Any, _ctx: Any) -> Any:
        for gv, func in list(mod.functions_items()):
            if isinstance(func, tvm.tirx.PrimFunc) and gv.name_hint.startswith(_POOL_PREFIXES):
                # kElemWise: may join a convolution group as its last stage (FuseTIR composes
                # the real loop nests, so the result is exact)
                mod[gv] = func.with_attr("op_pattern", 0)
        return mod

    return _pass


def build_relax(
    mod: Any,
    spec: TargetSpec,
    pipeline: str = "graphopt",
    schedules: bool = True,
    fuse_pools: bool = False,
    record: dict[str, Any] | None = None,
    choose: Any = None,
) -> Any:
    """Build a Relax module; ``pipeline`` is ``graphopt`` or ``tvm-default`` (``tvm.compile``);
    ``choose`` is the tuning database's pick per kernel (see :func:`relax_pipeline`)."""
    tvm = require_tvm()
    from tvm import relax  # noqa: PLC0415

    target = spec.tvm_target()
    mod, _params = relax.frontend.detach_params(mod)
    try:
        if pipeline == "tvm-default":
            return tvm.compile(mod, target=target)
        return tvm.compile(
            mod,
            target=target,
            relax_pipeline=relax_pipeline(spec, schedules, fuse_pools, record, choose),
        )
    except Exception as exc:
        msg = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise TVMCompileError(
            f"TVM build for {spec.name} failed: {type(exc).__name__}: {msg}"
        ) from exc


# ---------------------------------------------------------------------- compile


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
    proc = subprocess.run(
        [nvcc, f"-arch={arch}", "-cubin", "-O3", "-o", str(workdir / "k.cubin"), str(cu)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        raise TVMCompileError(
            f"nvcc -arch={arch} rejected TVM's CUDA source: {proc.stderr.strip()[-2000:]}"
        )
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
