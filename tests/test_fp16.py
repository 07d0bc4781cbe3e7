"""fp16 conversion: every fixture and real model converts, loads in onnxruntime, has no NaN and
keeps >= 40 dB SQNR on its outputs; float32 is kept where half breaks numerics; negatives stay
unchanged."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from conftest import real_or_skip
from helpers_graphs import make_model, vi
from onnx import TensorProto, helper

from graphopt.algorithms.fp16 import ORT_CPU_FP16, convert_float16, probe_node
from graphopt.cli import main
from graphopt.core.feeds import random_feeds
from graphopt.core.loader import load
from graphopt.core.model import Model
from graphopt.core.session import run_model
from graphopt.core.shapes import prepare
from graphopt.fixtures import FIXTURES, fixture_path, real_model_feeds
from graphopt.passes.fp16 import Fp16Pass
from graphopt.testing import check_pass

F16 = np.dtype(np.float16)


def _dtypes(model: Model) -> dict[str, np.dtype]:
    out = {}
    for g in model.walk_graphs():
        for name, t in g.tensors().items():
            if t.dtype is not None:
                out[name] = np.dtype(t.dtype)
    return out


def _half_count(model: Model) -> int:
    return sum(1 for d in _dtypes(model).values() if d == F16)


def _io_float32(model: Model) -> None:
    for t in list(model.graph.inputs) + list(model.graph.outputs):
        assert t.dtype is None or np.dtype(t.dtype) != F16, f"{t.name} became float16"


def _no_nan(model: Model, feeds: dict[str, np.ndarray]) -> None:
    for name, v in run_model(model, feeds).items():
        if v.dtype.kind == "f":
            assert np.isfinite(v).all(), f"output {name} has NaN/inf"


def _structure(model: Model) -> None:
    assert _half_count(model) > 0
    _io_float32(model)


@pytest.mark.parametrize("name", FIXTURES)
def test_fp16_fixtures(name: str) -> None:
    model = prepare(load(fixture_path(name)))
    res, report = check_pass(model, "fp16", min_sqnr_db=40, structure=_structure)
    assert res.stats["nodes_fp16"] > 0
    assert all(o.sqnr_db >= 40 for o in report.outputs)
    _no_nan(res.model, random_feeds(model, seed=3))


def _det_page_feed() -> dict[str, np.ndarray] | None:
    """A rendered text page: det on uniform noise returns probabilities ~1e-4 everywhere, whose
    SQNR measures float16's subnormal range rather than the model's fidelity."""
    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root))
    try:
        from bench.ocr_data import det_preprocess, pages

        img, _ = pages(1)[0]
        return {"x": det_preprocess(img, 320)}
    except Exception:  # noqa: BLE001 - no font: fall back to noise and its weaker bound
        return None
    finally:
        sys.path.remove(str(root))


@pytest.mark.real
@pytest.mark.parametrize("name", ["det", "rec", "cls", "silero"])
def test_fp16_real_models(name: str) -> None:
    path, shapes = real_or_skip(name)
    feeds = real_model_feeds(name)
    if name == "det":
        feeds = _det_page_feed() or pytest.skip("no font to render a text page for det")
    model = prepare(load(path), shapes, feeds=feeds)
    res, report = check_pass(model, "fp16", min_sqnr_db=40, feeds=feeds, structure=_structure)
    _no_nan(res.model, feeds)
    assert res.stats["nodes_fp16"] > 100
    if name in ("rec", "silero"):  # normalizations (ReduceMean/Pow/Sqrt chains) stay float32
        assert res.stats["kept_fp32"]


def test_det_batchnorm_variance_beyond_half_range_kept() -> None:
    path, shapes = real_or_skip("det")
    model = prepare(load(path), shapes)
    res = Fp16Pass()(model.clone())
    assert res.stats["values_clipped"] == 0
    bn = [n for n in res.model.graph.nodes if n.op == "BatchNormalization"]
    kept = [n for n in bn if n.name in res.stats["kept_fp32"]]
    assert kept and all(np.dtype(n.inputs[0].dtype) == np.float32 for n in kept)


# ------------------------------------------------------------------ float32 kept where needed


def _norm_model() -> Model:
    """LayerNorm written out, Sub(x, mean) / Sqrt(ReduceMean(Pow(d, 2)) + 1e-12), then MatMul."""
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["mu"], axes=[-1]),
        helper.make_node("Sub", ["x", "mu"], ["d"]),
        helper.make_node("Pow", ["d", "two"], ["d2"]),
        helper.make_node("ReduceMean", ["d2"], ["var"], axes=[-1]),
        helper.make_node("Add", ["var", "eps"], ["ve"]),
        helper.make_node("Sqrt", ["ve"], ["std"]),
        helper.make_node("Div", ["d", "std"], ["n"]),
        helper.make_node("MatMul", ["n", "w"], ["y"]),
    ]
    rng = np.random.default_rng(0)
    return make_model(
        nodes,
        [vi("x", [2, 16])],
        [vi("y", [2, 8])],
        {
            "two": np.array(2, np.float32),
            "eps": np.array(1e-12, np.float32),
            "w": rng.standard_normal((16, 8)).astype(np.float32),
        },
        opset=17,
    )


def test_norm_chain_stays_float32() -> None:
    model = prepare(_norm_model())

    def structure(m: Model) -> None:
        by_op = {n.op: n for n in m.graph.nodes}
        for op in ("Pow", "Add", "Sqrt", "Div"):
            assert np.dtype(by_op[op].outputs[0].dtype) == np.float32, op
        assert np.dtype(by_op["MatMul"].outputs[0].dtype) == F16
        assert np.dtype(by_op["Sub"].outputs[0].dtype) == F16
        eps = [
            t for t in m.graph.tensors().values() if isinstance(t, gs.Constant) and t.name == "eps"
        ]
        assert eps and eps[0].values.dtype == np.float32 and float(eps[0].values) > 0

    res, _ = check_pass(model, "fp16", min_sqnr_db=40, structure=structure)
    kept_ops = {n.op for n in model.graph.nodes if n.name in res.stats["kept_fp32"]}
    assert {"ReduceMean", "Pow", "Add", "Sqrt", "Div"} <= kept_ops


def test_resize_scales_stay_float32() -> None:
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Resize", ["c", "", "scales"], ["y"], mode="nearest"),
    ]
    model = prepare(
        make_model(
            nodes,
            [vi("x", [1, 2, 4, 4])],
            [vi("y", [1, 3, 8, 8])],
            {
                "w": np.random.default_rng(1).standard_normal((3, 2, 3, 3)).astype(np.float32),
                "scales": np.array([1, 1, 2, 2], np.float32),
            },
        )
    )

    def structure(m: Model) -> None:
        rs = next(n for n in m.graph.nodes if n.op == "Resize")
        assert np.dtype(rs.inputs[0].dtype) == F16
        assert rs.inputs[2].values.dtype == np.float32

    check_pass(model, "fp16", min_sqnr_db=40, structure=structure)


def test_clip_bounds_clipped_and_overflowing_weight_kept() -> None:
    """Clip's max of 1e10 saturates harmlessly to 65504; a Mul by 1e6 keeps float32 (no inf)."""
    nodes = [
        helper.make_node("Clip", ["x", "lo", "hi"], ["c"]),
        helper.make_node("Mul", ["c", "big"], ["y"]),
    ]
    model = prepare(
        make_model(
            nodes,
            [vi("x", [4])],
            [vi("y", [4])],
            {
                "lo": np.array(-1e10, np.float32),
                "hi": np.array(1e10, np.float32),
                "big": np.full(4, 1e6, np.float32),
            },
        )
    )

    def structure(m: Model) -> None:
        clip = next(n for n in m.graph.nodes if n.op == "Clip")
        assert clip.inputs[2].values.dtype == F16 and np.isfinite(clip.inputs[2].values).all()
        mul = next(n for n in m.graph.nodes if n.op == "Mul")
        assert np.dtype(mul.outputs[0].dtype) == np.float32

    res, _ = check_pass(model, "fp16", min_sqnr_db=40, structure=structure)
    assert res.stats["values_clipped"] == 2


