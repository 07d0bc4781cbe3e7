"""Regression tests for failures found by the fuzzer (tests/test_fuzz.py) and hostile input.

Each test rebuilds the (shrunk) failing graph explicitly, names the bug, and checks the property
that failed: the pass's output computes what its input computed (fp32 tolerance) and passes
onnx.checker.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.core.feeds import random_feeds
from graphopt.core.model import Model
from graphopt.core.shapes import prepare
from graphopt.core.verify import verify
from graphopt.jobs.optimize import ATOL, RTOL, optimize_model
from graphopt.passes import get_pass, registered_passes
from graphopt.testing import fingerprint


def _model(
    nodes: list[onnx.NodeProto],
    inputs: list[tuple[str, list[int]]],
    outputs: list[tuple[str, list[int]]],
    inits: dict[str, np.ndarray],
    extra_inputs: Sequence[str] = (),
) -> Model:
    vis = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs]
    vis += [
        helper.make_tensor_value_info(
            n, helper.np_dtype_to_tensor_dtype(inits[n].dtype), list(inits[n].shape)
        )
        for n in extra_inputs
    ]
    g = helper.make_graph(
        nodes,
        "regression",
        vis,
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.checker.check_model(proto, full_check=True)
    return prepare(Model.from_onnx(proto))


def _exact_after(name: str, m: Model) -> Model:
    if name not in registered_passes():
        pytest.skip(f"pass {name} is not registered")
    original = m.clone()
    before = fingerprint(original)
    result = get_pass(name)(m.clone())
    assert fingerprint(original) == before
    onnx.checker.check_model(result.model.to_onnx(), full_check=True)
    rep = verify(
        original,
        result.model,
        feeds=[random_feeds(original, seed=s) for s in (0, 1)],
        rtol=RTOL,
        atol=ATOL,
    )
    assert rep.ok, rep.to_json()
    return result.model


def test_fuse_pad_all_zero_pads_before_conv() -> None:
    """fuse-pad: ``Pad(x, pads=0) -> Conv 1x1`` raised AssertionError in the rule's rewrite (the Pad
    was read again after the engine had detached the matched nodes). Found by the fuzzer."""
    w = np.full((1, 1, 1, 1), 0.12573022, np.float32)
    m = _model(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("Pad", ["r", "pads"], ["p"], mode="constant"),
            helper.make_node("Conv", ["p", "w"], ["y"], kernel_shape=[1, 1]),
        ],
        [("x", [1, 1, 3, 3])],
        [("y", [1, 1, 3, 3])],
        {"pads": np.zeros(8, np.int64), "w": w},
    )
    out = _exact_after("fuse-pad", m)
    assert "Pad" not in out.op_histogram()
    res = optimize_model(m)
    assert res.verify is not None and res.verify.ok


def test_ir_keeps_initializer_that_is_also_a_graph_input() -> None:
    """Core (graphopt/core/model.py): graphsurgeon turned an initializer listed among the graph
    inputs (an overridable default) into a constant and dropped the input, changing the model's
    interface and letting passes fold a value the caller may override. Found by the fuzzer's IR
    round trip."""
    w = np.arange(10, dtype=np.float32).reshape(5, 2) / 10
    m = _model(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        [("x", [1, 5])],
        [("y", [1, 2])],
        {"w": w},
        extra_inputs=["w"],
    )
    assert [t.name for t in m.graph.inputs] == ["x", "w"]
    proto = m.to_onnx()
    assert [i.name for i in proto.graph.input] == ["x", "w"]
    assert [t.name for t in proto.graph.initializer] == ["w"]
    feeds = {"x": np.ones((1, 5), np.float32), "w": np.ones((5, 2), np.float32)}
    rep = verify(proto, m.clone(), feeds=feeds, rtol=0, atol=0)
    assert rep.ok, rep.to_json()
    # every pass leaves the overridable weight alone: feeding it still changes the result
    res = optimize_model(m)
    out = res.model.to_onnx()
    assert "w" in [i.name for i in out.graph.input]
    rep = verify(proto, out, feeds=feeds, rtol=RTOL, atol=ATOL)
    assert rep.ok, rep.to_json()


def _proof(m: Model, inplace: bool = True) -> None:
    try:
        from graphopt.algorithms.memory.arena import prove
        from graphopt.jobs.plan import plan_model as plan_memory
    except ImportError:
        pytest.skip("graphopt.jobs.plan or graphopt.algorithms.memory.arena has not landed")
    for strategy in ("greedy-size", "greedy-breadth", "best"):
        plan = plan_memory(m, strategy=strategy, inplace=inplace)
        assert plan.model is not None
        report = prove(plan.model, plan, feeds=random_feeds(m, seed=0))
        assert report.ok, f"{strategy}: {report.to_json()}"


_BN = {
    "s": np.array([1.06], np.float32),
    "b": np.array([-0.07], np.float32),
    "mu": np.array([0.32], np.float32),
    "var": np.array([0.52], np.float32),
}


def test_memory_plan_inplace_never_overwrites_a_graph_output() -> None:
    """plan-memory (graphopt/algorithms/memory/planner.py merge_buffers): at the last step,
    BatchNormalization ran in place on ``relu``, an intermediate that is also a graph output,
    clobbering that output (a graph output's lifetime ends at the last step, so "its last reader is
    this node" held). Fuzzer."""
    m = _model(
        [
            helper.make_node("Relu", ["x"], ["relu"]),
            helper.make_node("BatchNormalization", ["relu", "s", "b", "mu", "var"], ["bn"]),
        ],
        [("x", [1, 1, 3, 3])],
        [("bn", [1, 1, 3, 3]), ("relu", [1, 1, 3, 3])],
        dict(_BN),
    )
    _proof(m)


def test_memory_plan_inplace_never_overwrites_an_output_through_an_alias() -> None:
    """plan-memory: ``Relu`` ran in place on a Reshape view of ``bn``, a graph output; the alias
    shares ``bn``'s bytes, so the output was overwritten. Found by the fuzzer."""
    m = _model(
        [
            helper.make_node("BatchNormalization", ["x", "s", "b", "mu", "var"], ["bn"]),
            helper.make_node("Shape", ["bn"], ["shp"]),
            helper.make_node("Gather", ["shp", "i0"], ["n"], axis=0),
            helper.make_node("Concat", ["n", "m1"], ["tgt"], axis=0),
            helper.make_node("Reshape", ["bn", "tgt"], ["flat"]),
            helper.make_node("Relu", ["flat"], ["r1"]),
            helper.make_node("Relu", ["r1"], ["r2"]),
            helper.make_node("Relu", ["flat"], ["y"]),
        ],
        [("x", [1, 1, 3, 3])],
        [("y", [1, 9]), ("bn", [1, 1, 3, 3])],
        dict(_BN, i0=np.array([0], np.int64), m1=np.array([-1], np.int64)),
    )
    _proof(m)


def test_overridable_weight_is_fed_when_verifying() -> None:
    """Core (graphopt/verify.py): ``run_model``/``verify`` filtered feeds by ``sess.get_inputs()``,
    which leaves out overridable initializers, so a fed weight was silently replaced by its default
    and the memory-plan proof (which does use the fed value) disagreed. Found by the fuzzer."""
    w = np.array([[0.5], [-1.0], [2.0]], np.float32)
    m = _model(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        [("x", [1, 3])],
        [("y", [1, 1])],
        {"w": w},
        extra_inputs=["w"],
    )
    from graphopt.core.session import run_model

    feeds = {"x": np.ones((1, 3), np.float32), "w": np.ones((3, 1), np.float32)}
    assert run_model(m, feeds)["y"].item() == pytest.approx(3.0)
    assert run_model(m, {"x": feeds["x"]})["y"].item() == pytest.approx(1.5)
    _proof(m)


def test_prune_channels_keeps_producers_whose_bias_is_a_graph_input() -> None:
    """prune-channels (graphopt/algorithms/prune/analysis.py): a Conv whose bias is a graph input
    (fed at run time) had its weight's output channels removed but not its bias, so onnxruntime
    refused the pruned model ("bias must be a 1D tensor of size output_channels"). A group with a
    non-constant parameter must not be pruned (the model's inputs cannot change). Found by the
    fuzzer."""
    if "prune-channels" not in registered_passes():
        pytest.skip("prune-channels is not registered")
    from graphopt.core.session import run_model

    w = np.array([0.126, -0.132], np.float32).reshape(2, 1, 1, 1)
    m = _model(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("Conv", ["r", "w", "b"], ["c"], kernel_shape=[1, 1]),
            helper.make_node("BatchNormalization", ["c", "s", "bb", "mu", "var"], ["bn"]),
            helper.make_node("Conv", ["bn", "w2"], ["y"], kernel_shape=[1, 1]),
        ],
        [("x", [1, 1, 3, 3]), ("b", [2])],
        [("y", [1, 1, 3, 3])],
        {
            "w": w,
            "s": np.array([0.73, 1.18], np.float32),
            "bb": np.array([0.65, 0.47], np.float32),
            "mu": np.array([-0.35, -0.63], np.float32),
            "var": np.array([1.72, 0.5], np.float32),
            "w2": np.array([-1.64, -0.15], np.float32).reshape(1, 2, 1, 1),
        },
    )
    feeds = random_feeds(m, seed=0)
    result = get_pass("prune-channels", ratio=0.5, recover=False)(m.clone())
    assert [tuple(t.shape) for t in result.model.graph.inputs] == [(1, 1, 3, 3), (2,)]
    run_model(result.model, feeds)  # raises if onnxruntime refuses the pruned model


