"""What a recipe is: the step kinds, their options (types, defaults, checks), the built-in
recipes, and the validated :class:`Recipe` / :class:`Step` (no parsing, no running here)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from graphopt.algorithms.prune import PruneRatioError, validate_ratio

#: the default of a required option
MISSING = object()


@dataclass(frozen=True)
class Option:
    """One option of a step kind: accepted types, default, and an optional check of the value."""

    types: tuple[type, ...]
    default: Any = None
    check: Callable[[Any], str | None] | None = None
    doc: str = ""


def _in(*choices: str) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        return None if v in choices else f"must be one of {', '.join(choices)}"

    return check


def _ratio(v: Any) -> str | None:
    try:
        validate_ratio(v, per_group=False)
    except PruneRatioError:
        return "must be between 0 and 1 (0 allowed, 1 not)"
    return None


def _target(v: Any) -> str | None:
    ok = v in ("llvm", "aarch64", "cuda") or str(v).startswith("cuda:")
    return None if ok else "must be llvm, aarch64, cuda or cuda:sm_XX"


def _recover(v: Any) -> str | None:
    if isinstance(v, bool) or v in ("none", "least-squares", "distill"):
        return None
    return f"'{v}' is not one of true, false, none, least-squares, distill"


_STR_LIST = (str, list)
#: step kind -> option name -> Option (``kind`` itself is not an option)
STEP_OPTIONS: dict[str, dict[str, Option]] = {
    "simplify": {
        "passes": Option(_STR_LIST, None, doc="pass names instead of the default pipeline"),
        "target": Option((str,), "portable", _in("portable", "ort")),
    },
    "fp16": {
        "keep_fp32": Option(_STR_LIST, None, doc="op types or node names kept float32"),
        "keep_io_types": Option((bool,), True),
        "keep_softmax": Option((bool,), False),
        "kernels": Option((str,), "any", _in("any", "native")),
        "min_sqnr": Option((int, float), 30.0),
    },
    "prune": {
        "ratio": Option((int, float), MISSING, _ratio),
        "recover": Option(
            (bool, str),
            True,
            _recover,
            doc="true/false, or least-squares, distill (needs torch: graphopt[train]), none",
        ),
        "criterion": Option((str,), "l1", _in("l1", "l2", "bn", "activation", "output")),
        "round_to": Option((int,), None),
        "min_sqnr": Option((int, float), None),
        "steps": Option((int,), 300, doc='recover = "distill": training steps'),
        "time_budget": Option((int, float), None, doc='recover = "distill": seconds'),
    },
    "quantize": {
        "method": Option((str,), "entropy", _in("minmax", "percentile", "entropy", "mse")),
        "activations": Option((str,), "auto", _in("auto", "uint8", "int8")),
        "per_channel": Option((bool,), True),
        "min_sqnr": Option((int, float), None),
        "limit": Option((int,), None, doc="at most this many calibration samples"),
    },
    "plan-memory": {
        "strategy": Option((str,), "best", _in("best", "greedy-size", "greedy-breadth")),
        "inplace": Option((bool,), True),
        "reorder": Option((bool,), True),
        "prove": Option((bool,), True, doc="execute the model inside the planned arena"),
    },
    "compile": {
        "target": Option((str,), "llvm", _target),
        "output": Option((str,), None, doc="library path (default: next to the ONNX output)"),
        "run": Option((bool,), True, doc="run the library to verify it (qemu for aarch64)"),
        "min_sqnr": Option((int, float), 30.0),
    },
}
#: capability each step needs: (module, what to call it in the error)
STEP_MODULES: dict[str, str] = {
    "prune": "graphopt.jobs.prune",
    "quantize": "graphopt.jobs.quantize",
    "plan-memory": "graphopt.jobs.plan",
    "compile": "graphopt.jobs.compile",
}
LOSSY = {"prune", "quantize", "fp16"}
TOP_LEVEL = {"name", "description", "input_shapes", "calib", "step"}

#: built-in recipes: name -> (description, TOML text)
BUILTIN_RECIPES: dict[str, tuple[str, str]] = {
    "simplify": (
        "the default semantics-preserving pipeline (fold, fuse, clean up); exact",
        '[[step]]\nkind = "simplify"\n',
    ),
    "fast-fp16": (
        "simplify, then float16 weights and activations (float32 kept where half "
        "breaks numerics); output SQNR >= 30 dB",
        '[[step]]\nkind = "simplify"\n\n[[step]]\nkind = "fp16"\n',
    ),
    "edge-int8": (
        "simplify, int8 QDQ quantization calibrated on --calib (entropy), then a memory "
        "plan for one activation arena",
        '[[step]]\nkind = "simplify"\n\n[[step]]\nkind = "quantize"\n'
        'method = "entropy"\n\n[[step]]\nkind = "plan-memory"\n',
    ),
    "prune-int8-arm": (
        "simplify, prune 30% of channels with least-squares recovery on --calib, "
        "int8 quantization, memory plan, and an AArch64 library through TVM",
        '[[step]]\nkind = "simplify"\n\n[[step]]\nkind = "prune"\nratio = 0.3\n'
        'recover = true\n\n[[step]]\nkind = "quantize"\n\n'
        '[[step]]\nkind = "plan-memory"\n\n[[step]]\nkind = "compile"\n'
        'target = "aarch64"\n',
    ),
}


@dataclass
class Step:
    """One validated step: its kind and its options (defaults filled in)."""

    kind: str
    options: dict[str, Any]
    index: int

    @property
    def label(self) -> str:
        extra = ", ".join(
            f"{k}={v}"
            for k, v in self.options.items()
            if v is not None and v != STEP_OPTIONS[self.kind][k].default
        )
        return f"{self.kind}({extra})" if extra else self.kind


@dataclass
class Recipe:
    """A validated recipe."""

    steps: list[Step]
    name: str = ""
    description: str = ""
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    calib: str | None = None
    source: str = ""
