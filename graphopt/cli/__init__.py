"""The ``graphopt`` command line: argument parsing and formatting only; the work is done by the
jobs (:mod:`graphopt.jobs`), and ``--json`` prints exactly the job result's ``to_json()``.

Commands live in one module per group (:data:`COMMANDS`); a command's module is imported only when
that command runs (or its ``--help`` is asked for), so ``graphopt --help`` starts in a fraction of
a second.

Exit codes: 0 success; 2 bad input (a :class:`~graphopt.core.errors.GraphoptError`: missing or
corrupt file, unknown pass, bad shape, bad option, inputs that do not match the model), one line
on stderr and no traceback; 1 internal error or failed verification; 130 interrupted. Outputs are
written atomically and the input file is never written.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
from collections.abc import Sequence
from types import FrameType

from graphopt.core import __version__
from graphopt.core.errors import GraphoptError

logger = logging.getLogger("graphopt")

EXIT_OK = 0
EXIT_FAILED = 1  #: internal error, failed verification
EXIT_USAGE = 2  #: bad input (GraphoptError)
EXIT_INTERRUPTED = 130

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


def setup_logging(verbose: int) -> None:
    """``-v``: INFO, ``-vv``: DEBUG, for graphopt and for onnx-graphsurgeon's own logger."""
    from rich.logging import RichHandler  # noqa: PLC0415 - only when a command runs

    from graphopt.cli.common import console  # noqa: PLC0415

    level = logging.WARNING if verbose == 0 else (logging.INFO if verbose == 1 else logging.DEBUG)
    logging.basicConfig(
        level=level,
        format="%(name)s: %(message)s",
        handlers=[RichHandler(console=console(stderr=True), show_time=False)],
    )
    from onnx_graphsurgeon.logger import G_LOGGER  # noqa: PLC0415 - only when a command runs

    G_LOGGER.severity = (
        G_LOGGER.DEBUG if verbose >= 2 else (G_LOGGER.INFO if verbose == 1 else G_LOGGER.ERROR)
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``graphopt`` command; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _command_in(argv)
    parser = build_parser([command] if command else [])
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    verbose = int(getattr(args, "verbose", 0))
    setup_logging(verbose)
    # SIGTERM unwinds like Ctrl-C, so that a half-written output's temporary file is removed
    try:
        old_term = signal.signal(signal.SIGTERM, _raise_interrupt)
    except ValueError:  # not the main thread: leave signals alone
        old_term = None
    try:
        return int(args.func(args) or EXIT_OK)
    except GraphoptError as exc:
        sys.stderr.write(f"graphopt: error: {_one_line(exc)}\n")
        if verbose:
            logger.debug("details", exc_info=True)
        return int(getattr(exc, "exit_code", EXIT_USAGE))
    except KeyboardInterrupt:
        sys.stderr.write("graphopt: interrupted; no output written\n")
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the one place failures are reported
        exit_code = getattr(exc, "exit_code", None)  # VerificationError, PassError: 1
        if exit_code is not None:
            sys.stderr.write(f"graphopt: error: {_one_line(exc)}\n")
        else:
            sys.stderr.write(
                f"graphopt: internal error: {type(exc).__name__}: {_one_line(exc)} "
                "(re-run with -v for the traceback)\n"
            )
        if verbose:
            logger.exception("traceback")
        return int(exit_code) if isinstance(exit_code, int) else EXIT_FAILED
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)


def _one_line(exc: BaseException) -> str:
    """The message on one line (a multi-line message is joined)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt
