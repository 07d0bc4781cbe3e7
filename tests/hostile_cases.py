"""Crafted hostile and exotic ONNX files (issue 15), shared by tests/test_hostile_inputs.py (every
command, in a subprocess with its peak memory measured) and the fuzz corpus (tests/test_fuzz.py).

Each :class:`Case` writes one model (and, where it needs them, its external data, calibration data
and input arrays) into a folder. ``expect`` says what every command must do with it:

- ``"refuse"``: exit 2 with one line (a file that lies about itself, or that onnxruntime refuses);
- ``"either"``: the file is a valid model of an exotic kind (optional, sequence, map, string or
  low-precision types): a command handles it (exit 0, and any ONNX it writes is a model
  onnxruntime loads where it loads the input) or refuses it with exit 2 and one line;
- ``"inspect"``: inspect works (exit 0); the others may refuse (exit 2), e.g. because onnxruntime
  has no kernel to verify with.

Sizes in the bombs are chosen far beyond any machine (terabytes), so that a guard that is missing
shows up as an allocation failure or a kill rather than as a slow test.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

#: opset used unless a case needs a newer one
OPSET = 17


@dataclass(frozen=True)
class Case:
    """A crafted input: ``build(folder)`` writes it and returns the model's path."""

    name: str
    group: str
    build: Callable[[Path], Path]
    expect: str = "refuse"
    #: words the one-line refusal must contain (case-insensitive), when refused
    words: tuple[str, ...] = ()
    #: commands for which the case is about the extra file (calibration data, feeds, inputs)
    commands: tuple[str, ...] = field(default=())
    #: commands that may succeed although ``expect`` is "refuse" (their own input is valid)
    may_succeed: tuple[str, ...] = field(default=())


# ---------------------------------------------------------------------- building blocks


def _model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    inits: list[onnx.TensorProto] | None = None,
    opset: int = OPSET,
    extra_opsets: dict[str, int] | None = None,
    value_info: list[onnx.ValueInfoProto] | None = None,
) -> onnx.ModelProto:
    opsets = [helper.make_opsetid("", opset)] + [
        helper.make_opsetid(d, v) for d, v in (extra_opsets or {}).items()
    ]
    g = helper.make_graph(
        nodes, "hostile", inputs, outputs, initializer=inits or [], value_info=value_info or []
    )
    m = helper.make_model(g, opset_imports=opsets, producer_name="hostile")
    m.ir_version = min(helper.find_min_ir_version_for(opsets, True), onnx.IR_VERSION)
    m.ir_version = max(m.ir_version, 8)
    return m


