"""The quantize job: optimize -> opset 13 -> plan -> calibrate -> mixed-range check -> QDQ emission
-> per-layer report -> (sensitivity and mixed precision) -> verify against fp32.

``quantize(model, calib, ...)`` is the public entry point (exported as ``graphopt.quantize``); the
CLI's ``graphopt quantize`` calls it and only prints.

Activation type. onnxruntime's x86 QDQ fusions build integer kernels for uint8 activations with int8
weights (u8s8); int8 activations stay DQ -> float op -> Q there, which is why its int8 default is
slower than fp32 on x86. ``activations='auto'`` therefore picks uint8 on x86 and int8 on ARM;
without VNNI (``avx512_vnni`` / ``avx_vnni`` missing from /proc/cpuinfo) it also reduces weights to
7 bits (``reduce_range``) because AVX2's ``vpmaddubsw`` saturates its int16 pair sums otherwise.

The check decides. The int8 model is compared with fp32 in onnxruntime on the inputs given with
``feeds`` (``--feeds``), else on the first calibration samples; every output must reach the SQNR
floor (default :data:`DEFAULT_MIN_SQNR_DB`, pooled over the samples and for the median sample)
and the cosine floor, and NaN/inf must match exactly. When it does not, nothing is written and
:class:`~graphopt.core.errors.VerificationError` (exit 1) says why and what to do; ``force`` or
``min_sqnr=0`` write anyway, with a warning.

Accuracy control. The per-layer table gives each quantized layer's scales and the SQNR of its output
in the fully quantized model against fp32 (cumulative error). With ``min_sqnr`` or ``metric``, every
layer is also quantized alone (isolated sensitivity: SQNR of the model outputs with only that layer
quantized); layers are then kept float, most sensitive first, growing the set geometrically and
bisecting, until the target holds. Concats whose inputs' ranges differ by more than
``mixed_range_ratio`` (box coordinates next to probabilities) are kept float, since one shared scale
would round the small-range inputs to zero.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.algorithms.quant.calibrate import Progress, collect_ranges
from graphopt.algorithms.quant.graph import (
    QuantConfig,
    QuantPlan,
    apply_quantization,
    choose_activation_type,
    plan_quantization,
    upgrade_opset,
)
from graphopt.algorithms.quant.sites import matmul_macs_share
from graphopt.algorithms.quant.smoothquant import DEFAULT_ALPHA, smooth_model
from graphopt.core.errors import OptionError, PassError, VerificationError
from graphopt.core.feeds import open_calibration
from graphopt.core.model import Model, release_weight_pages
from graphopt.core.session import make_session
from graphopt.core.shapes import prepare
from graphopt.core.verify import sqnr_db, verify
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

Metric = Callable[[Model], "float | bool"]


# ---------------------------------------------------------------------- CPU and types


#: onnxruntime level for running QDQ models: integer kernels, no dequantized weight copies
QUANT_LEVEL = "extended"

#: default floor of the check (dB, every output against fp32): the quantization noise may carry
#: at most a tenth of the output's power. Healthy int8 models measure 12-36 dB (PP-OCR's rec
#: softmax 11.9 dB and det sigmoid map 13.8 dB with task fidelity 0.997 and 0.94; the fixtures
#: 27-36 dB); broken ones (calibration data of the wrong range, overflow) 3 dB or less. The
#: cosine floor follows from it (0.949, :func:`~graphopt.jobs.common.lossy_floors`).
DEFAULT_MIN_SQNR_DB = 10.0
#: with the default floor, at most this share of the quantizable layers falls back to float to
#: meet it; a model that needs more is refused (the calibration data is the likelier culprit)
MAX_FALLBACK_SHARE = 0.5
#: with the default floor, a fully quantized model below this SQNR (dB: the quantization noise
#: as loud as the output) is not rescued by falling back: its ranges are wrong everywhere
#: (calibration data of the wrong scale), not in a few sensitive layers; it is refused
MIN_FALLBACK_SQNR_DB = 0.0
#: the default-floor pre-check and the speed measurement run one more onnxruntime session of the
#: int8 model (and time both models): skipped above this much weight, where the memory bound of a
#: multi-GB model matters more (tests/test_large.py)
EXTRA_RUN_MAX_BYTES = 256 << 20
#: at most this many ``feeds`` samples are used for the check
MAX_FEED_SAMPLES = 64


# ---------------------------------------------------------------------- results


@dataclass
class LayerReport:
    name: str
    op: str
    status: str  # int8 or float
    reason: str = ""
    input_scales: dict[str, float] = field(default_factory=dict)
    output_scale: float | None = None
    weight_scale: tuple[float, float] | None = None
    per_channel: bool | None = None
    absorbed: str | None = None
    sqnr_db: float | None = None  # this layer's output in the quantized model vs fp32
    sensitivity_db: float | None = None  # model outputs with only this layer quantized

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


@dataclass(kw_only=True)
class QuantizeResult(TransformResult):
    """What :func:`quantize` did: the before/after block, the calibration, the per-layer report.

    Attributes:
        float_model: the float model that was quantized (after the optimization pipeline).
        layers: per quantizable layer: status, scales, SQNR of its output, isolated sensitivity.
        kept_float: node name -> why it stayed float.
        stats: the quantizer's counters (``nodes_quantized``, ``weights_quantized``, ...).
        optimize_stats: what the optimization pipeline did before quantizing.
        file_bytes_before, file_bytes_after: sizes of the input and output files (None when the
            model was not read from or written to a file).
    """

    float_model: Model
    layers: list[LayerReport]
    kept_float: dict[str, str]
    activation_dtype: str
    reduce_range: bool
    activation_reason: str
    method: str
    per_channel: bool
    calib_samples: int
    calib_batches: int
    calib_seconds: float
    opset_before: int
    opset_after: int
    optimize_stats: dict[str, Any] = field(default_factory=dict)
    optimize_note: str = ""
    mixed_precision: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    file_bytes_before: int | None = None
    file_bytes_after: int | None = None
    #: ``qat=True``: what training did (graphopt.algorithms.train.recover.TrainReport)
    training: Any = None
    #: ``rounding="adaround"``: per layer (graphopt.algorithms.train.recover.RoundingReport)
    rounding: Any = None
    #: what the check ran on (``"16 calibration samples"``, ``"64 samples of --feeds"``)
    checked_on: str = ""
    #: measured on this CPU (``latency_ms`` in the JSON): ``{"fp32", "int8"}`` median ms,
    #: ``speedup`` (fp32 / int8) and ``noise`` (None: not measured)
    speed: dict[str, float] | None = None
    #: why the static mode was run (``graphopt quantize --mode``: requested, or auto's reason)
    mode_reason: str = "calibration data given: static int8 with calibrated activation ranges"

    def summary(self) -> dict[str, Any]:
        return {
            "mode": "static",
            "mode_reason": self.mode_reason,
            "method": self.method,
            "activations": self.activation_dtype,
            "reduce_range": self.reduce_range,
            "activation_choice": self.activation_reason,
            "per_channel": self.per_channel,
            "calib_samples": self.calib_samples,
            "calib_batches": self.calib_batches,
            "calib_seconds": round(self.calib_seconds, 3),
            "opset_before": self.opset_before,
            "opset_after": self.opset_after,
            "layers_int8": sum(1 for layer in self.layers if layer.status == "int8"),
            "layers_float": sum(1 for layer in self.layers if layer.status == "float"),
            "kept_float": self.kept_float,
            "mixed_precision": self.mixed_precision,
            "verify_ok": self.verify.ok if self.verify is not None else None,
            "checked_on": self.checked_on,
            "latency_ms": self.speed,
            "training": None if self.training is None else self.training.to_json(),
            "rounding": None if self.rounding is None else self.rounding.to_json(),
        }

    def pass_stats(self) -> dict[str, dict[str, Any]]:
        return {
            **({"optimize": self.optimize_stats} if self.optimize_stats else {}),
            "quantize-int8": self.stats,
        }

    def to_json(self) -> dict[str, Any]:
        """The ``graphopt quantize --json`` object."""
        return jsonable(
            {  # type: ignore[no-any-return]
                **self.change_json(),
                **self.summary(),
                "file_bytes_before": self.file_bytes_before,
                "file_bytes_after": self.file_bytes_after,
                "layers": [layer.to_json() for layer in self.layers],
                "optimize_note": self.optimize_note,
            }
        )


# ---------------------------------------------------------------------- helpers


def _first_samples(batches: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Split kept batches into single-sample feeds (each keeps a batch axis of 1)."""
    out: list[dict[str, np.ndarray]] = []
    for b in batches:
        n = next(iter(b.values())).shape[0]
        for i in range(n):
            out.append(
                {k: (v[i : i + 1] if v.ndim and v.shape[0] == n else v) for k, v in b.items()}
            )
    return out


