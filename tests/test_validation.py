"""The loader-side validation every command shares (issue 15), unit by unit: external data fields,
value types and element types, strings, sparse initializers, onnxruntime's verdict
(core/validate.py), the size guards (constant folding, running a model), and the calibration and
feeds readers (headers checked against the file's real length before anything is allocated)."""

from __future__ import annotations

import logging
import tracemalloc
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
from hostile_cases import BOMBS, CASES_BY_NAME, DATA_FILES, EXOTIC, external_case
from onnx import TensorProto, helper, numpy_helper

from graphopt.core.errors import (
    CalibrationError,
    FeedError,
    GraphoptError,
    ModelLoadError,
    ShapeError,
)
from graphopt.core.feeds import (
    FileFeeds,
    check_feeds,
    load_npy,
    load_npz,
    npy_header,
    open_calibration,
    read_feeds,
)
from graphopt.core.loader import load, tensor_nbytes
from graphopt.core.model import Model, densify, type_string
from graphopt.core.shapes import check_run_size, max_tensor_bytes, prepare
from graphopt.core.validate import (
    RuntimeUnavailableError,
    check_runnable,
    check_tensor_io,
    open_model,
    ort_reason,
)
from graphopt.passes import get_pass

# ---------------------------------------------------------------------- external data


def _ext(folder: Path, entries: dict[str, str], data: bytes) -> Path:
    """The hostile Conv model with its weight ``w`` in ``w.bin`` described by ``entries``."""
    return external_case(entries, data)(folder)


@pytest.mark.parametrize(
    ("entries", "words"),
    [
        ({"location": "w.bin", "offset": "-8", "length": "432"}, "offset '-8'"),
        ({"location": "w.bin", "offset": "0", "length": "-432"}, "length '-432'"),
        ({"location": "w.bin", "offset": "abc"}, "offset 'abc'"),
        ({"location": "w.bin", "offset": "1.5"}, "offset '1.5'"),
        ({"location": "w.bin", "offset": " 7 x"}, "not a non-negative integer"),
        ({"location": "w.bin", "length": str(1 << 62)}, "does not match its dims"),
        ({"location": "w.bin", "length": "8"}, "does not match its dims"),
        ({"location": "w.bin", "offset": "16"}, "too short"),
        ({"location": "w.bin", "offset": str(1 << 62)}, "too short"),
        ({"location": "w.bin\x00/etc/passwd"}, "NUL"),
        ({"location": ""}, "not a relative path"),
        ({"offset": "0"}, "not a relative path"),
        ({"location": "."}, "not a regular file"),
        ({"location": "w.bin", "__class__": "x"}, "unknown external data key"),
    ],
)
def test_external_data_fields_are_refused(
    entries: dict[str, str], words: str, tmp_path: Path
) -> None:
    p = _ext(tmp_path / "m", entries, bytes(432))
    for weights in (False, True):
        with pytest.raises(ModelLoadError, match=None) as err:
            load(p, load_weights=weights)
        assert words in str(err.value), str(err.value)


def test_external_data_key_given_twice(tmp_path: Path) -> None:
    p = CASES_BY_NAME["external-duplicate-key"].build(tmp_path / "m")
    with pytest.raises(ModelLoadError, match="twice"):
        load(p)


def test_valid_external_data_is_mapped_at_its_offset(tmp_path: Path) -> None:
    w = np.arange(108, dtype=np.float32)
    data = bytes(64) + w.tobytes()
    p = _ext(tmp_path / "m", {"location": "w.bin", "offset": "64", "length": "432"}, data)
    m = load(p)
    got = np.asarray(m.initializers()["w"].values).reshape(-1)
    np.testing.assert_array_equal(got, w)
    assert (tmp_path / "m" / "w.bin").resolve() in m.external_files


def test_tensor_nbytes_packs_sub_byte_types() -> None:
    assert tensor_nbytes(TensorProto.FLOAT, 3) == 12
    assert tensor_nbytes(TensorProto.INT4, 5) == 3
    assert tensor_nbytes(TensorProto.FLOAT4E2M1, 4) == 2
    assert tensor_nbytes(TensorProto.STRING, 4) is None
    if hasattr(TensorProto, "INT2"):
        assert tensor_nbytes(TensorProto.INT2, 5) == 2
    if hasattr(TensorProto, "FLOAT6E2M3"):
        assert tensor_nbytes(TensorProto.FLOAT6E2M3, 4) == 3


# ---------------------------------------------------------------------- value types


