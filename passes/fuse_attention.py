"""Scaled-dot-product attention -> one fused attention node.

The subgraph every exporter writes for multi-head attention (``N`` heads of size ``H``)::

    q = Transpose(Reshape(Q, [B, S, N, H]), [0, 2, 1, 3])          (Q = x Wq [+ bq], maybe * c)
    k = Transpose(Reshape(K, [B, T, N, H]), [0, 2, 3, 1])          (or [0, 2, 1, 3] then a
                                                                    last-two-axes transpose)
    v = Transpose(Reshape(V, [B, T, N, H]), [0, 2, 1, 3])
    p = Softmax((q k) * c [+ mask], axis=-1)                        (scale by Mul or Div, on the
                                                                    scores or on q and k apart)
    y = Reshape(Transpose(p v, [0, 2, 1, 3]), [B, S, N * H])

computes ``y = concat_heads(softmax(c * Q_h K_h^T + mask) V_h)``, which is what onnxruntime's
``com.microsoft.MultiHeadAttention(Q, K, V, attention_bias=mask, num_heads=N, scale=c)`` and
the ONNX ``Attention`` op (opset 23) compute in one kernel. Scale factors found on the scores, on
``q`` and on ``k`` multiply into ``c``. Variants recognized:

* mask: none, or an additive float mask of shape ``(B|1, N|1, S, T)`` (the BERT/GPT-2 mask built
  from ``attention_mask``; it becomes ``attention_bias``); a ``(B|1, 1, 1, T)`` padding mask of
  self-attention is expanded to ``(B|1, 1, T, T)`` once per mask (``attention_bias`` does not
  broadcast over the queries); ``Where(IsNaN(p), 0, p)`` after the Softmax (transformers' SDPA
  export) is absorbed;
* causal: ``Where(Slice(tril), scores, fill)`` of a constant lower-triangular matrix (GPT-2's
  older exports). Without a mask: ``unidirectional=1`` (portable: ``is_causal``) only when
  ``S == T``, since ONNX aligns the triangle to the upper left and onnxruntime counts only a past
  given as ``past_key``. With a mask the triangle goes into the bias, exactly:
  ``Where(tri, s, fill) + mask == s + Where(tri, mask, fill + mask)`` up to the ``s`` on
  masked entries, which the softmax gives weight ``exp(fill)`` either way (onnxruntime ignores
  ``unidirectional`` when an ``attention_bias`` is given);
* past key/values and multi-/grouped-query attention: when K or V is not a head reshape of a 3-D
  tensor (``Concat(past, k)`` whose result is a graph output ``present``, or a repeat_kv
  ``Expand``/``Reshape``/``Tile``), the 4-D ``(B, N, T, H)`` tensor is the fused node's key/value
  input and the Concat or repeat stays in the graph, so the ``present`` outputs are kept as they
  were.

Exact up to float rounding everywhere except on a query row whose every key is masked (there the
kernels' softmax weighs the masked keys by their scores, the SDPA graph returns 0).

Emission, ``target='ort'`` (onnxruntime 1.32 CPU): when Q, K and V are ``MatMul``s (``+ bias``)
of one input with constant weights, ``com.microsoft.Attention`` with the three weights packed into
one ``(D, 3D)`` matrix (one GEMM instead of three; on the corpus BERT, 4x64 tokens, one thread,
0.98x the latency of MultiHeadAttention after three MatMuls, within the noise of a shared
machine); otherwise ``com.microsoft.MultiHeadAttention`` on the projected Q, K, V.
``GroupQueryAttention`` is not emitted: its CPU kernel needs ``seqlens_k`` and
``total_sequence_length`` inputs and its own KV-cache layout, which the exported graphs do not
have; grouped K/V go to MultiHeadAttention after the model's own repeat. Float32 only.

``target='portable'``: the ONNX ``Attention`` op only when the model's opset is at least 23 and the
installed onnxruntime runs it; otherwise nothing changes (the reason is logged at DEBUG).

Every emitted op is checked with :func:`graphopt.core.kernels.ort_runs` first. Shapes (static or
symbolic, from :func:`graphopt.core.shapes.infer_shapes`) prove the head reshapes keep the batch and
sequence dims; a match with an unknown dim is left alone.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.core.errors import OptionError
from graphopt.core.graph import const, local_topo_order, make_node, node_subgraphs
from graphopt.core.kernels import ort_runs
from graphopt.core.model import Model
from graphopt.core.pass_manager import Pass, PassResult, register_pass
from graphopt.core.pattern import Match, Refusal, escape_reason
from graphopt.core.shapes import infer_shapes

logger = logging.getLogger(__name__)

TARGETS = ("ort", "portable")
MS = "com.microsoft"
#: a Where fill value at or below this is a mask (-10000 and finfo.min are what exporters use)
MASK_FILL_MAX = -1e3


# ---------------------------------------------------------------------------------- helpers


def _prod(t: gs.Tensor) -> gs.Node | None:
    return t.inputs[0] if isinstance(t, gs.Variable) and len(t.inputs) == 1 else None


def _dims(t: gs.Tensor) -> list[Any] | None:
    shape = t.shape
    if shape is None:
        return None
    return list(shape)


def _known(d: Any) -> bool:
    return bool((isinstance(d, (int, np.integer)) and d >= 0) or (isinstance(d, str) and d))


def _same(a: Any, b: Any) -> bool:
    return _known(a) and _known(b) and a == b


def _f32(t: gs.Tensor) -> bool:
    if isinstance(t, gs.Constant):
        return np.asarray(t.values).dtype == np.float32
    return t.dtype is not None and np.dtype(t.dtype) == np.float32


def _const_values(t: gs.Tensor) -> np.ndarray | None:
    """The values of a constant, or of the output of a ``Constant`` node."""
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    p = _prod(t)
    if p is not None and p.op == "Constant" and isinstance(p.attrs.get("value"), gs.Constant):
        return np.asarray(p.attrs["value"].values)
    return None


def _scalar(t: gs.Tensor) -> float | None:
    v = _const_values(t)
    if v is None:
        return None
    if v.size != 1 or not np.issubdtype(v.dtype, np.floating):
        return None
    f = float(v.reshape(-1)[0])
    return f if np.isfinite(f) else None


def _scale_node(n: gs.Node) -> tuple[gs.Tensor, float] | None:
    """``Mul(x, c)``/``Mul(c, x)``/``Div(x, c)`` with a finite non-zero scalar ``c``:
    ``(x, factor)``."""
    if n.op not in ("Mul", "Div") or len(n.inputs) != 2 or (n.domain or "") not in ("", "ai.onnx"):
        return None
    a, b = n.inputs
    c = _scalar(b)
    if c is not None and c != 0.0 and _const_values(a) is None:
        return a, (c if n.op == "Mul" else 1.0 / c)
    if n.op == "Mul":
        c = _scalar(a)
        if c is not None and c != 0.0 and _const_values(b) is None:
            return b, c
    return None


def _perm(n: gs.Node | None, perm: list[int]) -> bool:
    return n is not None and n.op == "Transpose" and list(n.attrs.get("perm", [])) == perm


def _split_heads(r: gs.Node) -> tuple[int, int] | None:
    """``(N, H)`` when Reshape ``r`` maps ``(B, S, N*H)`` to ``(B, S, N, H)`` (dims from shapes)."""
    if r.op != "Reshape":
        return None
    i, o = _dims(r.inputs[0]), _dims(r.outputs[0])
    if i is None or o is None or len(i) != 3 or len(o) != 4:
        return None
    n, h = o[2], o[3]
    if not (isinstance(n, int) and isinstance(h, int) and n > 0 and h > 0):
        return None
    if not (_same(i[0], o[0]) and _same(i[1], o[1])):
        return None
    if isinstance(i[2], int) and i[2] != n * h:
        return None
    return n, h


def _plain_reshape(r: gs.Node) -> bool:
    """A Reshape whose target is a constant without copied (0) dims: its result does not depend
    on the rank of its input, only on the elements' order."""
    s = r.inputs[1]
    if not isinstance(s, gs.Constant):
        return False
    return bool(r.attrs.get("allowzero", 0)) or not bool((np.asarray(s.values) == 0).any())


