"""Block-wise weight quantization grids, round-to-nearest and GPTQ.

A ``[K, N]`` weight (``Y = A @ W``) is cut along ``K`` into blocks of ``block_size`` rows; every
block of every output column ``n`` gets its own asymmetric grid of ``2^bits`` levels,
``W[k, n] ~ s[b, n] * (q[k, n] - z[b, n])`` with ``q, z`` in ``[0, 2^bits - 1]``, ``s`` and ``z``
from the block's min and max (widened to contain 0, so that 0 is exact).

Round-to-nearest (RTN) rounds each weight on its grid. GPTQ (Frantar, Ashkboos, Hoefler and
Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers",
ICLR 2023, arXiv:2210.17323) minimizes the layer's output error on calibration activations
``X`` (``[samples, K]``) instead, ``||X W - X W_q||^2``, one input row of ``W`` at a time: with the
Hessian ``H = X^T X`` (damped by ``damp * mean(diag H)`` on the diagonal) and the upper Cholesky
factor ``U`` of ``H^-1``, row ``k`` is rounded and its error ``e = (W[k] - W_q[k]) / U[k, k]`` is
spread over the rows not yet quantized, ``W[j] -= U[k, j] e`` (the optimal brain surgeon update).
Updates are applied lazily: within a batch of ``lazy_block`` rows immediately, to the rest of the
matrix once per batch (one matrix product). A block's grid is fixed from the already-updated
weights when its first row is reached, as in the paper's grouped variant. Rows whose input is
always zero (``H[k, k] = 0``) get ``H[k, k] = 1`` and weight 0.

Each weight's Hessian comes from the float model's activations (one pass over the calibration
data, not the paper's layer-by-layer propagation through the already-quantized model).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

#: GPTQ's default damping: 1% of the mean diagonal of H
DEFAULT_DAMP = 0.01
#: rows updated together before the rest of the matrix (the paper's lazy batch, B = 128)
LAZY_BLOCK = 128


@dataclass
class BlockQuant:
    """A block-quantized ``[K, N]`` weight.

    Attributes:
        q: ``[K, N]`` uint8 levels in ``[0, 2^bits - 1]``.
        scales: ``[K / block, N]`` float32.
        zero_points: ``[K / block, N]`` uint8 in ``[0, 2^bits - 1]``.
        bits, block_size: the grid.
    """

    q: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray
    bits: int
    block_size: int

    def dequantize(self) -> np.ndarray:
        """``s * (q - z)`` as float32 ``[K, N]``."""
        rep = np.repeat
        s = rep(self.scales, self.block_size, axis=0)[: self.q.shape[0]]
        z = rep(self.zero_points, self.block_size, axis=0)[: self.q.shape[0]].astype(np.float32)
        return ((self.q.astype(np.float32) - z) * s).astype(np.float32)


def grid(block: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point of each column of ``block`` (``[rows, N]``): min/max widened to 0."""
    qmax = (1 << bits) - 1
    lo = np.minimum(block.min(axis=0), 0.0)
    hi = np.maximum(block.max(axis=0), 0.0)
    s = (hi - lo) / qmax
    s = np.where(s > 0, s, 1.0)
    z = np.clip(np.rint(-lo / s), 0, qmax)
    return s.astype(np.float64), z


def _round(w: np.ndarray, s: np.ndarray, z: np.ndarray, qmax: int) -> np.ndarray:
    return np.clip(np.rint(w / s) + z, 0, qmax)


def _check(w: np.ndarray, bits: int, block_size: int) -> None:
    if w.ndim != 2:
        raise ValueError(f"weight must be [K, N], got shape {w.shape}")
    if bits not in (2, 3, 4, 8) or block_size < 2 or block_size & (block_size - 1):
        raise ValueError(f"bits {bits} / block_size {block_size}: bits 2-8, block a power of two")