@pytest.mark.parametrize(
    "name", ["optional-output", "optional-input", "sequence-output", "sequence-input", "map-output"]
)
def test_non_tensor_values_round_trip_untouched(name: str, tmp_path: Path) -> None:
    p = CASES_BY_NAME[name].build(tmp_path / name)
    src = onnx.load(str(p))
    m = load(p)
    prepare(m, check_size=False)
    out = m.to_onnx()
    for a, b in ((src.graph.input, out.graph.input), (src.graph.output, out.graph.output)):
        assert [(v.name, v.type) for v in a] == [(v.name, v.type) for v in b]
    kinds = m.io_types()
    assert kinds and all(not k.startswith("tensor(") for k in kinds.values())
    with pytest.raises(ModelLoadError, match="numeric tensors"):
        check_tensor_io(m, "prune")


def test_type_string() -> None:
    seq = helper.make_sequence_type_proto(helper.make_tensor_type_proto(TensorProto.INT64, []))
    assert type_string(seq) == "seq(tensor(int64))"
    opt = helper.make_optional_type_proto(helper.make_tensor_type_proto(TensorProto.FLOAT, []))
    assert type_string(opt) == "optional(tensor(float))"
    mp = helper.make_map_type_proto(
        TensorProto.STRING, helper.make_tensor_type_proto(TensorProto.FLOAT, [])
    )
    assert type_string(mp) == "map(string,tensor(float))"


@pytest.mark.parametrize("name", sorted(EXOTIC))
def test_every_element_type_loads_and_exports_exactly(name: str, tmp_path: Path) -> None:
    """Inputs, outputs, value_info and initializers of every ONNX element type: dtypes become
    numpy/ml_dtypes types (never the bare enum graphsurgeon leaves), and the export keeps every
    type and every initializer byte."""
    for kind in ("io", "cast", "initializer"):
        p = CASES_BY_NAME[f"{name}-{kind}"].build(tmp_path / kind)
        src = onnx.load(str(p))
        m = load(p)
        for t in list(m.graph.inputs) + list(m.graph.outputs):
            assert (
                t.dtype is None
                or isinstance(t.dtype, np.dtype)
                or isinstance(np.dtype(t.dtype), np.dtype)
            ), repr(t.dtype)
        out = m.to_onnx()
        for a, b in ((src.graph.input, out.graph.input), (src.graph.output, out.graph.output)):
            assert [(v.name, v.type.tensor_type.elem_type) for v in a] == [
                (v.name, v.type.tensor_type.elem_type) for v in b
            ]
        src_init = {t.name: (t.data_type, t.raw_data) for t in src.graph.initializer}
        out_init = {t.name: (t.data_type, t.raw_data) for t in out.graph.initializer}
        assert src_init == out_init


def test_computed_int4_and_string_constants_export_in_onnx_encoding() -> None:
    """A constant graphsurgeon holds as an array (a pass computed it) is written as ONNX stores
    it: int4 packed two to a byte, strings in string_data (not raw bytes)."""
    g = helper.make_graph(
        [
            helper.make_node("Cast", ["w"], ["wf"], to=TensorProto.FLOAT),
            helper.make_node("Add", ["x", "wf"], ["y"]),
            helper.make_node("Identity", ["s"], ["names"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [5]),
            helper.make_tensor_value_info("names", TensorProto.STRING, [2]),
        ],
        initializer=[
            numpy_helper.from_array(np.zeros(5, ml_dtypes.int4), "w"),
            # onnx's stub for make_tensor leaves out string values
            helper.make_tensor("s", TensorProto.STRING, [2], [b"a", b"b"]),  # type: ignore[list-item]
        ],
    )
    m = Model.from_onnx(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]))
    consts = m.initializers()
    consts["w"].values = np.array([1, -2, 3, 4, -8], dtype=ml_dtypes.int4)
    consts["s"].values = np.array(["héllo", "wörld"], dtype=object)
    out = {t.name: t for t in m.to_onnx().graph.initializer}
    assert len(out["w"].raw_data) == 3
    np.testing.assert_array_equal(
        numpy_helper.to_array(out["w"]).astype(np.int8), [1, -2, 3, 4, -8]
    )
    assert list(out["s"].string_data) == ["héllo".encode(), "wörld".encode()]


