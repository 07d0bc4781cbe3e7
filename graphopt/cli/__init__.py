"""The ``graphopt`` command line: argument parsing and formatting only; the work is done by the
jobs (:mod:`graphopt.jobs`), and ``--json`` prints exactly the job result's ``to_json()``.

Commands live in one module per group (:data:`COMMANDS`); a command's module is imported only when
that command runs (or its ``--help`` is asked for), so ``graphopt --help`` starts in a fraction of
a second.

Exit codes: 0 success; 2 bad input (a :class:`~graphopt.core.errors.GraphoptError`: missing or
corrupt file, unknown pass, bad shape, bad option, inputs that do not match the model), one line
on stderr and no traceback; 1 internal error or failed verification; 128 + signal when
interrupted (130 for Ctrl-C / SIGINT, 143 for SIGTERM), with one line and no traceback, also when
the signal arrives while the command's modules are still being imported. Outputs are written
atomically (:mod:`graphopt.core.output`; temporaries are removed on SIGINT and SIGTERM,
:mod:`graphopt.core.interrupt`) and the
input file is never written. Every error message goes through
:func:`~graphopt.core.errors.terminal_safe`, as every model name in a table does
(:func:`graphopt.cli.common.fmt_name`) and every log line (a filter on the handler).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from types import FrameType
from typing import Any

from graphopt.core import __version__
from graphopt.core.errors import GraphoptError, terminal_safe
from graphopt.core.gcpolicy import job_gc
from graphopt.core.interrupt import (
    RETRY_SIGNAL,
    Interrupted,
    cancel_retry,
    check_interrupted,
    critical,
    forget_published,
    interrupted,
    on_retry,
    on_signal,
    published_paths,
    remove_temporaries,
    reset,
)

logger = logging.getLogger("graphopt")

EXIT_OK = 0
EXIT_FAILED = 1  #: internal error, failed verification
EXIT_USAGE = 2  #: bad input (GraphoptError)
EXIT_INTERRUPTED = 130  #: SIGINT (Ctrl-C); SIGTERM gives 143 (128 + signal)

#: command -> (module that defines it, one line of help); the module's ``add_arguments(name,
#: parser)`` adds the command's options and sets ``func`` (an ``args -> exit code`` handler)
COMMANDS: dict[str, tuple[str, str]] = {
    "inspect": ("graphopt.cli.inspect", "summary: I/O, ops, params, MACs, memory"),
    "optimize": (
        "graphopt.cli.optimize",
        "simplify and fuse (or run a recipe); verify; write ONNX",
    ),
    "quantize": (
        "graphopt.cli.quantize",
        "calibrated static int8 quantization (QDQ); verify against fp32",
    ),
    "prune": ("graphopt.cli.prune", "structured channel pruning with least-squares recovery"),
    "plan": (
        "graphopt.cli.plan",
        "plan activation memory into one arena (liveness, offsets, in-place)",
    ),
    "fp16": ("graphopt.cli.fp16", "convert to float16 (float32 kept where half breaks numerics)"),
    "compile": ("graphopt.cli.tvm", "compile through Apache TVM to a native library (+ manifest)"),
    "tune": ("graphopt.cli.tvm", "measure schedules for a model's kernels into a tuning database"),
    "run": ("graphopt.cli.tvm", "run a compiled library or an ONNX model"),
    "bench": ("graphopt.cli.tvm", "latency of a compiled library against onnxruntime"),
    "diff": ("graphopt.cli.diff", "structural and numerical diff of two models"),
    "list-passes": ("graphopt.cli.passes", "the registered passes"),
    "list-recipes": ("graphopt.cli.recipes", "the built-in recipes"),
}


def common_parser() -> argparse.ArgumentParser:
    """The options every command takes (DESIGN.md, CLI contract)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "--input-shape",
        action="append",
        default=[],
        metavar="NAME:DIMS",
        help="fix an input's shape, e.g. x:1x3x640x640 (repeatable)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    return p


