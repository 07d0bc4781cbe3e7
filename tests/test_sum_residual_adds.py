"""sum-residual-adds: a residual Add read only by a LayerNormalization -> Sum (exact), so that
onnxruntime does not fuse it into its slow CPU SkipLayerNormalization; the portable target's
lowering."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from fusion_graphs import build, node

from graphopt.core.model import Model
from graphopt.core.session import run_model
from graphopt.jobs.optimize import default_pipeline, optimize
from graphopt.testing import check_pass, op_counts, ort_optimized_ops

P = "sum-residual-adds"
H = 16
RNG = np.random.default_rng(11)
W = RNG.uniform(-1, 1, (H, H)).astype(np.float32)
GAMMA = RNG.uniform(0.5, 1.5, (H,)).astype(np.float32)
BETA = RNG.uniform(-0.5, 0.5, (H,)).astype(np.float32)


def block(*, pre_norm: bool = False, const_skip: bool = False, shape=(2, 6, H)) -> Model:
    """``y = LayerNorm(x + x @ W)``; ``pre_norm``: the sum is also read by the next residual Add
    (onnxruntime would not fuse it: it stays); ``const_skip``: the second operand is a constant."""
    nodes = [node("MatMul", ["x", "w"], "h")]
    inits = {"w": W, "g": GAMMA, "beta": BETA}
    if const_skip:
        inits["pos"] = RNG.uniform(-1, 1, shape).astype(np.float32)
        nodes.append(node("Add", ["h", "pos"], "s"))
    else:
        nodes.append(node("Add", ["x", "h"], "s"))
    nodes.append(node("LayerNormalization", ["s", "g", "beta"], "n", axis=-1, epsilon=1e-5))
    outputs = ["n"]
    if pre_norm:
        nodes.append(node("Add", ["s", "n"], "y"))
        outputs = ["y"]
    return build(nodes, {"x": shape}, outputs, inits)


def test_residual_add_becomes_sum_bit_exact(tmp_path: Path) -> None:
    m = block()
    res, _ = check_pass(m, P, rtol=0.0, atol=0.0)
    assert res.stats == {"adds_to_sum": 1}
    assert op_counts(res.model) == {"MatMul": 1, "Sum": 1, "LayerNormalization": 1}
    x = RNG.standard_normal((2, 6, H)).astype(np.float32)
    before = run_model(m, {"x": x}, level="disable_all")
    after = run_model(res.model, {"x": x}, level="disable_all")
    np.testing.assert_array_equal(before["n"], after["n"])  # Sum is Add, bit for bit
    # what it is for: onnxruntime fuses the Add, not the Sum
    assert ort_optimized_ops(m, tmp_path).get("SkipLayerNormalization") == 1
    assert "SkipLayerNormalization" not in ort_optimized_ops(res.model, tmp_path)


def test_changes_nothing_where_onnxruntime_would_not_fuse() -> None:
    # the sum read twice (pre-norm residual stream), a constant operand, a 2-D activation
    for m in (block(pre_norm=True), block(const_skip=True), block(shape=(6, H))):
        check_pass(m, P, expect_modified=False, rtol=0.0, atol=0.0)


def test_portable_pipeline_runs_it_and_the_ort_target_emits_skip_layernorm() -> None:
    assert P in default_pipeline("portable") and P not in default_pipeline("ort")
    portable = optimize(block(), target="portable").model
    assert op_counts(portable).get("Sum") == 1 and "Add" not in op_counts(portable)
    ort_out = op_counts(optimize(block(), target="ort").model)
    assert ort_out.get("com.microsoft.SkipLayerNormalization") == 1, ort_out
