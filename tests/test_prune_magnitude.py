"""Tests for prune-magnitude (unstructured): sparsity reached, small weights zeroed, large ones
kept, shapes unchanged, negative cases untouched."""

from __future__ import annotations

import numpy as np
from onnx import helper
from test_prune_channels import W, build, conv

from graphopt.core.const_eval import const_value
from graphopt.core.loader import load
from graphopt.core.model import Model
from graphopt.fixtures import fixture_path
from graphopt.passes import get_pass
from graphopt.testing import check_pass


def _weights(model: Model) -> dict[str, np.ndarray]:
    out = {}
    for n in model.graph.nodes:
        if n.op in ("Conv", "Gemm", "MatMul"):
            v = const_value(n.inputs[1])
            assert v is not None
            out[n.name] = v
    return out


def test_ratio_per_layer() -> None:
    m = load(fixture_path("cnn.onnx"))
    before = _weights(m)

    def st(pm: Model) -> None:
        after = _weights(pm)
        for name, w in before.items():
            a = after[name]
            assert a.shape == w.shape
            frac = float((a == 0).mean())
            assert abs(frac - 0.5) < 0.02, (name, frac)
            kept = np.abs(w[a != 0]).min()
            assert kept >= np.abs(w[a == 0]).max()  # only the smallest went

    res, _ = check_pass(
        m, "prune-magnitude", ratio=0.5, min_sqnr_db=0.0, rtol=1e9, atol=1e9, structure=st
    )
    assert abs(res.stats["sparsity"] - 0.5) < 0.02
    assert res.stats["weights_zeroed"] > 0 and "none" in res.stats["speedup"]


def test_threshold_and_global() -> None:
    m = load(fixture_path("cnn.onnx"))
    res = get_pass("prune-magnitude", ratio=None, threshold=0.05)(m.clone())
    for w in _weights(res.model).values():
        assert not ((np.abs(w) < 0.05) & (w != 0)).any()
    res = get_pass("prune-magnitude", ratio=0.3, scope="global")(m.clone())
    assert abs(res.stats["sparsity"] - 0.3) < 0.01


def test_small_ratio_exact_outputs_change_little() -> None:
    m = load(fixture_path("digits_cnn.onnx"))
    check_pass(
        m,
        "prune-magnitude",
        ratio=0.05,
        min_sqnr_db=20.0,
        rtol=1e9,
        atol=1e9,
        feeds={"x": np.load(fixture_path("digits_calib.npz"))["x"][:16]},
    )


def test_shared_weight_and_graph_input_untouched() -> None:
    inits = {"w": W(3, 3, 3, 3)}
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["a"], name="c1", pads=[1] * 4),
        helper.make_node("Conv", ["a", "w"], ["b"], name="c2", pads=[1] * 4),
        helper.make_node("Conv", ["b", "wi"], ["y"], name="c3", pads=[1] * 4),
    ]
    m = build(nodes, {"x": [1, 3, 8, 8], "wi": [4, 3, 3, 3]}, ["y"], inits)
    res, _ = check_pass(m, "prune-magnitude", ratio=0.5, expect_modified=False)
    assert res.stats["layers"] == 0


def test_zero_ratio_changes_nothing() -> None:
    inits: dict[str, np.ndarray] = {}
    m = build([conv("c1", "x", "y", 3, 4, inits)], {"x": [1, 3, 8, 8]}, ["y"], inits)
    check_pass(m, "prune-magnitude", ratio=0.0, expect_modified=False)
