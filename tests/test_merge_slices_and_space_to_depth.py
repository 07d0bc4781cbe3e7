"""merge-slices (Slice chains on disjoint axes -> one Slice) and fuse-space-to-depth (the Focus
stem: strided Slices + Concat + Conv -> SpaceToDepth + Conv with permuted input channels), against
onnxruntime, with the cases where nothing may change."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.core.model import Model
from graphopt.core.shapes import prepare
from graphopt.passes import get_pass
from graphopt.testing import check_pass

BIG = 2**62


def _i64(name: str, v) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(v, np.int64), name)


def _model(nodes, inits, shape=(1, 3, 8, 8), opset: int = 17) -> Model:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    g = helper.make_graph(nodes, "g", [x], [y], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return prepare(Model.from_onnx(m))


def _slice(inp: str, out: str, start: int, axis: int, step: int, tag: str) -> tuple:
    inits = [
        _i64(f"s{tag}", [start]),
        _i64(f"e{tag}", [BIG]),
        _i64(f"a{tag}", [axis]),
        _i64(f"p{tag}", [step]),
    ]
    node = helper.make_node("Slice", [inp, f"s{tag}", f"e{tag}", f"a{tag}", f"p{tag}"], [out])
    return node, inits


def _ops(m: Model) -> dict[str, int]:
    get_pass("eliminate-dead")(m)
    return m.op_histogram()


@pytest.mark.parametrize("axes", [(2, 3), (-2, -1), (3, 1)])
def test_slice_chain_on_two_axes_becomes_one(axes: tuple[int, int]) -> None:
    n1, i1 = _slice("x", "a", 1, axes[0], 2, "1")
    n2, i2 = _slice("a", "y", 0, axes[1], 2, "2")
    m = _model([n1, n2], i1 + i2)
    res, _ = check_pass(m, "merge-slices")
    assert res.stats == {"slices_merged": 1}
    assert _ops(res.model) == {"Slice": 1}


def test_inner_slice_read_elsewhere_stays() -> None:
    n1, i1 = _slice("x", "a", 1, 2, 2, "1")
    n2, i2 = _slice("a", "b", 0, 3, 2, "2")
    add = helper.make_node("ReduceSum", ["a"], ["r"], keepdims=0)
    out = helper.make_node("Add", ["b", "r"], ["y"])
    m = _model([n1, n2, add, out], i1 + i2)
    res, _ = check_pass(m, "merge-slices")
    assert _ops(res.model)["Slice"] == 2  # the merged one and the inner one (read by ReduceSum)


@pytest.mark.parametrize("case", ["same axis", "runtime start"])
def test_slice_chains_left_alone(case: str) -> None:
    n1, i1 = _slice("x", "a", 1, 2, 2, "1")
    n2, i2 = _slice("a", "y", 0, 2 if case == "same axis" else 3, 1, "2")
    nodes = [n1, n2]
    if case == "runtime start":  # the outer start is computed: Shape(x)[0] - 1 = 0
        i2 = [t for t in i2 if t.name != "s2"] + [_i64("zero", [0]), _i64("one", [1])]
        nodes = [
            helper.make_node("Shape", ["x"], ["sh"]),
            helper.make_node("Slice", ["sh", "zero", "one"], ["n0"]),
            helper.make_node("Sub", ["n0", "one"], ["s2"]),
            n1,
            n2,
        ]
    m = _model(nodes, i1 + i2)
    check_pass(m, "merge-slices", expect_modified=False)


#: YOLOv5's Focus order: x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]
YOLOV5 = ((0, 0), (1, 0), (0, 1), (1, 1))


def _focus(
    order=YOLOV5,
    block: int = 2,
    shape=(1, 3, 8, 8),
    group: int = 1,
    extra_reader: bool = False,
) -> Model:
    rng = np.random.default_rng(0)
    c = shape[1]
    nodes, inits, parts = [], [], []
    for k, (i, j) in enumerate(order):
        tag = str(k)
        inits += [
            _i64(f"s{tag}", [i, j]),
            _i64(f"e{tag}", [BIG, BIG]),
            _i64(f"a{tag}", [2, 3]),
            _i64(f"p{tag}", [block, block]),
        ]
        nodes.append(
            helper.make_node("Slice", ["x", f"s{tag}", f"e{tag}", f"a{tag}", f"p{tag}"], [f"q{k}"])
        )
        parts.append(f"q{k}")
    cin = c * len(order)
    w = rng.standard_normal((6, cin // group, 3, 3)).astype(np.float32)
    inits.append(numpy_helper.from_array(w, "w"))
    nodes.append(helper.make_node("Concat", parts, ["cat"], axis=1))
    conv_out = "conv" if extra_reader else "y"
    nodes.append(helper.make_node("Conv", ["cat", "w"], [conv_out], pads=[1, 1, 1, 1], group=group))
    if extra_reader:  # the Concat is read by something else too
        nodes += [
            helper.make_node("ReduceMean", ["cat"], ["mc"], axes=[1, 2, 3], keepdims=1),
            helper.make_node("Add", ["conv", "mc"], ["y"]),
        ]
    return _model(nodes, inits, shape, opset=17)


@pytest.mark.parametrize(
    "order, block",
    [
        (YOLOV5, 2),
        (((0, 0), (0, 1), (1, 0), (1, 1)), 2),  # SpaceToDepth's own order: no permutation
        (tuple((i, j) for j in range(3) for i in range(3)), 3),
    ],
)
def test_focus_stem_becomes_space_to_depth(order, block: int) -> None:
    m = _focus(order, block, shape=(2, 3, 12, 12))
    res, _ = check_pass(m, "fuse-space-to-depth", rtol=1e-5, atol=1e-5)
    assert res.stats == {"space_to_depth": 1}
    ops = _ops(res.model)
    assert ops == {"SpaceToDepth": 1, "Conv": 1}, ops


@pytest.mark.parametrize(
    "case",
    ["three of four", "an offset twice", "grouped conv", "concat read elsewhere", "step 1"],
)
def test_focus_lookalikes_left_alone(case: str) -> None:
    if case == "three of four":
        m = _focus(YOLOV5[:3])
    elif case == "an offset twice":  # four slices, but not the four offsets of a 2x2 block
        m = _focus(((0, 0), (0, 1), (0, 0), (0, 1)))
    elif case == "grouped conv":
        m = _focus(group=3)
    elif case == "concat read elsewhere":
        m = _focus(extra_reader=True)
    else:
        m = _focus(block=1, order=((0, 0),))
    check_pass(m, "fuse-space-to-depth", expect_modified=False)
