"""Liveness of a model's activations over the steps of its node order.

The model (fixed input shapes) runs its nodes in graph order; every node takes one *step*
(Constant nodes take none). A node with subgraphs (If/Loop/Scan) takes an *enter* step, then the
steps of its bodies' nodes laid out one after the other (the two branches of an If never run
together, so laying them out in sequence is exact), then an *exit* step where its outputs are born.

A tensor is live on the closed interval ``[start, end]`` of steps: ``start`` is the step of its
producer (the exit step for the outputs of If/Loop/Scan), ``end`` the last step reading it.
Initializers and ``Constant`` outputs are parameters, not activations. Graph inputs belong to the
caller: they are live from step 0 to the last step (never freed, so no other tensor takes their
bytes and nothing overwrites them, as TensorFlow Lite's planner preserves its inputs); graph
outputs are live to the last step; a subgraph's captures stay live until the exit step of its
node, and tensors inside Loop/Scan bodies for the whole node. Tensors whose size is unknown are
*unplanned* unless a size observed by running the model is given.

This is the one liveness model of graphopt: the memory planner
(:mod:`graphopt.algorithms.memory.planner`, whose lower bound is :meth:`Liveness.peak` of aligned
sizes), the order search and the cost model's activation peak (:mod:`graphopt.core.cost`, what
``graphopt inspect`` reports: :meth:`Liveness.peak` of exact sizes) all build on it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.core.graph import captured_names, node_subgraphs
from graphopt.core.model import Model
from graphopt.core.session import is_ml_dtype
from graphopt.core.shapes import is_static

_LOOPS = ("Loop", "Scan")


def constant_names(model: Model) -> set[str]:
    """Names of initializers and ``Constant`` outputs in every graph (not arena tensors)."""
    names: set[str] = set()
    for g in model.walk_graphs():
        for n in g.nodes:
            if n.op == "Constant":
                names.update(t.name for t in n.outputs if t.name)
            for t in n.inputs:
                if isinstance(t, gs.Constant):
                    names.add(t.name)
        for t in g.outputs:
            if isinstance(t, gs.Constant):
                names.add(t.name)
    return names


#: :func:`_dtype` by ``(type(dtype), dtype)``: asked for every tensor of every liveness walk,
#: from a handful of dtypes
_DTYPES: dict[tuple[type, object], np.dtype | None] = {}


def _dtype(t: gs.Tensor) -> np.dtype | None:
    raw = t.dtype
    try:
        return _DTYPES[(type(raw), raw)]
    except (KeyError, TypeError):  # not seen yet, or unhashable
        pass
    try:
        d = _sized(np.dtype(raw) if raw is not None else None)
    except TypeError:
        d = None
    try:
        _DTYPES[(type(raw), raw)] = d
    except TypeError:
        pass
    return d


def _numel(shape: tuple[int, ...]) -> int:
    """``np.prod(shape, dtype=np.int64)`` as an int (the same wrapped value past int64), without
    numpy's per-call cost."""
    n = math.prod(shape)
    return n if n < 2**63 else int(np.prod(shape, dtype=np.int64))


def _sized(d: np.dtype | None) -> np.dtype | None:
    """``d`` when its elements have a fixed size, else None."""
    if d is None or (d.kind in "OUSV" and not is_ml_dtype(d)):
        # strings and objects have no fixed size; bfloat16, float8, int4 ... (ml_dtypes, kind
        # "V") hold one element per itemsize bytes in numpy, as the arena executor stores them
        return None
    return d


