"""The diff job (``graphopt diff``, ``graphopt.diff``): what changed between two models in the
graph (:mod:`graphopt.algorithms.diff`), and where their numbers part ways.

The same inputs go through both models in onnxruntime (``ORT_DISABLE_ALL``); every output of A is
compared with B's (max abs error, cosine, SQNR). With ``per_layer`` every tensor produced by a node
of A that B also has is exposed as an output of both, and the first node in A's topological order
whose output differs beyond ``atol + rtol * max|ref|`` is reported, as Polygraphy's
``--onnx-outputs mark all`` comparison does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.algorithms.diff import DiffReport, LayerDiff, producers, structural_diff
from graphopt.core.feeds import check_feeds, random_feeds
from graphopt.core.model import Model
from graphopt.core.session import make_session
from graphopt.core.shapes import prepare
from graphopt.core.verify import OutputDiff, compare
from graphopt.jobs.common import ModelLike, as_model, jsonable, source_path


@dataclass
class DiffResult:
    """What :func:`diff` found.

    Attributes:
        report: the structural and numerical differences (:class:`DiffReport`).
        a, b: the files compared (None for models built in memory).
        per_layer: whether every tensor both models produce was compared.
    """

    report: DiffReport
    a: str | None = None
    b: str | None = None
    per_layer: bool = False

    @property
    def outputs_equal(self) -> bool:
        return self.report.outputs_equal

    @property
    def first_divergent_node(self) -> str | None:
        return self.report.first_divergent_node

    def to_json(self) -> dict[str, Any]:
        """The ``graphopt diff --json`` object (``outputs_equal``, ``outputs``,
        ``first_divergent_node``, ``nodes_added``, ``nodes_removed``, ...; ``layers`` with
        ``per_layer``)."""
        d = {"a": self.a, "b": self.b, **self.report.to_json()}
        if not self.per_layer:
            d.pop("layers")
        return jsonable(d)  # type: ignore[no-any-return]


def diff(
    a: ModelLike,
    b: ModelLike,
    *,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    feeds: Mapping[str, np.ndarray] | None = None,
    per_layer: bool = False,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    seed: int = 0,
    numeric: bool = True,
) -> DiffResult:
    """The diff job (``graphopt diff``): structural and numerical diff of two models (paths or
    Models; neither is changed).

    Args:
        input_shapes: fixed shapes for dynamic inputs, applied to both models.
        feeds, per_layer, rtol, atol, seed, numeric: as :func:`diff_models`.
    """
    ma = prepare(_copy(as_model(a, tensors_only="diff"), a), input_shapes)
    mb = prepare(_copy(as_model(b, tensors_only="diff"), b), input_shapes)
    rep = diff_models(
        ma, mb, feeds=feeds, per_layer=per_layer, rtol=rtol, atol=atol, seed=seed, numeric=numeric
    )
    return DiffResult(rep, source_path(a), source_path(b), per_layer)


def _copy(model: Model, given: ModelLike) -> Model:
    """A copy when the caller handed a Model in (it is not changed), else the loaded model."""
    return model.clone() if model is given else model


def _feeds_for(model: Model, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Feeds cast to ``model``'s input dtypes (a float16 model gets float16 inputs)."""
    out = {}
    for t in model.graph.inputs:
        if t.name in feeds:
            v = np.asarray(feeds[t.name])
            out[t.name] = v.astype(np.dtype(t.dtype)) if t.dtype is not None else v
    return out


def _run_all(
    model: Model, names: Sequence[str], feeds: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """The model's outputs and the tensors ``names`` (those it computes) on ``feeds``."""
    tensors = model.graph.tensors()
    extra = [n for n in names if n in tensors and isinstance(tensors[n], gs.Variable)]
    sess = make_session(model, outputs=extra)
    out_names = [o.name for o in sess.get_outputs()]
    return dict(zip(out_names, sess.run(out_names, _feeds_for(model, feeds))))


def diff_models(
    a: Model,
    b: Model,
    feeds: Mapping[str, np.ndarray] | None = None,
    per_layer: bool = False,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    seed: int = 0,
    numeric: bool = True,
) -> DiffReport:
    """Structural and numerical diff of two models (shapes should be inferred on both).

    Args:
        feeds: inputs for both models (default: seeded random inputs from A's input shapes).
        per_layer: compare every tensor both models produce and find the first divergent node.
        rtol, atol: an output/tensor is equal when ``max_abs_err <= atol + rtol * max|ref|``.
    """
    r = structural_diff(a, b, DiffReport(rtol=rtol, atol=atol))
    if not numeric:
        return r
    feeds = check_feeds(a, feeds, "feeds") if feeds is not None else random_feeds(a, seed=seed)
    out_a = [t.name for t in a.graph.outputs]
    prod_a = producers(a.graph)
    names_b = set(producers(b.graph)) | {t.name for t in b.graph.inputs}
    layer_names: list[str] = []
    if per_layer:
        layer_names = [
            o.name
            for n in a.graph.nodes
            for o in n.outputs
            if o.name and o.name in names_b and n.op != "Constant"
        ]
    ra = _run_all(a, layer_names + out_a, feeds)
    rb = _run_all(b, layer_names + out_a, feeds)
    for name in out_a:
        if name not in rb:
            r.outputs.append(
                OutputDiff(
                    name, float("inf"), 0.0, float("-inf"), 0.0, [], False, "output missing from B"
                )
            )
            continue
        r.outputs.append(compare(name, ra[name], _as_ref_type(rb[name], ra[name]), rtol, atol))
    for name in layer_names:
        if name not in ra or name not in rb:
            continue
        d = compare(name, ra[name], _as_ref_type(rb[name], ra[name]), rtol, atol)
        node = prod_a[name]
        r.layers.append(LayerDiff(name, node.name, node.op, d.max_abs_err, d.sqnr_db, d.ok))
        if not d.ok and r.first_divergent_node is None:
            r.first_divergent_node, r.first_divergent_tensor = node.name, name
    return r


def _as_ref_type(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype != ref.dtype and x.dtype.kind == "f" and ref.dtype.kind == "f":
        return x.astype(ref.dtype)
    return x
