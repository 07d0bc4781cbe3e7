"""Range observers for calibration: bounded memory, updated batch by batch.

Every observer sees one activation tensor a batch at a time (``update``), can absorb another
observer of its kind (``merge``) and finally proposes a real range ``(lo, hi)`` (``compute_range``)
for a quantizer with ``levels`` steps. Nothing but running statistics is kept: the min and max, and
for the histogram observers one fixed-size histogram per tensor.

Histogram. ``nbins`` counts on a grid anchored at zero whose bin width is a power of two, bin ``j``
covering ``[j w, (j+1) w)``. When a later batch extends the range, the width doubles ``k`` times and
old bins merge exactly (``j -> floor(j / 2^k)``), so the histogram after any sequence of batches
equals the histogram of all the data at once (the final width is the smallest power of two that fits
the overall range, whatever the order). Binning is ``floor(x / w)`` with ``w`` a power of two, which
is exact in floating point. Accumulation and the threshold searches run in numba.

Thresholds (asymmetric, for affine uint8/int8 activations). Each side of zero is searched on its
own: the histogram of ``|x|`` for the values of that sign gives a threshold with ``nq`` quantization
bins, ``nq`` being that side's share of the ``levels`` under the min-max range (``levels`` for
one-sided data such as Relu outputs, about half each for symmetric data, as TensorRT's 128). A side
holding less than 1/16 of the range (the small negative tail of a HardSwish) is kept unclipped, so
it can never pull the other side's threshold down.

- :class:`MinMaxObserver`: ``(min, max)``.
- :class:`PercentileObserver`: ``t`` = the ``percentile`` of ``|x|`` (default 99.999).
- :class:`EntropyObserver`: TensorRT's KL calibration: for every candidate ``i`` (bins kept) from
  ``nq`` to the last bin, ``P`` = the first ``i`` bins with the clipped tail added to the last,
  ``Q`` = those bins merged into ``nq`` groups and spread uniformly over each group's non-empty
  bins; pick the ``i`` minimizing ``KL(P || Q)`` and ``t = i w``. The zero bin's count is replaced
  by its neighbour's first (NVIDIA pytorch-quantization does the same): the spike of exact zeros
  after a Relu would otherwise make the search clip to the first few bins. With fewer than 64 values
  per quantization level the histogram is too sparse for the search and the full range is kept, and
  the threshold never clips more than ``max_clip_fraction`` (1e-4) of the values: on spiky
  histograms (rendered pages, mostly background) the KL minimum can otherwise sit in the first bins
  and wipe out the signal.
- :class:`MSEObserver`: ``t`` minimizing the expected squared error: rounding noise ``step^2 / 12``
  on the ``N(t)`` values inside plus ``sum (|x| - t)^2`` over the clipped tail, from prefix sums
  over the bins (all candidates at once, vectorized).
"""

from __future__ import annotations

import abc
import math
from typing import ClassVar

import numba
import numpy as np

from graphopt.core.errors import GraphoptError

DEFAULT_BINS = 4096


# ---------------------------------------------------------------------- numba kernels


@numba.njit(cache=True, nogil=True)
def _finite_minmax(x: np.ndarray) -> tuple[float, float, int]:  # pragma: no cover - numba
    mn = math.inf
    mx = -math.inf
    n = 0
    for i in range(x.size):
        v = x[i]
        if math.isfinite(v):
            n += 1
            if v < mn:
                mn = v
            if v > mx:
                mx = v
    return mn, mx, n


@numba.njit(cache=True, nogil=True)
def _accumulate(
    x: np.ndarray, counts: np.ndarray, inv_w: float, i0: int
) -> None:  # pragma: no cover - numba
    nb = counts.size
    for i in range(x.size):
        v = x[i]
        if math.isfinite(v):
            j = int(math.floor(np.float64(v) * inv_w)) - i0
            if j < 0:
                j = 0
            elif j >= nb:
                j = nb - 1
            counts[j] += 1


