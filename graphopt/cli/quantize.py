"""``graphopt quantize MODEL -o OUT [--calib DATA] [--mode auto|static|dynamic|weight-only]``:
calibrated static int8 (QDQ) with a per-layer report, dynamic int8, or weight-only int4/int8;
verified against fp32. ``auto`` picks the mode from the model and the data (and says why)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from graphopt.cli.common import (
    console,
    db,
    emit_json,
    fmt_name,
    human_bytes,
    input_shapes,
    split_list,
    verify_table,
)
from graphopt.core.errors import OptionError
from graphopt.jobs.quantize import DEFAULT_MIN_SQNR_DB, QuantizeResult, quantize
from graphopt.jobs.quantize_modes import (
    MODES,
    ModeResult,
    quantize_dynamic,
    quantize_weight_only_job,
    resolve_mode,
)


def add_arguments(name: str, p: argparse.ArgumentParser) -> None:
    p.add_argument("model")
    p.add_argument(
        "--report",
        metavar="OUT.html",
        help="write a self-contained HTML report (graphs, per-step figures)",
    )
    p.add_argument("-o", "--output", required=True)
    p.add_argument(
        "--calib",
        default=None,
        metavar="DATA",
        help=".npz keyed by input name (samples on axis 0), or a folder of .npz files "
        "or of .npy files named after the inputs (static: required; weight-only: GPTQ's data)",
    )
    p.add_argument(
        "--mode",
        default="auto",
        choices=list(MODES),
        help="static (calibrated QDQ int8), dynamic (int8 MatMul/Gemm, activation scales at run "
        "time), weight-only (int4/int8 weights, float activations); auto (default): static with "
        "--calib, else dynamic for MatMul-dominated models (transformers)",
    )
    p.add_argument(
        "--smooth",
        type=float,
        default=None,
        metavar="ALPHA",
        help="--mode static: SmoothQuant migration strength in [0, 1] (activation outliers moved "
        "into the MatMul weights before calibration); default 0.5 for MatMul-dominated models, "
        "off for convolutional ones; 0 turns it off",
    )
    p.add_argument("--bits", type=int, default=None, help="--mode weight-only: 4 (default) or 8")
    p.add_argument(
        "--head-bits",
        type=int,
        default=None,
        choices=[4, 8],
        help="--mode weight-only: bits of the output heads (a MatMul/Gemm whose product is a "
        "graph output, e.g. a language model's vocabulary projection); default --bits",
    )
    p.add_argument(
        "--block-size",
        type=int,
        default=None,
        metavar="B",
        help="--mode weight-only: inputs per scale, a power of two >= 16 (default 32)",
    )
    p.add_argument(
        "--target",
        default=None,
        choices=["portable", "ort"],
        help="dynamic/weight-only: portable standard ONNX (default) or onnxruntime's "
        "com.microsoft kernels (DynamicQuantizeMatMul, MatMulNBits)",
    )
    p.add_argument(
        "--method",
        default="mse",
        choices=["minmax", "percentile", "entropy", "mse"],
        help="activation range method (default mse)",
    )
    p.add_argument(
        "--activations",
        default="auto",
        choices=["auto", "uint8", "int8"],
        help="activation type; auto reads the CPU flags (default)",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--per-channel",
        dest="per_channel",
        action="store_true",
        default=True,
        help="per-output-channel weight scales (default; raises the opset to 13)",
    )
    g.add_argument(
        "--per-tensor", dest="per_channel", action="store_false", help="one weight scale per tensor"
    )
    p.add_argument(
        "--min-sqnr",
        type=float,
        default=None,
        metavar="DB",
        help="the check's floor: every output's SQNR against fp32 (default "
        f"{DEFAULT_MIN_SQNR_DB:g} dB); when given, the most sensitive layers are also kept "
        "float until it holds; 0 writes whatever the SQNR (with a warning)",
    )
    p.add_argument(
        "--min-cosine",
        type=float,
        default=None,
        metavar="C",
        help="the check's cosine floor (default: implied by --min-sqnr, 0.949 at 10 dB)",
    )
    p.add_argument(
        "--feeds",
        metavar="DATA",
        help="judge the int8 model on these inputs (same formats as --calib; real inputs the "
        "calibration never saw); default: the first calibration samples",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="write the model even when it fails the check (with a warning)",
    )
    p.add_argument(
        "--sensitivity",
        action="store_true",
        help="measure every layer's isolated sensitivity (one layer int8 at a time)",
    )
    p.add_argument(
        "--keep-float",
        default="",
        metavar="NODES",
        help="comma-separated node names to leave in float",
    )
    p.add_argument(
        "--bias-correction",
        action="store_true",
        help="correct Conv/Gemm biases for the mean error of weight rounding",
    )
    p.add_argument("--batch-size", type=int, default=8, help="calibration batch size (default 8)")
    p.add_argument("--limit", type=int, default=None, help="use at most this many samples")
    p.add_argument(
        "--no-optimize",
        action="store_true",
        help="quantize the model as given (skip the default optimization pipeline)",
    )
    p.add_argument(
        "--progress",
        action="store_true",
        help="show the calibration progress bar even when stderr is not a terminal",
    )
    p.add_argument(
        "--qat",
        action="store_true",
        help="quantization-aware training after calibration: weights and scales (LSQ) "
        "fine-tuned against the float model on --calib, written as the same QDQ graph "
        "(needs torch: pip install graphopt[train])",
    )
    p.add_argument(
        "--rounding",
        choices=["nearest", "adaround", "gptq"],
        default="nearest",
        help="weight rounding: nearest (default); adaround (static): learned per layer on "
        "--calib (AdaRound; needs torch: pip install graphopt[train]); gptq (weight-only): "
        "second-order error compensation on --calib (GPTQ)",
    )
    p.add_argument(
        "--rounding-iters",
        type=int,
        default=1000,
        metavar="N",
        help="--rounding adaround: steps per layer",
    )
    p.add_argument("--steps", type=int, default=300, metavar="N", help="--qat: training steps")
    p.add_argument(
        "--time-budget", type=float, default=None, metavar="S", help="--qat: stop after S seconds"
    )
    p.add_argument("--threads", type=int, default=None, help="--qat: torch threads")
    p.set_defaults(func=cmd_quantize)


def _check_combos(args: argparse.Namespace, mode: str) -> None:
    """Exit 2 for options that do not apply to ``mode``."""
    if mode != "weight-only":
        for opt, val in (
            ("--bits", args.bits),
            ("--block-size", args.block_size),
            ("--head-bits", args.head_bits),
        ):
            if val is not None:
                raise OptionError(f"{opt} applies to --mode weight-only, not {mode}")
        if args.rounding == "gptq":
            raise OptionError(f"--rounding gptq applies to --mode weight-only, not {mode}")
    else:
        if args.rounding == "adaround":
            raise OptionError("--rounding adaround applies to --mode static, not weight-only")
    if mode != "static":
        for opt, on in (
            ("--qat", args.qat),
            ("--bias-correction", args.bias_correction),
            ("--sensitivity", args.sensitivity),
            ("--smooth", args.smooth is not None),
        ):
            if on:
                raise OptionError(f"{opt} applies to --mode static, not {mode}")
    if mode == "static":
        if args.target is not None:
            raise OptionError("--target applies to --mode dynamic and weight-only, not static")
        if args.calib is None:
            raise OptionError("static int8 needs calibration data: --calib DATA")
    if mode == "dynamic" and args.calib is not None and args.mode == "dynamic":
        raise OptionError("--mode dynamic computes activation scales at run time: drop --calib")


def cmd_quantize(args: argparse.Namespace) -> int:
    if args.mode != "auto":
        _check_combos(args, args.mode)
    model, mode, why = resolve_mode(args.model, args.mode, args.calib is not None)
    _check_combos(args, mode)
    if mode != "static":
        return _cmd_mode(args, model, mode, why)
    progress_cb: Callable[[int, int | None], None] | None = None
    bar = None
    if (not args.json and sys.stderr.isatty()) or args.progress:
        bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console(stderr=True),
            transient=True,
        )
        task = bar.add_task("calibrating", total=None)
        bar.start()

        def progress_cb(done: int, total: int | None) -> None:
            bar.update(task, completed=done, total=total)

    train_cb: Callable[[int, int, float, float | None], None] | None = None
    if bar is not None and (args.qat or args.rounding != "nearest"):
        qat_task = bar.add_task("QAT" if args.qat else "rounding layers", total=None)

        def train_cb(step: int, steps: int, loss: float, sqnr: float | None) -> None:
            bar.update(qat_task, completed=step, total=steps)

    try:
        res = quantize(
            model,
            args.calib,
            output=args.output,
            report=args.report,
            method=args.method,
            activations=args.activations,
            per_channel=args.per_channel,
            min_sqnr=args.min_sqnr,
            min_cosine=args.min_cosine,
            feeds=args.feeds,
            force=args.force,
            sensitivity=True if args.sensitivity else None,
            input_shapes=input_shapes(args),
            optimize=not args.no_optimize,
            keep_float=split_list(args.keep_float),
            batch_size=args.batch_size,
            limit=args.limit,
            bias_correct=args.bias_correction,
            progress=progress_cb,
            qat=args.qat,
            rounding=args.rounding,
            rounding_iters=args.rounding_iters,
            steps=args.steps,
            time_budget=args.time_budget,
            threads=args.threads,
            train_progress=train_cb,
            smooth=args.smooth,
        )
    finally:
        if bar is not None:
            bar.stop()
    if args.mode == "static":
        res.mode_reason = why  # "requested"; auto's reason is the job's own default
    if args.json:
        emit_json(res.to_json())
        return 0
    c = console()
    c.print(f"mode: static ({fmt_name(why)})")
    c.print(
        f"[bold]{fmt_name(args.model)}[/] -> {fmt_name(res.output)}: {res.method} "
        f"calibration on {res.calib_samples} samples in {res.calib_seconds:.1f} s; "
        f"activations {res.activation_dtype}{' (reduce_range)' if res.reduce_range else ''} "
        f"({res.activation_reason}); weights int8 "
        f"{'per channel' if res.per_channel else 'per tensor'}; opset {res.opset_before} -> "
        f"{res.opset_after}"
    )
    if res.optimize_note:
        c.print(f"[yellow]{fmt_name(res.optimize_note)}[/]")
    sq = res.stats.get("smoothquant")
    if sq:
        c.print(
            f"SmoothQuant (alpha {sq['alpha']:g}): {sq['matmuls_smoothed']} MatMul/Gemm behind "
            f"{sq['activations_smoothed']} activations ({sq['folded_into_layernorm']} folded into "
            f"LayerNorm, {sq['mul_inserted']} Mul inserted)"
        )
    c.print(_layer_table(res))
    if res.kept_float:
        kt = Table(title="kept in float", title_justify="left")
        kt.add_column("node")
        kt.add_column("why")
        for n, why in res.kept_float.items():
            kt.add_row(fmt_name(n), fmt_name(why))
        c.print(kt)
    if res.mixed_precision:
        mp = res.mixed_precision
        c.print(
            f"mixed precision: target {mp.get('target_sqnr_db')} dB, all-int8 "
            f"{mp.get('sqnr_all_int8_db', float('nan')):.1f} dB -> "
            f"{mp.get('sqnr_db', float('nan')):.1f} dB with {len(mp.get('kept', []))} layers "
            f"float ({'met' if mp.get('met') else 'NOT met'}, {mp.get('evaluations')} "
            f"evaluations)"
        )
    if res.file_bytes_before is not None and res.file_bytes_after is not None:
        a, b = res.file_bytes_before, res.file_bytes_after
        c.print(
            f"file size {human_bytes(a)} -> {human_bytes(b)} ({(b - a) / max(a, 1) * 100:+.1f}%)"
        )
    if res.training is not None:
        tr = res.training
        c.print(
            f"QAT: {tr.steps} steps in {tr.seconds:.1f} s ({tr.stopped}) on {tr.train_samples} "
            f"samples; held-out SQNR against fp32 {db(tr.initial_sqnr_db)} -> "
            f"{db(tr.final_sqnr_db)} dB"
        )
    if res.rounding is not None:
        rr = res.rounding
        gains = [a / b for _, a, b, _ in rr.per_layer if b > 0]
        c.print(
            f"learned rounding: {rr.layers} layers in {rr.seconds:.1f} s on {rr.samples} "
            f"samples; held-out layer error {min(gains, default=1):.2f}x to "
            f"{max(gains, default=1):.2f}x lower than nearest"
        )
    if res.verify:
        c.print(
            verify_table(
                res.verify, f"int8 against fp32 on {res.checked_on or 'samples'} (onnxruntime)"
            )
        )
        if not res.verify.ok:
            c.print("[red]the int8 model FAILED its check and was written anyway (--force)[/]")
    c.print(f"quantized and wrote {fmt_name(res.output)} in {res.seconds:.2f} s")
    return 0


def _cmd_mode(args: argparse.Namespace, model: object, mode: str, why: str) -> int:
    """Dynamic and weight-only modes."""
    common = dict(
        output=args.output,
        report=args.report,
        target=args.target or "portable",
        keep_float=split_list(args.keep_float),
        input_shapes=input_shapes(args),
        optimize=not args.no_optimize,
        feeds=args.feeds,
        min_sqnr=args.min_sqnr,
        min_cosine=args.min_cosine,
        force=args.force,
        mode_reason=why,
    )
    res: ModeResult
    if mode == "dynamic":
        res = quantize_dynamic(model, per_channel=args.per_channel, **common)  # type: ignore[arg-type]
    else:
        res = quantize_weight_only_job(
            model,  # type: ignore[arg-type]
            args.calib,
            bits=4 if args.bits is None else args.bits,
            block_size=32 if args.block_size is None else args.block_size,
            rounding="gptq" if args.rounding == "gptq" else "rtn",
            head_bits=args.head_bits,
            batch_size=args.batch_size,
            limit=args.limit,
            **common,  # type: ignore[arg-type]
        )
    if args.json:
        emit_json(res.to_json())
        return 0
    c = console()
    c.print(f"mode: {mode} ({fmt_name(why)})")
    s = res.settings
    what = (
        f"weights {s.get('weights')}, activations {s.get('activations')}"
        if mode == "dynamic"
        else f"weights int{s.get('bits')} in blocks of {s.get('block_size')} "
        f"({s.get('rounding')}), activations float"
    )
    c.print(
        f"[bold]{fmt_name(args.model)}[/] -> {fmt_name(res.output)}: {what}; "
        f"{fmt_name(s.get('emit'))} ({s.get('target')}); opset {res.opset_before} -> "
        f"{res.opset_after}"
    )
    if res.note:
        c.print(f"[yellow]{fmt_name(res.note)}[/]")
    st = res.stats
    if st.get("weight_bytes_before"):
        c.print(
            f"{st.get('matmuls_quantized', 0)} MatMul/Gemm"
            + (
                f" and {st['embeddings_quantized']} embedding tables"
                if st.get("embeddings_quantized")
                else ""
            )
            + f" quantized: weights {human_bytes(st['weight_bytes_before'])} -> "
            f"{human_bytes(st['weight_bytes_after'])}"
        )
    if res.skipped:
        kt = Table(title="kept in float", title_justify="left")
        kt.add_column("node")
        kt.add_column("why")
        for n, reason in list(res.skipped.items())[:50]:
            kt.add_row(fmt_name(n), fmt_name(reason))
        c.print(kt)
    if res.speed:
        c.print(
            f"latency (onnxruntime, 1 thread): fp32 {res.speed['fp32']:.3f} ms, quantized "
            f"{res.speed['quantized']:.3f} ms ({res.speed['speedup']:.2f}x)"
        )
    if res.verify:
        c.print(
            verify_table(
                res.verify, f"{mode} against fp32 on {res.checked_on or 'samples'} (onnxruntime)"
            )
        )
        if not res.verify.ok:
            c.print("[red]the model FAILED its check and was written anyway (--force)[/]")
    c.print(f"wrote {fmt_name(res.output)} in {res.seconds:.2f} s")
    return 0


def _layer_table(result: QuantizeResult, limit: int = 400) -> Table:
    t = Table(
        title="layers (SQNR: this layer's output in the int8 model vs fp32; isolated: model "
        "outputs with only this layer int8)",
        title_justify="left",
    )
    for col in (
        "layer",
        "op",
        "status",
        "in scale",
        "out scale",
        "weight scale",
        "SQNR dB",
        "isolated dB",
    ):
        t.add_column(col, justify="left" if col in ("layer", "op", "status") else "right")
    for layer in result.layers[:limit]:
        ins = ", ".join(f"{s:.3g}" for s in layer.input_scales.values())
        ws = (
            ""
            if not layer.weight_scale
            else (
                f"{layer.weight_scale[0]:.2g}..{layer.weight_scale[1]:.2g}"
                if layer.per_channel
                else f"{layer.weight_scale[0]:.3g}"
            )
        )
        status = "int8" if layer.status == "int8" else "[yellow]float[/]"
        op = layer.op + (f"+{layer.absorbed.split('/')[-1]}" if layer.absorbed else "")
        t.add_row(
            fmt_name(layer.name),
            fmt_name(op),
            status,
            ins,
            "" if layer.output_scale is None else f"{layer.output_scale:.3g}",
            ws,
            db(layer.sqnr_db),
            db(layer.sensitivity_db),
        )
    return t