@dataclass
class Liveness:
    """Intervals of every arena tensor over the steps of one node order."""

    names: list[str]
    nbytes: np.ndarray  # int64, exact bytes
    start: np.ndarray  # int64
    end: np.ndarray  # int64
    shapes: list[tuple[int, ...]]
    dtypes: list[np.dtype]
    kinds: list[str]  # input | output | activation | subgraph | loop
    steps: int
    #: name of the node at each step (Constant nodes take no step; a node with subgraphs takes
    #: an enter and an exit step, both under its name)
    step_names: list[str]
    #: (step, node, inside_loop) for every node without subgraphs, in step order
    step_nodes: list[tuple[int, gs.Node, bool]]
    unplanned: list[str] = field(default_factory=list)
    index: dict[str, int] = field(default_factory=dict)
    #: name of the main-graph node each step belongs to (a subgraph's steps belong to the node
    #: that holds the subgraph)
    step_owners: list[str] = field(default_factory=list)

    def live_bytes(self, sizes: np.ndarray | None = None) -> np.ndarray:
        """Bytes live at every step (``sizes`` defaults to the exact sizes)."""
        return live_profile(
            self.start, self.end, self.nbytes if sizes is None else sizes, self.steps
        )

    def peak(self, alignment: int = 1) -> tuple[int, int]:
        """(largest live total, first step where it is reached), every tensor's size rounded up
        to a multiple of ``alignment`` (1: exact bytes). (0, 0) without activations."""
        if not len(self.names):
            return 0, 0
        sizes = self.nbytes if alignment <= 1 else -(-self.nbytes // alignment) * alignment
        prof = self.live_bytes(sizes)
        step = int(np.argmax(prof))
        return int(prof[step]), step


def live_profile(start: np.ndarray, end: np.ndarray, sizes: np.ndarray, steps: int) -> np.ndarray:
    diff = np.zeros(steps + 1, dtype=np.int64)
    np.add.at(diff, start, sizes)
    np.add.at(diff, end + 1, -sizes)
    return np.cumsum(diff[:-1])


def liveness(
    model: Model,
    observed: Mapping[str, tuple[tuple[int, ...], np.dtype]] | None = None,
    reuse_inputs: bool = False,
) -> Liveness:
    """Liveness of every activation of ``model`` (shapes inferred) in its current node order.

    Args:
        model: the model with shapes filled in (:func:`graphopt.core.shapes.infer_shapes`).
        observed: name -> (shape, dtype) seen by running the model, for tensors whose shape
            inference left unknown.
        reuse_inputs: the caller gives its inputs to the run (opt-in, ``plan --reuse-inputs``):
            a graph input dies at its last reader like any activation, so its bytes may be
            reused (default: held to the last step, never overwritten).
    """
    consts = constant_names(model)
    observed = observed or {}
    names: list[str] = []
    nbytes: list[int] = []
    start: list[int] = []
    end: list[int] = []
    shapes: list[tuple[int, ...]] = []
    dtypes: list[np.dtype] = []
    kinds: list[str] = []
    index: dict[str, int] = {}
    unplanned: list[str] = []
    step_names: list[str] = []
    step_owners: list[str] = []
    step_nodes: list[tuple[int, gs.Node, bool]] = []

    def add(t: gs.Tensor, step: int, kind: str) -> None:
        name = t.name
        if not name or name in consts or name in index:
            return
        shape, dt = t.shape, _dtype(t)
        if not (is_static(shape) and dt is not None) and name in observed:
            shape, dt = observed[name][0], _sized(observed[name][1])
        if not is_static(shape) or dt is None:
            if name not in unplanned:
                unplanned.append(name)
            return
        shape = tuple(int(d) for d in shape)
        index[name] = len(names)
        names.append(name)
        nbytes.append(_numel(shape) * dt.itemsize)
        start.append(step)
        end.append(step)
        shapes.append(shape)
        dtypes.append(dt)
        kinds.append(kind)

    def use(name: str, step: int) -> None:
        i = index.get(name)
        if i is not None and end[i] < step:
            end[i] = step

    for t in model.graph.inputs:
        add(t, 0, "input")

    def visit(graph: gs.Graph, kind: str, in_loop: bool, owner: str | None) -> None:
        for node in graph.nodes:
            if node.op == "Constant":  # parameters: no step, no arena bytes
                continue
            top = node.name if owner is None else owner
            subs = node_subgraphs(node)
            s = len(step_names)
            step_names.append(node.name)
            step_owners.append(top)
            if not subs:
                for t in node.inputs:
                    if t.name:
                        use(t.name, s)
                for t in node.outputs:
                    add(t, s, kind)
                step_nodes.append((s, node, in_loop))
                continue
            loop = node.op in _LOOPS or in_loop
            first = len(names)
            for sub in subs:
                for t in sub.inputs:
                    add(t, s, "loop" if loop else "subgraph")
                visit(sub, "loop" if loop else "subgraph", loop, top)
            e = len(step_names)
            step_names.append(node.name)
            step_owners.append(top)
            for t in node.inputs:
                if t.name:
                    use(t.name, e)
            for name in captured_names(node):
                use(name, e)
            for sub in subs:
                for t in sub.outputs:
                    use(t.name, e)
            if node.op in _LOOPS:
                for i in range(first, len(names)):
                    start[i], end[i] = s, e
            for t in node.outputs:
                add(t, e, kind)

    visit(model.graph, "activation", False, None)
    steps = max(1, len(step_names))
    if not step_names:
        step_names.append("")
        step_owners.append("")
    for t in model.graph.inputs:  # caller-owned: held to the end
        i = index.get(t.name)
        if i is not None and not reuse_inputs:
            end[i] = steps - 1
    for t in model.graph.outputs:
        i = index.get(t.name)
        if i is not None:
            end[i] = steps - 1
            if kinds[i] == "activation":
                kinds[i] = "output"
    return Liveness(
        names=names,
        nbytes=np.asarray(nbytes, dtype=np.int64),
        start=np.asarray(start, dtype=np.int64),
        end=np.asarray(end, dtype=np.int64),
        shapes=shapes,
        dtypes=dtypes,
        kinds=kinds,
        steps=steps,
        step_names=step_names,
        step_nodes=step_nodes,
        unplanned=unplanned,
        index=index,
        step_owners=step_owners,
    )


def needs_probe(model: Model) -> bool:
    """Whether some activation (any graph) has no static shape or no sized dtype after shape
    inference, so that its size must be observed by running the model."""
    consts = constant_names(model)
    for g in model.walk_graphs():
        for n in g.nodes:
            if n.op == "Constant":
                continue
            for t in n.outputs:
                if (
                    t.name
                    and t.name not in consts
                    and not (is_static(t.shape) and _dtype(t) is not None)
                ):
                    return True
    return False
