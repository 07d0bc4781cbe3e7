"""Shape handling: input specs, fixing dims, inference that ignores wrong declarations, ORT
fallback."""

from __future__ import annotations

import numpy as np
import pytest
from helpers_graphs import make_model, vi
from onnx import TensorProto, helper

from graphopt.core.errors import ShapeError
from graphopt.core.model import Model
from graphopt.core.shapes import (
    fix_input_shapes,
    infer_shapes,
    missing_shapes,
    parse_input_shapes,
    static_input_shapes,
)


def test_parse_specs() -> None:
    assert parse_input_shapes(["x:1x3x640x640", "y:2,5", "s:"]) == {
        "x": (1, 3, 640, 640),
        "y": (2, 5),
        "s": (),
    }
    assert parse_input_shapes(["a:b:1x2"]) == {"a:b": (1, 2)}
    for bad in ("x", "x:1xax3", "x:0x3", "x:-1x3", "x:1x4294967296"):
        with pytest.raises(ShapeError):
            parse_input_shapes([bad])


def test_parse_mappings_and_one_string() -> None:
    """Recipe tables and the Python API go through the same parser."""
    assert parse_input_shapes({"x": "1x3x8x8", "y": [2, 5], "s": (), "t": ""}) == {
        "x": (1, 3, 8, 8),
        "y": (2, 5),
        "s": (),
        "t": (),
    }
    assert parse_input_shapes("x:1x3") == {"x": (1, 3)}
    assert parse_input_shapes(None) == {} and parse_input_shapes([]) == {}
    for bad in (
        {"x": [1, 0]},
        {"x": [True, 2]},
        {"x": [1.5]},
        {"x": "1xa"},
        {"x": 3},
        {"x": [2**31]},
    ):
        with pytest.raises(ShapeError, match="'x'"):
            parse_input_shapes(bad)  # type: ignore[arg-type]


def test_static_input_shapes() -> None:
    m = _relu(["N", 3])
    assert static_input_shapes(m, {"x": (2, 3)}) == {"x": (2, 3)}
    with pytest.raises(ShapeError, match="dynamic shape"):
        static_input_shapes(m)
    with pytest.raises(ShapeError, match="unknown inputs"):
        static_input_shapes(m, {"z": (1,)})
    assert static_input_shapes(_relu([4, 3])) == {"x": (4, 3)}


def test_static_input_shapes_scalar_is_fixed_and_unknown_rank_is_dynamic() -> None:
    """silero-vad's ``sr`` input is a declared scalar: compile refused it as "dynamic shape []"
    (bench/corpus.py, exit 2). A scalar's shape is (); an input without a shape stays dynamic."""
    assert static_input_shapes(_relu([])) == {"x": ()}
    unknown = _relu([4])
    unknown.graph.inputs[0].shape = None  # no shape at all: the rank is unknown
    with pytest.raises(ShapeError, match="dynamic shape"):
        static_input_shapes(unknown)


def _relu(shape: list[int | str | None]) -> Model:
    return make_model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", shape)], [vi("y", shape)])


def test_fix_input_shapes_errors() -> None:
    m = _relu(["N", 3, "H", "W"])
    with pytest.raises(ShapeError, match="inputs are: x"):
        fix_input_shapes(m, {"z": (1, 3, 4, 4)})
    with pytest.raises(ShapeError, match="rank"):
        fix_input_shapes(m, {"x": (1, 3, 4)})
    with pytest.raises(ShapeError, match="fixed dim 1 = 3"):
        fix_input_shapes(m, {"x": (1, 4, 4, 4)})
    fix_input_shapes(m, {"x": (1, 3, 4, 5)})
    infer_shapes(m)
    assert m.graph.outputs[0].shape == [1, 3, 4, 5]


def test_wrong_declared_output_shape_not_trusted() -> None:
    # a CRNN-like model declaring a rank-2 output for a rank-3 result
    nodes = [helper.make_node("Transpose", ["x"], ["y"], perm=[1, 0, 2])]
    m = make_model(nodes, [vi("x", [1, 40, 97])], [vi("y", ["a", "b"])])
    infer_shapes(m)
    assert m.graph.outputs[0].shape == [40, 1, 97]


def test_ort_fallback_fills_what_onnx_cannot() -> None:
    # Reshape to a shape computed through Div/Cast/Range: ONNX's data propagation gives up
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Div", ["s", "two"], ["h"]),
        helper.make_node("ReduceProd", ["h"], ["p"], keepdims=1),
        helper.make_node("Concat", ["p", "minus1"], ["shape"], axis=0),
        helper.make_node("Reshape", ["x", "shape"], ["r"]),
        helper.make_node("Relu", ["r"], ["y"]),
    ]
    inits = {"two": np.array([1, 2], np.int64), "minus1": np.array([-1], np.int64)}
    m = make_model(nodes, [vi("x", [4, 6])], [vi("y", ["a", "b"])], inits)
    infer_shapes(m, ort_fallback=False)
    assert {"r", "y"} <= set(missing_shapes(m))  # ONNX alone cannot tell
    infer_shapes(m)
    assert m.graph.outputs[0].shape == [12, 2]
    assert not missing_shapes(m)
    assert m.graph.outputs[0].dtype == np.float32
    assert TensorProto.FLOAT == 1
