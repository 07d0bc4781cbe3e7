"""graphopt.core.segments and the segmented sessions of graphopt.core.session: a model over
``SEGMENT_NODES`` top-level nodes runs as consecutive onnxruntime sessions, which at
``ORT_DISABLE_ALL`` compute exactly what one session of the whole model computes.

The threshold is lowered to a few nodes so that small models are cut."""

from __future__ import annotations

import weakref
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt.core.session as session_mod
from graphopt.core.model import Model
from graphopt.core.segments import segment_model
from graphopt.core.session import SegmentedSession, make_session, run_model, run_session
from graphopt.fixtures import fixture_path

#: explicit tolerance: at ORT_DISABLE_ALL the pieces run the same kernels on the same inputs
RTOL, ATOL = 0.0, 0.0
W = 4


def _vi(name: str, shape: list[int] | None = None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape or [1, W])


def _model(
    nodes: list[onnx.NodeProto],
    inits: list[onnx.TensorProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    value_info: list[onnx.ValueInfoProto] | None = None,
) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", inputs, outputs, inits, value_info=value_info or [])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def skip_chain(blocks: int = 6, seed: int = 0) -> onnx.ModelProto:
    """A chain ``h = Tanh(MatMul(h, W_i) + b_i) + x * s`` where the input ``x``, the early tensor
    ``e`` and the shared weight ``shared`` are read by every block (tensors used across many
    segments), and the middle block's output ``mid`` is a graph output."""
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Sigmoid", ["x"], ["e"], name="early")]
    inits = [numpy_helper.from_array(rng.standard_normal((W,)).astype(np.float32), "shared")]
    h = "x"
    for i in range(blocks):
        inits.append(
            numpy_helper.from_array(rng.standard_normal((W, W)).astype(np.float32), f"w{i}")
        )
        nodes += [
            helper.make_node("MatMul", [h, f"w{i}"], [f"m{i}"], name=f"mm{i}"),
            helper.make_node("Add", [f"m{i}", "shared"], [f"a{i}"], name=f"add{i}"),
            helper.make_node("Tanh", [f"a{i}"], [f"t{i}"], name=f"tanh{i}"),
            helper.make_node("Mul", ["x", "e"], [f"xe{i}"], name=f"xe{i}"),
            helper.make_node("Add", [f"t{i}", f"xe{i}"], [f"h{i}"], name=f"res{i}"),
        ]
        h = f"h{i}"
    mid = f"h{blocks // 2}"
    return _model(nodes, inits, [_vi("x")], [_vi(h), _vi(mid)])


def _feeds(seed: int = 0) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((1, W)).astype(np.float32)}


def _run_both(
    proto: onnx.ModelProto, feeds: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch, k: int
) -> tuple[ort.InferenceSession, list[np.ndarray], list[np.ndarray]]:
    whole = make_session(proto)
    assert not isinstance(whole, SegmentedSession)
    monkeypatch.setattr(session_mod, "SEGMENT_NODES", k)
    seg = make_session(proto)
    assert [i.name for i in seg.get_inputs()] == [i.name for i in whole.get_inputs()]
    assert [o.name for o in seg.get_outputs()] == [o.name for o in whole.get_outputs()]
    return seg, whole.run(None, feeds), seg.run(None, feeds)