class _Evaluator:
    """Runs candidate models on the kept calibration batches (and the feeds the check judges
    on) and scores them against fp32: the worst output's SQNR pooled over each group of
    batches (the calibration batches, the feeds) and, as the check has it, for the median
    sample of the feeds; the worst figure decides."""

    def __init__(
        self,
        float_model: Model,
        batches: list[dict[str, np.ndarray]],
        also: Sequence[dict[str, np.ndarray]] = (),
    ) -> None:
        self.batches = [*batches, *also]
        self.n_calib = len(batches)
        self.groups = [
            g for g in (range(len(batches)), range(len(batches), len(self.batches))) if g
        ]
        sess = make_session(float_model)
        self.outputs = [o.name for o in sess.get_outputs()]
        self.inputs = {i.name for i in sess.get_inputs()}
        self.refs = [sess.run(self.outputs, self._feeds(b)) for b in self.batches]

    def _feeds(self, b: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: v for k, v in b.items() if k in self.inputs}

    def min_sqnr(self, model: Model) -> float:
        sess = make_session(model)
        outs = [sess.run(self.outputs, self._feeds(b)) for b in self.batches]
        worst = math.inf
        for k in range(len(self.outputs)):
            if not np.issubdtype(np.asarray(self.refs[0][k]).dtype, np.floating):
                continue
            for group in self.groups:
                r = np.concatenate([np.ravel(self.refs[i][k]) for i in group])
                o = np.concatenate([np.ravel(outs[i][k]) for i in group])
                worst = min(worst, sqnr_db(r, o))
            if self.n_calib < len(self.batches):  # the check's median sample of the feeds too
                each = [
                    sqnr_db(np.ravel(self.refs[i][k]), np.ravel(outs[i][k]))
                    for i in range(self.n_calib, len(self.batches))
                ]
                worst = min(worst, float(np.median(each)))
        return worst