@numba.njit(cache=True, nogil=True)
def _kl_search(hist: np.ndarray, nq: int, stride: int) -> int:  # pragma: no cover - numba
    """Bins to keep (TensorRT entropy calibration) for a histogram of |x|.

    For candidate ``i``: ``P`` = hist[:i] with the tail added to bin i-1; ``Q`` = hist[:i] merged
    into ``nq`` groups, each group's mass spread evenly over its non-empty bins. With prefix sums
    of ``h``, ``h log h`` and ``[h > 0]``, ``KL(P||Q) = (1/|P|) sum_k p_k (log p_k - log q_k)
    + log(|Q| / |P|)`` costs O(nq) per candidate instead of O(i).
    """
    n = hist.size
    if n <= nq:
        return n
    c1 = np.zeros(n + 1)
    cl = np.zeros(n + 1)
    cz = np.zeros(n + 1)
    for k in range(n):
        h = hist[k]
        c1[k + 1] = c1[k] + h
        cl[k + 1] = cl[k] + (h * math.log(h) if h > 0 else 0.0)
        cz[k + 1] = cz[k] + (1.0 if h > 0 else 0.0)
    total = c1[n]
    best_kl = math.inf
    best_i = n
    i = nq
    while True:
        if i > n:
            i = n
        qsum = c1[i]
        tail = total - qsum
        kl = math.inf
        if qsum > 0:
            acc = 0.0
            q_last = 0.0
            for j in range(nq):
                s = (j * i) // nq
                e = ((j + 1) * i) // nq
                tot = c1[e] - c1[s]
                nz = cz[e] - cz[s]
                if nz > 0:
                    qv = tot / nz
                    acc += (cl[e] - cl[s]) - tot * math.log(qv)
                    if e == i:
                        q_last = qv
            h_last = hist[i - 1]
            if tail > 0:  # replace the last bin's term by the one with the tail added
                if h_last > 0:
                    acc -= h_last * (math.log(h_last) - math.log(q_last))
                    lq = math.log(q_last)
                else:
                    lq = math.log(1e-12 * qsum)  # Q is empty where P holds the tail
                p_last = h_last + tail
                acc += p_last * (math.log(p_last) - lq)
            kl = acc / total + math.log(qsum / total)
        if kl < best_kl:
            best_kl = kl
            best_i = i
        if i == n:
            break
        i += stride
    return best_i


# ---------------------------------------------------------------------- observers


def _as_flat(x: np.ndarray) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype != np.float32 and a.dtype != np.float64:
        a = a.astype(np.float32)
    return np.ascontiguousarray(a).reshape(-1)


class Observer(abc.ABC):
    """Running statistics of one tensor over calibration batches."""

    name: ClassVar[str] = ""

    def __init__(self) -> None:
        self.min = math.inf
        self.max = -math.inf
        self.count = 0

    def update(self, x: np.ndarray) -> None:
        """Absorb one batch of values (any shape)."""
        flat = _as_flat(x)
        if flat.size == 0:
            return
        mn, mx, n = _finite_minmax(flat)
        if n == 0:
            return
        self._update(flat, float(mn), float(mx))
        self.min = min(self.min, float(mn))
        self.max = max(self.max, float(mx))
        self.count += int(n)

    def _update(self, flat: np.ndarray, mn: float, mx: float) -> None:  # noqa: B027
        """Subclass hook, called before ``min``/``max``/``count`` include the batch."""

    def merge(self, other: Observer) -> None:
        """Absorb another observer of the same kind (e.g. from another worker)."""
        if other.count == 0:
            return
        self._merge(other)
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        self.count += other.count

    def _merge(self, other: Observer) -> None:  # noqa: B027
        pass

    @property
    def empty(self) -> bool:
        return self.count == 0

    @abc.abstractmethod
    def compute_range(self, levels: int = 256) -> tuple[float, float]:
        """The calibrated real range ``(lo, hi)`` for a quantizer with ``levels`` steps."""

    @property
    def nbytes(self) -> int:
        return 64


class MinMaxObserver(Observer):
    """The observed minimum and maximum."""

    name = "minmax"

    def compute_range(self, levels: int = 256) -> tuple[float, float]:
        if self.empty:
            return 0.0, 0.0
        return self.min, self.max


