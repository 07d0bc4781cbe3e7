"""Chains of Slices on different axes -> one multi-axis Slice.

``Slice(Slice(x, s1, e1, a1, p1), s2, e2, a2, p2)`` with constant starts, ends, axes and steps,
and axis sets ``a1`` and ``a2`` disjoint (after normalizing negative axes with the rank of ``x``)
computes ``Slice(x, s1 ++ s2, e1 ++ e2, a1 ++ a2, p1 ++ p2)``: slicing one axis does not change
the length or the indexing of another, so the two selections commute and compose into one (each
start/end keeps its own clamping, to the same axis length). One node replaces two; the inner Slice
stays when something else reads it. Exporters write ``x[:, :, ::2, ::2]`` as such a chain (the
YOLOv5/YOLOX "Focus" stem); onnxslim makes the same merge. Slices of opset < 10 (attributes) are
left alone.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.core.graph import const, insert_nodes, make_node
from graphopt.core.model import Model, all_graph_output_ids
from graphopt.core.pass_manager import Pass, PassResult, register_pass
from graphopt.core.pattern import slice_parts

logger = logging.getLogger(__name__)


@register_pass
class MergeSlicesPass(Pass):
    """Two chained Slices on disjoint axes -> one Slice over all of them."""

    name = "merge-slices"

    def call(self, model: Model) -> PassResult:
        merged = 0
        if model.opset < 10:
            return PassResult(model, False, {})
        escaping = all_graph_output_ids(model)
        for g in model.walk_graphs():
            new: list[gs.Node] = []
            dead: set[int] = set()
            for outer in list(g.nodes):
                if outer.op != "Slice" or id(outer) in dead or len(outer.outputs) != 1:
                    continue
                mid = outer.inputs[0]
                if isinstance(mid, gs.Constant) or len(mid.inputs) != 1:
                    continue
                inner = mid.inputs[0]
                if inner.op != "Slice" or id(inner) in dead or len(inner.outputs) != 1:
                    continue
                if any(inner is n for n in new):  # made in this sweep: merged on the next one
                    continue
                x = inner.inputs[0]
                if x.shape is None:
                    continue
                rank = len(x.shape)
                a = slice_parts(inner, rank)
                b = slice_parts(outer, rank)
                if a is None or b is None or set(a[2].tolist()) & set(b[2].tolist()):
                    continue
                out = outer.outputs[0]
                parts = [np.concatenate([p, q]) for p, q in zip(a, b)]
                names = ("starts", "ends", "axes", "steps")
                node = make_node(
                    "Slice",
                    [x, *(const(f"{out.name}_{n}", v, np.int64) for n, v in zip(names, parts))],
                    [out],
                    name=outer.name or "slice",
                )
                outer.inputs.clear()
                outer.outputs.clear()
                dead.add(id(outer))
                if not mid.outputs and id(mid) not in escaping:
                    inner.inputs.clear()
                    inner.outputs.clear()
                    dead.add(id(inner))
                new.append(node)
                merged += 1
            if new:
                g.nodes = [n for n in g.nodes if id(n) not in dead]
                insert_nodes(g, new)
        return PassResult(model, merged > 0, {"slices_merged": merged})
