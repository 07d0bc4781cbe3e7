"""Interrupting a run without leaving half a result: the SIGINT/SIGTERM handler, critical
sections that a signal cannot cut in two, and the list of outputs published so far.

The command line installs :func:`on_signal` for SIGINT and SIGTERM; it raises :class:`Interrupted`
(a ``KeyboardInterrupt`` carrying the signal number, exit status 128 + signal), so that every
``with`` block of :mod:`graphopt.core.output` unwinds and removes its temporary. Inside a
:func:`critical` block (a temporary's creation, the renames that publish a result, the removal of
temporaries) the signal is held and raised when the block ends. So is a signal that lands while a
module is being imported (numpy.random, sympy, onnx.reference... are imported on first use, in the
middle of a run): an exception raised inside a C extension's initialization leaves a half-made
module behind, which can crash the interpreter at exit. Such a signal is raised again from a short
CPU-time timer (SIGVTALRM) once the import is over. This module imports nothing heavy: the command
line installs the handlers before it imports a command.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from types import FrameType


class Interrupted(KeyboardInterrupt):
    """Raised by :func:`on_signal`: the run was interrupted by ``signum`` (SIGINT, SIGTERM)."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        """The conventional exit status of a process ended by this signal: 128 + signal."""
        return 128 + self.signum


_critical_depth = 0
#: the first signal this run received (None: none): kept, because an exception raised by a
#: signal handler can be lost (replaced by another exception in some cleanup code, e.g. inside
#: ``shutil.rmtree``); every critical section raises it again when it ends
_received: int | None = None
_published: list[Path] = []
#: temporaries created and not yet removed or published (see :func:`remove_temporaries`)
_temporaries: dict[Path, None] = {}


#: how long (CPU seconds) a signal held back by an import waits before it is tried again
RETRY_S = 0.02
#: the timer and signal that retry a held signal (None where the platform has no interval timers)
RETRY_SIGNAL: int | None = getattr(signal, "SIGVTALRM", None)


def importing(frame: FrameType | None) -> bool:
    """Whether ``frame`` (or a caller of it) runs inside Python's import machinery: a module's
    body, or a C extension's initialization, is being executed."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _retry_later() -> bool:
    """Arm the one-shot CPU timer that calls :func:`on_retry`; False where there is none."""
    if RETRY_SIGNAL is None or not hasattr(signal, "setitimer"):
        return False
    signal.setitimer(signal.ITIMER_VIRTUAL, RETRY_S)
    return True


def on_signal(signum: int, frame: FrameType | None) -> None:
    """A SIGINT/SIGTERM handler: raise :class:`Interrupted`, or hold the signal until the current
    critical section (a rename, a temporary's creation or removal) ends, or until the import in
    progress is over."""
    global _received
    if _received is None:
        _received = int(signum)
    if _critical_depth > 0:
        return
    if importing(frame) and _retry_later():
        return
    raise Interrupted(_received)


def on_retry(signum: int, frame: FrameType | None) -> None:
    """The retry timer's handler: raise the held signal once no import is running (inside a
    critical section the section's end raises it)."""
    if _received is None or _critical_depth > 0:
        return
    if importing(frame) and _retry_later():
        return
    raise Interrupted(_received)


def cancel_retry() -> None:
    """Stop the retry timer (the command line calls it when its handlers are taken down)."""
    if RETRY_SIGNAL is not None and hasattr(signal, "setitimer"):
        signal.setitimer(signal.ITIMER_VIRTUAL, 0)


def interrupted() -> int | None:
    """The signal received since :func:`reset` (None when none)."""
    return _received


def check_interrupted() -> None:
    """Raise :class:`Interrupted` when a signal was received (its first raise may have been lost
    in some library's cleanup code): a checkpoint between steps."""
    if _received is not None:
        raise Interrupted(_received)


def reset() -> None:
    """Forget a received signal (the command line calls it around each run)."""
    global _received
    _received = None


@contextlib.contextmanager
def critical() -> Iterator[None]:
    """A block that a signal handled by :func:`on_signal` cannot cut in two: a signal arriving
    inside is raised as :class:`Interrupted` when the block ends (and so is a signal whose first
    raise was lost: every critical section is a checkpoint)."""
    global _critical_depth
    _critical_depth += 1
    try:
        yield
    finally:
        _critical_depth -= 1
        if _critical_depth == 0 and _received is not None:
            raise Interrupted(_received)


def published_paths() -> list[Path]:
    """The files this process has published (renamed into place) so far, in order."""
    return list(_published)


def forget_published() -> None:
    """Start a new list for :func:`published_paths` (the command line calls it per run)."""
    _published.clear()


def record_published(path: Path) -> None:
    """Note that ``path`` was just renamed into place (see :func:`published_paths`)."""
    _published.append(path)


def register_temporary(path: Path) -> None:
    """Note a temporary file or folder just created (call it inside the :func:`critical` section
    that creates it): it is removed by :func:`remove_temporaries` unless it is released first."""
    _temporaries[path] = None


def release_temporary(path: Path) -> None:
    """Forget a temporary that was removed or renamed into place."""
    _temporaries.pop(path, None)


def remove_temporaries() -> int:
    """Remove every temporary still registered; return how many were there.

    Each writer removes its own temporary in a ``finally`` clause, but a signal's exception can
    land in the instants between the clause's start and its critical section, and then the
    clean-up is skipped. The command line's signal handling calls this on its way out, once the
    interruption has travelled up, so that nothing is left behind in that case either."""
    global _critical_depth
    n = 0
    _critical_depth += 1  # held, and not raised at the end: an interruption is already on its way
    try:
        for path in list(_temporaries):
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            _temporaries.pop(path, None)
            n += 1
    finally:
        _critical_depth -= 1
    return n
