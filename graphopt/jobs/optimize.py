"""The optimize job: load -> fix shapes -> infer shapes -> pass pipeline to a fixed point -> verify
-> write.

``DEFAULT_PIPELINE`` is the pass list run by ``graphopt optimize`` when ``--passes`` is not given;
``TARGET_PIPELINES`` adds target-specific passes (``ort`` emits onnxruntime's fused ops).
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import onnx

from graphopt.core.errors import GraphoptError, VerificationError
from graphopt.core.feeds import FeedSource, feed_list, random_feeds
from graphopt.core.gcpolicy import with_job_gc
from graphopt.core.latency import interleaved
from graphopt.core.loader import load
from graphopt.core.model import Model
from graphopt.core.pass_manager import ManagerResult, Pass, PassManager, PassRecord
from graphopt.core.session import (
    ZERO_COPY_BYTES,
    input_names,
    make_session,
    open_check,
    take_session,
)
from graphopt.core.shapes import infer_shapes, missing_shapes, prepare
from graphopt.core.validate import ort_reason
from graphopt.core.verify import ATOL as VERIFY_ATOL
from graphopt.core.verify import RTOL as VERIFY_RTOL
from graphopt.core.verify import Reference, run_reference, verify
from graphopt.jobs.common import (
    ModelLike,
    ModelNumbers,
    TransformResult,
    as_model,
    jsonable,
    output_paths,
    source_path,
    write_outputs,
)
from graphopt.passes import get_pass, known_pass_names, resolve_passes

logger = logging.getLogger(__name__)

#: semantics-preserving passes run by default, in order, repeated to a fixed point
DEFAULT_PIPELINE: list[str] = [
    "fold-constants",
    "eliminate-noop",
    "eliminate-identity",
    "fuse-conv-bn",
    "fuse-conv-mul-add",
    "fuse-pad",
    "fuse-matmul-add",
    "fuse-slices",
    "merge-slices",
    "fuse-space-to-depth",
    "simplify-symbolic-shapes",
    "recognize-activations",
    "fuse-layernorm",
    "eliminate-cse",
    "eliminate-dead",
    "toposort",
]

#: target lowering, run to its own fixed point after the default pipeline has converged (a pass
#: named here is constructed with ``target=...`` when it takes that option)
TARGET_PIPELINES: dict[str, list[str]] = {
    # standard ONNX, no back-end metadata (TVM's groups: compile's own analysis); residual sums
    # as Sum keep onnxruntime off its slow fused SkipLayerNormalization
    "portable": ["fuse-attention", "sum-residual-adds"],
    "ort": [
        "fuse-conv-activation",
        "fuse-attention",
        "fuse-layernorm",
        "fuse-gelu",
        "fuse-skip-layernorm",
        "eliminate-dead",
        "toposort",
    ],
}

#: passes of TARGET_PIPELINES that take a ``target`` option
TARGETED_PASSES = {
    "fuse-conv-activation",
    "fuse-attention",
    "fuse-layernorm",
    "fuse-gelu",
    "fuse-skip-layernorm",
}

#: fp32 tolerance for semantics-preserving pipelines (relative to max |reference|; widened for
#: float16/bfloat16 outputs by :func:`graphopt.core.verify.dtype_tolerance`)
RTOL = VERIFY_RTOL
ATOL = VERIFY_ATOL
#: pipelines containing a lossy pass (quantize, prune, fp16) pass when every output reaches this
LOSSY_MIN_SQNR_DB = 20.0

#: ``optimize --bench``: the onnxruntime levels measured (``ORT_DISABLE_ALL``, ``ORT_ENABLE_ALL``)
BENCH_LEVELS = ("disable_all", "all")
LEVEL_NAMES = {"disable_all": "ORT_DISABLE_ALL", "all": "ORT_ENABLE_ALL"}
#: ``optimize --bench``: the optimized model is slower than the input when its latency over the
#: input's (the median of the per-round ratios) exceeds ``1 + max(BENCH_MIN_NOISE, 2 standard
#: errors of that median)`` at some level, in two measurements in a row; the input's graph is then
#: written instead, with a warning
BENCH_MIN_NOISE = 0.03


def default_pipeline(target: str = "portable") -> list[str]:
    """The default pass names for a target, restricted to passes that are registered."""
    if target not in TARGET_PIPELINES:
        raise GraphoptError(
            f"unknown target '{target}'; choose one of {', '.join(TARGET_PIPELINES)}"
        )
    known = known_pass_names()
    return [p for p in DEFAULT_PIPELINE + TARGET_PIPELINES[target] if p in known]


def target_passes(target: str = "portable") -> list[Pass]:
    """The target lowering passes, constructed for ``target`` (registered passes only)."""
    default_pipeline(target)  # validates the target
    known = known_pass_names()
    return [
        get_pass(p, target=target) if p in TARGETED_PASSES else get_pass(p)
        for p in TARGET_PIPELINES[target]
        if p in known
    ]


def _pass_list(passes: str | Sequence[str | Pass], target: str) -> list[Pass]:
    """Pass instances for names (``"a,b"`` or a list) or instances; passes that take a target
    are built for ``target``."""
    items = (
        [p.strip() for p in passes.split(",") if p.strip()]
        if isinstance(passes, str)
        else list(passes)
    )
    return resolve_passes(
        [
            get_pass(p, target=target) if isinstance(p, str) and p in TARGETED_PASSES else p
            for p in items
        ]
    )


@dataclass(kw_only=True)
class OptimizeResult(TransformResult):
    """What :func:`optimize` did: the before/after block plus the pass manager's record.

    Attributes:
        manager: every pass run (steps, per-pass stats).
        pipeline: the pass names, in order.
        target: ``portable`` or ``ort``.
        pass_seconds: time spent in the passes (``seconds`` is the whole job).
        latency_ms: with ``bench``: ``{"before"|"after": {"disable_all"|"all": ms}}``.
        latency_ratio: with ``bench``: per level, the optimized model's latency over the input's
            (median of the per-round ratios; above 1: slower).
        kept_input: with ``bench``: the optimized model was slower than the input beyond noise,
            so the input's graph was written (``model`` is the input's; ``optimized`` the
            rejected one).
        optimized: the pipeline's result when ``kept_input`` (else None).
    """

    manager: ManagerResult
    pipeline: list[str] = field(default_factory=list)
    target: str = "portable"
    pass_seconds: float = 0.0
    latency_ms: dict[str, dict[str, float]] | None = None
    latency_ratio: dict[str, float] | None = None
    kept_input: bool = False
    optimized: Model | None = None

    def stats(self) -> dict[str, dict[str, Any]]:
        """Counters summed over the sweeps, per pass name."""
        return self.manager.stats_by_pass()

    def pass_stats(self) -> dict[str, dict[str, Any]]:
        return self.stats()

    def to_json(self) -> dict[str, Any]:
        """The ``graphopt optimize --json`` object."""
        return jsonable(
            {
                **self.change_json(),
                "target": self.target,  # type: ignore[no-any-return]
                "latency_ms": self.latency_ms,
                "latency_ratio": self.latency_ratio,
                "kept_input": self.kept_input,
            }
        )


@dataclass
class BenchResult:
    """One interleaved measurement of the input against the optimized model.

    Attributes:
        latency_ms: ``{"before"|"after": {level: median ms}}``.
        ratio: per level, the median of the per-round ratios after/before.
        noise: per level, the relative margin a ratio must exceed to count as slower.
    """

    latency_ms: dict[str, dict[str, float]]
    ratio: dict[str, float]
    noise: dict[str, float]

    def slower(self) -> list[str]:
        """The levels where the optimized model is slower than the input beyond noise."""
        return [lv for lv, r in self.ratio.items() if r > 1.0 + self.noise[lv]]


def bench_models(
    before: Model,
    after: Model,
    feeds: Mapping[str, Any],
    levels: Sequence[str] = BENCH_LEVELS,
    runs: int = 30,
) -> BenchResult:
    """Time ``before`` and ``after`` interleaved at every onnxruntime level (1 thread, spinning
    off) on one feed dict.

    The noise margin of a level is two standard errors of the median per-round ratio
    (``1.2533 * sigma / sqrt(n)``, sigma estimated robustly as IQR / 1.349), at least
    :data:`BENCH_MIN_NOISE`.
    """
    runners = {}
    for name, model in (("before", before), ("after", after)):
        for level in levels:
            sess = make_session(model, level, 1)
            f = {k: v for k, v in feeds.items() if k in input_names(sess)}
            runners[f"{name}@{level}"] = _runner(sess, f)
    t = interleaved(runners, runs=runs, warmup=3)
    latency = {
        name: {lv: t.median_ms(f"{name}@{lv}") for lv in levels} for name in ("before", "after")
    }
    ratio, noise = {}, {}
    for lv in levels:
        a, b = f"after@{lv}", f"before@{lv}"
        ratio[lv] = t.ratio(a, b, paired=True)
        per_round = [x / y for x, y in zip(t.times[a], t.times[b], strict=False) if y > 0]
        q = statistics.quantiles(per_round, n=4) if len(per_round) >= 4 else [1.0, 1.0, 1.0]
        se = 1.2533 * ((q[2] - q[0]) / 1.349) / math.sqrt(max(len(per_round), 1))
        noise[lv] = max(BENCH_MIN_NOISE, 2.0 * se / max(ratio[lv], 1e-12))
    return BenchResult(latency, ratio, noise)


def _runner(sess: Any, feeds: Mapping[str, Any]) -> Callable[[], object]:
    return lambda: sess.run(None, feeds)


def optimize_model(
    model: Model,
    passes: str | Sequence[str | Pass] | None = None,
    target: str = "portable",
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    verify_output: bool = True,
    feeds: FeedSource | None = None,
    steps: int = 10,
    on_pass: Callable[[PassRecord], None] | None = None,
    copy: bool = True,
    keep_original: bool = True,
) -> OptimizeResult:
    """Optimize a model in memory (a transformed copy is returned; ``model`` is not changed).

    Args:
        passes: pass names (``"a,b"`` or a list) or instances instead of the default pipeline.
        target: ``portable`` (standard ONNX) or ``ort`` (may emit onnxruntime's fused ops).
        input_shapes: fixed shapes for dynamic inputs.
        verify_output: compare the result with the input in onnxruntime.
        feeds: the inputs to verify on (one feed dict, an iterable of them, or a path in the
            ``--calib`` formats; default: generated inputs, :func:`random_feeds`); the first
            also drives shape inference's onnxruntime fallback.
        steps: at most this many sweeps over the pass list.
        on_pass: called after every pass run.
        copy: False: ``model`` is the caller's to give away (a model :func:`optimize` loaded
            itself): it becomes the result's ``original`` (input shapes fixed, shapes inferred)
            instead of a copy of it.
        keep_original: False (with ``copy=False``, a model loaded from a file): the input is
            not kept beside the result: its before-figures (:class:`ModelNumbers`) and its
            outputs on the feeds are computed before the passes, which then transform it in
            place (one IR in memory instead of two, no copy of the graph); the result's
            ``original`` is None.

    Raises:
        VerificationError: when the optimized model's outputs differ beyond fp32 tolerance.
    """
    t0 = time.perf_counter()
    default_pipeline(target)  # validates the target
    feed_dicts = feed_list(feeds, model, input_shapes=input_shapes)
    first = feed_dicts[0] if feed_dicts else None
    # the session validation opened on a model loaded by the job: verification's reference
    # (input dims fixed and shapes inferred by prepare compute the same); one session less.
    # Taken when verification starts, so that verify can close it before the next one opens.
    reuse = not copy and verify_output
    if not copy and not verify_output:
        take_session(model)  # nothing runs the input again: released now
    original = prepare(model.clone() if copy else model, input_shapes, first)
    release = not keep_original and not copy and model.path is not None
    before: ModelNumbers | None = None
    ref: Reference | None = None
    t_ref = 0.0  # not the passes' time (pass_seconds)
    if release:
        # the input's figures and outputs now; its IR then becomes the result (no copy)
        t1 = time.perf_counter()
        before = ModelNumbers.of(original)
        if verify_output:
            ref = run_reference(
                original, feed_dicts, reference=take_session(model) if reuse else None
            )
        work = original
        t_ref = time.perf_counter() - t1
    else:
        work = original.clone()
    lowering: list[Pass] = []
    if passes is not None:
        pass_list = _pass_list(passes, target)
    else:  # the default pipeline to a fixed point, then the target's lowering to its own
        known = known_pass_names()
        pass_list = resolve_passes([p for p in DEFAULT_PIPELINE if p in known])
        lowering = target_passes(target)
    for p in pass_list + lowering:  # passes that run the model (memory probes) use the feeds
        if first is not None and getattr(p, "feeds", False) is None:
            p.feeds = first  # type: ignore[attr-defined]
    manager = PassManager(pass_list, steps=steps, on_pass=on_pass)
    result = manager(work)
    if lowering:
        low = PassManager(lowering, steps=steps, on_pass=on_pass)(result.model)
        result = ManagerResult(
            low.model,
            result.modified or low.modified,
            result.records + low.records,
            result.steps + low.steps,
        )
        pass_list = pass_list + lowering
    out = result.model
    if missing_shapes(out):  # passes keep the shapes they touch; re-derive only what is missing
        infer_shapes(out, feeds=first)
    elapsed = time.perf_counter() - t0 - t_ref
    report = None
    if verify_output:
        # one export of the result serves both onnxruntime sessions (verification, and the
        # ORT_ENABLE_ALL load check); large weights go the zero-copy way of make_session
        exported: Model | onnx.ModelProto = (
            out.to_onnx() if out.param_bytes() < ZERO_COPY_BYTES else out
        )
        # lossy passes (pruning, quantization, fp16) change numbers by design: judge them by SQNR
        lossy = any(type(p).lossy for p in pass_list)
        reference_of = None if release else original
        if lossy:
            report = verify(
                reference_of,
                exported,
                feeds=feed_dicts,
                min_sqnr_db=LOSSY_MIN_SQNR_DB,
                reference=take_session(model) if reuse and not release else None,
                precomputed=ref,
            )
        else:
            report = verify(
                reference_of,
                exported,
                feeds=feed_dicts,
                rtol=RTOL,
                atol=ATOL,
                reference=take_session(model) if reuse and not release else None,
                precomputed=ref,
            )
        ref = None
        if not report.ok:
            raise VerificationError(
                f"optimized model differs from the input on {report.failure()}; not written. "
                + (
                    "A lossy pass went too far: use 'graphopt prune/quantize/fp16' with their "
                    "accuracy options"
                    if lossy
                    else "Re-run with -v and --passes to find the pass, and report it"
                )
            )
    if verify_output:
        source = model.path
        check_loads(
            _reloader(source, input_shapes) if release and source is not None else original,
            exported,
            input_shapes,
        )
    res = OptimizeResult(
        model=out,
        original=None if release else original,
        verify=report,
        manager=result,
        pipeline=[p.name for p in pass_list],
        target=target,
        pass_seconds=elapsed,
        seconds=time.perf_counter() - t0,
    )
    if before is not None:
        res.before = before  # the cached figures, taken before the passes
    if not copy and verify_output and isinstance(exported, onnx.ModelProto):
        # the job's own model, about to be written: what was verified is what is written
        res.export = exported
    return res


def _reloader(
    path: str | os.PathLike[str], input_shapes: Mapping[str, Sequence[int]] | None
) -> Callable[[], Model]:
    """The input model again, as :func:`optimize_model` prepared it (for :func:`check_loads`'s
    rare second question, when the input was not kept)."""
    return lambda: prepare(load(path), input_shapes, check_size=False)


def _load_error(model: Model | onnx.ModelProto, level: str) -> str | None:
    """onnxruntime's reason for refusing ``model`` at ``level`` (None: it loads)."""
    try:
        open_check(model, level)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        return ort_reason(exc)
    return None


