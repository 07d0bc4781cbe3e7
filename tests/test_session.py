"""graphopt.core.session: the one helper that exposes intermediate tensors as outputs
(``with_outputs`` / ``make_session(outputs=..., truncate=...)``)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import graphopt.core.session as session_mod
from graphopt.core.feeds import random_feeds
from graphopt.core.loader import load
from graphopt.core.session import make_session, run_model, with_outputs
from graphopt.core.shapes import observe_shapes, prepare
from graphopt.fixtures import fixture_path


def test_intermediate_outputs_match_the_full_run_and_truncation_cuts_nodes() -> None:
    m = prepare(load(fixture_path("cnn.onnx")))
    names = [n.outputs[0].name for n in m.graph.nodes[:3]]
    feeds = random_feeds(m, seed=0)
    full = run_model(m, feeds, outputs=names)
    cut = run_model(m, feeds, outputs=names, truncate=True)
    assert list(full) == list(cut) == names
    for n in names:
        np.testing.assert_array_equal(full[n], cut[n])
    proto = m.to_onnx()
    small = with_outputs(proto, names, truncate=True)  # onnx.utils.Extractor (no subgraphs)
    assert [o.name for o in small.graph.output] == names
    assert len(small.graph.node) == 3 < len(proto.graph.node)
    assert [i.name for i in small.graph.input] == [i.name for i in proto.graph.input]
    onnx.checker.check_model(small)
    # the given proto is never modified
    assert [o.name for o in proto.graph.output] == [t.name for t in m.graph.outputs]
    wide = with_outputs(proto, names)
    assert [o.name for o in wide.graph.output] == [t.name for t in m.graph.outputs] + names


def test_truncation_keeps_what_subgraphs_capture() -> None:
    """``y`` is an If whose branches read ``if1_out`` only from the outer scope (no explicit
    input): the truncated model must still compute ``if1_out`` and the first If's inputs."""
    m = prepare(load(fixture_path("if_model.onnx")))
    proto = m.to_onnx()
    cut = with_outputs(proto, ["y"], truncate=True)
    assert [n.output[0] for n in cut.graph.node] == [n.outputs[0].name for n in m.graph.nodes]
    feeds = random_feeds(m, seed=1)
    ref = run_model(m, feeds)["y"]
    np.testing.assert_array_equal(run_model(cut, feeds)["y"], ref)
    cut2 = with_outputs(proto, ["is_positive_out"], truncate=True)
    assert [n.op_type for n in cut2.graph.node] == ["ReduceSum", "Greater"]


def test_zero_copy_session_with_truncated_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    m = prepare(load(fixture_path("external_data.onnx")))
    feeds = random_feeds(m, seed=2)
    name = m.graph.nodes[1].outputs[0].name
    ref = run_model(m, feeds, outputs=[name])[name]
    monkeypatch.setattr(session_mod, "ZERO_COPY_BYTES", 0)
    monkeypatch.setattr(session_mod, "ZERO_COPY_MIN", 1024)
    sess = make_session(m, outputs=[name], truncate=True)
    assert [o.name for o in sess.get_outputs()] == [name]
    # (weights handed over unpacked: another GEMM kernel, float32 rounding differs)
    np.testing.assert_allclose(sess.run([name], feeds)[0], ref, rtol=1e-5, atol=1e-5)


def test_observe_shapes_through_the_helper() -> None:
    m = prepare(load(fixture_path("residual.onnx")))
    names = [n.outputs[0].name for n in m.graph.nodes]
    got = observe_shapes(m, names)
    assert set(got) == set(names)
    tensors = m.graph.tensors()
    for n, (dtype, shape) in got.items():
        assert list(shape) == list(tensors[n].shape) and dtype == np.dtype(tensors[n].dtype)