def _merge_heads(r: gs.Node, n_heads: int, head: int) -> bool:
    """Whether Reshape ``r`` maps ``(B, S, N, H)`` to ``(B, S, N*H)``."""
    if r.op != "Reshape":
        return False
    i, o = _dims(r.inputs[0]), _dims(r.outputs[0])
    if i is None or o is None or len(i) != 4 or len(o) != 3:
        return False
    return _same(i[0], o[0]) and _same(i[1], o[1]) and o[2] == n_heads * head


def _consumers(t: gs.Tensor) -> list[gs.Node]:
    return list(t.outputs)


@dataclass
class Feed:
    """One way to give Q, K or V to the fused node.

    Attributes:
        tensor: the tensor given.
        rank: 3 (``(B, S, N*H)``) or 4 (``(B, N, S, H)``).
        nodes: the nodes between ``tensor`` and the attention core that the fusion absorbs.
        scale: the product of the scale factors among ``nodes``.
        heads: number of heads, head size (None where the shape does not say).
    """

    tensor: gs.Tensor
    rank: int
    nodes: list[gs.Node]
    scale: float = 1.0
    heads: tuple[int, int] | None = None


def _bnsh_heads(t: gs.Tensor) -> tuple[int, int] | None:
    d = _dims(t)
    if d is None or len(d) != 4 or not isinstance(d[1], int) or not isinstance(d[3], int):
        return None
    return int(d[1]), int(d[3])


