"""Attention heads and FFN neurons as pruning units: the label rules the handlers use for them.

Transformers written out op by op (eager attention, as torch.onnx emits it) carry a layer's
heads through shapes that the plain channel rules block:

    q = Reshape(x @ Wq + bq, [b, t, H, Dh]) -> Transpose(0, 2, 1, 3)      # [b, H, t, Dh]
    k, v alike;  s = Softmax(q @ k^T / sqrt(Dh) (+ mask));  c = s @ v        # [b, H, t, Dh]
    o = Reshape(Transpose(c, 0, 2, 1, 3), [b, t, H*Dh]) @ Wo + bo

* A Reshape that *splits* the labelled channel axis ``C`` into two adjacent axes ``(H, Dh)``
  (:func:`split_heads`) ties the ``Dh`` elements of each head into one unit and labels the head
  axis ``H`` with one element per head. The head count in the target shape (a constant, or a
  constant piece of a ``Concat``-built shape vector, as the exporters write it) is rewritten to the
  kept head count; ``-1`` or a count read at run time needs nothing.
* A MatMul of two activations (:func:`batched_matmul`) whose labels sit on the same *batch* axis
  (the head axis of ``q @ k^T`` and ``s @ v``) ties them and passes them on; labels on the
  multiplied axes block (they would mix channels).
* The merging Reshape back to ``[b, t, H*Dh]`` is the existing channel-block rule
  (``np.repeat(head_labels, Dh)``), so the output projection loses the rows of the removed heads.

So Q, K and V of one layer form one dependency group whose units are its heads; removing a head
cuts ``Dh`` columns of Wq, Wk, Wv (and bq, bk, bv), ``Dh`` rows of Wo and rewrites the head count.
With the removed head's Q/K/V columns zero its scores are 0, its softmax uniform and its context
``s @ 0 = 0``, so the zeroed model is reproduced exactly.

FFN neurons need no new rule: ``MatMul -> (Add bias) -> activation -> MatMul`` with Gelu, Relu or
the erf GELU written out (``x * 0.5 * (1 + Erf(x / sqrt 2))``: scalar Div/Add/Mul and a Mul that
ties the labels with themselves) already makes each intermediate neuron a unit of the first
MatMul's group.

The residual stream (hidden channels) stays blocked: every residual Add ties the outputs of the
embedding, every output projection and every second FFN MatMul together, and LayerNormalization
normalizes over them (:data:`RESIDUAL_REASON` is appended to the LayerNorm block reason).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Labels = np.ndarray  # as in handlers: int64, -1 = position owned by no producer

#: why the hidden (residual-stream) channels of a transformer are not pruned
RESIDUAL_REASON = (
    "the residual stream's hidden channels feed every LayerNorm and residual Add, so they stay; "
    "attention heads and FFN neurons are pruned instead"
)


@dataclass
class HeadSplit:
    """How a Reshape splits a labelled channel axis into heads."""

    axis: int  # the head axis of the output
    heads: int
    head_dim: int
    head_labels: Labels  # one label per head: the head's first element
    ties: tuple[Labels, Labels]  # every element of a head tied to its first


def split_heads(
    in_shape: tuple[int, ...], axis: int, labels: Labels, out_shape: tuple[int, ...]
) -> HeadSplit | None:
    """The head split of a Reshape from ``in_shape`` (channels ``labels`` on ``axis``) to
    ``out_shape``, or None when the Reshape is not ``[..., C, rest] -> [..., H, Dh, rest]`` with
    the outer dims' product and the trailing dims unchanged and ``H * Dh == C``."""
    c = in_shape[axis]
    rest = tuple(in_shape[axis + 1 :])
    prefix = int(np.prod(in_shape[:axis]))
    n_rest = len(rest)
    b = len(out_shape) - n_rest - 2  # the head axis, if the trailing dims are kept
    if b < 0 or tuple(out_shape[b + 2 :]) != rest or int(np.prod(out_shape[:b])) != prefix:
        return None
    heads, head_dim = int(out_shape[b]), int(out_shape[b + 1])
    if heads * head_dim != c or len(labels) != c or head_dim < 1:
        return None
    per_head = labels.reshape(heads, head_dim)
    first = per_head[:, 0]
    ties = (np.repeat(first, head_dim - 1), per_head[:, 1:].reshape(-1))
    return HeadSplit(b, heads, head_dim, first.copy(), ties)


@dataclass
class BatchedLabels:
    """Labels of a MatMul of two activations: the output axis and labels, and a tie if both
    operands are labelled."""

    axis: int
    labels: Labels
    tie: tuple[Labels, Labels] | None


def batched_matmul(
    a: tuple[int, Labels] | None,
    b: tuple[int, Labels] | None,
    a_shape: tuple[object, ...] | None,
    b_shape: tuple[object, ...] | None,
) -> BatchedLabels | str:
    """The labels of ``MatMul(A, B)`` where both operands are activations, or why they block.

    ``a``/``b``: (axis, labels) of the operands (None: unlabelled); the shapes may hold symbolic
    dims. Labels pass through when they sit on a batch axis (not one of the last two) that is the
    same output axis for both labelled operands; an unlabelled operand must broadcast there (dim 1,
    or a rank that does not reach the axis)."""
    if a_shape is None or b_shape is None:
        return "operands of unknown rank"
    ra, rb = len(a_shape), len(b_shape)
    if ra < 2 or rb < 2:
        return "a 1-D operand"
    ro = max(ra, rb)
    out: list[tuple[int, Labels]] = []
    for lab, r in ((a, ra), (b, rb)):
        if lab is None:
            continue
        axis, labels = lab
        if axis >= r - 2:
            return "the channels are on a multiplied axis"
        out.append((axis + ro - r, labels))
    if not out:
        return "no labelled operand"
    axis, labels = out[0]
    if len(out) == 2:
        if out[1][0] != axis or len(out[1][1]) != len(labels):
            return "the operands' channels are on different axes"
        return BatchedLabels(axis, labels, (labels, out[1][1]))
    other = b_shape if a is not None else a_shape
    k = axis - (ro - len(other))
    if k >= 0 and other[k] != 1:
        return "the other operand holds unprunable data on the channel axis"
    return BatchedLabels(axis, labels, None)