def _layer_sqnr(
    float_model: Model,
    qmodel: Model,
    names: Sequence[str],
    batches: Sequence[Mapping[str, np.ndarray]],
) -> dict[str, float]:
    """SQNR of each named tensor in the quantized model against the float model (cumulative)."""
    if not names or not batches:
        return {}
    fs = make_session(float_model, outputs=names)
    qs = make_session(qmodel, QUANT_LEVEL, outputs=names)
    fin = {i.name for i in fs.get_inputs()}
    sig = dict.fromkeys(names, 0.0)
    noise = dict.fromkeys(names, 0.0)
    feed_list = [{k: v for k, v in b.items() if k in fin} for b in batches]
    # float side first, then its weight pages go, then the int8 side (never both resident)
    float_outs = [fs.run(list(names), feeds) for feeds in feed_list]
    release_weight_pages(float_model)
    for feeds, fo in zip(feed_list, float_outs, strict=True):
        qo = qs.run(list(names), feeds)
        for n, a, c in zip(names, fo, qo, strict=False):
            a64 = np.asarray(a, np.float64).ravel()
            with np.errstate(invalid="ignore", over="ignore"):  # inf - inf: the check reports it
                d = a64 - np.asarray(c, np.float64).ravel()
                sig[n] += float(a64 @ a64)
                noise[n] += float(d @ d)
    return {
        n: (
            math.inf
            if noise[n] == 0
            else (-math.inf if sig[n] == 0 else 10 * math.log10(sig[n] / noise[n]))
        )
        for n in names
    }