def _feeds_of(t4: gs.Tensor, allow_scale: bool) -> list[Feed]:
    """The ways to feed a ``(B, N, S, H)`` operand, shallowest first: the 4-D tensor itself, after
    each absorbed scale, and the 3-D tensor before its head split (``Transpose(Reshape(x))``)."""
    out = [Feed(t4, 4, [], 1.0, _bnsh_heads(t4))]
    nodes: list[gs.Node] = []
    cur, scale = t4, 1.0
    while True:
        p = _prod(cur)
        if p is None:
            return out
        sc = _scale_node(p) if allow_scale else None
        if sc is not None:
            cur, nodes, scale = sc[0], [*nodes, p], scale * sc[1]
            out.append(Feed(cur, 4, nodes, scale, _bnsh_heads(cur)))
            continue
        if _perm(p, [0, 2, 1, 3]):
            r = _prod(p.inputs[0])
            nh = _split_heads(r) if r is not None else None
            if r is not None and nh is not None:
                _three_d(r.inputs[0], [*nodes, p, r], scale, nh, allow_scale, out)
        return out


def _three_d(
    x: gs.Tensor, nodes: list[gs.Node], scale: float, nh: tuple[int, int], allow: bool, out: list
) -> None:
    out.append(Feed(x, 3, nodes, scale, nh))
    p = _prod(x)
    sc = _scale_node(p) if (allow and p is not None) else None
    if p is not None and sc is not None:
        out.append(Feed(sc[0], 3, [*nodes, p], scale * sc[1], nh))


def _key_feeds(kt: gs.Tensor) -> list[Feed]:
    """Ways to feed K from ``kt = K_h^T`` of shape ``(B, N, H, T)``."""
    nodes: list[gs.Node] = []
    cur, scale = kt, 1.0
    while True:
        p = _prod(cur)
        if p is None:
            return []
        sc = _scale_node(p)
        if sc is None:
            break
        cur, nodes, scale = sc[0], [*nodes, p], scale * sc[1]
    out: list[Feed] = []
    if _perm(p, [0, 2, 3, 1]):  # Transpose(Reshape(K)) straight to (B, N, H, T)
        r = _prod(p.inputs[0])
        nh = _split_heads(r) if r is not None else None
        if r is not None and nh is not None:
            _three_d(r.inputs[0], [*nodes, p, r], scale, nh, True, out)
        return out
    inner = _last_two_swap(p)
    if inner is None:
        return out
    x, swap_nodes = inner
    for f in _feeds_of(x, allow_scale=True):
        out.append(
            Feed(f.tensor, f.rank, [*nodes, *swap_nodes, *f.nodes], scale * f.scale, f.heads)
        )
    return out


def _last_two_swap(p: gs.Node) -> tuple[gs.Tensor, list[gs.Node]] | None:
    """``(x, nodes)`` when ``p`` ends a swap of the last two axes of 4-D ``x``: a Transpose
    ``[0, 1, 3, 2]``, or Reshape(Transpose(Reshape(x, [B*N, T, H]), [0, 2, 1]), [B, N, H, T])."""
    if _perm(p, [0, 1, 3, 2]):
        return p.inputs[0], [p]
    if p.op != "Reshape":
        return None
    tr = _prod(p.inputs[0])
    if not _perm(tr, [0, 2, 1]):
        return None
    assert tr is not None
    r1 = _prod(tr.inputs[0])
    if r1 is None or r1.op != "Reshape":
        return None
    x = r1.inputs[0]
    xd, md, od = _dims(x), _dims(r1.outputs[0]), _dims(p.outputs[0])
    if xd is None or md is None or od is None or len(xd) != 4 or len(md) != 3 or len(od) != 4:
        return None
    if not (_same(xd[0], od[0]) and _same(xd[1], od[1])):
        return None
    if not (_same(xd[2], od[3]) and _same(xd[3], od[2]) and _same(md[1], xd[2])):
        return None
    if not _same(md[2], xd[3]):
        return None
    return x, [p, tr, r1]


def _is_tril(t: gs.Tensor) -> bool:
    """A constant lower-triangular 0/1 matrix (any leading 1 dims), walked back through Slices
    and Casts."""
    seen = 0
    while isinstance(t, gs.Variable) and seen < 8:
        p = _prod(t)
        if p is None or p.op not in ("Slice", "Cast"):
            return False
        if p.op == "Slice":
            axes = p.inputs[3] if len(p.inputs) > 3 else None
            if axes is None or not isinstance(axes, gs.Constant):
                return False
            if not set(np.asarray(axes.values).reshape(-1).tolist()) <= {2, 3, -1, -2}:
                return False
        t, seen = p.inputs[0], seen + 1
    if not isinstance(t, gs.Constant):
        return False
    v = np.asarray(t.values)
    if v.ndim < 2 or v.shape[-1] != v.shape[-2] or any(d != 1 for d in v.shape[:-2]):
        return False
    m = v.reshape(v.shape[-2:]).astype(np.float64)
    return bool(np.array_equal(m, np.tril(np.ones_like(m))))


