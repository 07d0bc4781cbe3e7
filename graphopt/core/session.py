"""onnxruntime sessions for Models, protos and files.

Sessions use ``ORT_DISABLE_ALL`` by default so that onnxruntime's own fusions cannot hide (or
cause) a difference, thread spinning off, and the CPU provider. A Model with large weights hands
them to onnxruntime without a copy. ``outputs=`` exposes intermediate tensors as outputs
(:func:`with_outputs`, the one helper for that; ``truncate=True`` also cuts the model down to what
those tensors need).
"""

from __future__ import annotations

import ctypes
import logging
import os
import tempfile
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime as ort

from graphopt.core.errors import GraphoptError, first_line
from graphopt.core.feeds import Feeds
from graphopt.core.graph import constant_nbytes
from graphopt.core.loader import load
from graphopt.core.model import PROTO_LIMIT, Model, constant_stub, swapped_constants
from graphopt.core.segments import Segment, outer_reads, segment_model

logger = logging.getLogger(__name__)


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


def _has_subgraphs(graph: onnx.GraphProto) -> bool:
    return any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
        for n in graph.node
        for a in n.attribute
    )


def _truncate(proto: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """``proto`` cut down to the nodes ``names`` need, with exactly ``names`` as outputs and every
    graph input kept. ``onnx.utils.Extractor`` does it for graphs without subgraphs; a graph with
    If/Loop/Scan nodes is walked here, counting what the subgraphs read from outside as inputs of
    their node (the Extractor would miss those)."""
    g = proto.graph
    inputs = [i.name for i in g.input]
    if not _has_subgraphs(g):
        return onnx.utils.Extractor(proto).extract_model(inputs, list(names))
    producer = {o: i for i, n in enumerate(g.node) for o in n.output if o}
    keep: set[int] = set()
    stack = [producer[n] for n in names if n in producer]
    while stack:
        i = stack.pop()
        if i in keep:
            continue
        keep.add(i)
        node = g.node[i]
        reads = set(node.input) | outer_reads(node)
        stack.extend(producer[x] for x in reads if x in producer)
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    nodes = [g.node[i] for i in sorted(keep)]
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    outputs = {o.name: o for o in out.graph.output}
    del out.graph.output[:]
    for n in names:
        out.graph.output.append(outputs.get(n) or onnx.helper.make_empty_tensor_value_info(n))
    return out


def with_outputs(
    proto: onnx.ModelProto,
    names: Sequence[str],
    *,
    truncate: bool = False,
    types: Mapping[str, int] | None = None,
) -> onnx.ModelProto:
    """A copy of ``proto`` that also returns the (intermediate) tensors ``names``.

    This is the one way graphopt exposes intermediate tensors (calibration, per-layer SQNR, shape
    observation, least-squares recovery, per-layer diffs).

    Args:
        proto: the model (not modified).
        names: tensors to return, in this order after the existing outputs.
        truncate: return exactly ``names`` and keep only the nodes they need (every graph input
            stays an input, so the same feeds work); uses ``onnx.utils.Extractor`` where it fits.
        types: name -> ONNX element type, for outputs the proto has no type for (optional;
            onnxruntime infers the rest).
    """
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    g = out.graph
    names = list(dict.fromkeys(names))
    known = {v.name: v for v in list(g.value_info) + list(g.input) + list(g.output)}
    have = {o.name for o in g.output}
    for name in names:
        if name in have:
            continue
        vi = onnx.ValueInfoProto()
        vi.name = name
        if name in known:
            vi.type.CopyFrom(known[name].type)
        elif types and name in types:
            vi.type.tensor_type.elem_type = types[name]
        g.output.append(vi)
        have.add(name)
    if truncate:
        for o in g.output:  # the Extractor finds the truncated outputs' types here
            if o.name not in known:
                g.value_info.append(o)
        out = _truncate(out, names)
    return out


def _zero_copy_session(
    model: Model,
    level: str,
    threads: int | None,
    outputs: Sequence[str] | None,
    truncate: bool = False,
    types: Mapping[str, int] | None = None,
) -> ort.InferenceSession:
    """A session whose large weights are the Model's own arrays (memory-mapped or in memory).

    The model is written with its large constants as external references to one sparse
    placeholder file (no disk blocks, no memory), and each array is handed to onnxruntime with
    ``SessionOptions.add_initializer``, which uses the buffer in place; weight prepacking is off so
    that no packed copy is made either. Peak memory stays near one copy of the weights however
    many sessions are open.
    """
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
    if outputs:
        proto = with_outputs(proto, outputs, truncate=truncate, types=types)
        if truncate:  # the weights the cut-down model no longer reads are not handed over
            left = {t.name for t in proto.graph.initializer}
            kept = [(n, a) for n, a in zip(names, arrays) if n in left]
            names, arrays = [n for n, _ in kept], [a for _, a in kept]
    values = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]
    with tempfile.TemporaryDirectory(prefix="graphopt-session-") as d:
        with open(Path(d) / placeholder, "wb") as f:  # sparse: takes neither disk nor memory
            f.truncate(max((a.nbytes for a in arrays), default=0))
        sess = _open_proto(proto, level, threads, dict(zip(names, values)), Path(d))
    sess._graphopt_keepalive = (arrays, values)  # type: ignore[attr-defined]
    return sess


