"""Hostile and broken input through the CLI: every case is refused with exit 2 and one clear line.

Truncated and bit-flipped files, protobufs of the wrong type or with wrong field types, missing or
escaping external data, cycles, dangling inputs, duplicate names, unknown domains, opset 7 through
the newest onnxruntime runs, absurd shapes, unwritable outputs, and a run killed while it saves.
For each: never a traceback or a hang, the input file byte-identical afterwards, no output file and
no ``.graphopt-*`` temporary folder left behind. A bit flip may be harmless (it hit a weight): then
the run exits 0 and its output is a valid model that graphopt verified against the (flipped) input.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.cli import main
from graphopt.fixtures import fixture_path

FLIPS = int(os.environ.get("GRAPHOPT_HOSTILE_FLIPS", "40"))
GRAPHOPT = Path(sys.executable).with_name("graphopt")


# ---------------------------------------------------------------------- helpers


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@contextlib.contextmanager
def _deadline(seconds: int) -> Iterator[None]:
    """Fail (instead of hanging) when the block runs longer than ``seconds``."""

    def on_alarm(signum: int, frame: object) -> None:
        raise TimeoutError(f"graphopt did not finish within {seconds} s (hang?)")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def run_cli(
    args: Sequence[str | Path], capsys: pytest.CaptureFixture[str], seconds: int = 60
) -> tuple[int, str, str]:
    capsys.readouterr()
    with _deadline(seconds):
        rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_clean(inp: Path, sha: str, out: Path | None) -> None:
    """The input is byte-identical; no output, external data or temporary folder is left."""
    if inp.exists():
        assert _sha(inp) == sha, f"{inp} was modified"
    if out is not None:
        assert not out.exists(), f"{out} was written"
        assert not list(out.parent.glob(out.name + "*.data")), "external data left behind"
        left = list(out.parent.glob(".graphopt-*"))
        assert not left, f"temporary folder left behind: {left}"


def assert_refused(
    rc: int, err: str, inp: Path, sha: str, out: Path | None = None, words: tuple[str, ...] = ()
) -> None:
    assert rc == 2, f"exit {rc}, expected 2: {err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("graphopt: error: "), lines[0]
    assert "Traceback" not in err
    for w in words:
        assert w.lower() in err.lower(), f"'{w}' missing from: {err}"
    assert_clean(inp, sha, out)


def inspect_and_optimize(
    path: Path,
    tmp: Path,
    capsys: pytest.CaptureFixture[str],
    words: tuple[str, ...] = (),
    inspect_may_work: bool = False,
) -> None:
    """Both commands refuse ``path`` (inspect may succeed where it needs no runtime)."""
    sha = _sha(path) if path.is_file() else ""
    rc, _, err = run_cli(["inspect", path, "--json"], capsys)
    if not (inspect_may_work and rc == 0):
        assert_refused(rc, err, path, sha, words=words)
    out = tmp / "out" / "o.onnx"
    rc, _, err = run_cli(["optimize", path, "-o", out], capsys)
    assert_refused(rc, err, path, sha, out, words=words)


def save(proto: onnx.ModelProto, path: Path, check: bool = False) -> Path:
    if check:
        onnx.checker.check_model(proto)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(proto.SerializeToString())
    return path


def small_model(
    opset: int = 17,
    nodes: list[onnx.NodeProto] | None = None,
    inputs: list[onnx.ValueInfoProto] | None = None,
    outputs: list[onnx.ValueInfoProto] | None = None,
    inits: list[onnx.TensorProto] | None = None,
    extra_opsets: dict[str, int] | None = None,
) -> onnx.ModelProto:
    """x[1,3,8,8] -> Conv -> Relu -> y (or the given pieces)."""
    rng = np.random.default_rng(0)
    if nodes is None:
        nodes = [
            helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["y"]),
        ]
        inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")]
    inputs = (
        inputs
        if inputs is not None
        else [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])]
    )
    outputs = (
        outputs
        if outputs is not None
        else [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])]
    )
    opsets = [helper.make_opsetid("", opset)] + [
        helper.make_opsetid(d, v) for d, v in (extra_opsets or {}).items()
    ]
    ir = max(min(onnx.helper.find_min_ir_version_for(opsets, True), onnx.IR_VERSION), 3)
    if ir < 4:  # before IR 4 every initializer must also be a graph input
        inputs = list(inputs) + [
            helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits or []
        ]
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits or [])
    m = helper.make_model(g, opset_imports=opsets, producer_name="hostile")
    m.ir_version = ir
    return m


# ---------------------------------------------------------------------- unreadable files


def test_missing_empty_and_folder_inputs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, _, err = run_cli(["inspect", tmp_path / "nope.onnx"], capsys)
    assert rc == 2 and "no such file" in err and len(err.strip().splitlines()) == 1
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    inspect_and_optimize(empty, tmp_path, capsys, words=("empty",))
    rc, _, err = run_cli(["optimize", tmp_path, "-o", tmp_path / "o.onnx"], capsys)
    assert rc == 2 and "folder" in err


@pytest.mark.parametrize("cut", [1, 7, 64, 0.25, 0.5, 0.9, -1])
def test_truncated_file(cut: float, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = fixture_path("mobilenet_block.onnx").read_bytes()
    n = (
        int(cut)
        if isinstance(cut, int) and cut > 0
        else (len(data) - 1 if cut == -1 else int(len(data) * cut))
    )
    p = tmp_path / "trunc.onnx"
    p.write_bytes(data[:n])
    inspect_and_optimize(p, tmp_path, capsys)


@pytest.mark.parametrize(
    "name", ["if_model.onnx", "mobilenet_block.onnx", "transformer_block.onnx"]
)
def test_bit_flips(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Random bit flips: exit 2 with one line, or exit 0 when the flip was harmless (the output is
    then a valid model that graphopt verified against the flipped input). Never 1, never a hang."""
    src = fixture_path(name).read_bytes()
    rng = random.Random(f"{name}-flips")
    outcomes = {0: 0, 2: 0}
    for i in range(FLIPS):
        b = bytearray(src)
        for _ in range(rng.choice([1, 1, 2, 8])):
            pos = rng.randrange(len(b))
            b[pos] ^= 1 << rng.randrange(8)
        p = tmp_path / f"flip{i}.onnx"
        p.write_bytes(bytes(b))
        sha = _sha(p)
        out = tmp_path / f"out{i}" / "o.onnx"
        cmds: list[list[str | Path]] = [["inspect", p, "--json"], ["optimize", p, "-o", out]]
        for cmd in cmds:
            rc, _, err = run_cli(cmd, capsys)
            assert rc in (0, 2), f"flip {i}: {cmd[0]} exit {rc}: {err}"
            if rc == 2:
                assert_refused(rc, err, p, sha, out)
                break
            outcomes[0] += cmd[0] == "optimize"
        else:
            assert out.is_file()
            onnx.checker.check_model(str(out))
            assert _sha(p) == sha
        outcomes[2] += rc == 2
    assert outcomes[0] + outcomes[2] == FLIPS


