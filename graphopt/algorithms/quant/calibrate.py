"""Collect activation ranges: run onnxruntime a batch at a time with the needed intermediate tensors
exposed as outputs, feed each tensor's values to its observer, and drop the batch.

Memory is bounded by one batch of exposed activations plus one fixed-size observer per tensor
(``graphopt.algorithms.quant.observers``); nothing accumulates across batches.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from graphopt.algorithms.quant.observers import Observer, make_observer
from graphopt.core.errors import CalibrationError
from graphopt.core.model import Model
from graphopt.core.session import make_session

logger = logging.getLogger(__name__)

Progress = Callable[[int, "int | None"], None]


@dataclass
class CalibrationResult:
    ranges: dict[str, tuple[float, float]]
    observers: dict[str, Observer]
    samples: int
    batches: int
    seconds: float
    #: the first few batches, kept for accuracy checks (at most ``keep_samples`` samples)
    kept: list[dict[str, np.ndarray]] = field(default_factory=list)


def collect_ranges(
    model: Model,
    tensors: Sequence[str],
    batches: Iterable[Mapping[str, np.ndarray]],
    method: str = "entropy",
    levels: int = 256,
    progress: Progress | None = None,
    total: int | None = None,
    keep_samples: int = 0,
    observer_options: dict[str, object] | None = None,
) -> CalibrationResult:
    """Observe ``tensors`` over the calibration batches and compute each one's range.

    Args:
        model: the float model (shapes inferred).
        tensors: activation tensor names to observe.
        batches: iterable of feed dicts (e.g. a :class:`~graphopt.core.feeds.CalibrationReader`).
        method: minmax, percentile, entropy or mse.
        levels: quantization steps of the activation type (256 for 8 bits).
        progress: called with (samples done, total or None) after each batch.
        keep_samples: keep the first batches, up to this many samples, in the result.
    """
    t0 = time.perf_counter()
    observers = {t: make_observer(method, **(observer_options or {})) for t in tensors}
    sess = make_session(model, level="basic", outputs=list(tensors))
    input_names = [i.name for i in sess.get_inputs()]
    names = list(tensors)
    samples = nb = 0
    kept: list[dict[str, np.ndarray]] = []
    kept_n = 0
    for batch in batches:
        feeds = {k: v for k, v in batch.items() if k in input_names}
        try:
            outs = sess.run(names, feeds)
        except Exception as exc:  # noqa: BLE001 - onnxruntime's own exception types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            shapes = {k: list(v.shape) for k, v in feeds.items()}
            raise CalibrationError(
                f"the model cannot run on a calibration batch {shapes}: {first}"
            ) from None
        for name, val in zip(names, outs, strict=False):
            observers[name].update(val)
        del outs
        n = next(iter(feeds.values())).shape[0] if feeds else 1
        if kept_n < keep_samples:
            kept.append({k: np.array(v) for k, v in batch.items()})
            kept_n += n
        samples += n
        nb += 1
        if progress is not None:
            progress(samples, total)
    if nb == 0:
        raise CalibrationError("calibration data holds no samples")
    ranges = {}
    for name, obs in observers.items():
        if obs.empty:
            logger.debug("calibration: %s saw no finite values", name)
            continue
        ranges[name] = obs.compute_range(levels)
    return CalibrationResult(ranges, observers, samples, nb, time.perf_counter() - t0, kept)