#: a model of more top-level nodes than this runs in onnxruntime as consecutive sessions of at
#: most this many nodes each (:class:`SegmentedSession`): onnxruntime's session creation grows
#: faster than the graph (:mod:`graphopt.core.segments`); at or below it nothing changes
SEGMENT_NODES = 10_000


class SegmentedSession(ort.InferenceSession):
    """A model run as consecutive onnxruntime sessions, one per segment
    (:func:`graphopt.core.segments.segment_model`), each fed the graph inputs and the tensors
    earlier segments produced; a crossing tensor is dropped once no later segment reads it.

    At ``ORT_DISABLE_ALL`` it computes exactly what one session of the whole model computes. At
    the other levels onnxruntime optimizes each segment on its own (no fusion across a cut).

    It is an :class:`onnxruntime.InferenceSession` to code typed for one and answers what graphopt
    asks of a whole-model session: ``get_inputs``, ``get_outputs``,
    ``get_overridable_initializers``, ``get_providers``, ``get_modelmeta``, ``run`` and
    ``run_with_ort_values``. It has no onnxruntime session of its own (``io_binding`` and the
    other methods are not available).
    """

    def __init__(  # noqa: D107 - super().__init__ would open the whole model
        self,
        sessions: Sequence[ort.InferenceSession],
        segments: Sequence[Segment],
        graph_inputs: Sequence[str],
        graph_outputs: Sequence[str],
    ) -> None:
        self._parts = [
            (sess, seg.inputs, seg.outputs, seg.release) for sess, seg in zip(sessions, segments)
        ]
        ins: dict[str, Any] = {}
        over: dict[str, Any] = {}
        outs: dict[str, Any] = {}
        for sess in sessions:
            ins.update((a.name, a) for a in sess.get_inputs())
            over.update((a.name, a) for a in sess.get_overridable_initializers())
            outs.update((a.name, a) for a in sess.get_outputs())
        self._inputs_meta = [ins[n] for n in graph_inputs if n in ins]
        self._overridable_initializers = [over[n] for n in graph_inputs if n in over]
        self._outputs_meta = [outs[n] for n in graph_outputs]
        self._feedable = {a.name for a in self._inputs_meta + self._overridable_initializers}
        first = sessions[0]
        self._sess = None
        self._enable_fallback = False
        self._providers = first.get_providers()
        self._model_meta = first.get_modelmeta()
        self._sess_options = first.get_session_options()

    @property
    def segments(self) -> int:
        """How many sessions the model runs in."""
        return len(self._parts)

    def _chain(
        self, output_names: Sequence[str] | None, feeds: Mapping[str, Any], run: Any
    ) -> list[Any]:
        names = list(output_names) if output_names else [o.name for o in self._outputs_meta]
        unknown = [k for k in feeds if k not in self._feedable]
        if unknown:
            raise ValueError(f"invalid input name(s) {unknown} (segmented session)")
        graph_outputs = {o.name for o in self._outputs_meta}
        bad = [n for n in names if n not in graph_outputs]
        if bad:
            raise ValueError(f"invalid output name(s) {bad} (segmented session)")
        self._validate_input(list(feeds))
        env = dict(feeds)
        for sess, inputs, outputs, release in self._parts:
            res = run(sess, outputs, {k: env[k] for k in inputs if k in env})
            env.update(zip(outputs, res))
            for k in release:
                env.pop(k, None)
        return [env[n] for n in names]

    def run(  # type: ignore[override]
        self,
        output_names: Sequence[str] | None,
        input_feed: Mapping[str, Any],
        run_options: Any = None,
    ) -> list[Any]:
        """Run every segment in order; the graph outputs ``output_names`` (all: None)."""
        return self._chain(output_names, input_feed, lambda s, o, f: s.run(o, f, run_options))

    def run_with_ort_values(  # type: ignore[override]
        self,
        output_names: Sequence[str] | None,
        input_dict_ort_values: Mapping[str, Any],
        run_options: Any = None,
    ) -> list[Any]:
        """:meth:`run` with OrtValues in and out."""
        return self._chain(
            output_names,
            input_dict_ort_values,
            lambda s, o, f: s.run_with_ort_values(o, f, run_options),
        )


