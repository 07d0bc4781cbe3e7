"""``OnnxModule``: an ONNX graph as a trainable ``torch.nn.Module``.

The module *interprets* the graph: at construction every node gets a torch callable from the op
table (:mod:`.ops`); ``forward`` walks the nodes in order over a dict of named tensors. Nothing is
traced or regenerated, so the ONNX graph stays the single source of truth and training results
go back into it by tensor name (:func:`.export.write_back`) with the graph structure unchanged.

Construction, in order:

1. **Constants**: initializers and ``Constant`` nodes (Paddle exports keep every weight in
   ``Constant`` nodes) become tensors keyed by their ONNX name.
2. **Trainable selection**: a float constant is a parameter when it reaches a weight slot, possibly
   through view ops (Reshape/Unsqueeze/Squeeze/Flatten/Transpose/Identity with constant shapes):
   Conv/ConvTranspose/FusedConv weight and bias, Gemm/MatMul constant operands, BatchNormalization/
   LayerNormalization/InstanceNormalization scale and bias, PRelu slope; with ``trainable="all"``
   also non-scalar constant operands of Add/Sub/Mul/Div (biases after MatMul, LayerNorm affine
   written out as Mul/Add). BatchNormalization mean and variance are buffers.
3. **Folding**: a node whose inputs are all non-trainable constants is evaluated once with the same
   torch implementation and replaced by its result (Paddle's ``Constant -> Reshape`` bias chains,
   ``Constant -> Cast`` shape pieces). Shape subgraphs fed by the input (``Shape -> Slice ->
   Concat -> Reshape``) stay dynamic, so the module keeps the graph's dynamic dims.
4. **Steps**: the remaining nodes, each with its input and output names and the names whose last
   use it is (freed during no-grad inference).

``If`` nodes run the chosen branch (the condition is read on the host), the branches are nested
interpreters with access to the outer names.
"""

from __future__ import annotations

import logging
import re
from collections import ChainMap
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

from .ops import NodeSpec, UnsupportedOp, builder, parse_attrs, to_tensor

logger = logging.getLogger(__name__)

Tensor = torch.Tensor

#: (domain, op) -> input slots holding weights that train
WEIGHT_SLOTS: dict[tuple[str, str], tuple[int, ...]] = {
    ("", "Conv"): (1, 2),
    ("", "ConvTranspose"): (1, 2),
    ("com.microsoft", "FusedConv"): (1, 2),
    ("", "Gemm"): (0, 1, 2),
    ("", "MatMul"): (0, 1),
    ("", "BatchNormalization"): (1, 2),
    ("", "LayerNormalization"): (1, 2),
    ("", "InstanceNormalization"): (1, 2),
    ("", "PRelu"): (1,),
}
#: constant operands of these (more than one element) train under ``trainable="all"``
ELEMENTWISE = {"Add", "Sub", "Mul", "Div"}
#: ops a weight may pass through on its way to a weight slot (their other inputs constant)
VIEW_OPS = {"Reshape", "Unsqueeze", "Squeeze", "Flatten", "Transpose", "Identity"}
#: never folded (non-deterministic or with subgraphs)
NO_FOLD = {
    "If",
    "Loop",
    "Scan",
    "RandomNormal",
    "RandomUniform",
    "RandomNormalLike",
    "RandomUniformLike",
    "Multinomial",
    "Bernoulli",
    "Dropout",
}

Trainable = str | Iterable[str] | Callable[[str], bool]


def _domain(d: str) -> str:
    return "" if d in ("", "ai.onnx") else d


def _key(name: str, taken: set[str]) -> str:
    """A ``state_dict``-safe key for an ONNX tensor name."""
    k = re.sub(r"\W", "_", name) or "_"
    if k[0].isdigit():
        k = "_" + k
    base, i = k, 1
    while k in taken:
        k = f"{base}_{i}"
        i += 1
    taken.add(k)
    return k


@dataclass
class Source:
    """Where a constant lives in the ONNX model, for writing it back."""

    kind: str  # "initializer" or "constant_node"
    graph: str  # "" for the main graph, else the path of the subgraph
    dtype: np.dtype
    shape: tuple[int, ...]


@dataclass
class Step:
    """One node to run."""

    fn: Callable[..., Any]
    inputs: list[str | None]
    outputs: list[str]
    op: str
    name: str
    #: the callable takes the environment first (If: branches read outer names)
    needs_env: bool = False
    #: outer names read by subgraphs (kept registered)
    reads: list[str] = field(default_factory=list)
    #: inputs that were constant at build time (for peephole matching)
    consts: dict[int, Tensor] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)


