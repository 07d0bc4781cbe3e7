"""Write a :class:`~graphopt.ir.Model` to an ONNX file, atomically.

The model and its external data file are written into a temporary folder beside the destination and
renamed into place, so an interrupted run never leaves a partial output and never touches the input.
Weights go to an external data file (``<name>.data``) when the caller asks, when the source model used
external data, or when the serialized proto would pass protobuf's 2 GiB limit. External tensors are
written straight from their buffers without building a second in-memory copy of the model.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import external_data_helper

from graphopt.ir import PROTO_LIMIT, Model, check_proto

logger = logging.getLogger(__name__)

#: tensors at least this large go to the external data file when external data is written
EXTERNAL_MIN_BYTES = 1024
#: write external data automatically when weights exceed this
AUTO_EXTERNAL_BYTES = 1_800_000_000


def _tensor_bytes(t: onnx.TensorProto) -> bytes | memoryview:
    if t.HasField("raw_data"):
        return t.raw_data
    return np.ascontiguousarray(onnx.numpy_helper.to_array(t)).tobytes()


def _all_initializers(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_initializers(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_initializers(g)


def write_external(proto: onnx.ModelProto, folder: Path, data_name: str,
                   min_bytes: int = EXTERNAL_MIN_BYTES) -> int:
    """Move initializers of at least ``min_bytes`` into ``folder/data_name``; return bytes written.

    Offsets are aligned to 64 bytes so that the file can be memory-mapped.
    """
    written = 0
    with open(folder / data_name, "wb") as f:
        for t in _all_initializers(proto.graph):
            if external_data_helper.uses_external_data(t):
                continue
            if t.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
                continue
            nbytes = (int(np.prod(t.dims)) if len(t.dims) else 1) * \
                onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
            if nbytes < min_bytes:
                continue
            data = _tensor_bytes(t)
            pad = (-f.tell()) % 64
            if pad:
                f.write(b"\0" * pad)
            offset = f.tell()
            f.write(data)
            written += len(data)
            for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data",
                          "uint64_data"):
                t.ClearField(field)
            del t.external_data[:]
            for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(len(data)))):
                entry = t.external_data.add()
                entry.key, entry.value = k, v
            t.data_location = onnx.TensorProto.EXTERNAL
    return written


def save_model(model: Model, path: str | os.PathLike[str], *, external: bool | None = None,
               check: bool = True) -> Path:
    """Write ``model`` to ``path`` atomically; return the path.

    Args:
        external: True to write weights to ``<path>.data``; False to embed them (fails over 2 GiB);
            None (default) to decide: external if the source used external data or weights are large.
        check: run ``onnx.checker`` on what is written.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if model.path is not None and dest.exists() and os.path.samefile(dest, model.path):
        from graphopt.errors import GraphoptError

        raise GraphoptError(f"refusing to overwrite the input model {dest}; choose another output")
    proto = model.to_onnx()
    if external is None:
        external = model.external_data or model.param_bytes() > AUTO_EXTERNAL_BYTES
    data_name = dest.name + ".data"
    tmpdir = Path(tempfile.mkdtemp(prefix=".graphopt-", dir=dest.parent))
    try:
        tmp_model = tmpdir / dest.name
        if external:
            # export shares TensorProtos with the live model; copy before rewriting them as external
            proto = _detach_initializers(proto)
            write_external(proto, tmpdir, data_name)
        if proto.ByteSize() >= PROTO_LIMIT:
            raise ValueError("model exceeds 2 GiB even with external data")
        with open(tmp_model, "wb") as f:
            f.write(proto.SerializeToString())
            f.flush()
            os.fsync(f.fileno())
        if check:
            check_proto(proto, tmp_model) if not external else onnx.checker.check_model(str(tmp_model))
        if external:
            os.replace(tmpdir / data_name, dest.parent / data_name)
        os.replace(tmp_model, dest)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    logger.info("wrote %s%s", dest, " (+ external data)" if external else "")
    return dest


def _detach_initializers(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A proto whose tensors can be edited without changing the Model's lazily held weights.

    The graph is copied message by message; raw bytes are shared by protobuf where it can.
    """
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    return out