def _open_one(
    proto: onnx.ModelProto,
    level: str,
    threads: int | None,
    values: Mapping[str, ort.OrtValue] | None = None,
    folder: Path | None = None,
    index: int = 0,
) -> ort.InferenceSession:
    """One onnxruntime session of ``proto``. ``values``: initializers handed over without a copy
    (those of ``proto``'s graph; prepacking off). ``folder``: written there first (where the
    placeholder its external references point to lies), else opened from bytes, or through a
    temporary file with external data when over protobuf's 2 GB."""
    so = session_options(level, threads)
    providers = ["CPUExecutionProvider"]
    if values:
        for t in proto.graph.initializer:
            if t.name in values:
                so.add_initializer(t.name, values[t.name])
        so.add_session_config_entry("session.disable_prepacking", "1")
    if folder is not None:
        path = folder / f"model{index}.onnx"
        path.write_bytes(proto.SerializeToString())
        return ort.InferenceSession(str(path), so, providers=providers)
    if proto.ByteSize() < PROTO_LIMIT:
        return ort.InferenceSession(proto.SerializeToString(), so, providers=providers)
    with tempfile.TemporaryDirectory(prefix="graphopt-verify-") as d:
        p = Path(d) / "model.onnx"
        onnx.save_model(proto, str(p), save_as_external_data=True, location="model.onnx.data")
        return ort.InferenceSession(str(p), so, providers=providers)


def _open_proto(
    proto: onnx.ModelProto,
    level: str,
    threads: int | None,
    values: Mapping[str, ort.OrtValue] | None = None,
    folder: Path | None = None,
) -> ort.InferenceSession:
    """A session of ``proto``: one onnxruntime session, or a :class:`SegmentedSession` when the
    graph has more than :data:`SEGMENT_NODES` top-level nodes (and can be cut)."""
    segments = segment_model(proto, SEGMENT_NODES)
    if segments is None:
        return _open_one(proto, level, threads, values, folder)
    logger.debug(
        "onnxruntime: %d nodes run as %d sessions of at most %d",
        len(proto.graph.node),
        len(segments),
        SEGMENT_NODES,
    )
    graph_inputs = [i.name for i in proto.graph.input]
    graph_outputs = [o.name for o in proto.graph.output]
    sessions = []
    for i, seg in enumerate(segments):
        sessions.append(_open_one(seg.proto, level, threads, values, folder, i))
        seg.proto = onnx.ModelProto()  # opened: its copy of the graph is not needed any more
    return SegmentedSession(sessions, segments, graph_inputs, graph_outputs)


def make_session(
    model: Model | onnx.ModelProto | str | os.PathLike[str],
    level: str = "disable_all",
    threads: int | None = None,
    outputs: Sequence[str] | None = None,
    truncate: bool = False,
    types: Mapping[str, int] | None = None,
) -> ort.InferenceSession:
    """An onnxruntime CPU session for a Model, a ModelProto or a file path.

    Args:
        outputs: extra (intermediate) tensors to return (:func:`with_outputs`).
        truncate: with ``outputs``: return only those and compute only what they need.
        types: ONNX element types of ``outputs`` the model does not declare (optional).

    A Model with large weights is opened without copying them (see :func:`_zero_copy_session`).
    """
    if isinstance(model, (str, os.PathLike)):
        if outputs:
            model = load(model)
        else:
            return ort.InferenceSession(
                str(model), session_options(level, threads), providers=["CPUExecutionProvider"]
            )
    if isinstance(model, Model) and model.param_bytes() >= ZERO_COPY_BYTES:
        return _zero_copy_session(model, level, threads, outputs, truncate, types)
    proto = model.to_onnx() if isinstance(model, Model) else model
    if outputs:
        proto = with_outputs(proto, outputs, truncate=truncate, types=types)
    return _open_proto(proto, level, threads)


