"""Per-output-channel arithmetic on the weights of linear producers (Conv, ConvTranspose, Gemm),
shared by the passes that fold an affine map ``y * s + t`` into them (``fuse-conv-bn``,
``fuse-conv-mul-add``): ``W'[c] = W[c] * s[c]``, ``B'[c] = B[c] * s[c] + t[c]``, with the weight
layout of each op (ConvTranspose: ``[C_in, C_out / group, ...]``; Gemm: ``transB``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.core.graph import const, make_node
from graphopt.core.pattern import Match

#: producers whose output channels can absorb a per-channel affine map
LINEAR_OPS = ("Conv", "ConvTranspose", "Gemm")


FLOAT_DTYPES = (np.float16, np.float32, np.float64)


def is_float(values: np.ndarray) -> bool:
    return values.dtype in [np.dtype(d) for d in FLOAT_DTYPES]


def out_channels(node: gs.Node, w: np.ndarray) -> int | None:
    """Output channels of a Conv/ConvTranspose/Gemm with weight ``w`` (None if unknown)."""
    if node.op == "Conv":
        return int(w.shape[0]) if w.ndim >= 3 else None
    if node.op == "ConvTranspose":
        return int(w.shape[1]) * int(node.attrs.get("group", 1)) if w.ndim >= 3 else None
    if node.op == "Gemm":
        if w.ndim != 2:
            return None
        return int(w.shape[0] if node.attrs.get("transB", 0) else w.shape[1])
    return None


def scale_out_channels(node: gs.Node, w: np.ndarray, s: np.ndarray) -> np.ndarray:
    """``w`` with output channel ``c`` multiplied by ``s[c]`` (float64 result)."""
    w64 = w.astype(np.float64)
    s = np.asarray(s, dtype=np.float64).reshape(-1)
    if node.op == "Conv":
        return w64 * s.reshape((-1,) + (1,) * (w.ndim - 1))
    if node.op == "ConvTranspose":
        g = int(node.attrs.get("group", 1))
        cin, cog = w.shape[0], w.shape[1]
        grouped = w64.reshape((g, cin // g, cog) + w.shape[2:])
        grouped = grouped * s.reshape((g, 1, cog) + (1,) * (w.ndim - 2))
        return grouped.reshape(w.shape)
    if node.op == "Gemm":
        return w64 * (s[:, None] if node.attrs.get("transB", 0) else s[None, :])
    raise ValueError(node.op)


def linear_ok(node: gs.Node, w: np.ndarray) -> bool:
    """The producer is a supported linear op with a float weight of a known layout."""
    if node.op not in LINEAR_OPS or not is_float(w) or len(node.outputs) > 1:
        return False
    if node.op == "ConvTranspose":
        g = int(node.attrs.get("group", 1))
        if w.ndim < 3 or w.shape[0] % g:
            return False
    if node.op == "Gemm":
        return w.ndim == 2
    return w.ndim >= 3


def bias_of(node: gs.Node, m: Match, n_out: int) -> np.ndarray:
    """The producer's additive term as float64, shaped for broadcasting against its output."""
    if node.op == "Gemm":
        if "b" not in m.tensors:
            return np.zeros(n_out)
        return float(node.attrs.get("beta", 1.0)) * m.value("b").astype(np.float64)
    if "b" not in m.tensors:
        return np.zeros(n_out)
    return m.value("b").astype(np.float64).reshape(-1)


def rebuild_linear(
    m: Match,
    node: gs.Node,
    w_new: np.ndarray | None,
    b_new: np.ndarray,
    outputs: list[gs.Variable],
    dtype: Any,
) -> gs.Node:
    """A copy of the producer ``node`` (already detached) with new weight (None: keep) and bias."""
    attrs = dict(node.attrs)
    if node.op == "Gemm":
        attrs["beta"] = 1.0
    w = m["w"] if w_new is None else const(m["w"].name, w_new.astype(dtype), dtype=dtype)
    b = const(
        m["b"].name if "b" in m.tensors else f"{node.name}.bias", b_new.astype(dtype), dtype=dtype
    )
    return make_node(node.op, [m["x"], w, b], outputs, attrs, name=node.name)
