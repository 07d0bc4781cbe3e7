"""Tests for graphopt/algorithms/prune: the table of op handlers, units, ratio validation.

The exactness tests of each handler live in test_prune_channels.py; these pin the structure.
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
from onnx import helper, numpy_helper
from test_prune_channels import W, build, conv

from graphopt.algorithms.prune import (
    HANDLERS,
    OpHandler,
    PruneRatioError,
    analyze,
    groups,
    validate_ratio,
)
from graphopt.algorithms.prune.analysis import units
from graphopt.core.errors import GraphoptError
from graphopt.core.shapes import infer_shapes
from graphopt.passes import get_pass

#: every op the channel analysis had a handler for before the split into handlers.py
OPS_BEFORE = {
    "Abs",
    "Add",
    "And",
    "ArgMax",
    "ArgMin",
    "AveragePool",
    "BatchNormalization",
    "Cast",
    "Ceil",
    "Celu",
    "Clip",
    "Concat",
    "Conv",
    "ConvTranspose",
    "Cos",
    "Div",
    "Dropout",
    "Elu",
    "Equal",
    "Erf",
    "Exp",
    "Flatten",
    "Floor",
    "Gather",
    "Gelu",
    "Gemm",
    "GlobalAveragePool",
    "GlobalLpPool",
    "GlobalMaxPool",
    "Greater",
    "HardSigmoid",
    "HardSwish",
    "Hardmax",
    "Identity",
    "InstanceNormalization",
    "IsInf",
    "IsNaN",
    "LayerNormalization",
    "LeakyRelu",
    "Less",
    "Log",
    "LogSoftmax",
    "LpNormalization",
    "LpPool",
    "MatMul",
    "Max",
    "MaxPool",
    "Mean",
    "MeanVarianceNormalization",
    "Min",
    "Mish",
    "Mul",
    "Neg",
    "Not",
    "Or",
    "PRelu",
    "Pad",
    "Pow",
    "Reciprocal",
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceMax",
    "ReduceMean",
    "ReduceMin",
    "ReduceProd",
    "ReduceSum",
    "ReduceSumSquare",
    "Relu",
    "Reshape",
    "Resize",
    "Round",
    "Selu",
    "Shape",
    "Shrink",
    "Sigmoid",
    "Sign",
    "Sin",
    "Size",
    "Slice",
    "Softmax",
    "Softplus",
    "Softsign",
    "Split",
    "Sqrt",
    "Squeeze",
    "Sub",
    "Sum",
    "Tanh",
    "ThresholdedRelu",
    "Transpose",
    "Unsqueeze",
    "Upsample",
    "Where",
}


def test_handler_table_covers_every_op_understood_before() -> None:
    assert set(HANDLERS) == OPS_BEFORE
    for op, h in HANDLERS.items():
        assert isinstance(h, OpHandler) and op in type(h).ops


def test_handlers_that_record_a_shape_fix_apply_it() -> None:
    """A handler holds both halves: if its analysis records a ShapeFix, it rewrites it too."""
    recording = set()
    for h in set(HANDLERS.values()):
        cls = type(h)
        src = "".join(inspect.getsource(c) for c in cls.__mro__ if c not in (OpHandler, object))
        if "ShapeFix(" in src:
            recording.add(cls.__name__)
            assert cls.apply is not OpHandler.apply, cls.__name__
    assert recording == {"Resize", "Reshape", "Split", "Slice", "Conv"}


def test_units_are_named_by_their_largest_element() -> None:
    # 6 elements: 0~3 tied, 1~4 tied, 2 tied to an unowned position, 5 blocked
    ties = [(np.array([0, 1, 2]), np.array([3, 4, -1]))]
    blocks = [(np.array([-1, 5]), "reaches the graph output")]
    unit, coupled = units(6, ties, blocks)
    fixed = 6
    assert unit.tolist() == [3, 4, fixed, 3, 4, fixed, fixed]
    assert coupled.tolist() == [3, 4, 2, 3, 4, 5]  # ties between elements only
    unit0, coupled0 = units(0, [], [])
    assert unit0.tolist() == [0] and coupled0.tolist() == []


@pytest.mark.parametrize("good", [0, 0.0, 0.3, np.float32(0.5), 0.999, {"*": 0.2, "conv1": 0.0}])
def test_validate_ratio_accepts(good: object) -> None:
    out = validate_ratio(good)
    if isinstance(good, dict):
        assert out == {k: float(v) for k, v in good.items()}
    else:
        assert out == float(good)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "bad", [1, 1.0, 1.5, -0.1, math.nan, math.inf, True, "0.3", None, {}, {"*": 1.2}, {3: 0.2}]
)
def test_validate_ratio_refuses(bad: object) -> None:
    with pytest.raises(PruneRatioError, match=r"between 0 and 1|mapping|group names") as exc:
        validate_ratio(bad, name="--ratio")
    assert isinstance(exc.value, GraphoptError)  # the CLI exits 2 with the message
    assert "--ratio" in str(exc.value) and "\n" not in str(exc.value)


def test_validate_ratio_scalar_only() -> None:
    with pytest.raises(PruneRatioError, match="one number"):
        validate_ratio({"*": 0.3}, per_group=False)


def test_passes_validate_their_ratio() -> None:
    with pytest.raises(PruneRatioError, match="must be between 0 and 1"):
        get_pass("prune-channels", ratio=1.5)
    with pytest.raises(PruneRatioError, match="must be between 0 and 1"):
        get_pass("prune-channels", ratio={"*": 0.3, "conv1": -0.2})
    with pytest.raises(PruneRatioError, match="prune-magnitude ratio"):
        get_pass("prune-magnitude", ratio=1.0)


def test_weight_computed_by_another_op_is_not_a_constant() -> None:
    """Constant inputs computed by ops outside handlers.CONST_OPS (here Tile) do not count: the
    producer blocks, as before the evaluator was shared (negative case: nothing may change)."""
    inits: dict[str, np.ndarray] = {}
    w = W(4, 3, 1, 1)
    nodes = [
        helper.make_node("Constant", [], ["w1"], value=numpy_helper.from_array(w)),
        helper.make_node("Tile", ["w1", "reps"], ["w1t"]),
        helper.make_node("Conv", ["x", "w1t"], ["a"], name="c1"),
        helper.make_node("Relu", ["a"], ["r"]),
        conv("c2", "r", "y", 4, 2, inits, k=1),
    ]
    inits["reps"] = np.array([1, 1, 1, 1], np.int64)
    m = build(nodes, {"x": [1, 3, 4, 4]}, ["y"], inits)
    work = m.clone()
    infer_shapes(work)
    an = analyze(work)
    assert [p.node.name for p in an.producers] == ["c2"]  # c1's weight is not a constant
    res = get_pass("prune-channels", ratio=0.5, recover=False)(m.clone())
    assert not res.modified
    assert all(g.blocked for g in groups(an))