@pytest.mark.parametrize("k", [1, 3, 7, 16])
def test_segmented_run_equals_the_whole_run(monkeypatch: pytest.MonkeyPatch, k: int) -> None:
    proto = skip_chain()
    seg, ref, got = _run_both(proto, _feeds(3), monkeypatch, k)
    assert isinstance(seg, SegmentedSession)
    assert seg.segments == -(-len(proto.graph.node) // k)
    for a, b in zip(ref, got):
        np.testing.assert_allclose(b, a, rtol=RTOL, atol=ATOL)


def test_pieces_are_standalone_models_with_the_crossing_tensors_as_io() -> None:
    proto = skip_chain(blocks=4)
    pieces = segment_model(proto, 7)
    assert pieces is not None and len(pieces) == 3  # 21 nodes: 7 + 7 + 7
    for p in pieces:
        onnx.checker.check_model(p.proto, full_check=True)
        assert len(p.proto.graph.node) == 7
    # x, e and the shared weight are read in every piece; e crosses from the first piece
    assert all("x" in p.inputs for p in pieces)
    assert "e" in pieces[0].outputs and all("e" in p.inputs for p in pieces[1:])
    assert all("shared" in {t.name for t in p.proto.graph.initializer} for p in pieces)
    # the middle graph output h2 is returned by the piece that makes it, and stays alive
    assert any("h2" in p.outputs for p in pieces)
    assert all("h2" not in p.release for p in pieces)
    # a crossing tensor is released after its last reader
    assert "e" in pieces[-1].release
    # the original proto is untouched
    assert len(proto.graph.node) == 21 and len(proto.graph.initializer) == 5


def test_nothing_changes_at_or_below_the_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    proto = skip_chain()
    n = len(proto.graph.node)
    assert segment_model(proto, n) is None
    monkeypatch.setattr(session_mod, "SEGMENT_NODES", n)
    assert type(make_session(proto)) is ort.InferenceSession


def test_models_that_cannot_be_cut_run_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """A graph output that is a graph input (no node produces it) is not cut: one session."""
    proto = skip_chain()
    proto.graph.output.append(_vi("x"))
    assert segment_model(proto, 4) is None
    monkeypatch.setattr(session_mod, "SEGMENT_NODES", 4)
    sess = make_session(proto)
    assert type(sess) is ort.InferenceSession
    assert len(sess.run(None, _feeds())) == 3


def test_subgraph_captures_stay_in_one_piece(monkeypatch: pytest.MonkeyPatch) -> None:
    """An If whose branches read ``a`` and ``b`` (made by earlier nodes) from the outer scope:
    those are the If's inputs for the cut, so they cross into its piece."""
    then_g = helper.make_graph([helper.make_node("Add", ["a", "b"], ["t"])], "then", [], [_vi("t")])
    else_g = helper.make_graph([helper.make_node("Sub", ["a", "b"], ["u"])], "else", [], [_vi("u")])
    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node("Sigmoid", ["x"], ["b"]),
        helper.make_node("Neg", ["x"], ["n1"]),
        helper.make_node("Abs", ["n1"], ["n2"]),
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["c"]),
        helper.make_node("If", ["c"], ["y0"], then_branch=then_g, else_branch=else_g),
        helper.make_node("Add", ["y0", "n2"], ["y"]),
    ]
    inits = [numpy_helper.from_array(np.array(0.0, np.float32), "zero")]
    proto = _model(nodes, inits, [_vi("x")], [_vi("y")])
    pieces = segment_model(proto, 3)
    assert pieces is not None
    holder = next(p for p in pieces if any(n.op_type == "If" for n in p.proto.graph.node))
    assert {"a", "b"} <= set(holder.inputs)
    for seed in range(4):  # both branches
        feeds = _feeds(seed)
        _, ref, got = _run_both(proto, feeds, monkeypatch, 3)
        monkeypatch.setattr(session_mod, "SEGMENT_NODES", 10_000)
        np.testing.assert_allclose(got[0], ref[0], rtol=RTOL, atol=ATOL)


def test_untyped_crossing_tensors_get_their_types_from_shape_inference() -> None:
    proto = skip_chain()
    assert not proto.graph.value_info
    pieces = segment_model(proto, 5)
    assert pieces is not None
    for p in pieces[1:]:
        assert all(i.type.tensor_type.elem_type == TensorProto.FLOAT for i in p.proto.graph.input)


def test_feed_errors_and_ort_values(monkeypatch: pytest.MonkeyPatch) -> None:
    proto = skip_chain()
    monkeypatch.setattr(session_mod, "SEGMENT_NODES", 6)
    sess = make_session(proto)
    assert isinstance(sess, SegmentedSession)
    with pytest.raises(ValueError, match="missing"):
        sess.run(None, {})
    with pytest.raises(ValueError, match="invalid input"):
        sess.run(None, {**_feeds(), "e": np.zeros((1, W), np.float32)})  # a crossing tensor
    with pytest.raises(ValueError, match="invalid output"):
        sess.run(["e"], _feeds())
    ref = sess.run(None, _feeds(5))
    ov = {"x": ort.OrtValue.ortvalue_from_numpy(_feeds(5)["x"])}
    got = [v.numpy() for v in sess.run_with_ort_values(None, ov)]
    for a, b in zip(ref, got):
        np.testing.assert_array_equal(a, b)
    names = [o.name for o in sess.get_outputs()]
    np.testing.assert_array_equal(run_session(sess, names[1:], _feeds(5))[0], ref[1])


def test_zero_copy_weights_are_handed_to_every_piece(monkeypatch: pytest.MonkeyPatch) -> None:
    """Large weights go to onnxruntime without a copy (``add_initializer``); each piece gets
    those it reads."""
    m = Model.from_onnx(skip_chain())
    feeds = _feeds(7)
    monkeypatch.setattr(session_mod, "ZERO_COPY_BYTES", 0)
    monkeypatch.setattr(session_mod, "ZERO_COPY_MIN", 16)
    ref = run_model(m, feeds)  # zero-copy, whole (prepacking off there: the same kernels)
    monkeypatch.setattr(session_mod, "SEGMENT_NODES", 8)
    sess = make_session(m)
    assert isinstance(sess, SegmentedSession)
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    for name, v in ref.items():
        np.testing.assert_allclose(got[name], v, rtol=RTOL, atol=ATOL)


