"""AdaRound: learned rounding of one layer's weights (post-training, no labels).

Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training Quantization" (ICML).
Rounding every weight to nearest is optimal per weight, not per layer output. AdaRound keeps the
grid (scale ``s``) and learns, per weight, whether to round down or up:

    W~ = s * clamp(floor(W / s) + h(V), qmin, qmax),
    h(V) = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1),   zeta = 1.1, gamma = -0.1

minimizing the layer's output reconstruction on calibration inputs plus a regularizer that drives
``h`` to 0 or 1:

    || f(W X) - f(W~ X) ||^2  +  lambda * sum (1 - |2 h(V) - 1|^beta)

with ``V`` initialized so that ``h(V) = frac(W / s)`` (the soft weight starts at ``W``), ``beta``
annealed from 20 to 2 after a warm-up without the regularizer (20% of the iterations), Adam
(lr 1e-3). The result is hard: ``floor(W / s) + [h(V) >= 0.5]``, integers on the same grid as
nearest rounding, so the QDQ graph is unchanged except for the weight integers.

``layer(x, w)`` is the layer's forward with the given weight (bias and attributes bound), e.g.
from :func:`conv_layer`; ``act`` the activation the output goes through before the loss (the
paper reconstructs after the activation).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

Tensor = torch.Tensor

ZETA, GAMMA = 1.1, -0.1


@dataclass
class AdaRoundResult:
    w_int: Tensor  # learned integers (int64, same shape as the weight)
    nearest_int: Tensor
    mse_nearest: float  # held-out relative reconstruction MSE, nearest rounding
    mse_adaround: float  # same, learned rounding
    flipped: float  # fraction of weights rounded differently from nearest
    seconds: float
    iters: int


def rectified_sigmoid(v: Tensor) -> Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def init_v(rest: Tensor) -> Tensor:
    """``V`` with ``h(V) = rest`` (``rest`` in [0, 1))."""
    r = rest.clamp(1e-4, 1 - 1e-4)
    return -torch.log((ZETA - GAMMA) / (r - GAMMA) - 1)


def per_channel_scale(w: Tensor, qmax: int, axis: int = 0) -> Tensor:
    """Symmetric per-channel scales ``max|W_c| / qmax`` broadcastable to ``w``."""
    dims = [d for d in range(w.dim()) if d != axis]
    m = w.abs().amax(dim=dims, keepdim=True)
    return torch.where(m > 0, m / qmax, torch.ones_like(m))


def relative_mse(y: Tensor, ref: Tensor) -> float:
    return float(((y - ref) ** 2).mean() / (ref**2).mean().clamp_min(1e-20))


def adaround(
    layer: Callable[[Tensor, Tensor], Tensor],
    w: Tensor,
    x_train: Tensor,
    x_val: Tensor,
    scale: Tensor,
    qmin: int,
    qmax: int,
    act: Callable[[Tensor], Tensor] | None = None,
    iters: int = 2000,
    batch_size: int = 32,
    lam: float = 0.01,
    beta: tuple[float, float] = (20.0, 2.0),
    warmup: float = 0.2,
    lr: float = 1e-3,
    seed: int = 0,
) -> AdaRoundResult:
    """Learn the rounding of ``w`` (see the module docstring).

    Args:
        layer: ``layer(x, w) -> y``.
        w: float weight; ``scale`` broadcastable to it (e.g. :func:`per_channel_scale`).
        x_train, x_val: layer inputs (batch on axis 0) for fitting and for the held-out MSE.
        qmin, qmax: the integer range (e.g. -127, 127).
        act: applied to the outputs before the loss (e.g. ``torch.relu``).
    """
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    f = act or (lambda y: y)
    w = w.detach()
    w_floor = torch.floor(w / scale)
    nearest = torch.clamp(torch.round(w / scale), qmin, qmax)
    v = init_v(w / scale - w_floor).requires_grad_(True)
    with torch.no_grad():
        y_train = f(layer(x_train, w))
        y_val = f(layer(x_val, w))
    opt = torch.optim.Adam([v], lr=lr)
    n = x_train.shape[0]
    start = int(warmup * iters)
    for it in range(iters):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=g)
        h = rectified_sigmoid(v)
        w_soft = scale * torch.clamp(w_floor + h, qmin, qmax)
        rec = ((f(layer(x_train[idx], w_soft)) - y_train[idx]) ** 2).mean()
        if it >= start:
            frac = (it - start) / max(iters - start, 1)
            b = beta[1] + 0.5 * (beta[0] - beta[1]) * (1 + math.cos(math.pi * frac))
            reg = (1 - (2 * h - 1).abs().pow(b)).sum()
            loss = rec + lam * reg
        else:
            loss = rec
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        learned = torch.clamp(w_floor + (rectified_sigmoid(v) >= 0.5).to(w.dtype), qmin, qmax)
        mse_near = relative_mse(f(layer(x_val, nearest * scale)), y_val)
        mse_ada = relative_mse(f(layer(x_val, learned * scale)), y_val)
    return AdaRoundResult(
        learned.to(torch.int64),
        nearest.to(torch.int64),
        mse_near,
        mse_ada,
        float((learned != nearest).float().mean()),
        time.perf_counter() - t0,
        iters,
    )