def test_keep_fp32_by_op_and_name() -> None:
    model = prepare(load(fixture_path("cnn.onnx")))
    convs = [n.name for n in model.graph.nodes if n.op == "Conv"]

    def no_half_conv(m: Model) -> None:
        for n in m.graph.nodes:
            if n.op == "Conv":
                assert np.dtype(n.outputs[0].dtype) == np.float32

    res, _ = check_pass(model, "fp16", min_sqnr_db=40, structure=no_half_conv, keep_fp32=["Conv"])
    assert set(convs) <= set(res.stats["kept_fp32"])

    def first_conv_f32(m: Model) -> None:
        n = next(n for n in m.graph.nodes if n.name == convs[0])
        assert np.dtype(n.outputs[0].dtype) == np.float32
        assert any(
            np.dtype(x.outputs[0].dtype) == F16 for x in m.graph.nodes if x.name in convs[1:]
        )

    check_pass(model, "fp16", min_sqnr_db=40, structure=first_conv_f32, keep_fp32=convs[0])


def test_keep_io_types_false_and_idempotent() -> None:
    model = prepare(load(fixture_path("cnn.onnx")))

    def half_io(m: Model) -> None:
        assert np.dtype(m.graph.inputs[0].dtype) == F16
        assert np.dtype(m.graph.outputs[0].dtype) == F16

    res = Fp16Pass(keep_io_types=False)(model.clone())
    half_io(res.model)
    onnx.checker.check_model(res.model.to_onnx(), full_check=True)
    # negative: an already-float16 model is left exactly as it is
    check_pass(res.model, "fp16", expect_modified=False, keep_io_types=False)


