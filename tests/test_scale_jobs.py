"""The jobs' shortcuts for a model they loaded themselves (issue 15: no copy of it, one export of
the result, validation's onnxruntime session reused as the reference) write exactly what they
write for a Model given in memory, which they copy."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest

import graphopt.core.session as session_module
from graphopt.core.errors import VerificationError
from graphopt.core.feeds import random_feeds
from graphopt.core.graph import tensor_map
from graphopt.core.loader import load
from graphopt.core.model import Model
from graphopt.core.pass_manager import Pass, PassResult
from graphopt.core.saver import save
from graphopt.core.session import run_opened, take_session
from graphopt.core.validate import check_runnable
from graphopt.fixtures import fixture_path
from graphopt.jobs.optimize import optimize
from graphopt.jobs.plan import plan_memory


@pytest.mark.parametrize("fixture", ["cnn.onnx", "residual.onnx"])
def test_optimize_from_path_equals_from_model(fixture: str, tmp_path: Path) -> None:
    path = fixture_path(fixture)
    given = load(path)
    before = given.to_onnx().SerializeToString()
    a = optimize(path, output=tmp_path / "a.onnx")
    b = optimize(given, output=tmp_path / "b.onnx")
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert a.to_json()["verify"] == b.to_json()["verify"]
    assert given.to_onnx().SerializeToString() == before  # a Model given is not changed


@pytest.mark.parametrize("fixture", ["cnn.onnx", "mobilenet_block.onnx", "bert_tiny_dynamic.onnx"])
def test_plan_from_path_equals_from_model(fixture: str, tmp_path: Path) -> None:
    path = fixture_path(fixture)
    given = load(path)
    before = given.to_onnx().SerializeToString()
    a = plan_memory(path, output=tmp_path / "a.onnx")
    b = plan_memory(given, output=tmp_path / "b.onnx")
    assert b.to_json()["arena_bytes"] == a.to_json()["arena_bytes"]
    assert a.proof is not None and a.proof.ok
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert (tmp_path / "a.onnx.memplan.json").read_text() == (
        tmp_path / "b.onnx.memplan.json"
    ).read_text()
    assert given.to_onnx().SerializeToString() == before


def _count_sessions(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the optimization level of every onnxruntime session of a whole model (more than
    one node: the arena executor's one-node sessions are left out) opened from now on."""
    opened: list[str] = []
    real = ort.InferenceSession

    def counting(*args: Any, **kwargs: Any) -> ort.InferenceSession:
        so = args[1] if len(args) > 1 else kwargs.get("sess_options")
        src = args[0]
        proto = (
            onnx.load_from_string(src)
            if isinstance(src, bytes)
            else onnx.load(str(src), load_external_data=False)
        )
        if len(proto.graph.node) > 1:
            opened.append(str(so.graph_optimization_level) if so is not None else "default")
        return real(*args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", counting)
    return opened


def test_optimize_from_path_opens_the_input_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Validation's session of a model optimize loaded itself is verification's reference:
    three sessions (validation, the result at ORT_DISABLE_ALL, the result's ENABLE_ALL load
    check) instead of four; a Model given in memory still opens its own reference."""
    path = fixture_path("cnn.onnx")
    opened = _count_sessions(monkeypatch)
    optimize(path, output=tmp_path / "a.onnx")
    assert len(opened) == 3
    assert sum("ENABLE_ALL" in lv for lv in opened) == 1
    opened.clear()
    optimize(load(path), output=tmp_path / "b.onnx")
    assert len(opened) == 3  # no validation here: the reference, the result, the load check


def test_plan_from_path_opens_the_input_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """plan -o proves the plan against validation's session of the model it loaded."""
    opened = _count_sessions(monkeypatch)
    res = plan_memory(fixture_path("cnn.onnx"), output=tmp_path / "a.onnx")
    assert res.proof is not None and res.proof.ok
    assert len(opened) == 1


class _DoubleFirstWeight(Pass):
    """A wrong rewrite: doubles the first float weight of the graph."""

    name = "test-double-first-weight"

    def call(self, model: Model) -> PassResult:
        for t in tensor_map(model.graph).values():
            if isinstance(t, gs.Constant) and np.asarray(t.values).dtype == np.float32:
                t.values = np.asarray(t.values) * 2
                return PassResult(model, True)
        return PassResult(model, False)


def test_reused_reference_still_catches_a_wrong_rewrite(tmp_path: Path) -> None:
    """Negative case: the reference run in the kept session is the input's computation, so a
    pass that changes the numbers fails verification, from a path as from a Model."""
    path = fixture_path("cnn.onnx")
    for model in (path, load(path)):
        with pytest.raises(VerificationError):
            optimize(model, passes=[_DoubleFirstWeight()], output=tmp_path / "o.onnx")
        assert not (tmp_path / "o.onnx").exists()


def test_kept_session_is_handed_over_once() -> None:
    model = load(fixture_path("cnn.onnx"))
    assert take_session(model) is None  # nothing is kept unless asked
    check_runnable(model, keep=True)
    sess = take_session(model)
    assert sess is not None
    assert set(run_opened(sess, random_feeds(model, seed=0))) == {
        t.name for t in model.graph.outputs
    }
    assert take_session(model) is None
    check_runnable(model, keep=True)
    del model
    gc.collect()
    assert not session_module._KEPT  # dropped with its model


def test_optimize_from_path_transforms_the_input_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """optimize of a file keeps one IR: no copy of the graph (it was copied once for the
    reference before), the input not kept beside the result, its figures taken before the
    passes (the same JSON as when it is kept)."""
    path = fixture_path("residual.onnx")
    kept = optimize(path, output=tmp_path / "k.onnx", keep_original=True)
    clones: list[Model] = []
    real = Model.clone

    def counting(self: Model) -> Model:
        clones.append(self)
        return real(self)

    monkeypatch.setattr(Model, "clone", counting)
    res = optimize(path, output=tmp_path / "a.onnx")
    assert not clones
    assert res.original is None
    with pytest.raises(ValueError, match="did not keep"):
        res.kept_original()
    a, b = res.to_json(), kept.to_json()
    for key in ("nodes_before", "macs_before", "params_before", "ops_before", "verify"):
        assert a[key] == b[key], key
    assert a["nodes_before"] > a["nodes_after"]
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "k.onnx").read_bytes()
    # the verified export was written (no second export): the bytes a fresh export writes
    assert (tmp_path / "a.onnx").read_bytes() == save(res.model, tmp_path / "f.onnx").read_bytes()


