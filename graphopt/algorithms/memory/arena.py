"""Proof of a memory plan by execution.

:class:`ArenaExecutor` runs a model node by node inside ONE preallocated arena
(``np.empty(arena_bytes + 64, uint8)``, started at a 64-byte aligned address): every planned
tensor is a view ``arena[offset:offset + nbytes]`` with its dtype and shape. Each node runs in its
own cached single-node onnxruntime session whose inputs and outputs are bound with IOBinding *to
the arena's memory itself* (no copies), so an in-place write really overwrites its input and an
alias really is the same bytes. Nodes of one signature (op, attributes, input types and shapes;
default domain, no subgraphs) share one session fed every input, weights included, so that a
model of 200,000 nodes opens a handful of sessions; a node whose kernel refuses that gets its own
with its weights as initializers. Nodes with a value IOBinding cannot bind (a tensor type numpy
lacks: bfloat16, float8, int4 ..., held as ml_dtypes arrays; optional, sequence and map values)
run through :func:`~graphopt.core.session.run_session` with their outputs copied into their
slices, and nodes onnxruntime cannot run alone fall back to onnx's ReferenceEvaluator (outputs
copied too). If nodes are executed branch by branch,
their branch's nodes running in the arena too; Loop/Scan nodes run whole (captured outer tensors
become inputs of their session). Initializers and Constant outputs are parameters and live outside
the arena.

:func:`prove` compares the executor's outputs with onnxruntime running the whole model: a plan
that lets two live tensors share bytes clobbers a value and fails the comparison.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from onnx.reference import ReferenceEvaluator
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from graphopt.algorithms.memory.planner import MemoryPlan
from graphopt.core.errors import FeedError, GraphoptError, first_line
from graphopt.core.feeds import random_feeds
from graphopt.core.graph import captured_names, node_subgraphs
from graphopt.core.liveness import constant_names, needs_probe
from graphopt.core.model import Model
from graphopt.core.session import (
    is_ml_dtype,
    run_model,
    run_opened,
    run_session,
    session_options,
    take_outputs,
)
from graphopt.core.verify import OutputDiff, compare, compare_values

logger = logging.getLogger(__name__)


def _constant_value(node: gs.Node) -> np.ndarray:
    a = node.attrs
    if isinstance(a.get("value"), gs.Constant):
        return np.asarray(a["value"].values)
    for key, dt in (("value_float", np.float32), ("value_int", np.int64)):
        if key in a:
            return np.array(a[key], dtype=dt)
    for key, dt in (("value_floats", np.float32), ("value_ints", np.int64)):
        if key in a:
            return np.array(list(a[key]), dtype=dt)
    proto = OnnxExporter.export_node(node)
    g = onnx.helper.make_graph(
        [proto], "c", [], [onnx.helper.make_value_info(node.outputs[0].name, onnx.TypeProto())]
    )
    outs: Any = ReferenceEvaluator(onnx.helper.make_model(g)).run(None, {})
    return np.asarray(outs[0])


#: onnxruntime tensor types IOBinding binds to numpy memory (the others: run_session, copied)
_BINDABLE = frozenset(
    f"tensor({t})"
    for t in (
        "float",
        "double",
        "float16",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "bool",
    )
)


def _copy(value: Any) -> Any:
    """A copy of a value that owes nothing to the arena (tensors, sequences, maps, None)."""
    if isinstance(value, list):
        return [_copy(v) for v in value]
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    return np.array(value, copy=True) if isinstance(value, np.ndarray) else value


@dataclass
class _Session:
    sess: Any  # ort.InferenceSession or ReferenceEvaluator
    inputs: list[str]  # names fed (activations)
    outputs: list[str]
    reference: bool = False
    #: every input and output a numpy tensor IOBinding can bind (else values are copied)
    bindable: bool = True
    #: the session's names for ``inputs`` and ``outputs`` (positional ``i0``/``o0`` in a session
    #: shared by nodes of one signature; the tensors' own names otherwise)
    feed_as: list[str] = field(default_factory=list)
    out_as: list[str] = field(default_factory=list)
    shared: bool = False

    def __post_init__(self) -> None:
        self.feed_as = self.feed_as or list(self.inputs)
        self.out_as = self.out_as or list(self.outputs)


class ArenaExecutor:
    """Run a model node by node with its activations in one arena laid out by ``plan``.

    With ``plan=None`` every tensor gets its own array (used to observe shapes).
    """

    def __init__(self, model: Model, plan: MemoryPlan | None = None, threads: int = 1) -> None:
        self.model = model
        self.plan = plan
        self.threads = threads
        self.consts: dict[str, np.ndarray] = {}
        for g in model.walk_graphs():
            for n in g.nodes:
                for t in n.inputs:
                    if isinstance(t, gs.Constant) and t.name not in self.consts:
                        self.consts[t.name] = np.asarray(t.values)
        self._const_nodes = {
            n.outputs[0].name: n
            for g in model.walk_graphs()
            for n in g.nodes
            if n.op == "Constant" and n.outputs
        }
        self._const_names = constant_names(model)
        self._sessions: dict[int, _Session] = {}
        #: sessions shared by the nodes of one signature (op, attributes, input types)
        self._shared: dict[tuple[Any, ...], Any] = {}
        self.arena: np.ndarray | None = None
        #: values outside the arena: tensors, and optional (None), sequence and map values
        self.values: dict[str, Any] = {}
        self.observed: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        self.ran_in_arena = 0
        self.ran_reference = 0
        if plan is not None and (
            plan.order != [n.name for n in model.graph.nodes]
            or (plan.order_ops and plan.order_ops != [n.op for n in model.graph.nodes])
        ):
            raise ValueError("the plan was made for another node order; plan this model again")

    # ------------------------------------------------------------------ storage
    def _slot(self, name: str) -> np.ndarray | None:
        if self.plan is None or self.arena is None:
            return None
        tp = self.plan.tensors.get(name)
        if tp is None or tp.nbytes == 0:
            return None
        raw = self.arena[tp.offset : tp.offset + tp.nbytes]
        return raw.view(np.dtype(tp.dtype)).reshape(tp.shape)

    def get(self, name: str) -> Any:
        if name in self._const_names:
            if name not in self.consts:
                self.consts[name] = _constant_value(self._const_nodes[name])
            return self.consts[name]
        slot = self._slot(name)
        if slot is not None:
            return slot
        return self.values[name]

    def put(self, name: str, value: Any) -> None:
        slot = self._slot(name)
        if value is None or isinstance(value, (list, dict)):  # optional, sequence, map values
            if slot is not None:
                raise RuntimeError(f"tensor '{name}' is not a tensor but the plan holds it")
            self.values[name] = value
            return
        value = np.asarray(value)
        self.observed[name] = (tuple(int(d) for d in value.shape), value.dtype)
        if slot is None:
            self.values[name] = np.array(value, copy=True)
            return
        if slot.shape != value.shape or slot.dtype != value.dtype:
            raise RuntimeError(
                f"tensor '{name}' is {value.dtype}{list(value.shape)} but the plan "
                f"says {slot.dtype}{list(slot.shape)}"
            )
        np.copyto(slot, value)

    # ------------------------------------------------------------------ sessions
    def _model_of(self, graph: onnx.GraphProto, domain: str | None) -> onnx.ModelProto:
        opsets = [onnx.helper.make_opsetid(d, v) for d, v in self.model.opset_imports.items()]
        if domain and domain not in self.model.opset_imports:
            opsets.append(onnx.helper.make_opsetid(domain, 1))
        mp = onnx.helper.make_model(graph, opset_imports=opsets)
        mp.ir_version = min(self.model.ir_version or onnx.IR_VERSION, onnx.IR_VERSION)
        return mp

    def _shared_session(self, node: gs.Node) -> _Session | None:
        """A session shared by every node of this one's signature: the node's op and attributes
        with positional tensor names, every input (weights included) fed, keyed by the inputs'
        element types and shapes. A chain of 200,000 nodes then opens a handful of sessions, not
        200,000. None for what is not shared (other domains, whose kernels may want constant
        inputs; non-tensor inputs), or when onnxruntime cannot open it."""
        if node.domain not in (None, "", "ai.onnx"):
            return None
        ins = [t.name for t in node.inputs]
        outs = [t.name for t in node.outputs]
        types = []
        for name in ins:
            if not name:
                continue
            v = self.get(name)
            if not isinstance(v, np.ndarray):
                return None
            types.append((onnx.helper.np_dtype_to_tensor_dtype(v.dtype), v.shape))
        proto = OnnxExporter.export_node(node)
        proto.name = ""
        proto.input[:] = [f"i{i}" if n else "" for i, n in enumerate(ins)]
        proto.output[:] = [f"o{i}" if n else "" for i, n in enumerate(outs)]
        key = (proto.SerializeToString(), tuple(types))
        known = key in self._shared
        sess = self._shared.get(key)
        feed_as = [f"i{i}" for i, n in enumerate(ins) if n]
        out_as = [f"o{i}" for i, n in enumerate(outs) if n]
        if not known:
            g_inputs = [
                onnx.helper.make_tensor_value_info(a, elem, list(shape))
                for a, (elem, shape) in zip(feed_as, types)
            ]
            g_outputs = [onnx.helper.make_value_info(a, onnx.TypeProto()) for a in out_as]
            graph = onnx.helper.make_graph([proto], f"node_{node.op}", g_inputs, g_outputs)
            try:
                sess = ort.InferenceSession(
                    self._model_of(graph, node.domain).SerializeToString(),
                    session_options("disable_all", self.threads),
                    providers=["CPUExecutionProvider"],
                )
            except Exception:  # noqa: BLE001 - not shareable: a session of its own
                sess = None
            self._shared[key] = sess
        if sess is None:
            return None
        bindable = all(v.type in _BINDABLE for v in (*sess.get_inputs(), *sess.get_outputs()))
        return _Session(
            sess,
            [n for n in ins if n],
            [n for n in outs if n],
            bindable=bindable,
            feed_as=feed_as,
            out_as=out_as,
            shared=True,
        )

    def _session(self, node: gs.Node, extra: list[str], share: bool = True) -> _Session:
        key = id(node)
        s = self._sessions.get(key)
        if s is not None and (share or not s.shared):
            return s
        if share and not extra and not node_subgraphs(node):
            shared = self._shared_session(node)
            if shared is not None:
                self._sessions[key] = shared
                return shared
        proto = OnnxExporter.export_node(node)
        fed = [t.name for t in node.inputs if t.name and t.name not in self._const_names]
        fed += [n for n in extra if n not in self._const_names and n not in fed]
        inits = [t.name for t in node.inputs if t.name and t.name in self._const_names]
        inits += [n for n in extra if n in self._const_names and n not in inits]
        g_inputs = []
        for name in fed:
            v = self.get(name)
            if not isinstance(v, np.ndarray):  # a sequence, map or optional value: untyped
                g_inputs.append(onnx.helper.make_value_info(name, onnx.TypeProto()))
                continue
            g_inputs.append(
                onnx.helper.make_tensor_value_info(
                    name, onnx.helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape)
                )
            )
        g_outputs = [
            onnx.helper.make_value_info(t.name, onnx.TypeProto()) for t in node.outputs if t.name
        ]
        initializers = [
            onnx.numpy_helper.from_array(np.asarray(self.get(n)), n) for n in dict.fromkeys(inits)
        ]
        graph = onnx.helper.make_graph(
            [proto], f"node_{node.name}", g_inputs, g_outputs, initializer=initializers
        )
        mp = self._model_of(graph, node.domain)
        outs = [t.name for t in node.outputs if t.name]
        try:
            so = session_options("disable_all", self.threads)
            sess: Any = ort.InferenceSession(
                mp.SerializeToString(), so, providers=["CPUExecutionProvider"]
            )
            types = [v.type for v in (*sess.get_inputs(), *sess.get_outputs())]
            s = _Session(sess, fed, outs, bindable=all(t in _BINDABLE for t in types))
        except Exception as exc:  # noqa: BLE001 - ops ORT cannot run alone
            logger.debug(
                "node %s (%s) runs in the reference evaluator: %s",
                node.name,
                node.op,
                str(exc).splitlines()[0] if str(exc) else exc,
            )
            s = _Session(ReferenceEvaluator(mp), fed, outs, reference=True)
        self._sessions[key] = s
        return s

    # ------------------------------------------------------------------ execution
    def _run_node(self, node: gs.Node) -> None:
        if node.op == "Constant":
            return
        if node.op == "If" and node.domain in (None, "", "ai.onnx"):
            cond = bool(np.asarray(self.get(node.inputs[0].name)).reshape(-1)[0])
            branch = node.attrs["then_branch" if cond else "else_branch"]
            self._run_graph(branch)
            for out, res in zip(node.outputs, branch.outputs):
                if out.name:
                    self.put(
                        out.name,
                        np.array(self.get(res.name), copy=True)
                        if not isinstance(res, gs.Constant)
                        else np.asarray(res.values),
                    )
            return
        extra = captured_names(node) if node_subgraphs(node) else []
        s = self._session(node, extra)
        try:
            self._execute(s)
        except Exception as exc:
            if not s.shared:
                raise
            # a kernel that wants some input constant: the node gets a session of its own
            logger.debug("node %s runs in a session of its own: %s", node.name, first_line(exc))
            self._execute(self._session(node, extra, share=False))

    def _execute(self, s: _Session) -> None:
        if s.reference:
            res = s.sess.run(None, {n: np.array(self.get(n)) for n in s.inputs})
            for name, v in zip(s.outputs, res):
                self.put(name, v)
            self.ran_reference += 1
            return
        if not s.bindable:
            feeds = {a: self.get(n) for n, a in zip(s.inputs, s.feed_as)}
            res = run_session(s.sess, s.out_as, feeds)
            for name, v in zip(s.outputs, res):
                self.put(name, v)
            self.ran_in_arena += 1
            return
        io = s.sess.io_binding()
        for name, a in zip(s.inputs, s.feed_as):
            v = self.get(name)
            if v.size and self._slot(name) is not None:
                io.bind_input(a, "cpu", 0, v.dtype, list(v.shape), v.ctypes.data)
            else:
                io.bind_cpu_input(a, np.require(v, requirements="C"))  # 0-d stays 0-d
        late = []
        for name, a in zip(s.outputs, s.out_as):
            slot = self._slot(name)
            if slot is not None:
                io.bind_output(a, "cpu", 0, slot.dtype, list(slot.shape), slot.ctypes.data)
            else:
                io.bind_output(a, "cpu")
                late.append(name)
        s.sess.run_with_iobinding(io)
        if late:
            got = dict(zip(s.outputs, io.copy_outputs_to_cpu()))
            for name in late:
                self.put(name, got[name])
        for name in s.outputs:
            if name not in late:
                slot = self._slot(name)
                assert slot is not None
                self.observed[name] = (slot.shape, slot.dtype)
        self.ran_in_arena += 1

    def _run_graph(self, graph: gs.Graph) -> None:
        for node in graph.nodes:
            self._run_node(node)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model on ``feeds``; returns copies of the graph outputs."""
        if self.plan is not None:
            base = np.empty(self.plan.arena_bytes + 64, dtype=np.uint8)
            shift = (-base.ctypes.data) % 64
            self.arena = base[shift : shift + self.plan.arena_bytes]
        self.values = {}
        for t in self.model.graph.inputs:
            if t.name in feeds:
                self.put(t.name, np.asarray(feeds[t.name]))
        self._run_graph(self.model.graph)
        return {t.name: _copy(self.get(t.name)) for t in self.model.graph.outputs}