def test_subgraph_converted_if_outputs_float32() -> None:
    model = prepare(load(fixture_path("if_model.onnx")))

    def structure(m: Model) -> None:
        if_node = next(n for n in m.graph.nodes if n.op == "If")
        for key in ("then_branch", "else_branch"):
            sub = if_node.attrs[key]
            assert any(
                t.dtype is not None and np.dtype(t.dtype) == F16 for t in sub.tensors().values()
            )
            for o in sub.outputs:
                assert np.dtype(o.dtype) == np.float32
        _io_float32(m)

    check_pass(model, "fp16", min_sqnr_db=40, structure=structure)


def test_no_float_ops_unchanged() -> None:
    nodes = [helper.make_node("Add", ["a", "b"], ["c"]), helper.make_node("Shape", ["c"], ["s"])]
    model = prepare(
        make_model(
            nodes,
            [vi("a", [3], TensorProto.INT64)],
            [vi("s", [1], TensorProto.INT64)],
            {"b": np.arange(3, dtype=np.int64)},
        )
    )
    check_pass(model, "fp16", expect_modified=False)


def test_weight_graph_input_and_graph_output_intermediate() -> None:
    """A weight that is a graph input stays a float32 input (Cast inside); an intermediate that is
    also a graph output keeps its name and float32 type."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Relu", ["c"], ["y"])]
    model = prepare(
        make_model(
            nodes,
            [vi("x", [1, 2, 5, 5]), vi("w", [3, 2, 3, 3])],
            [vi("y", [1, 3, 3, 3]), vi("c", [1, 3, 3, 3])],
        )
    )

    def structure(m: Model) -> None:
        assert [t.name for t in m.graph.outputs] == ["y", "c"]
        assert [t.name for t in m.graph.inputs] == ["x", "w"]
        _io_float32(m)
        assert sum(n.op == "Cast" for n in m.graph.nodes) == 4

    check_pass(model, "fp16", min_sqnr_db=40, structure=structure)


def test_kernel_table_matches_probe() -> None:
    """The cached table agrees with a fresh onnxruntime probe for a few op types."""
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Transpose", ["r"], ["t"]),
        helper.make_node("Range", ["a", "b", "c"], ["y"]),
    ]
    model = prepare(
        make_model(
            nodes,
            [vi("x", [2, 3]), vi("a", []), vi("b", []), vi("c", [])],
            [vi("t", [3, 2]), vi("y", [None])],
        )
    )
    for n in model.graph.nodes:
        assert probe_node(n, 17) == ORT_CPU_FP16[n.op], n.op


def test_cli_fp16_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "t.onnx"
    rc = main(
        [
            "fp16",
            str(fixture_path("transformer_block.onnx")),
            "-o",
            str(out),
            "--json",
            "--keep-fp32",
            "Softmax",
        ]
    )
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    info = json.loads(cap.out)
    for key in (
        "input",
        "output",
        "nodes_before",
        "nodes_after",
        "macs_before",
        "macs_after",
        "verify",
        "passes",
        "kept_fp32",
    ):
        assert key in info
    assert any("oftmax" in n or n for n in info["kept_fp32"])
    assert all(v["sqnr_db"] == "inf" or v["sqnr_db"] >= 40 for v in info["verify"].values())
    m = load(out)
    assert any(n.op == "Softmax" and n.name in info["kept_fp32"] for n in m.graph.nodes)
    rc = main(["fp16", str(tmp_path / "missing.onnx"), "-o", str(out)])
    assert rc == 2


def test_kernels_native_keeps_ops_without_half_kernels() -> None:
    """kernels='native': ops onnxruntime CPU only runs through its own Casts (Conv, Relu, Gemm on
    x86) stay float32; the weights of kept ops are not converted."""
    model = prepare(load(fixture_path("cnn.onnx")))

    def structure(m: Model) -> None:
        for n in m.graph.nodes:
            if ORT_CPU_FP16.get(n.op) == "cast":
                assert all(t.dtype is None or np.dtype(t.dtype) != F16 for t in n.outputs), n.op
        assert any(n.op == "Flatten" and np.dtype(n.outputs[0].dtype) == F16 for n in m.graph.nodes)

    res, _ = check_pass(model, "fp16", min_sqnr_db=40, structure=structure, kernels="native")
    assert {n.name for n in model.graph.nodes if n.op == "Conv"} <= set(res.stats["kept_fp32"])


def test_pass_is_the_algorithm() -> None:
    """The pass only carries options: the algorithm gives the same model and stats."""
    from graphopt.core.errors import OptionError

    model = prepare(load(fixture_path("mobilenet_block.onnx")))
    a, b = model.clone(), model.clone()
    res_pass = Fp16Pass(keep_fp32="Sigmoid")(a)
    res_alg = convert_float16(b, keep_fp32=["Sigmoid"])
    assert res_alg.modified and res_pass.modified
    assert res_alg.stats == res_pass.stats and res_alg.kept_fp32 == res_pass.stats["kept_fp32"]
    assert a.op_histogram() == b.op_histogram()
    with pytest.raises(OptionError, match="kernels"):
        Fp16Pass(kernels="gpu")
