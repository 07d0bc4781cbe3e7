"""Reading recipes: a built-in name, a TOML file or a mapping, validated against
:mod:`graphopt.jobs.recipe.schema` with messages that name the step and the option (and suggest
the closest known name). Every problem is a :class:`~graphopt.core.errors.RecipeError`.

TOML is read with :mod:`tomllib` (Python 3.11+) or its backport ``tomli`` on Python 3.10 (a
dependency only there).
"""

from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from graphopt.core.errors import RecipeError, ShapeError
from graphopt.core.shapes import parse_input_shapes
from graphopt.jobs.recipe.schema import (
    BUILTIN_RECIPES,
    MISSING,
    STEP_OPTIONS,
    TOP_LEVEL,
    Recipe,
    Step,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


def _type_name(types: tuple[type, ...]) -> str:
    names = {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
    }
    return " or ".join(dict.fromkeys(names.get(t, t.__name__) for t in types))


def _suggest(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _parse_shapes(value: Any, where: str) -> dict[str, tuple[int, ...]]:
    if not isinstance(value, Mapping):
        raise RecipeError(f"{where}input_shapes must be a table like {{ x = [1, 3, 224, 224] }}")
    try:
        return parse_input_shapes(value)
    except ShapeError as exc:
        raise RecipeError(
            f"{where}input_shapes: {exc} (give each input a list of positive integers or a string "
            'like "1x3x224x224")'
        ) from None


def parse_recipe(data: Mapping[str, Any], source: str = "recipe") -> Recipe:
    """Validate a recipe given as a mapping (parsed TOML). Raises :class:`RecipeError`."""
    where = f"{source}: "
    for key in data:
        if key not in TOP_LEVEL:
            hint = _suggest(key, sorted(TOP_LEVEL))
            raise RecipeError(
                f"{where}unknown top-level key '{key}'{hint}; "
                f"allowed: {', '.join(sorted(TOP_LEVEL))}"
            )
    raw_steps = data.get("step")
    if not raw_steps:
        raise RecipeError(
            f"{where}no steps: add [[step]] tables with kind = {' | '.join(STEP_OPTIONS)}"
        )
    if not isinstance(raw_steps, list):
        raise RecipeError(f"{where}'step' must be an array of tables ([[step]])")
    steps: list[Step] = []
    for i, raw in enumerate(raw_steps, 1):
        if not isinstance(raw, Mapping):
            raise RecipeError(f"{where}step {i} must be a table")
        kind = raw.get("kind")
        if not isinstance(kind, str):
            raise RecipeError(
                f"{where}step {i} has no kind; set kind = one of {', '.join(STEP_OPTIONS)}"
            )
        if kind not in STEP_OPTIONS:
            raise RecipeError(
                f"{where}step {i}: unknown step kind '{kind}'"
                f"{_suggest(kind, list(STEP_OPTIONS))}; known kinds: "
                f"{', '.join(STEP_OPTIONS)}"
            )
        spec = STEP_OPTIONS[kind]
        opts: dict[str, Any] = {}
        for k, v in raw.items():
            if k == "kind":
                continue
            if k not in spec:
                known = ", ".join(spec) or "none"
                raise RecipeError(
                    f"{where}step {i} ({kind}): unknown option '{k}'"
                    f"{_suggest(k, list(spec))}; options of {kind}: {known}"
                )
            o = spec[k]
            ok = isinstance(v, o.types) and not (isinstance(v, bool) and bool not in o.types)
            if not ok:
                raise RecipeError(
                    f"{where}step {i} ({kind}): option '{k}' must be "
                    f"{_type_name(o.types)}, got {type(v).__name__} {v!r}"
                )
            if isinstance(v, list) and not all(isinstance(x, str) for x in v):
                raise RecipeError(
                    f"{where}step {i} ({kind}): option '{k}' must be a list of strings, got {v!r}"
                )
            if o.check is not None:
                msg = o.check(v)
                if msg:
                    raise RecipeError(f"{where}step {i} ({kind}): option '{k}' {msg}, got {v!r}")
            opts[k] = v
        for k, o in spec.items():
            if k not in opts:
                if o.default is MISSING:
                    raise RecipeError(f"{where}step {i} ({kind}): option '{k}' is required")
                opts[k] = o.default
        steps.append(Step(kind, opts, i))
    kinds = [s.kind for s in steps]
    if "compile" in kinds and (kinds.count("compile") > 1 or kinds[-1] != "compile"):
        raise RecipeError(f"{where}compile must be the last step, and there can be only one")
    if "quantize" in kinds and "fp16" in kinds:
        raise RecipeError(
            f"{where}quantize and fp16 cannot be combined (int8 or float16, pick one)"
        )
    for late in ("quantize", "fp16"):
        if late in kinds and "prune" in kinds[kinds.index(late) :]:
            raise RecipeError(
                f"{where}prune must come before {late} (pruning works on float weights)"
            )
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
        raise RecipeError(
            f"recipe '{text}' is neither a built-in recipe{hint} "
            f"({', '.join(BUILTIN_RECIPES)}) nor a TOML file"
        )
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{p}: not valid TOML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{p}: cannot read: {exc}") from None
    r = parse_recipe(data, str(p))
    r.calib = (
        str((p.parent / r.calib).resolve())
        if r.calib and not Path(r.calib).is_absolute() and (p.parent / r.calib).exists()
        else r.calib
    )
    r.name = r.name or p.stem
    return r


def describe_builtin() -> list[tuple[str, str, list[str]]]:
    """(name, description, step labels) of every built-in recipe."""
    return [
        (n, d, [s.label for s in load_recipe(n).steps]) for n, (d, _) in BUILTIN_RECIPES.items()
    ]