def observe_tensors(
    model: Model, feeds: Mapping[str, np.ndarray] | None = None
) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every tensor computed when running ``model`` on ``feeds``."""
    ex = ArenaExecutor(model, None)
    ex.run(dict(feeds) if feeds is not None else random_feeds(model, seed=0))
    return ex.observed


def observe_unknown(
    model: Model, feeds: Mapping[str, np.ndarray] | None
) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Run the model node by node once and record every tensor's shape and dtype."""
    try:
        return observe_tensors(model, feeds)
    except FeedError as exc:
        if feeds is not None:
            raise
        # no inputs to run on (the model needs real sizes/shapes): plan without them
        logger.warning(
            "tensors shape inference leaves unknown stay outside the arena: %s", first_line(exc)
        )
        return {}
    except GraphoptError:
        raise
    except Exception as exc:  # noqa: BLE001 - the model fails on these inputs: plan without
        first = first_line(exc)
        logger.warning(
            "could not run the model node by node on %s inputs to size the tensors "
            "shape inference leaves unknown (%s); they stay outside the arena. Give "
            "real inputs (feeds / --feeds)",
            "the given" if feeds else "random",
            first,
        )
        return {}


def probe_unknown(
    model: Model, feeds: Mapping[str, np.ndarray] | None
) -> dict[str, tuple[tuple[int, ...], np.dtype]] | None:
    """:func:`observe_unknown` when some activation's size is unknown after shape inference
    (:func:`~graphopt.core.liveness.needs_probe`), else None (nothing to observe)."""
    return observe_unknown(model, feeds) if needs_probe(model) else None


