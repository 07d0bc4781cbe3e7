"""Measured schedule search over graphopt's templates, ranked by a cost model.

Method (graphopt owns the search: MetaSchedule works with apache-tvm-ffi 0.1.14 and a builder that
skips its 100 s intrinsic import, but costs 3-7 s per trial and lost to the hand rules on convs
within 64 trials; graphopt's parameterized templates cost 0.2-0.9 s per trial):

1. **Tasks.** The fused kernels of the model (Relax's FuseOps + FuseTIR, graphopt's fusion
   groups) deduplicated by signature (:func:`~graphopt.algorithms.tvm.tuning_db.kernel_signature`),
   each with the number of times the model calls it.
2. **Baselines.** Every kernel without a record is timed once with its hand rule; the kernels whose
   share of the model (hand time x calls) is under ``min_share`` (1 %) keep the hand rule and get
   a ``baseline`` record, so that a later run does not time them again.
3. **Space.** For each remaining kernel, the cross product of the knobs of every template that
   applies to it (:func:`search_space`): register tiles, vectorized axis, rows per tile, weight
   packing, padding placement, parallel or not, vector widths. Splits that do not divide and tiles
   whose accumulators do not fit the vector registers are left out.
4. **Cost model.** Candidates are ranked by :func:`predicted_cost`, a roofline of the register
   tile: per reduction step the tile issues ``A`` vector FMAs and ``L`` loads; it takes
   ``max(A / 2, L / 2, fma_latency)`` cycles (two FMA and two load ports, one dependent FMA per
   accumulator per step), plus the stages a candidate adds (packing, padding) and the thread
   pool's wake-up for parallel loops, divided over the cores with the load imbalance of the
   parallel loop. Only the ``trials`` best are built and timed.
5. **Measurement** (:mod:`graphopt.algorithms.tvm.measure`): each candidate built in a spawned
   process, timed through TVM's RPC tracker (a local tracker for this host), its outputs checked
   against the hand rule's. The best three are timed again, interleaved with the hand rule
   (``confirm`` rounds), and the minimum of each is compared: a candidate replaces the hand rule
   only when it is at least 3 % faster.
6. **Database.** The winner (or the hand rule) is written to the tuning database after every
   kernel, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from graphopt.algorithms.tvm.measure import Candidate, KernelArgs, Measurer, Result, kernel_args
from graphopt.algorithms.tvm.tuning_db import (
    TuningDB,
    TuningRecord,
    describe_kernel,
    kernel_signature,
    param_buffers,
)

logger = logging.getLogger(__name__)

#: a candidate must beat the hand rule by this factor to be kept
MIN_GAIN = 1.03


@dataclass
class KernelTask:
    """One distinct kernel of a model."""

    name: str
    func: Any
    signature: str
    calls: int
    desc: str
    hand_template: str = "none"
    #: applicable templates (analysis), for the space
    templates: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


def call_counts(mod: Any) -> dict[str, int]:
    """How many times the Relax functions of ``mod`` call each PrimFunc (by name)."""
    from tvm import relax  # noqa: PLC0415

    counts: dict[str, int] = {}
    call_tir = {"relax.call_tir", "relax.call_tir_inplace", "relax.call_tir_with_grad"}

    def visit(e: Any) -> None:
        if isinstance(e, relax.Call) and getattr(e.op, "name", "") in call_tir:
            gv = e.args[0]
            counts[gv.name_hint] = counts.get(gv.name_hint, 0) + 1

    for _gv, f in mod.functions_items():
        if isinstance(f, relax.Function):
            relax.analysis.post_order_visit(f.body, visit)
    return counts


def extract_tasks(mod: Any, lanes: int, cores: int) -> list[KernelTask]:
    """The distinct PrimFuncs of a fused module, with call counts, in first-seen order."""
    import tvm  # noqa: PLC0415

    counts = call_counts(mod)
    tasks: dict[str, KernelTask] = {}
    for gv, func in mod.functions_items():
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        if func.attrs is not None and "tirx.is_scheduled" in func.attrs:
            continue
        sig = kernel_signature(func)
        n = counts.get(gv.name_hint, 1)
        if sig in tasks:
            tasks[sig].calls += n
            continue
        task = KernelTask(gv.name_hint, func, sig, n, describe_kernel(func, gv.name_hint))
        analyze(task, lanes, cores)
        tasks[sig] = task
    return list(tasks.values())


# ---------------------------------------------------------------------- analysis


def analyze(task: KernelTask, lanes: int, cores: int) -> None:
    """Fill ``hand_template``, ``templates`` and ``info`` (extents) of a task."""
    from tvm import s_tir  # noqa: PLC0415

    from graphopt.algorithms.tvm import schedules as S  # noqa: PLC0415

    task.hand_template = S.hand_template(task.func, lanes, cores)
    sch = s_tir.Schedule(task.func)
    templates = []
    conv = S._conv_block(sch)  # noqa: SLF001 - same package
    if conv is not None:
        templates.append("conv")
        task.info["conv_ext"] = conv[1]
        task.info["depthwise"] = S.channel_follows_output(sch, conv[0])
    mm = S._matmul_block(sch)  # noqa: SLF001
    if mm is not None:
        templates.append("matmul")
        task.info["matmul_ext"] = mm[1]
    dot = S._dot_block(sch)  # noqa: SLF001
    if dot is not None:
        templates.append("dot")
        task.info["dot_ext"], task.info["dot_nsp"] = dot[1], dot[2]
    if task.hand_template in ("dlight-reduction", "reduction"):
        templates += ["dlight-reduction", "reduction"]
    if task.hand_template == "injective":
        templates.append("injective")
    if task.hand_template not in templates and task.hand_template != "none":
        templates.insert(0, task.hand_template)
    task.templates = templates
    elems = 1
    for shape, _dt in param_buffers(task.func):
        elems = max(elems, math.prod(shape))
    task.info["elems"] = elems


# ---------------------------------------------------------------------- spaces


def _pow2_upto(n: int, cap: int) -> list[int]:
    out, v = [], 1
    while v <= min(n, cap):
        if n % v == 0:
            out.append(v)
        v *= 2
    return out


def _divisors(n: int, cands: Sequence[int]) -> list[int]:
    return [c for c in cands if c >= 1 and n % c == 0]


def conv_space(ext: list[int], lanes: int) -> list[dict[str, Any]]:
    _n, f_e, y_e, x_e = ext[:4]
    budget = 16 if lanes <= 8 and lanes != 4 else 32
    out: list[dict[str, Any]] = []
    # vectorized along the width
    for xi, fi, yi, pack, pad, par in itertools.product(
        _divisors(x_e, (4, 8, 16, 32)),
        _divisors(f_e, (1, 2, 3, 4, 6, 8, 12, 16, 24)),
        _divisors(y_e, (1, 2, 3, 4)),
        (0, 1, 2),
        ("stage", "inline", "at"),
        (None, 0, 1),
    ):
        acc = fi * yi * max(1, -(-xi // lanes))
        if acc > budget - 2:
            continue
        if pack and fi == 1:
            continue
        out.append({"vec": "x", "xi": xi, "fi": fi, "yi": yi, "pack": pack, "pad": pad, "par": par})
    # vectorized along the output channels (narrow maps)
    for fi, xi, pad, par in itertools.product(
        _divisors(f_e, (4, 8, 16, 24, 32)),
        _divisors(x_e, (1, 2, 3, 4, 5, 6, 7, 8, 10, 14)),
        ("stage", "inline"),
        (None, 0, 1),
    ):
        acc = xi * max(1, -(-fi // lanes))
        if acc > budget - 2:
            continue
        out.append({"vec": "f", "xi": xi, "fi": fi, "yi": 1, "pack": 0, "pad": pad, "par": par})
    return out


def matmul_space(ext: list[int], lanes: int) -> list[dict[str, Any]]:
    i_e, j_e = ext[-3], ext[-2]
    budget = 16 if lanes <= 8 and lanes != 4 else 32
    out: list[dict[str, Any]] = []
    for ii, jv, pack, order, par in itertools.product(
        _divisors(i_e, (1, 2, 3, 4, 6, 8, 12)),
        (1, 2, 3, 4),
        (0, 1),
        ("ij", "ji"),
        (None, 0, 1),
    ):
        ji = jv * lanes
        if j_e % ji or ii * jv > budget - 2:
            continue
        out.append({"vec": "j", "ii": ii, "ji": ji, "pack_b": pack, "order": order, "par": par})
    for ii, ji, par in itertools.product(
        _divisors(i_e, (lanes, 2 * lanes)), _divisors(j_e, (1, 2, 3, 4, 5, 6, 7, 8)), (None, 0, 1)
    ):
        if ji * (ii // lanes) > budget - 2:
            continue
        out.append({"vec": "i", "ii": ii, "ji": ji, "pack_b": 0, "order": "ij", "par": par})
    return out


def dot_space(ext: list[int], nsp: int, lanes: int) -> list[dict[str, Any]]:
    k_e = ext[-1]
    out: list[dict[str, Any]] = []
    last = ext[nsp - 1]
    prev = ext[nsp - 2] if nsp >= 2 else 1
    for kv, ti, tj, par in itertools.product(
        _divisors(k_e, (4, 8, 16, 32)),
        _divisors(last, (1, 2, 4, 8)),
        _divisors(prev, (1, 2, 4)),
        (None, 0, 1),
    ):
        if ti * tj * max(1, kv // lanes) > 14:
            continue
        out.append({"kv": kv, "ti": ti, "tj": tj, "par": par})
    return out


def injective_space(lanes: int) -> list[dict[str, Any]]:
    return [
        {"vec": v, "par": p}
        for v, p in itertools.product((0, 4, lanes, 2 * lanes, 4 * lanes), (None, 0, 1))
    ]


def search_space(task: KernelTask, lanes: int) -> list[Candidate]:
    """Every candidate of every template that applies to ``task`` (hand rules included)."""
    cands: list[Candidate] = []
    for t in task.templates:
        cands.append(Candidate(t, None))
        if t == "conv":
            cands += [Candidate(t, p) for p in conv_space(task.info["conv_ext"], lanes)]
        elif t == "matmul":
            cands += [Candidate(t, p) for p in matmul_space(task.info["matmul_ext"], lanes)]
        elif t == "dot":
            ext, nsp = task.info["dot_ext"], task.info["dot_nsp"]
            cands += [Candidate(t, p) for p in dot_space(ext, nsp, lanes)]
        elif t == "reduction":
            cands += [Candidate(t, {"par": p}) for p in (0, 1)]
        elif t == "injective":
            cands += [Candidate(t, p) for p in injective_space(lanes)]
    return cands


# ---------------------------------------------------------------------- cost model

_FMA_LATENCY = 4.0
_WAKE_CYCLES = 20_000.0  # waking the thread pool, in cycles


def _par_time(serial: float, outer: int, cores: int, par: bool) -> float:
    if not par or cores <= 1 or outer <= 1:
        return serial
    per = math.ceil(outer / cores) / (outer / cores)  # imbalance of the last round
    return serial / min(cores, outer) * per + _WAKE_CYCLES


def _tile_cycles(acc: int, loads: float, budget: int) -> float:
    cyc = max(acc / 2.0, loads / 2.0, _FMA_LATENCY)
    if acc > budget:
        cyc *= 3.0  # spills
    return cyc


def predicted_cost(task: KernelTask, cand: Candidate, lanes: int, cores: int) -> float:
    """Predicted cycles of a candidate (lower is better); only the order matters."""
    from graphopt.algorithms.tvm import schedules as S  # noqa: PLC0415

    budget = 16 if lanes <= 8 and lanes != 4 else 32
    t = cand.template
    loads: float
    if t == "conv":
        ext = task.info["conv_ext"]
        p = {
            **S.conv_hand_params(ext, lanes, task.info.get("depthwise", False)),
            **(cand.params or {}),
        }
        n_e, f_e, y_e, x_e = ext[:4]
        red = math.prod(ext[4:]) if len(ext) > 4 else 1
        xi, fi, yi = int(p["xi"]), int(p["fi"]), int(p["yi"])
        if p["vec"] == "f":
            vecs = max(1, -(-fi // lanes))
            acc, loads = xi * vecs, vecs + xi
            useful = xi * fi
        else:
            vecs = max(1, -(-xi // lanes))
            acc, loads = fi * yi * vecs, yi * vecs + fi
            useful = fi * yi * xi
        steps = n_e * (f_e // fi) * (y_e // max(1, yi)) * (x_e // xi) * red
        lane_eff = useful / (acc * lanes) if acc else 1.0
        cyc = steps * _tile_cycles(acc, loads, budget) / max(lane_eff, 0.125) * lane_eff
        out_elems = n_e * f_e * y_e * x_e
        if p.get("pad") == "inline":
            cyc *= 1.15  # bounds checks in the inner loop
        elif p.get("pad") == "at":
            cyc += out_elems / lanes * 0.5
        else:
            cyc += out_elems / lanes  # a padding stage writes and re-reads the input
        if p.get("pack") == 1:
            cyc += n_e * f_e * y_e * red / lanes
        elif p.get("pack") == 2:
            cyc += f_e * red / lanes
        work = out_elems * red
        par = p.get("par")
        par_on = work >= S.PARALLEL_MIN_WORK if par is None else bool(par)
        outer = n_e * (f_e // fi) * (y_e // max(1, yi))
        return _par_time(cyc, outer, cores, par_on)
    if t == "matmul":
        ext = task.info["matmul_ext"]
        p = {**S.matmul_hand_params(ext, lanes), **(cand.params or {})}
        i_e, j_e, k_e = ext[-3], ext[-2], ext[-1]
        batch = math.prod(ext[:-3]) if len(ext) > 3 else 1
        ii, ji = int(p["ii"]), int(p["ji"])
        if p["vec"] == "i":
            vecs = max(1, -(-ii // lanes))
            acc, loads = ji * vecs, vecs + ji
        else:
            vecs = max(1, -(-ji // lanes))
            acc, loads = ii * vecs, vecs + ii
            if not p.get("pack_b") and j_e > 64:
                loads += vecs * 0.5  # strided panel rows: more cache and TLB misses
        steps = batch * (i_e // ii) * (j_e // ji) * k_e
        cyc = steps * _tile_cycles(acc, loads, budget)
        if p.get("pack_b"):
            cyc += batch * k_e * j_e / lanes
        work = batch * i_e * j_e * k_e
        par = p.get("par")
        par_on = work >= S.PARALLEL_MIN_WORK if par is None else bool(par)
        outer = batch * (j_e // ji if p.get("order") == "ji" else i_e // ii)
        return _par_time(cyc, outer, cores, par_on)
    if t == "dot":
        ext, nsp = task.info["dot_ext"], task.info["dot_nsp"]
        p = {**S.dot_hand_params(ext, nsp, lanes), **(cand.params or {})}
        kv, ti, tj = int(p["kv"]), int(p["ti"]), int(p["tj"])
        vecs = max(1, kv // lanes)
        acc, loads = ti * tj * vecs, (ti + tj) * vecs
        steps = math.prod(ext) / (ti * tj * kv)
        cyc = steps * _tile_cycles(acc, loads, budget) + math.prod(ext[:nsp]) * kv / 4
        work = math.prod(ext)
        par = p.get("par")
        par_on = work >= S.PARALLEL_MIN_WORK if par is None else bool(par)
        outer = math.prod(ext[:nsp]) // (ti * tj)
        return _par_time(cyc, outer, cores, par_on)
    # reductions and element-wise kernels: memory bound; the knobs only change the constant
    elems = float(task.info.get("elems", 1))
    p = cand.params or {}
    vec = int(p.get("vec", 0) or lanes)
    cyc = elems / max(1, min(vec, 4 * lanes)) * (1.0 + (0.3 if vec < lanes else 0.0))
    par = p.get("par")
    par_on = elems >= 1 << 15 if par is None else bool(par)
    return _par_time(cyc, max(1, int(elems // max(vec, 1))), cores, par_on)


def effective_params(
    task: KernelTask, cand: Candidate, lanes: int, cores: int
) -> dict[str, Any] | None:
    """The parameters a candidate really schedules with: its knobs over the template's hand
    choice, the parallel switch resolved (threshold, one core, one outer iteration) and knobs
    that a mode ignores reset; None for templates without knobs. Two candidates with the same
    effective parameters build the same kernel."""
    from graphopt.algorithms.tvm import schedules as S  # noqa: PLC0415

    t = cand.template
    p = dict(cand.params or {})

    def par(work: float, threshold: float, outer: int) -> int:
        v = p.get("par")
        on = work >= threshold if v is None else bool(v)
        return int(on and cores > 1 and outer > 1)

    if t == "conv":
        ext = task.info["conv_ext"]
        q = {**S.conv_hand_params(ext, lanes, task.info.get("depthwise", False)), **p}
        n_e, f_e, y_e, x_e = ext[:4]
        if q["vec"] == "f":
            q["yi"], q["pack"] = 1, 0
        if int(q["fi"]) == 1 or int(q["xi"]) == 1:
            q["pack"] = 0
        outer = n_e * (f_e // max(1, int(q["fi"]))) * (y_e // max(1, int(q["yi"])))
        q["par"] = par(math.prod(ext), S.PARALLEL_MIN_WORK, outer)
        return q
    if t == "matmul":
        ext = task.info["matmul_ext"]
        q = {**S.matmul_hand_params(ext, lanes), **p}
        if q["vec"] == "i":
            q["pack_b"], q["order"] = 0, "ij"
        q["par"] = par(math.prod(ext), S.PARALLEL_MIN_WORK, 2)
        return q
    if t == "dot":
        ext, nsp = task.info["dot_ext"], task.info["dot_nsp"]
        q = {**S.dot_hand_params(ext, nsp, lanes), **p}
        q["par"] = par(math.prod(ext), S.PARALLEL_MIN_WORK, 2)
        return q
    if t in ("injective", "reduction"):
        q = {"vec": 0, **p} if t == "injective" else dict(p)
        q["par"] = par(task.info.get("elems", 1), S.PARALLEL_MIN_ELEMS, 2)
        return q
    return None


def rank(task: KernelTask, cands: Sequence[Candidate], lanes: int, cores: int) -> list[Candidate]:
    """``cands`` in predicted order, with explicit (effective) parameters, duplicates and the
    hand rules' own choices removed, the hand rules first (they are the baseline)."""
    hands = [c for c in cands if c.params is None]
    seen = set()
    for h in hands:
        eff = effective_params(task, h, lanes, cores)
        seen.add((h.template, json.dumps(eff, sort_keys=True)))
    keyed: list[tuple[float, int, Candidate]] = []
    for c in cands:
        if c.params is None:
            continue
        eff = effective_params(task, c, lanes, cores)
        sig = (c.template, json.dumps(eff, sort_keys=True))
        if sig in seen:
            continue
        seen.add(sig)
        c = Candidate(c.template, eff)
        try:
            keyed.append((predicted_cost(task, c, lanes, cores), len(keyed), c))
        except Exception as exc:  # noqa: BLE001 - a knob the model cannot read: rank last
            logger.debug("cost model: %s: %s", c.label(), exc)
            keyed.append((math.inf, len(keyed), c))
    keyed.sort(key=lambda t: (t[0], t[1]))
    hand_first = sorted(hands, key=lambda c: c.template != task.hand_template)
    return hand_first + [c for _k, _i, c in keyed]