def _f(name: str, shape: list[int | str] | None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _strings(name: str, vals: Sequence[bytes]) -> onnx.TensorProto:
    """A 1-D STRING tensor (onnx's stub for ``make_tensor`` leaves out string values)."""
    return helper.make_tensor(name, TensorProto.STRING, [len(vals)], vals)  # type: ignore[arg-type]


def _save(m: onnx.ModelProto, folder: Path, name: str = "model.onnx") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / name
    p.write_bytes(m.SerializeToString())
    return p


def _rand(*shape: int) -> np.ndarray:
    """Seeded float32 values (calibration data that is not constant)."""
    return np.random.default_rng(len(shape)).standard_normal(shape).astype(np.float32)


def write_inputs(folder: Path, arrays: dict[str, np.ndarray]) -> None:
    """Calibration data (``calib.npz``, 4 samples per input) and one ``.npy`` per input."""
    folder.mkdir(parents=True, exist_ok=True)
    calib = {k: np.concatenate([v] * 4) for k, v in arrays.items()}
    np.savez(folder / "calib.npz", **calib)  # type: ignore[arg-type]  # numpy's stub: **kwds: bool
    for k, v in arrays.items():
        np.save(folder / f"{k}.npy", v)


def _conv_relu(
    folder: Path, w_shape: tuple[int, ...] = (4, 3, 3, 3), **edit: int | list[int]
) -> Path:
    """x[1,3,8,8] -> Conv(w[4,3,3,3]) -> Relu -> y: the valid base the invalid-node cases edit
    (``w_shape`` and Conv attributes)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal(w_shape).astype(np.float32)
    attrs: dict[str, Any] = {"kernel_shape": list(w.shape[2:]), "pads": [1, 1, 1, 1]}
    attrs.update(edit)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", **attrs),
        helper.make_node("Relu", ["c"], ["y"], name="relu"),
    ]
    y = _f("y", ["n", "c", "h", "w"])
    m = _model(nodes, [_f("x", [1, 3, 8, 8])], [y], [numpy_helper.from_array(w, "w")])
    write_inputs(folder, {"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)})
    return _save(m, folder)


def _plain(folder: Path) -> Path:
    """The valid Conv -> Relu model with its inputs (for the data-file cases)."""
    return _conv_relu(folder)


# ---------------------------------------------------------------------- value types


def _optional_output(folder: Path) -> Path:
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Optional", ["r"], ["y"]),
    ]
    y = helper.make_value_info(
        "y",
        helper.make_optional_type_proto(helper.make_tensor_type_proto(TensorProto.FLOAT, [2, 3])),
    )
    write_inputs(folder, {"x": _rand(2, 3)})
    return _save(_model(nodes, [_f("x", [2, 3])], [y], opset=18), folder)


def _optional_input(folder: Path) -> Path:
    x = helper.make_value_info(
        "x",
        helper.make_optional_type_proto(helper.make_tensor_type_proto(TensorProto.FLOAT, [2, 3])),
    )
    nodes = [
        helper.make_node("OptionalGetElement", ["x"], ["e"]),
        helper.make_node("Relu", ["e"], ["y"]),
    ]
    return _save(_model(nodes, [x], [_f("y", [2, 3])], opset=18), folder)


def _sequence_output(folder: Path) -> Path:
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("SequenceConstruct", ["r", "x"], ["y"]),
    ]
    y = helper.make_value_info(
        "y",
        helper.make_sequence_type_proto(helper.make_tensor_type_proto(TensorProto.FLOAT, [2, 3])),
    )
    write_inputs(folder, {"x": _rand(2, 3)})
    return _save(_model(nodes, [_f("x", [2, 3])], [y]), folder)


def _sequence_input(folder: Path) -> Path:
    x = helper.make_value_info(
        "x",
        helper.make_sequence_type_proto(helper.make_tensor_type_proto(TensorProto.FLOAT, [2, 3])),
    )
    pos = numpy_helper.from_array(np.array(0, np.int64), "pos")
    nodes = [
        helper.make_node("SequenceAt", ["x", "pos"], ["e"]),
        helper.make_node("Relu", ["e"], ["y"]),
    ]
    return _save(_model(nodes, [x], [_f("y", [2, 3])], [pos]), folder)


def _map_output(folder: Path) -> Path:
    """ai.onnx.ml ZipMap: a sequence of maps int64 -> float."""
    nodes = [
        helper.make_node("Softmax", ["x"], ["p"]),
        helper.make_node("ZipMap", ["p"], ["y"], domain="ai.onnx.ml", classlabels_int64s=[0, 1, 2]),
    ]
    y = helper.make_value_info(
        "y",
        helper.make_sequence_type_proto(
            helper.make_map_type_proto(
                TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, [])
            )
        ),
    )
    write_inputs(folder, {"x": _rand(1, 3)})
    return _save(_model(nodes, [_f("x", [1, 3])], [y], extra_opsets={"ai.onnx.ml": 3}), folder)


def _string_io(folder: Path) -> Path:
    nodes = [helper.make_node("Identity", ["x"], ["y"])]
    s = [helper.make_tensor_value_info(n, TensorProto.STRING, [2]) for n in ("x", "y")]
    return _save(_model(nodes, s[:1], s[1:]), folder)


def _string_beside_float(folder: Path) -> Path:
    """A string constant output next to float math (plan crashed on it with SIGSEGV)."""
    c = _strings("labels", [b"cat", b"dog"])
    nodes = [
        helper.make_node("Constant", [], ["names"], value=c),
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Add", ["r", "x"], ["y"]),
    ]
    outs = [_f("y", [1, 4]), helper.make_tensor_value_info("names", TensorProto.STRING, [2])]
    write_inputs(folder, {"x": _rand(1, 4)})
    return _save(_model(nodes, [_f("x", [1, 4])], outs), folder)


def _string_cast_float(folder: Path) -> Path:
    """A string initializer parsed into floats by Cast and added to the input."""
    s = _strings("s", [b"1.5", b"2", b"-3", b"4e-1"])
    nodes = [
        helper.make_node("Cast", ["s"], ["sf"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["x", "sf"], ["y"]),
    ]
    write_inputs(folder, {"x": _rand(1, 4)})
    return _save(_model(nodes, [_f("x", [1, 4])], [_f("y", [1, 4])], [s]), folder)


def _non_utf8_string_constant(folder: Path) -> Path:
    c = _strings("bad", [b"\xff\xfe\xfa", b"ok"])
    nodes = [
        helper.make_node("Constant", [], ["names"], value=c),
        helper.make_node("Relu", ["x"], ["y"]),
    ]
    outs = [_f("y", [1, 4]), helper.make_tensor_value_info("names", TensorProto.STRING, [2])]
    write_inputs(folder, {"x": _rand(1, 4)})
    return _save(_model(nodes, [_f("x", [1, 4])], outs), folder)


def _non_utf8_string_initializer(folder: Path) -> Path:
    s = _strings("s", [b"\xc3\x28", b"\x80"])
    nodes = [
        helper.make_node("Identity", ["s"], ["names"]),
        helper.make_node("Relu", ["x"], ["y"]),
    ]
    outs = [_f("y", [1, 4]), helper.make_tensor_value_info("names", TensorProto.STRING, [2])]
    write_inputs(folder, {"x": _rand(1, 4)})
    return _save(_model(nodes, [_f("x", [1, 4])], outs, [s]), folder)


#: every element type ONNX defines beyond the plain numpy ones, with the opset that has Cast for it
EXOTIC: dict[str, tuple[int, int]] = {
    "bfloat16": (TensorProto.BFLOAT16, 13),
    "float8e4m3fn": (TensorProto.FLOAT8E4M3FN, 19),
    "float8e4m3fnuz": (TensorProto.FLOAT8E4M3FNUZ, 19),
    "float8e5m2": (TensorProto.FLOAT8E5M2, 19),
    "float8e5m2fnuz": (TensorProto.FLOAT8E5M2FNUZ, 19),
    "uint4": (TensorProto.UINT4, 21),
    "int4": (TensorProto.INT4, 21),
    "float4e2m1": (TensorProto.FLOAT4E2M1, 23),
    "complex64": (TensorProto.COMPLEX64, 13),
    "complex128": (TensorProto.COMPLEX128, 13),
}
for _name, _code in (
    ("float8e8m0", "FLOAT8E8M0"),
    ("uint2", "UINT2"),
    ("int2", "INT2"),
    ("float6e2m3", "FLOAT6E2M3"),
    ("float6e3m2", "FLOAT6E3M2"),
):
    if hasattr(TensorProto, _code):
        EXOTIC[_name] = (int(getattr(TensorProto, _code)), min(onnx.defs.onnx_opset_version(), 25))


def _dtype_io(elem: int, opset: int) -> Callable[[Path], Path]:
    """An input and an output of the element type, through Identity."""

    def build(folder: Path) -> Path:
        vis = [helper.make_tensor_value_info(n, elem, [2, 4]) for n in ("x", "y")]
        nodes = [helper.make_node("Identity", ["x"], ["y"])]
        return _save(_model(nodes, vis[:1], vis[1:], opset=opset), folder)

    return build


def _dtype_cast(elem: int, opset: int) -> Callable[[Path], Path]:
    """float math around a Cast to the element type and back (the type in value_info only)."""

    def build(folder: Path) -> Path:
        nodes = [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("Cast", ["r"], ["lo"], to=elem),
            helper.make_node("Cast", ["lo"], ["back"], to=TensorProto.FLOAT),
            helper.make_node("Add", ["back", "x"], ["y"]),
        ]
        vi = [helper.make_tensor_value_info("lo", elem, [2, 4])]
        write_inputs(folder, {"x": np.linspace(-2, 2, 8, dtype=np.float32).reshape(2, 4)})
        return _save(
            _model(nodes, [_f("x", [2, 4])], [_f("y", [2, 4])], opset=opset, value_info=vi), folder
        )

    return build


def _dtype_initializer(elem: int, opset: int) -> Callable[[Path], Path]:
    """A weight of the element type (raw data of the right length), cast to float and added."""

    def build(folder: Path) -> Path:
        n = 8
        bits = {
            TensorProto.UINT4: 4,
            TensorProto.INT4: 4,
            TensorProto.FLOAT4E2M1: 4,
            getattr(TensorProto, "UINT2", -1): 2,
            getattr(TensorProto, "INT2", -1): 2,
            getattr(TensorProto, "FLOAT6E2M3", -1): 6,
            getattr(TensorProto, "FLOAT6E3M2", -1): 6,
        }.get(elem)
        if bits is None:
            size = helper.tensor_dtype_to_np_dtype(elem).itemsize * n
        else:
            size = (n * bits + 7) // 8
        w = TensorProto(name="w", data_type=elem, dims=[2, 4], raw_data=bytes(size))
        nodes = [
            helper.make_node("Cast", ["w"], ["wf"], to=TensorProto.FLOAT),
            helper.make_node("Add", ["x", "wf"], ["y"]),
        ]
        write_inputs(folder, {"x": _rand(2, 4)})
        return _save(_model(nodes, [_f("x", [2, 4])], [_f("y", [2, 4])], [w], opset=opset), folder)

    return build


def _undefined_dtype_input(folder: Path) -> Path:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    x.type.tensor_type.elem_type = 99  # no such element type
    nodes = [helper.make_node("Identity", ["x"], ["y"])]
    return _save(_model(nodes, [x], [_f("y", [2])]), folder)


def _untyped_input(folder: Path) -> Path:
    x = onnx.ValueInfoProto(name="x")  # no type at all
    nodes = [helper.make_node("Relu", ["x"], ["y"])]
    return _save(_model(nodes, [x], [_f("y", [2])]), folder)


def _sparse_initializer(folder: Path) -> Path:
    vals = numpy_helper.from_array(np.array([1.0, 2.0], np.float32), "w")
    idx = numpy_helper.from_array(np.array([0, 3], np.int64), "w_idx")
    sp = helper.make_sparse_tensor(vals, idx, [4])
    g = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "hostile",
        [_f("x", [4])],
        [_f("y", [4])],
        sparse_initializer=[sp],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])
    m.ir_version = 8
    write_inputs(folder, {"x": _rand(4)})
    return _save(m, folder)


# ---------------------------------------------------------------------- external data


def external_case(entries: dict[str, str], data: bytes = bytes(432), name: str = "w.bin"):
    """The Conv model with its weight in external data described by ``entries``."""

    def build(folder: Path) -> Path:
        path = _conv_relu(folder)
        m = onnx.load(str(path))
        w = m.graph.initializer[0]
        w.ClearField("raw_data")
        w.data_location = TensorProto.EXTERNAL
        for k, v in entries.items():
            e = w.external_data.add()
            e.key, e.value = k, v
        if data is not None and name:
            (folder / name).write_bytes(data)
        return _save(m, folder)

    return build


# ---------------------------------------------------------------------- semantically invalid nodes


def _bn_scale_length(folder: Path) -> Path:
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(np.ones(3, np.float32), "g"),  # 4 channels, 3 scales
        numpy_helper.from_array(np.zeros(4, np.float32), "b"),
        numpy_helper.from_array(np.zeros(4, np.float32), "mu"),
        numpy_helper.from_array(np.ones(4, np.float32), "var"),
    ]
    nodes = [helper.make_node("BatchNormalization", ["x", "g", "b", "mu", "var"], ["y"])]
    write_inputs(folder, {"x": rng.standard_normal((1, 4, 4, 4)).astype(np.float32)})
    return _save(_model(nodes, [_f("x", [1, 4, 4, 4])], [_f("y", [1, 4, 4, 4])], inits), folder)


def _reshape_impossible(folder: Path) -> Path:
    shape = numpy_helper.from_array(np.array([5, 7], np.int64), "shape")
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["y"])]
    write_inputs(folder, {"x": _rand(2, 4)})
    return _save(_model(nodes, [_f("x", [2, 4])], [_f("y", [5, 7])], [shape]), folder)


def _matmul_mismatch(folder: Path) -> Path:
    w = numpy_helper.from_array(np.ones((5, 3), np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    write_inputs(folder, {"x": _rand(2, 4)})
    return _save(_model(nodes, [_f("x", [2, 4])], [_f("y", [2, 3])], [w]), folder)


def _ml_op(folder: Path) -> Path:
    """ai.onnx.ml Binarizer on doubles: valid ONNX, but onnxruntime has a kernel for floats only
    (a valid model nobody here can run)."""
    nodes = [helper.make_node("Binarizer", ["x"], ["y"], domain="ai.onnx.ml", threshold=0.5)]
    vis = [helper.make_tensor_value_info(n, TensorProto.DOUBLE, [2, 4]) for n in ("x", "y")]
    write_inputs(folder, {"x": _rand(2, 4).astype(np.float64)})
    return _save(_model(nodes, vis[:1], vis[1:], extra_opsets={"ai.onnx.ml": 1}), folder)


def _training_op(folder: Path) -> Path:
    """ai.onnx.preview.training Momentum: a valid training op onnxruntime's CPU build lacks."""
    inits = [
        numpy_helper.from_array(np.array(v, dt), n)
        for n, v, dt in (("lr", 0.1, np.float32), ("t", 0, np.int64))
    ]
    nodes = [
        helper.make_node(
            "Momentum",
            ["lr", "t", "x", "g", "v"],
            ["x2", "v2"],
            domain="ai.onnx.preview.training",
            alpha=0.9,
            beta=1.0,
            mode="standard",
            norm_coefficient=0.0,
        ),
        helper.make_node("Relu", ["x2"], ["y"]),
    ]
    ins = [_f(n, [4]) for n in ("x", "g", "v")]
    write_inputs(folder, {n: _rand(4) for n in ("x", "g", "v")})
    m = _model(
        nodes,
        ins,
        [_f("y", [4]), _f("v2", [4])],
        inits,
        extra_opsets={"ai.onnx.preview.training": 1},
    )
    return _save(m, folder)


# ---------------------------------------------------------------------- folding bombs

#: 2**20 x 2**20 float32 = 4 TiB
_BIG = 1 << 20


def _bomb(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], opset: int = OPSET):
    """``y = x + ReduceSum(bomb)``: the bomb is computable from constants alone."""

    def build(folder: Path) -> Path:
        tail = [
            helper.make_node("ReduceSum", ["bomb"], ["s"], keepdims=0),
            helper.make_node("Add", ["x", "s"], ["y"]),
        ]
        write_inputs(folder, {"x": _rand(1, 4)})
        m = _model(nodes + tail, [_f("x", [1, 4])], [_f("y", [1, 4])], inits, opset=opset)
        return _save(m, folder)

    return build