def check_loads(
    original: Model | Callable[[], Model],
    out: Model | onnx.ModelProto,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
) -> None:
    """The written model must load in onnxruntime at ``ORT_ENABLE_ALL`` too, the level users run
    it at (verification runs at ``ORT_DISABLE_ALL``, where onnxruntime skips the graph-level
    inference that may reject a subgraph). When the input model with the ``--input-shape`` dims
    does not load there either (onnxruntime 1.32 refuses silero-vad with ``input`` fixed to 1x512
    at ORT_ENABLE_ALL: its If-subgraph inference fails, while the dynamic model loads), the
    output is no worse than what was asked for: a warning says so. ``original`` may be a
    function that gives the input model (loaded only for that second question).

    Raises:
        VerificationError: only the optimized model does not load (a graphopt bug; not written).
    """
    why = _load_error(out, "all")
    if why is None:
        return
    if _load_error(original if isinstance(original, Model) else original(), "all") is not None:
        fixed = " ".join(
            f"--input-shape {k}:{'x'.join(str(d) for d in v)}"
            for k, v in (input_shapes or {}).items()
        )
        logger.warning(
            "onnxruntime cannot load the model%s at ORT_ENABLE_ALL (%s), the input no more than "
            "the output; it loads at ORT_DISABLE_ALL, where it was verified%s",
            f" with {fixed}" if fixed else "",
            why,
            "; leaving those dims dynamic may help" if fixed else "",
        )
        return
    raise VerificationError(
        f"the optimized model does not load in onnxruntime at ORT_ENABLE_ALL ({why}); not "
        "written. Re-run with -v and --passes to find the pass, and report it"
    )


