"""Latency measurement in onnxruntime: interleaved, medians, thread spinning off.

Every candidate (model x optimization level) gets its own session; the runs are interleaved round
robin (A, B, C, A, B, C, ...) so that a noisy machine slows all candidates alike, and each reports
the median of its runs. Sessions use a fixed thread count with spinning off
(:func:`graphopt.core.session.session_options`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence

import numpy as np

from graphopt.core.model import Model
from graphopt.core.session import make_session


def interleaved_latency(
    models: Mapping[str, Model],
    feeds: Mapping[str, np.ndarray],
    levels: Sequence[str] = ("disable_all", "all"),
    runs: int = 30,
    warmup: int = 3,
    threads: int | None = 1,
) -> dict[str, dict[str, float]]:
    """Median latency in ms of every model at every onnxruntime level: ``{model: {level: ms}}``."""
    cands = []
    for name, model in models.items():
        for level in levels:
            sess = make_session(model, level, threads)
            ins = {i.name for i in sess.get_inputs()}
            cands.append((name, level, sess, {k: v for k, v in feeds.items() if k in ins}))
    for _ in range(warmup):
        for _, _, sess, f in cands:
            sess.run(None, f)
    times: dict[tuple[str, str], list[float]] = {(n, lv): [] for n, lv, _, _ in cands}
    for r in range(runs):
        order = cands if r % 2 == 0 else list(reversed(cands))  # A B B A: no fixed position
        for name, level, sess, f in order:
            t0 = time.perf_counter()
            sess.run(None, f)
            times[(name, level)].append((time.perf_counter() - t0) * 1e3)
    out: dict[str, dict[str, float]] = {}
    for (name, level), ts in times.items():
        out.setdefault(name, {})[level] = statistics.median(ts)
    return out
