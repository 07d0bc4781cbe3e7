"""Fake quantization with straight-through gradients and learnable (LSQ) scales.

``fake_quant(x, s, z) = (clamp(round(x / s) + z, qmin, qmax) - z) * s`` is what a
QuantizeLinear -> DequantizeLinear pair computes (round half to even, saturation), in float.

Gradients (Bengio et al. 2013, "Estimating or propagating gradients through stochastic neurons";
Esser et al. 2020, "Learned Step Size Quantization", ICLR):

* w.r.t. ``x``: straight-through estimator, 1 inside the representable range, 0 where clamped
  (``round`` is replaced by the identity in the backward pass);
* w.r.t. ``s`` (LSQ): ``round(x/s) - x/s`` inside the range, ``qmin - z`` / ``qmax - z`` where
  clamped -- exactly what autograd gives for the expression above once ``round`` is straight
  through -- times the LSQ gradient scale ``g = 1 / sqrt(N * qmax)`` (``N`` elements per scale),
  which keeps the step size's updates commensurate with the weights'.

Zero points stay fixed (integers in the exported graph); scales are kept positive by taking
``|s|`` (with a floor) in the forward pass.
"""

from __future__ import annotations

import math

import torch

Tensor = torch.Tensor

MIN_SCALE = 1e-12


def round_ste(x: Tensor) -> Tensor:
    """``round(x)`` forward (half to even), identity backward."""
    return x + (torch.round(x) - x).detach()


def grad_scale(x: Tensor, g: float) -> Tensor:
    """``x`` forward, gradient times ``g`` backward."""
    return x * g + (x - x * g).detach()


def broadcast_param(p: Tensor, like: Tensor, axis: int | None) -> Tensor:
    """A per-channel (1-D) parameter reshaped to broadcast along ``axis`` of ``like``."""
    if axis is None or p.dim() == 0 or p.numel() == 1:
        return p.reshape(())
    shape = [1] * like.dim()
    shape[axis % like.dim()] = -1
    return p.reshape(shape)


def fake_quant(
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    qmin: int,
    qmax: int,
    axis: int | None = None,
    lsq: bool = True,
) -> Tensor:
    """Quantize-dequantize ``x`` with STE rounding; ``scale`` learns with the LSQ gradient.

    Args:
        x: the float tensor.
        scale: 0-d (per tensor) or 1-D (per channel along ``axis``).
        zero_point: same shape as ``scale``, integer valued (any dtype).
        qmin, qmax: the integer range (e.g. 0, 255 for uint8; -127, 127 for symmetric int8).
        axis: the channel axis of ``x`` for a 1-D ``scale``.
        lsq: scale the gradient of ``scale`` by ``1 / sqrt(N * qmax)``.
    """
    s = scale.abs().clamp_min(MIN_SCALE)
    if lsq and s.requires_grad:
        n = x.numel() / max(s.numel(), 1)
        s = grad_scale(s, 1.0 / math.sqrt(max(n * max(qmax, 1), 1.0)))
    s = broadcast_param(s, x, axis)
    z = broadcast_param(zero_point.to(x.dtype), x, axis)
    q = torch.clamp(round_ste(x / s) + z, qmin, qmax)
    return (q - z) * s


def quantize_int(
    x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, axis: int | None = None
) -> Tensor:
    """The integer tensor (as int64) the exported graph stores for ``x``: the same arithmetic
    (in ``x``'s dtype) as :func:`fake_quant`'s forward, so graph and module agree exactly."""
    x = x.detach()
    s = broadcast_param(scale.detach().abs().clamp_min(MIN_SCALE), x, axis)
    z = broadcast_param(zero_point.to(x.dtype), x, axis)
    q = torch.round(x / s) + z
    return q.clamp(qmin, qmax).to(torch.int64)