class _Store(nn.Module):
    """Holds the constant buffers and the parameters under sanitized keys."""


class _Graph:
    """An interpreter for one (sub)graph: its steps and the names it reads from outside."""

    def __init__(self, steps: list[Step], inputs: list[str], outputs: list[str]) -> None:
        self.steps = steps
        self.inputs = inputs
        self.outputs = outputs
        self._free_cache: dict[frozenset[str], list[list[str]]] = {}

    def free_lists(self, keep: frozenset[str]) -> list[list[str]]:
        """Per step, the names whose last use it is (not outputs, not ``keep``)."""
        if keep not in self._free_cache:
            last: dict[str, int] = {}
            for i, s in enumerate(self.steps):
                for n in [*s.inputs, *s.reads]:
                    if n:
                        last[n] = i
            lists: list[list[str]] = [[] for _ in self.steps]
            hold = set(self.outputs) | keep
            for n, i in last.items():
                if n not in hold:
                    lists[i].append(n)
            self._free_cache[keep] = lists
        return self._free_cache[keep]

    def run(
        self,
        env: Mapping[str, Tensor] | ChainMap[str, Tensor],
        keep: frozenset[str] = frozenset(),
        free: bool = False,
    ) -> dict[str, Tensor]:
        """Run the steps over ``env`` (changed in place), return it."""
        frees = self.free_lists(keep) if free else None
        for i, s in enumerate(self.steps):
            try:
                args = [env[n] if n else None for n in s.inputs]
            except KeyError as exc:
                raise RuntimeError(f"{s.op} node {s.name!r}: input {exc} is not computed") from None
            try:
                out = s.fn(env, *args) if s.needs_env else s.fn(*args)
            except UnsupportedOp:
                raise
            except Exception as exc:  # name the node: the torch message alone is opaque
                shapes = [tuple(a.shape) if isinstance(a, Tensor) else None for a in args]
                raise RuntimeError(
                    f"{s.op} node {s.name!r} failed on inputs {shapes}: {exc}"
                ) from exc
            if len(s.outputs) == 1:
                env[s.outputs[0]] = out if isinstance(out, Tensor) else out[0]  # type: ignore
            else:
                for n, v in zip(s.outputs, out):
                    if n:
                        env[n] = v  # type: ignore[index]
            if frees is not None:
                for n in frees[i]:
                    env.pop(n, None)  # type: ignore[union-attr]
        return env  # type: ignore[return-value]