# ---------------------------------------------------------------------- the search


@dataclass
class KernelOutcome:
    """What the search did for one kernel."""

    name: str
    signature: str
    desc: str
    calls: int
    hand_template: str
    status: str  # cached | baseline | skipped | tuned | failed
    template: str
    params: dict[str, Any] | None
    hand_ms: float | None
    best_ms: float | None
    measured: int = 0
    space: int = 0
    seconds: float = 0.0

    @property
    def speedup(self) -> float | None:
        if self.hand_ms and self.best_ms:
            return self.hand_ms / self.best_ms
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "signature": self.signature,
            "desc": self.desc,
            "calls": self.calls,
            "status": self.status,
            "hand_template": self.hand_template,
            "template": self.template,
            "params": self.params,
            "hand_ms": self.hand_ms,
            "best_ms": self.best_ms,
            "speedup": self.speedup,
            "measured": self.measured,
            "space": self.space,
            "seconds": round(self.seconds, 2),
        }


Progress = Callable[[str, int, int], None]


@dataclass
class SearchSettings:
    trials: int = 16
    min_share: float = 0.01
    confirm: int = 2
    retune: bool = False


def _noop(_msg: str, _done: int, _total: int) -> None:
    return None


def tune_tasks(
    tasks: Sequence[KernelTask],
    db: TuningDB,
    target: str,
    cpu: str,
    measurer: Callable[[], Measurer],
    lanes: int,
    cores: int,
    settings: SearchSettings | None = None,
    progress: Progress | None = None,
) -> list[KernelOutcome]:
    """Fill ``db`` for ``tasks``: baselines for the kernels it lacks, a search for those that
    take at least ``min_share`` of the model. ``measurer`` is a factory, called only if a kernel
    needs measuring (so a run whose kernels are all recorded starts no tracker)."""
    st = settings or SearchSettings()
    prog = progress or _noop
    outcomes: dict[str, KernelOutcome] = {}
    meas_box: list[Measurer] = []

    def get_measurer() -> Measurer:
        if not meas_box:
            meas_box.append(measurer())
        return meas_box[0]

    args_cache: dict[str, KernelArgs] = {}
    refs: dict[str, Any] = {}
    # 1. baselines
    need = [t for t in tasks if db.get(t.signature, target, cpu) is None]
    total_steps = len(need) + len(tasks)
    done = 0
    for t in tasks:
        rec = db.get(t.signature, target, cpu)
        if rec is not None:
            outcomes[t.signature] = KernelOutcome(
                t.name,
                t.signature,
                t.desc,
                t.calls,
                t.hand_template,
                "cached",
                rec.template,
                rec.params,
                rec.hand_ms,
                rec.ms,
            )
    for t in need:
        prog(f"baseline {t.name}", done, total_steps)
        t0 = time.perf_counter()
        args = args_cache.setdefault(t.signature, kernel_args(t.func))
        m = get_measurer()
        before = m.measurements
        res, ref = m.measure(t.func.script(), args, [Candidate(t.hand_template, None)])
        refs[t.signature] = ref
        m.forget()
        r = res[0]
        hand_ms = r.ms if r.ok else None
        if not r.ok:
            logger.warning(
                "%s: the hand rule could not be measured (%s: %s)", t.name, r.status, r.error
            )
        db.put(
            TuningRecord(
                t.signature,
                target,
                cpu,
                t.hand_template,
                None,
                hand_ms,
                hand_ms,
                0,
                "baseline",
                t.desc,
                baseline_ms=hand_ms,
            )
        )
        outcomes[t.signature] = KernelOutcome(
            t.name,
            t.signature,
            t.desc,
            t.calls,
            t.hand_template,
            "baseline",
            t.hand_template,
            None,
            hand_ms,
            hand_ms,
            m.measurements - before,
            1,
            time.perf_counter() - t0,
        )
        done += 1
    if need:
        db.save()

    # 2. shares
    def weight(t: KernelTask) -> float:
        rec = db.get(t.signature, target, cpu)
        if rec is None:
            return 0.0
        ms = rec.baseline_ms if rec.baseline_ms is not None else rec.hand_ms
        return (ms or 0.0) * t.calls

    total = sum(weight(t) for t in tasks) or 1.0
    # 3. search, biggest first
    for t in sorted(tasks, key=weight, reverse=True):
        rec = db.get(t.signature, target, cpu)
        done += 1
        if rec is None or (rec.kind == "tuned" and not st.retune):
            prog(f"{t.name} (recorded)", done, total_steps)
            continue
        share = weight(t) / total
        out = outcomes[t.signature]
        if share < st.min_share or rec.hand_ms is None or st.trials <= 1:
            if out.status == "baseline":
                out.status = "skipped" if rec.hand_ms is not None else "failed"
            prog(f"{t.name} ({share:.1%}: kept)", done, total_steps)
            continue
        prog(f"search {t.name} ({share:.1%})", done, total_steps)
        t0 = time.perf_counter()
        m = get_measurer()
        before = m.measurements
        args = args_cache.setdefault(t.signature, kernel_args(t.func))
        space = search_space(t, lanes)
        ranked = rank(t, space, lanes, cores)
        hand = Candidate(t.hand_template, None)
        picks = [c for c in ranked if not (c.template == hand.template and c.params is None)]
        picks = picks[: max(0, st.trials - 1)]
        script = t.func.script()
        res, ref = m.measure(script, args, [hand, *picks], refs.get(t.signature))
        hand_times = [r.ms for r in res[:1] if r.ok and r.ms is not None]
        ok = sorted((r for r in res[1:] if r.ok and r.ms is not None), key=lambda r: r.ms or 0.0)
        best: Result | None = None
        best_ms = math.inf
        hand_ms = min(hand_times) if hand_times else (rec.hand_ms or math.inf)
        if ok:
            top = ok[:3]
            times: dict[int, list[float]] = {i: [r.ms or math.inf] for i, r in enumerate(top)}
            for _ in range(st.confirm):
                again, _ = m.measure(script, args, [hand, *[r.candidate for r in top]], ref)
                if again and again[0].ok and again[0].ms is not None:
                    hand_times.append(again[0].ms)
                for i, r in enumerate(again[1:]):
                    if r.ok and r.ms is not None:
                        times[i].append(r.ms)
            hand_ms = min(hand_times) if hand_times else hand_ms
            bi = min(times, key=lambda i: min(times[i]))
            best, best_ms = top[bi], min(times[bi])
        keep = best is not None and best_ms * MIN_GAIN < hand_ms
        chosen = best.candidate if keep and best is not None else hand
        ms = best_ms if keep else hand_ms
        hand_rec = None if hand_ms == math.inf else hand_ms
        db.put(
            TuningRecord(
                t.signature,
                target,
                cpu,
                chosen.template,
                chosen.params,
                None if ms == math.inf else ms,
                hand_rec,
                len(res),
                "tuned",
                t.desc,
                baseline_ms=rec.baseline_ms if rec.baseline_ms is not None else rec.hand_ms,
                extra={"space": len(space), "failed": sum(1 for r in res if not r.ok)},
            )
        )
        m.forget()
        db.save()
        out.status = "tuned"
        out.template, out.params = chosen.template, chosen.params
        out.hand_ms, out.best_ms = hand_rec, None if ms == math.inf else ms
        out.measured += m.measurements - before
        out.space = len(space)
        out.seconds += time.perf_counter() - t0
        logger.info(
            "%s: %s %.3f ms (hand %.3f ms), %d measured of %d",
            t.name,
            chosen.label(),
            ms,
            hand_ms,
            len(res),
            len(space),
        )
    prog("done", total_steps, total_steps)
    return [outcomes[t.signature] for t in tasks]
