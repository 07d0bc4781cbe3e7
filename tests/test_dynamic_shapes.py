"""Dynamic dims end to end (issue 19): every command runs on a model whose inputs keep symbolic
``batch`` and ``seq`` dims without ``--input-shape``, keeps those dims on its outputs, and is
verified at several concrete shapes drawn from them.

The model is ``fixtures/bert_tiny_dynamic.onnx`` (a 2-layer BERT exported by torch.onnx's
TorchScript exporter, ``fixtures/build_bert.py``): its Shape/Gather/Unsqueeze/Concat subgraphs
are what published transformer exports look like.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import graphopt
from graphopt.core.errors import ShapeError
from graphopt.core.feeds import DIM_DRAWS, dim_draws, drawn_shapes, dynamic_dims, random_feeds
from graphopt.core.loader import load
from graphopt.core.model import Model
from graphopt.core.shapes import infer_shapes, prepare, static_input_shapes
from graphopt.core.verify import verify
from graphopt.fixtures import fixture_path
from graphopt.jobs.optimize import ATOL, RTOL, optimize_model

BERT = fixture_path("bert_tiny_dynamic.onnx")
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
#: the shapes the issue asks the results to match the original at
CHECK_SHAPES = ((1, 7), (3, 33), (2, 128))


def bert_feeds(batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Token ids in the vocabulary, a padded last row, segment ids 0/1."""
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, seq), np.int64)
    if batch > 1:
        mask[-1, seq // 2 :] = 0
    types = np.zeros((batch, seq), np.int64)
    types[:, seq // 2 :] = 1
    return {
        "input_ids": rng.integers(1, 256, (batch, seq)).astype(np.int64),
        "attention_mask": mask,
        "token_type_ids": types,
    }


def out_dims(path_or_proto: str | Path | onnx.ModelProto) -> list[list[object]]:
    m = path_or_proto if isinstance(path_or_proto, onnx.ModelProto) else onnx.load(path_or_proto)
    return [
        [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in m.graph.output
    ]


def in_dims(path: str | Path) -> list[list[object]]:
    m = onnx.load(path)
    return [
        [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in m.graph.input
    ]


def check_at_shapes(out: Model | str | Path, min_sqnr_db: float | None = None) -> list[float]:
    """Max abs error against the original at every CHECK_SHAPES (asserted within tolerance)."""
    feeds = [bert_feeds(b, s, seed=b * 1000 + s) for b, s in CHECK_SHAPES]
    errs = []
    for f in feeds:
        if min_sqnr_db is None:
            rep = verify(load(BERT), out, feeds=f, rtol=RTOL, atol=ATOL)
        else:
            rep = verify(load(BERT), out, feeds=f, min_sqnr_db=min_sqnr_db)
        assert rep.ok, rep.to_json()
        assert rep.outputs[0].shape == [*f["input_ids"].shape, 64]
        errs.append(rep.outputs[0].max_abs_err)
    return errs


# ---------------------------------------------------------------- feeds and shape inference


def _two_inputs(dims_a: Sequence[str | int | None], dims_b: Sequence[str | int | None]) -> Model:
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, dims_a)
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, dims_b)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    g = helper.make_graph([helper.make_node("Add", ["a", "b"], ["y"])], "g", [a, b], [y])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return Model.from_onnx(m)


def test_random_feeds_draw_each_named_dim_once() -> None:
    m = _two_inputs(["batch", "seq", 4], ["batch", "seq", 4])
    assert dynamic_dims(m) == {"batch": True, "seq": False}
    assert dim_draws(m) == [{"batch": lead, "seq": other} for lead, other in DIM_DRAWS]
    assert drawn_shapes(m, 1) == {"a": [3, 64, 4], "b": [3, 64, 4]}
    for k, (lead, other) in enumerate(DIM_DRAWS):
        f = random_feeds(m, seed=k, draw=k)
        assert f["a"].shape == f["b"].shape == (lead, other, 4)
    # unnamed dynamic dims (no dim_param) no longer need --input-shape either
    u = _two_inputs([None, None], [None, None])
    assert random_feeds(u)["a"].shape == (DIM_DRAWS[0][0], DIM_DRAWS[0][1])


def test_static_model_has_one_draw_and_no_symbolic_inference(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Negative case: fixed inputs keep the one set of feeds and never reach sympy."""
    import graphopt.core.shapes as shapes

    def boom(model: Model) -> dict:
        raise AssertionError("symbolic inference on a static model")

    monkeypatch.setattr(shapes, "symbolic_infer", boom)
    m = _two_inputs([2, 4], [2, 4])
    assert dim_draws(m) == [{}]
    infer_shapes(m)
    assert list(m.graph.outputs[0].shape) == [2, 4]


def test_symbolic_inference_keeps_batch_and_seq() -> None:
    """ONNX inference alone loses the dims after the Shape-computed Reshapes (``unk__N``); the
    symbolic inference follows them to the output."""
    m = prepare(load(BERT))
    assert list(m.graph.outputs[0].shape) == ["batch", "seq", 64]
    reshaped = [n.outputs[0].shape for n in m.graph.nodes if n.op == "Reshape"]
    assert ["batch", "seq", 4, 16] in [list(s) for s in reshaped if s is not None]


def test_without_sympy_onnx_inference_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Symbolic inference is optional: without it the lost dims stay unknown, nothing fails."""
    import graphopt.core.shapes as shapes

    monkeypatch.setattr(shapes, "_SYMBOLIC", [None])
    assert shapes.symbolic_infer(load(BERT)) == {}
    m = prepare(load(BERT))
    out = list(m.graph.outputs[0].shape)
    assert len(out) == 3 and out[2] == 64 and out[:2] != ["batch", "seq"]
    res = optimize_model(load(BERT))
    assert res.verify is not None and res.verify.ok


# ---------------------------------------------------------------- every command


def test_optimize_without_input_shape(tmp_path: Path) -> None:
    res = graphopt.optimize(str(BERT), output=tmp_path / "o.onnx")
    assert res.verify is not None and res.verify.ok
    assert res.verify.samples == len(DIM_DRAWS)  # verified at batch 1 / seq 7 and 3 / 64
    assert res.model.num_nodes() < load(BERT).num_nodes()
    assert in_dims(tmp_path / "o.onnx") == [["batch", "seq"]] * 3
    assert out_dims(tmp_path / "o.onnx") == [["batch", "seq", 64]]
    errs = check_at_shapes(tmp_path / "o.onnx")
    assert max(errs) < 1e-4


def test_optimize_fixed_shape_still_folds_more() -> None:
    """``--input-shape`` stays the way to the extra folding a fixed shape allows."""
    fixed = {n: (1, 128) for n in INPUTS}
    dyn = optimize_model(load(BERT))
    fix = optimize_model(load(BERT), input_shapes=fixed)
    assert fix.verify is not None and fix.verify.ok
    assert not any(n.op == "Shape" for n in fix.model.graph.nodes)
    assert [list(t.shape) for t in fix.model.graph.outputs] == [[1, 128, 64]]
    assert [list(t.shape) for t in dyn.model.graph.outputs] == [["batch", "seq", 64]]


def test_fp16_without_input_shape(tmp_path: Path) -> None:
    res = graphopt.fp16(str(BERT), output=tmp_path / "h.onnx")
    assert res.verify is not None and res.verify.ok
    assert out_dims(tmp_path / "h.onnx") == [["batch", "seq", 64]]
    check_at_shapes(tmp_path / "h.onnx", min_sqnr_db=40.0)


def test_quantize_with_calibration_of_different_lengths(tmp_path: Path) -> None:
    calib = [
        bert_feeds(b, s, seed=i) for i, (b, s) in enumerate([(2, 9), (1, 33), (4, 17), (2, 64)])
    ]
    res = graphopt.quantize(str(BERT), calib, output=tmp_path / "q.onnx", method="minmax")
    assert res.model.num_nodes() > 0
    m = onnx.load(tmp_path / "q.onnx")
    assert any(n.op_type == "QuantizeLinear" for n in m.graph.node)
    assert out_dims(m) == [["batch", "seq", 64]]
    assert in_dims(tmp_path / "q.onnx") == [["batch", "seq"]] * 3
    check_at_shapes(tmp_path / "q.onnx", min_sqnr_db=20.0)


def test_prune_without_input_shape(tmp_path: Path) -> None:
    res = graphopt.prune(str(BERT), 0.25, output=tmp_path / "p.onnx")
    assert res.model.num_nodes() > 0
    assert in_dims(tmp_path / "p.onnx") == [["batch", "seq"]] * 3
    assert out_dims(tmp_path / "p.onnx")[0][:2] == ["batch", "seq"]
    for b, s in CHECK_SHAPES:  # runs at any batch and length
        rep = verify(load(BERT), tmp_path / "p.onnx", feeds=bert_feeds(b, s), min_sqnr_db=10.0)
        assert rep.outputs[0].shape == [b, s, 64]


def test_plan_says_which_shapes(tmp_path: Path) -> None:
    res = graphopt.plan_memory(str(BERT), output=tmp_path / "m.onnx")
    assert res.shapes_from == "drawn"
    assert res.input_shapes == {n: [DIM_DRAWS[-1][0], DIM_DRAWS[-1][1]] for n in INPUTS}
    assert res.proof is not None and res.proof.ok
    j = res.to_json()
    assert j["shapes_from"] == "drawn" and j["input_shapes"]["input_ids"] == [3, 64]
    assert not res.plan.unplanned  # every tensor sized at those shapes
    # the written model keeps its dynamic dims (the node order holds at any shape)
    assert in_dims(tmp_path / "m.onnx") == [["batch", "seq"]] * 3
    check_at_shapes(tmp_path / "m.onnx")
    given = graphopt.plan_memory(str(BERT), {n: (2, 16) for n in INPUTS})
    assert given.shapes_from == "input_shapes" and given.input_shapes is not None
    assert given.input_shapes["input_ids"] == [2, 16]
    fed = graphopt.plan_memory(str(BERT), feeds=bert_feeds(1, 5))
    assert fed.shapes_from == "feeds" and fed.input_shapes is not None
    assert fed.input_shapes["input_ids"] == [1, 5]
    assert fed.arena_bytes < res.arena_bytes


def test_compile_asks_for_input_shape(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(ShapeError, match=r"--input-shape input_ids:1x128 .*attention_mask"):
        static_input_shapes(load(BERT))
    from graphopt.cli import main

    rc = main(["compile", str(BERT), "-o", str(tmp_path / "b.so"), "--target", "llvm"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "--input-shape input_ids:1x128" in err and "Traceback" not in err
    assert not (tmp_path / "b.so").exists()


# ---------------------------------------------------------------- passes on symbolic shapes


def _graph_model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto], inits=()) -> Model:
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    g = helper.make_graph(nodes, "g", inputs, [y], initializer=list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return prepare(Model.from_onnx(m))


def _draw_feeds(m: Model) -> list[dict[str, np.ndarray]]:
    return [random_feeds(m, seed=k, draw=k) for k in range(len(DIM_DRAWS))]


def _reshape_model(order: tuple[int, ...], tail: list[int], allowzero: int = 0) -> Model:
    """y = Reshape(x, Concat(Unsqueeze(Gather(Shape(x), i)) for i in order, tail))."""
    from onnx import numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 64])
    nodes = [helper.make_node("Shape", ["x"], ["s"])]
    inits = [numpy_helper.from_array(np.array([0], np.int64), "ax0")]
    parts = []
    for i in order:
        inits.append(numpy_helper.from_array(np.array(i, np.int64), f"i{i}"))
        nodes += [
            helper.make_node("Gather", ["s", f"i{i}"], [f"g{i}"]),
            helper.make_node("Unsqueeze", [f"g{i}", "ax0"], [f"u{i}"]),
        ]
        parts.append(f"u{i}")
    inits.append(numpy_helper.from_array(np.array(tail, np.int64), "tail"))
    nodes += [
        helper.make_node("Concat", [*parts, "tail"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["y"], allowzero=allowzero),
    ]
    return _graph_model(nodes, [x], inits)


def test_fold_constants_reshape_target_from_symbolic_shape() -> None:
    from graphopt.testing import check_pass

    m = _reshape_model((0, 1), [4, 16])

    def structure(out: Model) -> None:
        r = next(n for n in out.graph.nodes if n.op == "Reshape")
        assert r.inputs[1].values.tolist() == [0, 0, 4, 16]

    res, _ = check_pass(m, "fold-constants", feeds=_draw_feeds(m), structure=structure)
    assert res.stats["symbolic_reshapes"] == 1
    # a dim that is not x's own at that position becomes -1 (one only)
    m2 = _reshape_model((0,), [-1])  # [batch, -1]: already all known, folds to [0, -1]
    res2, _ = check_pass(m2, "fold-constants", feeds=_draw_feeds(m2))
    r = next(n for n in res2.model.graph.nodes if n.op == "Reshape")
    assert r.inputs[1].values.tolist() == [0, -1]


@pytest.mark.parametrize(
    "order, tail, allowzero",
    [
        ((1, 0), [64], 0),  # [seq, batch, 64]: two dims not in place, -1 can stand for one only
        ((0, 1), [4, 16], 1),  # allowzero: 0 would not copy a dim
    ],
)
def test_fold_constants_symbolic_reshape_negative(
    order: tuple[int, ...], tail: list[int], allowzero: int
) -> None:
    from graphopt.testing import check_pass

    m = _reshape_model(order, tail, allowzero)
    check_pass(m, "fold-constants", feeds=_draw_feeds(m), expect_modified=False)


def test_fold_constants_merges_equal_symbolic_dims() -> None:
    """``Gather(Shape(a), 1)`` and ``Gather(Shape(b), 1)`` are both ``seq``: one is read."""
    from onnx import numpy_helper

    from graphopt.testing import check_pass

    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", "seq"])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, ["batch", "seq"])
    inits = [
        numpy_helper.from_array(np.array(1, np.int64), "one"),
        numpy_helper.from_array(np.array(0, np.int64), "zero"),
    ]
    nodes = [
        helper.make_node("Shape", ["a"], ["sa"]),
        helper.make_node("Shape", ["b"], ["sb"]),
        helper.make_node("Gather", ["sa", "one"], ["na"]),
        helper.make_node("Gather", ["sb", "one"], ["nb"]),
        helper.make_node("Range", ["zero", "na", "one"], ["ra"]),
        helper.make_node("Range", ["zero", "nb", "one"], ["rb"]),
        helper.make_node("Add", ["ra", "rb"], ["r"]),
        helper.make_node("Cast", ["r"], ["rf"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["a", "rf"], ["ab"]),
        helper.make_node("Add", ["ab", "b"], ["y"]),
    ]
    m = _graph_model(nodes, [a, b], inits)
    res, _ = check_pass(m, "fold-constants", feeds=_draw_feeds(m))
    assert res.stats["symbolic_merged"] == 2  # Shape(b) reads as Shape(a), Gather(.., 1) too
    from graphopt.core.pass_manager import PassManager
    from graphopt.passes import resolve_passes

    out = PassManager(resolve_passes(["eliminate-cse", "eliminate-dead"]))(res.model).model
    hist = out.op_histogram()
    assert hist.get("Range") == 1 and hist.get("Shape") == 1 and hist.get("Gather") == 1
    assert verify(m, out, feeds=_draw_feeds(m)).ok


@pytest.mark.parametrize("bias_shape, removed", [([4], True), ([1], True), ([3, 1], False)])
def test_eliminate_noop_neutral_add_on_symbolic_shape(bias_shape: list[int], removed: bool) -> None:
    """``x + 0`` with x ``[batch, seq, 4]``: removed when broadcasting cannot change x's shape
    whatever batch and seq are; kept when the zero tensor's dims would (``[3, 1]``)."""
    from onnx import numpy_helper

    from graphopt.testing import check_pass

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 4])
    zero = numpy_helper.from_array(np.zeros(bias_shape, np.float32), "zero")
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Add", ["r", "zero"], ["a"]),
        helper.make_node("Relu", ["a"], ["y"]),
    ]
    m = _graph_model(nodes, [x], [zero])
    if not removed:  # [batch, seq, 4] + [3, 1] only runs at seq 3: feeds at seq 3
        feeds = [random_feeds(m, shapes={"x": (b, 3, 4)}) for b in (1, 3)]
    else:
        feeds = _draw_feeds(m)
    res, _ = check_pass(m, "eliminate-noop", feeds=feeds, expect_modified=removed)
    assert ("Add" in res.model.op_histogram()) is not removed


def test_drawn_shapes_the_model_refuses_name_the_way_out() -> None:
    """A dim the model needs large (a 9-tap conv on a length-7 draw): exit 2 naming the drawn
    shapes, --input-shape and --feeds; with --input-shape it runs."""
    from onnx import numpy_helper

    from graphopt.core.errors import FeedError

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, "len"])
    w = numpy_helper.from_array(np.ones((2, 1, 9), np.float32), "w")
    m = _graph_model([helper.make_node("Conv", ["x", "w"], ["y"])], [x], [w])
    with pytest.raises(FeedError, match=r"drawn input shapes x 1x1x7 .*--input-shape.*--feeds"):
        optimize_model(m)
    assert optimize_model(m, input_shapes={"x": (2, 1, 32)}).verify.ok  # type: ignore[union-attr]


