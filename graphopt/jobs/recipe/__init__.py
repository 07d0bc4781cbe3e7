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

from graphopt.jobs.recipe.parser import describe_builtin, load_recipe, parse_recipe
from graphopt.jobs.recipe.runner import RecipeResult, StepRecord, run_recipe
from graphopt.jobs.recipe.schema import (
    BUILTIN_RECIPES,
    LOSSY,
    STEP_MODULES,
    STEP_OPTIONS,
    Option,
    Recipe,
    Step,
)

__all__ = [
    "BUILTIN_RECIPES",
    "LOSSY",
    "STEP_MODULES",
    "STEP_OPTIONS",
    "Option",
    "Recipe",
    "RecipeResult",
    "Step",
    "StepRecord",
    "describe_builtin",
    "load_recipe",
    "parse_recipe",
    "run_recipe",
]
