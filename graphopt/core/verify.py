"""Verification: run two models in onnxruntime on the same inputs and compare every output.

Sessions (:mod:`graphopt.core.session`) use ``ORT_DISABLE_ALL`` by default so that onnxruntime's
own fusions cannot hide (or cause) a difference. Per output we report the max absolute error, the
cosine similarity and the signal-to-quantization-noise ratio
``SQNR = 10 log10(sum(ref^2) / sum((ref - out)^2))`` in dB (``inf`` when equal). An output passes
when ``max_abs_err <= atol + rtol * max|ref|`` (semantics-preserving passes; the float32
tolerance, widened for lower-precision output dtypes) or, for lossy transforms, when its SQNR /
cosine reach the given minima. NaN and inf are never averaged away: a position where they differ
(NaN against a number, +inf against -inf or a finite value) fails the output in both checks.
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
import onnxruntime as ort

from graphopt.core.errors import FeedError, GraphoptError, VerificationError, first_line
from graphopt.core.feeds import dim_draws, random_feeds
from graphopt.core.loader import load
from graphopt.core.model import Model, release_weight_pages
from graphopt.core.session import (
    ZERO_COPY_BYTES,
    SessionOpenError,
    input_names,
    is_ml_dtype,
    run_feeds,
    run_session,
    take_outputs,
)

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
    #: the largest error an exact check allowed (``atol + rtol * max_ref``; None for lossy checks)
    limit: float | None = None
    #: lossy checks over several samples: the median of the per-sample SQNRs (dB)
    sample_sqnr_db: float | None = None

    def reason(self, min_sqnr_db: float | None = None, min_cosine: float | None = None) -> str:
        """Why this output failed its check, in words (empty when it passed)."""
        if self.ok:
            return ""
        if self.note:
            return self.note
        parts = []
        if min_sqnr_db is not None and self.sqnr_db < min_sqnr_db:
            parts.append(f"SQNR {self.sqnr_db:.1f} dB < {min_sqnr_db:g} dB")
        if min_cosine is not None and not self.cosine >= min_cosine:
            parts.append(f"cosine {self.cosine:.3f} < {min_cosine:g}")
        if parts:
            return ", ".join(parts)
        if self.limit is not None:
            return f"max abs error {self.max_abs_err:.3g} > {self.limit:.3g}"
        return f"max abs error {self.max_abs_err:.3g}, cosine {self.cosine:.6f}"

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("max_abs_err", "cosine", "sqnr_db", "max_ref", "limit", "sample_sqnr_db"):
            v = d[k]
            d[k] = (
                None
                if v is None or (isinstance(v, float) and math.isnan(v))
                else ("inf" if v == math.inf else "-inf" if v == -math.inf else float(v))
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

    def failure(self) -> str:
        """``output 'NAME': <why>`` for the first output that failed (empty when all passed)."""
        bad = self.worst()
        if bad is None:
            return ""
        return f"output '{bad.name}': {bad.reason(self.min_sqnr_db, self.min_cosine)}"

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


#: tolerance of low-precision float outputs, in units of the dtype's machine epsilon (relative
#: to max |reference|): an exact rewrite may round differently by an ulp or two
ULPS = 4


#: the exact check's tolerance for float32 outputs, relative to max |reference| (``atol`` for
#: outputs near zero): reassociated float32 sums differ by a few hundred ulps at most
RTOL = 1e-4
ATOL = 1e-5


def tolerance(dtype: Any, rtol: float = RTOL, atol: float = ATOL) -> tuple[float, float]:
    """``(rtol, atol)`` of the exact check for an output of ``dtype`` (the float32 tolerance,
    widened for float16, bfloat16 and float8: :func:`dtype_tolerance`)."""
    return dtype_tolerance(np.dtype(dtype), rtol, atol)


def dtype_tolerance(dtype: np.dtype, rtol: float, atol: float) -> tuple[float, float]:
    """``(rtol, atol)`` for an output of ``dtype``: the given fp32 tolerances, widened to
    :data:`ULPS` ulps for float16, bfloat16 and float8 outputs (whose ulp is far coarser)."""
    dtype = np.dtype(dtype)
    if dtype == np.float16:
        eps = float(np.finfo(np.float16).eps)
    elif is_ml_dtype(dtype) and dtype.name.startswith(("bfloat16", "float8", "float4")):
        import ml_dtypes  # noqa: PLC0415 - onnx's own dependency, only for these types

        eps = float(ml_dtypes.finfo(dtype).eps)
    else:
        return rtol, atol
    return max(rtol, ULPS * eps), max(atol, ULPS * eps * 2.0**-14)


def _is_numeric(value: Any) -> bool:
    return isinstance(value, np.ndarray) and (
        value.dtype.kind in "biufc" or is_ml_dtype(value.dtype)
    )


def _flatten_value(value: Any, path: str = "") -> list[tuple[str, Any]]:
    """A sequence (list), map (dict) or optional (None) output as (path, leaf) pairs; numeric
    tensors stay arrays, everything else (strings, None, keys) is compared exactly."""
    if isinstance(value, (list, tuple)):
        out: list[tuple[str, Any]] = [(f"{path}#len", len(value))]
        for i, v in enumerate(value):
            out += _flatten_value(v, f"{path}[{i}]")
        return out
    if isinstance(value, dict):
        out = [(f"{path}#keys", sorted(map(str, value)))]
        for k in sorted(value, key=str):
            out += _flatten_value(value[k], f"{path}[{k!r}]")
        return out
    if isinstance(value, float):  # a map's float values come out of onnxruntime as Python floats
        return [(path, np.asarray(value))]
    if value is None or not isinstance(value, np.ndarray):
        return [(path, value)]
    if not _is_numeric(value):
        return [(path, value.astype(object).tolist())]
    return [(path, value)]


def compare_values(
    name: str,
    refs: Sequence[Any],
    outs: Sequence[Any],
    rtol: float,
    atol: float,
    min_sqnr_db: float | None = None,
    min_cosine: float | None = None,
) -> OutputDiff:
    """Compare an output that is not one numeric tensor per sample (strings, sequences, maps,
    optionals): structure, strings and None exactly, numeric leaves (tensors and Python floats)
    with :func:`compare`, lossy (``min_sqnr_db``/``min_cosine``) where they are given."""
    worst = OutputDiff(name, 0.0, 1.0, math.inf, 0.0, [], True)
    for r, o in zip(refs, outs):
        fr, fo = _flatten_value(r), _flatten_value(o)
        if [p for p, _ in fr] != [p for p, _ in fo]:
            return OutputDiff(name, math.inf, 0.0, -math.inf, 0.0, [], False, "structure differs")
        for (path, a), (_, b) in zip(fr, fo):
            if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
                d = compare(
                    name, a, b, *dtype_tolerance(a.dtype, rtol, atol), min_sqnr_db, min_cosine
                )
                if not d.ok:
                    d.note = f"{d.note} at {path}".strip()
                    return d
                if d.max_abs_err > worst.max_abs_err:
                    worst = d
            elif not _same(a, b):
                note = f"value differs at {path or 'the output'}"
                return OutputDiff(name, math.inf, 0.0, -math.inf, 0.0, [], False, note)
    return worst


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return False  # a tensor where the other has something else
    return bool(a == b)


def compare(
    name: str,
    ref: np.ndarray,
    out: np.ndarray,
    rtol: float | None = None,
    atol: float | None = None,
    min_sqnr_db: float | None = None,
    min_cosine: float | None = None,
) -> OutputDiff:
    """Compare one output array against its reference.

    Exact check (no ``min_sqnr_db`` / ``min_cosine``): ``max |ref - out| <= atol + rtol *
    max |ref|`` over the finite positions; ``rtol``/``atol`` default to :func:`tolerance` of the
    reference's dtype. Lossy check: SQNR and cosine over the finite positions reach the minima.

    Non-finite values are compared exactly, in both checks: a position passes only when both sides
    hold NaN, or both hold the same signed infinity. Any other position with a NaN or an infinity
    (+inf against -inf, inf against a finite value, NaN against anything else) fails the output:
    ``max_abs_err`` and ``-sqnr_db`` are then inf, the cosine NaN, and the note counts them.
    """
    ref = np.asarray(ref)
    out = np.asarray(out)
    if rtol is None or atol is None:
        d_rtol, d_atol = tolerance(ref.dtype)
        rtol = d_rtol if rtol is None else rtol
        atol = d_atol if atol is None else atol
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
            limit=atol,
        )
    if ref.size == 0:
        return OutputDiff(name, 0.0, 1.0, math.inf, 0.0, list(ref.shape), True)
    r = ref.astype(np.float64)
    o = out.astype(np.float64)
    finite = np.isfinite(r) & np.isfinite(o)
    mismatch = _non_finite_mismatch(r, o, finite)
    err = float(np.max(np.abs(r[finite] - o[finite]))) if finite.any() else 0.0
    max_ref = float(np.max(np.abs(r[finite]))) if finite.any() else 0.0
    s = sqnr_db(np.where(finite, r, 0), np.where(finite, o, 0))
    c = cosine(np.where(finite, r, 0), np.where(finite, o, 0))
    limit = None
    if min_sqnr_db is not None or min_cosine is not None:
        ok = (min_sqnr_db is None or s >= min_sqnr_db) and (min_cosine is None or c >= min_cosine)
    else:
        limit = atol + rtol * max_ref
        ok = err <= limit
    if mismatch:
        return OutputDiff(
            name, math.inf, math.nan, -math.inf, max_ref, list(ref.shape), False, mismatch, limit
        )
    return OutputDiff(name, err, c, s, max_ref, list(ref.shape), ok, "", limit)


def compare_samples(
    name: str,
    refs: Sequence[np.ndarray],
    outs: Sequence[np.ndarray],
    rtol: float = RTOL,
    atol: float = ATOL,
    min_sqnr_db: float | None = None,
    min_cosine: float | None = None,
) -> OutputDiff:
    """:func:`compare` over several samples of one output, pooled (the reference's dtype widens
    ``rtol``/``atol``: :func:`dtype_tolerance`). With a SQNR floor and several samples, the
    median sample's own SQNR must reach it too: pooled figures are dominated by the loudest
    samples, and a calibration outlier can hide that every other sample is lost."""
    o_rtol, o_atol = dtype_tolerance(np.asarray(refs[0]).dtype, rtol, atol)
    try:
        ref = np.concatenate([np.ravel(r) for r in refs])
        out = np.concatenate([np.ravel(o) for o in outs])
        shape_ok = len(refs) == len(outs) and all(
            np.shape(r) == np.shape(o) for r, o in zip(refs, outs)
        )
    except ValueError:
        shape_ok = False
    if not shape_ok:
        return compare(name, refs[0], outs[0], o_rtol, o_atol, min_sqnr_db, min_cosine)
    d = compare(name, ref, out, o_rtol, o_atol, min_sqnr_db, min_cosine)
    d.shape = list(np.shape(refs[0]))
    if min_sqnr_db is not None and len(refs) > 1 and not d.note:
        d.sample_sqnr_db = _median_sample_sqnr(refs, outs)
        if d.ok and d.sample_sqnr_db < min_sqnr_db:
            d.ok = False
            d.note = (
                f"median per-sample SQNR {d.sample_sqnr_db:.1f} dB < {min_sqnr_db:g} dB "
                f"(pooled over the samples {d.sqnr_db:.1f} dB: the loudest samples hide that "
                "the others are lost)"
            )
    return d


def _non_finite_mismatch(r: np.ndarray, o: np.ndarray, finite: np.ndarray) -> str:
    """A note on the positions where NaN or inf differ between ``r`` and ``o`` ('' when none)."""
    if finite.all():
        return ""
    same = (np.isnan(r) & np.isnan(o)) | (np.isinf(r) & (r == o))
    bad = ~finite & ~same
    count = int(bad.sum())
    if not count:
        return ""
    i = int(np.flatnonzero(bad.ravel())[0])
    a, b = r.ravel()[i], o.ravel()[i]
    return (
        f"{count} non-finite position{'s' if count > 1 else ''} differ "
        f"(first: reference {a:g}, output {b:g}); NaN and inf must match exactly"
    )


def _median_sample_sqnr(refs: Sequence[np.ndarray], outs: Sequence[np.ndarray]) -> float:
    """The median over samples of each sample's SQNR (finite positions)."""
    vals = []
    for a, b in zip(refs, outs):
        r = np.asarray(a, np.float64).ravel()
        o = np.asarray(b, np.float64).ravel()
        fin = np.isfinite(r) & np.isfinite(o)
        vals.append(sqnr_db(np.where(fin, r, 0), np.where(fin, o, 0)))
    return float(np.median(vals)) if vals else math.inf


