"""Verification: run two models in onnxruntime on the same inputs and compare every output.

Sessions use ``ORT_DISABLE_ALL`` by default so that onnxruntime's own fusions cannot hide (or
cause) a
difference, thread spinning off, and the CPU provider. Per output we report the max absolute error,
the
cosine similarity and the signal-to-quantization-noise ratio ``SQNR = 10 log10(sum(ref^2) /
sum((ref -
out)^2))`` in dB (``inf`` when equal). An output passes when ``max_abs_err <= atol + rtol *
max|ref|``
(semantics-preserving passes) or, for lossy transforms, when its SQNR / cosine reach the given
minima.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from graphopt.core.errors import GraphoptError, ShapeError
from graphopt.core.model import PROTO_LIMIT, Model, release_weight_pages

logger = logging.getLogger(__name__)

Feeds = dict[str, np.ndarray]

#: random test inputs larger than this are refused (a declared dim over 2^31 must not exhaust
# memory)
MAX_FEED_BYTES = 2**31


def session_options(level: str = "disable_all", threads: int | None = None) -> ort.SessionOptions:
    """onnxruntime options: optimization level by name, spinning off, optional thread count."""
    levels = {
        "disable_all": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    so = ort.SessionOptions()
    so.graph_optimization_level = levels[level]
    so.log_severity_level = 4
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if threads:
        so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return so


#: models with at least this many weight bytes hand their weights to onnxruntime without a copy
ZERO_COPY_BYTES = 256 << 20
#: constants of at least this size are handed over zero-copy (smaller ones travel in the proto)
ZERO_COPY_MIN = 1 << 20


def _add_outputs(proto: onnx.ModelProto, outputs: Sequence[str] | None) -> None:
    if not outputs:
        return
    have = {o.name for o in proto.graph.output}
    for name in outputs:
        if name not in have:
            proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
            have.add(name)


def _zero_copy_session(
    model: Model, so: ort.SessionOptions, outputs: Sequence[str] | None
) -> ort.InferenceSession:
    """A session whose large weights are the Model's own arrays (memory-mapped or in memory).

    The model is written with its large constants as external references to one sparse
    placeholder file (no disk blocks, no memory), and each array is handed to onnxruntime with
    ``SessionOptions.add_initializer``, which uses the buffer in place; weight prepacking is off so
    that no packed copy is made either. Peak memory stays near one copy of the weights however
    many sessions are open.
    """
    from graphopt.core.model import constant_nbytes, constant_stub, swapped_constants

    names: list[str] = []
    arrays: list[np.ndarray] = []
    placeholder = "placeholder.bin"

    def stub(t: Any) -> onnx.TensorProto | None:
        if constant_nbytes(t) < ZERO_COPY_MIN:
            return None
        arr = np.asarray(t.values)
        if arr.dtype == np.int64 or arr.dtype == object or not arr.flags.c_contiguous:
            return None
        proto_stub = constant_stub(t, placeholder, 0, int(arr.nbytes))
        if proto_stub is not None:
            names.append(t.name)
            arrays.append(arr)
        return proto_stub

    with swapped_constants(model, stub):
        proto = model.to_onnx()
    _add_outputs(proto, outputs)
    values = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]
    for name, value in zip(names, values):
        so.add_initializer(name, value)
    so.add_session_config_entry("session.disable_prepacking", "1")
    with tempfile.TemporaryDirectory(prefix="graphopt-session-") as d:
        with open(Path(d) / placeholder, "wb") as f:  # sparse: takes neither disk nor memory
            f.truncate(max((a.nbytes for a in arrays), default=0))
        path = Path(d) / "model.onnx"
        path.write_bytes(proto.SerializeToString())
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    sess._graphopt_keepalive = (arrays, values)  # type: ignore[attr-defined]
    return sess


def make_session(
    model: Model | onnx.ModelProto | str | os.PathLike[str],
    level: str = "disable_all",
    threads: int | None = None,
    outputs: Sequence[str] | None = None,
) -> ort.InferenceSession:
    """An onnxruntime CPU session for a Model, a ModelProto or a file path.

    ``outputs`` exposes extra (intermediate) tensors as outputs. A Model with large weights is
    opened without copying them (see :func:`_zero_copy_session`).
    """
    so = session_options(level, threads)
    providers = ["CPUExecutionProvider"]
    if isinstance(model, (str, os.PathLike)):
        if outputs:
            model = Model.load(model)
        else:
            return ort.InferenceSession(str(model), so, providers=providers)
    if isinstance(model, Model) and model.param_bytes() >= ZERO_COPY_BYTES:
        return _zero_copy_session(model, so, outputs)
    proto = model.to_onnx() if isinstance(model, Model) else model
    if outputs:
        if not isinstance(model, Model):
            copy = onnx.ModelProto()
            copy.CopyFrom(proto)
            proto = copy
        _add_outputs(proto, outputs)
    if proto.ByteSize() < PROTO_LIMIT:
        return ort.InferenceSession(proto.SerializeToString(), so, providers=providers)
    with tempfile.TemporaryDirectory(prefix="graphopt-verify-") as d:
        p = Path(d) / "model.onnx"
        onnx.save_model(proto, str(p), save_as_external_data=True, location="model.onnx.data")
        return ort.InferenceSession(str(p), so, providers=providers)


def _concrete_dims(
    name: str, shape: Sequence[object] | None, fallback: Mapping[str, int]
) -> list[int]:
    if shape is None:
        raise ShapeError(
            f"input '{name}' has no declared shape; give --input-shape {name}:D1xD2x..."
        )
    dims = []
    for i, d in enumerate(shape):
        if isinstance(d, (int, np.integer)) and d >= 0:
            dims.append(int(d))
        elif isinstance(d, str) and d in fallback:
            dims.append(fallback[d])
        elif i == 0:
            dims.append(1)  # a dynamic leading dim is a batch dim: use 1
        else:
            raise ShapeError(
                f"input '{name}' has dynamic dims {list(shape)}; fix them with "
                f"--input-shape {name}:"
                + "x".join(str(x) if isinstance(x, int) and x > 0 else "N" for x in shape)
            )
    return dims


def random_feeds(
    model: Model, seed: int = 0, shapes: Mapping[str, Sequence[int]] | None = None
) -> Feeds:
    """Seeded random inputs for every graph input: floats ~ N(0,1), integers 0, bools False."""
    rng = np.random.default_rng(seed)
    feeds: Feeds = {}
    for t in model.graph.inputs:
        dims = (
            list(shapes[t.name])
            if shapes and t.name in shapes
            else _concrete_dims(t.name, t.shape, {})
        )
        dtype = np.dtype(t.dtype) if t.dtype is not None else np.dtype(np.float32)
        nbytes = int(np.prod(dims, dtype=object)) * dtype.itemsize if dims else dtype.itemsize
        if nbytes > MAX_FEED_BYTES:
            raise ShapeError(
                f"input '{t.name}' of shape {dims} is too large to build a test input "
                f"({nbytes / 2**30:.3g} GiB); fix smaller dims with --input-shape {t.name}:..."
            )
        if np.issubdtype(dtype, np.floating):
            feeds[t.name] = rng.standard_normal(dims).astype(dtype)
        elif dtype == np.bool_:
            feeds[t.name] = np.zeros(dims, dtype=dtype)
        else:
            feeds[t.name] = np.zeros(dims, dtype=dtype)
    return feeds


def run_model(
    model: Model | onnx.ModelProto | str | os.PathLike[str],
    feeds: Mapping[str, np.ndarray],
    outputs: Sequence[str] | None = None,
    level: str = "disable_all",
) -> Feeds:
    """Run a model once in onnxruntime and return its outputs by name."""
    try:
        sess = make_session(model, level)
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
        raise GraphoptError(f"onnxruntime cannot load the model: {_first_line(exc)}") from None
    names = list(outputs) if outputs else [o.name for o in sess.get_outputs()]
    input_names = _input_names(sess)
    res = sess.run(names, {k: v for k, v in feeds.items() if k in input_names})
    return dict(zip(names, res))


def _input_names(sess: ort.InferenceSession) -> set[str]:
    """Names a session can be fed: its inputs and its overridable initializers (initializers
    that are also graph inputs, which ``get_inputs`` leaves out)."""
    names = {i.name for i in sess.get_inputs()}
    names.update(i.name for i in sess.get_overridable_initializers())
    return names


def _first_line(exc: BaseException) -> str:
    s = str(exc).strip()
    return s.splitlines()[0] if s else type(exc).__name__


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
        from
            the original's input shapes (dynamic dims must be fixed first).
        rtol, atol: tolerance for semantics-preserving transforms, relative to max |reference|.
        min_sqnr_db, min_cosine: for lossy transforms; when given they replace rtol/atol.
    """
    ref_model = original if not isinstance(original, (str, os.PathLike)) else Model.load(original)
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
        raise GraphoptError(
            f"onnxruntime cannot load the input model: {_first_line(exc)}"
        ) from None
    try:
        sb = make_session(transformed, transformed_level)
    except Exception as exc:  # noqa: BLE001
        raise GraphoptError(
            f"onnxruntime cannot load the transformed model: {_first_line(exc)}"
        ) from None
    names = [o.name for o in sa.get_outputs()]
    b_names = {o.name for o in sb.get_outputs()}
    report = VerifyReport(
        rtol=rtol, atol=atol, min_sqnr_db=min_sqnr_db, min_cosine=min_cosine, samples=len(feed_list)
    )
    refs: dict[str, list[np.ndarray]] = {n: [] for n in names}
    outs: dict[str, list[np.ndarray]] = {n: [] for n in names}
    a_inputs = _input_names(sa)
    b_inputs = _input_names(sb)
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