def build_parser(commands: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser; the options of ``commands`` (all when None) are loaded from their
    modules, the other commands are listed with their help line only."""
    common = common_parser()
    parser = argparse.ArgumentParser(
        prog="graphopt", description="A compiler-style graph optimizer for ONNX models."
    )
    parser.add_argument("--version", action="version", version=f"graphopt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    load = set(COMMANDS) if commands is None else set(commands)
    for name, (module, help_line) in COMMANDS.items():
        p = sub.add_parser(name, parents=[common], help=help_line, description=help_line)
        if name in load:
            importlib.import_module(module).add_arguments(name, p)
    return parser


def _command_in(argv: Sequence[str]) -> str | None:
    """The command named on the command line (the first word that is one), if any."""
    for word in argv:
        if word in COMMANDS:
            return word
        if not word.startswith("-"):
            return None
    return None


class _SafeText(logging.Filter):
    """Make a log record's message safe for the terminal (names from models in warnings)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        safe = terminal_safe(msg)
        if safe != msg:
            record.msg, record.args = safe, None
        return True


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A handler writing to whatever ``sys.stderr`` is when a record arrives (so that a test's
    captured stderr, or a stream replaced after start-up, gets the line)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


class _LevelFormatter(logging.Formatter):
    """``%(levelname)s`` in lower case (``warning``, ``error``), as in the error lines; the
    record itself is left as it is for other handlers."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        lowered = logging.makeLogRecord(record.__dict__)
        lowered.levelname = record.levelname.lower()
        return super().formatMessage(lowered)


def log_handler(verbose: int = 0) -> logging.Handler:
    """The stderr handler of the command line: one line per message, ``graphopt: warning: ...``
    as the error lines are ``graphopt: error: ...``, never wrapped or split into columns (a
    script or a log file reads one record per line); with ``-vv`` the logger's name follows the
    level. Every message is made safe for the terminal first (model names in warnings; a newline
    in a message is written as ``\\n``), only a ``-v`` traceback spans lines."""
    name = "%(name)s: " if verbose >= 2 else ""
    handler = _StderrHandler()
    handler.setFormatter(_LevelFormatter(f"graphopt: %(levelname)s: {name}%(message)s"))
    handler.addFilter(_SafeText())
    return handler


def setup_logging(verbose: int) -> None:
    """``-v``: INFO, ``-vv``: DEBUG, for graphopt and for onnx-graphsurgeon's own logger."""
    level = logging.WARNING if verbose == 0 else (logging.INFO if verbose == 1 else logging.DEBUG)
    logging.basicConfig(level=level, handlers=[log_handler(verbose)])
    from onnx_graphsurgeon.logger import G_LOGGER  # noqa: PLC0415 - only when a command runs

    G_LOGGER.severity = (
        G_LOGGER.DEBUG if verbose >= 2 else (G_LOGGER.INFO if verbose == 1 else G_LOGGER.ERROR)
    )


@contextlib.contextmanager
def handle_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`~graphopt.core.interrupt.Interrupted` while the block runs
    (held back during the renames and removals that must not be cut in two, and while a module is
    being imported), so that every temporary is removed on the way out; the previous handlers come
    back afterwards. Outside the main thread signals are left alone."""
    old: dict[int, Any] = {}
    reset()
    handlers: dict[int, Callable[[int, FrameType | None], None]] = {
        signal.SIGINT: on_signal,
        signal.SIGTERM: on_signal,
    }
    if RETRY_SIGNAL is not None:  # a signal held back by an import is raised from this timer
        handlers[RETRY_SIGNAL] = on_retry
    try:
        for sig, handler in handlers.items():
            old[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread
        pass
    try:
        yield
    finally:
        remove_temporaries()  # what a signal landing at the start of a clean-up left
        if old:
            cancel_retry()
        for sig, handler in old.items():
            signal.signal(sig, handler)
        reset()


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``graphopt`` command; returns the exit code."""
    forget_published()
    try:
        with handle_signals():
            return _main(argv)
    except KeyboardInterrupt as exc:
        # a signal in the last instants, while the handlers were being put back (or while an
        # error line was written): the run is over, say so on one line as for any interruption
        return _interrupted(exc)


def entry() -> None:
    """The ``graphopt`` process: :func:`main`, then exit with its status.

    Before :func:`main` installs its own handlers and after it has put them back, SIGINT and
    SIGTERM end the process with the one line of an interrupted run (:func:`_late_signal`), and
    once the run has returned they are ignored until the process ends: a signal would otherwise
    meet the default disposition (a KeyboardInterrupt traceback, or a death by the signal with
    nothing said) while the interpreter finalizes after a finished run."""
    late = (signal.SIGINT, signal.SIGTERM)
    for sig in late:
        with contextlib.suppress(ValueError):  # not the main thread
            signal.signal(sig, _late_signal)
    code = main()
    # the run is over and its outputs complete or absent; the interpreter's finalization (which
    # puts the default disposition back for Python handlers, then frees onnxruntime and the rest:
    # up to a second) must not turn a late signal into a death by it. Ignored, process-wide (a
    # blocked mask would be the main thread's only, and onnxruntime's threads would take it)
    for sig in late:
        with contextlib.suppress(ValueError):
            signal.signal(sig, signal.SIG_IGN)
    sys.exit(code)


def _late_signal(signum: int, frame: FrameType | None) -> None:
    """A signal outside :func:`main`'s handlers: say so (what was written) and exit 128 + sig."""
    code = _interrupted(Interrupted(signum))
    for stream in (sys.stdout, sys.stderr):  # os._exit does not flush (a JSON report on stdout)
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _interrupted(exc: KeyboardInterrupt) -> int:
    """One line for an interrupted run (which outputs are complete); its exit status."""
    code = exc.exit_code if isinstance(exc, Interrupted) else EXIT_INTERRUPTED
    name = f" ({signal.Signals(code - 128).name})" if code > 128 else ""
    what = _written() if published_paths() else "; no output written"
    _error(f"interrupted{name}{what}")
    return code


def _main(argv: Sequence[str] | None) -> int:
    """:func:`main` inside the signal handlers: parse, run, report."""
    verbose = 0
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        command = _command_in(argv)
        # the command's modules import numpy, onnx, onnxruntime: a signal that cut one of their
        # C initializations in two would leave a half-made module (an ImportError, or a crash at
        # exit); it waits until the imports are done (a second or two) and stops the run then
        with critical():
            parser = build_parser([command] if command else [])
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return EXIT_USAGE
        verbose = int(getattr(args, "verbose", 0))
        setup_logging(verbose)
        # the job's collector policy for the whole command: its result's figures (the JSON's
        # "after" numbers, the tables) walk the graph after the job has returned
        with job_gc():
            code = int(args.func(args) or EXIT_OK)
        check_interrupted()  # a signal whose exception some library code swallowed
        return code
    except GraphoptError as exc:
        _error(f"error: {_one_line(exc)}{_written()}")
        if verbose:
            logger.debug("details", exc_info=True)
        return int(getattr(exc, "exit_code", EXIT_USAGE))
    except KeyboardInterrupt as exc:
        return _interrupted(exc)
    except Exception as exc:  # noqa: BLE001 - the one place failures are reported
        received = interrupted()
        if received is not None:  # library code turned the interruption into another error
            return _interrupted(Interrupted(received))
        exit_code = getattr(exc, "exit_code", None)  # VerificationError, PassError: 1
        if exit_code is not None:
            _error(f"error: {_one_line(exc)}{_written()}")
        else:
            _error(
                f"internal error: {type(exc).__name__}: {_one_line(exc)} "
                f"(re-run with -v for the traceback){_written()}"
            )
        if verbose:
            logger.exception("traceback")
        return int(exit_code) if isinstance(exit_code, int) else EXIT_FAILED


def _error(text: str) -> None:
    """One line on stderr, safe for the terminal."""
    sys.stderr.write(f"graphopt: {terminal_safe(text)}\n")
    sys.stderr.flush()


def _written() -> str:
    """``"; already written: a, b"`` when this run published outputs before it stopped."""
    done = published_paths()
    return f"; already written: {', '.join(map(str, done))}" if done else ""


def _one_line(exc: BaseException) -> str:
    """The message on one line (a multi-line message is joined)."""
    return " ".join(str(exc).split()) or type(exc).__name__
