"""The optimize job: load -> fix shapes -> infer shapes -> pass pipeline to a fixed point -> verify.

``DEFAULT_PIPELINE`` is the pass list run by ``graphopt optimize`` when ``--passes`` is not given;
``TARGET_PIPELINES`` adds target-specific passes (``ort`` emits onnxruntime's fused ops).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from graphopt.core.errors import GraphoptError, VerificationError
from graphopt.core.model import Model
from graphopt.core.pass_manager import ManagerResult, Pass, PassManager, PassRecord
from graphopt.core.shapes import infer_shapes, missing_shapes, prepare
from graphopt.core.verify import VerifyReport, verify
from graphopt.jobs.common import ModelLike, as_model
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
    "recognize-activations",
    "eliminate-cse",
    "eliminate-dead",
    "toposort",
]

#: target lowering, run to its own fixed point after the default pipeline has converged (a pass
#: named here is constructed with ``target=...`` when it takes that option)
TARGET_PIPELINES: dict[str, list[str]] = {
    "portable": ["fuse-conv-activation"],
    "ort": ["fuse-conv-activation", "eliminate-dead", "toposort"],
}

#: passes of TARGET_PIPELINES that take a ``target`` option
TARGETED_PASSES = {"fuse-conv-activation"}

#: fp32 tolerance for semantics-preserving pipelines (relative to max |reference|)
RTOL = 1e-4
ATOL = 1e-5
#: pipelines containing a lossy pass (quantize, prune, fp16) pass when every output reaches this
LOSSY_MIN_SQNR_DB = 20.0


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


@dataclass
class OptimizeResult:
    """What ``optimize`` did."""

    model: Model
    original: Model
    manager: ManagerResult
    verify: VerifyReport | None
    seconds: float
    passes: list[str] = field(default_factory=list)

    def stats(self) -> dict[str, dict[str, Any]]:
        return self.manager.stats_by_pass()


def optimize_model(
    model: Model,
    passes: Sequence[str | Pass] | None = None,
    target: str = "portable",
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    verify_output: bool = True,
    feeds: Mapping[str, np.ndarray] | None = None,
    steps: int = 10,
    on_pass: Callable[[PassRecord], None] | None = None,
) -> OptimizeResult:
    """Optimize a model (a transformed copy is returned; ``model`` is not changed).

    Raises:
        VerificationError: when the optimized model's outputs differ beyond fp32 tolerance.
    """
    t0 = time.perf_counter()
    original = prepare(model.clone(), input_shapes, feeds)
    work = original.clone()
    pass_list: list[str | Pass]
    lowering: list[Pass] = []
    if passes is not None:
        pass_list = [get_pass(p, target=target) if p in TARGETED_PASSES else p for p in passes]
    else:  # the default pipeline to a fixed point, then the target's lowering to its own
        known = known_pass_names()
        pass_list = [p for p in DEFAULT_PIPELINE if p in known]
        lowering = target_passes(target)
    manager = PassManager(resolve_passes(pass_list), steps=steps, on_pass=on_pass)
    result = manager(work)
    if lowering:
        low = PassManager(lowering, steps=steps, on_pass=on_pass)(result.model)
        result = ManagerResult(
            low.model,
            result.modified or low.modified,
            result.records + low.records,
            result.steps + low.steps,
        )
        pass_list = pass_list + list(lowering)
    out = result.model
    if missing_shapes(out):  # passes keep the shapes they touch; re-derive only what is missing
        infer_shapes(out, feeds=feeds)
    elapsed = time.perf_counter() - t0
    report = None
    if verify_output:
        # lossy passes (pruning, quantization, fp16) change numbers by design: judge them by SQNR
        lossy = any(type(rec_pass).lossy for rec_pass in manager.passes)
        if lossy:
            report = verify(original, out, feeds=feeds, min_sqnr_db=LOSSY_MIN_SQNR_DB)
        else:
            report = verify(original, out, feeds=feeds, rtol=RTOL, atol=ATOL)
        if not report.ok:
            bad = report.worst()
            assert bad is not None
            what = (
                f"SQNR {bad.sqnr_db:.1f} dB < {LOSSY_MIN_SQNR_DB} dB"
                if lossy
                else f"max abs err {bad.max_abs_err:.3g}, cosine {bad.cosine:.6f}"
            )
            raise VerificationError(
                f"optimized model differs from the input on output '{bad.name}' ({what})"
                f"{' ' + bad.note if bad.note else ''}; not written. "
                + (
                    "A lossy pass went too far: use 'graphopt prune/quantize/fp16' with their "
                    "accuracy options"
                    if lossy
                    else "Re-run with -v and --passes to find the pass, and report it"
                )
            )
    names = [p if isinstance(p, str) else p.name for p in pass_list]
    return OptimizeResult(out, original, result, report, elapsed, names)


def optimize(model: ModelLike, **kwargs: Any) -> OptimizeResult:
    """Run the default (or given) pass pipeline and verify (a path or a Model; not modified); the
    options are :func:`optimize_model`'s.

    Returns an ``OptimizeResult`` with ``.model``, ``.verify`` and per-pass ``.stats()``.
    """
    return optimize_model(as_model(model), **kwargs)
