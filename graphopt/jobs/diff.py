"""The diff job: what changed between two models in the graph (:mod:`graphopt.algorithms.diff`), and
where their numbers part ways.

The same inputs go through both models in onnxruntime (``ORT_DISABLE_ALL``); every output of A is
compared with B's (max abs error, cosine, SQNR). With ``per_layer`` every tensor produced by a node
of A that B also has is exposed as an output of both, and the first node in A's topological order
whose output differs beyond ``atol + rtol * max|ref|`` is reported, as Polygraphy's
``--onnx-outputs mark all`` comparison does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.algorithms.diff import DiffReport, LayerDiff, producers, structural_diff
from graphopt.core.feeds import random_feeds
from graphopt.core.model import Model
from graphopt.core.session import make_session
from graphopt.core.shapes import prepare
from graphopt.core.verify import OutputDiff, compare
from graphopt.jobs.common import ModelLike, as_model


def diff(a: ModelLike, b: ModelLike, **kwargs: Any) -> DiffReport:
    """Structural and numerical diff of two models (paths or Models; neither is changed); the
    options are :func:`diff_models`'s."""
    return diff_models(prepare(as_model(a).clone()), prepare(as_model(b).clone()), **kwargs)


def _feeds_for(model: Model, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Feeds cast to ``model``'s input dtypes (a float16 model gets float16 inputs)."""
    out = {}
    for t in model.graph.inputs:
        if t.name in feeds:
            v = np.asarray(feeds[t.name])
            out[t.name] = v.astype(np.dtype(t.dtype)) if t.dtype is not None else v
    return out


def _run_all(model: Model, names: Sequence[str], feeds: Mapping[str, np.ndarray]
             ) -> dict[str, np.ndarray]:
    m = model.clone()
    tensors = m.graph.tensors()
    have = {t.name for t in m.graph.outputs}
    for n in names:
        if n not in have and n in tensors and isinstance(tensors[n], gs.Variable):
            m.graph.outputs.append(tensors[n])
            have.add(n)
    sess = make_session(m)
    out_names = [o.name for o in sess.get_outputs()]
    res = sess.run(out_names, _feeds_for(m, feeds))
    return dict(zip(out_names, res))


def diff_models(a: Model, b: Model, feeds: Mapping[str, np.ndarray] | None = None,
                per_layer: bool = False, rtol: float = 1e-4, atol: float = 1e-5,
                seed: int = 0, numeric: bool = True) -> DiffReport:
    """Structural and numerical diff of two models (shapes should be inferred on both).

    Args:
        feeds: inputs for both models (default: seeded random inputs from A's input shapes).
        per_layer: compare every tensor both models produce and find the first divergent node.
        rtol, atol: an output/tensor is equal when ``max_abs_err <= atol + rtol * max|ref|``.
    """
    r = structural_diff(a, b, DiffReport(rtol=rtol, atol=atol))
    if not numeric:
        return r
    feeds = dict(feeds) if feeds is not None else random_feeds(a, seed=seed)
    out_a = [t.name for t in a.graph.outputs]
    prod_a = producers(a.graph)
    names_b = set(producers(b.graph)) | {t.name for t in b.graph.inputs}
    layer_names: list[str] = []
    if per_layer:
        layer_names = [o.name for n in a.graph.nodes for o in n.outputs
                       if o.name and o.name in names_b and n.op != "Constant"]
    ra = _run_all(a, layer_names + out_a, feeds)
    rb = _run_all(b, layer_names + out_a, feeds)
    for name in out_a:
        if name not in rb:
            r.outputs.append(OutputDiff(name, float("inf"), 0.0, float("-inf"), 0.0, [], False,
                                        "output missing from B"))
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
