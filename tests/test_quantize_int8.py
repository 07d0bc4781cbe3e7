"""The quantize-int8 pass: the pass contract on a fixture (SQNR, structure: per-channel int8
weights), and the negative cases where nothing may change. The quantize job is tested in
tests/test_quantize.py."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper
from test_quantize import calib_feeds

from graphopt.core.loader import load
from graphopt.core.model import Model
from graphopt.core.shapes import prepare
from graphopt.fixtures import fixture_path
from graphopt.jobs.quantize import quantize
from graphopt.passes.quantize_int8 import QuantizeInt8Pass
from graphopt.testing import check_pass, op_counts


def test_pass_contract_positive_and_structure() -> None:
    m = load(fixture_path("residual.onnx"))
    prepare(m)

    def structure(q: Model) -> None:
        ops = op_counts(q)
        assert ops["QuantizeLinear"] >= 3 and ops["DequantizeLinear"] >= ops["QuantizeLinear"] + 2
        weights = [
            n for n in q.graph.nodes if n.op == "DequantizeLinear" and n.inputs[0].dtype == np.int8
        ]
        assert weights and all(n.attrs.get("axis") == 0 for n in weights)  # per channel

    check_pass(m, QuantizeInt8Pass(calib=calib_feeds(m, 8)), min_sqnr_db=25, structure=structure)


def test_no_quantizable_op_leaves_model_unchanged() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    c = helper.make_tensor("c", TensorProto.FLOAT, [4], [1, 2, 3, 4])
    g = helper.make_graph(
        [
            helper.make_node("Relu", ["x"], ["r"], name="relu"),
            helper.make_node("Add", ["r", "c"], ["y"], name="add"),
        ],
        "g",
        [x],
        [y],
        [c],
    )
    m = Model.from_onnx(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]))
    check_pass(m, QuantizeInt8Pass(calib=calib_feeds(m, 4)), expect_modified=False)
    res = quantize(m, calib_feeds(m, 4))
    assert "QuantizeLinear" not in op_counts(res.model)


def test_weight_that_is_a_graph_input_stays_float() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 6, 6])
    w = helper.make_tensor_value_info("w", TensorProto.FLOAT, [3, 2, 3, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], "g", [x, w], [y]
    )
    m = Model.from_onnx(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]))
    check_pass(m, QuantizeInt8Pass(calib=calib_feeds(m, 4)), expect_modified=False)