@pytest.mark.parametrize("name", ["non-utf8-string-constant", "non-utf8-string-initializer"])
def test_non_utf8_strings_are_refused(name: str, tmp_path: Path) -> None:
    p = CASES_BY_NAME[name].build(tmp_path / name)
    with pytest.raises(ModelLoadError, match="UTF-8"):
        load(p, load_weights=False)


@pytest.mark.parametrize("name", ["undefined-element-type", "untyped-input"])
def test_unknown_or_missing_types_are_refused(name: str, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError):
        load(CASES_BY_NAME[name].build(tmp_path / name), load_weights=False)


def test_sparse_initializer_is_densified_exactly() -> None:
    vals = numpy_helper.from_array(np.array([1.5, -2.0], np.float32), "w")
    idx = numpy_helper.from_array(np.array([0, 3], np.int64), "i")
    dense = densify(helper.make_sparse_tensor(vals, idx, [4]))
    np.testing.assert_array_equal(dense, np.array([1.5, 0, 0, -2.0], np.float32))
    coords = numpy_helper.from_array(np.array([[0, 1], [1, 0]], np.int64), "i")
    dense = densify(helper.make_sparse_tensor(vals, coords, [2, 2]))
    np.testing.assert_array_equal(dense, np.array([[0, 1.5], [-2.0, 0]], np.float32))
    out = numpy_helper.from_array(np.array([0, 9], np.int64), "i")
    with pytest.raises(ModelLoadError, match="outside"):
        densify(helper.make_sparse_tensor(vals, out, [4]))
    with pytest.raises(ModelLoadError, match="dense"):
        densify(helper.make_sparse_tensor(vals, idx, [1 << 40]))


# ---------------------------------------------------------------------- onnxruntime's verdict


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("bn-scale-length", "BatchNormalization"),
        ("matmul-mismatch", "MatMul"),
        ("conv-negative-pads", "pads"),
        ("conv-group-0", "group: 0"),
        ("conv-kernel-mismatch", "kernel_shape"),
        ("reshape-impossible", "Reshape"),
    ],
)
def test_onnxruntime_refusals_are_the_users(name: str, words: str, tmp_path: Path) -> None:
    p = CASES_BY_NAME[name].build(tmp_path / name)
    load(p, load_weights=False)  # the file itself is well formed: inspect works
    with pytest.raises(ModelLoadError) as err:
        open_model(p)
    assert not isinstance(err.value, RuntimeUnavailableError)
    msg = str(err.value)
    assert words in msg and "[ONNXRuntimeError]" not in msg and "\n" not in msg, msg


@pytest.mark.parametrize("name", ["ml-op-without-kernel", "training-op"])
def test_missing_kernels_are_not_the_users(name: str, tmp_path: Path) -> None:
    p = CASES_BY_NAME[name].build(tmp_path / name)
    with pytest.raises(RuntimeUnavailableError, match="cannot run or verify"):
        open_model(p)
    open_model(p, runs=False)  # optimize --no-verify may go on
    check_runnable(load(p), require_kernels=False)


def test_valid_model_passes_every_check(load_fixture) -> None:  # type: ignore[no-untyped-def]
    check_runnable(load_fixture("mobilenet_block.onnx"))


def test_ort_reason_is_one_clean_line() -> None:
    exc = RuntimeError(
        "[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running Conv node. "
        "Name:'c1' Status Message: bad group\nmore"
    )
    assert ort_reason(exc) == "Conv node 'c1': bad group"


