"""The verifier detects differences and reports max error, cosine and SQNR correctly."""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.core.loader import load
from graphopt.core.verify import compare, cosine, sqnr_db, verify
from graphopt.fixtures import fixture_path


def test_sqnr_and_cosine() -> None:
    ref = np.array([1.0, 2.0, 3.0], np.float32)
    assert sqnr_db(ref, ref) == math.inf
    noisy = ref + np.array([0.1, 0.0, 0.0], np.float32)
    expected = 10 * math.log10(14.0 / 0.01)
    assert abs(sqnr_db(ref, noisy) - expected) < 1e-3
    assert abs(cosine(ref, 2 * ref) - 1.0) < 1e-12
    assert abs(cosine(ref, -ref) + 1.0) < 1e-12


def test_compare_tolerance_and_shape() -> None:
    ref = np.ones((2, 3), np.float32)
    assert compare("y", ref, ref + 1e-7, rtol=1e-4, atol=1e-5).ok
    assert not compare("y", ref, ref + 1e-2, rtol=1e-4, atol=1e-5).ok
    bad = compare("y", ref, np.ones((3, 2), np.float32), rtol=1, atol=1)
    assert not bad.ok and "shape" in bad.note
    nan = ref.copy()
    nan[0, 0] = np.nan
    assert not compare("y", ref, nan, rtol=1, atol=1).ok


def test_verify_detects_changed_weight() -> None:
    a = load(fixture_path("cnn.onnx"))
    b = a.clone()
    conv = next(n for n in b.graph.nodes if n.op == "Conv")
    w = conv.inputs[1]
    conv.inputs[1] = gs.Constant(w.name + "_changed", np.asarray(w.values) * 1.01)
    assert verify(a, a.clone()).ok
    rep = verify(a, b)
    assert not rep.ok
    assert rep.outputs[0].sqnr_db < 60
    lossy = verify(a, b, min_sqnr_db=20)
    assert lossy.ok
