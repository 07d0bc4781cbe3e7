"""Recipes: a conversion pipeline as data (a TOML file or a built-in name), run and verified step by
step.

A recipe lists steps; each step takes the previous step's model and its result is verified against
that input in onnxruntime before the next step runs: exact steps (``simplify``, ``plan-memory``) at
float32 tolerance, lossy steps (``prune``, ``quantize``, ``fp16``) by the SQNR of every output (the
step's ``min_sqnr`` when given), ``plan-memory`` also by executing the model inside its planned
arena, and ``compile`` by running the compiled library (on this host, or under qemu for AArch64 when
the emulator and the arm64 runtime of ``scripts/install-tvm-deps.sh`` are there) against
onnxruntime. A run ends with one table: nodes, params, MACs, model size, arena bytes, fidelity per
output against the original model, latency (``bench=True``), per step.

TOML format::

    name = "my-pipeline"                      # optional
    description = "..."                       # optional
    input_shapes = { x = [1, 3, 320, 320] }   # or { x = "1x3x320x320" }
    calib = "calib.npz"                       # calibration data for prune recovery and quantize

    [[step]]
    kind = "simplify"

    [[step]]
    kind = "prune"
    ratio = 0.3
    recover = true

    [[step]]
    kind = "quantize"
    method = "entropy"
    min_sqnr = 30

    [[step]]
    kind = "plan-memory"

    [[step]]
    kind = "compile"
    target = "aarch64"

Built-in recipes (:data:`BUILTIN_RECIPES`): ``simplify``, ``fast-fp16``, ``edge-int8``,
``prune-int8-arm``. Steps whose capability has not been installed or written yet (pruning,
quantization, memory planning, TVM) raise :class:`~graphopt.core.errors.RecipeError` when the recipe
runs, not when it is loaded, so the engine works with whatever capabilities are present.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import math
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tomllib

import graphopt.algorithms.tvm.runner as runner_mod
from graphopt.algorithms.memory.arena import prove
from graphopt.algorithms.tvm.runner import load_artifact
from graphopt.core.cost import model_cost
from graphopt.core.errors import GraphoptError, RecipeError, VerificationError
from graphopt.core.feeds import open_calibration, random_feeds
from graphopt.core.latency import interleaved_latency
from graphopt.core.loader import load
from graphopt.core.model import Model
from graphopt.core.session import make_session
from graphopt.core.shapes import infer_shapes, parse_input_shapes, prepare
from graphopt.core.verify import sqnr_db
from graphopt.jobs.optimize import ATOL, RTOL, optimize_model
from graphopt.jobs.plan import plan_memory
from graphopt.passes import get_pass, resolve_passes

logger = logging.getLogger(__name__)

_MISSING = object()


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
    return None if 0 < float(v) < 1 else "must be between 0 and 1 (exclusive)"


def _target(v: Any) -> str | None:
    ok = v in ("llvm", "aarch64", "cuda") or str(v).startswith("cuda:")
    return None if ok else "must be llvm, aarch64, cuda or cuda:sm_XX"


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
        "ratio": Option((int, float), _MISSING, _ratio),
        "recover": Option((bool,), True),
        "criterion": Option((str,), "l1", _in("l1", "l2", "bn", "activation")),
        "round_to": Option((int,), None),
        "min_sqnr": Option((int, float), None),
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
    "simplify": ("the default semantics-preserving pipeline (fold, fuse, clean up); exact",
                 '[[step]]\nkind = "simplify"\n'),
    "fast-fp16": ("simplify, then float16 weights and activations (float32 kept where half "
                  "breaks numerics); output SQNR >= 30 dB",
                  '[[step]]\nkind = "simplify"\n\n[[step]]\nkind = "fp16"\n'),
    "edge-int8": ("simplify, int8 QDQ quantization calibrated on --calib (entropy), then a memory "
                  "plan for one activation arena",
                  '[[step]]\nkind = "simplify"\n\n[[step]]\nkind = "quantize"\n'
                  'method = "entropy"\n\n[[step]]\nkind = "plan-memory"\n'),
    "prune-int8-arm": ("simplify, prune 30% of channels with least-squares recovery on --calib, "
                       "int8 quantization, memory plan, and an AArch64 library through TVM",
                       '[[step]]\nkind = "simplify"\n\n[[step]]\nkind = "prune"\nratio = 0.3\n'
                       'recover = true\n\n[[step]]\nkind = "quantize"\n\n'
                       '[[step]]\nkind = "plan-memory"\n\n[[step]]\nkind = "compile"\n'
                       'target = "aarch64"\n'),
}


@dataclass
class Step:
    """One validated step: its kind and its options (defaults filled in)."""

    kind: str
    options: dict[str, Any]
    index: int

    @property
    def label(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self.options.items()
                          if v is not None and v != STEP_OPTIONS[self.kind][k].default)
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


# ------------------------------------------------------------------ loading and validation


def _type_name(types: tuple[type, ...]) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             list: "a list"}
    return " or ".join(dict.fromkeys(names.get(t, t.__name__) for t in types))


def _suggest(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _parse_shapes(value: Any, where: str) -> dict[str, tuple[int, ...]]:
    if not isinstance(value, Mapping):
        raise RecipeError(f"{where}input_shapes must be a table like {{ x = [1, 3, 224, 224] }}")
    out: dict[str, tuple[int, ...]] = {}
    for k, v in value.items():
        if isinstance(v, str):
            out.update(parse_input_shapes([f"{k}:{v}"]))
        elif isinstance(v, list) and all(isinstance(d, int) and not isinstance(d, bool)
                                         and d > 0 for d in v):
            out[k] = tuple(v)
        else:
            raise RecipeError(f"{where}input_shapes.{k} must be a list of positive integers or "
                              f"a string like \"1x3x224x224\", got {v!r}")
    return out


def parse_recipe(data: Mapping[str, Any], source: str = "recipe") -> Recipe:
    """Validate a recipe given as a mapping (parsed TOML). Raises :class:`RecipeError`."""
    where = f"{source}: "
    for key in data:
        if key not in TOP_LEVEL:
            raise RecipeError(f"{where}unknown top-level key '{key}'{_suggest(key, TOP_LEVEL)}; "
                              f"allowed: {', '.join(sorted(TOP_LEVEL))}")
    raw_steps = data.get("step")
    if not raw_steps:
        raise RecipeError(f"{where}no steps: add [[step]] tables with kind = "
                          f"{' | '.join(STEP_OPTIONS)}")
    if not isinstance(raw_steps, list):
        raise RecipeError(f"{where}'step' must be an array of tables ([[step]])")
    steps: list[Step] = []
    for i, raw in enumerate(raw_steps, 1):
        if not isinstance(raw, Mapping):
            raise RecipeError(f"{where}step {i} must be a table")
        kind = raw.get("kind")
        if not isinstance(kind, str):
            raise RecipeError(f"{where}step {i} has no kind; set kind = one of "
                              f"{', '.join(STEP_OPTIONS)}")
        if kind not in STEP_OPTIONS:
            raise RecipeError(f"{where}step {i}: unknown step kind '{kind}'"
                              f"{_suggest(kind, list(STEP_OPTIONS))}; known kinds: "
                              f"{', '.join(STEP_OPTIONS)}")
        spec = STEP_OPTIONS[kind]
        opts: dict[str, Any] = {}
        for k, v in raw.items():
            if k == "kind":
                continue
            if k not in spec:
                known = ", ".join(spec) or "none"
                raise RecipeError(f"{where}step {i} ({kind}): unknown option '{k}'"
                                  f"{_suggest(k, list(spec))}; options of {kind}: {known}")
            o = spec[k]
            ok = isinstance(v, o.types) and not (isinstance(v, bool) and bool not in o.types)
            if not ok:
                raise RecipeError(f"{where}step {i} ({kind}): option '{k}' must be "
                                  f"{_type_name(o.types)}, got {type(v).__name__} {v!r}")
            if isinstance(v, list) and not all(isinstance(x, str) for x in v):
                raise RecipeError(f"{where}step {i} ({kind}): option '{k}' must be a list of "
                                  f"strings, got {v!r}")
            if o.check is not None:
                msg = o.check(v)
                if msg:
                    raise RecipeError(f"{where}step {i} ({kind}): option '{k}' {msg}, got {v!r}")
            opts[k] = v
        for k, o in spec.items():
            if k not in opts:
                if o.default is _MISSING:
                    raise RecipeError(f"{where}step {i} ({kind}): option '{k}' is required")
                opts[k] = o.default
        steps.append(Step(kind, opts, i))
    kinds = [s.kind for s in steps]
    if "compile" in kinds and (kinds.count("compile") > 1 or kinds[-1] != "compile"):
        raise RecipeError(f"{where}compile must be the last step, and there can be only one")
    if "quantize" in kinds and "fp16" in kinds:
        raise RecipeError(f"{where}quantize and fp16 cannot be combined (int8 or float16, "
                          "pick one)")
    for late in ("quantize", "fp16"):
        if late in kinds and "prune" in kinds[kinds.index(late):]:
            raise RecipeError(f"{where}prune must come before {late} (pruning works on float "
                              "weights)")
    calib = data.get("calib")
    if calib is not None and not isinstance(calib, str):
        raise RecipeError(f"{where}calib must be a path string, got {calib!r}")
    name, desc = data.get("name", ""), data.get("description", "")
    if not isinstance(name, str) or not isinstance(desc, str):
        raise RecipeError(f"{where}name and description must be strings")
    shapes = _parse_shapes(data["input_shapes"], where) if "input_shapes" in data else {}
    return Recipe(steps, name, desc, shapes, calib, source)


def load_recipe(spec: str | os.PathLike[str] | Mapping[str, Any] | Recipe) -> Recipe:
    """A built-in name, a TOML file path, a mapping or a Recipe. Raises :class:`RecipeError`."""
    if isinstance(spec, Recipe):
        return spec
    if isinstance(spec, Mapping):
        return parse_recipe(spec)
    text = str(spec)
    if text in BUILTIN_RECIPES:
        desc, toml_text = BUILTIN_RECIPES[text]
        r = parse_recipe(tomllib.loads(toml_text), f"recipe '{text}'")
        r.name, r.description = text, desc
        return r
    p = Path(text)
    if not p.is_file():
        hint = _suggest(text, list(BUILTIN_RECIPES))
        raise RecipeError(f"recipe '{text}' is neither a built-in recipe{hint} "
                          f"({', '.join(BUILTIN_RECIPES)}) nor a TOML file")
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{p}: not valid TOML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{p}: cannot read: {exc}") from None
    r = parse_recipe(data, str(p))
    r.calib = str((p.parent / r.calib).resolve()) if r.calib and not Path(r.calib).is_absolute() \
        and (p.parent / r.calib).exists() else r.calib
    r.name = r.name or p.stem
    return r


def _capability(kind: str) -> Any:
    mod = STEP_MODULES.get(kind)
    if mod is None:
        return None
    try:
        module = importlib.import_module(mod)
    except ImportError as exc:
        raise RecipeError(f"step '{kind}' needs {mod}, not available ({exc})") from None
    if kind == "compile" and not module.tvm_available():
        raise RecipeError("step 'compile' needs apache-tvm, not available (install the tvm extra "
                          "or run scripts/install-tvm-deps.sh)")
    return module


# ------------------------------------------------------------------ running


@dataclass
class StepRecord:
    """What one step did, its check against its input, and the model's numbers after it."""

    kind: str
    label: str
    ok: bool
    check: str  #: how the step was verified, e.g. "exact", "SQNR >= 30 dB", "arena run"
    seconds: float
    nodes: int
    params: int
    macs: int
    model_bytes: int
    arena_bytes: int | None = None
    fidelity: dict[str, float] = field(default_factory=dict)  #: SQNR dB vs the original
    step_sqnr: dict[str, float] = field(default_factory=dict)  #: SQNR dB vs the step's input
    latency_ms: float | None = None
    note: str = ""
    stats: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        return {"step": self.label, "ok": self.ok, "check": self.check, "nodes": self.nodes,
                "params": self.params, "macs": self.macs, "model_bytes": self.model_bytes,
                "arena_bytes": self.arena_bytes, "fidelity_sqnr_db": self.fidelity,
                "step_sqnr_db": self.step_sqnr, "latency_ms": self.latency_ms,
                "seconds": round(self.seconds, 3), "note": self.note}


