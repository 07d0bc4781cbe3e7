"""Tests for passes/eliminate_noop.py (eliminate-noop)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers_graphs import make_model, vi
from onnx import TensorProto, helper

from graphopt.core.model import Model
from graphopt.core.shapes import prepare
from graphopt.testing import check_pass, op_counts

F = TensorProto.FLOAT


def _i64(*v: int) -> np.ndarray:
    return np.array(v, dtype=np.int64)


def _ops(expected: dict[str, int]):
    def structure(r: Model) -> None:
        got = op_counts(r)
        assert got == expected, got

    return structure


def _run(m: Model, expected: dict[str, int] | None = None, **kw):
    m = prepare(m)
    if expected is None:
        return check_pass(m, "eliminate-noop", expect_modified=False, **kw)
    return check_pass(m, "eliminate-noop", structure=_ops(expected), **kw)


# ---------------------------------------------------------------------------------------- positive


def test_cast_to_same_type_removed() -> None:
    m = make_model(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("Cast", ["r"], ["c"], to=F),
            helper.make_node("Neg", ["c"], ["y"]),
        ],
        [vi("x", [2, 3])],
        [vi("y", [2, 3])],
    )
    res, _ = _run(m, {"Relu": 1, "Neg": 1})
    assert res.stats == {"cast": 1}


def test_noop_as_graph_output_keeps_the_output_name() -> None:
    m = make_model(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Reshape", ["r", "s"], ["y"])],
        [vi("x", [2, 3])],
        [vi("y", [2, 3])],
        {"s": _i64(0, -1)},
    )
    res, _ = _run(m, {"Relu": 1})
    assert [t.name for t in res.model.graph.outputs] == ["y"]
    assert res.model.graph.outputs[0].inputs[0].op == "Relu"


@pytest.mark.parametrize(
    "case", ["flatten", "squeeze", "expand", "tile", "slice", "pad", "concat", "transpose"]
)
def test_identity_like_layout_ops_removed(case: str) -> None:
    x = {"flatten": [6, 4], "squeeze": [2, 6, 3]}.get(case, [1, 6, 1])
    inits: dict[str, np.ndarray] = {}
    if case == "flatten":
        node = helper.make_node("Flatten", ["r"], ["n"], axis=1)
    elif case == "squeeze":  # no axes: squeezes every 1-dim, and there is none
        node = helper.make_node("Squeeze", ["r"], ["n"])
    elif case == "expand":
        node = helper.make_node("Expand", ["r", "shp"], ["n"])
        inits["shp"] = _i64(6, 1)
    elif case == "tile":
        node = helper.make_node("Tile", ["r", "rep"], ["n"])
        inits["rep"] = _i64(1, 1, 1)
    elif case == "slice":
        node = helper.make_node("Slice", ["r", "st", "en", "ax"], ["n"])
        inits.update(st=_i64(0, -100), en=_i64(2**62, 100), ax=_i64(1, 2))
    elif case == "pad":
        node = helper.make_node("Pad", ["r", "pads"], ["n"], mode="reflect")
        inits["pads"] = np.zeros(6, np.int64)
    elif case == "concat":
        node = helper.make_node("Concat", ["r"], ["n"], axis=1)
    else:
        node = helper.make_node("Transpose", ["r"], ["n"], perm=[0, 1, 2])
    m = make_model(
        [helper.make_node("Relu", ["x"], ["r"]), node, helper.make_node("Neg", ["n"], ["y"])],
        [vi("x", x)],
        [vi("y", x)],
        inits,
    )
    _run(m, {"Relu": 1, "Neg": 1})


def test_transpose_pair_cancels() -> None:
    m = make_model(
        [
            helper.make_node("Transpose", ["x"], ["t1"], perm=[0, 2, 3, 1]),
            helper.make_node("Transpose", ["t1"], ["t2"], perm=[0, 3, 1, 2]),
            helper.make_node("Relu", ["t2"], ["y"]),
        ],
        [vi("x", [1, 2, 3, 4])],
        [vi("y", [1, 2, 3, 4])],
    )
    res, _ = _run(m, {"Relu": 1})
    assert res.model.graph.nodes[0].inputs[0].name == "x"


def test_transpose_pair_composes() -> None:
    m = make_model(
        [
            helper.make_node("Transpose", ["x"], ["t1"], perm=[0, 2, 3, 1]),
            helper.make_node("Transpose", ["t1"], ["y"], perm=[1, 0, 2, 3]),
        ],
        [vi("x", [1, 2, 3, 4])],
        [vi("y", [3, 1, 4, 2])],
    )
    res, _ = _run(m, {"Transpose": 1})
    assert res.model.graph.nodes[0].attrs["perm"] == [2, 0, 3, 1]


def test_reshape_chain_collapses() -> None:
    m = make_model(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("Flatten", ["r"], ["f"], axis=2),
            helper.make_node("Reshape", ["f", "s1"], ["a"]),
            helper.make_node("Reshape", ["a", "s2"], ["y"]),
        ],
        [vi("x", [2, 3, 4])],
        [vi("y", [4, 6])],
        {"s1": _i64(24), "s2": _i64(4, -1)},
    )
    res, _ = _run(m, {"Relu": 1, "Reshape": 1})
    assert res.model.graph.nodes[-1].inputs[0].name == "r"


@pytest.mark.parametrize("order", ["unsqueeze_squeeze", "squeeze_unsqueeze"])
def test_squeeze_unsqueeze_pairs_cancel(order: str) -> None:
    first, second = (
        ("Unsqueeze", "Squeeze") if order == "unsqueeze_squeeze" else ("Squeeze", "Unsqueeze")
    )
    shape = [2, 3] if order == "unsqueeze_squeeze" else [2, 1, 3]
    m = make_model(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node(first, ["r", "a1"], ["m"]),
            helper.make_node(second, ["m", "a2"], ["n"]),
            helper.make_node("Neg", ["n"], ["y"]),
        ],
        [vi("x", shape)],
        [vi("y", shape)],
        {"a1": _i64(1), "a2": _i64(-2)},
    )
    _run(m, {"Relu": 1, "Neg": 1})


def test_pure_reshape_pair_back_to_the_input_shape_cancels() -> None:
    # Unsqueeze(Squeeze(x, [0]), [1]) on 1x1xC: different axes, same shape as x
    m = make_model(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("Squeeze", ["r", "a0"], ["m"]),
            helper.make_node("Unsqueeze", ["m", "a1"], ["n"]),
            helper.make_node("Neg", ["n"], ["y"]),
        ],
        [vi("x", [1, 1, 5])],
        [vi("y", [1, 1, 5])],
        {"a0": _i64(0), "a1": _i64(1)},
    )
    res, _ = _run(m, {"Relu": 1, "Neg": 1})
    assert res.stats == {"reshape_pair": 1}


@pytest.mark.parametrize(
    "op,value,swap",
    [
        ("Mul", 1.0, False),
        ("Mul", 1.0, True),
        ("Add", 0.0, True),
        ("Sub", 0.0, False),
        ("Div", 1.0, False),
    ],
)
def test_neutral_arithmetic_removed(op: str, value: float, swap: bool) -> None:
    ins = ["c", "r"] if swap else ["r", "c"]
    m = make_model(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node(op, ins, ["n"]),
            helper.make_node("Neg", ["n"], ["y"]),
        ],
        [vi("x", [2, 3])],
        [vi("y", [2, 3])],
        {"c": np.full((1, 3), value, np.float32)},
    )
    _run(m, {"Relu": 1, "Neg": 1})


# ---------------------------------------------------------------------------------------- negative


def test_cast_that_changes_type_stays() -> None:
    m = make_model(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("Cast", ["r"], ["c"], to=TensorProto.INT64),
            helper.make_node("Cast", ["c"], ["y"], to=F),
        ],
        [vi("x", [2, 3])],
        [vi("y", [2, 3])],
    )
    _run(m)


def test_transpose_pair_not_inverse_with_shared_inner_stays() -> None:
    m = make_model(
        [
            helper.make_node("Transpose", ["x"], ["t1"], perm=[0, 2, 1]),
            helper.make_node("Transpose", ["t1"], ["t2"], perm=[1, 0, 2]),
            helper.make_node("Relu", ["t1"], ["u"]),
        ],
        [vi("x", [2, 3, 4])],
        [vi("t2", [4, 2, 3]), vi("u", [2, 4, 3])],
    )
    _run(m)


def test_broadcasting_neutral_and_real_reshape_stay() -> None:
    m = make_model(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("Mul", ["r", "ones"], ["b"]),  # broadcasts to 2x2x3
            helper.make_node("Add", ["b", "two"], ["c"]),  # not neutral
            helper.make_node("Reshape", ["c", "s"], ["y"]),  # changes the shape
            helper.make_node("Slice", ["y", "st", "en"], ["z"]),
        ],  # takes a part
        [vi("x", [2, 3])],
        [vi("z", [1, 6])],
        {
            "ones": np.ones((2, 1, 1), np.float32),
            "two": np.full(3, 2.0, np.float32),
            "s": _i64(2, 6),
            "st": _i64(0),
            "en": _i64(1),
        },
    )
    _run(m)


def test_noop_between_graph_input_and_graph_output_stays() -> None:
    # removing the Cast would make the graph return its input under another name
    m = make_model([helper.make_node("Cast", ["x"], ["y"], to=F)], [vi("x", [2])], [vi("y", [2])])
    _run(m)


def test_squeeze_with_empty_axes_squeezes_all_and_stays() -> None:
    m = make_model(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("Squeeze", ["r", "ax"], ["n"]),
            helper.make_node("Unsqueeze", ["n", "ax1"], ["y"]),
        ],
        [vi("x", [1, 6, 1])],
        [vi("y", [1, 6])],
        {"ax": np.zeros(0, np.int64), "ax1": _i64(0)},
    )
    _run(m)


def test_cast_to_another_float_type_stays() -> None:
    m = make_model(
        [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.DOUBLE)],
        [vi("x", [2])],
        [vi("y", [2], TensorProto.DOUBLE)],
    )
    _run(m)


@pytest.mark.parametrize("end,removed", [(2**63 - 1, True), (2**31 - 1, False)])
def test_full_slice_of_unknown_dim(end: int, removed: bool) -> None:
    """silero-vad's STFT: Slice(x, 0, INT64_MAX) on an axis of unknown length takes everything;
    a smaller end might not (the dim is unknown)."""
    m = make_model(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("Slice", ["r", "st", "en", "ax"], ["n"]),
            helper.make_node("Neg", ["n"], ["y"]),
        ],
        [vi("x", ["b", 6])],
        [vi("y", ["b", 6])],
        {"st": _i64(0), "en": _i64(end), "ax": _i64(0)},
    )
    _run(m, {"Relu": 1, "Neg": 1} if removed else None, feeds={"x": np.ones((3, 6), np.float32)})