# ---------------------------------------------------------------------------------- matching


@dataclass
class Found:
    """An attention block, as parsed from its Softmax."""

    core: list[gs.Node]
    q_feeds: list[Feed]
    k_feeds: list[Feed]
    v_feeds: list[Feed]
    scale: float
    scores: gs.Tensor
    output: gs.Tensor
    root: gs.Node
    mask: gs.Tensor | None = None
    causal: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def extra_inputs(self) -> list[gs.Tensor]:
        """Tensors besides Q, K, V that the fused node reads: the mask, and with a mask the
        causal triangle (folded into the bias; without a mask the triangle is an attribute)."""
        if self.mask is None:
            return []
        cond = self.extra.get("causal_cond")
        return [self.mask, cond] if cond is not None else [self.mask]


def parse(sm: gs.Node, opset: int) -> Found | Refusal:
    """Parse the attention block around Softmax ``sm``."""
    if opset < 13:
        return Refusal("Softmax before opset 13 flattens its input")
    x = sm.inputs[0]
    d = _dims(x)
    if d is None or len(d) != 4:
        return Refusal("scores are not known to be 4-D")
    axis = int(sm.attrs.get("axis", -1))
    if axis not in (-1, 3):
        return Refusal(f"Softmax on axis {axis}, not the last")
    core: list[gs.Node] = [sm]
    mask: gs.Tensor | None = None
    causal = False
    causal_where: gs.Node | None = None
    scale = 1.0
    p = _prod(x)
    if p is not None and p.op == "Add" and len(p.inputs) == 2:
        for a, b in ((0, 1), (1, 0)):
            if _leads_to_scores(p.inputs[a]):
                mask, x = p.inputs[b], p.inputs[a]
                core.append(p)
                break
        else:
            return Refusal("Add before Softmax adds no recognizable scores")
        p = _prod(x)
    if p is not None and p.op == "Where" and len(p.inputs) == 3:
        fill = _scalar(p.inputs[2])
        fv = _const_values(p.inputs[2])
        if fill is None and fv is not None and fv.size == 1 and np.isneginf(fv).all():
            fill = -np.inf
        if fill is None or fill > MASK_FILL_MAX or not _is_tril(p.inputs[0]):
            return Refusal("Where before Softmax is not a causal triangle")
        causal = True
        causal_where = p
        core.append(p)
        x = p.inputs[1]
        p = _prod(x)
    while p is not None and _scale_node(p) is not None:
        sc = _scale_node(p)
        assert sc is not None
        x, scale = sc[0], scale * sc[1]
        core.append(p)
        p = _prod(x)
    if p is None or p.op != "MatMul":
        return Refusal("scores are not a MatMul (or the scale is not a constant)")
    qk = p
    core.append(qk)
    # after the Softmax: [Where(IsNaN(p), 0, p)] [Cast to float] MatMul(p, v)
    probs = sm.outputs[0]
    cons = _consumers(probs)
    if len(cons) == 2 and {c.op for c in cons} == {"IsNaN", "Where"}:
        isnan = next(c for c in cons if c.op == "IsNaN")
        where = next(c for c in cons if c.op == "Where")
        z = _scalar(where.inputs[1])
        if (
            where.inputs[0] is not isnan.outputs[0]
            or where.inputs[2] is not probs
            or z is None
            or z != 0.0
        ):
            return Refusal("IsNaN/Where after Softmax is not the NaN-to-zero guard")
        core += [isnan, where]
        probs = where.outputs[0]
        cons = _consumers(probs)
    if len(cons) == 1 and cons[0].op == "Cast" and _f32(cons[0].outputs[0]) and _f32(probs):
        core.append(cons[0])
        probs = cons[0].outputs[0]
        cons = _consumers(probs)
    if len(cons) != 1 or cons[0].op != "MatMul" or cons[0].inputs[0] is not probs:
        return Refusal("the probabilities feed something else than one MatMul with V")
    pv = cons[0]
    # other readers (Shape) of the two tensors below must die with the match (checked later)
    tr = next((c for c in _consumers(pv.outputs[0]) if _perm(c, [0, 2, 1, 3])), None)
    if tr is None:
        return Refusal("the attention output is not transposed back to (B, S, N, H)")
    rs = next((c for c in _consumers(tr.outputs[0]) if c.op == "Reshape"), None)
    if rs is None or rs.inputs[0] is not tr.outputs[0]:
        return Refusal("the attention output is not reshaped to (B, S, N*H)")
    core += [pv, tr, rs]
    return Found(
        core=core,
        q_feeds=_feeds_of(qk.inputs[0], allow_scale=True),
        k_feeds=_key_feeds(qk.inputs[1]),
        v_feeds=_feeds_of(pv.inputs[1], allow_scale=False),
        scale=scale,
        scores=qk.outputs[0],
        output=rs.outputs[0],
        root=rs,
        mask=mask,
        causal=causal,
        extra={"causal_cond": causal_where.inputs[0], "fill": fill}
        if causal_where is not None
        else {},
    )