def _i64(name: str, v: list[int] | int) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(v, np.int64), name)


def _f32(name: str, v: object) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(v, np.float32), name)


BOMBS: dict[str, Callable[[Path], Path]] = {
    "constantofshape": _bomb(
        [
            helper.make_node(
                "ConstantOfShape",
                ["shape"],
                ["bomb"],
                value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0]),
            )
        ],
        [_i64("shape", [_BIG, _BIG])],
    ),
    "expand": _bomb(
        [helper.make_node("Expand", ["one", "shape"], ["bomb"])],
        [_f32("one", [1.0]), _i64("shape", [_BIG, _BIG])],
    ),
    "tile": _bomb(
        [helper.make_node("Tile", ["blk", "reps"], ["bomb"])],
        [_f32("blk", np.ones((4, 4))), _i64("reps", [_BIG, _BIG])],
    ),
    "range": _bomb(
        [helper.make_node("Range", ["start", "limit", "delta"], ["bomb"])],
        [_f32("start", 0.0), _f32("limit", float(1 << 42)), _f32("delta", 1.0)],
    ),
    "pad": _bomb(
        [helper.make_node("Pad", ["blk", "pads"], ["bomb"])],
        [_f32("blk", np.ones((2, 2))), _i64("pads", [_BIG, _BIG, _BIG, _BIG])],
    ),
    "resize": _bomb(
        [helper.make_node("Resize", ["blk", "", "scales"], ["bomb"], mode="nearest")],
        [_f32("blk", np.ones((1, 1, 2, 2))), _f32("scales", [1, 1, _BIG, _BIG])],
    ),
    "constantofshape-shape-chain": _bomb(
        [
            helper.make_node("Mul", ["a", "a"], ["sq"]),
            helper.make_node("ConstantOfShape", ["sq"], ["bomb"]),
        ],
        [_i64("a", [_BIG, _BIG])],
    ),
}


