"""SmoothQuant: migrate activation outliers into the weights before static int8 quantization.

Xiao, Lin, Seznec, Wu, Demouth and Han, "SmoothQuant: Accurate and Efficient Post-Training
Quantization for Large Language Models", ICML 2023, arXiv:2211.10438.

For the MatMuls ``Y_i = X @ W_i`` that read one activation ``X [..., K]`` (Q, K and V read the same
LayerNorm output), a per-input-channel factor ``s_j = max|X_j|^alpha / max_i max|W_i[j, :]|^(1 -
alpha)`` gives ``X @ W_i = (X / s) @ (s * W_i)``: the smoothed activation's channels are flatter
(easier on one per-tensor int8 scale) and the weights, quantized per output column, take the
difference. ``alpha = 0.5`` (the paper's default for OPT and BLOOM) splits the difficulty evenly;
larger values push more into the weights.

The ``1 / s`` is folded where it costs nothing: into the producing ``LayerNormalization``'s
constant scale and bias (``gamma / s``, ``beta / s``; or a decomposed LayerNorm's
``Add(Mul(y, gamma), beta)``) when every reader of its output is one of
the smoothed MatMuls; otherwise, for activations with real outliers
(:data:`MUL_MIN_OUTLIER_RATIO`), a ``Mul(X, 1 / s)`` is inserted in front of them (static QDQ
then quantizes the Mul's output, which is what the MatMuls read).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.algorithms.quant.sites import Site, find_sites
from graphopt.core.graph import const, insert_nodes, make_node, name_scope
from graphopt.core.model import Model
from graphopt.core.session import make_session

logger = logging.getLogger(__name__)

#: the default migration strength (the paper's default for OPT/BLOOM-like models)
DEFAULT_ALPHA = 0.5
#: factors are clipped into [1 / MAX_FACTOR, MAX_FACTOR]
MAX_FACTOR = 1e4
#: a Mul is inserted (an extra op at run time) only for activations whose largest channel
#: maximum is at least this many times the median channel's: real outliers (the paper's LLM
#: activations reach 100x); milder ones are left alone unless a LayerNorm absorbs the factor
MUL_MIN_OUTLIER_RATIO = 8.0


@dataclass
class SmoothStats:
    """What :func:`smooth_model` did: activations smoothed, how, and their outlier ratio
    (max over channels of max|X_j| / median over channels) before and after."""

    folded_into_layernorm: list[str] = field(default_factory=list)
    mul_inserted: list[str] = field(default_factory=list)
    matmuls: int = 0
    outlier_ratio_before: dict[str, float] = field(default_factory=dict)
    outlier_ratio_after: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, int | float]:
        before = list(self.outlier_ratio_before.values())
        after = list(self.outlier_ratio_after.values())
        return {
            "activations_smoothed": len(self.folded_into_layernorm) + len(self.mul_inserted),
            "folded_into_layernorm": len(self.folded_into_layernorm),
            "mul_inserted": len(self.mul_inserted),
            "matmuls_smoothed": self.matmuls,
            "outlier_ratio_before_median": float(np.median(before)) if before else 0.0,
            "outlier_ratio_after_median": float(np.median(after)) if after else 0.0,
        }


def channel_max(
    model: Model, names: Iterable[str], feeds: Iterable[Mapping[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """max |X_j| over every sample and position, per last-axis channel, of each named tensor."""
    names = sorted(set(names))
    if not names:
        return {}
    sess = make_session(model, outputs=names, truncate=True)
    accepted = {i.name for i in sess.get_inputs()}
    out: dict[str, np.ndarray] = {}
    for f in feeds:
        vals = sess.run(names, {k: v for k, v in f.items() if k in accepted})
        for n, v in zip(names, vals, strict=True):
            a = np.abs(np.asarray(v, np.float32)).reshape(-1, np.shape(v)[-1]).max(axis=0)
            out[n] = np.maximum(out[n], a) if n in out else a
    return out


def _vector(t: gs.Tensor, k: int) -> bool:
    return (
        isinstance(t, gs.Constant)
        and np.dtype(t.dtype) == np.float32
        and np.asarray(t.values).size == k
        and np.asarray(t.values).shape[-1] == k
    )


def _foldable(act: gs.Tensor, group: list[Site], k: int) -> list[tuple[gs.Node, int]] | None:
    """Where ``1 / s`` folds into constants of the producer: ``(node, input index)`` pairs, for a
    LayerNormalization's scale and bias, or a decomposed one's ``Add(Mul(y, gamma), beta)``;
    None when it does not (another producer, or a reader of ``act`` outside the group)."""
    if len(act.inputs) != 1 or {id(n) for n in act.outputs} != {id(s.node) for s in group}:
        return None
    p = act.inputs[0]
    if p.op == "LayerNormalization" and int(p.attrs.get("axis", -1)) == -1:
        slots = [(p, 1)] if _vector(p.inputs[1], k) else []
        if len(p.inputs) > 2 and p.inputs[2] is not None and p.inputs[2].name:
            if not _vector(p.inputs[2], k):
                return None
            slots.append((p, 2))
        return slots if slots and slots[0][1] == 1 else None
    if p.op == "Add" and len(p.inputs) == 2:
        i = 1 if _vector(p.inputs[1], k) else (0 if _vector(p.inputs[0], k) else -1)
        if i < 0:
            return None
        t = p.inputs[1 - i]
        if len(t.inputs) != 1 or len(t.outputs) != 1 or t.inputs[0].op != "Mul":
            return None
        mul = t.inputs[0]
        j = 1 if _vector(mul.inputs[1], k) else (0 if _vector(mul.inputs[0], k) else -1)
        return [(mul, j), (p, i)] if j >= 0 else None
    return None


def smooth_model(
    model: Model,
    feeds: Iterable[Mapping[str, np.ndarray]],
    alpha: float = DEFAULT_ALPHA,
    keep_float: Iterable[str] = (),
) -> SmoothStats:
    """Apply SmoothQuant to every MatMul/Gemm with a constant weight, in place (see the module
    docstring). The model computes the same function (up to float rounding).

    Args:
        feeds: calibration feed dicts (the per-channel activation maxima).
        alpha: migration strength in [0, 1].
        keep_float: nodes left alone.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], not {alpha}")
    stats = SmoothStats()
    sites, _ = find_sites(model, keep_float, fuse_bias=False)
    groups: dict[str, list[Site]] = {}
    acts: dict[str, gs.Tensor] = {}
    for site in sites:
        groups.setdefault(site.act.name, []).append(site)
        acts[site.act.name] = site.act
    if not groups:
        return stats
    xmax = channel_max(model, groups, feeds)
    g = model.graph
    new: list[gs.Node] = []
    with name_scope(g):
        for name, group in groups.items():
            if name not in xmax or alpha == 0.0:
                continue
            x = xmax[name].astype(np.float64)
            wmax = np.max([np.abs(t.weight).max(axis=1) for t in group], axis=0).astype(np.float64)
            if x.shape != wmax.shape:
                continue
            s = np.where(
                (x > 0) & (wmax > 0), np.power(x, alpha) / np.power(wmax, 1.0 - alpha), 1.0
            )
            s = np.clip(s, 1.0 / MAX_FACTOR, MAX_FACTOR).astype(np.float32)
            med = float(np.median(x)) or 1.0
            ratio = float(x.max() / med)
            act = acts[name]
            slots = _foldable(act, group, x.shape[0])
            if slots is None and ratio < MUL_MIN_OUTLIER_RATIO:
                continue
            stats.outlier_ratio_before[name] = ratio
            xs = x / s
            stats.outlier_ratio_after[name] = float(xs.max() / (float(np.median(xs)) or 1.0))
            for site in group:
                _scale_weight(site, s)
            stats.matmuls += len(group)
            if slots is not None:
                for node, i in slots:
                    v = np.asarray(node.inputs[i].values, np.float32)
                    folded = (v.reshape(-1) / s).reshape(v.shape).astype(np.float32)
                    node.inputs[i] = const(f"{node.inputs[i].name}_smooth", folded)
                stats.folded_into_layernorm.append(name)
                continue
            mul = make_node("Mul", [act, const(f"{name}_smooth", 1.0 / s)], name=f"{name}_smooth")
            mul.outputs[0].dtype = act.dtype
            mul.outputs[0].shape = act.shape
            for site in group:
                site.node.inputs[0] = mul.outputs[0]
            new.append(mul)
            stats.mul_inserted.append(name)
        if new:
            insert_nodes(g, new)
    logger.info("smoothquant (alpha %.2f): %s", alpha, stats.to_json())
    return stats


def _scale_weight(site: Site, s: np.ndarray) -> None:
    """``W[j, :] *= s_j`` in the node's own layout (Gemm transB keeps W as ``[N, K]``)."""
    node = site.node
    w = np.asarray(site.weight_tensor.values, np.float32)
    if node.op == "Gemm" and node.attrs.get("transB", 0):
        scaled = w * s[None, :]
    else:
        scaled = w * s[:, None]
    node.inputs[1] = const(f"{site.weight_tensor.name}_smooth", scaled.astype(np.float32))
    site.weight = site.weight * s[:, None]