def _leads_to_scores(t: gs.Tensor) -> bool:
    p = _prod(t)
    for _ in range(4):
        if p is None:
            return False
        if p.op == "MatMul":
            return True
        if p.op == "Where" and len(p.inputs) == 3:
            t = p.inputs[1]
        else:
            sc = _scale_node(p)
            if sc is None:
                return False
            t = sc[0]
        p = _prod(t)
    return False


# ---------------------------------------------------------------------------------- planning


@dataclass
class Plan:
    """What to emit for one attention block."""

    op: str  # "Attention" (packed, ort), "MultiHeadAttention" (ort), "OnnxAttention" (portable)
    q: Feed
    k: Feed
    v: Feed
    nodes: list[gs.Node]
    num_heads: int
    head_size: int
    kv_heads: int
    scale: float
    packed: tuple[gs.Tensor, list[gs.Tensor], list[gs.Tensor | None]] | None = None
    #: the Reshape after the head merge is kept (it reshapes to 2-D, say) and reads the fused
    #: node's ``(B, S, N*H)`` output instead of the ``(B, S, N, H)`` transpose
    keep_reshape: bool = False


def _mask_ok(f: Found, n_heads: int) -> bool | Refusal:
    """True when the mask can be ``attention_bias``; sets ``f.extra["expand"]`` when it must
    first be expanded over the query axis (a ``(B, 1, 1, T)`` padding mask of self-attention)."""
    if f.mask is None:
        return True
    if f.causal and _f32(f.mask):
        return True  # Where(tri, mask, mask + fill) is (B|1, 1, S, T) whatever the mask's S
    md, sd = _dims(f.mask), _dims(f.scores)
    if md is None or sd is None or len(md) != 4:
        return Refusal("mask is not known to be 4-D")
    if not _f32(f.mask):
        return Refusal("mask is not float32")
    if md[2] == 1 and sd[2] != 1:
        if not _same(sd[2], sd[3]):
            return Refusal("mask is broadcast over the queries and S != T")
        f.extra["expand"] = True  # to (B, 1, T, T), T read from the mask's own shape
    elif not _same(md[2], sd[2]):
        return Refusal("mask's query axis is not the scores' query axis")
    if not _same(md[3], sd[3]):
        return Refusal("mask's key axis is not the scores' key axis")
    if md[1] not in (1, n_heads) or not (md[0] == 1 or _same(md[0], sd[0])):
        return Refusal("mask is not (B|1, N|1, S, T)")
    return True


def _packed_qkv(
    q: Feed, k: Feed, v: Feed
) -> tuple[gs.Tensor, list[gs.Tensor], list[gs.Tensor | None], list[gs.Node]] | None:
    """``(x, [Wq, Wk, Wv], [bq, bk, bv], nodes)`` when Q, K, V are ``x @ W [+ b]`` of one ``x``."""
    xs: list[gs.Tensor] = []
    ws: list[gs.Tensor] = []
    bs: list[gs.Tensor | None] = []
    nodes: list[gs.Node] = []
    for f in (q, k, v):
        if f.rank != 3:
            return None
        p = _prod(f.tensor)
        b: gs.Tensor | None = None
        if p is not None and p.op == "Add" and len(p.inputs) == 2:
            for i in (0, 1):
                c = p.inputs[1 - i]
                mm = _prod(p.inputs[i])
                if isinstance(c, gs.Constant) and np.asarray(c.values).ndim == 1 and mm is not None:
                    if mm.op == "MatMul":
                        b, nodes = c, [*nodes, p]
                        p = mm
                        break
        if p is None or p.op != "MatMul" or not isinstance(p.inputs[1], gs.Constant):
            return None
        w = np.asarray(p.inputs[1].values)
        if w.ndim != 2 or w.dtype != np.float32:
            return None
        xs.append(p.inputs[0])
        ws.append(p.inputs[1])
        bs.append(b)
        nodes.append(p)
    if not (xs[0] is xs[1] is xs[2]):
        return None
    xd = _dims(xs[0])
    if xd is None or len(xd) != 3 or not _f32(xs[0]):
        return None
    shapes = {tuple(np.asarray(w.values).shape) for w in ws}
    if len(shapes) != 1:
        return None
    for b, w in zip(bs, ws, strict=True):
        if b is not None and np.asarray(b.values).shape != (np.asarray(w.values).shape[1],):
            return None
    return xs[0], ws, bs, nodes


