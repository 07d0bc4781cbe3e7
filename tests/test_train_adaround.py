"""AdaRound lowers a layer's reconstruction error against nearest rounding, on the same grid."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
import torch  # noqa: E402

torch.set_num_threads(1)  # the machine is shared; OpenMP threads contend under load

import torch.nn.functional as F  # noqa: E402

from graphopt.algorithms.train.adaround import (  # noqa: E402
    adaround,
    init_v,
    per_channel_scale,
    rectified_sigmoid,
)


def test_init_v_reproduces_the_fraction() -> None:
    r = torch.linspace(0.01, 0.99, 50)
    torch.testing.assert_close(rectified_sigmoid(init_v(r)), r, rtol=1e-4, atol=1e-4)


def test_learned_rounding_beats_nearest_at_4_bits() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 8, 3, 3, generator=g) * 0.2
    # inputs correlated across channels and pixels (as real activations are): the output error
    # of independent per-weight rounding does not add up independently, so nearest is not best
    z = F.interpolate(torch.randn(96, 2, 4, 4, generator=g), size=(8, 8), mode="bilinear")
    x = torch.einsum("nchw,kc->nkhw", z, torch.randn(8, 2, generator=g))
    x = x + 0.1 * torch.randn(96, 8, 8, 8, generator=g)

    def layer(inp: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
        return F.conv2d(inp, wt, padding=1)

    scale = per_channel_scale(w, 7)
    r = adaround(layer, w, x[:64], x[64:], scale, -7, 7, act=torch.relu, iters=600, lr=1e-2)
    assert r.mse_adaround < 0.5 * r.mse_nearest
    assert int(r.w_int.min()) >= -7 and int(r.w_int.max()) <= 7
    assert int((r.w_int - r.nearest_int).abs().max()) <= 1  # up or down, never further
    assert 0 < r.flipped < 0.5
