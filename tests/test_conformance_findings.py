"""Regression tests for what ONNX's conformance suite found in graphopt (issue 14), one per
finding: verification feeds (generated ones valid for the model, given ones used everywhere),
tolerances by output dtype, outputs that are not float tensors, ops the installed onnxruntime
cannot run, IR < 4 initializers, observed shapes and untaken If branches, memory passes inside
optimize.

Each model is built here with ``onnx.helper``; the tests that need a case of the suite itself are
marked ``conformance`` (they read the cache, see :mod:`graphopt.conformance`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from graphopt.core.errors import FeedError
from graphopt.core.feeds import feed_list, input_roles, random_feeds
from graphopt.core.kernels import kernel_registry, ort_runs
from graphopt.core.loader import load
from graphopt.core.model import Model
from graphopt.core.session import make_session
from graphopt.core.verify import compare_values, dtype_tolerance, verify
from graphopt.jobs.optimize import optimize


def _model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    inits: list[onnx.TensorProto] = (),  # type: ignore[assignment]
    opset: int = 17,
    ir: int = 8,
) -> Model:
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir)
    return Model.from_onnx(proto)


def _reshape_model() -> Model:
    """y = Reshape(x + 1, shape): ``shape`` is a graph input that gives sizes."""
    return _model(
        [
            helper.make_node("Add", ["x", "one"], ["a"]),
            helper.make_node("Reshape", ["a", "shape"], ["y"]),
        ],
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6]),
            helper.make_tensor_value_info("shape", TensorProto.INT64, [2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["a", "b"])],
        [helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])],
    )


def _feeds() -> dict[str, np.ndarray]:
    return {
        "x": np.arange(12, dtype=np.float32).reshape(2, 6),
        "shape": np.array([3, 4], dtype=np.int64),
    }


# ------------------------------------------------------------------ verification feeds


def test_random_feeds_refuse_a_shape_input_without_default() -> None:
    m = _reshape_model()
    assert input_roles(m)["shape"][0] == "shape"
    with pytest.raises(FeedError, match="--feeds"):
        random_feeds(m)
    with pytest.raises(FeedError, match="--feeds"):  # the job says it needs --feeds: exit 2
        optimize(m)


def test_random_feeds_follow_casts_and_concat_to_the_shape_input() -> None:
    m = _model(
        [
            helper.make_node("Cast", ["n"], ["n64"], to=TensorProto.INT64),
            helper.make_node("Concat", ["n64", "four"], ["shape"], axis=0),
            helper.make_node("Reshape", ["x", "shape"], ["y"]),
        ],
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [12]),
            helper.make_tensor_value_info("n", TensorProto.INT32, [1]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [helper.make_tensor("four", TensorProto.INT64, [1], [4])],
    )
    assert input_roles(m)["n"][0] == "shape"


def test_random_feeds_divisors_and_ir3_defaults() -> None:
    m = _model(
        [
            helper.make_node("Div", ["a", "b"], ["q"]),
            helper.make_node("Add", ["x", "w"], ["y"]),
        ],
        [
            helper.make_tensor_value_info("a", TensorProto.INT64, [3]),
            helper.make_tensor_value_info("b", TensorProto.INT64, [3]),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [3]),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, [3]),
        ],
        [
            helper.make_tensor_value_info("q", TensorProto.INT64, [3]),
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [3]),
        ],
        [helper.make_tensor("w", TensorProto.FLOAT, [3], [1.0, 2.0, 3.0])],
        opset=9,
        ir=3,
    )
    f = random_feeds(m)
    np.testing.assert_array_equal(f["b"], np.ones(3, np.int64))  # no integer division by zero
    np.testing.assert_array_equal(f["w"], [1.0, 2.0, 3.0])  # the IR 3 default, not noise
    make_session(m).run(None, {k: v for k, v in f.items() if k != "w"})


def test_random_feeds_dropout_ratio_is_a_probability() -> None:
    m = _model(
        [helper.make_node("Dropout", ["x", "r"], ["y"])],
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [3]),
            helper.make_tensor_value_info("r", TensorProto.FLOAT, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
        opset=13,
    )
    f = random_feeds(m)
    assert float(f["r"]) == 0.5  # not N(0, 1), which onnxruntime rejects
    assert optimize(m).verify.ok  # type: ignore[union-attr]


def test_optimize_verifies_on_given_feeds_in_every_form(tmp_path: Path) -> None:
    m = _reshape_model()
    feeds = _feeds()
    for given in (feeds, [feeds, feeds]):
        res = optimize(m, feeds=given)
        assert res.verify is not None and res.verify.ok
        assert res.verify.samples == (1 if isinstance(given, dict) else 2)
    path = tmp_path / "feeds.npz"
    np.savez(path, **feeds)  # type: ignore[arg-type]
    assert optimize(m, feeds=path).verify.ok  # type: ignore[union-attr]
    relu = _model(
        [helper.make_node("Relu", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])],
    )
    folder = tmp_path / "calib"  # the --calib format: samples on axis 0, batched
    folder.mkdir()
    np.savez(folder / "a.npz", x=np.ones((20, 6), np.float32))
    got = feed_list(folder, relu)
    assert got is not None and [f["x"].shape for f in got] == [(8, 6), (8, 6), (4, 6)]
    assert optimize(relu, feeds=folder).verify.samples == 3  # type: ignore[union-attr]
    with pytest.raises(FeedError, match="unknown model input"):
        optimize(m, feeds={**feeds, "nope": feeds["x"]})


def test_feed_files_are_never_batched_together(tmp_path: Path) -> None:
    """bench/corpus.py's layout (one .npz per feed, each exactly the model's inputs) with
    --input-shape fixing the batch to 1: every file is its own feed (found on ppocrv4-det,
    where four images were batched into one (4, 3, H, W) feed for a [1, 3, H, W] model)."""
    relu = _model(
        [helper.make_node("Relu", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])],
    )
    folder = tmp_path / "feeds"
    folder.mkdir()
    for i in range(4):
        np.savez(folder / f"{i:03d}.npz", x=np.full((1, 6), i, np.float32))
    got = feed_list(folder, relu)
    assert got is not None and [float(f["x"][0, 0]) for f in got] == [0, 1, 2, 3]
    res = optimize(relu, feeds=folder, input_shapes={"x": [1, 6]})
    assert res.verify is not None and res.verify.samples == 4
    big = tmp_path / "big.npz"  # 20 samples, batch fixed to 1: one sample per feed
    np.savez(big, x=np.ones((20, 6), np.float32))
    one = feed_list(big, relu, input_shapes={"x": [1, 6]})
    assert one is not None and {f["x"].shape for f in one} == {(1, 6)}
    assert optimize(relu, feeds=big, input_shapes={"x": [1, 6]}).verify.ok  # type: ignore[union-attr]


def test_input_model_failing_on_the_feeds_is_a_feed_error() -> None:
    """onnxruntime rejecting the original on the inputs is the user's to fix: exit 2, not 1."""
    m = _reshape_model()
    bad = {**_feeds(), "shape": np.array([5, 5], dtype=np.int64)}
    with pytest.raises(FeedError, match="does not run on the given inputs.*--feeds"):
        optimize(m, feeds=bad)


