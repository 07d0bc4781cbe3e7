"""graphopt diff: a model against its optimized version (outputs equal, fused groups named) and
against a copy with one weight changed (the node reading that weight is the first divergent one)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from conftest import real_or_skip

from graphopt.algorithms.diff import structural_diff
from graphopt.cli import main
from graphopt.core.loader import load
from graphopt.core.model import Model
from graphopt.core.saver import save
from graphopt.core.shapes import prepare
from graphopt.fixtures import fixture_path
from graphopt.jobs.diff import diff_models
from graphopt.jobs.optimize import optimize_model


def _optimized(name: str) -> tuple[Model, Model]:
    a = prepare(load(fixture_path(name)))
    return a, optimize_model(a).model


def _break_weight(model: Model, consumer_op: str = "Conv", which: int = 1) -> tuple[Model, str]:
    """A copy with one weight changed; returns (copy, name of the node that reads it)."""
    b = model.clone()
    nodes = [
        n for n in b.graph.nodes if n.op == consumer_op and isinstance(n.inputs[1], gs.Constant)
    ]
    node = nodes[which]
    w = node.inputs[1]
    vals = np.array(w.values, copy=True)
    vals.flat[0] += 1.0 + abs(float(vals.flat[0]))
    node.inputs[1] = gs.Constant(w.name, vals)
    return b, node.name


def test_optimized_mobilenet_block_groups_named() -> None:
    a, b = _optimized("mobilenet_block.onnx")
    rep = diff_models(a, b, per_layer=True)
    assert rep.outputs_equal
    assert rep.first_divergent_node is None
    labels = [g.label for g in rep.fused_groups]
    bns = {n.name for n in a.graph.nodes if n.op == "BatchNormalization"}
    assert len(bns) == 3
    assert bns <= {n for g in rep.fused_groups for n in g.replaced}  # every BN in a named group
    assert "Conv+BatchNormalization -> Conv" in labels
    assert labels.count("Add+Clip+Mul+Div -> HardSwish") == 2
    assert rep.nodes_added.get("HardSwish") == 2
    assert rep.nodes_removed["BatchNormalization"] == 3
    # every node A lost is accounted for: in a fused group or reported removed
    grouped = {n for g in rep.fused_groups for n in g.replaced}
    lost = {n.name for n in a.graph.nodes} - {n.name for n in b.graph.nodes}
    assert lost <= grouped | set(rep.removed)
    # layers compared include the tensors the rewrites kept
    assert len(rep.layers) > 5 and all(x.ok for x in rep.layers)


def test_broken_weight_first_divergent_node() -> None:
    a = prepare(load(fixture_path("residual.onnx")))
    b, reader = _break_weight(a, "Conv", 1)
    rep = diff_models(a, b, per_layer=True)
    assert not rep.outputs_equal
    assert rep.first_divergent_node == reader
    assert rep.initializers_changed
    assert not rep.fused_groups and not rep.nodes_added and not rep.nodes_removed


def test_broken_optimized_points_at_fused_node() -> None:
    """Against an optimized model with a broken weight, the divergence starts at the fused group's
    output (the node in A that produces the tensor the broken fused node writes)."""
    a, b = _optimized("cnn.onnx")
    b2, reader = _break_weight(b, "Conv", 1)
    rep = diff_models(a, b2, per_layer=True)
    out = next(n for n in b2.graph.nodes if n.name == reader).outputs[0].name
    producer = next(n for n in a.graph.nodes if any(o.name == out for o in n.outputs))
    assert rep.first_divergent_node == producer.name
    assert rep.first_divergent_tensor == out


def test_identical_models_no_change() -> None:
    a = prepare(load(fixture_path("transformer_block.onnx")))
    rep = diff_models(a, a.clone(), per_layer=True)
    assert rep.outputs_equal and rep.first_divergent_node is None
    assert not (
        rep.fused_groups
        or rep.changed
        or rep.added
        or rep.removed
        or rep.nodes_added
        or rep.nodes_removed
        or rep.initializers_changed
        or rep.shapes_changed
    )


def test_fp16_diff_shapes_and_casts() -> None:
    from graphopt.passes import get_pass

    a = prepare(load(fixture_path("cnn.onnx")))
    b = a.clone()
    get_pass("fp16")(b)
    rep = structural_diff(a, b)
    assert rep.nodes_added == {"Cast": 2}
    assert any(s["dtype_b"] == "float16" for s in rep.shapes_changed)
    assert rep.changed  # same op, new (float16) inputs


@pytest.mark.real
def test_real_cls_optimized_diff() -> None:
    path, shapes = real_or_skip("cls")
    a = prepare(load(path), shapes)
    b = optimize_model(a).model
    rep = diff_models(a, b)
    assert rep.outputs_equal
    assert any(g.label.startswith("Conv+BatchNormalization") for g in rep.fused_groups)


def test_cli_diff_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = _optimized("mobilenet_block.onnx")
    pa, pb = tmp_path / "a.onnx", tmp_path / "b.onnx"
    save(a, pa)
    save(b, pb)
    rc = main(["diff", str(pa), str(pb), "--json", "--per-layer"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    info = json.loads(cap.out)
    for key in ("outputs_equal", "outputs", "first_divergent_node", "nodes_added", "nodes_removed"):
        assert key in info
    assert info["outputs_equal"] is True and info["first_divergent_node"] is None
    assert "Add+Clip+Mul+Div -> HardSwish" in {g["label"] for g in info["fused_groups"]}
    broken, reader = _break_weight(a, "Conv", 0)
    pc = tmp_path / "c.onnx"
    save(broken, pc)
    rc = main(["diff", str(pa), str(pc), "--per-layer", "--check"])
    cap = capsys.readouterr()
    assert rc == 1
    assert reader in cap.out
    assert main(["diff", str(pa), str(tmp_path / "nope.onnx")]) == 2
