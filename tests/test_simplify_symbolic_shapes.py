"""simplify-symbolic-shapes: index grids, unneeded broadcasts and unit-dim reshapes of models with
dynamic dims fold away, exactly at every drawn shape; models without them are left untouched."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.core.feeds import DIM_DRAWS, random_feeds
from graphopt.core.loader import load
from graphopt.core.model import Model
from graphopt.core.shapes import prepare
from graphopt.fixtures import fixture_path
from graphopt.passes import get_pass
from graphopt.testing import check_pass

PASS = "simplify-symbolic-shapes"


def _model(nodes, inputs, outputs, inits=(), opset: int = 17) -> Model:
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return prepare(Model.from_onnx(m))


def _i64(name: str, v) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(v, np.int64), name)


def _draws(m: Model) -> list[dict[str, np.ndarray]]:
    return [random_feeds(m, seed=k, draw=k) for k in range(len(DIM_DRAWS))]


def _ops(m: Model) -> dict[str, int]:
    get_pass("eliminate-dead")(m)
    return m.op_histogram()


def _mask_model(stride_extra: int = 0, out_expand: bool = False, ones: bool = False) -> Model:
    """The attention mask as ``transformers`` builds it: ``flatten(mask)[b * seq + s]`` over Range
    grids, And with an all-true ``kv >= 0`` grid, Expand to ``[B,1,S,S]``, additive -1e9."""
    mask = helper.make_tensor_value_info("mask", TensorProto.INT64, ["batch", "seq"])
    scores = helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 2, "seq", "seq"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    inits = [
        _i64("i0", 0), _i64("i1", 1), _i64("zero", 0), _i64("one", 1), _i64("extra", stride_extra),
        _i64("ax0", [0]), _i64("ax123", [1, 2, 3]), _i64("ax012", [0, 1, 2]),
        _i64("ax013", [0, 1, 3]), _i64("m1", [-1]), _i64("c1", [1]),
        numpy_helper.from_array(np.array(0.0, np.float32), "f0"),
        numpy_helper.from_array(np.array(-1e9, np.float32), "fneg"),
    ]  # fmt: skip
    nodes = [
        helper.make_node("Shape", ["mask"], ["s"]),
        helper.make_node("Gather", ["s", "i0"], ["b"]),
        helper.make_node("Gather", ["s", "i1"], ["q"]),
        helper.make_node("Range", ["zero", "b", "one"], ["rb"]),
        helper.make_node("Range", ["zero", "q", "one"], ["rs"]),
        helper.make_node("Unsqueeze", ["rb", "ax123"], ["ub"]),
        helper.make_node("Add", ["q", "extra"], ["qs"]),
        helper.make_node("Unsqueeze", ["qs", "ax0"], ["qq"]),
        helper.make_node("Mul", ["ub", "qq"], ["bq"]),
        helper.make_node("Unsqueeze", ["rs", "ax012"], ["us"]),
        helper.make_node("Add", ["us", "bq"], ["idx"]),
        helper.make_node("Cast", ["mask"], ["mf"], to=TensorProto.FLOAT),
        helper.make_node("Flatten", ["mf"], ["fl"], axis=2),
        helper.make_node("Gather", ["fl", "idx"], ["g"], axis=0),
        helper.make_node("Reshape", ["g", "m1"], ["r"]),
        helper.make_node("Shape", ["idx"], ["si"]),
        helper.make_node("Reshape", ["r", "si"], ["r2"]),
        helper.make_node("Cast", ["r2"], ["rbool"], to=TensorProto.BOOL),
        helper.make_node("Unsqueeze", ["rs", "ax013"], ["kv"]),
        helper.make_node("GreaterOrEqual", ["kv", "zero"], ["ge"]),
        helper.make_node("And", ["ge", "rbool"], ["a"]),
        helper.make_node("Unsqueeze", ["b", "ax0"], ["b1"]),
        helper.make_node("Unsqueeze", ["q", "ax0"], ["q1"]),
        helper.make_node("Concat", ["b1", "c1", "q1", "q1"], ["eshape"], axis=0),
        helper.make_node("Expand", ["a", "ones" if ones else "eshape"], ["e"]),
    ]
    inits.append(_i64("ones", [1, 1, 1, 1]))
    if out_expand:
        y = helper.make_tensor_value_info("e", TensorProto.BOOL, None)
    else:
        nodes += [
            helper.make_node("Where", ["e", "f0", "fneg"], ["w"]),
            helper.make_node("Add", ["scores", "w"], ["y"]),
        ]
    return _model(nodes, [mask, scores], [y], inits)


def test_mask_grid_folds_to_an_unsqueeze() -> None:
    m = _mask_model()
    res, _ = check_pass(m, PASS, feeds=_draws(m))
    assert res.stats["gather_index_grid"] == 1
    assert res.stats["and_all_true"] == 1 and res.stats["expand_unneeded"] == 1
    ops = _ops(res.model)
    for op in ("Gather", "Range", "Expand", "And", "GreaterOrEqual", "Flatten", "Concat"):
        assert op not in ops, ops
    # the additive mask is now [batch,1,1,seq]: the score Add broadcasts it
    w = next(n for n in res.model.graph.nodes if n.op == "Where").outputs[0]
    assert list(w.shape) == ["batch", 1, 1, "seq"]


def test_wrong_stride_is_not_a_reshape() -> None:
    """``b * (seq - 1) + s`` does not read the mask row-major: the Gather stays."""
    m = _mask_model(stride_extra=-1)
    res, _ = check_pass(m, PASS, feeds=_draws(m))  # the broadcasts still go; the gather stays
    assert "gather_index_grid" not in res.stats
    assert _ops(res.model).get("Gather", 0) >= 1


def test_broadcast_a_graph_output_shows_is_kept() -> None:
    """An Expand whose result is a graph output is needed as it is."""
    m = _mask_model(out_expand=True)
    res = get_pass(PASS)(m.clone())
    assert "expand_unneeded" not in res.stats
    assert "Expand" in res.model.op_histogram()


@pytest.mark.parametrize("ones", [False, True])
def test_and_before_an_expanded_output(ones: bool) -> None:
    """``And(all-true [1,1,S,1], m [B,1,1,S])`` read by an Expand that is a graph output: the And
    may go only when the Expand's target is the full ``[B,1,S,S]`` (then the Expand still gives
    it); with a target of ones the broadcast the And did is the output's shape, and it stays."""
    m = _mask_model(out_expand=True, ones=ones)
    res, _ = check_pass(m, PASS, feeds=_draws(m))
    assert ("and_all_true" in res.stats) is not ones
    assert ("And" in _ops(res.model)) is ones


