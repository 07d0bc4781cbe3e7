"""onnxruntime sessions for Models, protos and files.

Sessions use ``ORT_DISABLE_ALL`` by default so that onnxruntime's own fusions cannot hide (or
cause) a difference, thread spinning off, and the CPU provider. A Model with large weights hands
them to onnxruntime without a copy. ``outputs=`` exposes intermediate tensors as outputs.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from graphopt.core.errors import GraphoptError, first_line
from graphopt.core.feeds import Feeds
from graphopt.core.graph import constant_nbytes
from graphopt.core.loader import load
from graphopt.core.model import PROTO_LIMIT, Model, constant_stub, swapped_constants

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
            model = load(model)
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
        raise GraphoptError(f"onnxruntime cannot load the model: {first_line(exc)}") from None
    names = list(outputs) if outputs else [o.name for o in sess.get_outputs()]
    accepted = input_names(sess)
    res = sess.run(names, {k: v for k, v in feeds.items() if k in accepted})
    return dict(zip(names, res))


def input_names(sess: ort.InferenceSession) -> set[str]:
    """Names a session can be fed: its inputs and its overridable initializers (initializers
    that are also graph inputs, which ``get_inputs`` leaves out)."""
    names = {i.name for i in sess.get_inputs()}
    names.update(i.name for i in sess.get_overridable_initializers())
    return names
