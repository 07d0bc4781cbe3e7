"""Error types. Everything a user can cause is a :class:`GraphoptError` (CLI exit 2);
anything else that escapes is an internal error (CLI exit 1).

Messages carry names taken from models and files (node, tensor, input names), which may hold
control characters and terminal escape sequences; :func:`terminal_safe` makes such text safe to
print (the command line passes every error message and every name through it)."""

from __future__ import annotations

import re


class GraphoptError(Exception):
    """A problem with the user's input: bad file, bad option, impossible shape. CLI exit 2."""

    exit_code = 2


class ModelLoadError(GraphoptError):
    """The model file is missing, truncated, not ONNX, or its external data cannot be read."""


class ShapeError(GraphoptError):
    """An input shape is malformed, impossible, or does not fit the model."""


class UnknownPassError(GraphoptError):
    """A pass name that the registry does not know."""


class CalibrationError(GraphoptError):
    """Calibration data is missing, malformed or does not match the model's inputs."""


class RecipeError(GraphoptError):
    """A recipe file or named recipe is invalid."""


class OutputPathError(GraphoptError):
    """An output path cannot be written: it is an input, not a regular file, another output of
    the same run, or its folder is not writable (no permission, disk full)."""


class OptionError(GraphoptError):
    """An option of a command, a job or a pass has a value it cannot take."""


class FeedError(GraphoptError):
    """Input arrays (``--input``, ``--feeds``) cannot be read or do not match the model's inputs."""


class VerificationError(Exception):
    """An emitted model does not compute what its input computed, within tolerance. CLI exit 1."""

    exit_code = 1


class PassError(Exception):
    """A pass broke an invariant. Names the pass and the passes that ran before it. CLI exit 1."""

    exit_code = 1

    def __init__(self, pass_name: str, message: str, previous: list[str] | None = None) -> None:
        self.pass_name = pass_name
        self.previous = list(previous or [])
        after = f" (after: {', '.join(self.previous)})" if self.previous else ""
        super().__init__(f"pass '{pass_name}' failed{after}: {message}")


def in_file(path: object | None) -> str:
    """``" in PATH"`` for an error message about a file (empty when there is no path)."""
    return f" in {path}" if path else ""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    s = str(exc).strip()
    return s.splitlines()[0] if s else type(exc).__name__


#: characters that a terminal interprets instead of printing: C0 and C1 controls (ESC, BEL, CR,
#: CSI ...), DEL, bidirectional overrides and isolates, zero-width and invisible format characters,
#: line and paragraph separators, the BOM, interlinear annotations, and lone surrogates
_UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u00ad\u061c\u180e\u200b-\u200f\u2028-\u202e\u2060-\u206f"
    "\ufeff\ufff9-\ufffb\ud800-\udfff]"
)
_SHORT = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _escape_char(m: re.Match[str]) -> str:
    c = m.group(0)
    if c in _SHORT:
        return _SHORT[c]
    n = ord(c)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}"


def terminal_safe(text: object) -> str:
    """``text`` with every character a terminal would interpret (escape sequences, carriage
    returns, bell, bidi overrides, zero-width characters) written as a visible escape
    (``\\x1b``, ``\\r``, ``\\u202e``); other text, non-ASCII letters included, is unchanged."""
    return _UNSAFE.sub(_escape_char, str(text))
