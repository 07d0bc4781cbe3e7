"""Property tests on random valid graphs (tests/graphgen.py) for every registered pass.

- the generator: every model passes ``onnx.checker`` (full_check) and runs in onnxruntime with the
  output shapes the generator computed; the IR round trip (import, export) is exact;
- every exact pass (neither ``lossy`` nor ``analysis``) and the default ``optimize`` pipeline: the
  output passes ``onnx.checker`` (full_check) and verifies against the input at fp32 tolerance on
  seeded random feeds; the input model (a clone sharing constant arrays) is left unchanged; a pass
  that reports ``modified=False`` changed nothing;
- analysis passes change nothing; memory plans pass the execution proof
  (graphopt/algorithms/memory/arena.py);
- lossy passes always produce a model that onnx.checker accepts and onnxruntime loads and runs;
  pruning with the pruned channels zeroed first is exact.

Examples per test: ``GRAPHOPT_FUZZ_EXAMPLES`` (default 15, derandomized, so ``make test`` is fast
and deterministic); ``make fuzz`` sets 1000 and draws fresh random examples (the failing example is
printed with a ``@reproduce_failure`` blob).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from graphgen import Generated, generated_models
from hostile_cases import MUTATIONS, mutate
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

from graphopt.core.errors import GraphoptError, VerificationError
from graphopt.core.feeds import random_feeds
from graphopt.core.model import Model
from graphopt.core.session import make_session, run_model
from graphopt.core.shapes import prepare
from graphopt.core.validate import open_model
from graphopt.core.verify import verify
from graphopt.jobs.optimize import ATOL, RTOL, optimize_model
from graphopt.passes import get_pass, registered_passes
from graphopt.testing import fingerprint

EXAMPLES = int(os.environ.get("GRAPHOPT_FUZZ_EXAMPLES", "15"))
LONG_RUN = EXAMPLES > 100

FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=not LONG_RUN,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
    ],
)

PASSES = registered_passes()
EXACT = sorted(n for n, c in PASSES.items() if not c.lossy and not c.analysis)
LOSSY = sorted(n for n, c in PASSES.items() if c.lossy)
ANALYSIS = sorted(n for n, c in PASSES.items() if c.analysis)
#: lossy passes with their own exactness property below
PRUNE = "prune-channels"
QUANTIZE = "quantize-int8"


def _describe(g: Generated) -> None:
    note(f"blocks: {g.blocks}")
    note(onnx.printer.to_text(g.model.graph))


def _prepared(g: Generated) -> Model:
    return prepare(Model.from_onnx(g.model))


def _feeds(m: Model) -> list[dict[str, np.ndarray]]:
    return [random_feeds(m, seed=s) for s in (0, 1)]


def _check_exact(original: Model, out: Model, label: str) -> None:
    onnx.checker.check_model(out.to_onnx(), full_check=True)
    rep = verify(original, out, feeds=_feeds(original), rtol=RTOL, atol=ATOL)
    assert rep.ok, f"{label}: outputs differ: {rep.to_json()}"


# ---------------------------------------------------------------------- the generator itself


@FUZZ
@given(generated_models())
def test_generator_makes_valid_models(g: Generated) -> None:
    _describe(g)
    onnx.checker.check_model(g.model, full_check=True)
    feeds = random_feeds(Model.from_onnx(g.model), seed=0)
    sess = make_session(g.model)
    for o, v in zip(sess.get_outputs(), sess.run(None, feeds)):
        assert tuple(v.shape) == g.output_shapes[o.name], o.name
        assert np.isfinite(v).all(), f"{o.name} is not finite"
    # the IR round trip (graphsurgeon import and export) is exact
    rep = verify(g.model, Model.from_onnx(g.model), feeds=feeds, rtol=0, atol=0)
    assert rep.ok, rep.to_json()


def test_generator_covers_every_block() -> None:
    """Over a modest derandomized run every block of the menu is used at least once."""
    from graphgen import BLOCKS

    seen: set[str] = set()

    @settings(FUZZ, max_examples=max(EXAMPLES, 300))
    @given(generated_models())
    def collect(g: Generated) -> None:
        seen.update(g.blocks)

    collect()
    assert set(BLOCKS) - seen == set()


# ---------------------------------------------------------------------- exact passes


@pytest.mark.parametrize("name", EXACT)
@FUZZ
@given(g=generated_models())
def test_exact_pass_preserves_outputs(name: str, g: Generated) -> None:
    _describe(g)
    m = _prepared(g)
    original = m.clone()
    before = fingerprint(original)
    work = m.clone()
    result = get_pass(name)(work)
    assert fingerprint(original) == before, f"{name} wrote into the input model's weights"
    if not result.modified:
        assert fingerprint(result.model) == before, f"{name} said modified=False but changed it"
    _check_exact(original, result.model, name)
    # a second run on its own output must still be exact (fixed-point iteration relies on it)
    again = get_pass(name)(result.model.clone())
    _check_exact(original, again.model, f"{name} (second run)")


@FUZZ
@given(g=generated_models())
def test_default_pipeline_preserves_outputs(g: Generated) -> None:
    _describe(g)
    m = Model.from_onnx(g.model)
    before = fingerprint(m)
    res = optimize_model(m, verify_output=True)  # raises VerificationError on a mismatch
    assert fingerprint(m) == before, "optimize_model changed its input"
    _check_exact(prepare(Model.from_onnx(g.model)), res.model, "default pipeline")


# ---------------------------------------------------------------------- analysis passes


@pytest.mark.parametrize(
    "name",
    ANALYSIS
    or [pytest.param("-", marks=pytest.mark.skip(reason="no analysis pass is registered"))],
)
@FUZZ
@given(g=generated_models())
def test_analysis_pass_changes_nothing(name: str, g: Generated) -> None:
    _describe(g)
    m = _prepared(g)
    before = fingerprint(m)
    result = get_pass(name)(m)
    assert not result.modified
    assert fingerprint(result.model) == before


def _memory_api():
    try:
        from graphopt.algorithms.memory.arena import prove
        from graphopt.jobs.plan import plan_model as plan_memory
    except ImportError:
        pytest.skip("graphopt.jobs.plan or graphopt.algorithms.memory.arena has not landed")
    return plan_memory, prove


@FUZZ
@given(
    g=generated_models(),
    strategy=st.sampled_from(["greedy-size", "greedy-breadth", "best"]),
    inplace=st.booleans(),
)
def test_memory_plan_passes_execution_proof(g: Generated, strategy: str, inplace: bool) -> None:
    """Every tensor placed where the plan says inside one arena, the model still computes its
    outputs (graphopt.algorithms.memory.arena.prove): no two live tensors overlap."""
    plan_memory, prove = _memory_api()
    _describe(g)
    m = _prepared(g)
    before = fingerprint(m)
    plan = plan_memory(m, strategy=strategy, inplace=inplace)
    assert fingerprint(m) == before, "plan_memory changed its input model"
    assert plan.arena_bytes >= 0
    report = prove(plan.model, plan, feeds=random_feeds(m, seed=0))
    assert report.ok, f"execution proof failed: {report.to_json()}"


# ---------------------------------------------------------------------- lossy passes


def _lossy_pass(name: str, m: Model, method: str):
    if name == QUANTIZE:  # calibrated on random feeds, with the drawn range method
        return get_pass(name, calib=[random_feeds(m, seed=s) for s in range(2)], method=method)
    return get_pass(name)


@pytest.mark.parametrize(
    "name",
    LOSSY or [pytest.param("-", marks=pytest.mark.skip(reason="no lossy pass is registered"))],
)
@FUZZ
@given(g=generated_models(), method=st.sampled_from(["minmax", "percentile", "entropy", "mse"]))
def test_lossy_pass_output_loads_and_runs(name: str, g: Generated, method: str) -> None:
    _describe(g)
    m = _prepared(g)
    original = m.clone()
    before = fingerprint(original)
    result = _lossy_pass(name, m, method)(m.clone())
    assert fingerprint(original) == before, f"{name} wrote into the input model's weights"
    proto = result.model.to_onnx()
    onnx.checker.check_model(proto, full_check=True)
    outs = run_model(proto, random_feeds(original, seed=0))
    names = {o.name for o in original.graph.outputs}
    assert names <= set(outs), f"{name} lost outputs {names - set(outs)}"


# ---------------------------------------------------------------------- pruning: exact when zeroed


def _prune_api():
    if PRUNE not in PASSES:
        pytest.skip(f"{PRUNE} is not registered")
    try:
        from graphopt.algorithms import prune as pd
    except ImportError:
        pytest.skip("graphopt.algorithms.prune has not landed")
    if not hasattr(pd, "zero_pruned"):
        pytest.skip(
            "graphopt.algorithms.prune has no zero_pruned: cannot build the zeroed reference"
        )
    return pd


#: blocks whose channels pruning can follow (conv chains, BN, SE, residuals, concat, pooling)
PRUNE_BLOCKS = (
    "conv",
    "conv_bn",
    "conv_act",
    "conv_scale_shift",
    "batchnorm",
    "activation",
    "se_block",
    "pool",
    "binary_tensors",
    "concat",
    "split",
    "pad_conv",
    "noop",
    "conv_transpose",
    "resize",
    "reshape",
    "gemm",
    "matmul",
)


@FUZZ
@given(
    g=generated_models(blocks=PRUNE_BLOCKS, kinds=("image",), min_blocks=2),
    ratio=st.sampled_from([0.5, 0.75]),
)
def test_pruning_zeroed_channels_first_is_exact(g: Generated, ratio: float) -> None:
    """Zero the channels that pruning will remove, then remove them: the outputs must not change.

    The reference is the model with those channels zeroed (``analysis.zero_pruned``); the pruned
    model is built from the same analysis (``apply_pruning``) and, end to end, by the pass itself
    without recovery (zeroed channels have zero importance, so the pass picks them first).
    """
    pd = _prune_api()
    _describe(g)
    m = _prepared(g)
    zeroed = m.clone()
    an = pd.analyze(zeroed)
    grps = pd.groups(an)
    scores = pd.unit_scores(an, pd.weight_importance(an))
    keep_unit = pd.select(an, grps, scores, ratio, None, 1, 0.0)
    keep_elem = pd.keep_elements(an, keep_unit)
    event(f"channels pruned: {not keep_elem.all()}")
    pd.zero_pruned(zeroed, an, keep_elem)
    pruned = zeroed.clone()
    an2 = pd.analyze(pruned)
    pd.apply_pruning(pruned, an2, keep_elem)
    prepare(pruned)
    _check_exact(zeroed, pruned, f"{PRUNE} (apply_pruning on zeroed channels)")
    if keep_elem.all():
        return
    params_before = sum(int(np.prod(t.shape)) for t in zeroed.initializers().values())
    params_after = sum(int(np.prod(t.shape)) for t in pruned.initializers().values())
    assert params_after < params_before, "channels were selected but no weight got smaller"


# ---------------------------------------------------------------------- crafted defects


@pytest.mark.parametrize("kind", sorted(MUTATIONS))
@FUZZ
@given(g=generated_models(max_blocks=5))
def test_crafted_defects_are_refused_or_handled(kind: str, g: Generated) -> None:
    """The crafted cases of issue 15 (tests/hostile_cases.py) applied to random valid graphs:
    loading and optimizing (with verification) either works or raises a GraphoptError (exit 2);
    nothing else escapes, and a defect that must be refused is."""
    _describe(g)
    with tempfile.TemporaryDirectory() as d:
        path, applied = mutate(g.model, kind, Path(d) / "m")
        try:
            model = open_model(path)
            optimize_model(model, verify_output=True)
        except GraphoptError:
            return
        except VerificationError:
            pytest.fail(f"{kind}: the optimized model does not verify")
    assert MUTATIONS[kind] == "either" or not applied, f"{kind}: a crafted defect was accepted"