@dataclass
class RecipeResult:
    """The result of :func:`run_recipe`."""

    recipe: Recipe
    original: Model
    model: Model
    steps: list[StepRecord]
    artifact: Path | None = None
    plan: Any = None
    quant: Any = None
    prune_report: Any = None
    feeds: list[dict[str, np.ndarray]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.steps)

    def table(self) -> list[dict[str, Any]]:
        return [s.row() for s in self.steps]


def _model_bytes(model: Model) -> int:
    return int(model.to_onnx().ByteSize())


def _sqnrs(ref: Mapping[str, np.ndarray], out: Mapping[str, np.ndarray]) -> dict[str, float]:
    res = {}
    for k, v in ref.items():
        if k in out and np.asarray(v).dtype.kind == "f" and np.shape(v) == np.shape(out[k]):
            res[k] = sqnr_db(np.asarray(v, np.float64), np.asarray(out[k], np.float64))
    return res


def _run_all(model: Model, feeds: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Outputs of ``model`` on every feed, concatenated along a new leading axis per output."""
    sess = make_session(model)
    names = [o.name for o in sess.get_outputs()]
    ins = {i.name for i in sess.get_inputs()}
    outs: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for f in feeds:
        for n, v in zip(names, sess.run(names, {k: v for k, v in f.items() if k in ins})):
            outs[n].append(np.asarray(v))
    return {n: np.stack(v) if len({x.shape for x in v}) == 1 else v[0] for n, v in outs.items()}


def _latency_ms(model: Model, feeds: Mapping[str, np.ndarray], runs: int = 20) -> float:
    res = interleaved_latency({"m": model}, feeds, levels=("all",), runs=runs, warmup=1)
    return res["m"]["all"]


def _calib_feeds(calib: Any, model: Model, limit: int = 8) -> list[dict[str, np.ndarray]]:
    """Up to ``limit`` single-sample feed dicts from calibration data ([] when there is none)."""
    if calib is None:
        return []

    return [dict(f) for f in open_calibration(calib, model, batch_size=1, limit=limit)]


def _arena_bytes(model: Model, feeds: Sequence[Mapping[str, np.ndarray]]) -> int | None:
    """Arena of a quick memory plan (no reordering); None when planning fails."""
    try:
        return int(plan_memory(model, reorder=False, feeds=feeds[0] if feeds else None
                               ).arena_bytes)
    except Exception as exc:  # noqa: BLE001 - a number for the table, never a failure
        logger.debug("memory plan for the table failed: %s", exc)
        return None


def run_recipe(model: Model | str | os.PathLike[str],
               recipe: str | os.PathLike[str] | Mapping[str, Any] | Recipe, *,
               input_shapes: Mapping[str, Sequence[int]] | None = None, calib: Any = None,
               output: str | os.PathLike[str] | None = None, bench: bool = False,
               feeds: Sequence[Mapping[str, np.ndarray]] | None = None,
               on_step: Callable[[StepRecord], None] | None = None) -> RecipeResult:
    """Run a recipe on a model, verifying every step against its input.

    Args:
        model: a Model (not changed) or a path.
        recipe: built-in name, TOML path, mapping or :class:`Recipe`.
        input_shapes: fixed input shapes (override the recipe's).
        calib: calibration data (overrides the recipe's ``calib``): ``.npz``, folder, iterable.
        output: where the final ONNX model will be written (the compile step puts its library
            next to it unless it names one).
        bench: measure onnxruntime latency (median of 20 runs, 1 thread) after every step.
        feeds: verification inputs (default: up to 8 calibration samples, else 2 random inputs).
        on_step: called with each step's record as soon as it is verified.

    Raises:
        RecipeError: invalid recipe, or a step whose capability is missing or that needs
            calibration data that was not given.
        VerificationError: a step's output failed its check (the message names the step).
    """
    rec = load_recipe(recipe)
    for s in rec.steps:  # fail before any work when a capability is missing
        _capability(s.kind)
    shapes = dict(rec.input_shapes)
    shapes.update(input_shapes or {})
    calib = calib if calib is not None else rec.calib
    src = model if isinstance(model, Model) else load(model)
    original = prepare(src.clone(), shapes)
    if feeds is None:
        feeds = _calib_feeds(calib, original) or [random_feeds(original, seed=s) for s in (0, 1)]
    feeds = [dict(f) for f in feeds]
    ref = _run_all(original, feeds)
    result = RecipeResult(rec, original, original, [], feeds=feeds)
    current = original
    prev_out = ref
    for step in rec.steps:
        t0 = time.perf_counter()
        runner = _STEP_RUNNERS[step.kind]
        new, check, stats, extra = runner(step, current, shapes, calib, feeds, result, output)
        seconds = time.perf_counter() - t0
        out = _run_all(new, feeds) if extra.get("outputs") is None else extra["outputs"]
        n = extra.get("samples")  # a compiled library may run on the first few feeds only
        ref_n = {k: v[:n] for k, v in ref.items()} if n else ref
        prev_n = {k: v[:n] for k, v in prev_out.items()} if n else prev_out
        step_sqnr = _sqnrs(prev_n, out)
        ok, how = check(prev_n, out)
        cost = model_cost(new)
        record = StepRecord(
            step.kind, step.label, ok, how, seconds, new.num_nodes(), int(cost.params),
            int(cost.macs), _model_bytes(new) if extra.get("bytes") is None else extra["bytes"],
            extra["arena"] if "arena" in extra else _arena_bytes(new, feeds),
            _sqnrs(ref_n, out), step_sqnr,
            _latency_ms(new, feeds[0]) if bench and step.kind != "compile" else
            extra.get("latency"), extra.get("note", ""), stats)
        result.steps.append(record)
        if on_step:
            on_step(record)
        if not ok:
            raise VerificationError(f"recipe step {step.index} ({step.label}) failed its check "
                                    f"({how}): {record.note or step_sqnr}")
        if step.kind != "compile":
            current, prev_out = new, out
    result.model = current
    return result


# ------------------------------------------------------------------ checks


Check = Callable[[Mapping[str, np.ndarray], Mapping[str, np.ndarray]], tuple[bool, str]]


def _exact() -> Check:
    def check(ref: Mapping[str, np.ndarray], out: Mapping[str, np.ndarray]) -> tuple[bool, str]:
        for k, v in ref.items():
            if k not in out or np.shape(out[k]) != np.shape(v):
                return False, "exact (output missing or reshaped)"
            a, b = np.asarray(v, np.float64), np.asarray(out[k], np.float64)
            if a.size and np.max(np.abs(a - b)) > ATOL + RTOL * np.max(np.abs(a)):
                return False, f"exact (rtol {RTOL:g})"
        return True, f"exact (rtol {RTOL:g})"

    return check


#: SQNR floor (dB, every output vs the step's input) for lossy steps whose min_sqnr is not set
DEFAULT_FLOOR_DB: dict[str, float] = {"quantize": 20.0, "prune": 10.0, "fp16": 30.0}


def _min_sqnr(db: float, what: str = "SQNR") -> Check:
    def check(ref: Mapping[str, np.ndarray], out: Mapping[str, np.ndarray]) -> tuple[bool, str]:
        s = _sqnrs(ref, out)
        missing = [k for k in ref if k not in out]
        if missing:
            return False, f"outputs missing: {missing}"
        worst = min(s.values()) if s else math.inf
        nan = any(np.isnan(np.asarray(v, np.float64)).any() for v in out.values()
                  if np.asarray(v).dtype.kind == "f")
        return (not nan and worst >= db), f"{what} >= {db:g} dB"

    return check


# ------------------------------------------------------------------ step runners

StepOutput = tuple[Model, Check, dict[str, Any], dict[str, Any]]


def _simplify(step: Step, model: Model, shapes: Mapping[str, Sequence[int]], calib: Any,
              feeds: Sequence[Mapping[str, np.ndarray]], res: RecipeResult, output: Any
              ) -> StepOutput:
    passes = step.options["passes"]
    plist = resolve_passes(passes if isinstance(passes, str) else list(passes)) if passes else None
    r = optimize_model(model, passes=plist, target=step.options["target"], verify_output=False)
    return r.model, _exact(), r.stats(), {}


def _fp16(step: Step, model: Model, shapes: Mapping[str, Sequence[int]], calib: Any,
          feeds: Sequence[Mapping[str, np.ndarray]], res: RecipeResult, output: Any
          ) -> StepOutput:
    o = step.options
    work = model.clone()
    p = get_pass("fp16", keep_fp32=o["keep_fp32"], keep_io_types=o["keep_io_types"],
                 keep_softmax=o["keep_softmax"], kernels=o["kernels"])
    r = p(work)
    infer_shapes(r.model)
    stats = dict(r.stats)
    stats["kept_fp32"] = len(stats.get("kept_fp32", []))
    return r.model, _min_sqnr(o["min_sqnr"]), stats, {}


def _need_calib(kind: str, calib: Any) -> None:
    if calib is None:
        raise RecipeError(f"step '{kind}' needs calibration data: set calib = \"data.npz\" in the "
                          "recipe, or pass --calib DATA (calib= in the Python API)")


def _prune(step: Step, model: Model, shapes: Mapping[str, Sequence[int]], calib: Any,
           feeds: Sequence[Mapping[str, np.ndarray]], res: RecipeResult, output: Any
           ) -> StepOutput:
    api = _capability("prune")
    o = step.options
    if o["recover"] or o["criterion"] == "activation":
        _need_calib("prune", calib)
    out = api.prune(model, o["ratio"], calib=calib, criterion=o["criterion"],
                    round_to=o["round_to"], recover=o["recover"], input_shapes=shapes or None,
                    measure=False)

    pruned = prepare(out.model, shapes)
    res.prune_report = out.report
    stats = {k: v for k, v in out.stats.items() if isinstance(v, (int, float, str, bool))}
    floor = o["min_sqnr"] if o["min_sqnr"] is not None else DEFAULT_FLOOR_DB["prune"]
    return pruned, _min_sqnr(floor), stats, {
        "note": f"MACs x{out.macs_ratio:.2f}"}


def _quantize(step: Step, model: Model, shapes: Mapping[str, Sequence[int]], calib: Any,
              feeds: Sequence[Mapping[str, np.ndarray]], res: RecipeResult, output: Any
              ) -> StepOutput:
    api = _capability("quantize")
    _need_calib("quantize", calib)
    o = step.options
    first = model.graph.inputs[0].shape if model.graph.inputs else None
    batch = first[0] if first and isinstance(first[0], int) and first[0] > 0 else 8
    q = api.quantize(model, calib, method=o["method"], activations=o["activations"],
                     per_channel=o["per_channel"], min_sqnr=o["min_sqnr"],
                     input_shapes=shapes or None, limit=o["limit"], verify_output=False,
                     batch_size=batch)
    res.quant = q

    qm = prepare(q.model, shapes)
    stats = {k: v for k, v in (q.stats or {}).items() if isinstance(v, (int, float, str, bool))}
    stats["kept_float"] = len(q.kept_float)
    floor = o["min_sqnr"] if o["min_sqnr"] is not None else DEFAULT_FLOOR_DB["quantize"]
    return qm, _min_sqnr(floor), stats, {
        "note": f"{q.activation_dtype} activations, {q.method}"}


def _plan(step: Step, model: Model, shapes: Mapping[str, Sequence[int]], calib: Any,
          feeds: Sequence[Mapping[str, np.ndarray]], res: RecipeResult, output: Any
          ) -> StepOutput:
    mem = _capability("plan-memory")
    o = step.options
    plan = mem.plan_memory(model, strategy=o["strategy"], inplace=o["inplace"],
                           reorder=o["reorder"], feeds=feeds[0] if feeds else None)
    out = mem.apply_order(model.clone(), plan)
    out.metadata["graphopt.memory_plan"] = plan.compact_json()
    res.plan = plan
    exact = _exact()
    note = f"{plan.arena_bytes:,} B arena, naive {plan.naive_bytes:,} B"
    proof_ok = True
    if o["prove"]:
        proof = prove(plan.model, plan, feeds=feeds[0] if feeds else None)
        proof_ok = bool(proof.ok)
        note += "; ran inside the arena: " + ("outputs equal" if proof_ok else "FAILED")

    def check(ref: Mapping[str, np.ndarray], outs: Mapping[str, np.ndarray]) -> tuple[bool, str]:
        ok, how = exact(ref, outs)
        return ok and proof_ok, how + (" + arena execution" if o["prove"] else "")

    return out, check, {"arena_bytes": plan.arena_bytes, "order_changed": plan.order_changed}, {
        "arena": int(plan.arena_bytes), "note": note}


def _arm64_runtime() -> tuple[str, Path] | None:
    """(qemu binary, arm64 root) when AArch64 libraries can be run here under emulation."""
    qemu = shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")
    root = Path(os.environ.get("GRAPHOPT_ARM64_ROOT", "/opt/graphopt-arm64"))
    if qemu and (root / ".complete").is_file() and (root / "usr/bin/python3").exists():
        return qemu, root
    return None


def run_artifact_aarch64(artifact: Path, feeds: Mapping[str, np.ndarray],
                         timeout: float = 600) -> dict[str, np.ndarray]:
    """Run an AArch64 library with ``graphopt/algorithms/tvm/runner.py`` under qemu-user (arm64
    Python + TVM runtime from ``scripts/install-tvm-deps.sh``). Raises GraphoptError when that is
    missing."""
    rt = _arm64_runtime()
    if rt is None:
        raise GraphoptError("cannot run AArch64 code here: qemu-aarch64 or the arm64 runtime "
                            "(scripts/install-tvm-deps.sh) is missing")
    qemu, root = rt

    with tempfile.TemporaryDirectory(prefix="graphopt-a64-") as d:
        args = []
        for k, v in feeds.items():
            p = Path(d) / f"{len(args)}.npy"
            np.save(p, v)
            args += ["--input", f"{k}={p}"]
        out = Path(d) / "out.npz"
        env = dict(os.environ, QEMU_LD_PREFIX=str(root), PYTHONPATH=str(root / "opt/site-packages"),
                   TVM_USE_RUNTIME_LIB="1", PYTHONNOUSERSITE="1")
        env.pop("PYTHONHOME", None)
        cmd = [qemu, "-L", str(root), str(root / "usr/bin/python3"), runner_mod.__file__,
               str(artifact), *args, "--output", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout,
                              check=False)
        if proc.returncode != 0 or not out.is_file():
            raise GraphoptError("running the AArch64 library under qemu failed: "
                                + (proc.stderr.strip().splitlines() or ["no output"])[-1])
        with np.load(out) as z:
            return {k: z[k] for k in z.files}


def _compile(step: Step, model: Model, shapes: Mapping[str, Sequence[int]], calib: Any,
             feeds: Sequence[Mapping[str, np.ndarray]], res: RecipeResult, output: Any
             ) -> StepOutput:
    tvm_mod = _capability("compile")
    o = step.options
    target = o["target"]
    if o["output"]:
        lib = Path(o["output"])
    elif output:
        lib = Path(output).with_suffix(f".{target.split(':')[0]}.so")
    else:
        lib = Path(tempfile.mkdtemp(prefix="graphopt-recipe-")) / f"model.{target}.so"
    in_shapes = {t.name: tuple(int(d) for d in t.shape) for t in model.graph.inputs
                 if t.shape is not None and all(isinstance(d, int) for d in t.shape)}
    cr = tvm_mod.compile_model(model, target, lib, input_shapes=in_shapes or None)
    res.artifact = Path(cr.artifact)
    extra: dict[str, Any] = {"bytes": int(cr.artifact_bytes)}
    stats = {"compile_seconds": round(cr.compile_seconds, 2), "artifact": str(cr.artifact)}
    if not o["run"]:
        extra["outputs"] = _run_all(model, feeds)
        extra["note"] = f"{cr.artifact} (not run: run = false)"
        return model, lambda r, x: (False, "not run"), stats, extra
    runs: list[dict[str, np.ndarray]] = []
    how = ""
    if target == "llvm":
        art = load_artifact(cr.artifact)
        t_runs = []
        for f in feeds:
            t0 = time.perf_counter()
            runs.append(art.run(f))
            t_runs.append((time.perf_counter() - t0) * 1e3)
        extra["latency"] = statistics.median(t_runs)
        how = "ran on this host"
    elif target == "aarch64":
        if _arm64_runtime() is None:
            extra["outputs"] = _run_all(model, feeds)
            extra["note"] = f"{cr.artifact}; not run: no qemu-aarch64/arm64 runtime here"
            return model, lambda r, x: (False, "not run (no qemu)"), stats, extra
        for f in feeds[:2]:
            runs.append(run_artifact_aarch64(Path(cr.artifact), f))
        how = "ran under qemu-aarch64"
    else:
        extra["outputs"] = _run_all(model, feeds)
        extra["note"] = f"{cr.artifact}; not run: needs a {target} device"
        return model, lambda r, x: (False, f"not run ({target})"), stats, extra
    n = len(runs)
    out = {k: np.stack([np.asarray(r[k]) for r in runs]) for k in runs[0]}
    ref_model_out = _run_all(model, feeds[:n])
    extra["outputs"] = out
    extra["samples"] = n
    extra["note"] = f"{cr.artifact} ({cr.artifact_bytes:,} B), {how}"
    db = o["min_sqnr"]

    def check(ref: Mapping[str, np.ndarray], outs: Mapping[str, np.ndarray]) -> tuple[bool, str]:
        ok, _ = _min_sqnr(db)({k: ref_model_out[k] for k in ref_model_out}, outs)
        return ok, f"{how}, SQNR >= {db:g} dB vs onnxruntime"

    return model, check, stats, extra


_STEP_RUNNERS: dict[str, Callable[..., StepOutput]] = {
    "simplify": _simplify, "fp16": _fp16, "prune": _prune, "quantize": _quantize,
    "plan-memory": _plan, "compile": _compile,
}


def describe_builtin() -> list[tuple[str, str, list[str]]]:
    """(name, description, step labels) of every built-in recipe."""
    return [(n, d, [s.label for s in load_recipe(n).steps]) for n, (d, _) in
            BUILTIN_RECIPES.items()]
