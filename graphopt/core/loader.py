"""Read an ONNX file into a :class:`~graphopt.core.model.Model`, checking every field a file can
lie about first: protobuf framing, UTF-8 names, dims against stored data, external data paths
(inside the model's folder) and lengths. Large external weights are memory-mapped, not copied.
The writer is :mod:`graphopt.core.saver`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from google.protobuf.descriptor import FieldDescriptor as F
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from graphopt.core.errors import ModelLoadError, in_file
from graphopt.core.model import Model, check_proto


def load(path: str | os.PathLike[str], load_weights: bool = True) -> Model:
    """Load an ONNX file (external data included). Raises :class:`ModelLoadError`.

    With ``load_weights=False`` external data is checked (present, inside the model's folder,
    long enough) but not read: constants keep their external references, shapes and sizes come
    from the tensors' dims. Enough for inspecting; such a model cannot be run or saved.
    """
    proto, p, external = load_proto(path, load_weights=False)
    model = Model.from_onnx(proto, path=p, external_data=external)
    model.weights_loaded = not external
    if external and load_weights:
        map_external_weights(model, p.parent)
        model.weights_loaded = True
    return model


def check_names(proto: onnx.ModelProto, path: Path | None = None) -> None:
    """Refuse names and strings that are not valid UTF-8 (protobuf hands them over as ``bytes``)
    and negative dimensions in declared shapes.

    Walks every message of the model; tensors are checked by name only, so weights are not touched.
    """
    stack: list[Any] = [proto]
    while stack:
        msg = stack.pop()
        if isinstance(msg, onnx.TensorProto):
            fields = [
                (msg.DESCRIPTOR.fields_by_name[n], getattr(msg, n)) for n in ("name", "doc_string")
            ]
            fields += [(None, e.key) for e in msg.external_data]
            fields += [(None, e.value) for e in msg.external_data]
        else:
            # -1 is what some exporters write for a dynamic dim (onnxruntime accepts it)
            if isinstance(msg, onnx.TensorShapeProto.Dimension) and msg.dim_value < -1:
                raise ModelLoadError(
                    f"a tensor shape{in_file(path)} has a negative dimension "
                    f"{msg.dim_value} (corrupt file?)"
                )
            fields = msg.ListFields()
        for fd, value in fields:
            if fd is None or fd.type == F.TYPE_STRING:
                values = value if fd is not None and fd.is_repeated else [value]
                for v in values:
                    if isinstance(v, bytes):
                        shown = v.decode("utf-8", "replace")
                        what = fd.name if fd is not None else "external data entry"
                        raise ModelLoadError(
                            f"{type(msg).__name__}.{what} '{shown}'{in_file(path)} "
                            "is not valid UTF-8 (corrupt file?)"
                        )
            elif fd.type == F.TYPE_MESSAGE:
                if fd.is_repeated:
                    stack.extend(value)
                else:
                    stack.append(value)


def check_tensor_data(proto: onnx.ModelProto, path: Path | None = None) -> None:
    """Refuse tensors whose dims are negative or whose stored data does not match their dims.

    onnx.checker does not compare a tensor's ``raw_data`` length with its dims; a corrupt file whose
    dims and data disagree would otherwise fail later, inside a pass, as an internal error.
    """
    typed = ("float_data", "int32_data", "int64_data", "double_data", "uint64_data")
    for t in external_data_helper._get_all_tensors(proto):
        if any(d < 0 for d in t.dims):
            raise ModelLoadError(
                f"tensor '{t.name}'{in_file(path)} has a negative dimension "
                f"{list(t.dims)} (corrupt file?)"
            )
        if external_data_helper.uses_external_data(t) or t.data_type in (
            onnx.TensorProto.STRING,
            onnx.TensorProto.UNDEFINED,
        ):
            continue
        n = int(np.prod(t.dims, dtype=object)) if len(t.dims) else 1
        try:
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        except (KeyError, ValueError, TypeError):
            raise ModelLoadError(
                f"tensor '{t.name}'{in_file(path)} has an unknown element type "
                f"{t.data_type} (corrupt file?)"
            ) from None
        if t.HasField("raw_data"):
            have, want = len(t.raw_data), n * itemsize
            if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
                want = (n + 1) // 2
            if have != want:
                raise ModelLoadError(
                    f"tensor '{t.name}'{in_file(path)} has dims {list(t.dims)} ({want} bytes) but "
                    f"{have} bytes of data (corrupt file?)"
                )
            continue
        counts = [len(getattr(t, f)) for f in typed if len(getattr(t, f))]
        if (
            counts
            and t.data_type
            in (
                onnx.TensorProto.FLOAT,
                onnx.TensorProto.DOUBLE,
                onnx.TensorProto.INT64,
                onnx.TensorProto.UINT64,
                onnx.TensorProto.INT32,
            )
            and counts[0] != n
        ):
            raise ModelLoadError(
                f"tensor '{t.name}'{in_file(path)} has dims {list(t.dims)} ({n} values) but stores "
                f"{counts[0]} values (corrupt file?)"
            )


def _external_tensors(proto: onnx.ModelProto) -> list[onnx.TensorProto]:
    return [
        t
        for t in external_data_helper._get_all_tensors(proto)
        if external_data_helper.uses_external_data(t)
    ]


def check_external_data(proto: onnx.ModelProto, base_dir: Path) -> None:
    """Refuse external data that is missing, outside the model's folder, or shorter than
    declared."""
    base = base_dir.resolve()
    sizes: dict[Path, int] = {}
    for t in _external_tensors(proto):
        info = external_data_helper.ExternalDataInfo(t)
        loc = info.location or ""
        if not loc or os.path.isabs(loc) or loc.startswith(("\\", "/")):
            raise ModelLoadError(
                f"tensor '{t.name}' points at external data '{loc}', which is not a relative path "
                f"inside the model's folder; refusing to read it"
            )
        target = (base / loc).resolve()
        if base != target and base not in target.parents:
            raise ModelLoadError(
                f"tensor '{t.name}' points at external data '{loc}' outside the model's folder "
                f"{base}; refusing to read it"
            )
        if not target.is_file():
            raise ModelLoadError(
                f"external data file '{loc}' for tensor '{t.name}' is missing (expected {target}); "
                f"copy it next to the model"
            )
        size = sizes.setdefault(target, target.stat().st_size)
        offset = int(info.offset or 0)
        length = int(info.length) if info.length else None
        if length is None:
            n = int(np.prod(t.dims)) if len(t.dims) else 1
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
            length = n * itemsize
        if offset < 0 or offset + length > size:
            raise ModelLoadError(
                f"external data file '{loc}' is too short for tensor '{t.name}' "
                f"(needs bytes {offset}..{offset + length}, file has {size})"
            )


def load_proto(
    path: str | os.PathLike[str], load_weights: bool = True
) -> tuple[onnx.ModelProto, Path, bool]:
    """Read and sanity-check an ONNX file. Returns (proto, path, uses_external_data)."""
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"no such file: {p}")
    if p.is_dir():
        raise ModelLoadError(f"{p} is a folder, not an ONNX file")
    if p.stat().st_size == 0:
        raise ModelLoadError(f"{p} is empty")
    try:
        proto = onnx.load_model(str(p), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as exc:
        raise ModelLoadError(
            f"{p} is not a readable ONNX model (truncated or not a protobuf: {type(exc).__name__})"
        ) from None
    if not proto.HasField("graph") or proto.ir_version <= 0 or not proto.opset_import:
        raise ModelLoadError(
            f"{p} is not an ONNX model (no graph, IR version or opset; "
            "truncated or another format?)"
        )
    check_names(proto, p)
    check_tensor_data(proto, p)
    external = bool(_external_tensors(proto))
    if external:
        check_external_data(proto, p.parent)
        # check the file itself: the checker then resolves external data against the model's
        # folder and reads none of it (checking the loaded proto would serialize every weight)
        _check_file(p)
        if load_weights:
            try:
                external_data_helper.load_external_data_for_model(proto, str(p.parent))
            except (OSError, ValueError) as exc:
                raise ModelLoadError(f"cannot read external data of {p}: {exc}") from None
    else:
        check_proto(proto, p)
    return proto, p, external


def map_external_weights(model: Model, base_dir: Path) -> int:
    """Give every constant that refers to external data a read-only memory map of its bytes.

    The weights are not copied into memory: pages are read when a pass or the writer touches them,
    and the OS may drop them again, so a model of any size stays within about its own size in
    memory. Element types numpy cannot map (bfloat16, float8, int4) are read into memory instead.
    Paths were checked by :func:`check_external_data` (inside the model's folder, long enough).
    Returns the number of mapped tensors.
    """
    mapped = 0
    seen: set[int] = set()
    for g in model.walk_graphs():
        for t in g.tensors().values():
            if not isinstance(t, gs.Constant) or id(t) in seen:
                continue
            seen.add(id(t))
            v = t._values
            if (
                not isinstance(v, gs.ir.tensor.LazyValues)
                or not isinstance(v.tensor, onnx.TensorProto)
                or not external_data_helper.uses_external_data(v.tensor)
            ):
                continue
            tp = v.tensor
            info = external_data_helper.ExternalDataInfo(tp)
            dims = tuple(int(d) for d in tp.dims)
            try:
                dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tp.data_type))
            except (KeyError, ValueError, TypeError):
                dtype = None
            plain = tp.data_type in (
                onnx.TensorProto.FLOAT,
                onnx.TensorProto.DOUBLE,
                onnx.TensorProto.FLOAT16,
                onnx.TensorProto.INT8,
                onnx.TensorProto.UINT8,
                onnx.TensorProto.INT16,
                onnx.TensorProto.UINT16,
                onnx.TensorProto.INT32,
                onnx.TensorProto.UINT32,
                onnx.TensorProto.INT64,
                onnx.TensorProto.UINT64,
                onnx.TensorProto.BOOL,
            )
            try:
                target = (base_dir / info.location).resolve()
                if target not in model.external_files:
                    model.external_files.append(target)
                arr: np.ndarray
                if plain and dtype is not None and int(np.prod(dims)) > 0:
                    arr = np.memmap(
                        base_dir / info.location,
                        dtype=dtype,
                        mode="r",
                        offset=int(info.offset or 0),
                        shape=dims,
                    )
                    mapped += 1
                else:
                    arr = onnx.numpy_helper.to_array(tp, str(base_dir))
            except (OSError, ValueError) as exc:
                raise ModelLoadError(
                    f"cannot read external data of tensor '{tp.name}': {exc}"
                ) from None
            t._values = arr
            t.data_location = None  # now held in memory (mapped): exported inline unless stubbed
    return mapped


def _check_file(p: Path) -> None:
    try:
        onnx.checker.check_model(str(p))
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid model"
        raise ModelLoadError(f"invalid ONNX model in {p}: {first}") from None
    except UnicodeDecodeError:
        raise ModelLoadError(
            f"invalid ONNX model in {p}: a name or string is not valid UTF-8 (corrupt file?)"
        ) from None