def test_sequence_input_without_feeds_asks_for_feeds() -> None:
    seq = helper.make_tensor_sequence_value_info("s", TensorProto.FLOAT, None)
    m = _model(
        [helper.make_node("SequenceLength", ["s"], ["n"])],
        [seq],
        [helper.make_tensor_value_info("n", TensorProto.INT64, [])],
    )
    with pytest.raises(FeedError, match="--feeds"):
        random_feeds(m)
    s = [np.zeros(2, np.float32), np.ones(3, np.float32)]
    res = optimize(m, feeds={"s": s})  # sequences pass through feeds and verification
    assert res.verify is not None and res.verify.ok


def test_memory_passes_inside_optimize_use_the_job_feeds() -> None:
    m = _reshape_model()
    for name in ("plan-memory", "reorder-memory"):
        res = optimize(m, [name], feeds=_feeds())
        assert res.verify is not None and res.verify.ok


# ------------------------------------------------------------------ tolerances and outputs


def test_fp16_output_one_ulp_off_passes_fp32_does_not() -> None:
    def model(dtype: int, delta: float) -> Model:
        np_dt = helper.tensor_dtype_to_np_dtype(dtype)
        return _model(
            [helper.make_node("Add", ["x", "d"], ["y"])],
            [helper.make_tensor_value_info("x", dtype, [64])],
            [helper.make_tensor_value_info("y", dtype, [64])],
            [onnx.numpy_helper.from_array(np.array(delta, dtype=np_dt), "d")],
        )

    x16 = {"x": np.linspace(1.0, 1.5, 64).astype(np.float16)}
    ulp = float(np.finfo(np.float16).eps)  # 0.000977: the error the issue saw
    assert verify(model(TensorProto.FLOAT16, 0.0), model(TensorProto.FLOAT16, ulp), x16).ok
    x32 = {"x": np.linspace(1.0, 1.5, 64).astype(np.float32)}
    assert not verify(model(TensorProto.FLOAT, 0.0), model(TensorProto.FLOAT, ulp), x32).ok
    assert dtype_tolerance(np.dtype(np.float32), 1e-4, 1e-5) == (1e-4, 1e-5)
    bf16 = helper.tensor_dtype_to_np_dtype(TensorProto.BFLOAT16)
    assert dtype_tolerance(np.dtype(bf16), 1e-4, 1e-5)[0] == pytest.approx(4 * 2**-7)