#: sessions kept by :func:`keep_session`, by ``id`` of their Model (dropped with the Model)
_KEPT: dict[int, ort.InferenceSession] = {}


def keep_session(model: Model, sess: ort.InferenceSession) -> None:
    """Keep ``sess``, a ``disable_all`` session opened on ``model`` as it is now, for one
    :func:`take_session`.

    onnxruntime's session creation is the largest single cost on small graphs: a job
    that validates a model it loaded and later runs that same computation as its reference
    (optimize's verification, plan's execution proof) opens it once instead of twice. The
    session is released when taken or when ``model`` is garbage collected.

    A :class:`SegmentedSession` (a model over :data:`SEGMENT_NODES` nodes) is not kept: it
    opens in time linear in the graph, and held through a job's passes it would add ~5 KB per
    node to the job's peak memory (a 200,000-node chain: ~1 GB).
    """
    if isinstance(sess, SegmentedSession):
        return
    key = id(model)
    _KEPT[key] = sess
    weakref.finalize(model, _KEPT.pop, key, None)


def take_session(model: Model) -> ort.InferenceSession | None:
    """The session :func:`keep_session` kept for ``model`` (None when there is none), handed
    over once. The caller answers for ``model`` still computing what it computed when the
    session was opened (only its input dims fixed, or its shapes inferred, since)."""
    return _KEPT.pop(id(model), None)


def over_segment_size(model: Model) -> bool:
    """Whether ``model`` has more top-level nodes than :data:`SEGMENT_NODES` (it runs as
    segments where its graph can be cut)."""
    return len(model.graph.nodes) > SEGMENT_NODES


#: outputs kept by :func:`keep_outputs`, by ``id`` of their Model: (feeds, outputs)
_KEPT_OUTPUTS: dict[int, tuple[dict[str, Any], Feeds]] = {}


def keep_outputs(model: Model, feeds: Mapping[str, Any], outputs: Mapping[str, Any]) -> None:
    """Keep ``model``'s outputs (``disable_all``) on ``feeds`` for one :func:`take_outputs`.

    Validation of a model over :data:`SEGMENT_NODES` nodes that a job is about to run on the
    seeded inputs opens its segments anyway: it runs each one as it opens it, so that the job's
    reference run neither exports the model nor opens its segments again. Released when taken
    or when ``model`` is garbage collected.
    """
    key = id(model)
    _KEPT_OUTPUTS[key] = (dict(feeds), dict(outputs))
    weakref.finalize(model, _KEPT_OUTPUTS.pop, key, None)


