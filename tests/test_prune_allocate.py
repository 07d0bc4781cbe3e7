"""Tests for the sensitivity-driven allocation of a pruning budget (``scope="auto"`` of
``prune-channels``, graphopt/algorithms/prune/allocate.py).

The allocation must remove the requested fraction of the prunable MACs (within one unit), do no
worse than the uniform split at the same MACs, change nothing at ratio 0, measure in its scan
exactly what removing the units does (onnxruntime with ORT_DISABLE_ALL) and leave the analysed
model as it found it; ``scope=None`` picks ``auto`` for transformers with calibration data only.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from graphopt.algorithms.prune import (
    analyze,
    apply_pruning,
    groups,
    importance,
    keep_elements,
    unit_scores,
)
from graphopt.algorithms.prune.allocate import (
    MacModel,
    SensitivityScan,
    allowed_counts,
    greedy_allocate,
)
from graphopt.cli import main
from graphopt.core.errors import CalibrationError, OptionError
from graphopt.core.loader import load
from graphopt.core.model import Model
from graphopt.core.session import make_session
from graphopt.core.shapes import fix_input_shapes, infer_shapes
from graphopt.core.verify import sqnr_db
from graphopt.fixtures import fixture_path
from graphopt.passes import get_pass
from graphopt.testing import check_pass

Feeds = dict[str, np.ndarray]


@pytest.fixture(scope="module")
def digits() -> tuple[Model, list[Feeds], list[Feeds]]:
    """The digits transformer, 6 calibration batches of 16 and 2 held-out ones."""
    m = load(fixture_path("digits_transformer.onnx"))
    cal = np.load(fixture_path("digits_calib.npz"))["x"]
    batches = [{"x": cal[i : i + 16]} for i in range(0, len(cal), 16)]
    return m, batches[:6], batches[6:]


def _outputs(model: Model, feeds: Sequence[Feeds]) -> np.ndarray:
    s = make_session(model)  # ORT_DISABLE_ALL
    return np.concatenate([s.run(None, dict(f))[0] for f in feeds])


# ------------------------------------------------------------------------------ greedy
class _LinearMacs:
    """A MAC model where every unit of group j saves ``per_unit[j]`` MACs."""

    def __init__(self, per_unit: Sequence[float]) -> None:
        self.per_unit = list(per_unit)

    def delta(self, k: Sequence[int], j: int, new: int) -> float:
        return (new - k[j]) * self.per_unit[j]


def test_greedy_takes_the_cheapest_distortion_per_mac_and_meets_the_target() -> None:
    # group 0: 10 units, cheap until 5 then steep; group 1: 10 units, linear and dearer
    curves = [[(2, 0.01), (5, 0.02), (8, 1.0)], [(2, 0.1), (5, 0.25), (8, 0.4)]]
    allowed = [allowed_counts(10, 8, None)] * 2
    k, met = greedy_allocate(curves, allowed, _LinearMacs([1.0, 1.0]), target_macs=7)
    assert met and sum(k) == 7  # exactly the target at unit granularity
    assert k[0] == 5 and k[1] == 2  # group 0's cheap part first, then group 1 (not group 0's wall)
    k, met = greedy_allocate(curves, allowed, _LinearMacs([1.0, 1.0]), target_macs=0)
    assert k == [0, 0] and met
    k, met = greedy_allocate(curves, allowed, _LinearMacs([1.0, 1.0]), target_macs=100)
    assert not met and k == [8, 8]  # as far as the scanned counts go, and says so


def test_allowed_counts_keep_multiples_of_round_to() -> None:
    assert allowed_counts(12, 11, 4).tolist() == [0, 4, 8]
    assert allowed_counts(5, 3, None).tolist() == [0, 1, 2, 3]


# ------------------------------------------------------------------------------ the pass
@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_auto_meets_the_global_mac_ratio(digits, ratio: float) -> None:  # type: ignore[no-untyped-def]
    m, calib, _ = digits
    p = get_pass("prune-channels", ratio=ratio, criterion="output", calib=calib, scope="auto")
    res = p(m.clone())
    rep = p.report
    assert rep is not None and rep.scope == "auto" and rep.allocation is not None
    removed = (rep.macs_before - rep.macs_after) / rep.prunable_macs
    # one FFN neuron of this model is 0.16% of the prunable MACs, one head 3.1%
    assert ratio <= removed <= ratio + 0.002, removed
    assert rep.allocation.achieved == pytest.approx(removed, abs=1e-9)  # the MAC model is exact
    assert res.stats["scan_points"] == rep.allocation.points == 14
    assert res.model.graph.inputs[0].shape[0] == "N"  # dynamic batch given back


def test_auto_is_no_worse_than_the_uniform_split(digits) -> None:  # type: ignore[no-untyped-def]
    """At the MACs the uniform split removes, the allocation's held-out output SQNR (both with
    least-squares recovery) is at least the uniform one's."""
    m, calib, held = digits
    ref = _outputs(m, held)
    uni = get_pass("prune-channels", ratio=0.3, criterion="output", calib=calib, scope="group")
    res_u = uni(m.clone())
    assert uni.report is not None
    frac = (uni.report.macs_before - uni.report.macs_after) / uni.report.prunable_macs
    auto = get_pass("prune-channels", ratio=frac, criterion="output", calib=calib, scope="auto")
    res_a = auto(m.clone())
    assert auto.report is not None
    assert auto.report.macs_after <= uni.report.macs_after
    s_u = sqnr_db(ref, _outputs(res_u.model, held))
    s_a = sqnr_db(ref, _outputs(res_a.model, held))
    assert s_a >= s_u, (s_a, s_u)