@dataclass
class Reference:
    """The original model's outputs on the inputs verification runs: computed once, before a
    job transforms the model in place (:func:`run_reference`), and compared with the transformed
    model's later (:func:`verify` with ``precomputed``).

    Attributes:
        feeds: the feed dicts run (given or generated).
        names: the original's output names.
        rows: per feed dict, the outputs in ``names`` order.
    """

    feeds: list[dict[str, Any]]
    names: list[str]
    rows: list[list[Any]]


def run_reference(
    original: Model | onnx.ModelProto | str | os.PathLike[str],
    feeds: Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]] | None = None,
    seed: int = 0,
    samples: int = 1,
    reference: ort.InferenceSession | None = None,
) -> Reference:
    """Run the original model on the verification inputs (arguments as :func:`verify`).

    Raises:
        FeedError: the original does not run on the inputs.
        GraphoptError: onnxruntime cannot load the original.
    """
    ref_model = original if not isinstance(original, (str, os.PathLike)) else load(original)
    if feeds is None:
        base = ref_model if isinstance(ref_model, Model) else Model.from_onnx(ref_model)
        # one set of samples per draw of the dynamic dims (batch 1 and 3, sequence 7 and 64)
        feed_list = [
            random_feeds(base, seed=seed + i, draw=k)
            for k in range(len(dim_draws(base)))
            for i in range(samples)
        ]
    elif isinstance(feeds, Mapping):
        feed_list = [dict(feeds)]
    else:
        feed_list = [dict(f) for f in feeds]

    def feed_error(exc: BaseException, f: Mapping[str, Any]) -> FeedError:
        given = "given" if feeds is not None else "generated test"
        shapes = ", ".join(
            f"{k} {'x'.join(map(str, np.shape(v))) or 'scalar'}" for k, v in f.items()
        )
        drawn = (
            f" at drawn input shapes {shapes} (dynamic dims take the values of "
            "graphopt.core.feeds.DIM_DRAWS; --input-shape fixes them)"
            if feeds is None and len(dim_draws(base)) > 1
            else ""
        )
        return FeedError(
            f"the input model does not run on the {given} inputs in onnxruntime{drawn} "
            f"({first_line(exc)}); give inputs it runs on with --feeds DATA"
        )

    # the input model's session is closed before the transformed model's opens (a session holds
    # ~5 KB per node: the two are never open at once; a large model runs one segment's session
    # at a time, run_feeds; a large original's weight pages are released)
    kept = (
        take_outputs(ref_model, feed_list[0])
        if reference is None and isinstance(ref_model, Model) and len(feed_list) == 1
        else None
    )
    if kept is not None:  # validation ran the model on these very inputs
        names = list(kept)
        ref_rows = [[kept[n] for n in names]]
    elif reference is not None:
        names = [o.name for o in reference.get_outputs()]
        a_inputs = input_names(reference)
        ref_rows = []
        for f in feed_list:
            try:
                ref_rows.append(
                    run_session(reference, names, {k: v for k, v in f.items() if k in a_inputs})
                )
            except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
                raise feed_error(exc, f) from None
        reference = None
    else:
        try:
            names, ref_rows = run_feeds(ref_model, feed_list)
        except SessionOpenError as exc:  # an input onnxruntime refuses is the user's to fix
            raise GraphoptError(f"onnxruntime cannot load the input model: {exc}") from None
        except Exception as exc:  # noqa: BLE001
            raise feed_error(exc, feed_list[0]) from None
    if isinstance(ref_model, Model) and ref_model.param_bytes() >= ZERO_COPY_BYTES:
        release_weight_pages(ref_model)
    return Reference(feed_list, names, ref_rows)


