"""Constant folding: evaluate at compile time every node whose inputs are all known.

Rewrites, applied to the main graph and, outermost first, to every If/Loop/Scan body:

* ``Constant`` nodes become initializers (``gs.Constant``), except where their output is a graph
  output (an ONNX graph output must be produced by a node or be a graph input, so the node stays).
* ``Shape(x)`` becomes ``const(x.shape[start:end])`` and ``Size(x)`` becomes
  ``const(prod(x.shape))`` when ``x`` has a static shape in the IR (the shapes
  ``graphopt.core.shapes.infer_shapes`` derived, declared ones dropped). The
  ``Gather/Slice/Concat/Unsqueeze/Cast`` chains that Paddle and PyTorch exporters hang off
  ``Shape`` then fold too, so ``Reshape/Resize/Expand`` get constant shape inputs.
* ``op(c1, ..., cn) -> const(op(c1, ..., cn))`` for every deterministic default-domain node whose
  inputs are constants. The whole constant subgraph of a graph is evaluated in ONE onnxruntime
  session (``ORT_DISABLE_ALL``, so the numbers are exactly the kernels' numbers); if that fails the
  nodes are evaluated one by one, with ``onnx.reference`` for ops onnxruntime lacks, and a node
  nobody can evaluate is left alone (the evaluator: :mod:`graphopt.core.const_eval`).
* ``If(c)`` with a constant condition becomes the chosen branch: its nodes move into the parent
  graph (tensor names that clash anywhere in the model are renamed), and each branch output is
  written to the corresponding If output (by its producer where possible, else through an
  ``Identity``).

Never folded: random ops (RandomNormal[Like], RandomUniform[Like], Multinomial, Bernoulli), ops
with subgraph attributes, sequence/optional ops, ``QuantizeLinear``/``DequantizeLinear`` (folding
them would break onnxruntime's QDQ int8 kernels), and nodes of non-default domains.

Size bound: a node whose result is estimated (from its IR shape, else from ONNX shape inference of
the node given its constant inputs) at more than ``MAX_EVAL_BYTES`` (256 MiB) is never computed. A
folded value is kept lazy (its node stays) when it is larger than ``size_limit`` bytes (default
1 MiB) and more than ``growth`` (default 2) times the bytes of its inputs, or when it is larger than
``size_limit`` and computed from such a lazy value; values computed *from* lazy values that are
small again (a ``ReduceSum`` of an ``Expand``) are folded, and the big producer, now dead, is
dropped.

Shapes: after a round that folded something, while ``Shape``/``Size`` nodes of non-static tensors
remain, ONNX shape inference is re-run and only *refines* the IR (a non-static shape may become
static; nothing is cleared), and folding goes again (silero-vad needs several rounds). ``Gather`` or
``Slice`` of ``Shape(x)`` that pick only static dims of a partly dynamic ``x`` fold too. ``Shape``
is never folded for a tensor whose shape may depend on input *values* (downstream of NonZero,
Unique, Compress, NonMaxSuppression, Loop/Scan/If outputs, or of Reshape/Expand/Tile/Slice/Pad/
Resize/... whose shape-like inputs are not constant): its IR shape may have been observed by
onnxruntime on one dummy input.

Symbolic dims (a model whose inputs keep dynamic dims such as ``batch``, ``seq``; their IR shapes
were all derived by shape inference, symbolic where onnxruntime's symbolic inference followed them):

* ``Reshape(x, s)`` with ``s`` computed from ``Shape`` (``Concat(Unsqueeze(Gather(Shape(y), 0)),
  ..., [-1], [64])``) -> ``Reshape(x, const)``: an element known as an int stays, an element that is
  the same named dim as ``x``'s at its position becomes 0 (copy; ``allowzero`` must be 0), and a
  single other element becomes -1 (the one value the element count leaves; an empty tensor, a
  dynamic dim of 0, is not supported there). Two such elements: skipped (reason at DEBUG).
* shape values with the same symbolic value (``Gather(Shape(a), 1)`` and ``Gather(Shape(b), 1)``,
  both ``seq``) are read from the first, so that eliminate-cse merges what is computed from them.
* ``Shape`` dims that are fixed fold even below a ``Reshape``/``Slice``/... with non-constant
  shape inputs (no shape was observed on one run, so none can be specific to it).

Dead branches: folding inside a branch that is never taken at the fixed input shapes can make
onnxruntime's load-time inference see a contradiction in it (silero-vad's 8 kHz branch run on a
16 kHz frame: a statically rank-4 LSTM input). When a model with subgraphs no longer loads after
folding, the pass starts again from a snapshot: main graph first, then each top-level subgraph on
trial, kept only if the model still loads (else only its Constant nodes are lifted).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt.core.const_eval import (
    DEFAULT_DOMAINS,
    MAX_EVAL_BYTES,
    NOT_EVALUABLE,
    ConstantEvaluator,
    SizeGuard,
    constant_node_value,
    value_nbytes,
)
from graphopt.core.graph import (
    constant_nbytes,
    local_topo_order,
    node_subgraphs,
    unique_name,
)
from graphopt.core.model import Model, all_graph_output_ids
from graphopt.core.pass_manager import Pass, PassResult, register_pass
from graphopt.core.session import make_session
from graphopt.core.shapes import inputs_static, is_static, missing_shapes, onnx_infer

logger = logging.getLogger(__name__)

#: ops never folded: not evaluable (random, sequence, optional, control flow), and the QDQ ops
#: (folding them would break onnxruntime's QDQ int8 kernels)
NEVER_FOLD: frozenset[str] = NOT_EVALUABLE | {
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
}

#: counters that mean the model changed
_CHANGES = (
    "constants_lifted",
    "nodes_folded",
    "shapes_folded",
    "ifs_inlined",
    "lazy_dropped",
    "symbolic_reshapes",
    "symbolic_merged",
)


#: ops whose output shape depends on input values whatever their inputs are
SHAPE_FROM_DATA_ALWAYS = frozenset(
    {
        "NonZero",
        "Unique",
        "Compress",
        "NonMaxSuppression",
        "Loop",
        "Scan",
        "If",
        "StringSplit",
        "RegexFullMatch",
    }
)
#: ops whose output shape depends on the values of their inputs after the first (or of all of
#: them, for the ops in SHAPE_FROM_ALL_INPUTS): data-dependent unless those inputs are constant
SHAPE_FROM_DATA_INPUTS = frozenset(
    {
        "Reshape",
        "Expand",
        "Tile",
        "Resize",
        "Upsample",
        "Slice",
        "Pad",
        "OneHot",
        "Squeeze",
        "Unsqueeze",
        "Split",
        "TopK",
        "CenterCropPad",
        "MaxUnpool",
        "DFT",
        "STFT",
        "Col2Im",
        "ReduceSum",
        "ReduceMean",
        "ReduceMax",
        "ReduceMin",
        "ReduceProd",
        "ReduceL1",
        "ReduceL2",
        "ReduceLogSum",
        "ReduceLogSumExp",
        "ReduceSumSquare",
        "ConstantOfShape",
        "Range",
        "BlackmanWindow",
        "HannWindow",
        "HammingWindow",
        "MelWeightMatrix",
        "RandomNormal",
        "RandomUniform",
        "Multinomial",
        "SplitToSequence",
        "ImageDecoder",
        "AffineGrid",
    }
)
SHAPE_FROM_ALL_INPUTS = frozenset(
    {
        "ConstantOfShape",
        "Range",
        "BlackmanWindow",
        "HannWindow",
        "HammingWindow",
        "MelWeightMatrix",
        "AffineGrid",
    }
)


def _shape_is_data_dependent(
    node: gs.Node, is_known: Callable[[gs.Tensor], bool], dd: set[int]
) -> bool:
    """Whether ``node``'s output shapes may change with the model's input *values*.

    Shapes in the IR may have been observed by running onnxruntime on one input (the fallback of
    ``infer_shapes``); folding ``Shape`` of such a tensor is only sound when its shape is a function
    of the input shapes alone.
    """
    if any(id(t) in dd for t in node.inputs):
        return True
    if node.domain not in DEFAULT_DOMAINS:
        return True
    if node.op in SHAPE_FROM_DATA_ALWAYS:
        return True
    if node.op in SHAPE_FROM_DATA_INPUTS:
        start = 0 if node.op in SHAPE_FROM_ALL_INPUTS else 1
        return not all(is_known(t) for t in node.inputs[start:])
    return False


# ---------------------------------------------------------------------- symbolic shapes

#: a shape value as far as it is known: per element an int or a dim name (``"seq"``); rank 0/1
SymValue = tuple[int, tuple[Any, ...]]
#: the most elements a symbolic shape value may have (shape vectors are short)
_MAX_SYM = 16
_INT_TYPES = (np.int64, np.int32)


class _Unknown:
    """A dim nothing is known about: equal to nothing but itself."""

    __slots__ = ()


def _sym_dim(d: object) -> object:
    if isinstance(d, (int, np.integer)) and d >= 0:
        return int(d)
    if isinstance(d, str) and d:
        return d
    return _Unknown()


def _int_dtype(t: gs.Tensor) -> bool:
    try:
        return t.dtype is not None and np.dtype(t.dtype) in _INT_TYPES
    except TypeError:
        return False


def _sym_value(t: gs.Tensor, cache: dict[int, SymValue | None]) -> SymValue | None:
    """The value of an int64/int32 shape tensor with symbolic elements: ``Shape`` of a tensor
    whose IR shape has names for its dynamic dims, through ``Gather``/``Slice``/``Unsqueeze``/
    ``Squeeze``/``Concat``/``Cast``/``Identity``; constants as they are. None where unknown."""
    key = id(t)
    if key in cache:
        return cache[key]
    cache[key] = None  # cycles and failures
    out: SymValue | None = None
    try:
        out = _sym_eval(t, cache)
    except (IndexError, ValueError, TypeError):
        out = None
    if out is not None and len(out[1]) > _MAX_SYM:
        out = None
    cache[key] = out
    return out


def _const_ints(t: gs.Tensor) -> np.ndarray | None:
    if not isinstance(t, gs.Constant):
        return None
    v = np.asarray(t.values)
    if v.dtype not in _INT_TYPES or v.ndim > 1 or v.size > _MAX_SYM:
        return None
    return v.astype(np.int64)


def _sym_eval(t: gs.Tensor, cache: dict[int, SymValue | None]) -> SymValue | None:
    c = _const_ints(t)
    if c is not None:
        return c.ndim, tuple(int(x) for x in c.reshape(-1))
    if isinstance(t, gs.Constant) or len(t.inputs) != 1:
        return None
    node = t.inputs[0]
    if node.domain not in DEFAULT_DOMAINS or not node.inputs or node.outputs[0] is not t:
        return None
    op, x = node.op, node.inputs[0]
    if op == "Shape":
        if x.shape is None:
            return None
        rank = len(x.shape)
        start = int(node.attrs.get("start", 0))
        end = node.attrs.get("end")
        start = min(max(start + rank if start < 0 else start, 0), rank)
        stop = rank if end is None else int(end)
        stop = min(max(stop + rank if stop < 0 else stop, 0), rank)
        return 1, tuple(_sym_dim(d) for d in list(x.shape)[start:stop])
    if op in ("Cast", "Identity"):
        if op == "Cast" and int(node.attrs.get("to", 0)) not in (6, 7):  # int32, int64
            return None
        return _sym_value(x, cache)
    src = _sym_value(x, cache)
    if src is None:
        return None
    rank, vals = src
    if op == "Gather":
        idx = _const_ints(node.inputs[1]) if len(node.inputs) > 1 else None
        if idx is None or rank != 1 or int(node.attrs.get("axis", 0)) not in (0, -1):
            return None
        picked = [vals[int(i)] for i in idx.reshape(-1)]
        return idx.ndim, tuple(picked)
    if op == "Unsqueeze":
        axes = _const_ints(node.inputs[1]) if len(node.inputs) > 1 else None
        if rank != 0 or axes is None or axes.reshape(-1).tolist() not in ([0], [-1]):
            return None
        return 1, vals
    if op == "Squeeze":
        if rank != 1 or len(vals) != 1:
            return None
        return 0, vals
    if op == "Slice":
        if rank != 1 or len(node.inputs) < 3:
            return None
        ints = [_const_ints(i) for i in node.inputs[1:]]
        if any(v is None for v in ints[:2]):
            return None
        axes = ints[2] if len(ints) > 2 else np.array([0])
        steps = ints[3] if len(ints) > 3 else np.array([1])
        if axes is None or steps is None or axes.reshape(-1).tolist() not in ([0], [-1]):
            return None
        st, en, sp = (int(v.reshape(-1)[0]) for v in (ints[0], ints[1], steps))  # type: ignore[union-attr]
        return 1, tuple(vals[slice(st, en, sp)])
    if op == "Concat":
        if int(node.attrs.get("axis", 0)) not in (0, -1):
            return None
        parts: list[Any] = []
        for i in node.inputs:
            v = _sym_value(i, cache)
            if v is None or v[0] != 1:
                return None
            parts.extend(v[1])
        return 1, tuple(parts)
    return None


def _symbolic_reshapes(graph: gs.Graph, escaping: set[int], stats: dict[str, int]) -> None:
    """Rewrites that hold for every value of the symbolic dims (the shapes ``infer_shapes``
    derived for dynamic inputs, ``batch``, ``seq``):

    * ``Reshape(x, s)`` whose shape ``s`` is computed from ``Shape`` (``Concat(Unsqueeze(Gather(
      Shape(y), 0)), Unsqueeze(Gather(Shape(y), 1)), [-1], [16])``) gets a constant shape: an
      element that is the same named dim as ``x``'s dim at that position becomes 0 (copy the
      dim; ``allowzero`` must be 0), a single other symbolic element becomes -1 (inferred from
      the element count, which a valid reshape leaves one value for). The shape subgraph dies.
    * Shape scalars and vectors with the same symbolic value (``Gather(Shape(a), 1)`` and
      ``Gather(Shape(b), 1)`` both ``seq``) are read from the first one, so that eliminate-cse
      merges what is computed from them (``Range(0, seq)`` twice).

    Skipped, with the reason at DEBUG: a Reshape with ``allowzero``, a shape with an element
    that is neither known nor a dim of ``x`` at its position beside another such or a -1.
    """
    cache: dict[int, SymValue | None] = {}
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    for node in graph.nodes:
        if node.op != "Reshape" or node.domain not in DEFAULT_DOMAINS or len(node.inputs) < 2:
            continue
        x, s = node.inputs[0], node.inputs[1]
        if isinstance(s, gs.Constant) or x.shape is None:
            continue
        val = _sym_value(s, cache)
        if val is None or val[0] != 1:
            continue
        if int(node.attrs.get("allowzero", 0)):
            logger.debug("symbolic reshape %s: allowzero, skipped", node.name)
            continue
        target: list[int] = []
        for i, d in enumerate(val[1]):
            if isinstance(d, int):
                target.append(d)
            elif i < len(x.shape) and isinstance(d, str) and d == _sym_dim(x.shape[i]):
                target.append(0)
            else:
                target.append(-1)
        if target.count(-1) > 1:
            logger.debug("symbolic reshape %s: %s has two unknown elements", node.name, val[1])
            continue
        node.inputs[1] = gs.Constant(
            unique_name(f"{node.name or 'reshape'}_shape"), np.array(target, dtype=np.int64)
        )
        stats["symbolic_reshapes"] = stats.get("symbolic_reshapes", 0) + 1
    # one reader for equal symbolic shape values
    first: dict[tuple[Any, ...], gs.Tensor] = {}
    for node in graph.nodes:
        if node.op not in ("Shape", "Gather", "Slice", "Unsqueeze", "Squeeze", "Concat", "Cast"):
            continue
        if node.domain not in DEFAULT_DOMAINS or len(node.outputs) != 1:
            continue
        t = node.outputs[0]
        if id(t) in escaping or not _int_dtype(t):
            continue
        val = _sym_value(t, cache)
        if val is None or not any(isinstance(d, str) for d in val[1]):
            continue
        if any(isinstance(d, _Unknown) for d in val[1]):
            continue
        key = (val, np.dtype(t.dtype).str)
        canon = first.setdefault(key, t)
        if canon is t:
            continue
        producer = canon.inputs[0]
        readers = list(t.outputs)
        if not readers or any(order.get(id(r), -1) <= order[id(producer)] for r in readers):
            continue
        for r in readers:
            for i, inp in enumerate(r.inputs):
                if inp is t:
                    r.inputs[i] = canon
        stats["symbolic_merged"] = stats.get("symbolic_merged", 0) + 1


def _walk(root: gs.Graph, skip: Callable[[gs.Graph], bool] | None = None) -> Iterator[gs.Graph]:
    """``root`` and every subgraph nested in it, outermost first (lazily, like walk_graphs);
    subgraphs for which ``skip`` is true are left out with everything nested in them."""
    stack = [root]
    while stack:
        g = stack.pop()
        if skip is not None and g is not root and skip(g):
            continue
        yield g
        for node in g.nodes:
            stack.extend(node_subgraphs(node))


def _subgraph_walk(index: int, attr: str) -> Callable[[Model], Iterator[gs.Graph]]:
    """The walk over subgraph ``attr`` of main-graph node ``index`` and its nested graphs."""
    return lambda m: _walk(m.graph.nodes[index].attrs[attr])


def _loads(model: Model) -> bool:
    """Whether onnxruntime accepts the model (its load-time type and shape inference)."""
    try:
        make_session(model)
    except Exception as exc:  # noqa: BLE001 - any refusal counts
        logger.debug("onnxruntime refuses the folded model: %s", str(exc).splitlines()[0])
        return False
    return True


def _shape_nodes_left(graphs: Iterable[gs.Graph]) -> bool:
    return any(
        n.op in ("Shape", "Size") and n.inputs and not is_static(n.inputs[0].shape)
        for g in graphs
        for n in g.nodes
    )


def refine_shapes(model: Model) -> int:
    """Give tensors whose IR shape is not static the static shape ONNX inference now derives.

    Only ever replaces a non-static shape by a static one (shapes found earlier, e.g. by the
    onnxruntime fallback of :func:`graphopt.core.shapes.infer_shapes`, are kept). Returns how many
    tensors were refined.
    """
    found = onnx_infer(model)
    refined = 0
    for g in model.walk_graphs():
        for name, t in g.tensors().items():
            if isinstance(t, gs.Constant) or is_static(t.shape) or name not in found:
                continue
            elem, shape = found[name]
            if shape is not None and is_static(shape):
                t.shape = list(shape)
                if t.dtype is None and elem:
                    t.dtype = onnx.helper.tensor_dtype_to_np_dtype(elem)
                refined += 1
    return refined


# ---------------------------------------------------------------------------------------- the pass


@register_pass
class FoldConstantsPass(Pass):
    """Fold constant subgraphs, static shapes and constant-condition Ifs (also inside subgraphs).

    Args:
        size_limit: bytes above which a folded value may be kept lazy (see ``growth``).
        growth: a value over ``size_limit`` is kept lazy when it is more than ``growth`` times the
            bytes of its inputs (an Expand/Tile/ConstantOfShape to a big shape).
        fold_shapes: fold ``Shape``/``Size`` of tensors with static shapes.
        inline_if: replace an ``If`` with a constant condition by its branch.
    """

    name = "fold-constants"

    def __init__(
        self,
        size_limit: int = 1 << 20,
        growth: float = 2.0,
        fold_shapes: bool = True,
        inline_if: bool = True,
    ) -> None:
        self.size_limit = int(size_limit)
        self.growth = float(growth)
        self.fold_shapes = bool(fold_shapes)
        self.inline_if = bool(inline_if)
        self._lift_only = False
        self._all_graphs: list[gs.Graph] = []
        self._escaping: set[int] = set()
        #: ids of tensors whose shape may depend on input values (never folded by Shape)
        self._dd: set[int] = set()
        #: id -> node count of subgraphs whose folding onnxruntime refused (see ``call``)
        self._rejected: dict[int, int] = {}
        #: the model has dynamic input dims: its IR shapes were all derived by shape inference
        #: (onnxruntime never observed one), so a Reshape/Slice/... with non-constant shape
        #: inputs does not make the static dims of its output unsound to fold
        self._symbolic = False

    def call(self, model: Model) -> PassResult:
        ev = ConstantEvaluator(model.opset, model.ir_version)
        self._symbolic = not inputs_static(model)
        has_subgraphs = model.num_subgraphs() > 0
        if has_subgraphs and not self._has_work(model):
            return PassResult(model, False, {"sessions": 0})  # spare the snapshot below
        snapshot = model.clone() if has_subgraphs else None
        stats = self._new_stats()
        self._run(model, lambda m: _walk(m.graph, self._rejected_graph), ev, stats)
        if (
            snapshot is not None
            and self._modified(stats)
            and not _loads(model)
            and _loads(snapshot)
        ):  # (a model onnxruntime never loaded says nothing)
            # Folding inside a branch that is never taken at these input shapes can make
            # onnxruntime's load-time shape inference see a contradiction in that dead branch
            # (silero-vad's 8 kHz branch at a 16 kHz frame size). Redo from the snapshot: the
            # main graph first, then each top-level subgraph on trial, kept only if it loads.
            logger.debug("folded model does not load; folding subgraphs one at a time")
            stats = self._new_stats()
            current = snapshot.clone()
            self._run(current, lambda m: iter([m.graph]), ev, stats)
            if self._modified(stats) and not _loads(current):
                # even the main graph alone exposes one: only lift Constant nodes everywhere
                stats = self._new_stats()
                current = snapshot
                self._lift_only = True
                try:
                    self._run(current, lambda m: m.walk_graphs(), ev, stats)
                finally:
                    self._lift_only = False
                model.graph = current.graph
                stats["sessions"] = ev.sessions
                return PassResult(model, self._modified(stats), stats)
            slots = [
                (i, k)
                for i, n in enumerate(current.graph.nodes)
                for k, a in n.attrs.items()
                if isinstance(a, gs.Graph)
            ]
            rejected: list[tuple[int, str]] = []
            for i, k in slots:
                trial = current.clone()
                trial_stats = self._new_stats()
                self._run(trial, _subgraph_walk(i, k), ev, trial_stats)
                if self._modified(trial_stats) and not _loads(trial):
                    # keep the harmless part: Constant nodes become initializers
                    stats["subgraphs_only_lifted"] = stats.get("subgraphs_only_lifted", 0) + 1
                    rejected.append((i, k))
                    trial = current.clone()
                    trial_stats = self._new_stats()
                    self._lift_only = True
                    try:
                        self._run(trial, _subgraph_walk(i, k), ev, trial_stats)
                    finally:
                        self._lift_only = False
                if self._modified(trial_stats):
                    current = trial
                    for key, v in trial_stats.items():
                        stats[key] = stats.get(key, 0) + v
            model.graph = current.graph
            # remember the refused subgraphs, so that the next run (the pass manager iterates to a
            # fixed point) does not fold and refuse them again while they stay as they are
            for i, k in rejected:
                sub = model.graph.nodes[i].attrs[k]
                self._rejected[id(sub)] = len(sub.nodes)
        if self.fold_shapes and not self._lift_only and not inputs_static(model):
            # dynamic input dims: what holds for every value of them
            _symbolic_reshapes(model.graph, self._escaping, stats)
        if self._modified(stats) and inputs_static(model) and missing_shapes(model):
            # keep the IR's shapes as complete as folding made them derivable, for later passes
            stats["shapes_refined"] = refine_shapes(model)
        stats["sessions"] = ev.sessions
        return PassResult(model, self._modified(stats), stats)

    def _has_work(self, model: Model) -> bool:
        """A cheap over-approximation of "a run would change something" (no evaluation)."""
        for g in _walk(model.graph, self._rejected_graph):
            outs = {id(t) for t in g.outputs}
            for n in g.nodes:
                if n.domain not in DEFAULT_DOMAINS or not n.outputs:
                    continue
                if n.op == "Constant":
                    if id(n.outputs[0]) not in outs and not n.inputs:
                        return True
                elif n.op in ("Shape", "Size"):
                    if n.inputs and (
                        isinstance(n.inputs[0], gs.Constant) or is_static(n.inputs[0].shape)
                    ):
                        return True
                elif (
                    n.op in ("Gather", "Slice")
                    and n.inputs
                    and n.inputs[0].inputs
                    and n.inputs[0].inputs[0].op == "Shape"
                ):
                    return True
                elif n.op == "If":
                    if n.inputs and isinstance(n.inputs[0], gs.Constant):
                        return True
                elif (
                    n.op not in NEVER_FOLD
                    and not node_subgraphs(n)
                    and all(t.is_empty() or isinstance(t, gs.Constant) for t in n.inputs)
                ):
                    return True
        return False

    def _rejected_graph(self, g: gs.Graph) -> bool:
        return self._rejected.get(id(g)) == len(g.nodes)

    @staticmethod
    def _new_stats() -> dict[str, int]:
        return {
            "constants_lifted": 0,
            "nodes_folded": 0,
            "shapes_folded": 0,
            "ifs_inlined": 0,
            "kept_large": 0,
            "sub_changes": 0,
        }

    @staticmethod
    def _modified(stats: dict[str, int]) -> bool:
        return any(stats.get(k, 0) for k in _CHANGES)

    def _run(
        self,
        model: Model,
        graphs: Callable[[Model], Iterable[gs.Graph]],
        ev: ConstantEvaluator,
        stats: dict[str, int],
    ) -> None:
        """Fold every graph ``graphs(model)`` yields, refining shapes between rounds."""
        self._all_graphs = list(model.walk_graphs())
        self._escaping = {id(t) for g in self._all_graphs for t in g.outputs}
        self._dd = set()
        for _ in range(16):
            before = dict(stats)
            for g in graphs(model):  # outermost first; inlined branches' subgraphs come later
                n0 = self._modified_count(stats)
                for _ in range(64):
                    self._fold_graph(g, ev, stats)
                    if self._lift_only or not (
                        self.inline_if and self._inline_ifs(model, g, stats)
                    ):
                        break
                if g is not model.graph and self._modified_count(stats) != n0:
                    stats["sub_changes"] += 1
            # folding may have made more shapes inferable (a Reshape's shape input is now constant):
            # refine the IR's shapes and go again while Shape/Size nodes are left to fold
            if stats == before or not self.fold_shapes or not _shape_nodes_left(graphs(model)):
                break
            if not refine_shapes(model):
                break
            stats["shape_refinements"] = stats.get("shape_refinements", 0) + 1

    @staticmethod
    def _modified_count(stats: dict[str, int]) -> int:
        return sum(stats.get(k, 0) for k in _CHANGES)

    # ------------------------------------------------------------------ folding one graph
    def _shape_value(self, node: gs.Node, known: dict[int, Any]) -> np.ndarray | None:
        x = node.inputs[0] if node.inputs else None
        if x is None or x.is_empty():
            return None
        if isinstance(x, gs.Constant):
            shape: list[int] | None = [int(d) for d in x.shape]
        elif id(x) in known and not isinstance(known[id(x)], _Pending):
            shape = [int(d) for d in np.shape(known[id(x)])]
        else:
            shape = [int(d) for d in x.shape] if is_static(x.shape) else None
        if shape is None:
            return None
        if node.op == "Size":
            return np.array(int(np.prod(shape, dtype=np.int64)), dtype=np.int64)
        rank = len(shape)
        start = int(node.attrs.get("start", 0))
        end = node.attrs.get("end")
        start = min(max(start + rank if start < 0 else start, 0), rank)
        stop = rank if end is None else int(end)
        stop = min(max(stop + rank if stop < 0 else stop, 0), rank)
        return np.array(shape[start:stop], dtype=np.int64)

    @staticmethod
    def _partial_shape_value(node: gs.Node, local: set[int], dd: set[int]) -> np.ndarray | None:
        """``Gather``/``Slice`` of ``Shape(x)`` picking only static dims of a partly dynamic x.

        ``x.view(x.size(0), -1)`` style graphs keep a dynamic batch dim but read static ones.
        """
        src = node.inputs[0]
        shp = src.inputs[0] if src.inputs else None
        if shp is None or id(shp) not in local or shp.op != "Shape" or not shp.inputs:
            return None
        x = shp.inputs[0]
        if x.shape is None or node.attrs.get("axis", 0) != 0 or id(x) in dd:
            return None
        rank = len(x.shape)
        start = int(shp.attrs.get("start", 0))
        end = shp.attrs.get("end")
        dims = list(x.shape)[slice(start, rank if end is None else int(end))]
        idx = np.arange(len(dims))
        consts = [t.values if isinstance(t, gs.Constant) else None for t in node.inputs[1:]]
        if any(c is None and not t.is_empty() for c, t in zip(consts, node.inputs[1:])):
            return None
        try:
            if node.op == "Gather":
                picked = np.take(idx, np.asarray(consts[0]).astype(np.int64), axis=0)
            else:
                starts, ends = consts[0], consts[1]
                if starts is None or ends is None:
                    return None
                axes = consts[2] if len(consts) > 2 and consts[2] is not None else [0]
                steps = consts[3] if len(consts) > 3 and consts[3] is not None else [1]
                if list(np.reshape(axes, -1)) not in ([0], [-1]) or list(np.reshape(steps, -1)) != [
                    1
                ]:
                    return None
                picked = idx[int(np.reshape(starts, -1)[0]) : int(np.reshape(ends, -1)[0])]
        except (IndexError, ValueError, TypeError):
            return None
        vals = [dims[int(i)] for i in np.reshape(picked, -1)]
        if not all(isinstance(d, (int, np.integer)) and d >= 0 for d in vals):
            return None
        return np.array(vals, dtype=np.int64).reshape(np.shape(picked))

    def _fold_graph(self, graph: gs.Graph, ev: ConstantEvaluator, stats: dict[str, int]) -> None:
        # values that some graph returns (this one, or a nested body returning it by name) are
        # produced by a Constant node rather than turned into initializers
        outputs = {id(t) for t in graph.outputs} | self._escaping
        known: dict[int, Any] = {}  # tensor id -> value (np array / lazy) or _Pending
        computed: dict[int, Any] = {}  # the entries of ``known`` that are values
        guard = SizeGuard(ev.opset, MAX_EVAL_BYTES)
        seeds: dict[int, gs.Node] = {}  # node id -> node whose outputs were computed here
        to_eval: list[gs.Node] = []
        order = local_topo_order(graph)
        local = {id(n) for n in order}

        def is_known(t: gs.Tensor) -> bool:
            return t.is_empty() or isinstance(t, gs.Constant) or id(t) in known

        def proven(t: gs.Tensor) -> bool:
            return True

        dd = self._dd
        if graph is not self._all_graphs[0]:
            dd.update(id(t) for t in graph.inputs)  # Loop/Scan carried values may change shape

        for node in order:
            if _shape_is_data_dependent(node, proven if self._symbolic else is_known, dd):
                dd.update(id(o) for o in node.outputs)
            if node.domain not in DEFAULT_DOMAINS or not node.outputs:
                continue
            if node.op == "Constant":
                out = node.outputs[0]
                if id(out) in outputs or node.inputs:
                    continue
                v = constant_node_value(node)
                if v is not None:
                    known[id(out)] = computed[id(out)] = v
                    seeds[id(node)] = node
                continue
            if self._lift_only:
                continue
            if (
                node.op in ("Shape", "Size")
                and self.fold_shapes
                and node.inputs
                and (id(node.inputs[0]) not in dd or is_known(node.inputs[0]))
            ):
                v = self._shape_value(node, known)
                if v is not None:
                    known[id(node.outputs[0])] = computed[id(node.outputs[0])] = v
                    seeds[id(node)] = node
                    continue
            if (
                node.op in ("Gather", "Slice")
                and self.fold_shapes
                and node.inputs
                and not is_known(node.inputs[0])
            ):
                v = self._partial_shape_value(node, local, dd)
                if v is not None:
                    known[id(node.outputs[0])] = computed[id(node.outputs[0])] = v
                    seeds[id(node)] = node
                    stats["partial_shapes"] = stats.get("partial_shapes", 0) + 1
                    continue
            if node.op in NEVER_FOLD or node_subgraphs(node):
                continue
            if not all(is_known(t) for t in node.inputs):
                continue
            if any(o.is_empty() for o in node.outputs[:1]):
                continue
            why = guard.refusal(node, computed)
            if why is not None:
                logger.info("not folding %s", why)
                stats["too_large"] = stats.get("too_large", 0) + 1
                continue
            to_eval.append(node)
            for o in node.outputs:
                if not o.is_empty():
                    known[id(o)] = _PENDING
        if not seeds and not to_eval:
            return
        values = ev.run(to_eval, computed) if to_eval else {}
        # decide which evaluated nodes fold and which stay lazy (too large); a node that could not
        # be evaluated has no values, and neither have its dependents (their inputs were unknown)
        lazy: set[int] = set()
        lazy_nodes: list[gs.Node] = []
        final: list[gs.Node] = []
        for node in to_eval:
            outs = [o for o in node.outputs if not o.is_empty()]
            if any(id(o) not in values for o in outs):
                continue
            in_bytes = sum(self._input_bytes(t, known, values) for t in node.inputs)
            from_lazy = any(id(t) in lazy for t in node.inputs)
            big = False
            for o in outs:
                b = value_nbytes(values[id(o)])
                if b > self.size_limit and (b > self.growth * in_bytes or from_lazy):
                    big = True
            if big:
                lazy.update(id(o) for o in outs)
                lazy_nodes.append(node)
                stats["kept_large"] += 1
                logger.debug("keeping %s (%s) lazy: its value is large", node.name, node.op)
                continue
            final.append(node)
        replace: dict[int, list[gs.Node]] = {}
        for node in seeds.values():
            replace[id(node)] = self._materialize(
                node, {id(o): known[id(o)] for o in node.outputs}, outputs
            )
            if node.op == "Constant":
                stats["constants_lifted"] += 1
            else:
                stats["shapes_folded"] += 1
        for node in final:
            replace[id(node)] = self._materialize(node, values, outputs)
            stats["nodes_folded"] += 1
        # lazy nodes whose readers were all folded are dead now: drop them (last first)
        if lazy_nodes:
            escaping = self._escaping
            for node in reversed(lazy_nodes):
                if all(not o.outputs and id(o) not in escaping for o in node.outputs):
                    node.inputs.clear()
                    node.outputs.clear()
                    replace[id(node)] = []
                    stats["lazy_dropped"] = stats.get("lazy_dropped", 0) + 1
        new_nodes: list[gs.Node] = []
        for n in graph.nodes:
            if id(n) in replace:
                new_nodes.extend(replace[id(n)])
            else:
                new_nodes.append(n)
        graph.nodes = new_nodes

    @staticmethod
    def _input_bytes(t: gs.Tensor, known: dict[int, Any], values: dict[int, np.ndarray]) -> int:
        if t.is_empty():
            return 0
        if id(t) in values:
            return value_nbytes(values[id(t)])
        if isinstance(t, gs.Constant):
            return constant_nbytes(t)
        v = known.get(id(t))
        return 0 if v is None or isinstance(v, _Pending) else value_nbytes(v)

    @staticmethod
    def _materialize(node: gs.Node, values: dict[int, Any], outputs: set[int]) -> list[gs.Node]:
        """Detach ``node`` and turn its outputs into constants; returns the nodes replacing it."""
        outs = list(node.outputs)
        node.inputs.clear()
        node.outputs.clear()
        keep: list[gs.Node] = []
        for o in outs:
            if o.is_empty():
                continue
            v = values[id(o)]
            if id(o) in outputs:
                if node.op == "Constant":  # never reached (skipped earlier) but keep it safe
                    node.outputs.append(o)
                    keep.append(node)
                    continue
                c = gs.Constant(
                    unique_name(f"{o.name}_value"),
                    v if isinstance(v, gs.ir.tensor.LazyValues) else np.asarray(v),
                )
                dtype, shape = o.dtype, o.shape
                keep.append(
                    gs.Node(
                        "Constant",
                        name=unique_name(f"{o.name}_const"),
                        attrs={"value": c},
                        outputs=[o],
                    )
                )
                o.dtype = dtype if dtype is not None else c.dtype
                o.shape = shape if shape is not None else list(c.shape)
            else:
                o.to_constant(v if isinstance(v, gs.ir.tensor.LazyValues) else np.asarray(v))
        return keep

    # ------------------------------------------------------------------ If inlining
    def _inline_ifs(self, model: Model, graph: gs.Graph, stats: dict[str, int]) -> bool:
        ifs = [
            n
            for n in graph.nodes
            if n.op == "If"
            and n.domain in DEFAULT_DOMAINS
            and n.inputs
            and isinstance(n.inputs[0], gs.Constant)
        ]
        if not ifs:
            return False
        owners: dict[str, set[int]] = {}
        for g in model.walk_graphs():
            for name, t in g.tensors().items():
                owners.setdefault(name, set()).add(id(t))
        escaping = all_graph_output_ids(model)
        done = 0
        for node in ifs:
            cond = np.asarray(node.inputs[0].values)
            if cond.size != 1:
                continue
            branch = node.attrs.get("then_branch" if bool(cond.reshape(-1)[0]) else "else_branch")
            if not isinstance(branch, gs.Graph) or len(branch.outputs) != len(node.outputs):
                continue
            own = {id(t) for t in graph.outputs}
            if any(id(o) in escaping and id(o) not in own for o in node.outputs):
                continue  # an If output that some subgraph returns by name: leave it
            self._inline(graph, node, branch, owners)
            done += 1
        stats["ifs_inlined"] += done
        return done > 0

    @staticmethod
    def _inline(
        graph: gs.Graph, node: gs.Node, branch: gs.Graph, owners: dict[str, set[int]]
    ) -> None:
        local_nodes = {id(n) for n in branch.nodes}
        # rename branch-local tensors whose names exist elsewhere in the model
        for name, t in branch.tensors().items():
            local = isinstance(t, gs.Constant) or any(id(p) in local_nodes for p in t.inputs)
            if not local:
                continue
            others = owners.get(name, set()) - {id(t)}
            if others:
                t.name = unique_name(name)
                owners.setdefault(t.name, set()).add(id(t))
        parent_outputs = {id(t) for t in graph.outputs}
        if_outs = list(node.outputs)
        node.inputs.clear()
        node.outputs.clear()
        extra: list[gs.Node] = []
        counts: dict[int, int] = {}
        for bo in branch.outputs:
            counts[id(bo)] = counts.get(id(bo), 0) + 1
        for bo, io in zip(branch.outputs, if_outs):
            producer = bo.inputs[0] if bo.inputs else None
            if producer is not None and id(producer) in local_nodes and counts[id(bo)] == 1:
                for consumer in list(bo.outputs):
                    for i, t in enumerate(consumer.inputs):
                        if t is bo:
                            consumer.inputs[i] = io
                idx = producer.outputs.index(bo)
                producer.outputs[idx] = io
                if io.dtype is None:
                    io.dtype = bo.dtype
            elif isinstance(bo, gs.Constant) and id(io) not in parent_outputs:
                io.to_constant(bo._values)
            else:
                extra.append(
                    gs.Node(
                        "Identity", name=unique_name(f"{node.name}_out"), inputs=[bo], outputs=[io]
                    )
                )
        pos = next(i for i, n in enumerate(graph.nodes) if n is node)
        graph.nodes[pos : pos + 1] = list(branch.nodes) + extra
        branch.nodes = []


class _Pending:
    """Marker: the value will be computed by the evaluator."""


_PENDING = _Pending()
