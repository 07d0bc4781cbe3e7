"""Slices that partition one axis of a tensor -> one Split.

``Slice(x, [a_i], [b_i], [axis], [1])`` for ``i = 1..k`` (k >= 2, all reading the same ``x``, same
``axis``, step 1, constant bounds) whose ranges, clamped to the static length ``d`` of that axis,
are disjoint and cover ``[0, d)`` exactly, compute the same tensors as
``Split(x, axis, split=[b_i - a_i] in order of a_i)``: each Split output is bitwise equal to one
Slice output, which keeps its name. One node replaces k (an STFT's real/imaginary halves in
silero-vad; onnxruntime's EXTENDED level makes the same rewrite). Opset >= 13 takes the sizes as an
input, below as the ``split`` attribute. Slices of opset < 10 (attributes) and empty ranges are left
alone.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.core.graph import const, local_topo_order, make_node
from graphopt.core.model import Model
from graphopt.core.pass_manager import Pass, PassResult, register_pass

logger = logging.getLogger(__name__)


def _const_ints(t: gs.Tensor) -> list[int] | None:
    if not isinstance(t, gs.Constant):
        return None
    v = np.asarray(t.values)
    if v.dtype.kind not in "iu" or v.size != 1:
        return None
    return [int(v.reshape(-1)[0])]


def slice_range(node: gs.Node) -> tuple[int, int, int] | None:
    """(axis, start, end) of a single-axis, step-1 Slice with a static axis length, else None."""
    if len(node.inputs) < 4 or len(node.outputs) != 1:
        return None
    x = node.inputs[0]
    starts, ends, axes = (_const_ints(node.inputs[i]) for i in (1, 2, 3))
    if starts is None or ends is None or axes is None or x.shape is None:
        return None
    if len(node.inputs) > 4 and not node.inputs[4].is_empty():
        steps = _const_ints(node.inputs[4])
        if steps != [1]:
            return None
    r = len(x.shape)
    ax = axes[0] + r if axes[0] < 0 else axes[0]
    if not 0 <= ax < r or not isinstance(x.shape[ax], (int, np.integer)):
        return None
    d = int(x.shape[ax])
    s = min(max(starts[0] + d if starts[0] < 0 else starts[0], 0), d)
    e = min(max(ends[0] + d if ends[0] < 0 else ends[0], 0), d)
    if e <= s:
        return None
    return ax, s, e


@register_pass
class FuseSlicesPass(Pass):
    """Slices that exactly partition an axis of one tensor -> a single Split."""

    name = "fuse-slices"

    def call(self, model: Model) -> PassResult:
        fused = 0
        for g in model.walk_graphs():
            groups: dict[tuple[int, int], list[tuple[int, int, gs.Node]]] = defaultdict(list)
            for n in g.nodes:
                if n.op != "Slice" or n.domain not in (None, "", "ai.onnx"):
                    continue
                rng = slice_range(n)
                if rng is not None:
                    groups[(id(n.inputs[0]), rng[0])].append((rng[1], rng[2], n))
            items_pos = {id(n): i for i, n in enumerate(g.nodes)}
            new_at: dict[int, list[gs.Node]] = {}
            dead: set[int] = set()
            for (_, axis), items in groups.items():
                if len(items) < 2:
                    continue
                items.sort(key=lambda it: it[0])
                x = items[0][2].inputs[0]
                d = int(x.shape[axis])
                pos = 0
                for s, e, _ in items:
                    if s != pos:
                        break
                    pos = e
                else:
                    if pos != d:
                        continue
                    sizes = [e - s for s, e, _ in items]
                    outs = [n.outputs[0] for _, _, n in items]
                    for _, _, n in items:
                        n.inputs.clear()
                        n.outputs.clear()
                        dead.add(id(n))
                    if model.opset >= 13:
                        split = make_node(
                            "Split",
                            [x, const("split", np.array(sizes), np.int64)],
                            outs,
                            {"axis": axis},
                            name="split",
                        )
                    else:
                        split = make_node(
                            "Split", [x], outs, {"axis": axis, "split": sizes}, name="split"
                        )
                    first = min(items_pos[id(n)] for _, _, n in items)
                    new_at.setdefault(first, []).append(split)
                    fused += 1
            if new_at:
                # a Split takes the place of the first Slice it replaces: x is computed before
                # it and every slice's readers come after it, so nothing else moves
                order: list[gs.Node] = []
                for i, n in enumerate(g.nodes):
                    order.extend(new_at.get(i, ()))
                    if id(n) not in dead:
                        order.append(n)
                g.nodes = order
                g.cleanup(remove_unused_graph_inputs=False, recurse_subgraphs=False)
                g.nodes = local_topo_order(g)
        return PassResult(model, fused > 0, {"splits": fused})
