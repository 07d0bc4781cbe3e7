"""One constant evaluator: the values of a node, or of a small subgraph, whose inputs are constants.

Nodes are run in onnxruntime (``ORT_DISABLE_ALL``, one thread, so the numbers are exactly the
kernels' numbers): a list of nodes in ONE session, and if that fails node by node, with
``onnx.reference`` for an op onnxruntime lacks; a node nobody can evaluate has no value. Users: the
``fold-constants`` pass (whole constant subgraphs of a graph, :class:`ConstantEvaluator`) and the
pruning analysis (a weight or shape input computed by a few nodes, :func:`const_value`).

Size guard: before anything is computed, the bytes of each output are estimated, from the IR's
static shape and dtype or else from ONNX shape inference of that node given its constant inputs'
types and (small) values, so that ``ConstantOfShape([100000, 100000])`` is known to be 40 GB before
it exists. A node whose estimate is over the caller's ``max_bytes`` is refused with a reason
(:func:`size_refusal`, :class:`Evaluation`). An estimate that cannot be made refuses nothing, except
in :func:`evaluate`, which then runs the nodes one at a time so that every node is estimated from
its computed inputs before it runs.

Not evaluable: ops whose value is not a function of their inputs (random ops), sequence and
optional ops, ops with subgraph attributes, and nodes of non-default domains
(:func:`not_evaluable`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from onnx.reference import ReferenceEvaluator
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from graphopt.core.graph import constant_nbytes, node_subgraphs
from graphopt.core.model import PROTO_LIMIT
from graphopt.core.session import session_options
from graphopt.core.shapes import is_static

logger = logging.getLogger(__name__)

#: the default ONNX domain under its three spellings
DEFAULT_DOMAINS = ("", "ai.onnx", None)

#: ops that draw random numbers: two runs differ
RANDOM_OPS: frozenset[str] = frozenset(
    {
        "RandomNormal",
        "RandomNormalLike",
        "RandomUniform",
        "RandomUniformLike",
        "Multinomial",
        "Bernoulli",
    }
)

#: ops whose value is not a function of their inputs, or that produce non-tensors
NOT_EVALUABLE: frozenset[str] = RANDOM_OPS | frozenset(
    {
        "If",
        "Loop",
        "Scan",
        "SequenceConstruct",
        "SequenceEmpty",
        "SequenceInsert",
        "SequenceErase",
        "SequenceAt",
        "SequenceLength",
        "SplitToSequence",
        "ConcatFromSequence",
        "SequenceMap",
        "Optional",
        "OptionalGetElement",
        "OptionalHasElement",
    }
)


def _max_eval_bytes(default: int = 256 << 20) -> int:
    text = os.environ.get("GRAPHOPT_MAX_FOLD_BYTES", "").strip()
    try:
        value = int(float(text)) if text else default
    except ValueError:
        logger.warning(
            "GRAPHOPT_MAX_FOLD_BYTES=%r is not a number of bytes; using %d", text, default
        )
        return default
    return value if value > 0 else default


#: default size guard: a value larger than this is never computed (256 MiB, or
#: ``GRAPHOPT_MAX_FOLD_BYTES`` from the environment)
MAX_EVAL_BYTES = _max_eval_bytes()

#: inputs with at most this many elements are handed to shape inference with their values
_DATA_ELEMENTS = 1024

#: the ONNX IR version of the models built for evaluation (at least 7, for opset >= 12 graphs)
_MIN_IR_VERSION = 7


# ------------------------------------------------------------------------------------ values


def constant_node_value(node: gs.Node) -> Any | None:
    """The value of a ``Constant`` node (a numpy array or lazy values), None if unsupported."""
    a = node.attrs
    if "value" in a and isinstance(a["value"], gs.Constant):
        return a["value"]._values
    if "value_float" in a:
        return np.array(a["value_float"], dtype=np.float32)
    if "value_floats" in a:
        return np.array(list(a["value_floats"]), dtype=np.float32)
    if "value_int" in a:
        return np.array(a["value_int"], dtype=np.int64)
    if "value_ints" in a:
        return np.array(list(a["value_ints"]), dtype=np.int64)
    if "value_string" in a:
        v = a["value_string"]
        return np.array(v.decode() if isinstance(v, bytes) else v, dtype=object)
    if "value_strings" in a:
        return np.array(
            [v.decode() if isinstance(v, bytes) else v for v in a["value_strings"]], dtype=object
        )
    return None  # sparse_value and unknown forms stay as they are


def as_array(v: Any) -> np.ndarray:
    """``v`` (numpy array, scalar, graphsurgeon lazy values or ``gs.Constant``) as an array."""
    if isinstance(v, gs.Constant):
        return np.asarray(v.values)
    if isinstance(v, gs.ir.tensor.LazyValues):
        return np.asarray(v.load())
    return np.asarray(v)


def literal_value(t: gs.Tensor | None) -> np.ndarray | None:
    """The value of ``t`` if it is an initializer or a ``Constant`` node output (no evaluation)."""
    if t is None:
        return None
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    if (
        len(t.inputs) == 1
        and t.inputs[0].op == "Constant"
        and t.inputs[0].domain in DEFAULT_DOMAINS
    ):
        v = constant_node_value(t.inputs[0])
        return None if v is None else as_array(v)
    return None


def value_nbytes(v: Any) -> int:
    """Bytes of a value: a numpy array, graphsurgeon lazy values or a ``gs.Constant``."""
    if isinstance(v, gs.Constant):
        return constant_nbytes(v)
    if isinstance(v, gs.ir.tensor.LazyValues):
        return int(v.nbytes)
    return int(np.asarray(v).nbytes)


def not_evaluable(node: gs.Node) -> str | None:
    """Why ``node`` cannot be evaluated at compile time whatever its inputs, or None."""
    if node.domain not in DEFAULT_DOMAINS:
        return f"{node.domain}.{node.op} '{node.name}' is not a default-domain op"
    if node.op in NOT_EVALUABLE:
        return f"{node.op} '{node.name}' is random or not a tensor op"
    if node_subgraphs(node):
        return f"{node.op} '{node.name}' has a subgraph"
    return None


# ------------------------------------------------------------------------------------ size guard


def _static_nbytes(dtype: Any, shape: Sequence[Any] | None) -> int | None:
    if dtype is None or not is_static(shape):
        return None
    try:
        itemsize = np.dtype(dtype).itemsize
    except TypeError:
        return None
    return int(np.prod([int(d) for d in shape or ()], dtype=np.float64)) * itemsize


def _type_proto(dtype: Any, shape: Sequence[Any] | None) -> onnx.TypeProto | None:
    if dtype is None:
        return None
    try:
        elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    except (TypeError, KeyError, ValueError):
        return None
    dims: list[int | None] | None = (
        None
        if shape is None
        else [int(d) if isinstance(d, (int, np.integer)) and d >= 0 else None for d in shape]
    )
    return onnx.helper.make_tensor_type_proto(elem, dims)


class SizeGuard:
    """Estimates the bytes of node outputs before they are computed, and refuses large ones.

    Nodes are estimated in topological order; the types inferred for one node's outputs serve the
    nodes after it. ``max_bytes=None`` refuses nothing (estimates are still made).
    """

    def __init__(self, opset: int, max_bytes: int | None = MAX_EVAL_BYTES) -> None:
        self.opset = int(opset)
        self.max_bytes = max_bytes
        self._types: dict[int, tuple[Any, list[Any] | None]] = {}  # tensor id -> (dtype, shape)

    def estimate(self, node: gs.Node, known: Mapping[int, Any] | None = None) -> list[int | None]:
        """Estimated bytes of each non-empty output of ``node`` (None where unknown).

        Args:
            node: the node.
            known: values of its non-constant inputs, by tensor id (numpy arrays or lazy values).
        """
        outs = [o for o in node.outputs if not o.is_empty()]
        est: list[int | None] = [_static_nbytes(o.dtype, o.shape) for o in outs]
        if all(e is not None for e in est):
            return est
        inferred = self._infer(node, known or {})
        for k, o in enumerate(outs):
            if o.name in inferred:
                dtype, shape = inferred[o.name]
                self._types[id(o)] = (dtype if o.dtype is None else o.dtype, shape)
                if est[k] is None:
                    est[k] = _static_nbytes(dtype if dtype is not None else o.dtype, shape)
        return est

    def refusal(self, node: gs.Node, known: Mapping[int, Any] | None = None) -> str | None:
        """Why ``node`` must not be computed (an output estimated over ``max_bytes``), or None."""
        est = self.estimate(node, known)
        if self.max_bytes is None:
            return None
        big = max((e for e in est if e is not None), default=0)
        if big > self.max_bytes:
            return (
                f"{node.op} '{node.name}': its result would be {big:,} bytes, over the limit "
                f"of {self.max_bytes:,}"
            )
        return None

    def _input(
        self, t: gs.Tensor, known: Mapping[int, Any]
    ) -> tuple[onnx.TypeProto | None, onnx.TensorProto | None]:
        v: Any = None
        if isinstance(t, gs.Constant):
            v = t._values
        elif id(t) in known:
            v = known[id(t)]
        if v is not None:
            shape, dtype = list(np.shape(v)), getattr(v, "dtype", None)
            data = None
            if int(np.prod(shape, dtype=np.float64)) <= _DATA_ELEMENTS:
                try:
                    data = onnx.numpy_helper.from_array(as_array(v), t.name)
                except (TypeError, ValueError):
                    data = None
            return _type_proto(dtype, shape), data
        dtype, shape = self._types.get(id(t), (t.dtype, t.shape))
        return _type_proto(dtype if dtype is not None else t.dtype, shape), None

    def _infer(
        self, node: gs.Node, known: Mapping[int, Any]
    ) -> dict[str, tuple[Any, list[Any] | None]]:
        """ONNX shape inference of ``node`` alone: output name -> (numpy dtype, shape)."""
        if node.domain not in DEFAULT_DOMAINS:
            return {}
        try:
            schema = onnx.defs.get_schema(node.op, self.opset, "")
            types: dict[str, onnx.TypeProto] = {}
            data: dict[str, onnx.TensorProto] = {}
            for t in node.inputs:
                if t.is_empty() or t.name in types:
                    continue
                tp, d = self._input(t, known)
                if tp is None:
                    return {}
                types[t.name] = tp
                if d is not None:
                    data[t.name] = d
            proto = OnnxExporter.export_node(node)
            res = onnx.shape_inference.infer_node_outputs(
                schema, proto, types, data, opset_imports=[onnx.helper.make_opsetid("", self.opset)]
            )
        except Exception as exc:  # noqa: BLE001 - no estimate; the caller decides what that means
            logger.debug(
                "no size estimate for %s (%s): %s",
                node.name,
                node.op,
                str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
            )
            return {}
        out: dict[str, tuple[Any, list[Any] | None]] = {}
        for name, tp in res.items():
            if not tp.HasField("tensor_type"):
                continue
            tt = tp.tensor_type
            try:
                dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type) if tt.elem_type else None
            except (KeyError, ValueError):
                dtype = None
            shape = None
            if tt.HasField("shape"):
                shape = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
            out[name] = (dtype, shape)
        return out


def size_refusal(
    node: gs.Node, opset: int, max_bytes: int | None, known: Mapping[int, Any] | None = None
) -> str | None:
    """Why ``node`` must not be evaluated: an output estimated over ``max_bytes``, or None.

    Args:
        node: the node.
        opset: the default-domain opset of its graph.
        max_bytes: the largest result allowed (None: no limit).
        known: values of its non-constant inputs, by tensor id.
    """
    return SizeGuard(opset, max_bytes).refusal(node, known)


# ------------------------------------------------------------------------------------ evaluation


def _value_proto(name: str, v: Any) -> onnx.TensorProto:
    if isinstance(v, gs.ir.tensor.LazyValues):
        p = onnx.TensorProto()
        p.CopyFrom(v.tensor)
        p.name = name
        return p
    return onnx.numpy_helper.from_array(np.asarray(v), name)


def _run_ort(model: onnx.ModelProto, outputs: list[str]) -> list[np.ndarray]:
    so = session_options("disable_all", threads=1)
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return list(sess.run(outputs, {}))


def _make_model(
    nodes: Sequence[gs.Node],
    values: Mapping[str, Any],
    outputs: list[str],
    opset: int,
    ir_version: int,
) -> onnx.ModelProto:
    graph = onnx.helper.make_graph(
        [OnnxExporter.export_node(n) for n in nodes],
        "const_eval",
        [],
        [onnx.helper.make_empty_tensor_value_info(o) for o in outputs],
        initializer=[_value_proto(k, v) for k, v in values.items()],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    model.ir_version = max(int(ir_version), _MIN_IR_VERSION)
    return model


def _first_line(exc: BaseException) -> str:
    s = str(exc).strip()
    return s.splitlines()[0] if s else type(exc).__name__


class ConstantEvaluator:
    """Evaluates lists of constant nodes: batched in one onnxruntime session, per node as a
    fallback (with ``onnx.reference`` for ops onnxruntime lacks).

    Args:
        opset: the default-domain opset of the graph the nodes live in.
        ir_version: the model's IR version.

    Attributes:
        sessions: how many onnxruntime sessions were created (a cost figure for pass stats).
    """

    def __init__(self, opset: int, ir_version: int = 8) -> None:
        self.opset = int(opset)
        self.ir_version = int(ir_version)
        self.sessions = 0

    def run(self, nodes: list[gs.Node], known: Mapping[int, Any]) -> dict[int, np.ndarray]:
        """Values of the outputs of ``nodes`` (topologically ordered), keyed by tensor id.

        Args:
            nodes: the nodes to evaluate; their inputs are constants, outputs of earlier nodes of
                the list, or tensors in ``known``.
            known: values of other input tensors by tensor id (numpy arrays or lazy values).

        Returns:
            The outputs that could be computed; a node nobody can evaluate is missing, and so are
            the nodes that depend on it.
        """
        if not nodes:
            return {}
        try:
            return self._batch(nodes, known)
        except Exception as exc:  # noqa: BLE001 - any failure: evaluate node by node
            logger.debug(
                "batched evaluation of %d nodes failed (%s); evaluating node by node",
                len(nodes),
                _first_line(exc),
            )
        out: dict[int, np.ndarray] = {}
        for n in nodes:
            res = self._single(n, known, out)
            if res is not None:
                out.update(res)
        return out

    def _inputs(
        self,
        nodes: Iterable[gs.Node],
        produced: set[int],
        known: Mapping[int, Any],
        extra: Mapping[int, np.ndarray] | None = None,
    ) -> dict[str, Any] | None:
        vals: dict[str, Any] = {}
        for n in nodes:
            for t in n.inputs:
                if t.is_empty() or id(t) in produced or t.name in vals:
                    continue
                if extra is not None and id(t) in extra:
                    vals[t.name] = extra[id(t)]
                elif isinstance(t, gs.Constant):
                    vals[t.name] = t._values
                elif id(t) in known:
                    vals[t.name] = known[id(t)]
                else:
                    return None
        return vals

    def _batch(self, nodes: list[gs.Node], known: Mapping[int, Any]) -> dict[int, np.ndarray]:
        outs = [o for n in nodes for o in n.outputs if not o.is_empty()]
        produced = {id(o) for o in outs}
        vals = self._inputs(nodes, produced, known)
        if vals is None:
            raise RuntimeError("an input of the constant subgraph is unknown")
        model = _make_model(nodes, vals, [o.name for o in outs], self.opset, self.ir_version)
        if model.ByteSize() >= PROTO_LIMIT:
            raise RuntimeError("constant subgraph too large for one session")
        self.sessions += 1
        res = _run_ort(model, [o.name for o in outs])
        return {id(o): np.asarray(r) for o, r in zip(outs, res)}

    def _single(
        self, node: gs.Node, known: Mapping[int, Any], done: Mapping[int, np.ndarray]
    ) -> dict[int, np.ndarray] | None:
        outs = [o for o in node.outputs if not o.is_empty()]
        vals = self._inputs([node], set(), known, done)
        if vals is None:
            return None
        model = _make_model([node], vals, [o.name for o in outs], self.opset, self.ir_version)
        res: list[Any]
        try:
            self.sessions += 1
            res = _run_ort(model, [o.name for o in outs])
        except Exception as exc:  # noqa: BLE001 - try the reference implementation
            logger.debug("onnxruntime cannot evaluate %s (%s): %s", node.name, node.op, exc)
            try:
                feeds = {
                    k: (
                        v.values
                        if isinstance(v, gs.Constant)
                        else onnx.numpy_helper.to_array(_value_proto(k, v))
                    )
                    for k, v in vals.items()
                }
                model = _make_model([node], {}, [o.name for o in outs], self.opset, self.ir_version)
                model.graph.input.extend(onnx.helper.make_empty_tensor_value_info(k) for k in feeds)
                res = list(ReferenceEvaluator(model).run(None, feeds))
            except Exception as exc2:  # noqa: BLE001 - nobody can evaluate it: no value
                logger.debug("onnx.reference cannot evaluate %s (%s): %s", node.name, node.op, exc2)
                return None
        if any(not isinstance(r, np.ndarray) and not np.isscalar(r) for r in res):
            return None
        return {id(o): np.asarray(r) for o, r in zip(outs, res)}


@dataclass(frozen=True)
class Evaluation:
    """What :func:`evaluate` computed: ``values`` by output tensor name, or None and ``reason``."""

    values: dict[str, np.ndarray] | None
    reason: str | None = None

    def __bool__(self) -> bool:
        return self.values is not None


def evaluate(
    nodes: gs.Node | Sequence[gs.Node],
    opset: int,
    *,
    max_bytes: int | None = MAX_EVAL_BYTES,
    ir_version: int = 8,
) -> Evaluation:
    """Evaluate a node, or a small subgraph, whose inputs are constants.

    Args:
        nodes: one node, or nodes in topological order; every input is an initializer
            (``gs.Constant``) or an output of an earlier node of the list (``Constant`` nodes
            included).
        opset: the default-domain opset of their graph.
        max_bytes: the size guard: when an output is estimated larger than this, nothing is
            computed and the result says why (None: no limit).
        ir_version: the model's IR version.

    Returns:
        The values of every output of the nodes, or ``values=None`` and the reason (not evaluable,
        an input that is not a constant, over ``max_bytes``, or no kernel could run it).
    """
    seq = [nodes] if isinstance(nodes, gs.Node) else list(nodes)
    produced = {id(o) for n in seq for o in n.outputs}
    for n in seq:
        why = not_evaluable(n)
        if why is not None:
            return Evaluation(None, why)
        for t in n.inputs:
            if not t.is_empty() and not isinstance(t, gs.Constant) and id(t) not in produced:
                return Evaluation(None, f"input '{t.name}' of {n.op} '{n.name}' is not a constant")
    guard = SizeGuard(opset, max_bytes)
    ev = ConstantEvaluator(opset, ir_version)
    sure = True
    for n in seq:
        est = guard.estimate(n)
        known = [e for e in est if e is not None]
        if len(known) < len(est):
            sure = False
        elif max_bytes is not None and max(known, default=0) > max_bytes:
            return Evaluation(None, guard.refusal(n))
    if sure:
        got = ev.run(seq, {})
    else:
        # an output size is unknown until its inputs exist: compute one node at a time, each
        # checked against its computed inputs first
        got = {}
        for n in seq:
            why = guard.refusal(n, got)
            if why is not None:
                return Evaluation(None, why)
            got.update(ev.run([n], got))
    outs = [o for n in seq for o in n.outputs if not o.is_empty()]
    missing = [o for o in outs if id(o) not in got]
    if missing:
        node = missing[0].inputs[0]
        return Evaluation(None, f"{node.op} '{node.name}' could not be evaluated")
    return Evaluation({o.name: got[id(o)] for o in outs})


def constant_subgraph(
    t: gs.Tensor, *, ops: Collection[str] | None = None, max_depth: int = 8
) -> list[gs.Node] | str:
    """The nodes that compute ``t`` from constants, in topological order, or why there are none.

    Args:
        t: a tensor.
        ops: the only ops the subgraph may use (None: every evaluable op).
        max_depth: how far above ``t`` nodes may sit (``t``'s producer is at depth 0); a tensor
            deeper than that must be an initializer.
    """
    order: list[gs.Node] = []
    seen: set[int] = set()

    def visit(x: gs.Tensor, depth: int) -> str | None:
        if isinstance(x, gs.Constant) or x.is_empty():
            return None
        if not x.inputs:
            return f"'{x.name}' is a graph input"
        if depth > max_depth:
            return f"'{x.name}' is more than {max_depth} nodes away from constants"
        node = x.inputs[0]
        if id(node) in seen:
            return None
        why = not_evaluable(node)
        if why is not None:
            return why
        if ops is not None and node.op not in ops:
            return f"{node.op} '{node.name}' is not one of the ops evaluated here"
        for i in node.inputs:
            why = visit(i, depth + 1)
            if why is not None:
                return why
        seen.add(id(node))
        order.append(node)
        return None

    why = visit(t, 0)
    return order if why is None else why


def const_value(
    t: gs.Tensor | None,
    opset: int | None = None,
    *,
    ops: Collection[str] | None = None,
    max_depth: int = 8,
    max_bytes: int | None = MAX_EVAL_BYTES,
) -> np.ndarray | None:
    """The value of ``t`` when it is a constant or is computed from constants, else None.

    Initializers and ``Constant`` node outputs are read as they are; anything else is computed by
    :func:`evaluate` (the reason it cannot be is logged at DEBUG level).

    Args:
        t: a tensor (None gives None).
        opset: the default-domain opset of ``t``'s graph; without it only literal constants
            (initializers, ``Constant`` nodes) have a value.
        ops: the only ops the computing subgraph may use (None: every evaluable op).
        max_depth: see :func:`constant_subgraph`.
        max_bytes: the size guard of :func:`evaluate`.
    """
    if t is None:
        return None
    lit = literal_value(t)
    if lit is not None or isinstance(t, gs.Constant) or opset is None:
        return lit
    nodes = constant_subgraph(t, ops=ops, max_depth=max_depth)
    if isinstance(nodes, str):
        return None
    res = evaluate(nodes, opset, max_bytes=max_bytes)
    if res.values is None:
        logger.debug("no constant value for '%s': %s", t.name, res.reason)
        return None
    return res.values[t.name]
