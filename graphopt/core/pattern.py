"""Rewrite rules: a pattern, a check, a rewrite; and the engine that applies them safely.

A pattern is a tree of :class:`Op` nodes matched upwards from a *root* node (the last node of the
match) through its inputs. Leaves are :class:`Var` (any tensor, captured by name; a name used twice
must bind the same tensor, which expresses DAG patterns such as ``x * Clip(x + 3, 0, 6) / 6``) and
:class:`Const` (a constant tensor, optionally with a predicate on its values).

The engine, not each rule, guarantees that a rewrite never crosses an escaping value:

* every tensor produced inside the match, except the root's outputs, must be consumed only by nodes
  of the match and must not be a graph output (also checked against subgraph readers);
* every constant a rule declares it *modifies* (``Rule.modifies``) must be a constant (not a graph
  input) with no consumer outside the match (not shared).

A rule's ``rewrite`` receives the match and the root's output tensors, already detached from the
root, and returns the new nodes that produce exactly those tensors (names and graph outputs are
kept); they take the root's place in the node order.

Matching details: :class:`Opt` marks an optional input (absent, or the empty name, matches and
binds nothing; present, it must match the inner pattern); the inputs of commutative ops (Add, Mul,
Max, Min, Sum, And, Or, Xor, Equal with two inputs) are also tried in the other order unless the
pattern says ``commutative=False``. A rule's ``check`` may return a :class:`Refusal` (falsy) that
says why it declined; the engine logs every refusal, its own escaping-value ones included, at
DEBUG. Rules are instances: a rule class can be instantiated with its own pattern and name.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.core.graph import local_topo_order
from graphopt.core.model import Model
from graphopt.core.pass_manager import Pass, PassResult

logger = logging.getLogger(__name__)


#: ops whose two inputs may be swapped (the engine tries both orders unless told otherwise)
COMMUTATIVE_OPS: frozenset[str] = frozenset(
    {"Add", "Mul", "Max", "Min", "Sum", "And", "Or", "Xor", "Equal"}
)


class Pattern:
    """Base class of pattern nodes."""


@dataclass
class Var(Pattern):
    """Any tensor (variable or constant), captured as ``name``."""

    name: str


@dataclass
class Const(Pattern):
    """A constant tensor (``gs.Constant``), captured as ``name``; ``pred(values)`` must hold."""

    name: str
    pred: Callable[[np.ndarray], bool] | None = None


@dataclass
class Opt(Pattern):
    """An optional input: a missing input (fewer inputs, or the empty name) matches and binds
    nothing; a present one must match ``pattern`` (a str is shorthand for ``Var(str)``)."""

    pattern: Pattern | str


@dataclass
class Op(Pattern):
    """A node of type ``op`` (or one of several) whose inputs match ``inputs``.

    Args:
        op: op type or tuple of op types.
        inputs: input patterns (a str is shorthand for ``Var(str)``); ``None`` matches anything;
            :class:`Opt` an optional input.
        name: capture the node under this name.
        attrs: predicate on the node's attribute dict.
        commutative: also try the two inputs swapped. None (default): when every op type of the
            pattern is in :data:`COMMUTATIVE_OPS`.
        extra_inputs: allow the node to have more inputs than patterns (trailing optional inputs).
        domain: node domain ('' means the default ONNX domain).
    """

    op: str | tuple[str, ...]
    inputs: Sequence[Pattern | str | None] = ()
    name: str | None = None
    attrs: Callable[[dict[str, Any]], bool] | None = None
    commutative: bool | None = None
    extra_inputs: bool = False
    domain: str = ""

    @property
    def swaps(self) -> bool:
        """Whether the two inputs are also tried in the other order."""
        if len(self.inputs) != 2:
            return False
        if self.commutative is not None:
            return self.commutative
        ops = (self.op,) if isinstance(self.op, str) else self.op
        return self.domain in ("", "ai.onnx") and all(o in COMMUTATIVE_OPS for o in ops)


def scalar(value: float | None = None, tol: float = 1e-6) -> Callable[[np.ndarray], bool]:
    """Predicate: a single-element constant (equal to ``value`` when given)."""

    def pred(v: np.ndarray) -> bool:
        if v.size != 1:
            return False
        return value is None or bool(
            abs(float(v.reshape(-1)[0]) - value) <= tol * max(1, abs(value))
        )

    return pred


@dataclass
class Match:
    """The result of matching a pattern at a root node."""

    root: gs.Node
    nodes: list[gs.Node] = field(default_factory=list)
    tensors: dict[str, gs.Tensor] = field(default_factory=dict)
    named_nodes: dict[str, gs.Node] = field(default_factory=dict)
    graph: gs.Graph | None = None

    def __getitem__(self, key: str) -> Any:
        if key in self.tensors:
            return self.tensors[key]
        return self.named_nodes[key]

    def value(self, key: str) -> np.ndarray:
        """The values of a captured constant."""
        t = self.tensors[key]
        assert isinstance(t, gs.Constant)
        return np.asarray(t.values)

    def copy(self) -> Match:
        return Match(
            self.root, list(self.nodes), dict(self.tensors), dict(self.named_nodes), self.graph
        )


def _producer(t: gs.Tensor) -> gs.Node | None:
    return t.inputs[0] if len(t.inputs) == 1 else None


def match_pattern(pattern: Op, node: gs.Node) -> Match | None:
    """Match ``pattern`` with ``node`` as the root; return the first consistent match or None."""
    for m in _match_op(pattern, node, Match(root=node)):
        return m
    return None


def _node_ok(p: Op, node: gs.Node) -> bool:
    ops = (p.op,) if isinstance(p.op, str) else p.op
    if node.op not in ops:
        return False
    if (node.domain or "") not in (p.domain, "ai.onnx" if p.domain == "" else p.domain):
        return False
    if p.attrs is not None and not p.attrs(node.attrs):
        return False
    n_in = len(node.inputs)
    required = len(p.inputs)
    while required and isinstance(p.inputs[required - 1], Opt):
        required -= 1
    if n_in < required or (n_in > len(p.inputs) and not p.extra_inputs):
        return False
    return True


def _match_op(p: Op, node: gs.Node, m: Match) -> Iterable[Match]:
    if not _node_ok(p, node) or any(n is node for n in m.nodes):
        return
    m = m.copy()
    m.nodes.append(node)
    if p.name:
        m.named_nodes[p.name] = node
    orders: list[Sequence[Pattern | str | None]] = [p.inputs]
    if p.swaps:
        orders.append([p.inputs[1], p.inputs[0]])
    for order in orders:
        yield from _match_inputs(list(order), list(node.inputs), m)


def _match_inputs(
    pats: list[Pattern | str | None], tensors: list[gs.Tensor], m: Match
) -> Iterable[Match]:
    if not pats:
        yield m
        return
    p = pats[0]
    if not tensors:  # only optional patterns are left (checked by _node_ok)
        if isinstance(p, Opt):
            yield from _match_inputs(pats[1:], tensors, m)
        return
    for m2 in _match_tensor(p, tensors[0], m):
        yield from _match_inputs(pats[1:], tensors[1:], m2)


def _match_tensor(p: Pattern | str | None, t: gs.Tensor, m: Match) -> Iterable[Match]:
    if p is None:
        yield m
        return
    if isinstance(p, Opt):
        if not t.name:  # an omitted optional input
            yield m
            return
        p = p.pattern
    if isinstance(p, str):
        p = Var(p)
    if isinstance(p, Var):
        bound = m.tensors.get(p.name)
        if bound is None:
            m2 = m.copy()
            m2.tensors[p.name] = t
            yield m2
        elif bound is t:
            yield m
        return
    if isinstance(p, Const):
        if not isinstance(t, gs.Constant):
            return
        bound = m.tensors.get(p.name)
        if bound is not None and bound is not t:
            return
        if p.pred is not None:
            try:
                if not p.pred(np.asarray(t.values)):
                    return
            except Exception:  # noqa: BLE001 - a predicate that cannot judge says no
                return
        m2 = m.copy()
        m2.tensors[p.name] = t
        yield m2
        return
    if isinstance(p, Op):
        prod = _producer(t) if isinstance(t, gs.Variable) else None
        if prod is None:
            return
        yield from _match_op(p, prod, m)
        return
    raise TypeError(f"bad pattern element {p!r}")


class Refusal:
    """A check's "no" with its reason; falsy, so ``if not rule.check(m)`` reads as before.

    Example::

        def check(self, m):
            if m.value("w").ndim != 2:
                return Refusal("weight is not 2-D")
            return True
    """

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"Refusal({self.reason!r})"


class Rule:
    """A rewrite rule: ``name``, ``pattern``, ``modifies`` and ``rewrite`` (and maybe ``check``).

    Subclasses set them as class attributes, or pass them to the constructor to make several rules
    of one class with their own patterns (``FoldBias(Op("Conv", ...), name="fold-conv")``).

    Attributes:
        modifies: names of captured constants whose values the rewrite replaces; the engine refuses
            a match where one of them is shared with nodes outside the match or is not a constant.
    """

    name: str = ""
    pattern: Op
    modifies: tuple[str, ...] = ()

    def __init__(
        self,
        pattern: Op | None = None,
        name: str | None = None,
        modifies: Sequence[str] | None = None,
    ) -> None:
        if pattern is not None:
            self.pattern = pattern
        if name is not None:
            self.name = name
        if modifies is not None:
            self.modifies = tuple(modifies)

    def check(self, m: Match) -> bool | Refusal:
        """Extra conditions (shapes, attributes, values). Return True to rewrite, a
        :class:`Refusal` (or False) to skip this match."""
        return True

    def rewrite(self, m: Match, outputs: list[gs.Variable]) -> list[gs.Node]:
        """Return new nodes producing ``outputs`` (the root's outputs, detached from it)."""
        raise NotImplementedError


def _graph_output_ids(graph: gs.Graph) -> set[int]:
    return {id(t) for t in graph.outputs}


def escape_reason(m: Match, graph: gs.Graph, modifies: Sequence[str] = ()) -> str | None:
    """Why the match may not be rewritten, or None if it may."""
    inside = {id(n) for n in m.nodes}
    outs = _graph_output_ids(graph)
    for n in m.nodes:
        if n is m.root:
            continue
        for o in n.outputs:
            if id(o) in outs:
                return f"inner tensor '{o.name}' is a graph output"
            for c in o.outputs:
                if id(c) not in inside:
                    return f"inner tensor '{o.name}' is also used by '{c.name}' ({c.op})"
    for key in modifies:
        t = m.tensors.get(key)
        if t is None:
            continue
        if not isinstance(t, gs.Constant):
            return f"weight '{t.name}' is not a constant (graph input or computed)"
        for c in t.outputs:
            if id(c) not in inside:
                return f"weight '{t.name}' is shared with '{c.name}' ({c.op})"
    return None


class RuleSet:
    """Rules indexed by the op type(s) of their root."""

    def __init__(self, rules: Iterable[Rule]) -> None:
        self.rules = list(rules)
        self.by_op: dict[str, list[Rule]] = {}
        for r in self.rules:
            ops = (r.pattern.op,) if isinstance(r.pattern.op, str) else r.pattern.op
            for op in ops:
                self.by_op.setdefault(op, []).append(r)

    def apply(self, graph: gs.Graph, stats: dict[str, int]) -> int:
        """One sweep over ``graph`` (not its subgraphs). Returns the number of rewrites."""
        count = 0
        dead: set[int] = set()
        created_at: dict[int, list[gs.Node]] = {}  # root id -> the nodes that replace the match
        local = {id(n) for n in graph.nodes}
        for node in list(graph.nodes):
            if id(node) in dead:
                continue
            for rule in self.by_op.get(node.op, ()):
                m = match_pattern(rule.pattern, node)
                if m is None or any(id(n) in dead or id(n) not in local for n in m.nodes):
                    continue  # overlapping an earlier rewrite, or reaching into an outer graph
                m.graph = graph
                why = escape_reason(m, graph, rule.modifies)
                if why is not None:
                    logger.debug("%s: skip at %s: %s", rule.name, node.name, why)
                    continue
                verdict = rule.check(m)
                if not verdict:
                    reason = verdict.reason if isinstance(verdict, Refusal) else "check failed"
                    logger.debug("%s: check refused at %s: %s", rule.name, node.name, reason)
                    continue
                outputs = list(node.outputs)
                for n in m.nodes:
                    n.outputs.clear()
                    n.inputs.clear()
                    dead.add(id(n))
                created_at[id(node)] = rule.rewrite(m, outputs)
                stats[rule.name] = stats.get(rule.name, 0) + 1
                count += 1
                break
        if count:
            # the new nodes take the root's place: the match's inputs are computed before it and
            # its outputs read after it, so the order stays valid and nothing else moves (the
            # stable sort below only repairs a rule that reads tensors computed later)
            order: list[gs.Node] = []
            for n in graph.nodes:
                order.extend(created_at.get(id(n), ()))
                if id(n) not in dead:
                    order.append(n)
            graph.nodes = order
            graph.cleanup(remove_unused_graph_inputs=False, recurse_subgraphs=False)
            graph.nodes = local_topo_order(graph)
        return count


class RewritePass(Pass):
    """A pass made of rewrite rules, applied to every graph (subgraphs included) to a fixed
    point."""

    rules: ClassVar[Sequence[Rule]] = ()
    max_sweeps: ClassVar[int] = 20

    def rule_set(self) -> RuleSet:
        return RuleSet(self.rules)

    def call(self, model: Model) -> PassResult:
        rs = self.rule_set()
        stats: dict[str, int] = {}
        total = 0
        for graph in list(model.walk_graphs()):
            for _ in range(self.max_sweeps):
                n = rs.apply(graph, stats)
                total += n
                if not n:
                    break
        return PassResult(model, total > 0, stats)


def const_value(t: gs.Tensor | None) -> np.ndarray | None:
    """The value of ``t`` when it is a constant (an initializer or a folded value), else None."""
    return np.asarray(t.values) if isinstance(t, gs.Constant) else None


def node_axes(node: gs.Node) -> list[int] | None:
    """The axes of a Squeeze/Unsqueeze/Reduce* node as written (attribute before opset 13,
    constant second input after; negative axes kept); None when absent or not constant."""
    if "axes" in node.attrs:
        return [int(a) for a in node.attrs["axes"]]
    if len(node.inputs) > 1:
        v = const_value(node.inputs[1])
        return None if v is None else [int(a) for a in v.reshape(-1)]
    return None


def normalize_axes(axes: Sequence[int] | None, rank: int | None) -> list[int] | None:
    """``axes`` made non-negative against ``rank`` and sorted; None when ``axes`` is None, or has
    a negative axis and the rank is unknown."""
    if axes is None:
        return None
    if any(a < 0 for a in axes):
        if rank is None:
            return None
        axes = [a + rank if a < 0 else a for a in axes]
    return sorted(int(a) for a in axes)


def const_int_vector(node: gs.Node, i: int) -> np.ndarray | None:
    """Input ``i`` of ``node`` as int64 (None when it is not a constant integer vector)."""
    if i >= len(node.inputs) or node.inputs[i].is_empty():
        return None
    t = node.inputs[i]
    if not isinstance(t, gs.Constant):
        return None
    v = np.asarray(t.values)
    if v.dtype.kind not in "iu" or v.ndim != 1:
        return None
    return v.astype(np.int64)


def slice_parts(node: gs.Node, rank: int) -> tuple[np.ndarray, ...] | None:
    """(starts, ends, axes normalized, steps) of a Slice (opset >= 10) with constant parameters,
    all int64 vectors of one length; None otherwise."""
    if node.op != "Slice" or node.domain not in ("", "ai.onnx", None) or len(node.inputs) < 3:
        return None
    starts, ends = const_int_vector(node, 1), const_int_vector(node, 2)
    if starts is None or ends is None or len(starts) != len(ends):
        return None
    has_axes = len(node.inputs) > 3 and not node.inputs[3].is_empty()
    axes = const_int_vector(node, 3) if has_axes else np.arange(len(starts), dtype=np.int64)
    has_steps = len(node.inputs) > 4 and not node.inputs[4].is_empty()
    steps = const_int_vector(node, 4) if has_steps else np.ones(len(starts), np.int64)
    if axes is None or steps is None or not len(axes) == len(steps) == len(starts):
        return None
    axes = np.where(axes < 0, axes + rank, axes)
    if np.any(axes < 0) or np.any(axes >= rank) or len(set(axes.tolist())) != len(axes):
        return None
    if np.any(steps == 0):
        return None
    return starts, ends, axes, steps