def bias_correction(
    float_model: Model, qmodel: Model, batches: Sequence[Mapping[str, np.ndarray]]
) -> int:
    """Bias correction of weight quantization (Nagel et al. 2019, empirical input means), in place.

    For a Conv/Gemm with int32 bias, the expected output error from rounding the weights is
    ``E[(W_q - W) x] = sum_{ci,k} (W_q - W)[c, ci, k] E[x_ci]`` per output channel ``c`` (padding
    ignored), with ``E[x_ci]`` measured on the layer's dequantized input in the int8 model; it is
    subtracted from the bias (re-quantized on the bias's own scale). Each layer's correction uses
    only its own weights, so corrections do not compound. Returns the number of layers corrected."""
    fnodes = {n.name: n for n in float_model.graph.nodes}
    targets: dict[str, gs.Node] = {}
    for n in qmodel.graph.nodes:
        if (
            n.op in ("Conv", "Gemm")
            and len(n.inputs) > 2
            and n.inputs[2].inputs
            and n.inputs[2].inputs[0].op == "DequantizeLinear"
            and isinstance(n.inputs[2].inputs[0].inputs[0], gs.Constant)
            and n.inputs[2].inputs[0].inputs[0].dtype == np.int32
            and n.name in fnodes
            and n.inputs[1].inputs
            and n.inputs[1].inputs[0].op == "DequantizeLinear"
            and isinstance(fnodes[n.name].inputs[1], gs.Constant)
            and not (n.op == "Gemm" and n.attrs.get("transA", 0))
        ):
            targets[n.name] = n
    names = sorted({n.inputs[0].name for n in targets.values()})
    if not names or not batches:
        return 0
    qs = make_session(qmodel, outputs=names)
    qin = {i.name for i in qs.get_inputs()}
    sums: dict[str, np.ndarray] = {}
    count: dict[str, int] = {}
    for b in batches:
        outs = qs.run(names, {k: v for k, v in b.items() if k in qin})
        for name, a in zip(names, outs, strict=True):
            a = np.asarray(a, np.float64)
            axes = tuple(i for i in range(a.ndim) if i != 1)
            sums[name] = sums.get(name, 0) + a.sum(axis=axes)
            count[name] = count.get(name, 0) + int(np.prod([a.shape[i] for i in axes]))
    fixed = 0
    for n in targets.values():
        mean = sums[n.inputs[0].name] / max(count[n.inputs[0].name], 1)
        w = np.asarray(fnodes[n.name].inputs[1].values, np.float64)
        wdq = n.inputs[1].inputs[0]
        wq = np.asarray(wdq.inputs[0].values, np.float64)
        ws = np.asarray(wdq.inputs[1].values, np.float64)
        axis = wdq.attrs.get("axis")
        shape = [1] * wq.ndim
        if ws.ndim and axis is not None:
            shape[axis] = -1
        err = wq * ws.reshape(shape) - w  # W_q - W
        if n.op == "Conv":
            group = int(n.attrs.get("group", 1))
            cout, cin_g = err.shape[0], err.shape[1]
            if mean.shape[0] != cin_g * group:
                continue
            m = mean.reshape(group, cin_g)
            e = err.reshape(group, cout // group, cin_g, -1).sum(axis=3)
            delta = np.einsum("goi,gi->go", e, m).reshape(cout)
        else:
            e = err.T if n.attrs.get("transB", 0) else err  # [K, N]
            if mean.shape[0] != e.shape[0]:
                continue
            delta = mean @ e
        dq = n.inputs[2].inputs[0]
        bq = np.asarray(dq.inputs[0].values, np.float64)
        bs = np.asarray(dq.inputs[1].values, np.float64)
        if delta.shape != bq.shape:
            continue
        new = np.clip(np.round(bq - delta / bs), -(2**31), 2**31 - 1).astype(np.int32)
        dq.inputs[0] = gs.Constant(dq.inputs[0].name + "_corrected", new)
        fixed += 1
    return fixed


def _mixed_range_concats(
    model: Model, plan: QuantPlan, ranges: Mapping[str, tuple[float, float]], ratio: float
) -> dict[str, str]:
    out = {}
    for name, q in plan.nodes.items():
        if q.kind != "concat":
            continue
        widths = [ranges[t][1] - ranges[t][0] for t in q.inputs if t in ranges]
        widths = [w for w in widths if w > 0]
        if len(widths) >= 2 and max(widths) / min(widths) > ratio:
            out[name] = (
                f"mixed-range Concat: input ranges span {min(widths):.3g} to "
                f"{max(widths):.3g} (x{max(widths) / min(widths):.0f} > {ratio:g})"
            )
    return out


# ---------------------------------------------------------------------- the job


def quantize(
    model: ModelLike,
    calib: Any,
    *,
    output: str | os.PathLike[str] | None = None,
    report: str | os.PathLike[str] | None = None,
    method: str = "mse",
    activations: str = "auto",
    per_channel: bool = True,
    reduce_range: bool | None = None,
    min_sqnr: float | None = None,
    metric: Metric | None = None,
    metric_target: float | None = None,
    sensitivity: bool | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    optimize: bool = True,
    passes: Sequence[str] | None = None,
    keep_float: Iterable[str] = (),
    op_types: Iterable[str] | None = None,
    mixed_range_ratio: float = 64.0,
    batch_size: int = 8,
    limit: int | None = None,
    eval_samples: int = 16,
    calib_defaults: Mapping[str, np.ndarray] | None = None,
    bias_correct: bool = False,
    qat: bool = False,
    rounding: str = "nearest",
    rounding_iters: int = 1000,
    steps: int = 300,
    time_budget: float | None = None,
    train_progress: Any = None,
    threads: int | None = None,
    progress: Progress | None = None,
    verify_output: bool = True,
    feeds: Any = None,
    min_cosine: float | None = None,
    force: bool = False,
    measure_speed: bool = True,
    smooth: float | None = None,
) -> QuantizeResult:
    """The quantize job (``graphopt quantize``): quantize a float ONNX model to int8 QDQ with
    calibration data, verify against fp32, write the result.

    Args:
        model: a :class:`Model` (not changed) or the path of an ONNX file (never written).
        output: write the int8 model here (atomically).
        report: write a self-contained HTML report here.
        calib: ``.npz`` / ``.npy`` / folder path, or an iterable of feed dicts.
        method: activation range method: minmax, percentile, entropy, mse.
        activations: auto (from the CPU), uint8 or int8.
        per_channel: per-output-channel weight scales (raises the opset to 13 if needed).
        reduce_range: 7-bit weights; None decides from the CPU (no VNNI -> True for uint8).
        min_sqnr: the check's SQNR floor (dB; default :data:`DEFAULT_MIN_SQNR_DB`); the most
            sensitive layers are kept float until every output's SQNR against fp32 on the
            calibration samples reaches it (with the default floor only when the fully quantized
            model misses it, with a warning, and for at most :data:`MAX_FALLBACK_SHARE` of the
            layers). ``0`` turns the floor off (written whatever it computes, with a warning).
        metric: ``metric(quantized_model) -> bool`` (acceptable?) or ``-> float`` compared with
            ``metric_target`` (higher is better); used like ``min_sqnr``.
        sensitivity: measure each layer's isolated sensitivity (default: when a target is given).
        input_shapes: fix dynamic input dims before optimizing (calibration data must match).
        optimize: run the default optimization pipeline first (folding, fusions).
        keep_float: node names to leave in float.
        op_types: restrict quantization to these op types.
        mixed_range_ratio: keep a Concat float when its inputs' ranges differ by more than this.
        batch_size, limit: calibration batching and sample cap.
        eval_samples: calibration samples kept for the SQNR checks.
        calib_defaults: constant feeds for inputs the calibration data does not give.
        bias_correct: empirical bias correction of Conv/Gemm biases on the kept samples.
        qat: quantization-aware training after the static quantization (needs torch, the
            ``graphopt[train]`` extra): weights and LSQ scales fine-tuned against the float
            model on the calibration data (its last quarter held out), written into the same
            QDQ graph (:func:`graphopt.algorithms.train.recover.qat_model`).
        rounding: ``nearest`` (the static path) or ``adaround``: learned rounding of every int8
            Conv/Gemm weight, layer by layer on the calibration data (AdaRound; needs torch),
            same grid and graph (:func:`graphopt.algorithms.train.recover.adaround_model`).
        rounding_iters: with ``adaround``: optimization steps per layer.
        steps, time_budget: with ``qat``: Adam steps (batches of 16) and a wall-clock limit (s).
        train_progress: with ``qat``: ``train_progress(step, steps, loss, held_out_sqnr_db)``.
        threads: with ``qat``: torch threads (default: 1 for small models).
        progress: ``progress(samples_done, total_or_None)`` during calibration.
        verify_output: compare the int8 model with fp32 (on ``feeds``, else on the kept
            calibration samples) and write only when the check passes.
        feeds: inputs to judge the int8 model on (``.npz``/``.npy``/folder path or an iterable
            of feed dicts, batch on axis 0; at most :data:`MAX_FEED_SAMPLES` samples): real
            inputs the calibration never saw. Default: the first calibration samples.
        min_cosine: the check's cosine floor (default: implied by the SQNR floor).
        force: write the model even when it fails the check (a warning says so).
        measure_speed: time the int8 model against fp32 on this CPU (``speed``; a warning
            when int8 is slower beyond noise, :func:`graphopt.jobs.optimize.bench_models`);
            models over :data:`EXTRA_RUN_MAX_BYTES` of weights are not timed.
        smooth: SmoothQuant's migration strength alpha in [0, 1] before calibration
            (:mod:`graphopt.algorithms.quant.smoothquant`); 0 turns it off; None (default):
            ``DEFAULT_ALPHA`` (0.5, the paper's default) when most of the weights are MatMul/Gemm
            matrices (transformers), off otherwise (convolutions have no such outliers).

    Raises:
        VerificationError: the int8 model failed its check and ``output`` or ``report`` was
            given (nothing is written), unless ``force``.
    Returns:
        A :class:`QuantizeResult`; ``to_json()`` is what ``graphopt quantize --json`` prints.
    """
    t0 = time.perf_counter()
    out_path, report_path = output_paths(model, output, report, inputs=[calib, feeds])
    writing = out_path is not None or report_path is not None
    if writing and verify_output and eval_samples < 1 and feeds is None:
        raise OptionError(
            "eval_samples must be at least 1: the int8 model is checked on calibration samples "
            "before it is written (or give feeds)"
        )
    floor_sqnr, floor_cos = lossy_floors(min_sqnr, min_cosine, DEFAULT_MIN_SQNR_DB)
    if rounding not in ("nearest", "adaround"):
        raise OptionError(f"bad rounding '{rounding}': nearest or adaround")
    if qat and rounding != "nearest":
        raise OptionError(
            "--qat trains the weights itself (from the float model): use it or --rounding "
            "adaround, not both"
        )
    if qat or rounding != "nearest":
        from graphopt.algorithms.train import require

        require("--qat" if qat else f"--rounding {rounding}")
        if steps < 1 or (time_budget is not None and time_budget <= 0):
            raise OptionError("--steps and --time-budget must be positive")
    target = min_sqnr if min_sqnr is not None and min_sqnr > 0 else None
    src = source_path(model)
    model = as_model(model)
    dtype, rr, why = choose_activation_type(activations, reduce_range)
    original = prepare(model.clone(), input_shapes)
    reader = open_calibration(
        calib, original, batch_size=batch_size, limit=limit, defaults=calib_defaults
    )
    total = reader.num_samples()
    batch_iter = iter(reader)
    first = next(batch_iter)
    batches = itertools.chain([first], batch_iter)
    first_sample = {k: (v[:1] if v.ndim else v) for k, v in first.items()}
    opt_note = ""
    opt_stats: dict[str, Any] = {}
    if optimize:
        try:
            opt = optimize_model(
                model,
                passes=passes,
                input_shapes=input_shapes,
                verify_output=True,
                feeds=first_sample,
            )
            work = opt.model
            opt_stats = opt.stats()
        except (VerificationError, PassError) as exc:
            opt_note = f"optimization skipped: {exc}"
            logger.warning("quantize: %s", opt_note)
            work = original.clone()
    else:
        work = original.clone()
    opset_before = work.opset
    if work.opset < 10 or (per_channel and work.opset < 13):
        work = upgrade_opset(work, 13)
    keep_float = set(keep_float)
    # optimization passes suffix node names (conv__go12): accept the names of the input model too
    keep_float |= {
        n.name
        for n in work.graph.nodes
        if n.name and re.sub(r"(__go\d+)+$", "", n.name) in keep_float
    }
    if smooth is not None and not 0.0 <= smooth <= 1.0:
        raise OptionError(f"--smooth must be in [0, 1], not {smooth}")
    alpha = (
        (DEFAULT_ALPHA if matmul_macs_share(work)[0] >= 0.5 else 0.0) if smooth is None else smooth
    )
    smooth_stats: dict[str, Any] = {}
    if alpha > 0:
        kept_batches = list(batches)
        smooth_stats = {
            "alpha": alpha,
            **smooth_model(work, kept_batches, alpha, keep_float).to_json(),
        }
        batches = itertools.chain(kept_batches)
    plan = plan_quantization(work, keep_float=keep_float, op_types=op_types)
    levels = 256
    cal = collect_ranges(
        work,
        plan.observed(),
        batches,
        method=method,
        levels=levels,
        progress=progress,
        total=total,
        keep_samples=eval_samples,
    )
    kept_float: dict[str, str] = {}
    mixed = _mixed_range_concats(work, plan, cal.ranges, mixed_range_ratio)
    for name, reason in mixed.items():
        out = plan.nodes[name].output
        readers = [n for n, q in plan.nodes.items() if out is not None and out in q.inputs]
        plan.drop([name], reason)
        kept_float[name] = reason
        for r in readers:  # quantizing the mixed tensor at its reader would do the same harm
            plan.drop([r], f"reads the output of mixed-range Concat {name}")
            kept_float[r] = f"reads the output of mixed-range Concat {name}"
    cfg = QuantConfig(activation_dtype=dtype, per_channel=per_channel, reduce_range=rr)

    def build(keep: Iterable[str] = ()) -> tuple[Model, Any]:
        m = work.clone()
        keep = set(keep)
        only = [n for n in plan.nodes if n not in keep]
        st = apply_quantization(m, plan, cal.ranges, cfg, only=only)
        return m, st

    qmodel, emit = build()
    qmodel.metadata.pop("graphopt.fusion_groups", None)
    eval_batches = cal.kept
    check_feeds: list[dict[str, np.ndarray]] = []
    if verify_output and feeds is not None:
        check_feeds = [
            dict(f)
            for f in open_calibration(
                feeds, original, batch_size=1, limit=MAX_FEED_SAMPLES, defaults=calib_defaults
            )
        ]
    # the floor and the target are met on what the check judges: the feeds too when given (on
    # the calibration samples alone, PP-OCRv4's detector reached the floor, nothing fell back,
    # and the check on its --feeds, other pages, refused it at 9.7 dB < 10 dB)
    evaluator = _Evaluator(work, eval_batches, check_feeds) if eval_batches or check_feeds else None
    sens: dict[str, float] = {}
    mp: dict[str, Any] = {}
    want_target = target is not None or metric is not None
    fallback = False
    small = work.param_bytes() <= EXTRA_RUN_MAX_BYTES
    if not want_target and evaluator is not None and floor_sqnr and not force and small:
        # the default floor: when the fully quantized model misses it on the kept samples (and
        # the feeds), layers fall back to float (most sensitive first) until it holds
        all_int8 = evaluator.min_sqnr(qmodel)
        if MIN_FALLBACK_SQNR_DB <= all_int8 < floor_sqnr:
            logger.warning(
                "quantize: the int8 model reaches %.1f dB on the calibration samples%s, below "
                "the %.1f dB floor; keeping the most sensitive layers float until it holds",
                all_int8,
                " and --feeds" if check_feeds else "",
                floor_sqnr,
            )
            target, want_target, fallback = floor_sqnr, True, True
    if (sensitivity or (sensitivity is None and want_target)) and evaluator is not None:
        for layer in plan.layers():
            m, _ = build([n for n in plan.nodes if n != layer])
            sens[layer] = evaluator.min_sqnr(m)
    if want_target and evaluator is not None:
        all_int8_model, all_int8_emit = qmodel, emit
        qmodel, emit, mp = _mixed_precision(
            build, evaluator, plan, sens, target, metric, metric_target, qmodel, emit
        )
        allowed = max(1, int(MAX_FALLBACK_SHARE * len(plan.layers())))
        if fallback and (not mp.get("met") or len(mp.get("kept", [])) > allowed):
            logger.warning(
                "quantize: the floor needs %d of %d layers float (at most %d may fall back); "
                "judging the fully quantized model",
                len(mp.get("kept", [])),
                len(plan.layers()),
                allowed,
            )
            mp = {**mp, "met": False, "refused": "too many layers would stay float"}
            qmodel, emit = all_int8_model, all_int8_emit
            mp["kept"] = []
        qmodel.metadata.pop("graphopt.fusion_groups", None)
        for n in mp.get("kept", []):
            kept_float[n] = (
                f"sensitive (isolated SQNR {sens.get(n, float('nan')):.1f} dB); "
                f"kept float to meet the target"
            )
    corrected = bias_correction(work, qmodel, eval_batches) if bias_correct and eval_batches else 0
    training = rounded = None
    if qat or rounding != "nearest":
        samples = [
            dict(b)
            for b in open_calibration(
                calib, original, batch_size=batch_size, limit=limit, defaults=calib_defaults
            )
        ]
        if not samples:
            raise OptionError(
                "--qat reads the calibration data a second time: give a path or a list of feed "
                "dicts, not a one-shot iterator"
            )
    if rounding == "adaround":
        from graphopt.algorithms.train.recover import adaround_model

        qmodel, rounded = adaround_model(
            qmodel, work, samples, iters=rounding_iters, threads=threads, progress=train_progress
        )
    if qat:
        from graphopt.algorithms.train.recover import qat_model

        k = len(samples) // 4 if len(samples) >= 4 else 0
        train, held = samples[: len(samples) - k], samples[len(samples) - k :]
        qmodel, training = qat_model(
            qmodel,
            work,
            train,
            held,
            steps=steps,
            time_budget=time_budget,
            progress=train_progress,
            threads=threads,
        )
    # per-layer report
    out_names = [q.output for q in plan.nodes.values() if q.output and q.name in emit.layers]
    cum = _layer_sqnr(work, qmodel, out_names, eval_batches[:4]) if eval_batches else {}
    layers: list[LayerReport] = []
    for n, q in plan.nodes.items():
        if q.kind == "shared":
            continue
        info = emit.layers.get(n)
        if info is None:
            layers.append(
                LayerReport(
                    n,
                    q.op,
                    "float",
                    kept_float.get(n, "no calibrated range"),
                    sensitivity_db=sens.get(n),
                )
            )
            continue
        ws = info.get("weight_scale")
        layers.append(
            LayerReport(
                n,
                q.op,
                "int8",
                "",
                input_scales=info["inputs"],
                output_scale=info["output_scale"],
                weight_scale=tuple(ws) if ws else None,
                per_channel=info.get("per_channel"),
                absorbed=info.get("absorbed"),
                sqnr_db=cum.get(q.output) if q.output else None,
                sensitivity_db=sens.get(n),
            )
        )
    for n, reason in plan.skipped.items():
        if n in kept_float:
            continue
        node_op = next((x.op for x in work.graph.nodes if x.name == n), "?")
        if node_op in ("Conv", "ConvTranspose", "Gemm", "MatMul") or reason.startswith(
            "kept float"
        ):
            kept_float[n] = reason
            layers.append(LayerReport(n, node_op, "float", reason))
    check = None
    checked_on = ""
    if verify_output:
        if feeds is not None:
            checked_on = judged_on = f"{len(check_feeds)} samples of --feeds"
        else:
            check_feeds = _first_samples(eval_batches)[:eval_samples]
            checked_on = f"{len(check_feeds)} calibration samples"
            judged_on = (
                f"{checked_on} (judge it on real inputs the calibration never saw with "
                "--feeds DATA)"
            )
        if check_feeds:
            check = verify(
                original,
                qmodel,
                feeds=check_feeds,
                min_sqnr_db=floor_sqnr,
                min_cosine=floor_cos,
                transformed_level=QUANT_LEVEL,
            )
            decide(
                check,
                what="the int8 model",
                judged_on=judged_on,
                advice=_advice(cal.ranges, original, check),
                force=force,
                writing=writing,
            )
    speed: dict[str, float] | None = None
    if measure_speed and verify_output and small:
        bench_feed = (check_feeds or _first_samples(eval_batches) or [first_sample])[0]
        speed = _measure_speed(original, qmodel, bench_feed)
    stats = {
        "nodes_quantized": emit.nodes,
        "tensors_quantized": emit.tensors,
        "weights_quantized": emit.weights,
        "biases_quantized": emit.biases,
        "activations_absorbed": emit.absorbed,
        "kept_float": len(kept_float),
        "biases_corrected": corrected,
        **({"smoothquant": smooth_stats} if smooth_stats else {}),
    }
    res = QuantizeResult(
        model=qmodel,
        original=original,
        float_model=work,
        layers=layers,
        kept_float=kept_float,
        verify=check,
        activation_dtype=str(dtype),
        reduce_range=rr,
        activation_reason=why,
        method=method,
        per_channel=per_channel,
        calib_samples=cal.samples,
        calib_batches=cal.batches,
        calib_seconds=cal.seconds,
        opset_before=opset_before,
        opset_after=qmodel.opset,
        optimize_stats=opt_stats,
        optimize_note=opt_note,
        mixed_precision=mp,
        stats=stats,
        input=src,
        checked_on=checked_on,
        speed=speed,
        training=training,
        rounding=rounded,
    )
    if src is not None and Path(src).is_file():
        res.file_bytes_before = Path(src).stat().st_size
    write_outputs(res, out_path, report_path, "graphopt quantize:", quant=res, verify=check)
    if res.output is not None:
        res.file_bytes_after = res.output.stat().st_size
    res.seconds = time.perf_counter() - t0
    return res


def _measure_speed(
    float_model: Model, qmodel: Model, feed: Mapping[str, np.ndarray]
) -> dict[str, float] | None:
    """fp32 against int8 latency on this CPU (ORT_ENABLE_ALL, one thread, interleaved) on one
    feed; a warning when int8 is slower beyond noise. None when it cannot be measured."""
    try:
        b = bench_models(float_model, qmodel, feed, levels=("all",))
    except Exception as exc:  # noqa: BLE001 - a measurement, never a reason to fail the job
        logger.warning("quantize: speed not measured (%s)", exc)
        return None
    ratio = b.ratio["all"]
    speed = {
        "fp32": round(b.latency_ms["before"]["all"], 4),
        "int8": round(b.latency_ms["after"]["all"], 4),
        "speedup": round(1.0 / ratio, 3) if ratio > 0 else 0.0,
        "noise": round(b.noise["all"], 3),
    }
    if b.slower():
        logger.warning(
            "quantize: the int8 model is slower than float32 on this CPU (%.2fx the latency: "
            "%.3f ms against %.3f ms); onnxruntime may lack fast integer kernels here (VNNI), "
            "or the model is too small for int8 to pay off",
            ratio,
            speed["int8"],
            speed["fp32"],
        )
    return speed


def _advice(ranges: Mapping[str, tuple[float, float]], model: Model, check: Any) -> str:
    """What to do about an int8 model that failed its check (with the calibrated input ranges,
    which show calibration data of the wrong scale at a glance)."""
    bad = check.worst() if check is not None else None
    non_finite = bad is not None and "non-finite" in bad.note
    spans = [
        f"'{t.name}' [{ranges[t.name][0]:.3g}, {ranges[t.name][1]:.3g}]"
        for t in model.graph.inputs
        if t.name in ranges
    ]
    seen = f" (calibrated input range {', '.join(spans[:4])})" if spans else ""
    anyway = "--force" if non_finite else "--force or --min-sqnr 0"
    return (
        "Check that the calibration data looks like the model's real inputs: the same "
        f"preprocessing, scale and range{seen}; keep the most sensitive layers float with "
        f"--min-sqnr DB; or write it anyway with {anyway}"
    )


def _mixed_precision(
    build: Callable[..., tuple[Model, Any]],
    evaluator: _Evaluator,
    plan: QuantPlan,
    sens: Mapping[str, float],
    min_sqnr: float | None,
    metric: Metric | None,
    metric_target: float | None,
    qmodel: Model,
    emit: Any,
) -> tuple[Model, Any, dict[str, Any]]:
    """Keep the k most sensitive layers float, smallest k meeting the target (doubling, then
    bisection). Returns the chosen model, its emit stats and a summary."""
    order = sorted(plan.layers(), key=lambda n: sens.get(n, math.inf))
    evals = 0

    def ok(m: Model) -> tuple[bool, float]:
        nonlocal evals
        evals += 1
        score = evaluator.min_sqnr(m)
        good = min_sqnr is None or score >= min_sqnr
        if good and metric is not None:
            v = metric(m)
            good = (
                bool(v)
                if isinstance(v, (bool, np.bool_)) or metric_target is None
                else float(v) >= metric_target
            )
        return good, score

    good, score = ok(qmodel)
    summary: dict[str, Any] = {"target_sqnr_db": min_sqnr, "sqnr_all_int8_db": score}
    if good:
        summary.update(kept=[], met=True, evaluations=evals, sqnr_db=score)
        return qmodel, emit, summary
    lo, hi = 0, None
    k = 1
    cache: dict[int, tuple[Model, Any, float]] = {}
    while k <= len(order):
        m, st = build(order[:k])
        g, s = ok(m)
        cache[k] = (m, st, s)
        if g:
            hi = k
            break
        lo = k
        k *= 2
    if hi is None:
        m, st = build(order)
        g, s = ok(m)
        if not g:
            summary.update(kept=list(order), met=False, evaluations=evals, sqnr_db=s)
            return m, st, summary
        hi = len(order)
        cache[hi] = (m, st, s)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        m, st = build(order[:mid])
        g, s = ok(m)
        cache[mid] = (m, st, s)
        if g:
            hi = mid
        else:
            lo = mid
    m, st, s = cache[hi]
    summary.update(kept=list(order[:hi]), met=True, evaluations=evals, sqnr_db=s)
    return m, st, summary