def test_reshape_to_unit_dims_of_a_shape_becomes_unsqueeze() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq"])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 1, 1, "seq"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [
        helper.make_node("Shape", ["z"], ["sz"]),
        helper.make_node("Reshape", ["x", "sz"], ["r"]),
        helper.make_node("Add", ["r", "z"], ["y"]),
    ]
    m = _model(nodes, [x, z], [y])
    res, _ = check_pass(m, PASS, feeds=_draws(m))
    assert res.stats == {"reshape_unit_dims": 1}
    ops = _ops(res.model)
    assert "Shape" not in ops and ops["Unsqueeze"] == 1


def test_reshape_that_moves_data_is_kept() -> None:
    """[batch, seq] -> [seq, batch] is not a unit-dim change."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq"])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, ["seq", "batch"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [
        helper.make_node("Shape", ["z"], ["sz"]),
        helper.make_node("Reshape", ["x", "sz"], ["r"]),
        helper.make_node("Add", ["r", "z"], ["y"]),
    ]
    m = _model(nodes, [x, z], [y])
    check_pass(m, PASS, feeds=_draws(m), expect_modified=False)


def test_position_ids_from_a_buffer_slice() -> None:
    """``table[arange_buffer[:, :seq]]`` -> ``table[:seq]`` (the Add broadcasts the missing
    leading 1); ``Unsqueeze(Gather(Shape(ids), 1))`` -> ``Shape(ids, start=1, end=2)``."""
    ids = helper.make_tensor_value_info("ids", TensorProto.FLOAT, ["batch", "seq", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    rng = np.random.default_rng(0)
    inits = [
        _i64("i1", 1), _i64("ax0", [0]), _i64("st", [0]), _i64("ax1", [1]),
        _i64("buf", np.arange(32)[None, :]),
        numpy_helper.from_array(rng.standard_normal((32, 8)).astype(np.float32), "table"),
    ]  # fmt: skip
    nodes = [
        helper.make_node("Shape", ["ids"], ["s"]),
        helper.make_node("Gather", ["s", "i1"], ["q"]),
        helper.make_node("Unsqueeze", ["q", "ax0"], ["qq"]),
        helper.make_node("Slice", ["buf", "st", "qq", "ax1"], ["pos"]),
        helper.make_node("Gather", ["table", "pos"], ["pe"]),
        helper.make_node("Add", ["ids", "pe"], ["y"]),
    ]
    m = _model(nodes, [ids], [y], inits)
    draws = [f for f in _draws(m) if f["ids"].shape[1] <= 32]
    res, _ = check_pass(m, PASS, feeds=draws)
    assert res.stats.get("gather_arange_slice") == 1 and res.stats.get("shape_slice") == 1
    res2 = get_pass(PASS)(res.model)  # the Unsqueeze of the slice is dropped on the next sweep
    assert res2.stats.get("unsqueeze_unneeded") == 1
    ops = _ops(res2.model)
    assert ops == {"Shape": 1, "Slice": 1, "Add": 1}, ops


@pytest.mark.parametrize("name", ["cnn.onnx", "residual.onnx", "transformer_block.onnx"])
def test_static_models_are_untouched(name: str) -> None:
    m = prepare(load(fixture_path(name)))
    check_pass(m, PASS, expect_modified=False)
