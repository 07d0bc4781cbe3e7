"""Write a :class:`~graphopt.core.model.Model` to an ONNX file, atomically (the reader is
:mod:`graphopt.core.loader`).

The model and its external data file are written into a temporary folder beside the destination and
published by :mod:`graphopt.core.output` (data file named per write, model renamed last), so an
interrupted run never leaves a partial output, a reader never sees a model with another write's
data, and the input is never touched. Weights go to an external data file (``<name>.<12 hex>.data``)
when the caller asks, when the source model used external data, or when the serialized proto would
pass protobuf's 2 GiB limit. External tensors are written straight from their buffers without
building a second in-memory copy of the model.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, BinaryIO

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import external_data_helper
from onnx_graphsurgeon.ir.tensor import LazyValues

from graphopt.core.errors import GraphoptError, OutputPathError
from graphopt.core.model import PROTO_LIMIT, Model, check_proto, constant_stub, swapped_constants
from graphopt.core.output import check_output_path, staged_model_output

logger = logging.getLogger(__name__)

#: tensors at least this large go to the external data file when external data is written
EXTERNAL_MIN_BYTES = 1024
#: write external data automatically when weights exceed this
AUTO_EXTERNAL_BYTES = 1_800_000_000


def save(
    model: Model,
    path: str | os.PathLike[str],
    *,
    external: bool | None = None,
    check: bool = True,
    sidecars: Mapping[str | os.PathLike[str], str | bytes | Callable[[IO[str]], object]]
    | None = None,
    proto: onnx.ModelProto | None = None,
) -> Path:
    """Write ``model`` to ``path`` atomically; return the path.

    The model and its external data are written into one temporary folder beside ``path`` and
    published by :func:`graphopt.core.output.staged_model_output`: the data file is named
    ``<name>.<12 hex>.data`` (unique per write) and moved into place first, the model is renamed
    last, and the data of the model it replaces is removed after, so that a reader never sees a
    model paired with another write's data.

    Args:
        external: True to write weights to an external data file beside ``path``; False to embed
            them (fails over 2 GiB); None (default) to decide: external if the source used
            external data or weights are large.
        check: run ``onnx.checker`` on what is written.
        sidecars: files that belong to the model (path beside it -> text or bytes, or a
            function that writes the text into an open file: a large memory plan's JSON is
            streamed, never held as one string), written into the same temporary folder and
            published with it (a memory plan's JSON).
        proto: ``model.to_onnx()`` of ``model`` as it is now, made by the caller already (a
            job that verified that export): written as it is instead of a second export of the
            whole graph, where the weights are embedded.

    Raises:
        OutputPathError: the output cannot be written (folder missing and not creatable, no
            permission, disk full, not a regular file) or is the input model or one of its
            external data files. Nothing is left under ``path`` then.
    """
    if not getattr(model, "weights_loaded", True):
        raise ValueError("this model was loaded without its weights (load_weights=False)")
    inputs = [model.path, *getattr(model, "external_files", [])]
    dest = check_output_path(path, inputs=inputs)
    if external is None:
        external = model.external_data or model.param_bytes() > AUTO_EXTERNAL_BYTES
    fixed_data = (dest.parent / (dest.name + ".data")).resolve()
    if external and fixed_data in [Path(p).resolve() for p in inputs[1:]]:
        # the new data would get its own name, but a model beside its input's weights file of the
        # same name is a trap for whoever copies the folder next
        raise OutputPathError(
            f"writing {dest} would sit beside {fixed_data.name}, the input model's external "
            "data; choose another output name"
        )
    with staged_model_output(dest, protect=getattr(model, "external_files", [])) as st:
        for side, content in (sidecars or {}).items():
            if callable(content):
                with open(st.sidecar(side), "w", encoding="utf-8", newline="") as tf:
                    content(tf)
                continue
            data = content.encode("utf-8") if isinstance(content, str) else content
            with open(st.sidecar(side), "wb") as f:
                f.write(data)
        if external:
            # weights stream from the live constants into the data file one at a time; the
            # exported proto only holds references (no second copy of the weights in memory)
            with _external_stubs(model, st.data_path, st.data_name):
                proto = model.to_onnx()
        elif proto is None:
            proto = model.to_onnx()
        if proto.ByteSize() >= PROTO_LIMIT:
            raise GraphoptError("the model exceeds 2 GiB even with its weights in external data")
        with open(st.model_path, "wb") as f:
            f.write(proto.SerializeToString())
        if check:
            if external:
                onnx.checker.check_model(str(st.model_path))
            else:
                check_proto(proto, st.model_path)
    logger.info("wrote %s%s", dest, " (+ external data)" if external else "")
    return dest


@contextlib.contextmanager
def _external_stubs(
    model: Model, data_path: Path, location: str, min_bytes: int = EXTERNAL_MIN_BYTES
) -> Iterator[int]:
    """Write every large constant to ``data_path`` and, while the block runs, give each an external
    reference instead of its values, so that exporting copies no weight. Restores them afterwards.

    Tensors are written one at a time straight from their buffers; offsets are aligned to 64 bytes
    so that the file can be memory-mapped. Yields how many constants went to the file.
    """
    with open(data_path, "wb") as f:
        with swapped_constants(model, lambda t: _write_constant(t, f, location, min_bytes)) as n:
            f.flush()
            os.fsync(f.fileno())
            yield n


def _write_constant(
    t: gs.Constant, f: BinaryIO, location: str, min_bytes: int
) -> onnx.TensorProto | None:
    """Append one constant's bytes to ``f``; return its external stub (None: keep it inline)."""
    values = t._values
    if isinstance(values, LazyValues):
        src = values.tensor
        if not isinstance(src, onnx.TensorProto) or external_data_helper.uses_external_data(src):
            return None
        if src.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
            return None
        if values.nbytes < min_bytes:
            return None
        data: bytes | memoryview = (
            src.raw_data
            if src.HasField("raw_data")
            else np.ascontiguousarray(onnx.numpy_helper.to_array(src)).tobytes()
        )
    else:
        arr = np.asarray(values)
        if arr.dtype.kind in "OUS" or arr.nbytes < min_bytes:
            return None
        arr = np.ascontiguousarray(arr)
        data = memoryview(arr.reshape(-1).view(np.uint8))  # type: ignore[arg-type]
    pad = (-f.tell()) % 64
    offset = f.tell() + pad
    stub = constant_stub(t, location, offset, len(data))
    if stub is None:
        return None
    if pad:
        f.write(b"\0" * pad)
    f.write(data)
    return stub