class OnnxModule(nn.Module):
    """An ONNX model as a ``torch.nn.Module`` whose weights train.

    Args:
        model: an ``onnx.ModelProto`` or anything with ``to_onnx()`` (graphopt's ``Model``).
        trainable: ``"all"`` (weights, biases, normalization affine, non-scalar constant operands
            of Add/Sub/Mul/Div), ``"weights"`` (the weight slots only), ``"none"``, a collection
            of ONNX tensor names, or a predicate on the name (applied to the ``"all"`` candidates).
        custom_ops: extra ``(domain, op) -> builder`` entries (e.g. fake-quantization).
        extra_trainable: ONNX constant names that train in addition to ``trainable``.
        fuse: run recognized multi-node patterns as one torch kernel (HardSwish written as
            Add/Clip/Mul/Div); the graph is not changed, only how the module computes it.

    ``forward(*inputs)`` takes the graph inputs positionally (or by name as keywords) and returns
    the output tensor, or a tuple for several outputs. :meth:`run` returns any named tensors.
    """

    def __init__(
        self,
        model: onnx.ModelProto | Any,
        trainable: Trainable = "all",
        custom_ops: Mapping[tuple[str, str], Callable[[NodeSpec], Any]] | None = None,
        fuse: bool = True,
        extra_trainable: Iterable[str] = (),
    ) -> None:
        super().__init__()
        self.fuse = fuse
        #: tensors computed inside fused steps (not available to :meth:`run`)
        self.fused_away: set[str] = set()
        proto = model if isinstance(model, onnx.ModelProto) else model.to_onnx()
        self.opsets = {_domain(o.domain): o.version for o in proto.opset_import}
        self._custom = dict(custom_ops or {})
        self.store = _Store()
        self._keys: dict[str, str] = {}  # onnx name -> store key
        self._taken: set[str] = set()
        #: trainable ONNX tensor name -> where it is written back
        self.sources: dict[str, Source] = {}
        g = proto.graph
        init_names = {t.name for t in g.initializer}
        self.input_names = [i.name for i in g.input if i.name not in init_names]
        self.output_names = [o.name for o in g.output]
        #: declared input dims (an int, or None where dynamic)
        self.input_dims: dict[str, list[int | None]] = {
            i.name: [
                d.dim_value if d.HasField("dim_value") else None
                for d in i.type.tensor_type.shape.dim
            ]
            for i in g.input
            if i.name not in init_names
        }
        consts, where = self.collect_constants(g, "")
        wanted = self._select_trainable(g, consts, trainable) | set(extra_trainable)
        self.trainable_names = sorted(wanted)
        for name in self.trainable_names:
            arr = consts[name]
            self.sources[name] = Source(*where[name], arr.dtype, tuple(arr.shape))
        self._graph = self._build(g, consts, wanted, outer=set())
        n_params = sum(p.numel() for p in self.parameters())
        logger.debug(
            "OnnxModule: %d steps, %d parameters (%d tensors), %d constants",
            len(self._graph.steps),
            n_params,
            len(self.trainable_names),
            len(self._keys) - len(self.trainable_names),
        )

    # ------------------------------------------------------------------ construction
    @staticmethod
    def collect_constants(
        g: onnx.GraphProto, path: str = ""
    ) -> tuple[dict[str, np.ndarray], dict[str, tuple[str, str]]]:
        """Initializers and ``Constant`` node values of ``g`` (not its subgraphs): name -> array,
        and name -> (``initializer`` | ``constant_node``, ``path``)."""
        consts: dict[str, np.ndarray] = {}
        where: dict[str, tuple[str, str]] = {}
        for t in g.initializer:
            consts[t.name] = numpy_helper.to_array(t)
            where[t.name] = ("initializer", path)
        for n in g.node:
            if n.op_type == "Constant" and _domain(n.domain) == "":
                a = parse_attrs(n)
                if "value" in a:
                    v = np.asarray(a["value"])
                elif "value_float" in a:
                    v = np.asarray(a["value_float"], np.float32)
                elif "value_floats" in a:
                    v = np.asarray(a["value_floats"], np.float32)
                elif "value_int" in a:
                    v = np.asarray(a["value_int"], np.int64)
                elif "value_ints" in a:
                    v = np.asarray(a["value_ints"], np.int64)
                else:
                    raise UnsupportedOp(f"Constant node {n.name!r} with {list(a)}")
                consts[n.output[0]] = v
                where[n.output[0]] = ("constant_node", path)
        return consts, where

    def _select_trainable(
        self, g: onnx.GraphProto, consts: Mapping[str, np.ndarray], trainable: Trainable
    ) -> set[str]:
        if isinstance(trainable, str) and trainable == "none":
            return set()
        producer = {o: n for n in g.node for o in n.output}

        def source(name: str) -> str | None:
            """The float constant ``name`` is a view of, else None."""
            seen = 0
            while name not in consts:
                n = producer.get(name)
                if n is None or n.op_type not in VIEW_OPS or seen > 8:
                    return None
                if any(i and i not in consts for i in n.input[1:]):
                    return None
                name, seen = n.input[0], seen + 1
            return name if consts[name].dtype.kind == "f" else None

        weights: set[str] = set()
        extra: set[str] = set()
        for n in g.node:
            key = (_domain(n.domain), n.op_type)
            for slot in WEIGHT_SLOTS.get(key, ()):
                if slot < len(n.input) and n.input[slot]:
                    s = source(n.input[slot])
                    if s is not None:
                        weights.add(s)
            if key[0] == "" and n.op_type in ELEMENTWISE:
                for i in n.input:
                    s = source(i)
                    if s is not None and consts[s].size > 1:
                        extra.add(s)
        if isinstance(trainable, str):
            if trainable == "weights":
                return weights
            if trainable == "all":
                return weights | extra
            raise ValueError(
                f"trainable={trainable!r}: use all, weights, none, names or a predicate"
            )
        if callable(trainable):
            return {n for n in weights | extra if trainable(n)}
        names = set(trainable)
        missing = names - set(consts)
        if missing:
            raise KeyError(f"not constants of the graph: {sorted(missing)[:5]}")
        return names

    def _register(self, name: str, value: Tensor, param: bool) -> None:
        key = _key(name, self._taken)
        self._keys[name] = key
        if param:
            self.store.register_parameter(key, nn.Parameter(value.clone()))
        else:
            self.store.register_buffer(key, value)

    def _spec(self, n: onnx.NodeProto, known: Mapping[str, Tensor]) -> NodeSpec:
        dom = _domain(n.domain)
        return NodeSpec(
            n.op_type,
            dom,
            n.name,
            parse_attrs(n),
            self.opsets.get(dom, 1),
            {i: known[x] for i, x in enumerate(n.input) if x and x in known},
            len(n.input),
            len(n.output),
        )

    def _builder(self, n: onnx.NodeProto) -> Callable[[NodeSpec], Any]:
        key = (_domain(n.domain), n.op_type)
        return self._custom[key] if key in self._custom else builder(n.op_type, key[0])

    def _build(
        self,
        g: onnx.GraphProto,
        consts: dict[str, np.ndarray],
        trainable: set[str],
        outer: set[str],
        path: str = "",
    ) -> _Graph:
        """Fold constants, register tensors, make the steps of ``g`` (recursively)."""
        known: dict[str, Tensor] = {}  # non-trainable constants, by name (this graph)
        for name, arr in consts.items():
            if name not in trainable:
                known[name] = to_tensor(arr)
        params = {n: to_tensor(consts[n]) for n in trainable if n in consts}
        steps: list[Step] = []
        folded = 0
        for n in g.node:
            if n.op_type == "Constant" and _domain(n.domain) == "":
                continue
            ins = list(n.input)
            if (
                n.op_type not in NO_FOLD
                and ins
                and all((not i) or i in known for i in ins)
                and _domain(n.domain) == ""
            ):
                fn = self._builder(n)(self._spec(n, known))
                with torch.no_grad():
                    out = fn(*[known[i] if i else None for i in ins])
                outs = [out] if isinstance(out, Tensor) else list(out)
                for o, v in zip(n.output, outs):
                    if o:
                        known[o] = v
                folded += 1
                continue
            if n.op_type == "If":
                steps.append(
                    self._if_step(n, known, trainable, outer | set(known) | set(params), path)
                )
                continue
            spec = self._spec(n, known)
            fn = self._builder(n)(spec)
            steps.append(
                Step(
                    fn,
                    [i or None for i in ins],
                    list(n.output),
                    n.op_type,
                    n.name or n.output[0],
                    consts=spec.consts,
                    attrs=spec.attrs,
                )
            )
        if self.fuse:
            steps = self._fuse_hardswish(steps, {o.name for o in g.output})
        graph = _Graph(steps, [], [o.name for o in g.output])
        used = (
            {i for s in steps for i in s.inputs if i}
            | set(graph.outputs)
            | {i for s in steps for i in s.reads}
        )
        for name, t in known.items():
            if name in used and name not in self._keys:
                self._register(name, t, False)
        for name, t in params.items():
            if name not in self._keys:
                self._register(name, t, True)
        logger.debug("graph %r: %d nodes folded, %d steps", path or "main", folded, len(steps))
        return graph

    def _fuse_hardswish(self, steps: list[Step], outputs: set[str]) -> list[Step]:
        """``Div(Mul(x, Clip(Add(x, 3), 0, 6)), 6) -> F.hardswish(x)`` (one kernel forward and
        backward instead of four, same arithmetic order); the fused intermediates are recorded
        in ``self.fused_away``."""
        producer = {o: i for i, s in enumerate(steps) for o in s.outputs}
        uses: dict[str, int] = {}
        for s in steps:
            for n in [*s.inputs, *s.reads]:
                if n:
                    uses[n] = uses.get(n, 0) + 1

        def const_is(s: Step, idx: int, value: float) -> bool:
            c = s.consts.get(idx)
            return c is not None and c.numel() == 1 and float(c) == value

        def single(name: str | None) -> Step | None:
            if not name or name in outputs or uses.get(name) != 1 or name not in producer:
                return None
            return steps[producer[name]]

        drop: set[int] = set()
        new = list(steps)
        for i, div in enumerate(steps):
            if div.op != "Div" or not const_is(div, 1, 6.0):
                continue
            mul = single(div.inputs[0])
            if mul is None or mul.op != "Mul":
                continue
            for xi in (0, 1):
                x, b = mul.inputs[xi], mul.inputs[1 - xi]
                clip = single(b)
                if (
                    clip is None
                    or clip.op != "Clip"
                    or len(clip.inputs) != 3
                    or not (const_is(clip, 1, 0.0) and const_is(clip, 2, 6.0))
                ):
                    continue
                add = single(clip.inputs[0])
                if add is None or add.op != "Add":
                    continue
                if not (
                    (add.inputs[0] == x and const_is(add, 1, 3.0))
                    or (add.inputs[1] == x and const_is(add, 0, 3.0))
                ):
                    continue
                for s in (mul, clip, add):
                    drop.add(producer[s.outputs[0]])
                    self.fused_away.add(s.outputs[0])
                new[i] = Step(F.hardswish, [x], div.outputs, "HardSwish(fused)", div.name)
                break
        return [s for j, s in enumerate(new) if j not in drop]

    def _if_step(
        self,
        n: onnx.NodeProto,
        known: dict[str, Tensor],
        trainable: set[str],
        outer: set[str],
        path: str,
    ) -> Step:
        attrs = {a.name: a.g for a in n.attribute if a.type == onnx.AttributeProto.GRAPH}
        branches = {}
        reads: set[str] = set()
        for which in ("then_branch", "else_branch"):
            sub = attrs[which]
            sub_path = f"{path}/{n.name}.{which}"
            consts, where = self.collect_constants(sub, sub_path)
            # constants inside branches are not written back: keep them fixed
            branches[which] = self._build(sub, consts, set(), outer, sub_path)
            produced = {o for s in branches[which].steps for o in s.outputs} | set(consts)
            reads |= {i for s in branches[which].steps for i in s.inputs if i} - produced
            reads |= {o.name for o in sub.output} - produced
        then_g, else_g = branches["then_branch"], branches["else_branch"]

        def run_if(env: ChainMap[str, Tensor], cond: Tensor) -> tuple[Tensor, ...]:
            graph = then_g if bool(cond.reshape(-1)[0]) else else_g
            local = graph.run(ChainMap({}, env))
            return tuple(local[o] for o in graph.outputs)

        return Step(
            run_if,
            [n.input[0]],
            list(n.output),
            "If",
            n.name or n.output[0],
            needs_env=True,
            reads=sorted(reads),
        )

    # ------------------------------------------------------------------ running
    @property
    def dynamic_batch(self) -> bool:
        """Every input's first dim is dynamic (batches of any size can be fed)."""
        return all(d and d[0] is None for d in self.input_dims.values())

    @property
    def steps(self) -> list[Step]:
        """The main graph's steps, in execution order."""
        return self._graph.steps

    def producer(self, name: str) -> Step | None:
        """The main-graph step computing ``name``."""
        return next((s for s in self._graph.steps if name in s.outputs), None)

    def tensor(self, name: str) -> Tensor:
        """The constant or parameter stored for an ONNX tensor name."""
        return getattr(self.store, self._keys[name])

    def named_onnx_parameters(self) -> Iterable[tuple[str, nn.Parameter]]:
        """``(ONNX tensor name, parameter)`` for every trainable tensor."""
        for name in self.trainable_names:
            yield name, getattr(self.store, self._keys[name])

    def _env(self) -> dict[str, Tensor]:
        return {n: getattr(self.store, k) for n, k in self._keys.items()}

    def run(
        self, feeds: Mapping[str, Tensor | np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, Tensor]:
        """Run on named inputs; return the graph outputs or the named (intermediate) tensors."""
        env = self._env()
        for k, v in feeds.items():
            env[k] = torch.as_tensor(v)
        missing = [i for i in self.input_names if i not in env]
        if missing:
            raise ValueError(f"missing inputs {missing}")
        keep = frozenset(outputs or ())
        lost = keep & self.fused_away
        if lost:
            raise ValueError(f"{sorted(lost)[:3]} are inside fused steps: build with fuse=False")
        free = not torch.is_grad_enabled()
        self._graph.run(env, keep, free)
        names = list(outputs) if outputs is not None else self.output_names
        return {n: env[n] for n in names}

    def forward(self, *args: Tensor, **kwargs: Tensor) -> Tensor | tuple[Tensor, ...]:
        feeds = dict(zip(self.input_names, args))
        feeds.update(kwargs)
        out = self.run(feeds)
        vals = tuple(out[n] for n in self.output_names)
        return vals[0] if len(vals) == 1 else vals

    def trained_tensors(self) -> dict[str, np.ndarray]:
        """ONNX name -> current value (numpy, the source dtype) of every trainable tensor."""
        out = {}
        for name, p in self.named_onnx_parameters():
            out[name] = p.detach().cpu().numpy().astype(self.sources[name].dtype, copy=False)
        return out