def _padded(w: np.ndarray, block_size: int) -> np.ndarray:
    k = w.shape[0]
    kp = -(-k // block_size) * block_size
    if kp == k:
        return w.astype(np.float64)
    return np.concatenate([w.astype(np.float64), np.zeros((kp - k, w.shape[1]))], axis=0)


def quantize_rtn(w: np.ndarray, bits: int, block_size: int) -> BlockQuant:
    """Round-to-nearest block quantization of a ``[K, N]`` weight (``K`` padded with zeros to a
    whole number of blocks; the padding rows are dropped from ``q``)."""
    _check(w, bits, block_size)
    k, n = w.shape
    wp = _padded(w, block_size)
    qmax = (1 << bits) - 1
    blocks = wp.reshape(-1, block_size, n)
    lo = np.minimum(blocks.min(axis=1), 0.0)
    hi = np.maximum(blocks.max(axis=1), 0.0)
    s = (hi - lo) / qmax
    s = np.where(s > 0, s, 1.0)
    z = np.clip(np.rint(-lo / s), 0, qmax)
    q = np.clip(np.rint(blocks / s[:, None, :]) + z[:, None, :], 0, qmax)
    return BlockQuant(
        q=q.reshape(-1, n)[:k].astype(np.uint8),
        scales=s.astype(np.float32),
        zero_points=z.astype(np.uint8),
        bits=bits,
        block_size=block_size,
    )


def quantize_gptq(
    w: np.ndarray,
    hessian: np.ndarray,
    bits: int,
    block_size: int,
    damp: float = DEFAULT_DAMP,
    lazy_block: int = LAZY_BLOCK,
) -> BlockQuant:
    """GPTQ block quantization of a ``[K, N]`` weight (see the module docstring).

    Args:
        w: the weight, ``Y = A @ w``.
        hessian: ``X^T X`` over the calibration activations ``X [samples, K]`` (float64 ``[K, K]``).
        bits, block_size: the grid.
        damp: diagonal damping as a share of the mean diagonal.
        lazy_block: rows per lazy batch.
    """
    _check(w, bits, block_size)
    k, n = w.shape
    if hessian.shape != (k, k):
        raise ValueError(f"hessian must be [{k}, {k}], got {hessian.shape}")
    qmax = (1 << bits) - 1
    kp = -(-k // block_size) * block_size
    W = _padded(w, block_size).copy()  # [Kp, N]: rows are the inputs
    H = np.zeros((kp, kp))
    H[:k, :k] = hessian
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[dead] = 0.0
    d = damp * float(np.mean(np.diag(H)))
    H[np.diag_indices(kp)] += d
    try:
        hinv = np.linalg.cholesky(np.linalg.inv(H)).T  # upper factor U of H^-1
    except np.linalg.LinAlgError:
        logger.debug("GPTQ: Hessian not positive definite after damping; round to nearest")
        return quantize_rtn(w, bits, block_size)
    Q = np.zeros_like(W)
    scales = np.zeros((kp // block_size, n))
    zeros = np.zeros((kp // block_size, n))
    lazy = max(block_size, lazy_block - lazy_block % block_size)
    for i1 in range(0, kp, lazy):
        i2 = min(i1 + lazy, kp)
        W1 = W[i1:i2].copy()
        Q1 = np.zeros_like(W1)
        E1 = np.zeros_like(W1)
        U1 = hinv[i1:i2, i1:i2]
        s = z = np.ones(n)
        for i in range(i2 - i1):
            row = i1 + i
            if row % block_size == 0:
                s, z = grid(W1[i : i + block_size], bits)
                scales[row // block_size], zeros[row // block_size] = s, z
            wi = W1[i]
            qi = _round(wi, s, z, qmax)
            Q1[i] = qi
            err = (wi - (qi - z) * s) / U1[i, i]
            W1[i:] -= np.outer(U1[i, i:], err)
            E1[i] = err
        Q[i1:i2] = Q1
        W[i2:] -= hinv[i1:i2, i2:].T @ E1
    return BlockQuant(
        q=Q[:k].astype(np.uint8),
        scales=scales.astype(np.float32),
        zero_points=zeros.astype(np.uint8),
        bits=bits,
        block_size=block_size,
    )


def output_error(w: np.ndarray, wq: np.ndarray, hessian: np.ndarray) -> float:
    """``tr((W - W_q)^T H (W - W_q))``: the layer's squared output error on the calibration
    activations (``H = X^T X``)."""
    d = (w - wq).astype(np.float64)
    return float(np.einsum("kn,kj,jn->", d, hessian, d))
