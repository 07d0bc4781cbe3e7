"""The "Focus" stem (strided Slices + Concat) feeding a Conv -> SpaceToDepth and a Conv whose
input channels are permuted to match.

YOLOv5/YOLOX exports write space-to-depth as ``Concat([x[:, :, i::b, j::b] for (i, j) in offsets],
axis=1)`` over all ``b*b`` offsets in some order (each a Slice with steps ``b`` on the two spatial
axes, or a chain of two Slices that ``merge-slices`` makes one). ONNX's ``SpaceToDepth(x,
blocksize=b)`` computes

    ``out[n, (i*b + j)*C + c, h, w] = x[n, c, h*b + i, w*b + j]``

so the Concat's channel ``k*C + c`` (the ``k``-th slice, offset ``(i_k, j_k)``) is SpaceToDepth's
channel ``(i_k*b + j_k)*C + c``. When the Concat's only reader is a Conv with constant weights
(any group count 1), reading SpaceToDepth instead with the weight's input channels permuted,
``W'[:, (i_k*b + j_k)*C + c] = W[:, k*C + c]``, gives the same result exactly (a permutation of the
summation order of each output, which the comparison tolerance covers). One op replaces ``b*b``
Slices and a Concat. Requires NCHW with static ``C``, ``H``, ``W``, ``H`` and ``W`` divisible by
``b``; everything else is left alone.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.core.graph import insert_nodes, make_node, unique_name
from graphopt.core.model import Model, all_graph_output_ids
from graphopt.core.pass_manager import Pass, PassResult, register_pass
from graphopt.core.pattern import slice_parts
from graphopt.core.shapes import is_static

logger = logging.getLogger(__name__)

DEFAULT_DOMAINS = ("", "ai.onnx", None)


def _offset(node: gs.Node, x: gs.Tensor, dims: list[int]) -> tuple[int, int, int] | None:
    """(block, row offset, column offset) of a Slice of ``x`` taking every ``b``-th row and column
    from an offset below ``b`` to the end; None for any other Slice."""
    if node.inputs[0] is not x:
        return None
    parts = slice_parts(node, len(dims))
    if parts is None:
        return None
    starts, ends, axes, steps = parts
    by_axis = {int(a): (int(s), int(e), int(p)) for s, e, a, p in zip(starts, ends, axes, steps)}
    if set(by_axis) != {2, 3}:
        return None
    (i, ei, bi), (j, ej, bj) = by_axis[2], by_axis[3]
    b = bi
    if b < 2 or bj != b or not (0 <= i < b and 0 <= j < b):
        return None
    if ei < dims[2] or ej < dims[3]:  # must run to the end
        return None
    return b, i, j


@register_pass
class FuseSpaceToDepthPass(Pass):
    """Concat of the ``b*b`` strided Slices of a tensor feeding a Conv -> SpaceToDepth (weights
    permuted)."""

    name = "fuse-space-to-depth"

    def call(self, model: Model) -> PassResult:
        fused = 0
        escaping = all_graph_output_ids(model)
        for g in model.walk_graphs():
            new: list[gs.Node] = []
            dead: set[int] = set()
            for cat in list(g.nodes):
                if cat.op != "Concat" or cat.domain not in DEFAULT_DOMAINS:
                    continue
                if self._fuse(cat, escaping, new, dead):
                    fused += 1
            if new:
                g.nodes = [n for n in g.nodes if id(n) not in dead]
                insert_nodes(g, new)
        return PassResult(model, fused > 0, {"space_to_depth": fused})

    @staticmethod
    def _fuse(cat: gs.Node, escaping: set[int], new: list[gs.Node], dead: set[int]) -> bool:
        y = cat.outputs[0]
        if int(cat.attrs.get("axis", 0)) not in (1, -3) or id(y) in escaping:
            return False
        if len(y.outputs) != 1 or y.outputs[0].op != "Conv" or y.outputs[0].inputs[0] is not y:
            return False
        conv = y.outputs[0]
        w = conv.inputs[1] if len(conv.inputs) > 1 else None
        if not isinstance(w, gs.Constant) or int(conv.attrs.get("group", 1)) != 1:
            return False
        slices = [t.inputs[0] if len(t.inputs) == 1 else None for t in cat.inputs]
        if any(s is None or s.op != "Slice" for s in slices) or not slices:
            return False
        x = slices[0].inputs[0]  # type: ignore[union-attr]
        if x.shape is None or len(x.shape) != 4 or not is_static(x.shape):
            return False
        dims = [int(d) for d in x.shape]
        offs = [_offset(s, x, dims) for s in slices]  # type: ignore[arg-type]
        if any(o is None for o in offs):
            return False
        b = offs[0][0]  # type: ignore[index]
        pos = [(i, j) for _, i, j in offs]  # type: ignore[misc]
        if len(offs) != b * b or sorted(pos) != [(i, j) for i in range(b) for j in range(b)]:
            return False
        if any(o[0] != b for o in offs) or dims[2] % b or dims[3] % b:  # type: ignore[index]
            return False
        c = dims[1]
        weights = np.asarray(w.values)
        if weights.ndim != 4 or weights.shape[1] != c * b * b:
            return False
        perm = np.empty(c * b * b, np.int64)  # new channel -> old channel
        for k, (i, j) in enumerate(pos):
            perm[(i * b + j) * c : (i * b + j + 1) * c] = np.arange(k * c, (k + 1) * c)
        conv.inputs[1] = gs.Constant(
            unique_name(f"{w.name}_s2d"), np.ascontiguousarray(weights[:, perm])
        )
        s2d = make_node("SpaceToDepth", [x], [y], {"blocksize": b}, name="space_to_depth")
        cat.inputs.clear()
        cat.outputs.clear()
        dead.add(id(cat))
        new.append(s2d)
        return True