@with_job_gc
def optimize(
    model: ModelLike,
    passes: str | Sequence[str | Pass] | None = None,
    *,
    target: str = "portable",
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    verify_output: bool = True,
    feeds: FeedSource | None = None,
    steps: int = 10,
    on_pass: Callable[[PassRecord], None] | None = None,
    output: str | os.PathLike[str] | None = None,
    report: str | os.PathLike[str] | None = None,
    bench: bool = False,
    keep_original: bool = False,
) -> OptimizeResult:
    """The optimize job (``graphopt optimize``): run the default (or given) pass pipeline to a
    fixed point, verify against the input, and write the result.

    Args:
        model: a Model (not changed) or the path of an ONNX file (never written).
        passes, target, input_shapes, verify_output, feeds, steps, on_pass: as
            :func:`optimize_model`.
        output: write the optimized model here (atomically; only once it is verified).
        report: write a self-contained HTML report here.
        bench: measure onnxruntime latency before and after (interleaved medians, at
            ``ORT_DISABLE_ALL`` and ``ORT_ENABLE_ALL``) into ``latency_ms``.
        keep_original: keep the input model beside the result as ``original`` (kept anyway
            for a Model given, a report or ``bench``); otherwise a file's model is
            transformed in place and ``original`` is None (:func:`optimize_model`).

    Returns:
        An :class:`OptimizeResult`; ``to_json()`` is what ``graphopt optimize --json`` prints.
    """
    t0 = time.perf_counter()
    out_path, report_path = output_paths(model, output, report, inputs=[feeds])
    if passes is not None:
        passes = _pass_list(passes, target)  # an unknown pass fails before the model is read
    res = optimize_model(
        # given feeds: the model is run on them (a failure there is the user's FeedError), not
        # smoke-run on generated inputs it may not accept (sizes, indices, grids)
        as_model(
            model,
            runs=verify_output or bench,
            smoke=feeds is None,
            keep_session=verify_output,
            keep_outputs=verify_output and feeds is None,
        ),
        copy=isinstance(model, Model),  # a model loaded here is this job's own: no copy
        passes=passes,
        target=target,
        input_shapes=input_shapes,
        verify_output=verify_output,
        feeds=feeds,
        steps=steps,
        on_pass=on_pass,
        keep_original=keep_original or report is not None or bench,
    )
    res.input = source_path(model)
    if bench:
        _bench_or_keep_input(res, feeds)
    write_outputs(
        res,
        out_path,
        report_path,
        "graphopt optimize",
        verified=verify_output,
        verify=res.verify,
        tables={"passes": [{"pass": k, **v} for k, v in res.stats().items()]},
    )
    res.seconds = time.perf_counter() - t0
    return res


