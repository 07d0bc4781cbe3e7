"""Verification: run two models in onnxruntime on the same inputs and compare every output.

Sessions (:mod:`graphopt.core.session`) use ``ORT_DISABLE_ALL`` by default so that onnxruntime's
own fusions cannot hide (or cause) a difference. Per output we report the max absolute error, the
cosine similarity and the signal-to-quantization-noise ratio
``SQNR = 10 log10(sum(ref^2) / sum((ref - out)^2))`` in dB (``inf`` when equal). An output passes
when ``max_abs_err <= atol + rtol * max|ref|`` (semantics-preserving passes) or, for lossy
transforms, when its SQNR / cosine reach the given minima.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx

from graphopt.core.errors import GraphoptError, first_line
from graphopt.core.feeds import random_feeds
from graphopt.core.loader import load
from graphopt.core.model import Model, release_weight_pages
from graphopt.core.session import ZERO_COPY_BYTES, input_names, make_session

logger = logging.getLogger(__name__)


@dataclass
class OutputDiff:
    """Comparison of one output."""

    name: str
    max_abs_err: float
    cosine: float
    sqnr_db: float
    max_ref: float
    shape: list[int]
    ok: bool
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("max_abs_err", "cosine", "sqnr_db", "max_ref"):
            v = d[k]
            d[k] = (
                None
                if v is None or (isinstance(v, float) and math.isnan(v))
                else ("inf" if v == math.inf else float(v))
            )
        return d


@dataclass
class VerifyReport:
    """Per-output comparison of a transformed model against its original."""

    outputs: list[OutputDiff] = field(default_factory=list)
    rtol: float = 0.0
    atol: float = 0.0
    min_sqnr_db: float | None = None
    min_cosine: float | None = None
    samples: int = 1

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outputs)

    def worst(self) -> OutputDiff | None:
        bad = [o for o in self.outputs if not o.ok]
        return bad[0] if bad else None

    def to_json(self) -> dict[str, Any]:
        return {o.name: o.to_json() for o in self.outputs}


def sqnr_db(ref: np.ndarray, out: np.ndarray) -> float:
    ref64 = ref.astype(np.float64, copy=False).ravel()
    noise = ref64 - out.astype(np.float64, copy=False).ravel()
    n = float(np.dot(noise, noise))
    s = float(np.dot(ref64, ref64))
    if n == 0.0:
        return math.inf
    if s == 0.0:
        return -math.inf
    return 10.0 * math.log10(s / n)


def cosine(ref: np.ndarray, out: np.ndarray) -> float:
    a = ref.astype(np.float64, copy=False).ravel()
    b = out.astype(np.float64, copy=False).ravel()
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 and nb == 0.0:
        return 1.0
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(np.dot(a, b) / (na * nb))


def compare(
    name: str,
    ref: np.ndarray,
    out: np.ndarray,
    rtol: float,
    atol: float,
    min_sqnr_db: float | None = None,
    min_cosine: float | None = None,
) -> OutputDiff:
    """Compare one output array against its reference."""
    ref = np.asarray(ref)
    out = np.asarray(out)
    if ref.shape != out.shape:
        return OutputDiff(
            name,
            math.inf,
            0.0,
            -math.inf,
            0.0,
            list(out.shape),
            False,
            f"shape {list(out.shape)} != reference {list(ref.shape)}",
        )
    if ref.dtype.kind in "biu" and out.dtype.kind in "biu":
        diff = np.abs(ref.astype(np.int64) - out.astype(np.int64))
        err = float(diff.max()) if diff.size else 0.0
        return OutputDiff(
            name,
            err,
            1.0 if err == 0 else 0.0,
            math.inf if err == 0 else 0.0,
            float(np.abs(ref).max()) if ref.size else 0.0,
            list(ref.shape),
            err <= atol,
        )
    if ref.size == 0:
        return OutputDiff(name, 0.0, 1.0, math.inf, 0.0, list(ref.shape), True)
    r = ref.astype(np.float64)
    o = out.astype(np.float64)
    nan_mismatch = bool(np.any(np.isnan(r) != np.isnan(o)))
    finite = np.isfinite(r) & np.isfinite(o)
    err = float(np.max(np.abs(r[finite] - o[finite]))) if finite.any() else 0.0
    max_ref = float(np.max(np.abs(r[finite]))) if finite.any() else 0.0
    s = sqnr_db(np.where(finite, r, 0), np.where(finite, o, 0))
    c = cosine(np.where(finite, r, 0), np.where(finite, o, 0))
    if min_sqnr_db is not None or min_cosine is not None:
        ok = (min_sqnr_db is None or s >= min_sqnr_db) and (min_cosine is None or c >= min_cosine)
    else:
        ok = err <= atol + rtol * max_ref
    note = ""
    if nan_mismatch:
        ok, note = False, "NaN where the reference has none (or the reverse)"
    return OutputDiff(name, err, c, s, max_ref, list(ref.shape), ok, note)


def verify(
    original: Model | onnx.ModelProto | str | os.PathLike[str],
    transformed: Model | onnx.ModelProto | str | os.PathLike[str],
    feeds: Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]] | None = None,
    seed: int = 0,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    min_sqnr_db: float | None = None,
    min_cosine: float | None = None,
    samples: int = 1,
    transformed_level: str = "disable_all",
) -> VerifyReport:
    """Run both models on the same inputs and compare every output of the original.

    ``transformed_level`` is the onnxruntime optimization level of the transformed model's session
    (the original always runs at ``disable_all``). Quantized QDQ models are checked at
    ``extended``, where onnxruntime runs the integer kernels users get instead of materializing a
    dequantized float copy of every weight.

    Args:
        feeds: one feed dict, a list of them, or None for ``samples`` seeded random inputs built
            from the original's input shapes (dynamic dims must be fixed first).
        rtol, atol: tolerance for semantics-preserving transforms, relative to max |reference|.
        min_sqnr_db, min_cosine: for lossy transforms; when given they replace rtol/atol.
    """
    ref_model = original if not isinstance(original, (str, os.PathLike)) else load(original)
    if feeds is None:
        base = ref_model if isinstance(ref_model, Model) else Model.from_onnx(ref_model)
        feed_list = [random_feeds(base, seed=seed + i) for i in range(samples)]
    elif isinstance(feeds, Mapping):
        feed_list = [dict(feeds)]
    else:
        feed_list = [dict(f) for f in feeds]
    try:
        sa = make_session(ref_model)
    except Exception as exc:  # noqa: BLE001 - an input onnxruntime refuses is the user's to fix
        raise GraphoptError(f"onnxruntime cannot load the input model: {first_line(exc)}") from None
    try:
        sb = make_session(transformed, transformed_level)
    except Exception as exc:  # noqa: BLE001
        raise GraphoptError(
            f"onnxruntime cannot load the transformed model: {first_line(exc)}"
        ) from None
    names = [o.name for o in sa.get_outputs()]
    b_names = {o.name for o in sb.get_outputs()}
    report = VerifyReport(
        rtol=rtol, atol=atol, min_sqnr_db=min_sqnr_db, min_cosine=min_cosine, samples=len(feed_list)
    )
    refs: dict[str, list[np.ndarray]] = {n: [] for n in names}
    outs: dict[str, list[np.ndarray]] = {n: [] for n in names}
    a_inputs = input_names(sa)
    b_inputs = input_names(sb)
    # all references first: a large original's weight pages are released before the transformed
    # model runs, so the two are never resident at once
    for f in feed_list:
        ra = sa.run(names, {k: v for k, v in f.items() if k in a_inputs})
        for n, v in zip(names, ra):
            refs[n].append(np.asarray(v))
    if isinstance(ref_model, Model) and ref_model.param_bytes() >= ZERO_COPY_BYTES:
        release_weight_pages(ref_model)
    common = [n for n in names if n in b_names]
    for f in feed_list:
        rb = dict(zip(common, sb.run(common, {k: v for k, v in f.items() if k in b_inputs})))
        for n in common:
            outs[n].append(np.asarray(rb[n]))
    for n in names:
        if n not in b_names:
            report.outputs.append(
                OutputDiff(
                    n,
                    math.inf,
                    0.0,
                    -math.inf,
                    0.0,
                    [],
                    False,
                    "output missing from the transformed model",
                )
            )
            continue
        try:
            ref = np.concatenate([r.ravel() for r in refs[n]])
            out = np.concatenate([o.ravel() for o in outs[n]])
            shape_ok = all(r.shape == o.shape for r, o in zip(refs[n], outs[n]))
        except ValueError:
            shape_ok = False
        if not shape_ok:
            report.outputs.append(
                compare(n, refs[n][0], outs[n][0], rtol, atol, min_sqnr_db, min_cosine)
            )
            continue
        d = compare(n, ref, out, rtol, atol, min_sqnr_db, min_cosine)
        d.shape = list(refs[n][0].shape)
        report.outputs.append(d)
    return report