@pytest.mark.parametrize("op", ["Conv", "ConvTranspose"])
def test_prune_channels_depthwise_after_matmul_on_last_axis(op: str) -> None:
    """prune-channels (graphopt/algorithms/prune/analysis.py): a depthwise Conv/ConvTranspose took
    the channel labels of a MatMul that acts on the LAST axis of a 4-D tensor as if they were on
    axis 1, so pruning the MatMul's output columns also cut the depthwise weight and ``group``:
    onnxruntime refused the model or the output shape changed. Found by the fuzzer."""
    if "prune-channels" not in registered_passes():
        pytest.skip("prune-channels is not registered")
    from graphopt.algorithms import prune as pd

    m = _model(
        [
            helper.make_node("MatMul", ["x", "mw"], ["h"]),
            helper.make_node(op, ["h", "w", "b"], ["y"], kernel_shape=[1, 1], group=2),
        ],
        [("x", [1, 2, 3, 3])],
        [("y", [1, 2, 3, 1])],
        {
            "mw": np.array([[0.126], [-0.132], [0.64]], np.float32),
            "w": np.array([0.105, -0.536], np.float32).reshape(2, 1, 1, 1),
            "b": np.array([0.18, 0.65], np.float32),
        },
    )
    zeroed = m.clone()
    an = pd.analyze(zeroed)
    keep = pd.keep_elements(
        an,
        pd.select(
            an, pd.groups(an), pd.unit_scores(an, pd.weight_importance(an)), 0.5, None, 1, 0.0
        ),
    )
    pd.zero_pruned(zeroed, an, keep)
    pruned = zeroed.clone()
    pd.apply_pruning(pruned, pd.analyze(pruned), keep)
    prepare(pruned)
    rep = verify(zeroed, pruned, feeds=random_feeds(zeroed, seed=0), rtol=RTOL, atol=ATOL)
    assert rep.ok, rep.to_json()
    result = get_pass("prune-channels", ratio=0.5, recover=False)(m.clone())
    rep = verify(m, result.model, feeds=random_feeds(m, seed=0), rtol=1e9, atol=1e9)
    assert all(o.shape == [1, 2, 3, 1] for o in rep.outputs), rep.to_json()