def test_random_bytes_and_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(1)
    p = tmp_path / "noise.onnx"
    p.write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    inspect_and_optimize(p, tmp_path, capsys)
    t = tmp_path / "text.onnx"
    t.write_text('{"this": "is json, not onnx"}\n')
    inspect_and_optimize(t, tmp_path, capsys)


# ---------------------------------------------------------------------- wrong types


def test_other_protobuf_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A serialized TensorProto / GraphProto handed over as a model."""
    t = numpy_helper.from_array(np.ones((3, 3), np.float32), "w")
    inspect_and_optimize(
        save_bytes(t.SerializeToString(), tmp_path / "tensor.onnx"), tmp_path, capsys
    )
    g = small_model().graph
    inspect_and_optimize(
        save_bytes(g.SerializeToString(), tmp_path / "graph.onnx"), tmp_path, capsys
    )


def save_bytes(data: bytes, p: Path) -> Path:
    p.write_bytes(data)
    return p


def test_tensor_data_does_not_match_dims(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    m = small_model()
    m.graph.initializer[0].raw_data = m.graph.initializer[0].raw_data[:-3]
    inspect_and_optimize(save(m, tmp_path / "short.onnx"), tmp_path, capsys, words=("bytes",))
    m = small_model()
    w = m.graph.initializer[0]
    w.ClearField("raw_data")
    inspect_and_optimize(save(m, tmp_path / "nodata.onnx"), tmp_path, capsys)
    m = small_model()
    m.graph.initializer[0].dims[0] = -4
    inspect_and_optimize(save(m, tmp_path / "negdims.onnx"), tmp_path, capsys, words=("negative",))


def test_attribute_of_wrong_type(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    m = small_model()
    conv = m.graph.node[0]
    del conv.attribute[:]
    conv.attribute.append(helper.make_attribute("kernel_shape", [3.0, 3.0]))  # floats, not ints
    inspect_and_optimize(save(m, tmp_path / "attr.onnx"), tmp_path, capsys)


def test_weight_of_wrong_element_type(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    m = small_model()
    m.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.ones((4, 3, 3, 3), np.int64), "w"))
    inspect_and_optimize(save(m, tmp_path / "int_w.onnx"), tmp_path, capsys, inspect_may_work=True)


def test_string_input_into_relu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    m = small_model(
        nodes=[helper.make_node("Relu", ["x"], ["y"])],
        inputs=[helper.make_tensor_value_info("x", TensorProto.STRING, [2])],
    )
    inspect_and_optimize(save(m, tmp_path / "str.onnx"), tmp_path, capsys, inspect_may_work=True)


# ---------------------------------------------------------------------- external data


def _external_model(folder: Path, location: str) -> Path:
    m = small_model()
    w = m.graph.initializer[0]
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", str(4 * 3 * 3 * 3 * 4))):
        e = w.external_data.add()
        e.key, e.value = k, v
    return save(m, folder / "model.onnx")


def test_missing_external_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = fixture_path("external_data.onnx")
    p = tmp_path / "m" / "external_data.onnx"
    p.parent.mkdir()
    shutil.copy(src, p)
    inspect_and_optimize(p, tmp_path, capsys, words=("missing",))
    # present but too short
    data = fixture_path("external_data.onnx.data").read_bytes()
    (p.parent / "external_data.onnx.data").write_bytes(data[: len(data) // 2])
    inspect_and_optimize(p, tmp_path, capsys, words=("too short",))


@pytest.mark.parametrize("where", ["parent", "absolute", "symlink", "deep"])
def test_external_data_outside_model_folder(
    where: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A crafted model must not make graphopt read a file outside the model's folder."""
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\x01" * 4096)
    folder = tmp_path / "model"
    folder.mkdir()
    if where == "parent":
        loc = "../secret.bin"
    elif where == "absolute":
        loc = str(secret)
    elif where == "deep":
        loc = "sub/../../secret.bin"
        (folder / "sub").mkdir()
    else:
        (folder / "link.bin").symlink_to(secret)
        loc = "link.bin"
    p = _external_model(folder, loc)
    inspect_and_optimize(p, tmp_path, capsys, words=("refusing",))


