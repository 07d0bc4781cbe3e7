"""Proof of a memory plan by execution.

:class:`ArenaExecutor` runs a model node by node inside ONE preallocated arena
(``np.empty(arena_bytes + 64, uint8)``, started at a 64-byte aligned address): every planned
tensor is a view ``arena[offset:offset + nbytes]`` with its dtype and shape. Each node runs in its
own cached single-node onnxruntime session whose inputs and outputs are bound with IOBinding *to
the arena's memory itself* (no copies), so an in-place write really overwrites its input and an
alias really is the same bytes. Nodes onnxruntime cannot run alone fall back to onnx's
ReferenceEvaluator (outputs copied into their slices). If nodes are executed branch by branch,
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
from graphopt.core.session import run_model, session_options
from graphopt.core.verify import OutputDiff, compare

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


@dataclass
class _Session:
    sess: Any  # ort.InferenceSession or ReferenceEvaluator
    inputs: list[str]  # names fed (activations)
    outputs: list[str]
    reference: bool = False


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
        self.arena: np.ndarray | None = None
        self.values: dict[str, np.ndarray] = {}  # tensors outside the arena
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

    def get(self, name: str) -> np.ndarray:
        if name in self._const_names:
            if name not in self.consts:
                self.consts[name] = _constant_value(self._const_nodes[name])
            return self.consts[name]
        slot = self._slot(name)
        if slot is not None:
            return slot
        return self.values[name]

    def put(self, name: str, value: np.ndarray) -> None:
        value = np.asarray(value)
        self.observed[name] = (tuple(int(d) for d in value.shape), value.dtype)
        slot = self._slot(name)
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
    def _session(self, node: gs.Node, extra: list[str]) -> _Session:
        key = id(node)
        s = self._sessions.get(key)
        if s is not None:
            return s
        proto = OnnxExporter.export_node(node)
        fed = [t.name for t in node.inputs if t.name and t.name not in self._const_names]
        fed += [n for n in extra if n not in self._const_names and n not in fed]
        inits = [t.name for t in node.inputs if t.name and t.name in self._const_names]
        inits += [n for n in extra if n in self._const_names and n not in inits]
        g_inputs = []
        for name in fed:
            v = self.get(name)
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
        opsets = [onnx.helper.make_opsetid(d, v) for d, v in self.model.opset_imports.items()]
        if node.domain and node.domain not in self.model.opset_imports:
            opsets.append(onnx.helper.make_opsetid(node.domain, 1))
        mp = onnx.helper.make_model(graph, opset_imports=opsets)
        mp.ir_version = min(self.model.ir_version or onnx.IR_VERSION, onnx.IR_VERSION)
        outs = [t.name for t in node.outputs if t.name]
        try:
            so = session_options("disable_all", self.threads)
            sess: Any = ort.InferenceSession(
                mp.SerializeToString(), so, providers=["CPUExecutionProvider"]
            )
            s = _Session(sess, fed, outs)
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
        if s.reference:
            res = s.sess.run(None, {n: np.array(self.get(n)) for n in s.inputs})
            for name, v in zip(s.outputs, res):
                self.put(name, v)
            self.ran_reference += 1
            return
        io = s.sess.io_binding()
        for name in s.inputs:
            v = self.get(name)
            if v.size and self._slot(name) is not None:
                io.bind_input(name, "cpu", 0, v.dtype, list(v.shape), v.ctypes.data)
            else:
                io.bind_cpu_input(name, np.ascontiguousarray(v))
        late = []
        for name in s.outputs:
            slot = self._slot(name)
            if slot is not None:
                io.bind_output(name, "cpu", 0, slot.dtype, list(slot.shape), slot.ctypes.data)
            else:
                io.bind_output(name, "cpu")
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
        return {t.name: np.array(self.get(t.name), copy=True) for t in self.model.graph.outputs}


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


def prove(
    model: Model,
    plan: MemoryPlan,
    feeds: Mapping[str, np.ndarray] | None = None,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    threads: int = 1,
) -> ProofReport:
    """Run ``model`` inside ``plan``'s arena and compare with onnxruntime on the whole model.

    Never raises for a wrong plan: a crash inside the arena (e.g. a clobbered shape tensor) is a
    failed proof with ``error`` set.
    """
    feeds = dict(feeds) if feeds is not None else random_feeds(model, seed=0)
    ref = run_model(model, feeds)
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
    report.outputs = [compare(name, ref[name], got[name], rtol, atol) for name in ref]
    report.ok = all(o.ok for o in report.outputs)
    # graph inputs belong to the caller: the run must leave them as they were given
    for t in model.graph.inputs:
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