# ---------------------------------------------------------------------- size guards


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_bombs_are_refused_before_running(name: str, tmp_path: Path) -> None:
    p = CASES_BY_NAME[f"bomb-{name}"].build(tmp_path / name)
    tracemalloc.start()
    try:
        m = load(p)
        prepare(m, check_size=False)  # inspect: shapes only, nothing computed
        with pytest.raises(ShapeError, match="bomb"):
            check_run_size(m)
        with pytest.raises(ShapeError, match="GRAPHOPT_MAX_TENSOR_BYTES"):
            check_run_size(load(p), infer=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 256 << 20


def test_max_tensor_bytes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRAPHOPT_MAX_TENSOR_BYTES", "1e6")
    assert max_tensor_bytes() == 10**6
    monkeypatch.setenv("GRAPHOPT_MAX_TENSOR_BYTES", "lots")
    with pytest.raises(ShapeError):
        max_tensor_bytes()


def test_fold_constants_leaves_a_large_result_unfolded_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A 1 GiB ConstantOfShape (from 16 bytes of shape) is over the 256 MiB fold limit: never
    computed, kept as a node, and reported at INFO (-v)."""
    shape = numpy_helper.from_array(np.array([1 << 14, 1 << 14], np.int64), "shape")
    g = helper.make_graph(
        [
            helper.make_node("ConstantOfShape", ["shape"], ["big"]),
            helper.make_node("ReduceSum", ["big"], ["s"], keepdims=0),
            helper.make_node("Add", ["x", "s"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        initializer=[shape],
    )
    m = Model.from_onnx(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    prepare(m, check_size=False)
    tracemalloc.start()
    try:
        with caplog.at_level(logging.INFO, logger="graphopt"):
            res = get_pass("fold-constants")(m)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 128 << 20
    assert "ConstantOfShape" in res.model.op_histogram()
    assert res.stats.get("too_large", 0) >= 1
    assert any("not folding" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------- calibration and feeds


def _claim(tmp: Path, kind: str, index: int) -> Path:
    names = ("calib.npz", "feeds.npz", "x.npy")
    p = tmp / names[index]
    data = DATA_FILES[kind][index]
    assert data is not None
    p.write_bytes(data)
    return p


@pytest.mark.parametrize(
    "kind", ["npz-header-256gb", "npz-header-256gb-deflated", "npz-member-size-lies"]
)
def test_a_header_claiming_256_gb_allocates_nothing(kind: str, tmp_path: Path) -> None:
    npz = _claim(tmp_path, kind, 0)
    tracemalloc.start()
    try:
        for reader, error in (
            (read_feeds, FeedError),
            (lambda p: load_npz(p, CalibrationError), CalibrationError),
        ):
            with pytest.raises(error, match=str(npz)):
                reader(npz)
        if DATA_FILES[kind][2] is not None:
            npy = _claim(tmp_path, kind, 2)
            with pytest.raises(FeedError, match="274,877,906,944 bytes"):
                npy_header(npy)
            with pytest.raises(FeedError):
                load_npy(npy)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20


@pytest.mark.parametrize(
    ("kind", "words"),
    [
        ("npz-corrupt", "not a .npz"),
        ("npz-empty", "is empty"),
        ("npz-no-arrays", "no arrays"),
        ("object-pickle", "Python objects"),
        ("nan-only", "NaN/inf"),
        ("inf-only", "NaN/inf"),
        ("wrong-name", "no array for model input 'x'"),
        ("wrong-dtype", "dtype <U8"),
        ("wrong-rank", "rank 3"),
    ],
)
def test_calibration_data_is_refused_naming_the_file(
    kind: str, words: str, tmp_path: Path, load_fixture
) -> None:  # type: ignore[no-untyped-def]
    folder = tmp_path / kind
    p = CASES_BY_NAME[f"data-{kind}"].build(folder)
    model = load(p)
    with pytest.raises(CalibrationError) as err:
        list(open_calibration(folder / "calib.npz", model))
    msg = str(err.value)
    assert words in msg and "calib.npz" in msg, msg


def test_feeds_name_their_file() -> None:
    model = Model.from_onnx(
        helper.make_model(
            helper.make_graph(
                [helper.make_node("Relu", ["x"], ["y"])],
                "g",
                [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
            ),
            opset_imports=[helper.make_opsetid("", 17)],
        )
    )
    nan = FileFeeds({"x": np.full((1, 4), np.nan, np.float32)}, {"x": "/data/in.npz"})
    with pytest.raises(FeedError, match=r"from /data/in.npz\) holds only NaN/inf"):
        check_feeds(model, nan, "--feeds")
    wrong = FileFeeds({"images": np.ones((1, 4), np.float32)}, {"images": "/data/in.npz"})
    with pytest.raises(FeedError, match=r"in /data/in.npz\) names unknown"):
        check_feeds(model, wrong, "--feeds")
    partly = np.ones((1, 4), np.float32)
    partly[0, 0] = np.nan  # some NaN is the user's data, not a broken file
    check_feeds(model, {"x": partly}, "--feeds")


def test_valid_npz_and_npy_read_back(tmp_path: Path) -> None:
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.savez_compressed(tmp_path / "c.npz", x=a)
    np.save(tmp_path / "x.npy", a)
    np.testing.assert_array_equal(load_npz(tmp_path / "c.npz")["x"], a)
    np.testing.assert_array_equal(load_npy(tmp_path / "x.npy", mmap=True), a)
    assert npy_header(tmp_path / "x.npy").shape == (3, 4)
    with zipfile.ZipFile(tmp_path / "c.npz") as z:
        assert z.namelist() == ["x.npy"]


# ---------------------------------------------------------------------- plan and compile


@pytest.mark.parametrize("name", ["bfloat16", "float8e4m3fn", "int4", "int2"])
def test_plan_sizes_low_precision_tensors_and_proves(name: str, tmp_path: Path) -> None:
    """A tensor numpy holds only as ml_dtypes (bfloat16, float8, int4, int2) is sized from its
    inferred shape and the dtype's itemsize, without a run, and lives in the arena: the proof
    runs the Cast nodes through onnxruntime's typed values and copies them into their slices."""
    from graphopt.algorithms.memory.arena import prove
    from graphopt.core.session import is_ml_dtype
    from graphopt.jobs.plan import plan_model

    if name not in EXOTIC:
        pytest.skip(f"onnx has no {name}")
    path = CASES_BY_NAME[f"{name}-cast"].build(tmp_path)
    plan = plan_model(load(path))
    assert plan.model is not None
    lo = plan.tensors["lo"]
    assert is_ml_dtype(np.dtype(lo.dtype)) and lo.nbytes == 8 * np.dtype(lo.dtype).itemsize
    assert not plan.unplanned
    rep = prove(plan.model, plan)
    assert rep.ok and rep.nodes_in_arena == 4 and rep.nodes_reference == 0, rep.to_json()


@pytest.mark.parametrize("name", ["optional-output", "sequence-output", "map-output", "string-io"])
def test_plan_proves_models_with_non_tensor_values(name: str, tmp_path: Path) -> None:
    """Optional, sequence, map and string values stay outside the arena; the proof compares them
    by structure and value (a map's float values within tolerance)."""
    from graphopt.algorithms.memory.arena import prove
    from graphopt.jobs.plan import plan_model

    plan = plan_model(load(CASES_BY_NAME[name].build(tmp_path)))
    assert plan.model is not None
    rep = prove(plan.model, plan)
    assert rep.ok, rep.to_json()


def test_arena_nodes_of_one_signature_share_a_session() -> None:
    """A chain of 60 MatMul/Add/Relu blocks opens one session per signature (3), not 180, and
    matches onnxruntime on the whole model; a plan that overwrites a live tensor still fails."""
    from graphopt.algorithms.memory.arena import ArenaExecutor, prove
    from graphopt.jobs.plan import plan_model

    rng = np.random.default_rng(0)
    nodes, inits, h = [], [], "x"
    for i in range(60):
        inits += [
            numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), f"w{i}"),
            numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), f"b{i}"),
        ]
        nodes += [
            helper.make_node("MatMul", [h, f"w{i}"], [f"m{i}"]),
            helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]),
            helper.make_node("Relu", [f"a{i}"], [f"r{i}"]),
        ]
        h = f"r{i}"
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info(h, TensorProto.FLOAT, [1, 8])],
        inits,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    plan = plan_model(Model.from_onnx(m), inplace=False)
    assert plan.model is not None
    ex = ArenaExecutor(plan.model, plan)
    ex.run({"x": rng.standard_normal((1, 8)).astype(np.float32)})
    assert len({id(s.sess) for s in ex._sessions.values()}) == 3  # noqa: SLF001
    assert prove(plan.model, plan).ok
    # a0 put on the graph input x, which is live to the end: overwritten, the proof fails
    bad = plan.with_offsets({"a5": plan.tensors["x"].offset})
    assert not prove(plan.model, bad).ok


@pytest.mark.parametrize(
    "name, words",
    [
        ("bfloat16-cast", "bfloat16"),
        ("int4-initializer", "int4"),
        ("sequence-output", "sequence value"),
        ("optional-input", "optional value"),
        ("string-io", "string"),
    ],
)
def test_compile_refuses_what_tvm_cannot_hold(name: str, words: str, tmp_path: Path) -> None:
    """Before TVM is imported: exit 2 naming the value and its type."""
    from graphopt.algorithms.tvm.emit import check_importable

    if name.split("-")[0] in ("bfloat16", "int4") and name.split("-")[0] not in EXOTIC:
        pytest.skip("onnx lacks the type")
    proto = onnx.load(str(CASES_BY_NAME[name].build(tmp_path)))
    with pytest.raises(GraphoptError) as info:
        check_importable(proto)
    assert info.value.exit_code == 2 and words in str(info.value)
    check_importable(onnx.load(str(CASES_BY_NAME["conv-group-0"].build(tmp_path / "ok"))))