def test_ratio_zero_auto_changes_nothing(digits) -> None:  # type: ignore[no-untyped-def]
    m, calib, held = digits
    res, _ = check_pass(
        m,
        "prune-channels",
        ratio=0.0,
        calib=calib,
        scope="auto",
        criterion="output",
        expect_modified=False,
        feeds=held[0],
        rtol=0.0,
        atol=0.0,
    )
    assert res.stats["channels_removed"] == 0


def test_scan_measures_what_removal_does_and_restores_the_model(digits) -> None:  # type: ignore[no-untyped-def]
    """The scan's distortion with 2 heads of layer 1 zeroed (no refit) equals the distortion of
    the model with those heads removed (ORT_DISABLE_ALL); afterwards the analysed model gives
    exactly its old outputs."""
    m, _, held_batches = digits
    held = [{"x": held_batches[0]["x"][i : i + 1]} for i in range(12)]  # the analysed batch: 1
    work = m.clone()
    fix_input_shapes(work, {"x": (1, 1, 8, 8)})
    infer_shapes(work)
    an = analyze(work)
    grps = {g.name: g for g in groups(an)}
    g = grps["/layers.1/attn/query/MatMul"]
    scores = unit_scores(an, importance(m, an, "l1", []))
    removed = g.free[np.argsort(scores[g.free], kind="stable")][:2]
    before = _outputs(work, held)
    scan = SensitivityScan(m, work, an, held)
    d = scan.measure(removed, [])
    after = _outputs(work, held)
    np.testing.assert_array_equal(before, after)  # restored exactly
    keep_unit = np.ones(an.n_elements + 1, dtype=bool)
    keep_unit[removed] = False
    pruned = work.clone()
    an2 = analyze(pruned)  # the analysis of the clone, same element ids
    apply_pruning(pruned, an2, keep_elements(an2, keep_unit))
    pruned.graph.inputs[0].shape = m.graph.inputs[0].shape
    ref = _outputs(m, held)
    out = _outputs(pruned, held)
    expect = float(
        np.sum((out.astype(np.float64) - ref) ** 2) / np.sum(ref.astype(np.float64) ** 2)
    )
    assert d == pytest.approx(expect, rel=1e-4, abs=1e-9)
    assert d > 0


def test_mac_model_counts_heads_once(digits) -> None:  # type: ignore[no-untyped-def]
    """``q @ k^T`` reads a layer's heads twice; removing 1 of 4 heads saves a quarter of its
    MACs (not 7/16)."""
    m, _, _ = digits
    work = m.clone()
    fix_input_shapes(work, {"x": (1, 1, 8, 8)})
    infer_shapes(work)
    an = analyze(work)
    free = [g for g in groups(an) if not g.blocked]
    orders = [g.free for g in free]
    from graphopt.core.cost import model_cost

    nm = {n.name: n.macs for n in model_cost(work).nodes}
    mm = MacModel(an, free, orders, nm)
    j = next(i for i, g in enumerate(free) if g.name == "/layers.1/attn/query/MatMul")
    k = [0] * len(free)
    k[j] = 1
    group_macs = sum(mm.nodes[i].macs for i in mm.by_group[j])
    assert mm.saved(k) == pytest.approx(group_macs / 4)


# ------------------------------------------------------------------------------ default scope
def test_default_scope_is_auto_for_transformers_with_calib_only(digits) -> None:  # type: ignore[no-untyped-def]
    m, calib, _ = digits
    p = get_pass("prune-channels", ratio=0.0, calib=calib, scope=None)
    p(m.clone())
    assert p.report is not None and p.report.scope == "auto"
    p = get_pass("prune-channels", ratio=0.2, scope=None)  # no calibration data
    p(m.clone())
    assert p.report is not None and p.report.scope == "group"
    p = get_pass("prune-channels", ratio={"*": 0.2}, calib=calib, scope=None)
    p(m.clone())
    assert p.report is not None and p.report.scope == "group"
    cnn = load(fixture_path("digits_cnn.onnx"))  # convolutions: the uniform split stays
    p = get_pass("prune-channels", ratio=0.2, calib=calib, scope=None)
    p(cnn.clone())
    assert p.report is not None and p.report.scope == "group"


def test_auto_refuses_what_it_cannot_do(digits) -> None:  # type: ignore[no-untyped-def]
    m, _, _ = digits
    with pytest.raises(CalibrationError, match="--calib"):
        get_pass("prune-channels", ratio=0.3, scope="auto")(m.clone())
    with pytest.raises(OptionError, match="one number"):
        get_pass("prune-channels", ratio={"*": 0.3}, scope="auto")
    with pytest.raises(OptionError, match="scope"):
        get_pass("prune-channels", ratio=0.3, scope="uniform")


# ------------------------------------------------------------------------------ command line
def test_cli_default_is_auto_for_the_digits_transformer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = str(fixture_path("digits_transformer.onnx"))
    calib = str(fixture_path("digits_calib.npz"))
    out = str(tmp_path / "p.onnx")
    common = [model, "-o", out, "--ratio", "0.3", "--calib", calib, "--criterion", "output"]
    assert main(["prune", *common, "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["scope"] == "auto"
    a = d["allocation"]
    assert a["met"] and 0.3 <= a["achieved"] <= 0.302 and a["points"] == 14
    assert {g["kind"] for g in a["groups"]} == {"heads", "neurons"}
    assert main(["prune", *common, "--scope", "group", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["scope"] == "group" and d["allocation"] is None
