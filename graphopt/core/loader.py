"""Read an ONNX file into a :class:`~graphopt.core.model.Model`, checking every field a file can
lie about first: protobuf framing, UTF-8 names, dims against stored data, external data paths
(inside the model's folder) and lengths. Large external weights are memory-mapped, not copied.
The writer is :mod:`graphopt.core.saver`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from google.protobuf.descriptor import FieldDescriptor as F
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from graphopt.core.errors import ModelLoadError, in_file
from graphopt.core.graph import tensor_map
from graphopt.core.model import Model, check_proto, proto_graphs


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


#: element types ONNX defines (every value of ``TensorProto.DataType`` but UNDEFINED)
ELEMENT_TYPES: frozenset[int] = frozenset(
    v for v in onnx.TensorProto.DataType.values() if v != onnx.TensorProto.UNDEFINED
)

#: storage bits of the element types ONNX packs several to a byte (int4, float4, int2, float6)
PACKED_BITS: dict[int, int] = {
    getattr(onnx.TensorProto, name): bits
    for name, bits in (
        ("UINT4", 4),
        ("INT4", 4),
        ("FLOAT4E2M1", 4),
        ("UINT2", 2),
        ("INT2", 2),
        ("FLOAT6E2M3", 6),
        ("FLOAT6E3M2", 6),
    )
    if hasattr(onnx.TensorProto, name)
}

#: the keys an external data entry may have (ONNX IR spec); onnx's own loader adds ``basepath``
EXTERNAL_KEYS = ("location", "offset", "length", "checksum", "basepath")

_DIGITS = re.compile(r"[0-9]{1,19}")


def tensor_nbytes(data_type: int, count: int) -> int | None:
    """Bytes that ``count`` elements of ONNX element type ``data_type`` take in ``raw_data`` or an
    external file (sub-byte types packed), or None for strings and unknown types."""
    if data_type in PACKED_BITS:
        return (count * PACKED_BITS[data_type] + 7) // 8
    if data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return None
    try:
        return count * onnx.helper.tensor_dtype_to_np_dtype(data_type).itemsize
    except (KeyError, ValueError, TypeError):
        return None


def element_count(dims: Iterable[int]) -> int:
    """The number of elements of a tensor with these dims (1 for a scalar), exact for any size."""
    n = 1
    for d in dims:
        n *= int(d)
    return n


def all_tensors(proto: onnx.ModelProto) -> Iterator[tuple[str, onnx.TensorProto]]:
    """Every TensorProto of the model with what it is: initializers, sparse initializers' values and
    indices, tensor attributes (``Constant`` values, ``ConstantOfShape`` fills) in every graph and
    function."""
    nodes: list[onnx.NodeProto] = [n for f in proto.functions for n in f.node]
    for g in proto_graphs(proto):
        for t in g.initializer:
            yield "initializer", t
        for sp in g.sparse_initializer:
            yield "sparse initializer", sp.values
            yield "sparse initializer indices", sp.indices
        nodes.extend(g.node)
    for n in nodes:
        for a in n.attribute:
            what = f"attribute '{a.name}' of {n.op_type} node"
            if a.type == onnx.AttributeProto.TENSOR:
                yield what, a.t
            elif a.type == onnx.AttributeProto.TENSORS:
                for t in a.tensors:
                    yield what, t
            elif a.type == onnx.AttributeProto.SPARSE_TENSOR:
                yield what, a.sparse_tensor.values
                yield what, a.sparse_tensor.indices
            elif a.type == onnx.AttributeProto.SPARSE_TENSORS:
                for sp in a.sparse_tensors:
                    yield what, sp.values
                    yield what, sp.indices


def _bad_element_type(tp: onnx.TypeProto) -> int | None:
    """An element type inside ``tp`` that ONNX does not define (0 included), or None."""
    kind = tp.WhichOneof("value")
    if kind in ("tensor_type", "sparse_tensor_type"):
        elem = getattr(tp, kind).elem_type
        return None if elem in ELEMENT_TYPES else elem
    if kind == "sequence_type":
        return _bad_element_type(tp.sequence_type.elem_type)
    if kind == "optional_type":
        return _bad_element_type(tp.optional_type.elem_type)
    if kind == "map_type":
        if tp.map_type.key_type not in ELEMENT_TYPES:
            return tp.map_type.key_type
        return _bad_element_type(tp.map_type.value_type)
    return None


def check_value_types(proto: onnx.ModelProto, path: Path | None = None) -> None:
    """Refuse main-graph inputs and outputs without a type, and element types ONNX does not
    define (in inputs, outputs and value_info of every graph).

    Every element type ONNX defines is accepted here (bfloat16, float8, int4, float4, int2,
    float6, complex), and so are optional, sequence, map and sparse values: whether a command can
    do something with them is the command's business (:meth:`Model.io_types`).
    """
    for g in proto_graphs(proto):
        for kind, values in (
            ("input", g.input),
            ("output", g.output),
            ("value_info", g.value_info),
        ):
            for vi in values:
                where = (
                    f"graph {kind} '{vi.name}'"
                    if kind != "value_info"
                    else f"value_info '{vi.name}'"
                )
                if not vi.HasField("type") or vi.type.WhichOneof("value") is None:
                    if kind == "value_info" or g is not proto.graph:
                        continue  # an untyped inner value: shape inference types it
                    raise ModelLoadError(f"{where}{in_file(path)} has no type (corrupt file?)")
                bad = _bad_element_type(vi.type)
                if bad is not None and not (
                    bad == 0 and (kind == "value_info" or g is not proto.graph)
                ):
                    raise ModelLoadError(
                        f"{where}{in_file(path)} has element type {bad}, which ONNX does not "
                        "define (corrupt file?)"
                    )


def check_names(proto: onnx.ModelProto, path: Path | None = None) -> None:
    """Refuse names and strings that are not valid UTF-8 (protobuf hands them over as ``bytes``)
    and negative dimensions in declared shapes.

    Walks every message of the model; tensors are checked by name only, so weights are not touched
    (string tensors' contents are checked by :func:`check_tensor_data`).
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
    """Refuse tensors whose element type is unknown, whose dims are negative, whose stored data
    does not match their dims, and string tensors whose strings are not UTF-8.

    onnx.checker does not compare a tensor's ``raw_data`` length with its dims; a corrupt file whose
    dims and data disagree would otherwise fail later, inside a pass, as an internal error.
    """
    typed = ("float_data", "int32_data", "int64_data", "double_data", "uint64_data")
    for what, t in all_tensors(proto):
        label = f"{what} '{t.name}'" if t.name else what
        if any(d < 0 for d in t.dims):
            raise ModelLoadError(
                f"tensor '{t.name}'{in_file(path)} has a negative dimension "
                f"{list(t.dims)} (corrupt file?)"
            )
        if t.data_type not in ELEMENT_TYPES:
            raise ModelLoadError(
                f"tensor '{t.name}'{in_file(path)} has an unknown element type "
                f"{t.data_type} (corrupt file?)"
            )
        n = element_count(t.dims)
        if t.data_type == onnx.TensorProto.STRING:
            if t.HasField("raw_data") or external_data_helper.uses_external_data(t):
                raise ModelLoadError(
                    f"string {label}{in_file(path)} stores its strings as raw or external data, "
                    "which ONNX does not allow (corrupt file?)"
                )
            if len(t.string_data) != n:
                raise ModelLoadError(
                    f"string {label}{in_file(path)} has dims {list(t.dims)} ({n} values) but "
                    f"stores {len(t.string_data)} strings (corrupt file?)"
                )
            for s in t.string_data:
                try:
                    s.decode("utf-8")
                except UnicodeDecodeError:
                    raise ModelLoadError(
                        f"string {label}{in_file(path)} holds {s[:16]!r}, which is not UTF-8 "
                        "text; graphopt reads string constants as UTF-8"
                    ) from None
            continue
        if external_data_helper.uses_external_data(t):
            continue
        want = tensor_nbytes(t.data_type, n)
        if t.HasField("raw_data"):
            have = len(t.raw_data)
            if want is not None and have != want:
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


@dataclass(frozen=True)
class ExternalRef:
    """Where a tensor's external data lies, checked: a regular file inside the model's folder, and
    ``offset + length`` within it."""

    location: str
    target: Path
    offset: int
    length: int


def _external_tensors(proto: onnx.ModelProto) -> list[onnx.TensorProto]:
    return [t for _, t in all_tensors(proto) if external_data_helper.uses_external_data(t)]


def external_ref(
    t: onnx.TensorProto, base_dir: Path, sizes: dict[Path, int] | None = None
) -> ExternalRef:
    """Check the external data entry of ``t`` and return where its bytes are.

    Every field a file can lie about is checked before anything is read or allocated: the keys
    (known ones, each once), the location (present, relative, no NUL byte, inside ``base_dir`` once
    symbolic links are resolved, a regular file), offset and length (decimal integers, not
    negative), the length against the tensor's dims and element type, and ``offset + length``
    against the file's real size.

    Raises:
        ModelLoadError: naming the tensor and the field.
    """
    name = t.name
    fields: dict[str, str] = {}
    for e in t.external_data:
        if e.key not in EXTERNAL_KEYS:
            raise ModelLoadError(
                f"tensor '{name}' has an unknown external data key '{e.key[:40]}' (known: "
                f"location, offset, length, checksum); refusing to guess what it means"
            )
        if e.key in fields:
            raise ModelLoadError(
                f"tensor '{name}' gives the external data key '{e.key}' twice; refusing to guess "
                "which one holds"
            )
        fields[e.key] = e.value
    loc = fields.get("location", "")
    if "\0" in loc:
        raise ModelLoadError(
            f"tensor '{name}' points at external data '{loc.split(chr(0))[0]}<NUL>...', a location "
            "with a NUL byte; refusing to read it"
        )
    if not loc or os.path.isabs(loc) or loc.startswith(("\\", "/")):
        raise ModelLoadError(
            f"tensor '{name}' points at external data '{loc}', which is not a relative path "
            f"inside the model's folder; refusing to read it"
        )
    base = base_dir.resolve()
    target = (base / loc).resolve()
    if base != target and base not in target.parents:
        raise ModelLoadError(
            f"tensor '{name}' points at external data '{loc}' outside the model's folder "
            f"{base}; refusing to read it"
        )
    if not target.exists():
        raise ModelLoadError(
            f"external data file '{loc}' for tensor '{name}' is missing (expected {target}); "
            f"copy it next to the model"
        )
    if not target.is_file():
        raise ModelLoadError(
            f"external data '{loc}' for tensor '{name}' is not a regular file; refusing to read it"
        )
    numbers: dict[str, int] = {}
    for key in ("offset", "length"):
        text = fields.get(key)
        if text is None:
            continue
        if not _DIGITS.fullmatch(text.strip()):
            raise ModelLoadError(
                f"external data {key} '{text[:40]}' of tensor '{name}' is not a non-negative "
                "integer (corrupt file?)"
            )
        numbers[key] = int(text)
    need = tensor_nbytes(t.data_type, element_count(t.dims))
    if need is None:
        raise ModelLoadError(
            f"tensor '{name}' of element type {t.data_type} cannot be stored as external data "
            "(corrupt file?)"
        )
    length = numbers.get("length", need)
    if length != need:
        raise ModelLoadError(
            f"external data length {length} of tensor '{name}' does not match its dims "
            f"{list(t.dims)} ({need} bytes) (corrupt file?)"
        )
    offset = numbers.get("offset", 0)
    size = (
        sizes.setdefault(target, target.stat().st_size)
        if sizes is not None
        else target.stat().st_size
    )
    if offset + length > size:
        raise ModelLoadError(
            f"external data file '{loc}' is too short for tensor '{name}' "
            f"(needs bytes {offset}..{offset + length}, file has {size})"
        )
    return ExternalRef(loc, target, offset, length)


def check_external_data(proto: onnx.ModelProto, base_dir: Path) -> None:
    """Refuse external data that is missing, outside the model's folder, malformed (keys, offset,
    length) or shorter than declared (:func:`external_ref` for every external tensor)."""
    sizes: dict[Path, int] = {}
    for t in _external_tensors(proto):
        external_ref(t, base_dir, sizes)


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
    check_value_types(proto, p)
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
        for t in tensor_map(g).values():
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
            ref = external_ref(tp, base_dir)
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
                if ref.target not in model.external_files:
                    model.external_files.append(ref.target)
                arr: np.ndarray
                if plain and dtype is not None and ref.length > 0:
                    arr = np.memmap(
                        ref.target, dtype=dtype, mode="r", offset=ref.offset, shape=dims
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