#: at most this many side nodes (shape computations) are absorbed per block
MAX_SIDE_NODES = 64


def with_dead_side(
    nodes: list[gs.Node], graph: gs.Graph, keep: Sequence[gs.Tensor] = ()
) -> list[gs.Node]:
    """``nodes`` plus the side nodes that only feed them: the Shape/Gather/Concat chains that
    exporters compute reshape targets with read inner tensors, and die with the match (a node
    is added when every reader of each of its outputs is in the set and none is a graph
    output). Nothing that computes a tensor of ``keep`` (what the fused node reads) is added."""
    inside = {id(n) for n in nodes}
    outs = {id(t) for t in graph.outputs} | {id(t) for t in keep}
    frontier = [c for n in nodes for o in n.outputs for c in o.outputs if id(c) not in inside]
    side: list[gs.Node] = []
    seen: set[int] = set()
    while frontier and len(side) < MAX_SIDE_NODES:
        grew = False
        for c in frontier:
            if id(c) in inside or id(c) in seen:
                continue
            closure = _dies_into(c, inside, outs)
            if closure is not None:
                for n in closure:
                    if id(n) not in inside:
                        inside.add(id(n))
                        side.append(n)
                grew = True
            seen.add(id(c))
        if not grew:
            break
        frontier = [c for n in side for o in n.outputs for c in o.outputs if id(c) not in inside]
    return [*nodes, *side]


def _dies_into(start: gs.Node, inside: set[int], outs: set[int]) -> list[gs.Node] | None:
    """The nodes from ``start`` forward when all of them only feed ``inside`` (or each other)."""
    found: list[gs.Node] = []
    ids: set[int] = set()
    stack = [start]
    while stack:
        n = stack.pop()
        if id(n) in ids or id(n) in inside:
            continue
        if len(found) >= MAX_SIDE_NODES or node_subgraphs(n):
            return None
        ids.add(id(n))
        found.append(n)
        for o in n.outputs:
            if id(o) in outs or not o.outputs:
                return None
            stack.extend(o.outputs)
    return found


def plan(f: Found, graph: gs.Graph, target: str, opset: int) -> Plan | Refusal:
    """Choose the feeds and the op for a parsed block (the engine's escape rules apply)."""
    why: Refusal = Refusal("no head reshape of Q found")
    q3 = [q for q in f.q_feeds if q.rank == 3]
    kv3 = [
        (k, v)
        for k in reversed(f.k_feeds)
        if k.rank == 3
        for v in reversed(f.v_feeds)
        if v.rank == 3
    ]
    kv4 = [
        (k, v)
        for k in reversed(f.k_feeds)
        if k.rank == 4
        for v in reversed(f.v_feeds)
        if v.rank == 4
    ]
    for q in reversed(q3):
        assert q.heads is not None
        n, h = q.heads
        keep = not _merge_heads(f.root, n, h)
        if keep and not _plain_reshape(f.root):
            return Refusal("the output Reshape does not merge the heads back to (B, S, N*H)")
        ok = _mask_ok(f, n)
        if not ok:
            return ok if isinstance(ok, Refusal) else Refusal("mask")
        for k, v in kv3 + kv4:
            if not (_f32(q.tensor) and _f32(k.tensor) and _f32(v.tensor)):
                why = Refusal("Q/K/V are not float32 (the fused kernels' CPU type)")
                continue
            if k.heads is None or v.heads is None or k.heads[1] != h or v.heads[1] != h:
                why = Refusal("K/V head size unknown or not Q's")
                continue
            if k.heads[0] != v.heads[0]:
                why = Refusal("K and V have different head counts")
                continue
            kvh = k.heads[0]
            if kvh != n and (target == "ort" or k.rank == 4 or n % kvh):
                why = Refusal(f"{kvh} K/V heads for {n} query heads (grouped query not lowered)")
                continue
            if f.causal and f.mask is None:  # with a mask the triangle goes into the bias
                sd = _dims(f.scores)
                if sd is None or not _same(sd[2], sd[3]):
                    # ONNX Attention's is_causal is upper-left aligned, and onnxruntime's
                    # unidirectional counts only the past it is given as past_key
                    why = Refusal("causal with S != T and no mask to carry the triangle")
                    continue
            scale = f.scale * q.scale * k.scale
            reads = [q.tensor, k.tensor, v.tensor, *f.extra_inputs()]
            nodes = with_dead_side([*f.core, *q.nodes, *k.nodes, *v.nodes], graph, reads)
            if _reads_own_output(nodes, reads):
                why = Refusal("the mask or an operand is computed inside the block")
                continue
            m = Match(root=f.root, nodes=nodes)
            esc = escape_reason(m, graph)
            if esc is not None:
                why = Refusal(esc)
                continue
            if keep:
                nodes = [n_ for n_ in nodes if n_ is not f.root]
            if target == "portable":
                if k.rank != 3 and q.rank == 3:
                    why = Refusal("ONNX Attention wants Q, K, V of one rank")
                    continue
                return Plan("OnnxAttention", q, k, v, nodes, n, h, kvh, scale, keep_reshape=keep)
            packed = _packed_qkv(q, k, v) if (kvh == n and k.rank == 3) else None
            if packed is not None:
                x, ws, bs, pnodes = packed
                preads = [x, *f.extra_inputs()]
                pnodes = with_dead_side([*nodes, *pnodes], graph, preads)[len(nodes) :]
                m2 = Match(root=f.root, nodes=[*nodes, *pnodes, *([f.root] if keep else [])])
                m2.tensors = {f"w{i}": w for i, w in enumerate(ws)}
                if (
                    not _reads_own_output([*nodes, *pnodes], preads)
                    and escape_reason(m2, graph, modifies=("w0", "w1", "w2")) is None
                    and ort_runs("Attention", 1, MS)
                ):
                    all_nodes = [*nodes, *pnodes]
                    return Plan(
                        "Attention", q, k, v, all_nodes, n, h, kvh, scale, (x, ws, bs), keep
                    )
            if not ort_runs("MultiHeadAttention", 1, MS):
                return Refusal("onnxruntime has no MultiHeadAttention kernel")
            return Plan("MultiHeadAttention", q, k, v, nodes, n, h, kvh, scale, keep_reshape=keep)
    return why


