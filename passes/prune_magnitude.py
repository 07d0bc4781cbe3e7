"""Unstructured magnitude pruning: set the smallest weights of weight layers to zero.

For every Conv, ConvTranspose, Gemm and MatMul whose weight is a constant (initializer or Constant
node) read by that layer alone, ``W'[i] = 0 if |W[i]| < t else W[i]`` with either an absolute
threshold ``t = threshold`` or, for a ratio ``r``, the per-layer ``r``-quantile of ``|W|`` (or one
global quantile over all those weights with ``scope="global"``). Biases are left alone.

The pass reports the sparsity it produced (``sparsity``: zero weights / prunable weights, and the
number zeroed). Dense kernels do the same work on zeros, so it claims no speedup: the tensors keep
their shapes. Its use is to study sensitivity, to feed a sparse runtime, or to compress better.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.algorithms.prune import validate_ratio
from graphopt.algorithms.prune.handlers import constant
from graphopt.core.errors import GraphoptError
from graphopt.core.model import Model
from graphopt.core.pass_manager import Pass, PassResult, register_pass

logger = logging.getLogger(__name__)

WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _weights(model: Model) -> list[tuple[gs.Node, np.ndarray]]:
    uses: dict[str, int] = {}
    for n in model.graph.nodes:
        for i in n.inputs:
            uses[i.name] = uses.get(i.name, 0) + 1
    out = []
    graph_inputs = {t.name for t in model.graph.inputs}
    for n in model.graph.nodes:
        if n.op not in WEIGHT_OPS or len(n.inputs) < 2:
            continue
        t = n.inputs[1]
        if t.name in graph_inputs or uses.get(t.name, 0) != 1:
            logger.debug("prune-magnitude: %s skipped (weight shared or a graph input)", n.name)
            continue
        w = constant(t, model.opset)
        if w is None or w.dtype.kind != "f" or w.size < 2:
            continue
        out.append((n, w))
    return out


@register_pass
class PruneMagnitudePass(Pass):
    """Zero the smallest-magnitude weights (unstructured; no speedup claimed)."""

    name = "prune-magnitude"
    lossy = True

    def __init__(
        self, ratio: float | None = 0.5, threshold: float | None = None, scope: str = "layer"
    ) -> None:
        if threshold is None and ratio is None:
            raise GraphoptError("prune-magnitude needs a ratio or a threshold")
        if ratio is not None:
            ratio = validate_ratio(ratio, "prune-magnitude ratio", per_group=False)
        if scope not in ("layer", "global"):
            raise GraphoptError("prune-magnitude scope must be 'layer' or 'global'")
        self.ratio = ratio
        self.threshold = threshold
        self.scope = scope

    def call(self, model: Model) -> PassResult:
        items = _weights(model)
        total = sum(w.size for _, w in items)
        stats: dict[str, Any] = {
            "layers": len(items),
            "weights": int(total),
            "speedup": "none (dense kernels; shapes unchanged)",
        }
        if not items:
            stats.update(weights_zeroed=0, sparsity=0.0)
            return PassResult(model, False, stats)
        glob = None
        if self.threshold is None and self.scope == "global":
            allw = np.concatenate([np.abs(w).ravel() for _, w in items])
            glob = float(np.quantile(allw, self.ratio)) if self.ratio else 0.0
        zeroed = 0
        zeros = 0
        for node, w in items:
            a = np.abs(w)
            if self.threshold is not None:
                t = float(self.threshold)
                mask = a < t
            elif glob is not None:
                mask = a < glob
            else:
                k = int(round(float(self.ratio or 0.0) * w.size))
                mask = np.zeros(w.shape, dtype=bool)
                if k:
                    idx = np.argpartition(a.ravel(), k - 1)[:k]
                    mask.ravel()[idx] = True
            new_zero = mask & (w != 0)
            if new_zero.any():
                nw = np.where(mask, np.zeros((), w.dtype), w).astype(w.dtype)
                node.inputs[1] = gs.Constant(f"{node.inputs[1].name}_sparse", nw)
                zeroed += int(new_zero.sum())
                zeros += int((nw == 0).sum())
            else:
                zeros += int((w == 0).sum())
        if zeroed:
            model.graph.cleanup(remove_unused_graph_inputs=False)
        stats.update(weights_zeroed=zeroed, sparsity=round(zeros / total, 6))
        return PassResult(model, zeroed > 0, stats)
