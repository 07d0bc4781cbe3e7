"""The quantize job's modes beyond static int8: dynamic int8 and weight-only int4/int8, and the
automatic choice of mode (``graphopt quantize --mode auto|static|dynamic|weight-only``).

``auto`` (:func:`choose_mode`): ``dynamic`` when the model's weights are mostly MatMul/Gemm
matrices (transformers: activations quantized at run time per token's range, more accurate than
one calibrated range per tensor, with or without calibration data: bert-mini 40.5 dB dynamic
against 27.3 dB static); otherwise (weights mostly convolutions) ``static`` (activation ranges
calibrated, :func:`graphopt.jobs.quantize.quantize`), which asks for ``--calib`` when none is
given (dynamic quantization has no fast convolution kernels in onnxruntime).

Both modes here run the portable optimization pipeline first (never ``--target ort``'s fusions,
which would hide the MatMuls inside fused attention ops), rewrite the model
(:mod:`graphopt.algorithms.quant.dynamic`, :mod:`graphopt.algorithms.quant.weight_only`), check it
against fp32 in onnxruntime on ``feeds`` (else on the calibration data, else on generated inputs)
with the same floors as the static path, and write it only when the check passes.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from graphopt.algorithms.quant.dynamic import DynamicConfig, quantize_dynamic_matmuls
from graphopt.algorithms.quant.graph import cpu_flags, upgrade_opset
from graphopt.algorithms.quant.sites import find_sites, matmul_macs_share
from graphopt.algorithms.quant.weight_only import (
    BLOCKED_DQ_OPSET,
    MS_DOMAIN,
    WeightOnlyConfig,
    collect_hessians,
    quantize_embeddings,
    quantize_weight_only,
)
from graphopt.core.errors import GraphoptError, OptionError, PassError, VerificationError
from graphopt.core.feeds import feed_list, open_calibration
from graphopt.core.kernels import ort_runs
from graphopt.core.model import Model
from graphopt.core.shapes import prepare
from graphopt.core.verify import verify
from graphopt.jobs.common import (
    ModelLike,
    TransformResult,
    as_model,
    decide,
    jsonable,
    lossy_floors,
    output_paths,
    source_path,
    write_outputs,
)
from graphopt.jobs.optimize import bench_models, optimize_model

logger = logging.getLogger(__name__)

MODES = ("auto", "static", "dynamic", "weight-only")
#: auto's reason for static (also what a direct static :func:`graphopt.jobs.quantize.quantize`
#: call reports: it is given calibration data)
STATIC_REASON = "calibration data given: static int8 with calibrated activation ranges"
TARGETS = ("portable", "ort")
#: share of the weights in MatMul/Gemm matrices above which ``auto`` picks dynamic without data
DYNAMIC_SHARE = 0.5
#: the check's default SQNR floor (dB), as the static path's
DEFAULT_MIN_SQNR_DB = 10.0
#: onnxruntime level the quantized model is checked and timed at
QUANT_LEVEL = "extended"
#: at most this many feeds judge the model; at most this many calibration batches feed GPTQ
MAX_CHECK_FEEDS = 16
MAX_GPTQ_BATCHES = 64
#: the speed measurement is skipped above this much weight
SPEED_MAX_BYTES = 256 << 20


def choose_mode(model: Model, mode: str, calib_given: bool) -> tuple[str, str]:
    """``(mode, why)``: the mode to run for ``mode`` (``auto`` decides; see the module docstring).

    Raises:
        OptionError: an unknown mode.
    """
    if mode not in MODES:
        raise OptionError(f"--mode must be one of {', '.join(MODES)}, not '{mode}'")
    if mode != "auto":
        return mode, "requested"
    share, products, convs = matmul_macs_share(model)
    if products and share >= DYNAMIC_SHARE:
        # transformers: run-time activation scales follow each token's range, which one static
        # range per tensor cannot (bert-mini: dynamic 40.5 dB, static 27.3 dB, and faster)
        given = "; --mode static would use the calibration data" if calib_given else ""
        return "dynamic", (
            f"{share:.0%} of the weights are in {products} MatMul/Gemm matrices: dynamic int8 "
            f"(activation scales computed at run time){given}"
        )
    if calib_given:
        return "static", STATIC_REASON
    return "static", (
        f"only {share:.0%} of the weights are MatMul/Gemm matrices ({convs} Conv): static int8, "
        "which needs --calib DATA"
    )


@dataclass(kw_only=True)
class ModeResult(TransformResult):
    """What :func:`quantize_dynamic` or :func:`quantize_weight_only_job` did.

    Attributes:
        mode: ``dynamic`` or ``weight-only``.
        mode_reason: why this mode (``requested`` or the automatic choice's reason).
        float_model: the float model that was quantized (after the optimization pipeline).
        settings: the quantizer's settings (``emit``, ``per_channel``, ``bits``...).
        stats: what the quantizer did (``matmuls_quantized``, ``weight_bytes_before`` ...).
        skipped: MatMul/Gemm node -> why it stayed float.
        note: a line for the user (nothing to quantize, a fallback of the target).
        checked_on: the inputs the check ran on.
        speed: ``{"fp32", "quantized", "speedup", "noise"}`` (ms) or None.
    """

    mode: str
    mode_reason: str
    float_model: Model
    settings: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    note: str = ""
    checked_on: str = ""
    speed: dict[str, float] | None = None
    opset_before: int = 0
    opset_after: int = 0
    file_bytes_before: int | None = None
    file_bytes_after: int | None = None
    optimize_stats: dict[str, Any] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return bool(self.stats.get("matmuls_quantized") or self.stats.get("embeddings_quantized"))

    def pass_stats(self) -> dict[str, dict[str, Any]]:
        return {
            **({"optimize": self.optimize_stats} if self.optimize_stats else {}),
            f"quantize-{self.mode}": self.stats,
        }

    def to_json(self) -> dict[str, Any]:
        """The ``graphopt quantize --json`` object of these modes."""
        before = self.stats.get("weight_bytes_before") or 0
        after = self.stats.get("weight_bytes_after") or 0
        return jsonable(  # type: ignore[no-any-return]
            {
                **self.change_json(),
                "mode": self.mode,
                "mode_reason": self.mode_reason,
                **self.settings,
                "quantized": self.stats,
                "weights_ratio": round(after / before, 4) if before else None,
                "kept_float": self.skipped,
                "note": self.note,
                "verify_ok": self.verify.ok if self.verify is not None else None,
                "checked_on": self.checked_on,
                "latency_ms": self.speed,
                "opset_before": self.opset_before,
                "opset_after": self.opset_after,
                "file_bytes_before": self.file_bytes_before,
                "file_bytes_after": self.file_bytes_after,
            }
        )


def _feeds_for_check(
    feeds: Any,
    calib_batches: Sequence[Mapping[str, np.ndarray]] | None,
    original: Model,
    input_shapes: Mapping[str, Sequence[int]] | None,
) -> tuple[list[dict[str, Any]] | None, str]:
    if feeds is not None:
        got = feed_list(feeds, original, input_shapes=input_shapes) or []
        return got[:MAX_CHECK_FEEDS], f"{len(got[:MAX_CHECK_FEEDS])} feeds of --feeds"
    if calib_batches:
        got = [dict(b) for b in calib_batches[:MAX_CHECK_FEEDS]]
        return got, f"{len(got)} calibration batches"
    return None, "generated inputs (give real ones with --feeds DATA)"


def _measure(original: Model, qmodel: Model, feed: Mapping[str, Any]) -> dict[str, float] | None:
    try:
        b = bench_models(original, qmodel, feed, levels=("all",))
    except Exception as exc:  # noqa: BLE001 - a measurement, never a reason to fail the job
        logger.warning("quantize: speed not measured (%s)", exc)
        return None
    ratio = b.ratio["all"]
    return {
        "fp32": round(b.latency_ms["before"]["all"], 4),
        "quantized": round(b.latency_ms["after"]["all"], 4),
        "speedup": round(1.0 / ratio, 3) if ratio > 0 else 0.0,
        "noise": round(b.noise["all"], 3),
    }


def _prepare_work(
    model: Model,
    original: Model,
    optimize: bool,
    input_shapes: Mapping[str, Sequence[int]] | None,
    first: Mapping[str, Any] | None,
) -> tuple[Model, dict[str, Any]]:
    if not optimize:
        return original.clone(), {}
    try:
        opt = optimize_model(model, input_shapes=input_shapes, verify_output=True, feeds=first)
    except (VerificationError, PassError) as exc:
        logger.warning("quantize: optimization skipped: %s", exc)
        return original.clone(), {}
    return opt.model, opt.stats()


def _finish(
    res: ModeResult,
    *,
    original: Model,
    check_feeds: list[dict[str, Any]] | None,
    floors: tuple[float | None, float | None],
    verify_output: bool,
    force: bool,
    writing: bool,
    measure_speed: bool,
    out_path: Path | None,
    report_path: Path | None,
    src: str | None,
    t0: float,
) -> ModeResult:
    if verify_output and res.changed:
        res.verify = verify(
            original,
            res.model,
            feeds=check_feeds,
            min_sqnr_db=floors[0],
            min_cosine=floors[1],
            samples=2,
            transformed_level=QUANT_LEVEL,
        )
        decide(
            res.verify,
            what=f"the {res.mode} quantized model",
            judged_on=res.checked_on,
            advice="keep the most sensitive layers float (--keep-float NODES), use more bits, "
            "or write it anyway with --force or --min-sqnr 0",
            force=force,
            writing=writing,
        )
    if measure_speed and res.changed and original.param_bytes() <= SPEED_MAX_BYTES:
        from graphopt.core.feeds import random_feeds

        feed = check_feeds[0] if check_feeds else random_feeds(original, seed=0)
        res.speed = _measure(original, res.model, feed)
    if src is not None and Path(src).is_file():
        res.file_bytes_before = Path(src).stat().st_size
    write_outputs(res, out_path, report_path, f"graphopt quantize ({res.mode}):")
    if res.output is not None:
        res.file_bytes_after = res.output.stat().st_size
    res.seconds = time.perf_counter() - t0
    return res


def _nothing_note(skipped: Mapping[str, str]) -> str:
    why = f" ({len(skipped)} left float: {next(iter(skipped.values()))} ...)" if skipped else ""
    return (
        "nothing to quantize: no MatMul/Gemm with a constant 2-D float weight" + why + "; the "
        "model is written unchanged"
    )


def _no_vnni_x86() -> bool:
    import platform

    machine = platform.machine().lower()
    return not machine.startswith(("arm", "aarch64")) and not (
        {"avx512_vnni", "avx_vnni"} & cpu_flags()
    )


def _target_ok(target: str, op: str) -> tuple[str, str]:
    if target not in TARGETS:
        raise OptionError(f"--target must be one of {', '.join(TARGETS)}, not '{target}'")
    if target == "ort" and not ort_runs(op, 1, MS_DOMAIN):
        return "portable", f"onnxruntime has no {MS_DOMAIN}.{op} kernel here: standard ONNX ops"
    return target, ""


def quantize_dynamic(
    model: ModelLike,
    *,
    output: str | os.PathLike[str] | None = None,
    report: str | os.PathLike[str] | None = None,
    target: str = "portable",
    per_channel: bool = True,
    reduce_range: bool | None = None,
    keep_float: Iterable[str] = (),
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    optimize: bool = True,
    feeds: Any = None,
    min_sqnr: float | None = None,
    min_cosine: float | None = None,
    force: bool = False,
    verify_output: bool = True,
    measure_speed: bool = True,
    mode_reason: str = "requested",
    embeddings: bool = True,
) -> ModeResult:
    """Dynamic int8 of every MatMul/Gemm with a constant weight (``graphopt quantize --mode
    dynamic``), checked against fp32 and written.

    Args:
        model: a :class:`Model` (not changed) or an ONNX file path (never written).
        target: ``portable`` (DynamicQuantizeLinear + MatMulInteger) or ``ort``
            (``com.microsoft.DynamicQuantizeMatMul``).
        per_channel: one weight scale per output column.
        reduce_range: 7-bit weights; None: on x86 without VNNI, 8-bit weights whose aligned
            pairs cannot saturate AVX2's int16 sums (:class:`DynamicConfig` ``pair_bound``),
            elsewhere full 8-bit.
        keep_float: node names to leave float.
        feeds: inputs to judge the result on (default: generated inputs).
        min_sqnr, min_cosine, force: the check's floors and override (as the static path).
        measure_speed: time it against fp32 (ORT_ENABLE_ALL, one thread, interleaved).
        embeddings: also store large Gather tables (embeddings) int8 per row, dequantized
            after the gather (:func:`graphopt.algorithms.quant.weight_only.quantize_embeddings`).
    """
    t0 = time.perf_counter()
    out_path, report_path = output_paths(model, output, report, inputs=[feeds])
    writing = out_path is not None or report_path is not None
    floors = lossy_floors(min_sqnr, min_cosine, DEFAULT_MIN_SQNR_DB)
    target, note = _target_ok(target, "DynamicQuantizeMatMul")
    src = source_path(model)
    model = as_model(model)
    original = prepare(model.clone(), input_shapes)
    check_feeds, checked_on = _feeds_for_check(feeds, None, original, input_shapes)
    work, opt_stats = _prepare_work(
        model, original, optimize, input_shapes, check_feeds[0] if check_feeds else None
    )
    pair = reduce_range is None and _no_vnni_x86()
    cfg = DynamicConfig(
        per_channel=per_channel,
        reduce_range=bool(reduce_range),
        pair_bound=pair,
        emit="ort" if target == "ort" else "integer",
    )
    q = work.clone()
    st = quantize_dynamic_matmuls(q, cfg, keep_float)
    stats = st.to_json()
    if st.quantized and embeddings:
        emb = quantize_embeddings(q, keep_float)
        stats["embeddings_quantized"] = len(emb.embeddings)
        stats["weight_bytes_before"] += emb.weight_bytes_before
        stats["weight_bytes_after"] += emb.weight_bytes_after
    if not st.quantized:
        note = _nothing_note(st.skipped)
        logger.warning("quantize: %s", note)
        q = original.clone()
    res = ModeResult(
        model=q,
        original=original,
        float_model=work,
        mode="dynamic",
        mode_reason=mode_reason,
        settings={
            "target": target,
            "emit": cfg.emit,
            "per_channel": per_channel,
            "weights": "int8 (7-bit, reduce_range)"
            if cfg.reduce_range
            else ("int8 (pair-bounded: no VNNI)" if pair else "int8"),
            "activations": "uint8, per tensor, at run time",
        },
        stats=stats,
        skipped=st.skipped,
        note=note,
        checked_on=checked_on,
        opset_before=original.opset,
        opset_after=q.opset,
        optimize_stats=opt_stats,
        input=src,
    )
    return _finish(
        res,
        original=original,
        check_feeds=check_feeds,
        floors=floors,
        verify_output=verify_output,
        force=force,
        writing=writing,
        measure_speed=measure_speed,
        out_path=out_path,
        report_path=report_path,
        src=src,
        t0=t0,
    )


def quantize_weight_only_job(
    model: ModelLike,
    calib: Any = None,
    *,
    output: str | os.PathLike[str] | None = None,
    report: str | os.PathLike[str] | None = None,
    bits: int = 4,
    block_size: int = 32,
    rounding: str = "rtn",
    target: str = "portable",
    accuracy_level: int = 4,
    embeddings: bool = True,
    head_bits: int | None = None,
    keep_float: Iterable[str] = (),
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    optimize: bool = True,
    feeds: Any = None,
    batch_size: int = 8,
    limit: int | None = None,
    min_sqnr: float | None = None,
    min_cosine: float | None = None,
    force: bool = False,
    verify_output: bool = True,
    measure_speed: bool = True,
    mode_reason: str = "requested",
) -> ModeResult:
    """Weight-only int4/int8 (``graphopt quantize --mode weight-only``), checked and written.

    Args:
        calib: calibration data (``--calib`` formats or feed dicts): GPTQ's Hessians; also the
            check's inputs when ``feeds`` is not given.
        bits: 4 or 8.
        block_size: inputs per scale (a power of two, 16 or more).
        rounding: ``rtn`` (nearest) or ``gptq`` (needs ``calib``).
        target: ``portable`` (blocked DequantizeLinear; raises the opset to 21) or ``ort``
            (``com.microsoft.MatMulNBits``).
        accuracy_level: MatMulNBits' compute type (``ort``): 4 int8 activations (default; see
            :class:`graphopt.algorithms.quant.weight_only.WeightOnlyConfig`), 0 float.
        embeddings: also store large Gather tables int8 per row.
        head_bits: bits of the output heads (MatMul/Gemm whose product is a graph output, such
            as a language model's vocabulary projection), which decide the argmax: 8 keeps
            them int8 while the rest is int4 (as llama.cpp keeps its output matrix at higher
            precision); None: ``bits``.

    Raises:
        OptionError: bad bits/block size/rounding, GPTQ without data, or an opset that cannot
            be raised to 21 for ``portable``.
    """
    t0 = time.perf_counter()
    if bits not in (4, 8):
        raise OptionError(f"--bits must be 4 or 8, not {bits}")
    if block_size < 16 or block_size & (block_size - 1):
        raise OptionError(f"--block-size must be a power of two of at least 16, not {block_size}")
    if rounding not in ("rtn", "gptq"):
        raise OptionError(f"weight-only rounding must be nearest or gptq, not '{rounding}'")
    if head_bits is not None and head_bits not in (4, 8):
        raise OptionError(f"--head-bits must be 4 or 8, not {head_bits}")
    if rounding == "gptq" and calib is None:
        raise OptionError("--rounding gptq needs --calib DATA (its Hessians come from the data)")
    out_path, report_path = output_paths(model, output, report, inputs=[calib, feeds])
    writing = out_path is not None or report_path is not None
    floors = lossy_floors(min_sqnr, min_cosine, DEFAULT_MIN_SQNR_DB)
    target, note = _target_ok(target, "MatMulNBits")
    src = source_path(model)
    model = as_model(model)
    original = prepare(model.clone(), input_shapes)
    batches: list[dict[str, np.ndarray]] = []
    if calib is not None:
        reader = open_calibration(calib, original, batch_size=batch_size, limit=limit)
        for b in reader:
            batches.append(dict(b))
            if len(batches) >= MAX_GPTQ_BATCHES:
                break
    check_feeds, checked_on = _feeds_for_check(feeds, batches, original, input_shapes)
    work, opt_stats = _prepare_work(
        model, original, optimize, input_shapes, check_feeds[0] if check_feeds else None
    )
    q = work.clone()
    if target == "portable" and q.opset < BLOCKED_DQ_OPSET:
        try:
            q = upgrade_opset(q, BLOCKED_DQ_OPSET)
        except GraphoptError as exc:
            raise OptionError(
                f"portable weight-only quantization needs opset {BLOCKED_DQ_OPSET} "
                f"(DequantizeLinear with block_size) and the model's opset {work.opset} cannot "
                f"be converted ({exc}); use --target ort (com.microsoft.MatMulNBits)"
            ) from None
    hessians = collect_hessians(work, batches, keep_float) if rounding == "gptq" else None
    outs = {id(t) for t in q.graph.outputs}
    heads = (
        {
            s.name: head_bits
            for s in find_sites(q, keep_float)[0]
            if id(s.output) in outs or id(s.node.outputs[0]) in outs
        }
        if head_bits is not None
        else {}
    )
    cfg = WeightOnlyConfig(
        site_bits=heads,
        bits=bits,
        block_size=block_size,
        rounding=rounding,
        target=target,
        embeddings=embeddings,
        accuracy_level=accuracy_level,
    )
    st = quantize_weight_only(q, cfg, hessians, keep_float)
    if not st.quantized and not st.embeddings:
        note = _nothing_note(st.skipped)
        logger.warning("quantize: %s", note)
        q = original.clone()
    res = ModeResult(
        model=q,
        original=original,
        float_model=work,
        mode="weight-only",
        mode_reason=mode_reason,
        settings={
            "target": target,
            "emit": "MatMulNBits" if target == "ort" else "DequantizeLinear(block_size)",
            "bits": bits,
            "head_bits": head_bits if heads else None,
            "block_size": block_size,
            "rounding": rounding,
            "activations": "float",
        },
        stats=st.to_json(),
        skipped=st.skipped,
        note=note,
        checked_on=checked_on,
        opset_before=original.opset,
        opset_after=q.opset,
        optimize_stats=opt_stats,
        input=src,
    )
    return _finish(
        res,
        original=original,
        check_feeds=check_feeds,
        floors=floors,
        verify_output=verify_output,
        force=force,
        writing=writing,
        measure_speed=measure_speed,
        out_path=out_path,
        report_path=report_path,
        src=src,
        t0=t0,
    )


def resolve_mode(model: ModelLike, mode: str, calib_given: bool) -> tuple[Model, str, str]:
    """Load ``model`` (a path or a Model) and decide its mode: ``(model, mode, why)``."""
    if mode not in MODES:
        raise OptionError(f"--mode must be one of {', '.join(MODES)}, not '{mode}'")
    m = as_model(model)
    chosen, why = choose_mode(m, mode, calib_given)
    return m, chosen, why