class Histogram:
    """A fixed-size histogram on a zero-anchored power-of-two grid, re-binned as the range grows."""

    def __init__(self, nbins: int = DEFAULT_BINS) -> None:
        if nbins < 16:
            raise ValueError("a histogram needs at least 16 bins")
        self.nbins = int(nbins)
        self.counts = np.zeros(self.nbins, np.int64)
        self.exp = 0  # width = 2 ** exp
        self.i0 = 0  # absolute index of counts[0]
        self.used = False

    @property
    def width(self) -> float:
        return math.ldexp(1.0, self.exp)

    def _fits(self, exp: int, mn: float, mx: float) -> bool:
        w = math.ldexp(1.0, exp)
        return math.floor(mx / w) - math.floor(mn / w) < self.nbins

    def _exp_for(self, mn: float, mx: float, start: int | None) -> int:
        span = mx - mn
        if span <= 0:
            span = max(abs(mx), 1.0)  # a constant tensor: any sane grid
        exp = max(math.ceil(math.log2(span / (self.nbins - 1))), -60)
        if start is not None:
            exp = max(exp, start)
        while not self._fits(exp, mn, mx):
            exp += 1
        while start is None and exp > -60 and self._fits(exp - 1, mn, mx):
            exp -= 1
        return exp

    def add(self, flat: np.ndarray, mn: float, mx: float, cur_min: float, cur_max: float) -> None:
        lo, hi = min(mn, cur_min), max(mx, cur_max)
        if not self.used:
            self.exp = self._exp_for(lo, hi, None)
            self.i0 = math.floor(lo / self.width)
            self.used = True
        elif (
            not self._fits(self.exp, lo, hi)
            or math.floor(lo / self.width) < self.i0
            or math.floor(hi / self.width) >= self.i0 + self.nbins
        ):
            self._regrid(self._exp_for(lo, hi, self.exp), lo)
        _accumulate(flat, self.counts, math.ldexp(1.0, -self.exp), self.i0)

    def _regrid(self, exp: int, lo: float) -> None:
        """Coarsen to width ``2**exp`` (>= current) with the grid starting at ``floor(lo / w)``."""
        shift = exp - self.exp
        new_i0 = math.floor(lo / math.ldexp(1.0, exp))
        old_idx = np.arange(self.i0, self.i0 + self.nbins, dtype=np.int64)
        if shift >= 62:  # everything old lands in the bins around zero
            new_idx = np.where(old_idx >= 0, 0, -1).astype(np.int64) - new_i0
        else:
            new_idx = np.floor_divide(old_idx, np.int64(1) << np.int64(shift)) - new_i0
        nz = self.counts != 0
        counts = np.zeros(self.nbins, np.int64)
        if nz.any():
            idx = new_idx[nz]
            if idx.min() < 0 or idx.max() >= self.nbins:
                raise AssertionError("histogram regrid out of range")
            np.add.at(counts, idx, self.counts[nz])
        self.counts = counts
        self.exp = exp
        self.i0 = new_i0

    def merge(self, other: Histogram, lo: float, hi: float) -> None:
        if not other.used:
            return
        if not self.used:
            self.counts = other.counts.copy()
            self.exp, self.i0, self.used = other.exp, other.i0, True
            return
        exp = self._exp_for(lo, hi, max(self.exp, other.exp))
        if exp != self.exp or math.floor(lo / math.ldexp(1.0, exp)) != self.i0:
            self._regrid(exp, lo)
        o = Histogram(other.nbins)
        o.counts, o.exp, o.i0, o.used = other.counts, other.exp, other.i0, True
        if o.exp != exp or o.i0 != self.i0:
            o._regrid(exp, lo)
        self.counts = self.counts + o.counts

    def side(self, sign: int) -> np.ndarray:
        """Counts of ``|x|`` for the values of one sign (``sign`` 1: x >= 0, -1: x < 0), bin k
        covering ``[k w, (k+1) w)`` (float64)."""
        idx = np.arange(self.i0, self.i0 + self.nbins, dtype=np.int64)
        keep = (idx >= 0) if sign > 0 else (idx < 0)
        idx, c = idx[keep], self.counts[keep].astype(np.float64)
        if idx.size == 0:
            return np.zeros(1)
        k = idx if sign > 0 else -idx - 1
        out = np.zeros(int(k.max()) + 1)
        out[k] = c
        return out


class HistogramObserver(Observer):
    """Base of the observers that choose a clipping threshold from a histogram."""

    def __init__(self, bins: int = DEFAULT_BINS) -> None:
        super().__init__()
        self.hist = Histogram(bins)

    def _update(self, flat: np.ndarray, mn: float, mx: float) -> None:
        self.hist.add(flat, mn, mx, self.min, self.max)

    def _merge(self, other: Observer) -> None:
        assert isinstance(other, HistogramObserver)
        self.hist.merge(other.hist, min(self.min, other.min), max(self.max, other.max))

    @property
    def nbytes(self) -> int:
        return int(self.hist.counts.nbytes) + 64

    def compute_range(self, levels: int = 256) -> tuple[float, float]:
        if self.empty:
            return 0.0, 0.0
        pos, neg = max(self.max, 0.0), max(-self.min, 0.0)
        if pos + neg <= 0:
            return self.min, self.max
        lo, hi = self.min, self.max
        for side, extent in ((1, pos), (-1, neg)):
            share = extent / (pos + neg)
            if extent <= 0 or share < 1 / 16:
                continue  # a sliver of the range: keep it unclipped
            nq = max(int(round(levels * share)), 2)
            hist = self.hist.side(side)
            if hist.sum() == 0:
                continue
            t = min(max(self.threshold(hist, self.hist.width, nq), 0.0), extent)
            if t <= 0:
                continue
            if side == 1:
                hi = t
            else:
                lo = -t
        return lo, hi

    @abc.abstractmethod
    def threshold(self, hist: np.ndarray, width: float, nq: int) -> float:
        """A clipping threshold on |x| from the folded histogram."""