# ---------------------------------------------------------------------- data files


def _claiming(nbytes: int) -> bytes:
    """A ``.npy`` stream whose header claims ``nbytes`` of float32 data, followed by 16 bytes."""
    n = nbytes // 4
    header = {"descr": "<f4", "fortran_order": False, "shape": (n // 1024, 1024)}
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue() + bytes(16)


def _npz_bytes(member: bytes, compression: int = zipfile.ZIP_STORED, lie: int = 0) -> bytes:
    """A ``.npz`` with one member ``x.npy``; ``lie``: the archive's directory claims the member
    inflates to that many bytes (local header and central directory patched)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as z:
        z.writestr("x.npy", member)
    raw = bytearray(buf.getvalue())
    if lie:
        size = len(member).to_bytes(4, "little")
        claim = min(lie, 0xFFFFFFFE).to_bytes(4, "little")
        for sig, at in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
            i = raw.find(sig)
            assert raw[i + at : i + at + 4] == size
            raw[i + at : i + at + 4] = claim
    return bytes(raw)


def _npz_of(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def _npy_of(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


#: data case -> (calibration .npz with 4 samples, feeds .npz with 1 sample, input .npy) as bytes;
#: None keeps the valid file
_GOOD = np.random.default_rng(1).standard_normal((4, 3, 8, 8)).astype(np.float32)
_OBJ = np.array([{"a": 1}], dtype=object)
DATA_FILES: dict[str, tuple[bytes | None, bytes | None, bytes | None]] = {
    "npz-corrupt": (_npz_of(x=_GOOD)[:100], _npz_of(x=_GOOD[:1])[:100], _npy_of(_GOOD[:1])[:70]),
    "npz-empty": (b"", b"", b""),
    "npz-no-arrays": (_npz_of(), _npz_of(), None),
    "npz-header-256gb": (_npz_bytes(_claiming(256 << 30)),) * 2 + (_claiming(256 << 30),),
    "npz-header-256gb-deflated": (_npz_bytes(_claiming(256 << 30), zipfile.ZIP_DEFLATED),) * 2
    + (_claiming(256 << 30),),
    "npz-member-size-lies": (_npz_bytes(_claiming(256 << 30), zipfile.ZIP_DEFLATED, lie=256 << 30),)
    * 2
    + (None,),
    "nan-only": (
        _npz_of(x=np.full_like(_GOOD, np.nan)),
        _npz_of(x=np.full_like(_GOOD[:1], np.nan)),
        _npy_of(np.full_like(_GOOD[:1], np.nan)),
    ),
    "inf-only": (
        _npz_of(x=np.full_like(_GOOD, np.inf)),
        _npz_of(x=np.full_like(_GOOD[:1], -np.inf)),
        _npy_of(np.where(np.arange(_GOOD[:1].size).reshape(_GOOD[:1].shape) % 2, np.inf, np.nan)),
    ),
    "wrong-name": (_npz_of(images=_GOOD), _npz_of(images=_GOOD[:1]), None),
    "wrong-dtype": (
        _npz_of(x=_GOOD.astype("<U8")),
        _npz_of(x=_GOOD[:1].astype(np.complex64)),
        _npy_of(_GOOD[:1].astype("<U8")),
    ),
    "wrong-rank": (_npz_of(x=_GOOD[:, 0]), _npz_of(x=_GOOD[0]), _npy_of(_GOOD[0, 0])),
    "object-pickle": (_npz_of(x=_OBJ), _npz_of(x=_OBJ), _npy_of(_OBJ)),
}


def _data_case(kind: str) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        path = _plain(folder)
        np.savez(folder / "feeds.npz", x=_GOOD[:1])
        for name, data in zip(("calib.npz", "feeds.npz", "x.npy"), DATA_FILES[kind]):
            if data is not None:
                (folder / name).write_bytes(data)
        return path

    return build


#: the commands that read a data file, and how (the case is about that file)
DATA_COMMANDS = ("quantize", "prune", "run", "plan", "optimize")


# ---------------------------------------------------------------------- the table


def _cases() -> list[Case]:
    out: list[Case] = [
        Case("optional-output", "types", _optional_output, "either"),
        Case("optional-input", "types", _optional_input, "either"),
        Case("sequence-output", "types", _sequence_output, "either"),
        Case("sequence-input", "types", _sequence_input, "either"),
        Case("map-output", "types", _map_output, "either"),
        Case("string-io", "types", _string_io, "either"),
        Case("string-beside-float", "types", _string_beside_float, "either"),
        Case("string-cast-float", "types", _string_cast_float, "either"),
        Case("sparse-initializer", "types", _sparse_initializer, "either"),
        Case("non-utf8-string-constant", "types", _non_utf8_string_constant, "refuse", ("utf-8",)),
        Case(
            "non-utf8-string-initializer",
            "types",
            _non_utf8_string_initializer,
            "refuse",
            ("utf-8",),
        ),
        Case("undefined-element-type", "types", _undefined_dtype_input, "refuse"),
        Case("untyped-input", "types", _untyped_input, "refuse"),
    ]
    for name, (elem, opset) in EXOTIC.items():
        out += [
            Case(f"{name}-io", "dtypes", _dtype_io(elem, opset), "either"),
            Case(f"{name}-cast", "dtypes", _dtype_cast(elem, opset), "either"),
            Case(f"{name}-initializer", "dtypes", _dtype_initializer(elem, opset), "either"),
        ]
    ext = [
        ("negative-length", {"location": "w.bin", "offset": "0", "length": "-432"}),
        ("negative-offset", {"location": "w.bin", "offset": "-8", "length": "432"}),
        ("text-offset", {"location": "w.bin", "offset": "abc", "length": "432"}),
        ("text-length", {"location": "w.bin", "offset": "0", "length": "4x2"}),
        ("float-offset", {"location": "w.bin", "offset": "1.5", "length": "432"}),
        ("huge-length", {"location": "w.bin", "offset": "0", "length": str(1 << 62)}),
        ("huge-offset", {"location": "w.bin", "offset": str(1 << 62), "length": "432"}),
        ("past-end", {"location": "w.bin", "offset": "16", "length": "432"}),
        ("short-length", {"location": "w.bin", "offset": "0", "length": "8"}),
        ("nul-location", {"location": "w.bin\x00../../etc/passwd", "offset": "0"}),
        ("empty-location", {"location": "", "offset": "0"}),
        ("no-location", {"offset": "0", "length": "432"}),
        ("folder-location", {"location": ".", "offset": "0", "length": "432"}),
        ("unknown-key", {"location": "w.bin", "offset": "0", "length": "432", "evil": "1"}),
        ("duplicate-key", {"location": "w.bin", "offset": "0", "length": "432"}),
    ]
    for name, entries in ext:
        build = external_case(entries)
        if name == "duplicate-key":
            build = _external_duplicate
        out.append(Case(f"external-{name}", "external", build, "refuse"))
    invalid = [
        ("conv-group-0", lambda f: _conv_relu(f, group=0)),
        ("conv-weight-mismatch", lambda f: _conv_relu(f, w_shape=(4, 5, 3, 3))),
        ("conv-kernel-mismatch", lambda f: _conv_relu(f, kernel_shape=[5, 5])),
        ("conv-huge-dilation", lambda f: _conv_relu(f, dilations=[1 << 30, 1 << 30])),
        ("conv-huge-pads", lambda f: _conv_relu(f, pads=[1 << 40, 1 << 40, 1 << 40, 1 << 40])),
        ("conv-negative-pads", lambda f: _conv_relu(f, pads=[-5, -5, -5, -5])),
        ("conv-zero-stride", lambda f: _conv_relu(f, strides=[0, 0])),
        ("bn-scale-length", _bn_scale_length),
        ("reshape-impossible", _reshape_impossible),
        ("matmul-mismatch", _matmul_mismatch),
    ]
    # inspect runs nothing: it describes these models
    out += [Case(n, "nodes", b, "refuse", may_succeed=("inspect",)) for n, b in invalid]
    out += [
        Case("ml-op-without-kernel", "nodes", _ml_op, "inspect", ("onnxruntime",)),
        Case("training-op", "nodes", _training_op, "inspect", ("onnxruntime",)),
    ]
    out += [Case(f"bomb-{n}", "bombs", b, "inspect") for n, b in BOMBS.items()]
    for kind, files in DATA_FILES.items():
        # a command whose own data file is the valid one may succeed
        fine = ("run",) if files[2] is None else ()
        out.append(
            Case(f"data-{kind}", "data", _data_case(kind), "refuse", (), DATA_COMMANDS, fine)
        )
    return out


def _external_duplicate(folder: Path) -> Path:
    """Two ``location`` entries: which one would be read?"""
    path = external_case({"location": "w.bin", "offset": "0", "length": "432"})(folder)
    m = onnx.load(str(path), load_external_data=False)
    e = m.graph.initializer[0].external_data.add()
    e.key, e.value = "location", "../secret.bin"
    (folder.parent / "secret.bin").write_bytes(bytes(432))
    return _save(m, folder)


CASES: list[Case] = _cases()
CASES_BY_NAME: dict[str, Case] = {c.name: c for c in CASES}


# ---------------------------------------------------------------------- mutations (fuzz corpus)


def _out0(m: onnx.ModelProto) -> str:
    return m.graph.output[0].name


def _feed_first_output(m: onnx.ModelProto, nodes: list[onnx.NodeProto], value: str) -> None:
    """Route the first output through ``Add(out, value)`` (``value`` a scalar)."""
    y = _out0(m)
    m.graph.node.extend(nodes)
    m.graph.node.append(helper.make_node("Add", [f"{y}__pre", value], [y]))
    for n in m.graph.node[: -1 - len(nodes)]:
        n.output[:] = [f"{y}__pre" if o == y else o for o in n.output]
        n.input[:] = [f"{y}__pre" if i == y else i for i in n.input]


def _mutate(m: onnx.ModelProto, kind: str, folder: Path) -> bool:
    """Apply the defect; False when the model has nothing it applies to (no weight, no Conv)."""
    y = _out0(m)
    if kind == "optional-output":
        m.graph.node.append(helper.make_node("Optional", [y], ["opt_out"]))
        m.graph.output.append(
            helper.make_value_info(
                "opt_out",
                helper.make_optional_type_proto(
                    helper.make_tensor_type_proto(TensorProto.FLOAT, None)
                ),
            )
        )
        m.opset_import[0].version = max(m.opset_import[0].version, 18)
    elif kind == "sequence-output":
        m.graph.node.append(helper.make_node("SequenceConstruct", [y, y], ["seq_out"]))
        m.graph.output.append(
            helper.make_value_info(
                "seq_out",
                helper.make_sequence_type_proto(
                    helper.make_tensor_type_proto(TensorProto.FLOAT, None)
                ),
            )
        )
    elif kind in ("string-beside", "non-utf8-string"):
        data = [b"\xff\xfe"] if kind == "non-utf8-string" else [b"label"]
        c = _strings("names_value", data)
        m.graph.node.append(helper.make_node("Constant", [], ["names"], value=c))
        m.graph.output.append(helper.make_tensor_value_info("names", TensorProto.STRING, [1]))
    elif kind in ("bfloat16-round-trip", "float8-round-trip"):
        elem = TensorProto.BFLOAT16 if kind.startswith("bfloat16") else TensorProto.FLOAT8E4M3FN
        m.opset_import[0].version = max(m.opset_import[0].version, 19)
        _feed_first_output(
            m,
            [
                helper.make_node("ReduceMean", [f"{y}__pre"], ["rm"], keepdims=0),
                helper.make_node("Cast", ["rm"], ["lo"], to=elem),
                helper.make_node("Cast", ["lo"], ["back"], to=TensorProto.FLOAT),
                helper.make_node("Mul", ["back", "zero_f"], ["zeroed"]),
            ],
            "zeroed",
        )
        m.graph.initializer.append(_f32("zero_f", 0.0))
    elif kind == "int4-initializer":
        m.opset_import[0].version = max(m.opset_import[0].version, 21)
        w = TensorProto(name="w_int4", data_type=TensorProto.INT4, dims=[3], raw_data=bytes(2))
        m.graph.initializer.append(w)
        _feed_first_output(
            m,
            [
                helper.make_node("Cast", ["w_int4"], ["w4f"], to=TensorProto.FLOAT),
                helper.make_node("ReduceSum", ["w4f"], ["w4s"], keepdims=0),
            ],
            "w4s",
        )
    elif kind.startswith("bomb-"):
        bomb = BOMBS[kind[len("bomb-") :]]
        tmp = onnx.load(str(bomb(folder / "bomb")))
        names = {t.name for t in tmp.graph.initializer}
        m.graph.initializer.extend(tmp.graph.initializer)
        nodes = [n for n in tmp.graph.node if n.op_type != "Add"]
        assert not names & {i.name for i in m.graph.input}
        _feed_first_output(m, nodes, "s")
    elif kind.startswith("external-"):
        entries = {
            "external-negative-offset": {"offset": "-4"},
            "external-text-length": {"length": "12x"},
            "external-nul-location": {"location": "w.bin\x00x"},
            "external-past-end": {"offset": "1000000"},
        }[kind]
        t = max(m.graph.initializer, key=lambda t: len(t.raw_data), default=None)
        if t is None or not t.raw_data:
            return False
        (folder / "w.bin").write_bytes(t.raw_data)
        fields = {"location": "w.bin", "offset": "0", "length": str(len(t.raw_data))}
        fields.update(entries)
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        for k, v in fields.items():
            e = t.external_data.add()
            e.key, e.value = k, v
    elif kind == "conv-group-0":
        conv = next((n for n in m.graph.node if n.op_type == "Conv"), None)
        if conv is None:
            return False
        kept = [a for a in conv.attribute if a.name != "group"]
        del conv.attribute[:]
        conv.attribute.extend(kept + [helper.make_attribute("group", 0)])
    else:
        raise ValueError(kind)
    m.ir_version = max(m.ir_version, helper.find_min_ir_version_for(list(m.opset_import), True))
    return True


#: mutation -> whether the mutated model must be refused ("refuse") or may be handled ("either")
MUTATIONS: dict[str, str] = {
    "optional-output": "either",
    "sequence-output": "either",
    "string-beside": "either",
    "non-utf8-string": "refuse",
    "bfloat16-round-trip": "either",
    "float8-round-trip": "either",
    "int4-initializer": "either",
    **{
        f"bomb-{k}": "refuse"
        for k in ("constantofshape", "expand", "tile", "range", "pad", "resize")
    },
    "external-negative-offset": "refuse",
    "external-text-length": "refuse",
    "external-nul-location": "refuse",
    "external-past-end": "refuse",
    "conv-group-0": "refuse",
}


def mutate(model: onnx.ModelProto, kind: str, folder: Path) -> tuple[Path, bool]:
    """``model`` (a copy) with one of the crafted defects of :data:`MUTATIONS`, saved in
    ``folder`` (with its external data where the mutation makes some); and whether the defect
    applied (False: the model has no weight to make external, no Conv ...; it is saved as is)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    folder.mkdir(parents=True, exist_ok=True)
    applied = _mutate(m, kind, folder)
    return _save(m, folder), applied
