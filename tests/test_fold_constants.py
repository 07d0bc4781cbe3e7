"""Tests for passes/fold_constants.py (fold-constants)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from conftest import real_or_skip
from helpers_graphs import make_model, vi
from onnx import TensorProto, helper

from graphopt.core.feeds import random_feeds
from graphopt.core.loader import load
from graphopt.core.model import Model
from graphopt.core.shapes import prepare
from graphopt.fixtures import fixture_path, real_model_feeds
from graphopt.jobs.optimize import optimize_model
from graphopt.passes import get_pass
from graphopt.testing import check_pass, op_counts

I64 = TensorProto.INT64


def _i64(*v: int) -> np.ndarray:
    return np.array(v, dtype=np.int64)


def _const_node(name: str, value: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(value))


def _prepared(model: Model) -> Model:
    return prepare(model)


def _ops(expected: dict[str, int]):
    def structure(r: Model) -> None:
        got = op_counts(r)
        assert got == expected, got

    return structure


def _branch(name: str, nodes: list[onnx.NodeProto], out: str, shape: list[int]) -> onnx.GraphProto:
    return helper.make_graph(nodes, name, [], [vi(out, shape)])


# ---------------------------------------------------------------------------------------- positive


def test_constant_nodes_become_initializers_and_chains_fold() -> None:
    # y = x + (c1 * c2 + 1), all of c1, c2 and 1 from Constant nodes
    m = make_model(
        [
            _const_node("c1", np.full((4,), 2.0, np.float32)),
            _const_node("c2", np.arange(4, dtype=np.float32)),
            _const_node("one", np.array(1.0, np.float32)),
            helper.make_node("Mul", ["c1", "c2"], ["p"]),
            helper.make_node("Add", ["p", "one"], ["q"]),
            helper.make_node("Add", ["x", "q"], ["y"]),
        ],
        [vi("x", [2, 4])],
        [vi("y", [2, 4])],
    )
    res, _ = check_pass(_prepared(m), "fold-constants", structure=_ops({"Add": 1}))
    assert res.stats["constants_lifted"] == 3 and res.stats["nodes_folded"] == 2
    add = res.model.graph.nodes[0]
    assert isinstance(add.inputs[1], gs.Constant)
    np.testing.assert_array_equal(add.inputs[1].values, np.arange(4) * 2.0 + 1.0)


def test_shape_chain_feeding_reshape_folds() -> None:
    # Paddle style: Shape -> Cast -> Slice -> Concat(.., [-1]) -> Reshape
    m = make_model(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("Shape", ["r"], ["s"]),
            helper.make_node("Cast", ["s"], ["s32"], to=TensorProto.INT32),
            helper.make_node("Slice", ["s32", "st", "en", "ax"], ["head"]),
            helper.make_node("Cast", ["head"], ["head64"], to=I64),
            helper.make_node("Concat", ["head64", "minus1"], ["shape"], axis=0),
            helper.make_node("Reshape", ["r", "shape"], ["y"]),
        ],
        [vi("x", [2, 3, 4, 5])],
        [vi("y", [2, 3, 20])],
        {"st": _i64(0), "en": _i64(2), "ax": _i64(0), "minus1": _i64(-1)},
    )

    def structure(r: Model) -> None:
        assert op_counts(r) == {"Relu": 1, "Reshape": 1}
        shape = r.graph.nodes[-1].inputs[1]
        assert isinstance(shape, gs.Constant)
        np.testing.assert_array_equal(shape.values, [2, 3, -1])

    res, _ = check_pass(_prepared(m), "fold-constants", structure=structure)
    assert res.stats["shapes_folded"] == 1


def test_size_and_shape_with_start_end() -> None:
    m = make_model(
        [
            helper.make_node("Shape", ["x"], ["s"], start=1, end=-1),
            helper.make_node("Size", ["x"], ["n"]),
            helper.make_node("ReduceProd", ["s"], ["p"], keepdims=1),
            helper.make_node("Unsqueeze", ["n", "zero"], ["n1"]),
            helper.make_node("Concat", ["p", "n1"], ["shape"], axis=0),
            helper.make_node("Cast", ["shape"], ["f"], to=TensorProto.FLOAT),
            helper.make_node("ReduceSum", ["x"], ["xs"], keepdims=0),
            helper.make_node("Add", ["xs", "f"], ["y"]),
        ],
        [vi("x", [2, 3, 4, 5])],
        [vi("y", [2])],
        {"zero": _i64(0)},
    )

    def structure(r: Model) -> None:
        assert op_counts(r) == {"ReduceSum": 1, "Add": 1}
        np.testing.assert_array_equal(r.graph.nodes[-1].inputs[1].values, [12.0, 120.0])

    check_pass(_prepared(m), "fold-constants", structure=structure)


def test_static_dims_of_a_partly_dynamic_shape_fold() -> None:
    # x.view(-1, x.size(1) * x.size(2)) with a dynamic batch: the static dims 1 and 2 fold
    m = make_model(
        [
            helper.make_node("Shape", ["x"], ["s"]),
            helper.make_node("Gather", ["s", "one"], ["d1"], axis=0),
            helper.make_node("Slice", ["s", "two", "three"], ["d2"]),
            helper.make_node("Mul", ["d1", "d2"], ["d12"]),
            helper.make_node("Concat", ["minus1", "d12"], ["shape"], axis=0),
            helper.make_node("Reshape", ["x", "shape"], ["y"]),
        ],
        [vi("x", ["N", 3, 4])],
        [vi("y", ["N", 12])],
        {"one": _i64(1), "two": _i64(2), "three": _i64(3), "minus1": _i64(-1)},
    )

    def structure(r: Model) -> None:
        reshape = next(n for n in r.graph.nodes if n.op == "Reshape")
        assert isinstance(reshape.inputs[1], gs.Constant)
        np.testing.assert_array_equal(reshape.inputs[1].values, [-1, 12])
        assert op_counts(r) == {"Shape": 1, "Reshape": 1}  # the Shape is dead now

    res, _ = check_pass(
        _prepared(m),
        "fold-constants",
        structure=structure,
        feeds={"x": np.ones((5, 3, 4), np.float32)},
    )
    assert res.stats["partial_shapes"] == 2


def test_if_with_constant_condition_is_inlined_fixture() -> None:
    m = _prepared(load(fixture_path("if_model.onnx")))
    assert op_counts(m)["If"] == 2

    def structure(r: Model) -> None:
        ifs = [n for n in r.graph.nodes if n.op == "If"]
        assert len(ifs) == 1  # the data-dependent If stays
        assert ifs[0].inputs[0].name == "is_positive_out"
        assert [t.name for t in r.graph.outputs] == ["y"]
        # use_scale is true: the then branch (Mul by a scale, Add a bias) now lives in the graph
        assert {"Mul", "Add"} <= {n.op for n in r.graph.nodes}
        assert r.graph.outputs[0].inputs[0].op == "Add"

    res, _ = check_pass(m, "fold-constants", structure=structure)
    assert res.stats["ifs_inlined"] == 1


def test_if_inlined_branch_output_is_graph_output_and_names_do_not_clash() -> None:
    # the constant If's then branch and the data-dependent If's branch both define 'h': once the
    # first is inlined into the main graph, its 'h' must be renamed (no shadowing)
    then1 = _branch(
        "then1",
        [helper.make_node("Neg", ["x"], ["h"]), helper.make_node("Relu", ["h"], ["t_out"])],
        "t_out",
        [3],
    )
    else1 = _branch("else1", [helper.make_node("Abs", ["x"], ["e_out"])], "e_out", [3])
    then2 = _branch(
        "then2",
        [helper.make_node("Sigmoid", ["x"], ["h"]), helper.make_node("Neg", ["h"], ["t2"])],
        "t2",
        [3],
    )
    else2 = _branch("else2", [helper.make_node("Identity", ["x"], ["e2"])], "e2", [3])
    m = make_model(
        [
            helper.make_node("If", ["cond"], ["y"], then_branch=then1, else_branch=else1),
            helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
            helper.make_node("Greater", ["s", "zero"], ["c2"]),
            helper.make_node("If", ["c2"], ["w"], then_branch=then2, else_branch=else2),
            helper.make_node("Add", ["y", "w"], ["z"]),
        ],
        [vi("x", [3])],
        [vi("z", [3]), vi("y", [3])],
        {"cond": np.array(True), "zero": np.array(0.0, np.float32)},
    )

    def structure(r: Model) -> None:
        assert op_counts(r) == {
            "Neg": 2,
            "Relu": 1,
            "Add": 1,
            "If": 1,
            "ReduceSum": 1,
            "Greater": 1,
            "Sigmoid": 1,
            "Identity": 1,
        }
        assert [t.name for t in r.graph.outputs] == ["z", "y"]
        assert r.graph.outputs[1].inputs[0].op == "Relu"  # the branch's producer writes 'y'
        main = {o.name for n in r.graph.nodes for o in n.outputs}
        assert "h" not in main

    for x in ([1.0, 2.0, 3.0], [-1.0, -2.0, 0.5]):
        check_pass(
            _prepared(m),
            "fold-constants",
            structure=structure,
            feeds={"x": np.array(x, np.float32)},
        )


def test_folding_inside_a_subgraph() -> None:
    # the branch computes x * (c * c): c * c folds inside the branch; the If stays (data cond)
    then_g = _branch(
        "then",
        [
            helper.make_node("Mul", ["c", "c"], ["cc"]),
            helper.make_node("Mul", ["x", "cc"], ["t_out"]),
        ],
        "t_out",
        [3],
    )
    else_g = _branch("else", [helper.make_node("Identity", ["x"], ["e_out"])], "e_out", [3])
    m = make_model(
        [
            helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
            helper.make_node("Greater", ["s", "zero"], ["cond"]),
            helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g),
        ],
        [vi("x", [3])],
        [vi("y", [3])],
        {"c": np.full(3, 3.0, np.float32), "zero": np.array(0.0, np.float32)},
    )

    def structure(r: Model) -> None:
        ifn = next(n for n in r.graph.nodes if n.op == "If")
        body = ifn.attrs["then_branch"]
        assert [n.op for n in body.nodes] == ["Mul"]
        np.testing.assert_array_equal(body.nodes[0].inputs[1].values, np.full(3, 9.0))

    feeds = [
        {"x": np.array([1.0, 2.0, 3.0], np.float32)},
        {"x": np.array([-1.0, -2.0, 0.5], np.float32)},
    ]
    for f in feeds:
        check_pass(_prepared(m), "fold-constants", structure=structure, feeds=f)


def test_folding_inside_a_loop_body_with_outer_captures() -> None:
    # v <- v + c * c, three times; c is captured from the main graph, c * c folds in the body
    body = helper.make_graph(
        [
            helper.make_node("Mul", ["c", "c"], ["cc"]),
            helper.make_node("Add", ["v_in", "cc"], ["v_out"]),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "body",
        [vi("i", [], TensorProto.INT64), vi("cond_in", [], TensorProto.BOOL), vi("v_in", [3])],
        [vi("cond_out", [], TensorProto.BOOL), vi("v_out", [3])],
    )
    m = make_model(
        [helper.make_node("Loop", ["trips", "true", "x"], ["y"], body=body)],
        [vi("x", [3])],
        [vi("y", [3])],
        {
            "c": np.array([1.0, 2.0, 3.0], np.float32),
            "trips": np.array(3, np.int64),
            "true": np.array(True),
        },
    )

    def structure(r: Model) -> None:
        body = r.graph.nodes[0].attrs["body"]
        assert [n.op for n in body.nodes] == ["Add", "Identity"]
        np.testing.assert_array_equal(body.nodes[0].inputs[1].values, [1.0, 4.0, 9.0])

    check_pass(_prepared(m), "fold-constants", structure=structure)


def test_folded_graph_output_keeps_its_name() -> None:
    m = make_model(
        [helper.make_node("Mul", ["a", "b"], ["k"]), helper.make_node("Add", ["x", "k"], ["y"])],
        [vi("x", [2])],
        [vi("y", [2]), vi("k", [2])],
        {"a": np.array([1.0, 2.0], np.float32), "b": np.array([3.0, 4.0], np.float32)},
    )

    def structure(r: Model) -> None:
        assert [t.name for t in r.graph.outputs] == ["y", "k"]
        producer = r.graph.outputs[1].inputs[0]
        assert producer.op == "Constant"
        np.testing.assert_array_equal(producer.attrs["value"].values, [3.0, 8.0])

    check_pass(_prepared(m), "fold-constants", structure=structure)
    # a second run changes nothing (the Constant node producing a graph output stays)
    once = _prepared(m)
    get_pass("fold-constants")(once)
    check_pass(once, "fold-constants", expect_modified=False)


def test_large_lazy_value_is_not_materialized_but_small_reduction_is() -> None:
    big = [512, 1024]  # 2 MiB of float32 from a 16-byte shape constant
    m = make_model(
        [
            helper.make_node(
                "ConstantOfShape",
                ["shape"],
                ["z"],
                value=onnx.numpy_helper.from_array(np.array([0.5], np.float32)),
            ),
            helper.make_node("ReduceSum", ["z"], ["s"], keepdims=0),
            helper.make_node("Add", ["x", "s"], ["y"]),
        ],
        [vi("x", [2])],
        [vi("y", [2])],
        {"shape": _i64(*big)},
    )
    res, _ = check_pass(_prepared(m), "fold-constants", structure=_ops({"Add": 1}))
    assert res.stats["kept_large"] == 1
    np.testing.assert_allclose(res.model.graph.nodes[0].inputs[1].values, 0.5 * 512 * 1024)


# ---------------------------------------------------------------------------------------- negative


def _expand_model() -> Model:
    return make_model(
        [
            helper.make_node(
                "ConstantOfShape",
                ["shape"],
                ["z"],
                value=onnx.numpy_helper.from_array(np.array([0.5], np.float32)),
            ),
            helper.make_node("Add", ["x", "z"], ["y"]),
        ],
        [vi("x", [512, 1024])],
        [vi("y", [512, 1024])],
        {"shape": _i64(512, 1024)},
    )


def test_large_folded_tensor_is_kept_lazy() -> None:
    res, _ = check_pass(_prepared(_expand_model()), "fold-constants", expect_modified=False)
    assert res.stats["kept_large"] == 1


def test_size_limit_option_allows_large_fold() -> None:
    check_pass(
        _prepared(_expand_model()), "fold-constants", size_limit=4 << 20, structure=_ops({"Add": 1})
    )


def test_shape_of_dynamic_dim_stays() -> None:
    m = make_model(
        [
            helper.make_node("Shape", ["x"], ["s"]),
            helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
            helper.make_node("Unsqueeze", ["n", "zero1"], ["n1"]),
            helper.make_node("Concat", ["n1", "minus1"], ["shape"], axis=0),
            helper.make_node("Reshape", ["x", "shape"], ["y"]),
        ],
        [vi("x", ["N", 3, 4])],
        [vi("y", ["N", 12])],
        {"zero": np.array(0, np.int64), "zero1": _i64(0), "minus1": _i64(-1)},
    )
    prepared = _prepared(m)
    feeds = [random_feeds(prepared, seed=k, draw=k) for k in range(2)]  # N = 1 and 3

    def structure(out: Model) -> None:
        # N is not folded to the value of one run: the shape says "copy dim 0" instead
        r = next(n for n in out.graph.nodes if n.op == "Reshape")
        assert r.inputs[1].values.tolist() == [0, -1]

    res, _ = check_pass(prepared, "fold-constants", feeds=feeds, structure=structure)
    assert res.stats["symbolic_reshapes"] == 1 and res.stats["shapes_folded"] == 0


def test_shape_observed_on_one_input_of_a_data_dependent_op_stays() -> None:
    # NonZero's output length depends on the values; the IR has the length onnxruntime observed
    # on prepare's dummy input, which must not be folded
    m = make_model(
        [
            helper.make_node("NonZero", ["x"], ["nz"]),
            helper.make_node("Cast", ["nz"], ["nzf"], to=TensorProto.FLOAT),
            helper.make_node("Relu", ["nzf"], ["r"]),
            helper.make_node("Shape", ["r"], ["s"]),
            helper.make_node("Cast", ["s"], ["y"], to=TensorProto.FLOAT),
        ],
        [vi("x", [6])],
        [vi("y", [2])],
    )
    m = _prepared(m)
    assert m.graph.nodes[2].outputs[0].shape == [1, 6]  # observed, not inferred
    x = np.array([1.0, 0.0, 2.0, 0.0, 0.0, 3.0], np.float32)
    check_pass(m, "fold-constants", expect_modified=False, feeds={"x": x})


def test_if_with_data_dependent_condition_stays() -> None:
    then_g = _branch("then", [helper.make_node("Relu", ["x"], ["t_out"])], "t_out", [3])
    else_g = _branch("else", [helper.make_node("Neg", ["x"], ["e_out"])], "e_out", [3])
    m = make_model(
        [
            helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
            helper.make_node("Greater", ["s", "zero"], ["cond"]),
            helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g),
        ],
        [vi("x", [3])],
        [vi("y", [3])],
        {"zero": np.array(0.0, np.float32)},
    )
    check_pass(_prepared(m), "fold-constants", expect_modified=False)


def test_weight_that_is_a_graph_input_is_not_folded() -> None:
    # 'w' has an initializer (a default value) but is a graph input: callers may override it
    m = make_model(
        [
            helper.make_node("Mul", ["w", "two"], ["w2"]),
            helper.make_node("Add", ["x", "w2"], ["y"]),
        ],
        [vi("x", [2]), vi("w", [2])],
        [vi("y", [2])],
        {"w": np.ones(2, np.float32), "two": np.full(2, 2.0, np.float32)},
    )
    feeds = {"x": np.ones(2, np.float32), "w": np.array([3.0, -1.0], np.float32)}
    check_pass(_prepared(m), "fold-constants", expect_modified=False, feeds=feeds)


def test_dead_branch_onnxruntime_would_refuse_once_folded_is_left_alone() -> None:
    # The else branch is never taken (flag == 1). In it, an If on rank(x) == 3 picks between a
    # rank-4 and a rank-2 value for a Conv; at the fixed 1x4 input that condition folds to false,
    # which hands the Conv a rank-2 input: onnxruntime refuses such a model at load time. The
    # pass must notice and leave the branch as it was.
    inner_then = _branch(
        "it", [helper.make_node("Unsqueeze", ["x", "ax01"], ["u4"])], "u4", [1, 1, 1, 4]
    )
    inner_else = _branch("ie", [helper.make_node("Identity", ["x"], ["u2"])], "u2", [1, 4])
    else_g = helper.make_graph(
        [
            helper.make_node("Shape", ["x"], ["sx"]),
            helper.make_node("Size", ["sx"], ["rank"]),
            helper.make_node("Equal", ["rank", "three"], ["c3"]),
            helper.make_node("If", ["c3"], ["u"], then_branch=inner_then, else_branch=inner_else),
            helper.make_node("Conv", ["u", "w"], ["cv"]),
            helper.make_node("Flatten", ["cv"], ["e_out"], axis=0),
        ],
        "else",
        [],
        [vi("e_out", [1, 4])],
    )
    then_g = _branch("then", [helper.make_node("Relu", ["x"], ["t_out"])], "t_out", [1, 4])
    m = make_model(
        [
            helper.make_node("Equal", ["flag", "one"], ["cond"]),
            helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g),
        ],
        [vi("x", [1, 4]), vi("flag", [], I64)],
        [vi("y", [1, 4])],
        {
            "one": np.array(1, np.int64),
            "three": np.array(3, np.int64),
            "ax01": _i64(0, 1),
            "w": np.ones((1, 1, 1, 1), np.float32),
        },
    )
    feeds = {"x": np.arange(4, dtype=np.float32).reshape(1, 4) - 2, "flag": np.array(1)}
    res, _ = check_pass(_prepared(m), "fold-constants", expect_modified=False, feeds=feeds)
    assert res.stats["subgraphs_only_lifted"] == 1


def test_random_and_qdq_nodes_are_never_folded() -> None:
    m = make_model(
        [
            helper.make_node("RandomNormal", [], ["r"], shape=[2], seed=1.0),
            helper.make_node("DequantizeLinear", ["q", "scale"], ["w"]),
            helper.make_node("Add", ["x", "w"], ["y"]),
            helper.make_node("Add", ["y", "r"], ["z"]),
        ],
        [vi("x", [2])],
        [vi("z", [2])],
        {"q": np.array([1, 2], np.int8), "scale": np.array(0.5, np.float32)},
    )
    m = _prepared(m)
    res = get_pass("fold-constants")(m)
    assert not res.modified
    assert op_counts(res.model) == {"Add": 2, "RandomNormal": 1, "DequantizeLinear": 1}


def test_unknown_domain_nodes_are_never_folded() -> None:
    m = make_model(
        [helper.make_node("Add", ["x", "c"], ["y"])],
        [vi("x", [2])],
        [vi("y", [2])],
        {"c": np.ones(2, np.float32)},
    )
    m.graph.nodes.insert(
        0,
        gs.Node(
            "Custom",
            name="custom",
            domain="my.domain",
            inputs=[gs.Constant("k", np.ones(2, np.float32))],
            outputs=[gs.Variable("u", dtype=np.float32, shape=[2])],
        ),
    )
    res = get_pass("fold-constants")(m)
    assert not res.modified
    assert "my.domain.Custom" in op_counts(res.model)


# ---------------------------------------------------------------------------------------- real


@pytest.mark.real
@pytest.mark.parametrize("name", ["det", "rec", "cls", "silero"])
def test_real_models_default_pipeline(name: str) -> None:
    path, shapes = real_or_skip(name)
    model = load(path)
    before = model.num_nodes()
    res = optimize_model(model, input_shapes=shapes, feeds=real_model_feeds(name))
    assert res.verify is not None and res.verify.ok, res.verify.to_json() if res.verify else None
    after = res.model.num_nodes()
    assert after < before
    stats = res.stats()
    assert stats["fold-constants"]["constants_lifted"] > 0
    if name != "silero":
        assert "Constant" not in op_counts(res.model)
        assert "Shape" not in op_counts(res.model)  # shape chains folded at the fixed shapes
    else:
        assert [t.name for t in res.model.graph.outputs] == ["output", "stateN"]
        assert res.model.num_subgraphs() > 0


def test_local_topo_order_sorts_an_unsorted_graph_and_keeps_a_sorted_one() -> None:
    from graphopt.core.graph import local_topo_order

    x, a, b, y = (gs.Variable(n, np.float32, [2]) for n in "xaby")
    n1 = gs.Node("Relu", inputs=[x], outputs=[a])
    n2 = gs.Node("Neg", inputs=[a], outputs=[b])
    n3 = gs.Node("Abs", inputs=[b], outputs=[y])
    assert local_topo_order(gs.Graph(nodes=[n3, n1, n2], inputs=[x], outputs=[y])) == [n1, n2, n3]
    assert local_topo_order(gs.Graph(nodes=[n1, n2, n3], inputs=[x], outputs=[y])) == [n1, n2, n3]