def test_string_and_sequence_outputs_are_compared_exactly() -> None:
    s = np.array(["monday", "tuesday"], dtype=object)
    assert compare_values("y", [s], [s.copy()], 1e-4, 1e-5).ok
    assert not compare_values("y", [s], [np.array(["monday", "x"], dtype=object)], 1e-4, 1e-5).ok
    a = np.array([1.0, 2.0], np.float32)
    assert compare_values("y", [[a, a]], [[a, a + 1e-7]], 1e-4, 1e-5).ok
    assert not compare_values("y", [[a, a]], [[a]], 1e-4, 1e-5).ok
    assert not compare_values("y", [None], [[a]], 1e-4, 1e-5).ok
    assert compare_values("y", [{1: a}], [{1: a}], 1e-4, 1e-5).ok


def test_string_model_verifies() -> None:
    m = _model(
        [helper.make_node("StringConcat", ["x", "x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.STRING, [2])],
        [helper.make_tensor_value_info("y", TensorProto.STRING, None)],
        opset=20,
    )
    res = optimize(m, feeds={"x": np.array(["monday", "tuesday"], dtype=object)})
    assert res.verify is not None and res.verify.ok


# ------------------------------------------------------------------ ops onnxruntime runs


def test_kernel_registry_answers_what_onnxruntime_runs() -> None:
    assert ("", "Conv") in kernel_registry()
    assert ort_runs("Relu", 13) and ort_runs("HardSwish", 14)  # HardSwish: a function op
    assert not ort_runs("NoSuchOp", 13)
    # Swish is ONNX opset 24; onnxruntime 1.32 loads it at 24 but has no kernel above
    assert not ort_runs("Swish", 27)


@pytest.mark.parametrize("opset", [24, 27])
def test_swish_emitted_only_where_onnxruntime_runs_it(opset: int) -> None:
    m = _model(
        [helper.make_node("Sigmoid", ["x"], ["s"]), helper.make_node("Mul", ["x", "s"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
        opset=opset,
    )
    res = optimize(m, ["recognize-activations"], feeds={"x": np.ones((2, 8), np.float32)})
    ops = res.model.op_histogram()
    if ort_runs("Swish", opset):
        assert ops == {"Swish": 1}
    else:
        assert ops == {"Sigmoid": 1, "Mul": 1}  # kept: graphopt never writes what cannot run
    assert res.verify is not None and res.verify.ok


# ------------------------------------------------------------------ IR < 4


def test_ir3_constants_made_by_folding_are_listed_as_inputs(tmp_path: Path) -> None:
    m = _model(
        [
            helper.make_node("Add", ["a", "b"], ["c"]),
            helper.make_node("Mul", ["x", "c"], ["y"]),
        ],
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [3]),
            helper.make_tensor_value_info("a", TensorProto.FLOAT, [3]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, [3]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
        [
            helper.make_tensor("a", TensorProto.FLOAT, [3], [1.0, 2.0, 3.0]),
            helper.make_tensor("b", TensorProto.FLOAT, [3], [1.0, 1.0, 1.0]),
        ],
        opset=9,
        ir=3,
    )
    out = tmp_path / "o.onnx"
    res = optimize(m, feeds={"x": np.ones(3, np.float32)}, output=out)
    proto = res.model.to_onnx()
    inputs = {vi.name for vi in proto.graph.input}
    assert all(t.name in inputs for t in proto.graph.initializer)
    onnx.checker.check_model(onnx.load(str(out)))
    assert make_session(out).run(None, {"x": np.ones(3, np.float32)})[0].tolist() == [2, 3, 4]


# ------------------------------------------------------------------ the suite's own cases


@pytest.mark.conformance
@pytest.mark.parametrize(
    "case_id",
    [
        "node/test_affine_grid_3d_expanded",  # observed shapes broke the If branch not taken
        "node/test_causal_conv_with_state_silu_expanded",  # Swish at opset 27
        "pytorch-operator/test_operator_repeat",  # IR 3: folded constant not a graph input
        "node/test_string_concat_utf8",  # string outputs
        "node/test_split_to_sequence_1",  # sequence output
        "node/test_cast_FLOAT_to_BFLOAT16",  # bfloat16 output
    ],
)
def test_conformance_case_regression(case_id: str) -> None:
    from graphopt import conformance

    case = {c.id: c for c in conformance.cases()}[case_id]
    if conformance.ort_reproduces(case) is not True:
        pytest.skip(f"onnxruntime does not reproduce {case_id} here")
    res = conformance.run_case(case)
    assert res.status == "ok", res.detail


def test_ai_onnx_ml_model_json_is_json(tmp_path: Path) -> None:
    """``--json`` on an ai.onnx.ml model prints one JSON object and nothing else."""
    node = helper.make_node(
        "LabelEncoder",
        ["x"],
        ["y"],
        domain="ai.onnx.ml",
        keys_strings=["a", "b"],
        values_int64s=[1, 2],
        default_int64=-1,
    )
    g = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.STRING, [2])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, [2])],
    )
    proto = helper.make_model(
        g,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 2)],
        ir_version=8,
    )
    src = tmp_path / "le.onnx"
    onnx.save(proto, str(src))
    out = subprocess.run(
        [sys.executable, "-m", "graphopt.cli", "optimize", str(src), "-o", str(tmp_path / "o.onnx")]
        + ["--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert d["nodes_after"] == 1 and d["verify"]["y"]["max_abs_err"] == 0.0
    assert load(tmp_path / "o.onnx").op_histogram() == {"ai.onnx.ml.LabelEncoder": 1}


# ------------------------------------------------------------------ --feeds on every command


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "graphopt.cli", *args], capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize("command", ["optimize", "fp16", "plan"])
def test_verifying_commands_take_feeds(command: str, tmp_path: Path) -> None:
    """A model with a shape input: without --feeds exit 2 with one line naming --feeds (never
    an internal error); with them exit 0."""
    src = tmp_path / "m.onnx"
    onnx.save(_reshape_model().to_onnx(), str(src))
    feeds = tmp_path / "feeds.npz"
    np.savez(feeds, **_feeds())  # type: ignore[arg-type]
    out = str(tmp_path / "o.onnx")
    extra = ["--min-sqnr", "20"] if command == "fp16" else []
    bad = _cli(command, str(src), "-o", out, *extra)
    assert bad.returncode == 2, bad.stderr
    assert "--feeds" in bad.stderr and "internal error" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("graphopt: error:")
    ok = _cli(command, str(src), "-o", out, "--feeds", str(feeds), *extra)
    assert ok.returncode == 0, ok.stderr
    assert Path(out).is_file()


def test_prune_judges_on_given_feeds(tmp_path: Path) -> None:
    from graphopt.fixtures import fixture_path
    from graphopt.jobs.prune import prune

    src = fixture_path("cnn.onnx")
    m = load(src)
    feeds = random_feeds(m, seed=7)
    res = prune(src, 0.25, feeds=[feeds, random_feeds(m, seed=8)], min_sqnr=0, recover=False)
    assert res.verify is not None and res.verify.samples == 2