def test_prune_channels_labels_on_a_pooled_axis() -> None:
    """prune-channels (graphopt/algorithms/prune/analysis.py): MatMul labels the LAST axis of a 4-D
    tensor; MaxPool (kernel 2) shrinks that axis, yet the labels pass through it as if it were the
    channel axis, so a later Split on that axis gets wrong sizes and the pruned model is invalid.
    Found by the fuzzer (make fuzz, 2026-11-22); fixed: spatial ops block labels on axes other
    than 1."""
    if "prune-channels" not in registered_passes():
        pytest.skip("prune-channels is not registered")
    from graphopt.algorithms import prune as pd

    mw = np.array(
        [
            [0.063, -0.066, 0.32, 0.052],
            [-0.268, 0.181, 0.652, 0.474],
            [-0.352, -0.633, -0.312, 0.021],
        ],
        np.float32,
    )
    m = _model(
        [
            helper.make_node("MatMul", ["x", "mw"], ["h"]),
            helper.make_node("MaxPool", ["h"], ["p"], kernel_shape=[2, 2]),
            helper.make_node("Relu", ["p"], ["r"]),
            helper.make_node("Split", ["r", "sp"], ["s0", "y"], axis=3),
        ],
        [("x", [2, 2, 3, 3])],
        [("y", [2, 2, 2, 2])],
        {"mw": mw, "sp": np.array([1, 2], np.int64)},
    )
    zeroed = m.clone()
    an = pd.analyze(zeroed)
    keep = pd.keep_elements(
        an,
        pd.select(
            an, pd.groups(an), pd.unit_scores(an, pd.weight_importance(an)), 0.5, None, 1, 0.0
        ),
    )
    pd.zero_pruned(zeroed, an, keep)
    pruned = zeroed.clone()
    pd.apply_pruning(pruned, pd.analyze(pruned), keep)
    onnx.checker.check_model(pruned.to_onnx(), full_check=True)
    rep = verify(zeroed, pruned, feeds=random_feeds(zeroed, seed=0), rtol=RTOL, atol=ATOL)
    assert rep.ok, rep.to_json()