def verify(
    original: Model | onnx.ModelProto | str | os.PathLike[str] | None,
    transformed: Model | onnx.ModelProto | str | os.PathLike[str],
    feeds: Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]] | None = None,
    seed: int = 0,
    rtol: float = RTOL,
    atol: float = ATOL,
    min_sqnr_db: float | None = None,
    min_cosine: float | None = None,
    samples: int = 1,
    transformed_level: str = "disable_all",
    reference: ort.InferenceSession | None = None,
    precomputed: Reference | None = None,
) -> VerifyReport:
    """Run both models on the same inputs and compare every output of the original.

    ``transformed_level`` is the onnxruntime optimization level of the transformed model's session
    (the original always runs at ``disable_all``). Quantized QDQ models are checked at
    ``extended``, where onnxruntime runs the integer kernels users get instead of materializing a
    dequantized float copy of every weight.

    Args:
        feeds: one feed dict, a list of them, or None for ``samples`` seeded random inputs built
            from the original's input shapes at each draw of its dynamic dims
            (:func:`graphopt.core.feeds.dim_draws`).
        rtol, atol: tolerance for semantics-preserving transforms, relative to max |reference|
            (for float32 outputs; widened per output dtype, :func:`dtype_tolerance`).
        min_sqnr_db, min_cosine: for lossy transforms; when given they replace rtol/atol. Over
            several samples, the SQNR floor must hold for the samples pooled and for the median
            sample's own SQNR (so that a few loud samples cannot hide that the others are lost).
        reference: an open ``disable_all`` session of ``original`` to run it in (one the
            caller opened already, :func:`graphopt.core.session.take_session`), instead of a
            new one.
        precomputed: the original's outputs, computed before (:func:`run_reference`; its feeds
            are the ones run): ``original``, ``feeds``, ``seed``, ``samples`` and ``reference``
            are then unused (``original`` may be None: a job that transformed its input in
            place).

    NaN and inf must match exactly (:func:`compare`).
    """
    if precomputed is None:
        if original is None:
            raise ValueError("verify needs the original model or its precomputed outputs")
        precomputed = run_reference(original, feeds, seed, samples, reference)
    feed_list, names, ref_rows = precomputed.feeds, precomputed.names, precomputed.rows
    report = VerifyReport(
        rtol=rtol, atol=atol, min_sqnr_db=min_sqnr_db, min_cosine=min_cosine, samples=len(feed_list)
    )
    refs: dict[str, list[np.ndarray]] = {
        n: [row[i] for row in ref_rows] for i, n in enumerate(names)
    }
    del ref_rows
    try:
        b_order, b_rows = run_feeds(transformed, feed_list, transformed_level)
    except SessionOpenError as exc:
        raise GraphoptError(f"onnxruntime cannot load the transformed model: {exc}") from None
    except Exception as exc:  # noqa: BLE001
        raise VerificationError(
            f"the transformed model fails in onnxruntime on inputs the input model runs "
            f"on: {first_line(exc)}"
        ) from None
    b_names = set(b_order)
    outs: dict[str, list[np.ndarray]] = {
        n: [row[i] for row in b_rows] for i, n in enumerate(b_order) if n in refs
    }
    del b_rows
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
        if not all(_is_numeric(v) for v in refs[n] + outs[n]):
            report.outputs.append(
                compare_values(n, refs[n], outs[n], rtol, atol, min_sqnr_db, min_cosine)
            )
            continue
        report.outputs.append(
            compare_samples(n, refs[n], outs[n], rtol, atol, min_sqnr_db, min_cosine)
        )
    return report