def test_optimize_verifies_through_segmented_sessions(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The whole optimize job (validation, verification, load check) with the threshold lowered:
    the written model is the same as without segments."""
    from graphopt.jobs.optimize import optimize

    src = fixture_path("cnn.onnx")
    plain = optimize(src, output=tmp_path / "plain.onnx")
    cuts: list[int] = []
    real = session_mod.segment_model

    def spy(proto: onnx.ModelProto, max_nodes: int) -> object:
        pieces = real(proto, max_nodes)
        cuts.append(len(pieces) if pieces else 0)
        return pieces

    monkeypatch.setattr(session_mod, "segment_model", spy)
    monkeypatch.setattr(session_mod, "SEGMENT_NODES", 3)
    cut = optimize(src, output=tmp_path / "cut.onnx")
    # validation (which runs the input: its outputs are verification's reference), the
    # result's run, the ENABLE_ALL load check: all cut
    assert len(cuts) == 3 and all(n >= 2 for n in cuts)
    assert cut.verify is not None and cut.verify.ok
    assert (tmp_path / "cut.onnx").read_bytes() == (tmp_path / "plain.onnx").read_bytes()
    assert plain.verify is not None
    for a, b in zip(plain.verify.outputs, cut.verify.outputs):
        assert a.max_abs_err == b.max_abs_err


def test_a_segmented_validation_session_is_not_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """Held through the passes a session costs ~5 KB per node; a segmented one reopens in
    linear time, so validation does not keep it (a small model's still is)."""
    from graphopt.core.session import take_session
    from graphopt.core.validate import open_model

    small = open_model(fixture_path("cnn.onnx"), keep_session=True)
    assert take_session(small) is not None
    monkeypatch.setattr(session_mod, "SEGMENT_NODES", 3)
    large = open_model(fixture_path("cnn.onnx"), keep_session=True)
    assert take_session(large) is None


def test_run_feeds_opens_one_segment_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """run_feeds (verification, run_model) runs every feed dict through a segment before the next
    segment opens, and closes each: one segment's session in memory, each opened once."""
    proto = skip_chain()
    feed_list = [_feeds(s) for s in range(3)]
    whole = make_session(proto)
    ref = [whole.run(None, f) for f in feed_list]
    alive: list[object] = []
    opened: list[int] = []
    real = session_mod._open_one

    def spy(*a: object, **k: object) -> ort.InferenceSession:
        alive[:] = [r for r in alive if r() is not None]  # type: ignore[operator]
        opened.append(len(alive))
        sess = real(*a, **k)  # type: ignore[arg-type]
        alive.append(weakref.ref(sess))
        return sess

    monkeypatch.setattr(session_mod, "_open_one", spy)
    monkeypatch.setattr(session_mod, "SEGMENT_NODES", 5)
    names, rows = session_mod.run_feeds(proto, feed_list)
    assert names == [o.name for o in whole.get_outputs()]
    assert len(opened) == -(-len(proto.graph.node) // 5) and max(opened) == 0
    for a, b in zip(ref, rows):
        for x, y in zip(a, b):
            np.testing.assert_allclose(y, x, rtol=RTOL, atol=ATOL)
    one = run_model(proto, feed_list[1])
    np.testing.assert_array_equal(one[names[0]], ref[1][0])


def test_run_feeds_says_which_failure_is_an_open_error(monkeypatch: pytest.MonkeyPatch) -> None:
    proto = skip_chain()
    proto.graph.node[-1].op_type = "NoSuchOp"
    monkeypatch.setattr(session_mod, "SEGMENT_NODES", 5)
    with pytest.raises(session_mod.SessionOpenError):
        session_mod.run_feeds(proto, [_feeds()])
    with pytest.raises(ValueError, match="missing"):  # a run failure is onnxruntime's own
        session_mod.run_feeds(skip_chain(), [{}])


def test_open_check_opens_segments_one_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Validation and the ENABLE_ALL load check only learn whether a model opens: a large one's
    segments are opened and closed one by one, and a refusal is onnxruntime's own."""
    proto = skip_chain()
    assert type(session_mod.open_check(proto)) is ort.InferenceSession
    monkeypatch.setattr(session_mod, "SEGMENT_NODES", 5)
    assert session_mod.open_check(proto, "all") is None
    proto.graph.node[-1].op_type = "NoSuchOp"
    with pytest.raises(Exception, match="NoSuchOp"):
        session_mod.open_check(proto)