def _past_model() -> Model:
    """A decoder's cache step: ``present = Concat(past, cur)`` (declared ``[batch, 2, total,
    4]``), ``y = mask @ present``: it runs only when the mask's ``total`` is ``past + seq``."""
    past = helper.make_tensor_value_info("past", TensorProto.FLOAT, ["batch", 2, "past", 4])
    cur = helper.make_tensor_value_info("cur", TensorProto.FLOAT, ["batch", 2, "seq", 4])
    mask = helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["batch", "total"])
    present = helper.make_tensor_value_info("present", TensorProto.FLOAT, ["batch", 2, "total", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2, 1, 4])
    from onnx import numpy_helper

    nodes = [
        helper.make_node("Concat", ["past", "cur"], ["present"], axis=2),
        helper.make_node("Unsqueeze", ["mask", "ax"], ["m"]),
        helper.make_node("MatMul", ["m", "present"], ["y"]),
    ]
    g = helper.make_graph(
        nodes,
        "g",
        [past, cur, mask],
        [present, y],
        [numpy_helper.from_array(np.array([1, 2]), "ax")],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return Model.from_onnx(m)


def test_dims_tied_by_the_model_are_drawn_together() -> None:
    """A past/present model runs only when the mask's ``total`` is ``past + seq``: symbolic
    inference finds the relation from the declared output, and every draw obeys it; a model
    without such a tie draws its dims independently."""
    m = prepare(_past_model())
    assert m.dim_relations == {"total": "past + seq"}
    for k, values in enumerate(dim_draws(m)):
        assert values["total"] == values["past"] + values["seq"]
        f = random_feeds(m, seed=0, draw=k)
        assert f["mask"].shape[1] == f["past"].shape[2] + f["cur"].shape[2]
    res = optimize_model(m)  # verification runs the model at every draw
    assert res.verify is not None and res.verify.ok
    assert prepare(load(BERT)).dim_relations == {}
