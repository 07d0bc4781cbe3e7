"""Running recipes: every step calls the job it names (optimize, fp16, prune, quantize, plan,
compile) on the previous step's model, and its result is verified against that input before the
next step runs; the run ends with one row per step (nodes, params, MACs, size, arena, fidelity,
latency) and, when asked, the final model and an HTML report written.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from graphopt.algorithms.memory.arena import prove
from graphopt.algorithms.memory.planner import MemoryPlan
from graphopt.algorithms.tvm.qemu import qemu_unavailable_reason, run_under_qemu
from graphopt.algorithms.tvm.runner import load_artifact
from graphopt.core.cost import model_cost
from graphopt.core.errors import RecipeError, VerificationError
from graphopt.core.feeds import FeedSource, feed_list, open_calibration, random_feeds
from graphopt.core.latency import interleaved, interleaved_latency
from graphopt.core.model import Model
from graphopt.core.saver import save
from graphopt.core.session import make_session
from graphopt.core.shapes import prepare
from graphopt.core.verify import compare, sqnr_db
from graphopt.jobs.common import (
    ModelLike,
    TransformResult,
    as_model,
    jsonable,
    lossy_floors,
    output_paths,
    path_or_none,
    source_path,
)
from graphopt.jobs.compile import compile_model
from graphopt.jobs.fp16 import MIN_SQNR_DB as FP16_MIN_SQNR_DB
from graphopt.jobs.fp16 import fp16_model
from graphopt.jobs.optimize import LEVEL_NAMES, RTOL, BenchResult, bench_models, optimize_model
from graphopt.jobs.plan import plan_memory, plan_model
from graphopt.jobs.prune import DEFAULT_MIN_SQNR_DB as PRUNE_MIN_SQNR_DB
from graphopt.jobs.prune import prune
from graphopt.jobs.quantize import DEFAULT_MIN_SQNR_DB as QUANTIZE_MIN_SQNR_DB
from graphopt.jobs.quantize import QuantizeResult, quantize
from graphopt.jobs.recipe.parser import load_recipe
from graphopt.jobs.recipe.schema import LOSSY, STEP_MODULES, Recipe, Step
from graphopt.jobs.report import write_report
from graphopt.passes.prune_channels import PruneReport

logger = logging.getLogger(__name__)


def check_capability(kind: str) -> None:
    """Fail before any work when a step's capability is missing. Raises :class:`RecipeError`."""
    mod = STEP_MODULES.get(kind)
    if mod is None:
        return
    try:
        module = importlib.import_module(mod)
    except ImportError as exc:
        raise RecipeError(f"step '{kind}' needs {mod}, not available ({exc})") from None
    if kind == "compile" and not module.tvm_available():
        raise RecipeError(
            "step 'compile' needs apache-tvm, not available (install the tvm extra "
            "or run scripts/install-tvm-deps.sh)"
        )


# ------------------------------------------------------------------ running


@dataclass
class StepRecord:
    """What one step did, its check against its input, and the model's numbers after it."""

    kind: str
    label: str
    ok: bool
    check: str  #: how the step was verified, e.g. "exact", "SQNR >= 30 dB", "arena run"
    seconds: float
    nodes: int
    params: int
    macs: int
    model_bytes: int
    arena_bytes: int | None = None
    fidelity: dict[str, float] = field(default_factory=dict)  #: SQNR dB vs the original
    step_sqnr: dict[str, float] = field(default_factory=dict)  #: SQNR dB vs the step's input
    latency_ms: float | None = None
    note: str = ""
    stats: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        return {
            "step": self.label,
            "ok": self.ok,
            "check": self.check,
            "nodes": self.nodes,
            "params": self.params,
            "macs": self.macs,
            "model_bytes": self.model_bytes,
            "arena_bytes": self.arena_bytes,
            "fidelity_sqnr_db": self.fidelity,
            "step_sqnr_db": self.step_sqnr,
            "latency_ms": self.latency_ms,
            "seconds": round(self.seconds, 3),
            "note": self.note,
        }


