"""Applying a selection: remove the channels that go, or zero them for the exactness reference.

Removing the elements with ``keep_elem[e] == False`` slices every recorded constant input
(``ConstSlice``: producers' weights, biases and BN parameters, consumers' input weights, per-channel
operands) to the kept positions, then lets each recorded shape fix's handler rewrite its hard-coded
width (Split sizes, Slice bounds, Resize sizes, Reshape targets, depthwise ``group``), and finally
forgets the intermediate shapes (they are re-inferred).

This is exact when the removed channels are zero: :func:`zero_pruned` builds that zeroed original
(producer weights and biases, consumer input weights, BN gamma/beta/mean with var 1, additive
per-channel constants), so that pruning it must reproduce its outputs.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.algorithms.prune.analysis import Analysis, ConstSlice
from graphopt.algorithms.prune.handlers import constant, kept_positions, replace_input
from graphopt.core.model import Model


def _by_input(an: Analysis) -> tuple[dict[tuple[int, int], list[ConstSlice]], dict[int, gs.Node]]:
    """The recorded slices grouped by the (node, input index) they cut."""
    by_input: dict[tuple[int, int], list[ConstSlice]] = defaultdict(list)
    nodes: dict[int, gs.Node] = {}
    for s in an.slices:
        by_input[(id(s.node), s.index)].append(s)
        nodes[id(s.node)] = s.node
    return by_input, nodes


def apply_pruning(model: Model, an: Analysis, keep_elem: np.ndarray) -> dict[str, int]:
    """Remove every element with ``keep_elem[e] == False`` from ``model`` (analysed by ``an``)."""
    by_input, nodes = _by_input(an)
    sliced = 0
    for (nid, index), items in by_input.items():
        node = nodes[nid]
        v = constant(node.inputs[index], model.opset)
        assert v is not None
        changed = False
        for s in items:
            idx = kept_positions(s.labels, keep_elem)
            if len(idx) != v.shape[s.axis]:
                v = np.take(v, idx, axis=s.axis)
                changed = True
        if changed:
            replace_input(node, index, v, "pruned")
            sliced += 1
    for fx in an.fixes:
        fx.handler.apply(model, fx, keep_elem)
    g = model.graph
    for t in g.tensors().values():
        if isinstance(t, gs.Variable) and t not in g.inputs and t not in g.outputs:
            t.shape = None
    g.cleanup(remove_unused_graph_inputs=False)
    return {"weights_sliced": sliced}


def zero_pruned(model: Model, an: Analysis, keep_elem: np.ndarray) -> None:
    """Make the channels to be removed exactly zero in ``model`` (the exactness-test reference).

    Producer weights and biases, consumer input weights, BN gamma/beta/mean (var -> 1) and additive
    per-channel constants of removed channels are zeroed: each removed channel is then exactly 0 at
    its producer and ignored by its consumers, so removing it changes no output.
    """
    by_input, nodes = _by_input(an)
    for (nid, index), items in by_input.items():
        node = nodes[nid]
        v = np.array(constant(node.inputs[index], model.opset), copy=True)
        changed = False
        for s in items:
            if s.role not in ("producer", "consumer", "bn", "bias"):
                continue
            drop = np.setdiff1d(np.arange(len(s.labels)), kept_positions(s.labels, keep_elem))
            if len(drop) == 0:
                continue
            sl: list[slice | np.ndarray] = [slice(None)] * v.ndim
            sl[s.axis] = drop
            fill = 1.0 if (s.role == "bn" and index == 4) else 0.0
            v[tuple(sl)] = fill
            changed = True
        if changed:
            replace_input(node, index, v, "zeroed")