@dataclass
class ProofReport:
    """Outcome of running a model inside its planned arena."""

    ok: bool
    outputs: list[OutputDiff] = field(default_factory=list)
    error: str | None = None
    arena_bytes: int = 0
    nodes_in_arena: int = 0
    nodes_reference: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "error": self.error,
            "arena_bytes": self.arena_bytes,
            "nodes_in_arena": self.nodes_in_arena,
            "nodes_reference": self.nodes_reference,
            "outputs": {o.name: o.to_json() for o in self.outputs},
        }


def _compare(name: str, ref: Any, got: Any, rtol: float, atol: float) -> OutputDiff:
    """One output of the arena run against onnxruntime: numeric tensors with the proof's
    tolerances, anything else (strings, sequences, maps, optionals) by its structure, strings
    and None exactly."""
    numeric = all(
        isinstance(v, np.ndarray) and (v.dtype.kind in "biufc" or is_ml_dtype(v.dtype))
        for v in (ref, got)
    )
    if numeric:
        return compare(name, ref, got, rtol, atol)
    return compare_values(name, [ref], [got], rtol, atol)


def prove(
    model: Model,
    plan: MemoryPlan,
    feeds: Mapping[str, np.ndarray] | None = None,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    threads: int = 1,
    reference: ort.InferenceSession | None = None,
) -> ProofReport:
    """Run ``model`` inside ``plan``'s arena and compare with onnxruntime on the whole model.

    Never raises for a wrong plan: a crash inside the arena (e.g. a clobbered shape tensor) is a
    failed proof with ``error`` set.

    Args:
        reference: an open ``disable_all`` session of the same computation (the model as it was
            loaded, :func:`graphopt.core.session.take_session`) to compute the reference
            outputs in, instead of a new session of ``model``.
    """
    feeds = dict(feeds) if feeds is not None else random_feeds(model, seed=0)
    # validation's run of a large model on these inputs, else the kept session, else a run
    ref = take_outputs(model, feeds)
    if ref is None:
        ref = run_model(model, feeds) if reference is None else run_opened(reference, feeds)
    report = ProofReport(ok=False, arena_bytes=plan.arena_bytes)
    try:
        ex = ArenaExecutor(model, plan, threads=threads)
        got = ex.run(feeds)
    except Exception as exc:  # noqa: BLE001 - any failure inside the arena fails the proof
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        report.error = f"{type(exc).__name__}: {first}"
        return report
    report.nodes_in_arena = ex.ran_in_arena
    report.nodes_reference = ex.ran_reference
    report.outputs = [_compare(name, ref[name], got[name], rtol, atol) for name in ref]
    report.ok = all(o.ok for o in report.outputs)
    # graph inputs belong to the caller: the run must leave them as they were given (unless the
    # plan was made for a caller that gives them away)
    for t in [] if plan.reuse_inputs else model.graph.inputs:
        if t.name in feeds:
            after = np.asarray(ex.get(t.name))
            given = np.asarray(feeds[t.name])
            same = after.shape == given.shape and np.array_equal(
                after, given, equal_nan=after.dtype.kind in "fc"
            )
            if not same:
                report.ok = False
                report.error = f"graph input '{t.name}' was overwritten inside the arena"
                break
    return report