@dataclass(kw_only=True)
class RecipeResult(TransformResult):
    """What :func:`run_recipe` did: the before/after block, and one record per step.

    Attributes:
        recipe: the recipe run.
        steps: per step: its check, the model's figures after it, fidelity, latency.
        artifact: the library of a ``compile`` step.
        plan: the memory plan of a ``plan-memory`` step.
        quant: the result of a ``quantize`` step.
        prune_report: the report of a ``prune`` step.
        feeds: the inputs every step was checked on.
    """

    recipe: Recipe
    steps: list[StepRecord] = field(default_factory=list)
    artifact: Path | None = None
    plan: MemoryPlan | None = None
    quant: QuantizeResult | None = None
    prune_report: PruneReport | None = None
    feeds: list[dict[str, np.ndarray]] = field(default_factory=list)
    #: with ``bench``: the final model's onnxruntime latency over the original's per level
    #: (median of the per-round ratios, interleaved, 1 thread), and the levels where it is slower
    #: beyond noise in two measurements in a row
    latency_ratio: dict[str, float] = field(default_factory=dict)
    slower_than_input: list[str] = field(default_factory=list)
    #: every step was exact and the result was slower: the original's graph was handed back
    kept_input: bool = False

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.steps)

    def table(self) -> list[dict[str, Any]]:
        return [s.row() for s in self.steps]

    def pass_stats(self) -> dict[str, dict[str, Any]]:
        return {s.label: s.stats for s in self.steps}

    def verify_json(self) -> dict[str, Any]:
        """Per output: SQNR (dB) of the last step's model against the original."""
        last = self.steps[-1] if self.steps else None
        return {k: {"sqnr_db": v} for k, v in (last.fidelity if last else {}).items()}

    def to_json(self) -> dict[str, Any]:
        """The ``graphopt optimize --recipe ... --json`` object."""
        return jsonable(
            {
                **self.change_json(),  # type: ignore[no-any-return]
                "recipe": self.recipe.name,
                "steps": self.table(),
                "ok": self.ok,
                "artifact": path_or_none(self.artifact),
                "latency_ratio": self.latency_ratio or None,
                "slower_than_input": self.slower_than_input,
                "kept_input": self.kept_input,
            }
        )


def _compare_with_input(
    result: RecipeResult, original: Model, final: Model, feed: Mapping[str, np.ndarray], rec: Recipe
) -> None:
    """``--bench``: the final model against the original, as ``optimize --bench`` does; slower
    beyond noise at some level in two measurements in a row is said in a warning, and when every
    step was exact the original's graph is handed back (a lossy recipe keeps its result: its
    steps may be wanted for size)."""
    b = bench_models(original, final, feed)
    if b.slower():  # confirm: one noisy measurement must not decide
        again = bench_models(original, final, feed)
        if not set(again.slower()) & set(b.slower()):
            b = BenchResult(
                b.latency_ms, {lv: min(b.ratio[lv], again.ratio[lv]) for lv in b.ratio}, b.noise
            )
    result.latency_ratio = {lv: round(r, 4) for lv, r in b.ratio.items()}
    result.slower_than_input = b.slower()
    if not result.slower_than_input:
        return
    text = ", ".join(
        f"{b.ratio[lv]:.2f}x the input's at {LEVEL_NAMES[lv]}" for lv in result.slower_than_input
    )
    if not any(s.kind in LOSSY for s in rec.steps):
        result.model, result.kept_input = original, True
        logger.warning(
            "the recipe's model is slower than the input (%s); the input's graph is written", text
        )
    else:
        logger.warning("the recipe's model is slower than the input (%s)", text)


def sqnr_text(d: Mapping[str, float]) -> str:
    """SQNR per output as text: ``"41.2 dB"`` for one output, ``"a: 41.2, b: inf dB"``."""
    vals = ["inf" if v == math.inf else f"{v:.1f}" for v in d.values()]
    if len(d) == 1:
        return f"{vals[0]} dB"
    return ", ".join(f"{k}: {v}" for k, v in zip(d, vals)) + " dB"


def _model_bytes(model: Model) -> int:
    return int(model.to_onnx().ByteSize())


def _sqnrs(ref: Mapping[str, np.ndarray], out: Mapping[str, np.ndarray]) -> dict[str, float]:
    res = {}
    for k, v in ref.items():
        if k in out and np.asarray(v).dtype.kind == "f" and np.shape(v) == np.shape(out[k]):
            res[k] = sqnr_db(np.asarray(v, np.float64), np.asarray(out[k], np.float64))
    return res