class PercentileObserver(HistogramObserver):
    """Clip |x| at a percentile (default 99.999)."""

    name = "percentile"

    def __init__(self, percentile: float = 99.999, bins: int = DEFAULT_BINS) -> None:
        super().__init__(bins)
        if not 0 < percentile <= 100:
            raise ValueError("percentile must be in (0, 100]")
        self.percentile = float(percentile)

    def threshold(self, hist: np.ndarray, width: float, nq: int) -> float:
        cdf = np.cumsum(hist)
        k = int(np.searchsorted(cdf, cdf[-1] * self.percentile / 100.0, side="left"))
        return (min(k, hist.size - 1) + 1) * width


class EntropyObserver(HistogramObserver):
    """TensorRT-style KL-divergence calibration over a histogram of |x|."""

    name = "entropy"

    def __init__(
        self,
        bins: int = DEFAULT_BINS,
        max_candidates: int = 1024,
        min_count_per_level: int = 64,
        search_bins: int = 2048,
        max_clip_fraction: float = 1e-4,
    ) -> None:
        super().__init__(bins)
        self.max_clip_fraction = max_clip_fraction
        self.max_candidates = max_candidates
        self.search_bins = search_bins
        #: below this many values per quantization level the histogram is too sparse for KL
        #: (a squeeze-excitation gate sees one value per channel and sample): keep the full range
        self.min_count_per_level = min_count_per_level

    def threshold(self, hist: np.ndarray, width: float, nq: int) -> float:
        n = hist.size
        if n <= nq or hist.sum() < self.min_count_per_level * nq:
            return n * width  # too few values for a meaningful distribution: do not clip
        h = np.array(hist, np.float64)
        merge = 1
        while h.size > self.search_bins and h.size // 2 >= nq:  # TensorRT searches 2048 bins
            if h.size % 2:
                h = np.append(h, 0.0)
            h = h.reshape(-1, 2).sum(axis=1)
            merge *= 2
        width = width * merge
        n = h.size
        stride = max(1, (n - nq) // self.max_candidates)
        if h.size > 1:
            h[0] = h[1]  # damp the spike of exact zeros (Relu outputs), as pytorch-quantization
        i = int(_kl_search(h, int(nq), int(stride)))
        # KL on a spiky histogram (a page of white background: most values in a few bins) can pick a
        # threshold that clips a large share of the values; never clip more than max_clip_fraction
        cdf = np.cumsum(h[1:]) + hist[0]
        floor_bin = int(np.searchsorted(cdf, cdf[-1] * (1.0 - self.max_clip_fraction))) + 2
        return max(i, min(floor_bin, n)) * width


class MSEObserver(HistogramObserver):
    """The threshold minimizing the expected squared quantization error."""

    name = "mse"

    def __init__(self, bins: int = DEFAULT_BINS, candidates: int = 512) -> None:
        super().__init__(bins)
        self.candidates = candidates

    def threshold(self, hist: np.ndarray, width: float, nq: int) -> float:
        n = hist.size
        centers = (np.arange(n) + 0.5) * width
        c0 = np.cumsum(hist[::-1])[::-1]  # counts at or above bin k
        c1 = np.cumsum((hist * centers)[::-1])[::-1]
        c2 = np.cumsum((hist * centers**2)[::-1])[::-1]
        ks = np.unique(np.linspace(max(1, n // 64), n, self.candidates).astype(np.int64))
        t = ks * width
        above0 = np.append(c0, 0.0)[ks]
        above1 = np.append(c1, 0.0)[ks]
        above2 = np.append(c2, 0.0)[ks]
        inside = c0[0] - above0
        step = t / nq
        err = inside * step**2 / 12.0 + (above2 - 2 * t * above1 + t**2 * above0)
        return float(t[int(np.argmin(err))])


OBSERVERS: dict[str, type[Observer]] = {
    c.name: c for c in (MinMaxObserver, PercentileObserver, EntropyObserver, MSEObserver)
}


def make_observer(method: str, **options: object) -> Observer:
    """An observer by method name: minmax, percentile, entropy, mse."""
    if method not in OBSERVERS:
        raise GraphoptError(
            f"unknown calibration method '{method}'; choose one of {', '.join(OBSERVERS)}"
        )
    return OBSERVERS[method](**options)  # type: ignore[arg-type]