def test_optimize_writes_the_verified_export(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The optimized model is exported once for verification, the load check and the file."""
    exports: list[int] = []  # node count of every export with weights
    real = Model.to_onnx

    def counting(self: Model, check: bool = False, weights: bool = True) -> onnx.ModelProto:
        if weights:
            exports.append(len(self.graph.nodes))
        return real(self, check=check, weights=weights)

    path = fixture_path("cnn.onnx")
    monkeypatch.setattr(Model, "to_onnx", counting)
    res = optimize(path, output=tmp_path / "a.onnx")
    after = res.to_json()["nodes_after"]
    assert res.to_json()["nodes_before"] != after
    assert exports.count(after) == 1  # the input's were before the passes
    assert res.export is None  # dropped once written


@pytest.mark.parametrize("fixture", ["cnn.onnx", "bert_tiny_dynamic.onnx"])
def test_plan_from_path_plans_the_loaded_model_in_place(
    fixture: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """plan -o of a file keeps one IR: the loaded model is prepared and ordered in place (no
    copy), then written with its declared shapes (bert_tiny_dynamic: dynamic dims planned at
    drawn shapes, and its order changes), and planned_model() does not apply the order twice."""
    path = fixture_path(fixture)
    clones: list[Model] = []
    real = Model.clone

    def counting(self: Model) -> Model:
        clones.append(self)
        return real(self)

    monkeypatch.setattr(Model, "clone", counting)
    res = plan_memory(path, output=tmp_path / "a.onnx")
    assert not clones
    assert res.proof is not None and res.proof.ok
    monkeypatch.setattr(Model, "clone", real)
    given = plan_memory(load(path), output=tmp_path / "b.onnx")
    assert res.plan.order_changed == given.plan.order_changed
    assert res.to_json()["input_shapes"] == given.to_json()["input_shapes"]
    assert (
        res.planned_model().to_onnx().SerializeToString()
        == given.planned_model().to_onnx().SerializeToString()
    )


def _chain_file(path: Path, blocks: int) -> Path:
    """bench/scale.py's chain: blocks of MatMul(W) -> Add(b) -> Relu -> Identity -> Mul(s)."""
    rng = np.random.default_rng(0)
    nodes, inits, h = [], [], "x"
    for i in range(blocks):
        inits += [
            onnx.numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), f"w{i}"),
            onnx.numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), f"b{i}"),
            onnx.numpy_helper.from_array(np.array([1.01], np.float32), f"s{i}"),
        ]
        nodes += [
            onnx.helper.make_node("MatMul", [h, f"w{i}"], [f"m{i}"], name=f"mm{i}"),
            onnx.helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"], name=f"add{i}"),
            onnx.helper.make_node("Relu", [f"a{i}"], [f"r{i}"], name=f"relu{i}"),
            onnx.helper.make_node("Identity", [f"r{i}"], [f"i{i}"], name=f"id{i}"),
            onnx.helper.make_node("Mul", [f"i{i}", f"s{i}"], [f"h{i}"], name=f"mul{i}"),
        ]
        h = f"h{i}"
    vi = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph(
        nodes,
        "chain",
        [vi("x", onnx.TensorProto.FLOAT, [1, 8])],
        [vi(h, onnx.TensorProto.FLOAT, [1, 8])],
        inits,
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("job", ["optimize", "plan"])
def test_large_input_is_opened_once(
    job: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model over SEGMENT_NODES nodes that the job loaded: validation runs its segments on the
    seeded inputs as it opens them and the job's reference run (verification, the plan's proof)
    takes those outputs, so the input's first segment is opened once (twice before: validation
    opened and closed them, the reference opened them again); the same file and figures as for
    a Model given (whose reference runs)."""
    monkeypatch.setattr(session_module, "SEGMENT_NODES", 8)
    path = _chain_file(tmp_path / "chain.onnx", 6)
    opened: list[int] = []  # sessions of more than one node that hold the input's 'id0'
    real = ort.InferenceSession

    def counting(*args: Any, **kwargs: Any) -> ort.InferenceSession:
        src = args[0]
        proto = onnx.load_from_string(src) if isinstance(src, bytes) else onnx.load(str(src))
        names = {n.name for n in proto.graph.node}
        if len(names) > 1 and "id0" in names:
            opened.append(len(names))
        return real(*args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", counting)
    run = optimize if job == "optimize" else plan_memory
    res = run(path, output=tmp_path / "a.onnx")
    assert len(opened) == 1
    assert not session_module._KEPT_OUTPUTS  # taken
    given = run(load(path), output=tmp_path / "b.onnx")
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    a, b = res.to_json(), given.to_json()
    a.pop("seconds"), b.pop("seconds")
    a.pop("output"), b.pop("output")
    a.pop("input", None), b.pop("input", None)
    a.pop("model", None), b.pop("model", None)
    a.pop("plan_file", None), b.pop("plan_file", None)
    assert a == b


def test_large_input_validation_run_is_not_reused_for_other_feeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Negative case: outputs kept for the seeded inputs are not handed to a run on others."""
    monkeypatch.setattr(session_module, "SEGMENT_NODES", 8)
    model = load(_chain_file(tmp_path / "chain.onnx", 6))
    check_runnable(model, keep_outputs=True)
    other = {"x": np.ones((1, 8), np.float32)}
    assert session_module.take_outputs(model, other) is None
    assert session_module.take_outputs(model, random_feeds(model, seed=0)) is None  # taken once
    check_runnable(model, keep_outputs=True)
    kept = session_module.take_outputs(model, random_feeds(model, seed=0))
    assert kept is not None
    np.testing.assert_array_equal(
        kept["h5"],
        run_opened(session_module.make_session(model), random_feeds(model, seed=0))["h5"],
    )


def test_a_sidecar_can_be_streamed(tmp_path: Path) -> None:
    """save() takes a function that writes a sidecar's text (plan's JSON is streamed, not held
    as one string): the same file as the text given whole."""
    model = load(fixture_path("cnn.onnx"))
    text = '{"a": [1, 2]}\n'
    save(model, tmp_path / "a.onnx", sidecars={tmp_path / "a.json": text})
    save(model, tmp_path / "b.onnx", sidecars={tmp_path / "b.json": lambda f: f.write(text)})
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