def _reads_own_output(nodes: Sequence[gs.Node], reads: Sequence[gs.Tensor]) -> bool:
    """Whether a tensor the fused node reads is computed by a node it replaces."""
    produced = {id(o) for n in nodes for o in n.outputs}
    return any(id(t) in produced for t in reads)


# ---------------------------------------------------------------------------------- emission


def _expanded_mask(
    mask: gs.Tensor, cache: dict[int, tuple[gs.Tensor, list[gs.Node]]]
) -> tuple[gs.Tensor, list[gs.Node]]:
    """``Expand(mask, [1, 1, T, 1])`` for a ``(B, 1, 1, T)`` mask: ``(B, 1, T, T)``; made once
    per mask (the nodes are returned only the first time)."""
    if id(mask) in cache:
        return cache[id(mask)][0], []
    shape = make_node("Shape", [mask], name="attn_mask_shape")
    t = make_node(
        "Slice",
        [
            shape.outputs[0],
            const("mask_t_start", np.array([3]), np.int64),
            const("mask_t_end", np.array([4]), np.int64),
        ],
        name="attn_mask_len",
    )
    target = make_node(
        "Concat",
        [
            const("ones2", np.array([1, 1]), np.int64),
            t.outputs[0],
            const("one", np.array([1]), np.int64),
        ],
        attrs={"axis": 0},
        name="attn_mask_target",
    )
    ex = make_node("Expand", [mask, target.outputs[0]], name="attn_mask_expand")
    md = _dims(mask)
    ex.outputs[0].dtype = np.float32
    ex.outputs[0].shape = [md[0], md[1], md[3], md[3]] if md is not None else None
    nodes = [shape, t, target, ex]
    cache[id(mask)] = (ex.outputs[0], nodes)
    return ex.outputs[0], nodes