# ---------------------------------------------------------------------- graph structure


def _vi(name: str, shape: list[int] | None = None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape or [1, 4])


def test_cycle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    m = small_model(
        nodes=[
            helper.make_node("Add", ["x", "b"], ["a"], name="A"),
            helper.make_node("Relu", ["a"], ["b"], name="B"),
            helper.make_node("Relu", ["a"], ["y"], name="C"),
        ],
        inputs=[_vi("x")],
        outputs=[_vi("y")],
    )
    inspect_and_optimize(save(m, tmp_path / "cycle.onnx"), tmp_path, capsys)


def test_dangling_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    m = small_model(
        nodes=[helper.make_node("Add", ["x", "nowhere"], ["y"])],
        inputs=[_vi("x")],
        outputs=[_vi("y")],
    )
    inspect_and_optimize(save(m, tmp_path / "dangling.onnx"), tmp_path, capsys)
    m = small_model(
        nodes=[helper.make_node("Relu", ["x"], ["r"])],
        inputs=[_vi("x")],
        outputs=[_vi("not_produced")],
    )
    inspect_and_optimize(save(m, tmp_path / "dangling_out.onnx"), tmp_path, capsys)


def test_duplicate_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # two nodes writing one tensor: not SSA
    m = small_model(
        nodes=[helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Sigmoid", ["x"], ["y"])],
        inputs=[_vi("x")],
        outputs=[_vi("y")],
    )
    inspect_and_optimize(save(m, tmp_path / "dup_out.onnx"), tmp_path, capsys)
    # two graph inputs with one name
    m = small_model(
        nodes=[helper.make_node("Relu", ["x"], ["y"])],
        inputs=[_vi("x"), _vi("x")],
        outputs=[_vi("y")],
    )
    inspect_and_optimize(save(m, tmp_path / "dup_in.onnx"), tmp_path, capsys)
    # two initializers with one name
    m = small_model()
    m.graph.initializer.append(m.graph.initializer[0])
    inspect_and_optimize(save(m, tmp_path / "dup_init.onnx"), tmp_path, capsys)


def test_duplicate_node_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """onnx.checker allows repeated node names and onnxruntime refuses them: graphopt renames the
    duplicates on load, so the model inspects and optimizes, and the output runs."""
    m = small_model(
        nodes=[
            helper.make_node("Relu", ["x"], ["r"], name="n"),
            helper.make_node("Sigmoid", ["r"], ["y"], name="n"),
        ],
        inputs=[_vi("x")],
        outputs=[_vi("y")],
    )
    path = save(m, tmp_path / "dup_names.onnx")
    sha = _sha(path)
    rc, _, err = run_cli(["inspect", path, "--json"], capsys)
    assert rc == 0, err
    out = tmp_path / "out" / "o.onnx"
    rc, _, err = run_cli(["optimize", path, "-o", out, "--passes", "toposort"], capsys)
    assert rc == 0, err
    names = [n.name for n in onnx.load(str(out)).graph.node]
    assert len(names) == len(set(names)) == 2
    assert _sha(path) == sha


def test_unknown_domain(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    node = helper.make_node("Frobnicate", ["x"], ["y"], domain="com.example.unknown")
    # no opset import for the domain: invalid
    m = small_model(nodes=[node], inputs=[_vi("x")], outputs=[_vi("y")])
    del m.opset_import[1:]
    inspect_and_optimize(save(m, tmp_path / "no_import.onnx"), tmp_path, capsys)
    # declared, but no runtime implements it: inspect works, optimize cannot verify -> refused
    m = small_model(
        nodes=[node], inputs=[_vi("x")], outputs=[_vi("y")], extra_opsets={"com.example.unknown": 1}
    )
    inspect_and_optimize(
        save(m, tmp_path / "unknown.onnx"),
        tmp_path,
        capsys,
        words=("onnxruntime",),
        inspect_may_work=True,
    )


def test_unknown_operator_in_default_domain(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    m = small_model(
        nodes=[helper.make_node("NoSuchOp", ["x"], ["y"])], inputs=[_vi("x")], outputs=[_vi("y")]
    )
    inspect_and_optimize(save(m, tmp_path / "noop.onnx"), tmp_path, capsys)


# ---------------------------------------------------------------------- opsets


def _ort_max_opset() -> int:
    """The newest default-domain opset this onnxruntime loads (probing with a Relu model)."""
    best = 7
    for v in range(7, onnx.defs.onnx_opset_version() + 1):
        m = small_model(
            v, nodes=[helper.make_node("Relu", ["x"], ["y"])], inputs=[_vi("x")], outputs=[_vi("y")]
        )
        try:
            ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
            best = v
        except Exception:  # noqa: BLE001
            break
    return best


ORT_MAX_OPSET = _ort_max_opset()


def _opset_model(opset: int) -> onnx.ModelProto:
    """Conv -> BatchNormalization -> Relu -> MaxPool -> Flatten -> Gemm: valid at opset >= 7."""
    rng = np.random.default_rng(opset)
    f32 = np.float32
    inits = {
        "w": rng.standard_normal((4, 3, 3, 3)).astype(f32),
        "b": rng.standard_normal(4).astype(f32),
        "g": rng.uniform(0.5, 2, 4).astype(f32),
        "be": rng.standard_normal(4).astype(f32),
        "mu": rng.standard_normal(4).astype(f32),
        "var": rng.uniform(0.5, 2, 4).astype(f32),
        "fw": rng.standard_normal((5, 36)).astype(f32),
        "fb": rng.standard_normal(5).astype(f32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[3, 3]),
        helper.make_node("BatchNormalization", ["c", "g", "be", "mu", "var"], ["bn"]),
        helper.make_node("Relu", ["bn"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "fw", "fb"], ["y"], transB=1),
    ]
    return small_model(
        opset,
        nodes=nodes,
        inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        outputs=[helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])],
        inits=[numpy_helper.from_array(v, k) for k, v in inits.items()],
    )


@pytest.mark.parametrize("opset", list(range(7, onnx.defs.onnx_opset_version() + 1)))
def test_every_opset(opset: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Opsets onnxruntime runs load, inspect and optimize (verified); newer ones are refused."""
    p = save(_opset_model(opset), tmp_path / f"opset{opset}.onnx", check=True)
    sha = _sha(p)
    out = tmp_path / "out" / "o.onnx"
    rc, _, err = run_cli(["inspect", p, "--json"], capsys)
    assert rc == 0, err
    rc, stdout, err = run_cli(["optimize", p, "-o", out, "--json"], capsys)
    if opset <= ORT_MAX_OPSET:
        assert rc == 0, err
        proto = onnx.load(str(out))
        assert {i.domain: i.version for i in proto.opset_import}[""] == opset
        onnx.checker.check_model(proto)
        assert _sha(p) == sha
    else:
        assert_refused(rc, err, p, sha, out, words=("onnxruntime",))


# ---------------------------------------------------------------------- absurd shapes


def _relu_model(shape: list[int | str]) -> onnx.ModelProto:
    return small_model(
        nodes=[helper.make_node("Relu", ["x"], ["y"])],
        inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        outputs=[helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
    )


def test_zero_dim_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = save(_relu_model([1, 3, 0, 8]), tmp_path / "zero.onnx")
    rc, _, err = run_cli(["inspect", p, "--json"], capsys)
    assert rc == 0, err
    out = tmp_path / "o.onnx"
    rc, _, err = run_cli(["optimize", p, "-o", out], capsys)
    assert rc in (0, 2), err
    if rc == 2:
        assert_refused(rc, err, p, _sha(p), out)


def test_huge_dims(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Dims over 2^31: inspect reports them; optimize and plan refuse to run the model (nothing
    allocated), naming the tensor, its size and the limit it passes."""
    p = save(_relu_model([1, 3, 2**33, 2**31 + 5]), tmp_path / "huge.onnx")
    rc, out, err = run_cli(["inspect", p, "--json"], capsys)
    assert rc in (0, 2), err
    if rc == 2:
        assert_refused(rc, err, p, _sha(p))
    o = tmp_path / "o.onnx"
    words = ("tensor 'y'", "192 EiB", "GRAPHOPT_MAX_TENSOR_BYTES")
    rc, _, err = run_cli(["optimize", p, "-o", o], capsys, seconds=60)
    assert_refused(rc, err, p, _sha(p), o, words=words)
    rc, _, err = run_cli(["plan", p, "-o", o], capsys, seconds=60)
    assert_refused(rc, err, p, _sha(p), o, words=words)


def test_negative_dims(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    m = _relu_model([1, 3, 8, 8])
    m.graph.input[0].type.tensor_type.shape.dim[2].dim_value = -8
    inspect_and_optimize(save(m, tmp_path / "neg.onnx"), tmp_path, capsys, words=("negative",))


@pytest.mark.parametrize(
    "spec", ["x:0x3x8x8", "x:1x3x8", "x:1x3x99999999999x8", "x:-1x3x8x8", "x:abc", "nosuch:1x3x8x8"]
)
def test_bad_input_shape_option(
    spec: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    p = save(_relu_model(["N", 3, 8, 8]), tmp_path / "dyn.onnx")
    sha = _sha(p)
    out = tmp_path / "o.onnx"
    rc, _, err = run_cli(["optimize", p, "-o", out, "--input-shape", spec], capsys)
    assert_refused(rc, err, p, sha, out)


# ---------------------------------------------------------------------- outputs


def test_unwritable_or_bad_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "cnn.onnx"
    shutil.copy(fixture_path("cnn.onnx"), src)
    sha = _sha(src)
    rc, _, err = run_cli(["optimize", src, "-o", src], capsys)
    assert_refused(rc, err, src, sha)
    rc, _, err = run_cli(["optimize", src, "-o", tmp_path], capsys)
    assert_refused(rc, err, src, sha)
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    rc, _, err = run_cli(["optimize", src, "-o", blocker / "o.onnx"], capsys)
    assert_refused(rc, err, src, sha)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):  # running as root: permissions do not apply
            pytest.skip("the test runs as root; a read-only folder is writable")
        rc, _, err = run_cli(["optimize", src, "-o", ro / "o.onnx"], capsys)
        assert_refused(rc, err, src, sha, ro / "o.onnx")
    finally:
        ro.chmod(0o700)


def test_output_would_overwrite_input_external_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The input's weights live in ``o.onnx.data``: writing ``o.onnx`` beside it would replace
    them (and break the input model), so it is refused."""
    m = onnx.load(str(fixture_path("external_data.onnx")), load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "o.onnx.data"
    src = save(m, tmp_path / "in.onnx")
    shutil.copy(fixture_path("external_data.onnx.data"), tmp_path / "o.onnx.data")
    shas = {p.name: _sha(p) for p in tmp_path.iterdir()}
    rc, _, err = run_cli(["optimize", src, "-o", tmp_path / "o.onnx"], capsys)
    assert_refused(rc, err, src, _sha(src), words=("external data",))
    assert not (tmp_path / "o.onnx").exists()
    assert not list(tmp_path.glob(".graphopt-*"))
    assert {p.name: _sha(p) for p in tmp_path.iterdir()} == shas


# ---------------------------------------------------------------------- subprocess: CLI end to end


def _graphopt_cmd() -> list[str]:
    if GRAPHOPT.is_file():
        return [str(GRAPHOPT)]
    return [sys.executable, "-m", "graphopt.cli"]


def test_subprocess_refuses_corrupt_file_with_one_line(tmp_path: Path) -> None:
    p = tmp_path / "bad.onnx"
    p.write_bytes(fixture_path("cnn.onnx").read_bytes()[:500])
    sha = _sha(p)
    out = tmp_path / "o.onnx"
    r = subprocess.run(
        _graphopt_cmd() + ["optimize", str(p), "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert_clean(p, sha, out)


def _big_model(folder: Path, mib: int = 96) -> Path:
    """A MatMul chain with ``mib`` MiB of float32 weights (zeros: a sparse external data file)."""
    layers = 4
    n = int(np.sqrt(mib * 2**20 / 4 / layers))
    data = folder / "big.onnx.data"
    with open(data, "wb") as f:
        f.truncate(layers * 4 * n * n)
    inits = []
    for i in range(layers):
        t = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=[n, n])
        t.data_location = TensorProto.EXTERNAL
        for k, v in (
            ("location", data.name),
            ("offset", str(i * 4 * n * n)),
            ("length", str(4 * n * n)),
        ):
            e = t.external_data.add()
            e.key, e.value = k, v
        inits.append(t)
    nodes = [
        helper.make_node(
            "MatMul",
            ["x" if i == 0 else f"h{i - 1}", f"w{i}"],
            [f"h{i}" if i < layers - 1 else "y"],
        )
        for i in range(layers)
    ]
    m = small_model(
        nodes=nodes,
        inputs=[helper.make_tensor_value_info("x", 1, [1, n])],
        outputs=[helper.make_tensor_value_info("y", 1, [1, n])],
        inits=inits,
    )
    return save(m, folder / "big.onnx")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_mid_save_leaves_no_output(sig: int, tmp_path: Path) -> None:
    """Kill ``graphopt optimize`` while it writes its output: no partial output may exist. With
    SIGINT/SIGTERM the run also removes its temporary folder; SIGKILL cannot be caught, so only its
    hidden ``.graphopt-*`` folder may remain (never the output name), and the next write into that
    folder removes it."""
    src = tmp_path / "in"
    src.mkdir()
    model = _big_model(src)
    shas = {p.name: _sha(p) for p in src.iterdir()}
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "big.opt.onnx"
    proc = subprocess.Popen(
        _graphopt_cmd()
        + ["optimize", str(model), "-o", str(out), "--no-verify", "--passes", "eliminate-dead"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    killed = False
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            tmp = list(out_dir.glob(".graphopt-*"))
            if tmp and any(f.stat().st_size > 0 for f in tmp[0].iterdir()):
                proc.send_signal(sig)
                killed = True
                break
            time.sleep(0.002)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if not killed:
        pytest.skip("the run finished before it could be interrupted mid-save")
    assert proc.returncode != 0, "the run was interrupted but exited 0"
    assert not out.exists(), "a partial output was left under the output name"
    assert not list(out_dir.glob(out.name + "*.data"))
    if sig != signal.SIGKILL:
        assert not list(out_dir.glob(".graphopt-*")), "temporary folder left behind"
        # one line for the interruption; --no-verify's warning may come before it, on one line
        lines = err.strip().splitlines()
        assert "Traceback" not in err and all(ln.startswith("graphopt: ") for ln in lines), err
        other = [ln for ln in lines if not ln.startswith("graphopt: warning: ")]
        assert len(other) == 1 and "interrupted" in other[0], err
    assert {p.name: _sha(p) for p in src.iterdir()} == shas
    if sig == signal.SIGKILL:  # what SIGKILL left is removed by the next write into the folder
        from graphopt.core.loader import load
        from graphopt.core.saver import save

        save(load(fixture_path("cnn.onnx")), out)
        assert not list(out_dir.glob(".graphopt-*")), "a killed run's temporary was not removed"
        assert sorted(p.name for p in out_dir.iterdir()) == [out.name]