def _run_all(model: Model, feeds: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Outputs of ``model`` on every feed, concatenated along a new leading axis per output."""
    sess = make_session(model)
    names = [o.name for o in sess.get_outputs()]
    ins = {i.name for i in sess.get_inputs()}
    outs: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for f in feeds:
        for n, v in zip(names, sess.run(names, {k: v for k, v in f.items() if k in ins})):
            outs[n].append(np.asarray(v))
    return {n: np.stack(v) if len({x.shape for x in v}) == 1 else v[0] for n, v in outs.items()}


def _latency_ms(model: Model, feeds: Mapping[str, np.ndarray], runs: int = 20) -> float:
    res = interleaved_latency({"m": model}, feeds, levels=("all",), runs=runs, warmup=1)
    return res["m"]["all"]


def _calib_feeds(calib: Any, model: Model, limit: int = 8) -> list[dict[str, np.ndarray]]:
    """Up to ``limit`` single-sample feed dicts from calibration data ([] when there is none)."""
    if calib is None:
        return []

    return [dict(f) for f in open_calibration(calib, model, batch_size=1, limit=limit)]


def _arena_bytes(model: Model, feeds: Sequence[Mapping[str, np.ndarray]]) -> int | None:
    """Arena of a quick memory plan (no reordering); None when planning fails."""
    try:
        return int(plan_model(model, reorder=False, feeds=feeds[0] if feeds else None).arena_bytes)
    except Exception as exc:  # noqa: BLE001 - a number for the table, never a failure
        logger.debug("memory plan for the table failed: %s", exc)
        return None


def run_recipe(
    model: ModelLike,
    recipe: str | os.PathLike[str] | Mapping[str, Any] | Recipe,
    *,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    calib: Any = None,
    output: str | os.PathLike[str] | None = None,
    bench: bool = False,
    report: str | os.PathLike[str] | None = None,
    feeds: FeedSource | None = None,
    on_step: Callable[[StepRecord], None] | None = None,
) -> RecipeResult:
    """Run a recipe on a model, verifying every step against its input.

    Args:
        model: a Model (not changed) or the path of an ONNX file (never written).
        recipe: built-in name, TOML path, mapping or :class:`Recipe`.
        input_shapes: fixed input shapes (override the recipe's).
        calib: calibration data (overrides the recipe's ``calib``): ``.npz``, folder, iterable.
        output: write the final ONNX model here once every step passed (the compile step puts
            its library next to it unless it names one).
        report: write a self-contained HTML report (steps table, graphs) here.
        bench: measure onnxruntime latency (median of 20 runs, 1 thread) after every step.
        feeds: verification inputs (``--feeds``: a path in the ``--calib`` formats, a feed dict
            or an iterable of them; default: up to 8 calibration samples, else 2 random inputs).
        on_step: called with each step's record as soon as it is verified.

    Returns:
        A :class:`RecipeResult`; ``to_json()`` is what ``graphopt optimize --recipe --json``
        prints.

    Raises:
        RecipeError: invalid recipe, or a step whose capability is missing or that needs
            calibration data that was not given.
        VerificationError: a step's output failed its check (the message names the step).
    """
    t_start = time.perf_counter()
    out_path, report_path = output_paths(model, output, report, inputs=[calib])
    rec = load_recipe(recipe)
    for s in rec.steps:  # fail before any work when a capability is missing
        check_capability(s.kind)
    shapes: dict[str, Sequence[int]] = dict(rec.input_shapes)
    shapes.update(input_shapes or {})
    calib = calib if calib is not None else rec.calib
    original = prepare(as_model(model).clone(), shapes)
    given = feed_list(feeds, original)
    if given is None:
        given = _calib_feeds(calib, original) or [random_feeds(original, seed=s) for s in (0, 1)]
    checked = [dict(f) for f in given]
    ref = _run_all(original, checked)
    result = RecipeResult(
        recipe=rec, original=original, model=original, feeds=checked, input=source_path(model)
    )
    current = original
    prev_out = ref
    run = _Run(shapes, calib, checked, result, out_path)
    for step in rec.steps:
        t0 = time.perf_counter()
        runner = _STEP_RUNNERS[step.kind]
        new, check, stats, extra = runner(step, current, run)
        seconds = time.perf_counter() - t0
        out = _run_all(new, checked) if extra.get("outputs") is None else extra["outputs"]
        n = extra.get("samples")  # a compiled library may run on the first few feeds only
        ref_n = {k: v[:n] for k, v in ref.items()} if n else ref
        prev_n = {k: v[:n] for k, v in prev_out.items()} if n else prev_out
        step_sqnr = _sqnrs(prev_n, out)
        ok, how = check(prev_n, out)
        cost = model_cost(new)
        record = StepRecord(
            step.kind,
            step.label,
            ok,
            how,
            seconds,
            new.num_nodes(),
            int(cost.params),
            int(cost.macs),
            _model_bytes(new) if extra.get("bytes") is None else extra["bytes"],
            extra["arena"] if "arena" in extra else _arena_bytes(new, checked),
            _sqnrs(ref_n, out),
            step_sqnr,
            _latency_ms(new, checked[0])
            if bench and step.kind != "compile"
            else extra.get("latency"),
            extra.get("note", ""),
            stats,
        )
        result.steps.append(record)
        if on_step:
            on_step(record)
        if not ok:
            raise VerificationError(
                f"recipe step {step.index} ({step.label}) failed its check "
                f"({how}): {record.note or step_sqnr}"
            )
        if step.kind != "compile":
            current, prev_out = new, out
    result.model = current
    if bench and current is not original:
        _compare_with_input(result, original, current, checked[0], rec)
        current = result.model
    if out_path is not None:
        result.output = save(current, out_path)
    if report_path is not None:
        name = Path(result.input).name if result.input else "model"
        rows = [
            {
                **r,
                "fidelity_sqnr_db": sqnr_text(r["fidelity_sqnr_db"]),
                "step_sqnr_db": sqnr_text(r["step_sqnr_db"]),
            }
            for r in result.table()
        ]
        result.report_path = write_report(
            report_path,
            original,
            current,
            quant=result.quant,
            memory=result.plan,
            title=f"graphopt recipe {rec.name} on {name}",
            tables={"steps": rows},
        )
    result.seconds = time.perf_counter() - t_start
    return result


# ------------------------------------------------------------------ checks


Check = Callable[[Mapping[str, np.ndarray], Mapping[str, np.ndarray]], tuple[bool, str]]


def _exact() -> Check:
    """Every output of the step's input, at the exact check's tolerance (dtype-aware; NaN and
    inf must match exactly: :func:`graphopt.core.verify.compare`)."""

    def check(ref: Mapping[str, np.ndarray], out: Mapping[str, np.ndarray]) -> tuple[bool, str]:
        for k, v in ref.items():
            if k not in out or np.shape(out[k]) != np.shape(v):
                return False, "exact (output missing or reshaped)"
            d = compare(k, np.asarray(v), np.asarray(out[k]))
            if not d.ok:
                return False, f"exact: output '{k}': {d.reason()}"
        return True, f"exact (rtol {RTOL:g})"

    return check


#: SQNR floor (dB, every output vs the step's input) for lossy steps whose min_sqnr is not set:
#: the defaults of the commands (``graphopt quantize``, ``prune``, ``fp16``)
DEFAULT_FLOOR_DB: dict[str, float] = {
    "quantize": QUANTIZE_MIN_SQNR_DB,
    "prune": PRUNE_MIN_SQNR_DB,
    "fp16": FP16_MIN_SQNR_DB,
}


def _min_sqnr(db: float, what: str = "SQNR") -> Check:
    """Every output reaches the SQNR floor ``db`` and the cosine it implies, NaN and inf match
    exactly (:func:`graphopt.jobs.common.lossy_floors`; ``db <= 0``: no floor)."""
    floor, cos = lossy_floors(db, None, db)

    def check(ref: Mapping[str, np.ndarray], out: Mapping[str, np.ndarray]) -> tuple[bool, str]:
        missing = [k for k in ref if k not in out]
        if missing:
            return False, f"outputs missing: {missing}"
        for k, v in ref.items():
            a, b = np.asarray(v), np.asarray(out[k])
            if a.dtype.kind not in "fc" or a.shape != b.shape:
                continue
            d = compare(k, a, b, min_sqnr_db=floor, min_cosine=cos)
            if not d.ok:
                return False, f"{what} >= {db:g} dB: output '{k}': {d.reason(floor, cos)}"
        return True, f"{what} >= {db:g} dB"

    return check


# ------------------------------------------------------------------ step runners

StepOutput = tuple[Model, Check, dict[str, Any], dict[str, Any]]


@dataclass
class _Run:
    """What every step of one recipe run sees besides its model."""

    shapes: Mapping[str, Sequence[int]]
    calib: Any
    feeds: Sequence[Mapping[str, np.ndarray]]
    result: RecipeResult
    output: Path | None


def _scalar_stats(stats: Mapping[str, Any] | None) -> dict[str, Any]:
    """The counters of a job's stats that go into the step table (numbers, strings, flags)."""
    return {k: v for k, v in (stats or {}).items() if isinstance(v, (int, float, str, bool))}


def _floor_db(step: Step) -> float:
    """A lossy step's SQNR floor: its ``min_sqnr``, else :data:`DEFAULT_FLOOR_DB` of its kind."""
    given = step.options["min_sqnr"]
    return float(given) if given is not None else DEFAULT_FLOOR_DB[step.kind]


def _simplify(step: Step, model: Model, run: _Run) -> StepOutput:
    passes = step.options["passes"]
    r = optimize_model(
        model, passes=passes or None, target=step.options["target"], verify_output=False
    )
    return r.model, _exact(), r.stats(), {}


def _fp16(step: Step, model: Model, run: _Run) -> StepOutput:
    o = step.options
    r = fp16_model(
        model,
        keep_fp32=o["keep_fp32"],
        keep_io_types=o["keep_io_types"],
        keep_softmax=o["keep_softmax"],
        kernels=o["kernels"],
        verify_output=False,
    )
    stats: dict[str, Any] = {**r.stats, "kept_fp32": len(r.kept_fp32)}
    return r.model, _min_sqnr(o["min_sqnr"]), stats, {}


def _need_calib(kind: str, run: _Run) -> None:
    if run.calib is None:
        raise RecipeError(
            f"step '{kind}' needs calibration data: set calib = \"data.npz\" in the "
            "recipe, or pass --calib DATA (calib= in the Python API)"
        )


def _prune(step: Step, model: Model, run: _Run) -> StepOutput:
    o = step.options
    if o["recover"] not in (False, "none") or o["criterion"] in ("activation", "output"):
        _need_calib("prune", run)
    out = prune(
        model,
        o["ratio"],
        calib=run.calib,
        criterion=o["criterion"],
        round_to=o["round_to"],
        recover=o["recover"],
        input_shapes=run.shapes or None,
        measure=False,
        steps=o["steps"],
        time_budget=o["time_budget"],
    )

    pruned = prepare(out.model, run.shapes)
    run.result.prune_report = out.report
    return (
        pruned,
        _min_sqnr(_floor_db(step)),
        _scalar_stats(out.stats),
        {"note": f"MACs x{out.macs_ratio:.2f}"},
    )


def _quantize(step: Step, model: Model, run: _Run) -> StepOutput:
    _need_calib("quantize", run)
    o = step.options
    first = model.graph.inputs[0].shape if model.graph.inputs else None
    batch = first[0] if first and isinstance(first[0], int) and first[0] > 0 else 8
    q = quantize(
        model,
        run.calib,
        method=o["method"],
        activations=o["activations"],
        per_channel=o["per_channel"],
        min_sqnr=o["min_sqnr"],
        input_shapes=run.shapes or None,
        limit=o["limit"],
        verify_output=False,
        batch_size=batch,
    )
    run.result.quant = q

    qm = prepare(q.model, run.shapes)
    stats = {**_scalar_stats(q.stats), "kept_float": len(q.kept_float)}
    return (
        qm,
        _min_sqnr(_floor_db(step)),
        stats,
        {"note": f"{q.activation_dtype} activations, {q.method}"},
    )


def _plan(step: Step, model: Model, run: _Run) -> StepOutput:
    o = step.options
    first = run.feeds[0] if run.feeds else None
    planned = plan_memory(
        model, strategy=o["strategy"], inplace=o["inplace"], reorder=o["reorder"], feeds=first
    )
    plan = planned.plan
    run.result.plan = plan
    exact = _exact()
    note = f"{plan.arena_bytes:,} B arena, naive {plan.naive_bytes:,} B"
    proof_ok = True
    if o["prove"]:
        assert plan.model is not None
        proof = prove(plan.model, plan, feeds=first)
        proof_ok = bool(proof.ok)
        note += "; ran inside the arena: " + ("outputs equal" if proof_ok else "FAILED")

    def check(ref: Mapping[str, np.ndarray], outs: Mapping[str, np.ndarray]) -> tuple[bool, str]:
        ok, how = exact(ref, outs)
        return ok and proof_ok, how + (" + arena execution" if o["prove"] else "")

    return (
        planned.planned_model(),
        check,
        {"arena_bytes": plan.arena_bytes, "order_changed": plan.order_changed},
        {"arena": int(plan.arena_bytes), "note": note},
    )


def _compile(step: Step, model: Model, run: _Run) -> StepOutput:
    o = step.options
    target = o["target"]
    if o["output"]:
        lib = Path(o["output"])
    elif run.output:
        lib = Path(run.output).with_suffix(f".{target.split(':')[0]}.so")
    else:
        lib = Path(tempfile.mkdtemp(prefix="graphopt-recipe-")) / f"model.{target}.so"
    # the model carries its fixed input shapes (compile reads them: static_input_shapes)
    cr = compile_model(model, target, lib)
    run.result.artifact = Path(cr.artifact)
    extra: dict[str, Any] = {"bytes": int(cr.artifact_bytes)}
    stats = {"compile_seconds": round(cr.compile_seconds, 2), "artifact": str(cr.artifact)}
    if not o["run"]:
        extra["outputs"] = _run_all(model, run.feeds)
        extra["note"] = f"{cr.artifact} (not run: run = false)"
        return model, lambda r, x: (False, "not run"), stats, extra
    runs: list[dict[str, np.ndarray]] = []
    how = ""
    if target == "llvm":
        art = load_artifact(cr.artifact)
        runs = [art.run(f) for f in run.feeds]
        args = art.to_device(run.feeds[0])
        timings = interleaved({"lib": lambda: art.run_device(args)}, runs=20, warmup=1)
        extra["latency"] = timings.median_ms("lib")
        how = "ran on this host"
    elif target == "aarch64":
        why = qemu_unavailable_reason()
        if why is not None:
            extra["outputs"] = _run_all(model, run.feeds)
            extra["note"] = f"{cr.artifact}; not run: {why}"
            return model, lambda r, x: (False, "not run (no qemu)"), stats, extra
        for f in run.feeds[:2]:
            runs.append(run_under_qemu(cr.artifact, f))
        how = "ran under qemu-aarch64"
    else:
        extra["outputs"] = _run_all(model, run.feeds)
        extra["note"] = f"{cr.artifact}; not run: needs a {target} device"
        return model, lambda r, x: (False, f"not run ({target})"), stats, extra
    n = len(runs)
    out = {k: np.stack([np.asarray(r[k]) for r in runs]) for k in runs[0]}
    ref_model_out = _run_all(model, run.feeds[:n])
    extra["outputs"] = out
    extra["samples"] = n
    extra["note"] = f"{cr.artifact} ({cr.artifact_bytes:,} B), {how}"
    db = o["min_sqnr"]

    def check(ref: Mapping[str, np.ndarray], outs: Mapping[str, np.ndarray]) -> tuple[bool, str]:
        ok, _ = _min_sqnr(db)({k: ref_model_out[k] for k in ref_model_out}, outs)
        return ok, f"{how}, SQNR >= {db:g} dB vs onnxruntime"

    return model, check, stats, extra


_STEP_RUNNERS: dict[str, Callable[[Step, Model, _Run], StepOutput]] = {
    "simplify": _simplify,
    "fp16": _fp16,
    "prune": _prune,
    "quantize": _quantize,
    "plan-memory": _plan,
    "compile": _compile,
}
