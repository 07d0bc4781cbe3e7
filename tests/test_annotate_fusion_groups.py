"""annotate-fusion-groups: Conv+activation(+pool) groups recorded for the TVM back end; the graph
is unchanged; portable optimize outputs carry no TVM metadata."""

from __future__ import annotations

import pytest
from fusion_graphs import build, node, rand

from graphopt.algorithms.tvm.fusion import METADATA_KEY, recorded_groups
from graphopt.core.model import Model
from graphopt.jobs.optimize import optimize_model
from graphopt.testing import check_pass, op_counts

P = "annotate-fusion-groups"


def _conv_act(act: list, outputs: tuple[str, ...] = ("y",), opset: int = 17) -> Model:
    return build(
        [node("Conv", ["x", "w", "b"], "c", pads=[1, 1, 1, 1]), *act],
        {"x": (1, 3, 6, 6)},
        list(outputs),
        {"w": rand(4, 3, 3, 3), "b": rand(4)},
        opset=opset,
    )


def test_records_groups_with_pool_and_changes_no_node(load_fixture) -> None:
    m = optimize_model(load_fixture("cnn.onnx"), passes=["fuse-conv-bn"], verify_output=False).model
    before = op_counts(m)
    res, _ = check_pass(m, P, structure=lambda mm: op_counts(mm) == before or pytest.fail("ops"))
    ops = {n.name: n.op for n in res.model.graph.nodes}
    assert [[ops[n] for n in g] for g in recorded_groups(res.model)] == [
        ["Conv", "Relu", "MaxPool"]
    ] * 2
    assert res.stats == {"groups": 2, "with_pool": 2}
    # a second run finds the same groups: nothing to change (fixed point)
    check_pass(res.model, P, expect_modified=False)


def test_silu_and_hardswish_units() -> None:
    m = _conv_act([node("Sigmoid", ["c"], "s"), node("Mul", ["c", "s"], "y")])
    res, _ = check_pass(m, P)
    assert len(recorded_groups(res.model)[0]) == 3
    m2 = _conv_act(
        [node("HardSigmoid", ["c"], "s", alpha=1 / 6, beta=0.5), node("Mul", ["s", "c"], "y")],
        opset=12,
    )
    res2, _ = check_pass(m2, P)
    assert len(recorded_groups(res2.model)[0]) == 3


@pytest.mark.parametrize("case", ["conv_out_escapes", "two_readers", "hsig_0.2_gate"])
def test_negatives(case: str) -> None:
    if case == "conv_out_escapes":
        m = _conv_act([node("Relu", ["c"], "y")], outputs=("y", "c"))
    elif case == "two_readers":
        m = _conv_act([node("Relu", ["c"], "y"), node("Tanh", ["c"], "z")], outputs=("y", "z"))
    else:
        m = _conv_act([node("HardSigmoid", ["c"], "s"), node("Mul", ["s", "c"], "y")])
    res, _ = check_pass(m, P, expect_modified=False)
    assert METADATA_KEY not in res.model.metadata


@pytest.mark.parametrize("name", ["cnn.onnx", "mobilenet_block.onnx"])
def test_portable_optimize_carries_no_tvm_metadata(load_fixture, name: str) -> None:
    res = optimize_model(load_fixture(name), target="portable")
    assert res.verify is not None and res.verify.ok
    assert not any(k.startswith("graphopt.fusion") for k in res.model.metadata), res.model.metadata
    assert "annotate-fusion-groups" not in res.stats() and "fuse-conv-activation" not in res.stats()
    # the groups are still there to find, for the back end that wants them
    check_pass(res.model, P, structure=lambda mm: bool(recorded_groups(mm)) or pytest.fail("none"))
