"""Observers against brute-force references; incremental updates and merges equal one-shot."""

from __future__ import annotations

import math

import numpy as np
import pytest

from graphopt.algorithms.quant.observers import (
    EntropyObserver,
    Histogram,
    MinMaxObserver,
    MSEObserver,
    PercentileObserver,
    make_observer,
)


def _batches(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    # growing scales force re-binning; a heavy tail (Student t, 3 dof)
    return [
        (rng.standard_t(3, size=(4, 8, 16, 16)) * s).astype(np.float32)
        for s in (0.5, 1.0, 3.0, 0.2, 6.0)
    ]


def _brute_counts(h: Histogram, data: np.ndarray) -> np.ndarray:
    j = np.floor(data.astype(np.float64) / h.width).astype(np.int64) - h.i0
    return np.bincount(j, minlength=h.nbins)


def test_minmax_matches_numpy() -> None:
    data = _batches()
    o = MinMaxObserver()
    for d in data:
        o.update(d)
    allv = np.concatenate([d.ravel() for d in data])
    assert o.compute_range() == (float(allv.min()), float(allv.max()))
    assert o.count == allv.size


def test_histogram_counts_match_brute_force_after_regrids() -> None:
    data = _batches()
    o = EntropyObserver(bins=512)
    for d in data:
        o.update(d)
    allv = np.concatenate([d.ravel() for d in data])
    assert o.hist.counts.sum() == allv.size
    np.testing.assert_array_equal(o.hist.counts, _brute_counts(o.hist, allv))


@pytest.mark.parametrize("cls", [PercentileObserver, EntropyObserver, MSEObserver])
def test_incremental_and_merge_equal_one_shot(cls: type) -> None:
    data = _batches(1)
    inc = cls()
    for d in data:
        inc.update(d)
    one = cls()
    one.update(np.concatenate([d.ravel() for d in data]))
    a, b = cls(), cls()
    for d in data[:2]:
        a.update(d)
    for d in data[2:]:
        b.update(d)
    a.merge(b)
    for other in (one, a):
        assert other.hist.exp == inc.hist.exp and other.hist.i0 == inc.hist.i0
        np.testing.assert_array_equal(other.hist.counts, inc.hist.counts)
        assert other.compute_range() == inc.compute_range()


def test_memory_is_bounded() -> None:
    o = EntropyObserver()
    o.update(np.zeros(10, np.float32))
    size = o.nbytes
    rng = np.random.default_rng(0)
    for k in range(20):
        o.update(rng.standard_normal(5000).astype(np.float32) * (k + 1))
    assert o.nbytes == size


def _kl_reference(hist: np.ndarray, nq: int) -> int:
    """TensorRT's entropy calibration written plainly (stride 1)."""
    best, best_i = math.inf, len(hist)
    for i in range(nq, len(hist) + 1):
        p = hist[:i].astype(np.float64).copy()
        p[i - 1] += hist[i:].sum()
        q = np.zeros(i)
        for j in range(nq):
            s, e = (j * i) // nq, ((j + 1) * i) // nq
            chunk = hist[s:e]
            nz = chunk != 0
            if nz.any():
                q[s:e][nz] = chunk.sum() / nz.sum()
        if q.sum() == 0:
            continue
        pn, qn = p / p.sum(), q / q.sum()
        m = pn > 0
        kl = float(np.sum(pn[m] * np.log(pn[m] / np.where(qn[m] > 0, qn[m], 1e-12))))
        if kl < best:
            best, best_i = kl, i
    return best_i


def test_entropy_search_matches_reference_and_clips_heavy_tail() -> None:
    rng = np.random.default_rng(3)
    x = np.abs(rng.standard_t(3, size=200_000)).astype(np.float32)
    o = EntropyObserver(bins=600, max_clip_fraction=1.0)  # the pure KL search
    o.update(x)
    hist = o.hist.side(1)
    h = hist.copy()
    h[0] = h[1]
    want = _kl_reference(h, 64) * o.hist.width
    assert o.threshold(hist, o.hist.width, 64) == pytest.approx(want)
    full = EntropyObserver()
    full.update(x)
    lo, hi = full.compute_range(256)
    assert lo == pytest.approx(float(x.min()))
    assert hi < 0.5 * float(x.max())  # a real search: far below the max on a heavy tail


def test_percentile_matches_numpy_within_bins() -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal(100_000).astype(np.float32)
    o = PercentileObserver(percentile=99.9)
    o.update(x)
    lo, hi = o.compute_range()
    w = o.hist.width
    assert abs(hi - np.percentile(x[x >= 0], 99.9)) <= 4 * w
    assert abs(-lo - np.percentile(-x[x < 0], 99.9)) <= 4 * w


def test_mse_threshold_close_to_brute_force_optimum() -> None:
    rng = np.random.default_rng(5)
    x = np.abs(rng.laplace(size=50_000)).astype(np.float32)
    o = MSEObserver()
    o.update(x)
    _, t = o.compute_range(256)

    def err(th: float) -> float:
        s = th / 255
        q = np.clip(np.round(x / s), 0, 255) * s
        return float(np.mean((x - q) ** 2))

    grid = np.linspace(0.2, 1.0, 161) * x.max()
    best = min(err(g) for g in grid)
    assert err(t) <= best * 1.1
    assert t < x.max()


def test_constant_and_empty_tensors() -> None:
    o = make_observer("entropy")
    assert o.compute_range() == (0.0, 0.0)
    o.update(np.zeros(16, np.float32))
    o.update(np.full(16, 5.0, np.float32))
    assert o.compute_range() == (0.0, 5.0)
    o.update(np.array([np.nan, np.inf], np.float32))  # non-finite values are ignored
    assert o.count == 32


def test_unknown_method() -> None:
    from graphopt.core.errors import GraphoptError

    with pytest.raises(GraphoptError):
        make_observer("kl")


def test_entropy_never_clips_more_than_the_guard_allows() -> None:
    # a spiky histogram (mostly one background value) with a real signal in 1% of the values
    rng = np.random.default_rng(6)
    x = np.concatenate([np.full(990_000, 0.01), rng.uniform(0, 4, 10_000)]).astype(np.float32)
    o = EntropyObserver()
    o.update(x)
    _, hi = o.compute_range()
    assert np.mean(x > hi) <= 2e-4
