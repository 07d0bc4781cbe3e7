"""Interrupting a run without leaving half a result: the SIGINT/SIGTERM handler, critical
sections that a signal cannot cut in two, and the list of outputs published so far.

The command line installs :func:`on_signal` for SIGINT and SIGTERM; it raises :class:`Interrupted`
(a ``KeyboardInterrupt`` carrying the signal number, exit status 128 + signal), so that every
``with`` block of :mod:`graphopt.core.output` unwinds and removes its temporary. Inside a
:func:`critical` block (a temporary's creation, the renames that publish a result, the removal of
temporaries) the signal is held and raised when the block ends. This module imports nothing heavy:
the command line installs the handler before it imports a command.
"""

from __future__ import annotations

import contextlib
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


def on_signal(signum: int, frame: FrameType | None) -> None:
    """A SIGINT/SIGTERM handler: raise :class:`Interrupted`, or hold the signal until the current
    critical section (a rename, a temporary's creation or removal) ends."""
    global _received
    if _received is None:
        _received = int(signum)
    if _critical_depth > 0:
        return
    raise Interrupted(signum)


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
