"""The compile job: graphopt's passes for TVM, Relax import and build
(:mod:`graphopt.algorithms.tvm.emit`), export of the library and its manifest (atomically), and a
check of the library against onnxruntime (on this host, or under qemu for AArch64).

TVM is imported lazily: ``import graphopt`` never needs it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from graphopt.algorithms.tvm.emit import (
    TargetSpec,
    TVMCompileError,
    build_relax,
    check_cuda_with_nvcc,
    fold_shape_computations,
    fused_module,
    import_relax,
    parse_target,
    require_tvm,
    tvm_available,
)
from graphopt.algorithms.tvm.fusion import recorded_groups
from graphopt.algorithms.tvm.measure import BuildSpec, LocalTracker, Measurer, make_measurer
from graphopt.algorithms.tvm.profile import KernelProfile, profile_kernels
from graphopt.algorithms.tvm.qemu import qemu_unavailable_reason, run_under_qemu
from graphopt.algorithms.tvm.runner import (
    Artifact,
    load_artifact,
    manifest_path_for,
)
from graphopt.algorithms.tvm.search import (
    KernelOutcome,
    Progress,
    SearchSettings,
    extract_tasks,
    tune_tasks,
)
from graphopt.algorithms.tvm.tuning_db import TuningDB, measurement_cpu, target_string
from graphopt.core.cost import model_cost
from graphopt.core.errors import GraphoptError, OptionError, VerificationError, first_line
from graphopt.core.feeds import FeedSource, feed_list, random_feeds
from graphopt.core.latency import interleaved
from graphopt.core.model import Model
from graphopt.core.output import staged_files
from graphopt.core.session import make_session, run_model
from graphopt.core.shapes import static_input_shapes
from graphopt.core.verify import VerifyReport, compare
from graphopt.jobs.common import ModelLike, as_model, jsonable, output_paths, source_path
from graphopt.jobs.optimize import optimize_model
from graphopt.passes import get_pass

logger = logging.getLogger(__name__)

__all__ = [
    "BenchResult",
    "CompileResult",
    "bench_artifact",
    "compile_model",
    "prepare_model",
    "tvm_available",
]


_POOL_OPS = ("MaxPool", "AveragePool")


def _has_shape_ops(m: Model) -> bool:
    return any(n.op in ("Shape", "Size") for n in m.graph.nodes)


def prepare_model(
    model: Model, input_shapes: Mapping[str, Sequence[int]] | None = None
) -> tuple[Model, dict[str, Any]]:
    """Run graphopt's default pipeline for TVM on a copy of ``model``: fix input shapes, infer and
    fold shapes, fold BatchNormalization, recognize activations, record Conv+activation(+pool)
    groups.

    Returns:
        (prepared model, info) where info holds the fixed shapes, per-pass stats and fusion groups.
    """
    shapes = static_input_shapes(model, input_shapes)
    res = optimize_model(model, target="portable", input_shapes=shapes, verify_output=False)
    m = res.model
    info: dict[str, Any] = {
        "input_shapes": {k: list(v) for k, v in shapes.items()},
        "passes": res.stats(),
        "nodes_before": model.num_nodes(),
        "nodes_after": m.num_nodes(),
    }
    if _has_shape_ops(m):
        # what the folding passes left (shapes they could not prove static): fold with the exact
        # values onnxruntime computes for the fixed input shapes
        logger.info(
            "folding %d Shape/Size nodes left after graphopt's passes",
            sum(1 for n in m.graph.nodes if n.op in ("Shape", "Size")),
        )
        fold_shape_computations(m, shapes)
    info["passes"]["annotate-fusion-groups"] = get_pass("annotate-fusion-groups")(m).stats
    info["fusion_groups"] = recorded_groups(m)
    try:
        info["macs"] = int(model_cost(m).macs)
    except Exception as exc:  # noqa: BLE001 - cost analysis is advisory here
        logger.debug("cost analysis failed: %s", exc)
        info["macs"] = None
    ops = {n.name: n.op for n in m.graph.nodes}
    info["pool_groups"] = sum(
        1 for g in info["fusion_groups"] if any(ops.get(n) in _POOL_OPS for n in g)
    )
    return m, info


def schedule_spec(spec: TargetSpec, macs: int | None) -> TargetSpec:
    """The target the schedules are made for: a small model runs faster on one thread than
    waking the pool for every kernel, so its kernels get no parallel loops."""
    if macs is not None and macs < SMALL_MODEL_MACS and spec.name != "cuda":
        return replace(spec, num_cores=1)
    return spec


def tuning_keys(spec: TargetSpec, rpc_key: str | None) -> tuple[str, str]:
    """(target, cpu) under which the tuning database files records for ``spec``."""
    target = f"{target_string(spec.target)} -sched-cores={spec.num_cores}"
    return target, measurement_cpu(spec.name, rpc_key)


@dataclass
class TuningSummary:
    """What the measured schedule search did for one model (``graphopt tune``, ``compile
    --db``)."""

    db: str | None
    target: str
    cpu: str
    kernels: list[KernelOutcome]
    #: candidates timed in this run (0 when every kernel was already in the database)
    measurements: int
    seconds: float
    trials: int

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for k in self.kernels:
            out[k.status] = out.get(k.status, 0) + 1
        return out

    def to_json(self) -> dict[str, Any]:
        return jsonable(  # type: ignore[no-any-return]
            {
                "db": self.db,
                "target": self.target,
                "cpu": self.cpu,
                "trials": self.trials,
                "measurements": self.measurements,
                "seconds": round(self.seconds, 2),
                "kernels": len(self.kernels),
                "status": self.counts(),
                "per_kernel": [k.to_json() for k in self.kernels],
            }
        )


def tune_module(
    mod: Any,
    spec: TargetSpec,
    db: TuningDB,
    *,
    fuse_pools: bool = False,
    trials: int = 16,
    rpc: str | None = None,
    key: str | None = None,
    min_share: float = 0.01,
    local_servers: int = 1,
    progress: Progress | None = None,
    retune: bool = False,
) -> TuningSummary:
    """Fill ``db`` for the kernels of ``mod`` (Relax as imported): a baseline for every kernel it
    lacks, a measured search for those over ``min_share`` of the model. Measures on the RPC
    tracker ``rpc`` (servers under ``key``), else on a local tracker it starts (this host, or
    qemu-aarch64 servers for the aarch64 target); starts nothing when every kernel is recorded.

    Raises:
        OptionError: a CUDA target (no CPU schedules to tune), or ``--rpc`` without ``--key``.
    """
    if spec.name == "cuda":
        raise OptionError("tuning covers the CPU targets (llvm, aarch64); cuda uses DLight's rules")
    if rpc and not key:
        raise OptionError("--rpc needs --key NAME (the device key the RPC servers registered)")
    t0 = time.perf_counter()
    fused = fused_module(mod, spec, fuse_pools)
    tasks = extract_tasks(fused, spec.vector_lanes, spec.num_cores)
    target, cpu = tuning_keys(spec, key if rpc else None)
    build = BuildSpec(spec.target, spec.host, spec.vector_lanes, spec.num_cores, spec.cross_cc)
    opened: list[tuple[Measurer, LocalTracker | None]] = []

    def factory() -> Measurer:
        if spec.cross_cc and shutil.which(spec.cross_cc) is None:
            raise GraphoptError(
                f"target {spec.name} needs the cross compiler {spec.cross_cc} "
                "(scripts/install-tvm-deps.sh)"
            )
        m, local = make_measurer(
            build,
            rpc,
            key,
            local_kind="host" if spec.name == "llvm" else "qemu-aarch64",
            local_servers=local_servers,
        )
        opened.append((m, local))
        return m

    try:
        outcomes = tune_tasks(
            tasks,
            db,
            target,
            cpu,
            factory,
            spec.vector_lanes,
            spec.num_cores,
            SearchSettings(trials=trials, min_share=min_share, retune=retune),
            progress,
        )
    finally:
        for m, local in opened:
            m.close()
            if local is not None:
                local.close()
    measured = sum(m.measurements for m, _l in opened)
    return TuningSummary(
        str(db.path) if db.path else None,
        target,
        cpu,
        outcomes,
        measured,
        time.perf_counter() - t0,
        trials,
    )


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
    verify: VerifyReport | None = None
    #: where the library ran for verification: "host", "qemu-aarch64", or None
    verified_on: str | None = None
    passes: dict[str, Any] = field(default_factory=dict)
    fusion_groups: list[list[str]] = field(default_factory=list)
    #: the fused TIR kernels of the library (one per graphopt fusion group, plus the rest)
    kernels: list[str] = field(default_factory=list)
    #: graphopt CPU schedule rule -> number of kernels it scheduled ("none": left as TVM wrote it)
    schedules: dict[str, int] = field(default_factory=dict)
    #: the ONNX file compiled (None for a model built in memory)
    input: str | None = None
    #: what the tuning database did (``db=``): kernels tuned, measured, from the database
    tuning: TuningSummary | None = None
    #: kernels scheduled from the tuning database's records
    tuned_kernels: int = 0

    def to_json(self) -> dict[str, Any]:
        """JSON for ``graphopt compile --json`` (keys ``target``, ``artifact``, ``verify`` as in the
        CLI contract, plus ``manifest``, ``compile_seconds``, ``artifact_bytes``, ``stages``...)."""
        return jsonable(
            {  # type: ignore[no-any-return]
                "input": self.input,
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
                "tuned_kernels": self.tuned_kernels,
                "tuning": self.tuning.to_json() if self.tuning is not None else None,
            }
        )


def _io_desc(
    values: Sequence[Any], shapes: Mapping[str, Sequence[int]] | None = None
) -> list[dict[str, Any]]:
    out = []
    for v in values:
        shape = list(shapes[v.name]) if shapes and v.name in shapes else list(v.shape or [])
        dtype = np.dtype(v.dtype).name if v.dtype is not None else "float32"
        out.append(
            {
                "name": v.name,
                "shape": [int(d) if isinstance(d, int) else str(d) for d in shape],
                "dtype": dtype,
            }
        )
    return out


def compile_model(
    model: ModelLike,
    target: str = "llvm",
    output: str | os.PathLike[str] = "model.so",
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    schedules: bool = True,
    check_cuda_source: bool = True,
    verify: bool = True,
    db: str | os.PathLike[str] | TuningDB | None = None,
    trials: int = 16,
    rpc: str | None = None,
    key: str | None = None,
    progress: Progress | None = None,
    feeds: FeedSource | None = None,
) -> CompileResult:
    """Compile ``model`` into a native library ``output`` plus a JSON manifest beside it.

    Args:
        model: a :class:`Model` (not changed) or the path of an ONNX file (never written).
        target: ``llvm`` (this host, its CPU), ``aarch64`` (cross-compiled for AArch64 Linux with
            NEON), or ``cuda`` / ``cuda:sm_80`` / ``cuda:sm_90``.
        output: the library to write (``.so``); the manifest goes to ``<output>.json``.
        input_shapes: fixed shapes for dynamic inputs, ``{name: (1, 3, 640, 640)}``.
        schedules: apply graphopt's CPU schedules (False leaves TVM's naive loops, for comparison).
        check_cuda_source: for CUDA, compile the generated source with ``nvcc -cubin`` when nvcc is
            on PATH (the result is recorded in ``CompileResult.cuda_source_checked``).
        verify: run the library on seeded random inputs and compare with onnxruntime (on this host
            for llvm, under qemu-user for aarch64 when available; CUDA needs a GPU and is skipped).
        db: a tuning database (file or :class:`TuningDB`): kernels it has records for are
            scheduled as recorded; the others are measured first (``trials`` candidates each, see
            :func:`tune_module`) and added to it, so a second compile measures nothing.
        trials: candidates measured per kernel that is not in ``db`` (0: use the records only).
        rpc, key: measure on the boards registered under ``key`` at the tracker ``rpc``
            (``HOST:PORT``) instead of this host.
        progress: ``(message, done, total)`` callback while tuning.
        feeds: the inputs to verify on (``--feeds``: a path in the ``--calib`` formats, a feed
            dict or an iterable of them; their first feed; default: seeded random inputs).

    Returns:
        A :class:`CompileResult`.

    Raises:
        TVMUnavailableError: apache-tvm is not installed.
        TVMCompileError: import or build failed (the message names the stage).
        VerificationError: the library's outputs differ from onnxruntime's (nothing is written).
        GraphoptError: bad target, or dynamic inputs without ``input_shapes``.
    """
    spec = parse_target(target)
    out, _ = output_paths(model, output, manifest_path_for(output), inputs=[feeds])
    assert out is not None
    src = source_path(model)
    model = as_model(model)  # a file that is not a model is refused before TVM is needed
    tvm = require_tvm()
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
    sched_spec = schedule_spec(spec, info["macs"])
    tuning, choose = None, None
    if db is not None and schedules:
        tdb = db if isinstance(db, TuningDB) else TuningDB(db)
        if trials > 0:
            tuning = tune_module(
                mod,
                sched_spec,
                tdb,
                fuse_pools=info["pool_groups"] > 0,
                trials=trials,
                rpc=rpc,
                key=key,
                progress=progress,
            )
            stages["tune"] = time.perf_counter() - t1
            t1 = time.perf_counter()
        choose = tdb.chooser(*tuning_keys(sched_spec, key if rpc else None))
    ex = build_relax(
        mod,
        sched_spec,
        schedules=schedules,
        fuse_pools=info["pool_groups"] > 0,
        record=record,
        choose=choose,
    )
    stages["build"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    man = manifest_path_for(out)
    # library and manifest in one temporary folder, published together (the library last)
    with staged_files(out, man) as (tmp_lib, tmp_man):
        tmpdir = tmp_lib.parent
        if spec.cross_cc:
            if shutil.which(spec.cross_cc) is None:
                raise GraphoptError(
                    f"target {spec.name} needs the cross compiler {spec.cross_cc} "
                    "(Debian: apt-get install gcc-aarch64-linux-gnu; or "
                    "scripts/install-tvm-deps.sh)"
                )
            from tvm.support import cc  # noqa: PLC0415 - tvm stays optional

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
        tmp_man.write_text(json.dumps(manifest, indent=2))
        stages["export"] = time.perf_counter() - t1
        report, verified_on = None, None
        if verify:
            t1 = time.perf_counter()
            given = feed_list(feeds, model, limit=1)
            report, verified_on = _verify_artifact(
                model, tmp_lib, spec, shapes, given[0] if given else None
            )
            stages["verify"] = time.perf_counter() - t1
            if report is not None and not report.ok:
                bad = report.worst()
                assert bad is not None
                raise VerificationError(
                    f"the {spec.name} library differs from onnxruntime on output '{bad.name}' "
                    f"(max abs err {bad.max_abs_err:.3g}, cosine {bad.cosine:.6f}); not written. "
                    "Re-run with --no-schedules to tell a schedule bug from an importer bug"
                )
    total = time.perf_counter() - t0
    logger.info(
        "compiled for %s in %.1fs -> %s (%d bytes)", spec.name, total, out, out.stat().st_size
    )
    return CompileResult(
        spec.name,
        out,
        man,
        total,
        out.stat().st_size,
        stages,
        cuda_checked,
        report,
        verified_on,
        info["passes"],
        info["fusion_groups"],
        record.get("kernels", []),
        record.get("schedules", {}),
        src,
        tuning,
        int(record.get("tuned", 0)),
    )


def _verify_artifact(
    model: Model,
    lib: Path,
    spec: TargetSpec,
    shapes: Mapping[str, Sequence[int]],
    given: Mapping[str, np.ndarray] | None = None,
) -> tuple[VerifyReport | None, str | None]:
    """Run the library (here, or under qemu for AArch64) and onnxruntime on the same inputs
    (``given``, else seeded random ones)."""
    feeds = dict(given) if given is not None else random_feeds(model, seed=0, shapes=shapes)
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


@dataclass
class BenchResult:
    """Latency of a host library against onnxruntime (:func:`bench_artifact`)."""

    artifact: str
    runs: int
    threads: int
    tvm_ms: float
    ort_ms: float
    #: per output: the library's outputs against onnxruntime's
    verify: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: ``per_kernel=True``: each kernel's median time inside the model run
    per_kernel: KernelProfile | None = None

    @property
    def ratio_tvm_vs_ort(self) -> float:
        return self.tvm_ms / self.ort_ms if self.ort_ms else math.inf

    def to_json(self) -> dict[str, Any]:
        """The ``graphopt bench --json`` object."""
        return jsonable(
            {
                "artifact": self.artifact,  # type: ignore[no-any-return]
                "runs": self.runs,
                "threads": self.threads,
                "tvm_ms": self.tvm_ms,
                "ort_ms": self.ort_ms,
                "ratio_tvm_vs_ort": self.ratio_tvm_vs_ort,
                "verify": self.verify,
                "per_kernel": self.per_kernel.to_json() if self.per_kernel is not None else None,
            }
        )


def bench_artifact(
    artifact: str | os.PathLike[str],
    model: ModelLike,
    runs: int = 50,
    warmup: int = 5,
    threads: int = 2,
    seed: int = 0,
    per_kernel: bool = False,
) -> BenchResult:
    """Latency of a host library against onnxruntime on the same seeded input (``graphopt bench``).

    The two run interleaved (:func:`graphopt.core.latency.interleaved`), ``runs`` times each
    after ``warmup`` runs; onnxruntime with ORT_ENABLE_ALL, ``threads`` intra-op threads and
    spinning off. Returns medians in ms and the library's outputs compared with onnxruntime's.
    ``per_kernel``: also each kernel's median time inside the model run
    (:func:`graphopt.algorithms.tvm.profile.profile_kernels`, ``runs`` instrumented runs).
    TVM's thread pool takes its size from ``TVM_NUM_THREADS`` (set it to ``threads`` for a fair
    comparison; the command line does).
    """
    art = open_artifact(artifact)
    if art.target != "llvm":
        raise GraphoptError(
            f"{artifact} was compiled for {art.target}; only host (llvm) libraries "
            "can be timed here"
        )
    model = as_model(model)
    shapes = {i["name"]: [int(d) for d in i["shape"]] for i in art.inputs}
    feeds = random_feeds(model, seed=seed, shapes=shapes)
    sess = make_session(model, "all", threads=threads)
    args = art.to_device(feeds)
    ref = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True))
    outs = art.run(feeds)
    errs = {n: compare(n, r, outs[n], VERIFY_RTOL, VERIFY_ATOL).to_json() for n, r in ref.items()}
    timings = interleaved(
        {"tvm": lambda: art.run_device(args), "ort": lambda: sess.run(None, feeds)},
        runs=runs,
        warmup=warmup,
    )
    prof = profile_kernels(art.vm, args, runs=runs) if per_kernel else None
    return BenchResult(
        str(artifact),
        runs,
        threads,
        timings.median_ms("tvm"),
        timings.median_ms("ort"),
        errs,
        prof,
    )


def open_artifact(path: str | os.PathLike[str]) -> Artifact:
    """Load a library written by ``graphopt compile``; a missing or foreign file is a user error.

    Raises:
        GraphoptError: no such file, no manifest beside it, or not a library TVM can load.
    """
    p = Path(path)
    if not p.is_file():
        raise GraphoptError(f"no such file: {p}")
    if not manifest_path_for(p).is_file():
        raise GraphoptError(
            f"{p} is not a library written by 'graphopt compile' (its manifest "
            f"{manifest_path_for(p).name} is missing); ONNX models end in .onnx"
        )
    require_tvm()
    try:
        return load_artifact(p)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise GraphoptError(f"cannot load the library {p}: {first_line(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - TVM raises its own error types for foreign files
        if type(exc).__module__.startswith("tvm"):
            raise GraphoptError(f"cannot load the library {p}: {first_line(exc)}") from None
        raise
