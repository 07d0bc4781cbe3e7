"""Python's cyclic garbage collector, tuned for the life of a job on a large graph.

A graphsurgeon graph is hundreds of thousands of small linked objects (every node and tensor, and
the synchronized lists between them), most of which live as long as the job. CPython's default
thresholds (a young collection every 700 net allocations) run tens of thousands of collections
over them, each promoting survivors into the older generations that the next full collection walks
again. While a job runs, :func:`job_gc` raises the youngest generation's threshold, so that
collections are rare and each one is worth its walk; cycles are still collected (nothing is turned
off), and the caller's thresholds come back when the job ends.
"""

from __future__ import annotations

import functools
import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ParamSpec, TypeVar

#: ``gc.set_threshold`` while a job runs (CPython's default: 700, 10, 10)
JOB_THRESHOLDS = (50_000, 20, 10)

_P = ParamSpec("_P")
_R = TypeVar("_R")


@contextmanager
def job_gc() -> Iterator[None]:
    """While the block runs, the collector uses :data:`JOB_THRESHOLDS` (never lower than the
    thresholds already set); they are restored afterwards."""
    old = gc.get_threshold()
    gc.set_threshold(*(max(a, b) for a, b in zip(JOB_THRESHOLDS, old)))
    try:
        yield
    finally:
        gc.set_threshold(*old)


def with_job_gc(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Decorator: run ``fn`` inside :func:`job_gc`."""

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with job_gc():
            return fn(*args, **kwargs)

    return wrapper
