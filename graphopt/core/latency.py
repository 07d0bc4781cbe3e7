"""Latency measurement: interleaved runs of callables, medians, ratios.

:func:`interleaved` is the one timing loop of graphopt (jobs, recipes and every bench script use
it). Every candidate is a callable that runs once; after ``warmup`` untimed calls each, the
candidates run in turns, one call each per round, so that a noisy machine slows all of them alike.
The order changes every round: odd rounds run the even round's order backwards (A B, B A), and
every second round the order is rotated by one, so that no candidate always runs first or right
after the same neighbour (A B C, C B A, B C A, A C B, ...). Each candidate reports the median of
its runs; a ratio of two candidates is the ratio of their medians or, paired, the median of the
per-round ratios (both runs of a round see the same machine load).

:func:`interleaved_latency` applies it to onnxruntime sessions of models at optimization levels
(fixed thread count, spinning off: :func:`graphopt.core.session.session_options`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from graphopt.core.model import Model
from graphopt.core.session import input_names, make_session


@dataclass
class Timings:
    """Seconds of every timed run, per candidate, in run order.

    Attributes:
        times: candidate name -> seconds of each timed run.
        rounds: candidate name -> the round index of each of its runs (for paired ratios).
    """

    times: dict[str, list[float]]
    rounds: dict[str, list[int]] = field(default_factory=dict)

    def count(self, name: str) -> int:
        """Timed runs of a candidate."""
        return len(self.times[name])

    def median_ms(self, name: str) -> float:
        """Median latency of a candidate in milliseconds."""
        return statistics.median(self.times[name]) * 1e3

    def medians_ms(self) -> dict[str, float]:
        """Median latency of every candidate in milliseconds."""
        return {k: self.median_ms(k) for k in self.times}

    def ratio(self, a: str, b: str, paired: bool = False) -> float:
        """Latency of ``a`` over latency of ``b``.

        Args:
            paired: the median of the per-round ratios (rounds where both ran) instead of the
                ratio of the medians.
        """
        if not paired:
            return self.median_ms(a) / self.median_ms(b)
        ta = dict(zip(self.rounds.get(a, range(self.count(a))), self.times[a]))
        tb = dict(zip(self.rounds.get(b, range(self.count(b))), self.times[b]))
        both = sorted(set(ta) & set(tb))
        if not both:
            raise ValueError(f"'{a}' and '{b}' never ran in the same round")
        return statistics.median(ta[r] / tb[r] for r in both)


def round_order(names: Sequence[str], r: int) -> list[str]:
    """The order of round ``r``: rotated by one every second round, reversed on odd rounds."""
    n = len(names)
    if n == 0:
        return []
    k = (r // 2) % n
    order = list(names[k:]) + list(names[:k])
    return order[::-1] if r % 2 else order


def interleaved(
    runners: Mapping[str, Callable[[], object]],
    runs: int = 30,
    warmup: int = 3,
    *,
    budget_s: float | None = None,
    max_runs: int | None = None,
    max_seconds: Mapping[str, float] | None = None,
    min_runs: int = 3,
    clock: Callable[[], float] = time.perf_counter,
) -> Timings:
    """Time ``runners`` interleaved (see the module docstring).

    Args:
        runners: name -> a callable that runs the candidate once.
        runs: rounds to time (each candidate runs once per round).
        warmup: untimed calls of every candidate before timing.
        budget_s: keep timing rounds beyond ``runs`` while the whole measurement has taken less
            than this many seconds (up to ``max_runs`` rounds).
        max_runs: the most rounds with ``budget_s`` (default ``50 * runs``).
        max_seconds: name -> a time budget for one candidate: once its timed runs add up to more,
            it sits out the remaining rounds (keeping at least ``min_runs`` runs). For a slow
            candidate that would otherwise dominate the measurement time.
        min_runs: see ``max_seconds``.
        clock: what a run is measured with: wall time by default; ``time.thread_time`` measures
            the CPU time of the calling thread, which a loaded machine does not inflate (for
            candidates that run on the calling thread alone, e.g. one-thread runtimes).

    Returns:
        The :class:`Timings` of every candidate.
    """
    names = list(runners)
    limits = dict(max_seconds or {})
    times: dict[str, list[float]] = {k: [] for k in names}
    rounds: dict[str, list[int]] = {k: [] for k in names}
    for _ in range(warmup):
        for k in names:
            runners[k]()
    cap = max_runs if max_runs is not None else 50 * max(runs, 1)
    t_end = time.perf_counter() + budget_s if budget_s else None
    r = 0
    while r < runs or (t_end is not None and r < cap and time.perf_counter() < t_end):
        for k in round_order(names, r):
            ts = times[k]
            if k in limits and len(ts) >= min_runs and sum(ts) > limits[k]:
                continue
            t0 = clock()
            runners[k]()
            ts.append(clock() - t0)
            rounds[k].append(r)
        r += 1
    return Timings(times, rounds)


def interleaved_latency(
    models: Mapping[str, Model],
    feeds: Mapping[str, np.ndarray],
    levels: Sequence[str] = ("disable_all", "all"),
    runs: int = 30,
    warmup: int = 3,
    threads: int | None = 1,
) -> dict[str, dict[str, float]]:
    """Median latency in ms of every model at every onnxruntime level: ``{model: {level: ms}}``."""
    runners: dict[str, Callable[[], object]] = {}
    keys: dict[str, tuple[str, str]] = {}
    for name, model in models.items():
        for level in levels:
            sess = make_session(model, level, threads)
            accepted = input_names(sess)
            f = {k: v for k, v in feeds.items() if k in accepted}
            key = f"{name}@{level}"
            runners[key] = _session_runner(sess, f)
            keys[key] = (name, level)
    t = interleaved(runners, runs=runs, warmup=warmup)
    out: dict[str, dict[str, float]] = {}
    for key, (name, level) in keys.items():
        out.setdefault(name, {})[level] = t.median_ms(key)
    return out


def _session_runner(sess: object, feeds: Mapping[str, np.ndarray]) -> Callable[[], object]:
    run = sess.run  # type: ignore[attr-defined]
    f = dict(feeds)
    return lambda: run(None, f)