def emit(
    f: Found, p: Plan, cache: dict[int, tuple[gs.Tensor, list[gs.Node]]] | None = None
) -> list[gs.Node]:
    """The new nodes; the last one writes ``f.output``."""
    name = f.root.name or "attention"
    pre: list[gs.Node] = []
    mask = [f.mask] if f.mask is not None else []
    causal = f.causal
    if mask and f.extra.get("expand"):
        m, pre = _expanded_mask(mask[0], cache if cache is not None else {})
        mask = [m]
    if mask and causal:
        # onnxruntime ignores unidirectional when an attention_bias is given: the triangle goes
        # into the bias, Where(tri, s, fill) + mask == s + Where(tri, mask, fill + mask) exactly
        fill = const(f"{name}_fill", np.array(f.extra["fill"], np.float32), np.float32)
        filled = make_node("Add", [mask[0], fill], name=f"{name}_mask_fill")
        bias = make_node(
            "Where", [f.extra["causal_cond"], mask[0], filled.outputs[0]], name=f"{name}_bias"
        )
        for t in (filled.outputs[0], bias.outputs[0]):
            t.dtype = np.float32
        pre += [filled, bias]
        mask = [bias.outputs[0]]
        causal = False
    out = f.output
    if p.keep_reshape:  # a fresh (B, S, N*H) tensor that the kept Reshape reads
        td = _dims(f.root.inputs[0])
        out = gs.Variable(
            f"{name}_attn_out",
            dtype=np.float32,
            shape=[*td[:2], p.num_heads * p.head_size] if td is not None else None,
        )
    if p.op == "Attention":
        assert p.packed is not None
        x, ws, bs = p.packed
        w = np.concatenate([np.asarray(t.values) for t in ws], axis=1)
        d = [np.asarray(t.values).shape[1] for t in ws]
        b = np.concatenate(
            [
                np.asarray(t.values, np.float32) if t is not None else np.zeros(n, np.float32)
                for t, n in zip(bs, d, strict=True)
            ]
        )
        attrs: dict[str, Any] = {"num_heads": p.num_heads, "scale": float(p.scale)}
        if causal:
            attrs["unidirectional"] = 1
        ins: list[gs.Tensor] = [x, const(f"{name}_qkv_w", w), const(f"{name}_qkv_b", b)]
        if mask:
            ins += [gs.Variable.empty(), gs.Variable.empty(), mask[0]]
        return [
            *pre,
            make_node("Attention", ins, [out], attrs, name=f"{name}_attention", domain=MS),
        ]
    if p.op == "MultiHeadAttention":
        attrs = {"num_heads": p.num_heads, "scale": float(p.scale)}
        if causal:
            attrs["unidirectional"] = 1
        ins = [p.q.tensor, p.k.tensor, p.v.tensor]
        if mask:
            ins += [gs.Variable.empty(), gs.Variable.empty(), mask[0]]
        return [
            *pre,
            make_node("MultiHeadAttention", ins, [out], attrs, name=f"{name}_mha", domain=MS),
        ]
    attrs = {"scale": float(p.scale)}
    if p.q.rank == 3:
        attrs["q_num_heads"] = p.num_heads
        attrs["kv_num_heads"] = p.kv_heads
    if causal:
        attrs["is_causal"] = 1
    ins = [p.q.tensor, p.k.tensor, p.v.tensor, *mask]
    return [*pre, make_node("Attention", ins, [out], attrs, name=f"{name}_attention")]


# ---------------------------------------------------------------------------------- pass


def _has_shapes(model: Model) -> bool:
    for n in model.graph.nodes:
        if n.op == "Softmax":
            return _dims(n.inputs[0]) is not None
    return True


@register_pass
class FuseAttentionPass(Pass):
    """Scaled-dot-product attention -> com.microsoft Attention/MultiHeadAttention (ort) or ONNX
    Attention (portable, opset >= 23)."""

    name = "fuse-attention"

    def __init__(self, target: str = "ort") -> None:
        if target not in TARGETS:
            raise OptionError(
                f"fuse-attention: target must be one of {', '.join(TARGETS)}, not {target!r}"
            )
        self.target = target

    def call(self, model: Model) -> PassResult:
        stats: dict[str, int] = {}
        opset = model.opset
        if self.target == "portable" and (opset < 23 or not ort_runs("Attention", opset)):
            logger.debug(
                "fuse-attention: portable target at opset %d: no ONNX Attention (needs opset 23 "
                "and an onnxruntime kernel); attention kept",
                opset,
            )
            return PassResult(model, False, stats)
        if not any(n.op == "Softmax" for _, n in model.walk_nodes()):
            return PassResult(model, False, stats)
        if not _has_shapes(model):
            infer_shapes(model, ort_fallback=False)
        graph = model.graph  # subgraphs: their shapes are rarely known; the main graph only
        done = 0
        cache: dict[int, tuple[gs.Tensor, list[gs.Node]]] = {}
        added: list[gs.Node] = []
        # last block first: a shape computation that CSE shared between blocks reads the first
        # block's tensors and dies with it only once the later blocks no longer read it
        for sm in reversed([n for n in graph.nodes if n.op == "Softmax"]):
            if not sm.outputs or not sm.inputs:
                continue  # consumed by an earlier rewrite
            found = parse(sm, opset)
            if isinstance(found, Refusal):
                logger.debug("fuse-attention: skip at %s: %s", sm.name, found.reason)
                continue
            chosen = plan(found, graph, self.target, opset)
            if isinstance(chosen, Refusal):
                logger.debug("fuse-attention: skip at %s: %s", sm.name, chosen.reason)
                continue
            new = emit(found, chosen, cache)
            for n in chosen.nodes:
                n.inputs.clear()
                n.outputs.clear()
            if chosen.keep_reshape:
                found.root.inputs[0] = new[-1].outputs[0]
            graph.nodes.extend(new)
            added += new
            key = {
                "Attention": "attention_packed",
                "MultiHeadAttention": "multihead_attention",
                "OnnxAttention": "onnx_attention",
            }[chosen.op]
            stats[key] = stats.get(key, 0) + 1
            done += 1
        if done:
            graph.nodes = [n for n in graph.nodes if n.outputs]
            graph.cleanup(remove_unused_graph_inputs=False, recurse_subgraphs=False)
            graph.nodes = local_topo_order(graph, new=added)  # each right before its reader
        return PassResult(model, done > 0, stats)