def _same_feeds(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    if set(a) != set(b):
        return False
    for k, x in a.items():
        y = b[k]
        if not (isinstance(x, np.ndarray) and isinstance(y, np.ndarray)):
            return False
        if x.dtype != y.dtype or x.shape != y.shape or not np.array_equal(x, y):
            return False
    return True


def take_outputs(model: Model, feeds: Mapping[str, Any]) -> Feeds | None:
    """The outputs :func:`keep_outputs` kept for ``model``, when they were computed on exactly
    ``feeds`` (same names, dtypes, shapes and values); else None. Handed over once either way.
    The caller answers for ``model`` still computing what it computed then (only its input
    dims fixed, or its shapes inferred, since)."""
    kept = _KEPT_OUTPUTS.pop(id(model), None)
    if kept is None or not _same_feeds(kept[0], feeds):
        return None
    return dict(kept[1])


def run_opened(sess: ort.InferenceSession, feeds: Mapping[str, Any]) -> Feeds:
    """Run an open session on ``feeds`` (the names it does not take are left out): its outputs
    by name."""
    names = [o.name for o in sess.get_outputs()]
    accepted = input_names(sess)
    res = run_session(sess, names, {k: v for k, v in feeds.items() if k in accepted})
    return dict(zip(names, res))


def open_check(
    model: Model | onnx.ModelProto | str | os.PathLike[str], level: str = "disable_all"
) -> ort.InferenceSession | None:
    """Open ``model`` in onnxruntime to learn whether it loads; raises what onnxruntime raises.

    Returns the session, or None for a model over :data:`SEGMENT_NODES` top-level nodes: its
    segments are opened one at a time and each closed at once (only one segment's session in
    memory), since nothing is run.
    """
    if isinstance(model, (Model, onnx.ModelProto)) and not (
        isinstance(model, Model) and model.param_bytes() >= ZERO_COPY_BYTES
    ):
        proto = model.to_onnx() if isinstance(model, Model) else model
        segments = segment_model(proto, SEGMENT_NODES)
        if segments is None:
            return _open_one(proto, level, None)
        del proto
        for seg in segments:
            _open_one(seg.proto, level, None)
            seg.proto = onnx.ModelProto()
        return None
    return make_session(model, level)


class SessionOpenError(RuntimeError):
    """onnxruntime refused to open the model (or one of its segments) in :func:`run_feeds`;
    ``cause`` is its exception (a failure while running is raised as onnxruntime raised it)."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(first_line(cause))
        self.cause = cause


def run_feeds(
    model: Model | onnx.ModelProto | str | os.PathLike[str],
    feed_list: Sequence[Mapping[str, Any]],
    level: str = "disable_all",
    outputs: Sequence[str] | None = None,
    truncate: bool = False,
) -> tuple[list[str], list[list[Any]]]:
    """Run a model on every feed dict of ``feed_list``, opening it just for that: the output
    names and, per feed dict, the outputs in that order. Names a model does not take are left
    out of its feeds.

    A model over :data:`SEGMENT_NODES` top-level nodes is run segment by segment: a segment's
    session is opened, run on every feed dict and closed before the next one opens, so that only
    one segment's session is in memory at a time (a whole-model session holds ~5 KB per node)
    and each segment is opened once. Others (and models with zero-copy weights) open one
    session, as :func:`make_session`.

    Args:
        outputs: the tensors to return (graph outputs or intermediate ones,
            :func:`with_outputs`); default: the graph outputs.
        truncate: compute only what ``outputs`` need.

    Raises:
        SessionOpenError: onnxruntime cannot open the model or a segment of it.
    """
    truncate = truncate and bool(outputs)
    segments = None
    proto: onnx.ModelProto | None = None
    if isinstance(model, (Model, onnx.ModelProto)) and not (
        isinstance(model, Model) and model.param_bytes() >= ZERO_COPY_BYTES
    ):
        proto = model.to_onnx() if isinstance(model, Model) else model
        if outputs:
            proto = with_outputs(proto, outputs, truncate=truncate)
        segments = segment_model(proto, SEGMENT_NODES)
    if segments is None:
        try:
            if proto is not None:
                sess = _open_one(proto, level, None)
            else:
                sess = make_session(model, level, outputs=outputs, truncate=truncate)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
            raise SessionOpenError(exc) from exc
        names = list(outputs) if outputs else [o.name for o in sess.get_outputs()]
        accepted = input_names(sess)
        results = [
            run_session(sess, names, {k: v for k, v in f.items() if k in accepted})
            for f in feed_list
        ]
        return names, results
    assert proto is not None
    names = [o.name for o in proto.graph.output]
    del proto
    logger.debug("onnxruntime: run as %d segments, one open at a time", len(segments))
    envs = [dict(f) for f in feed_list]
    for seg in segments:
        try:
            sess = _open_one(seg.proto, level, None)
        except Exception as exc:  # noqa: BLE001
            raise SessionOpenError(exc) from exc
        seg.proto = onnx.ModelProto()
        for env in envs:
            res = run_session(sess, seg.outputs, {k: env[k] for k in seg.inputs if k in env})
            env.update(zip(seg.outputs, res))
            for k in seg.release:
                env.pop(k, None)
        del sess
    return names, [[env[n] for n in names] for env in envs]


def run_model(
    model: Model | onnx.ModelProto | str | os.PathLike[str],
    feeds: Mapping[str, np.ndarray],
    outputs: Sequence[str] | None = None,
    level: str = "disable_all",
    truncate: bool = False,
) -> Feeds:
    """Run a model once in onnxruntime and return its outputs by name (:func:`run_feeds`: a
    large model runs one segment's session at a time).

    Args:
        outputs: the tensors to return (graph outputs or intermediate tensors, exposed by
            :func:`with_outputs`); default: the graph outputs.
        truncate: compute only what ``outputs`` need.
    """
    try:
        names, results = run_feeds(model, [feeds], level, outputs=outputs, truncate=truncate)
    except SessionOpenError as exc:
        raise GraphoptError(f"onnxruntime cannot load the model: {exc}") from None
    return dict(zip(names, results[0]))


#: onnxruntime type strings of tensors numpy has no dtype for (ml_dtypes arrays on our side)
_ML_TYPES = ("bfloat16", "float8", "float4", "int4", "uint4", "int2", "uint2")


def is_ml_dtype(dtype: np.dtype) -> bool:
    """True for the ml_dtypes types onnx uses (bfloat16, float8*, float4, int4/uint4, int2)."""
    return getattr(np.dtype(dtype).type, "__module__", "") == "ml_dtypes"


def to_ort_value(value: np.ndarray) -> ort.OrtValue:
    """An array as an OrtValue; ml_dtypes arrays (bfloat16, float8, int4, ...) get the ONNX type
    (onnxruntime's Python binding has no numpy type for them: the bytes onnx serialises, packed
    for 4/2-bit types, are copied into a tensor onnxruntime allocates)."""
    if not is_ml_dtype(value.dtype):
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value))
    proto = onnx.numpy_helper.from_array(value)
    raw = proto.raw_data
    ov = ort.OrtValue.ortvalue_from_shape_and_type(list(value.shape), int(proto.data_type))
    size = ov.tensor_size_in_bytes()
    if size != len(raw):
        raise GraphoptError(
            f"{value.dtype} input: onnxruntime wants {size} bytes, onnx packs {len(raw)}"
        )
    if size:
        ctypes.memmove(ov.data_ptr(), raw, size)
    return ov


def from_ort_value(ov: ort.OrtValue) -> Any:
    """A tensor OrtValue as numpy (ml_dtypes arrays for the types numpy lacks)."""
    elem = ov.element_type()
    if not is_ml_dtype(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem))):
        return ov.numpy()
    size = ov.tensor_size_in_bytes()
    raw = ctypes.string_at(ov.data_ptr(), size) if size else b""
    proto = onnx.helper.make_tensor("out", elem, list(ov.shape()), raw, raw=True)
    return onnx.numpy_helper.to_array(proto)


def run_session(
    sess: ort.InferenceSession, names: Sequence[str] | None, feeds: Mapping[str, Any]
) -> list[Any]:
    """``sess.run`` for every value type: tensors of the types numpy lacks (bfloat16, float8,
    int4, ...) go in and come out as ml_dtypes arrays; sequences (lists), maps (dicts) and
    optionals (None) pass as onnxruntime takes them."""
    names = [o.name for o in sess.get_outputs()] if names is None else list(names)
    types = {o.name: o.type for o in sess.get_outputs()}
    ml_out = any(any(t in types.get(n, "") for t in _ML_TYPES) for n in names)
    ml_in = any(isinstance(v, np.ndarray) and is_ml_dtype(v.dtype) for v in feeds.values())
    if not ml_out and not ml_in:
        return list(sess.run(names, dict(feeds)))
    if ml_out and all(isinstance(v, np.ndarray) for v in feeds.values()):
        ort_feeds = {k: to_ort_value(v) for k, v in feeds.items()}
        return [from_ort_value(v) for v in sess.run_with_ort_values(names, ort_feeds)]
    conv = {
        k: to_ort_value(v) if isinstance(v, np.ndarray) and is_ml_dtype(v.dtype) else v
        for k, v in feeds.items()
    }
    return list(sess.run(names, conv))


def input_names(sess: ort.InferenceSession) -> set[str]:
    """Names a session can be fed: its inputs and its overridable initializers (initializers
    that are also graph inputs, which ``get_inputs`` leaves out)."""
    names = {i.name for i in sess.get_inputs()}
    names.update(i.name for i in sess.get_overridable_initializers())
    return names