def _bench_or_keep_input(res: OptimizeResult, feeds: FeedSource | None) -> None:
    """``optimize --bench``: measure the input against the optimized model and, when the
    optimized one is slower beyond noise at some level in two measurements in a row, hand back
    the input's graph instead (``kept_input``) with a warning that says so."""
    original = res.kept_original()
    given = feed_list(feeds, original, limit=1)
    feed = given[0] if given else random_feeds(original, seed=0)
    b = bench_models(original, res.model, feed)
    if b.slower():  # confirm: one noisy measurement must not throw the optimization away
        again = bench_models(original, res.model, feed)
        if set(again.slower()) & set(b.slower()):
            b = again
        else:
            b = BenchResult(
                b.latency_ms, {lv: min(b.ratio[lv], again.ratio[lv]) for lv in b.ratio}, b.noise
            )
    res.latency_ms = b.latency_ms
    res.latency_ratio = {lv: round(r, 4) for lv, r in b.ratio.items()}
    slower = b.slower()
    if slower:
        res.optimized, res.model, res.kept_input = res.model, original, True
        res.export = None  # of the optimized model
        res.__dict__.pop("after", None)  # the cached figures were of the optimized model
        logger.warning(
            "the optimized model is slower than the input (%s); the input's graph is written "
            "instead",
            ", ".join(f"{b.ratio[lv]:.2f}x the input's at {LEVEL_NAMES[lv]}" for lv in slower),
        )
