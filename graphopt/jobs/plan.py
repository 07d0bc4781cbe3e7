"""The plan job (``graphopt plan``, ``graphopt.plan_memory``): prepare a model (fixed input shapes,
inferred shapes), size the tensors shape inference leaves unknown by one node-by-node run, search a
node order with a lower peak, and plan every activation into one arena
(:mod:`graphopt.algorithms.memory.planner`); optionally prove the plan by running the model inside
the arena, draw it, and write the model in the planned order with the plan in its metadata
(``graphopt.memory_plan``) and beside it (``OUT.memplan.json``).

:func:`plan_model` is the planning step alone (a :class:`MemoryPlan`, no I/O), for the other jobs
and for tests of the planner.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import onnx

from graphopt.algorithms.memory.arena import ProofReport, probe_unknown, prove
from graphopt.algorithms.memory.order import reorder_for_memory
from graphopt.algorithms.memory.planner import ALIGNMENT, MemoryPlan, plan_order
from graphopt.core.errors import VerificationError
from graphopt.core.feeds import (
    FeedSource,
    check_feeds,
    drawn_shapes,
    dynamic_dims,
    feed_list,
    random_feeds,
)
from graphopt.core.gcpolicy import with_job_gc
from graphopt.core.model import Model
from graphopt.core.saver import save
from graphopt.core.session import take_session
from graphopt.core.shapes import is_static, prepare, shape_snapshot
from graphopt.core.verify import verify
from graphopt.jobs.common import (
    ModelLike,
    as_model,
    jsonable,
    output_paths,
    path_or_none,
    source_path,
)
from graphopt.jobs.report import write_report

logger = logging.getLogger(__name__)

#: metadata key of the compact plan in a planned model
PLAN_METADATA_KEY = "graphopt.memory_plan"
#: suffix of the full plan written beside a planned model
PLAN_FILE_SUFFIX = ".memplan.json"


#: the draw of the dynamic dims (:data:`graphopt.core.feeds.DIM_DRAWS`) a model is planned at
#: when neither ``input_shapes`` nor feeds give its dims: the larger one (batch 3, others 64)
PLAN_DRAW = -1


def plan_shapes(
    model: Model,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    feeds: Mapping[str, np.ndarray] | None = None,
) -> tuple[dict[str, list[int]] | None, str]:
    """The concrete input shapes a plan is made for, and where they come from.

    An arena plan holds for one set of input shapes: a model with dynamic dims is planned at
    ``input_shapes`` where given (``"input_shapes"``), else at the shapes of ``feeds``
    (``"feeds"``), else at shapes drawn from its dynamic dims (``"drawn"``, batch 3, other dims
    64). A model whose inputs are all fixed is planned as it is (``"model"``).

    Returns:
        (shapes to fix, or None to fix nothing; the source)
    """
    if input_shapes:
        return {k: list(v) for k, v in input_shapes.items()}, "input_shapes"
    if not dynamic_dims(model):
        return None, "model"
    names = {t.name for t in model.graph.inputs}
    if feeds is not None:
        return {
            k: list(np.shape(v)) for k, v in feeds.items() if k in names and hasattr(v, "shape")
        }, "feeds"
    return drawn_shapes(model, draw=PLAN_DRAW), "drawn"


def plan_model(
    model: ModelLike,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    *,
    strategy: str = "best",
    inplace: bool = True,
    reorder: bool = True,
    feeds: Mapping[str, np.ndarray] | None = None,
    alignment: int = ALIGNMENT,
    prepared: bool = False,
    reuse_inputs: bool = False,
    in_place: bool = False,
) -> MemoryPlan:
    """Plan the activation memory of a model into one arena (no I/O).

    Args:
        model: the model (or its path); it is not changed (a prepared copy is planned, see
            ``plan.model``).
        input_shapes: fixed shapes for dynamic inputs (``{"x": (1, 3, 640, 640)}``); without
            them a model with dynamic dims is planned at the shapes of ``feeds``, else at drawn
            shapes (:func:`plan_shapes`; ``plan.model``'s inputs say which).
        strategy: ``greedy-size``, ``greedy-breadth`` or ``best`` (try all, keep the smallest).
        inplace: let elementwise ops overwrite a dying input and reshapes alias their input.
        reorder: search a node order with a lower peak first (never accepting a worse one).
        feeds: inputs for the one node-by-node run that sizes tensors shape inference cannot
            (data-dependent branches); random inputs when None.
        prepared: ``model`` already has its shapes inferred: plan it as it is (no copy unless
            ``reorder``, which works on a copy).
        reuse_inputs: the caller gives its inputs to the run: their bytes may be reused after
            their last reader and elementwise ops may write into them (default: inputs are the
            caller's, never overwritten).
        in_place: ``model`` is the caller's to give: it is prepared and put in the planned
            order itself (no copy; ``plan.model`` is ``model``). A job that loaded the model
            takes a :func:`~graphopt.core.shapes.shape_snapshot` first to write it as given.

    Returns:
        The :class:`MemoryPlan`; ``plan.model`` is the model it refers to (planned node order).
    """
    model = as_model(model)
    if prepared:
        work = model.clone() if reorder and not in_place else model
    else:
        shapes, _ = plan_shapes(model, input_shapes, feeds)
        work = prepare(model if in_place else model.clone(), shapes)
    if feeds is not None:
        feeds = check_feeds(work, feeds, "--feeds")
    positions = {id(n): i for i, n in enumerate(work.graph.nodes)}
    observed = probe_unknown(work, feeds)
    before = plan_order(
        work,
        inplace=inplace,
        strategy=strategy,
        alignment=alignment,
        observed=observed,
        reuse_inputs=reuse_inputs,
    )
    before.order_index = list(range(len(work.graph.nodes)))
    if not reorder:
        return before
    changed = reorder_for_memory(
        work,
        inplace=inplace,
        strategy=strategy,
        alignment=alignment,
        observed=observed,
        baseline=before,
        reuse_inputs=reuse_inputs,
    )
    if not changed:
        return before
    after = plan_order(
        work,
        inplace=inplace,
        strategy=strategy,
        alignment=alignment,
        observed=observed,
        reuse_inputs=reuse_inputs,
    )
    after.order_changed = True
    after.order_before_lower_bound = before.bound
    after.order_before_arena = before.arena_bytes
    after.order_index = [positions[id(n)] for n in work.graph.nodes]
    return after


def apply_order(model: Model, plan: MemoryPlan) -> Model:
    """Put ``model``'s main-graph nodes in ``plan``'s order (``model`` is the one that was given
    to :func:`plan_model`, or a copy of it); in place, returns ``model``."""
    nodes = list(model.graph.nodes)
    if plan.order_index and len(plan.order_index) == len(nodes):
        model.graph.nodes = [nodes[i] for i in plan.order_index]
    return model


def planned_model(model: Model, plan: MemoryPlan) -> Model:
    """A copy of ``model`` in the plan's node order, the compact plan in its metadata
    (``graphopt.memory_plan``)."""
    out = apply_order(model.clone(), plan)
    out.metadata[PLAN_METADATA_KEY] = plan.compact_json()
    return out


def _dump_plan(plan: MemoryPlan, f: IO[str]) -> None:
    """The full plan's JSON (``OUTPUT.memplan.json``) into ``f``, written as it is encoded."""
    json.dump(jsonable(plan.to_json()), f, indent=1)
    f.write("\n")


def _export_in_order(model: Model, order_index: Sequence[int]) -> onnx.ModelProto:
    """An export of ``model`` with its main-graph nodes back in the order they had before
    ``order_index`` (planned position -> original position) was applied; ``model`` keeps its
    order."""
    planned = list(model.graph.nodes)
    original: list[Any] = [None] * len(planned)
    for pos, i in enumerate(order_index):
        original[i] = planned[pos]
    model.graph.nodes = original
    try:
        return model.to_onnx()
    finally:
        model.graph.nodes = planned


@dataclass
class PlanResult:
    """What :func:`plan_memory` did.

    Attributes:
        plan: the memory plan (offsets, lifetimes, figures); ``plan.model`` is the prepared model
            in the planned order.
        source: the model as given (the planned order applies to it, see :meth:`planned_model`);
            with ``in_planned_order``, already in that order (a model the job loaded and wrote is
            planned in place, then given its declared shapes back).
        input: the file planned (None for a model built in memory).
        proof: with ``prove``: the run of the model inside the arena against onnxruntime.
        output: the planned model written (None when not asked for); ``plan_file`` the full plan
            beside it.
        plot, report_path: the picture and the HTML report written (None when not asked for).
        seconds: time spent planning (proof, plot and writing excluded).
        input_shapes: the concrete input shapes planned for (a plan holds for one set).
        shapes_from: where they come from: ``model`` (its inputs are fixed), ``input_shapes``,
            ``feeds`` or ``drawn`` (from the dynamic dims: batch 3, other dims 64); the written
            model keeps its dynamic dims, its arena offsets hold at these shapes.
    """

    plan: MemoryPlan
    source: Model
    input: str | None = None
    proof: ProofReport | None = None
    output: Path | None = None
    plan_file: Path | None = None
    plot: Path | None = None
    report_path: Path | None = None
    seconds: float = 0.0
    input_shapes: dict[str, list[int]] | None = None
    shapes_from: str = "model"
    in_planned_order: bool = False

    @property
    def arena_bytes(self) -> int:
        return self.plan.arena_bytes

    @property
    def lower_bound_bytes(self) -> int:
        return self.plan.lower_bound_bytes

    @property
    def naive_bytes(self) -> int:
        return self.plan.naive_bytes

    @property
    def model(self) -> Model | None:
        """The prepared model the plan is for (planned order)."""
        return self.plan.model

    def planned_model(self) -> Model:
        """The model as given, in the planned order, with the compact plan in its metadata."""
        if self.in_planned_order:
            out = self.source.clone()
            out.metadata[PLAN_METADATA_KEY] = self.plan.compact_json()
            return out
        return planned_model(self.source, self.plan)

    def to_json(self) -> dict[str, Any]:
        """The ``graphopt plan --json`` object: the plan's figures (``arena_bytes``,
        ``lower_bound_bytes``, ``naive_bytes``, ``inplace``, ``order_changed``, ...) and what was
        written."""
        return jsonable(
            {  # type: ignore[no-any-return]
                "model": self.input,
                **self.plan.summary(),
                "input_shapes": self.input_shapes,
                "shapes_from": self.shapes_from,
                "report": path_or_none(self.report_path),
                "output": path_or_none(self.output),
                "plan_file": path_or_none(self.plan_file),
                "plot": path_or_none(self.plot),
                "seconds": round(self.seconds, 3),
                "proof": self.proof.to_json() if self.proof is not None else None,
            }
        )


@with_job_gc
def plan_memory(
    model: ModelLike,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    *,
    strategy: str = "best",
    inplace: bool = True,
    reorder: bool = True,
    feeds: FeedSource | None = None,
    alignment: int = ALIGNMENT,
    prepared: bool = False,
    prove_plan: bool | None = None,
    output: str | os.PathLike[str] | None = None,
    plot: str | os.PathLike[str] | None = None,
    report: str | os.PathLike[str] | None = None,
    reuse_inputs: bool = False,
) -> PlanResult:
    """The plan job: plan the activation memory of a model into one arena, and optionally prove,
    draw and write it.

    Args:
        model: a Model (not changed) or the path of an ONNX file (never written).
        input_shapes, strategy, inplace, reorder, alignment, prepared, reuse_inputs: as
            :func:`plan_model`.
        feeds: as :func:`plan_model`, or a path in the ``--calib`` formats (its first feed).
        prove_plan: run the model node by node inside the arena and compare with onnxruntime
            (on ``feeds``, else seeded random inputs); also checks that the graph inputs are
            left unchanged. Default (None): when ``output`` is given (a plan is written only
            once it passed its proof); False writes an unproven plan (with a warning).
        output: write the model in the planned order here, the compact plan in its metadata and
            the full plan beside it as ``OUTPUT.memplan.json`` (atomically; only when the
            reordered model matches the input at fp32 tolerance and the plan passed its proof).
        plot: draw the arena over time into this PNG (needs matplotlib).
        report: write a self-contained HTML report here.

    Returns:
        A :class:`PlanResult`; ``to_json()`` is what ``graphopt plan --json`` prints.

    Raises:
        VerificationError: the plan failed its execution proof, or the reordered model differs
            from the input (nothing is written).
    """
    plan_file = None if output is None else Path(str(output) + PLAN_FILE_SUFFIX)
    out_path, plan_path, plot_path, report_path = output_paths(
        model, output, plan_file, plot, report, inputs=[feeds]
    )
    proves = prove_plan is True or (prove_plan is None and out_path is not None)
    # a large model loaded here is run while it is validated, for the proof's reference
    source = as_model(model, keep_session=True, keep_outputs=proves and feeds is None)
    # validation's session of a model loaded here: the execution proof's reference (the planned
    # model computes what the input does); one session less. Not held when nothing is proved.
    reference = take_session(source) if not isinstance(model, Model) else None
    if prove_plan is False or (prove_plan is None and out_path is None):
        reference = None
    given = feed_list(feeds, source, limit=1)  # --feeds: a .npz, a folder, a feed dict
    feeds = given[0] if given else None
    # a model loaded here is planned in place (one IR in memory, no copy of it): its declared
    # shapes are put back before it is written (a report shows the prepared model: copied then)
    own = (
        not isinstance(model, Model)
        and not prepared
        and out_path is not None
        and report_path is None
    )
    restore = shape_snapshot(source) if own else None
    shapes_from = (None, "model") if prepared else plan_shapes(source, input_shapes, feeds)
    t0 = time.perf_counter()
    plan = plan_model(
        source,
        input_shapes,
        strategy=strategy,
        inplace=inplace,
        reorder=reorder,
        feeds=feeds,
        alignment=alignment,
        prepared=prepared,
        reuse_inputs=reuse_inputs,
        in_place=own,
    )
    res = PlanResult(plan, source, input=source_path(model), seconds=time.perf_counter() - t0)
    res.input_shapes, res.shapes_from = shapes_from
    res.in_planned_order = own
    if res.input_shapes is None and plan.model is not None:
        res.input_shapes = {
            t.name: [int(d) for d in t.shape]  # type: ignore[union-attr]
            for t in plan.model.graph.inputs
            if is_static(t.shape)
        }
    if prove_plan is None:
        prove_plan = out_path is not None
    elif not prove_plan and out_path is not None:
        logger.warning("the plan for %s is written without its execution proof", out_path)
    if prove_plan:
        assert plan.model is not None
        res.proof = prove(plan.model, plan, feeds=feeds, reference=reference)
        reference = None
        if not res.proof.ok:
            bad = next((o for o in res.proof.outputs if not o.ok), None)
            why = res.proof.error or (
                f"output '{bad.name}': {bad.reason()}" if bad is not None else "outputs differ"
            )
            raise VerificationError(
                f"the plan failed its execution proof ({why}); not written. Re-run with "
                "--no-inplace, and report the model"
            )
    planned = None
    reference_model: Model | onnx.ModelProto = source
    # taken from the planned (prepared) model before an in-place one gets its declared shapes back
    ranks = {t.name: t.shape for t in plan.model.graph.outputs} if plan.model is not None else {}
    probe = None
    if out_path is not None and res.plan.order_changed:
        probe = feeds if feeds is not None else random_feeds(plan.model or source, seed=0)
    if out_path is not None:
        if restore is not None:  # planned in place: the model as given, in the planned order
            restore()
            planned = source
            planned.metadata[PLAN_METADATA_KEY] = plan.compact_json()
            if res.plan.order_changed:  # the input's order, for the check below
                reference_model = _export_in_order(source, plan.order_index)
        elif isinstance(model, Model) or res.plan.order_changed:
            planned = res.planned_model()
        else:  # a model loaded here, written in the order it came in: no copy of it is needed
            planned = apply_order(source, plan)
            planned.metadata[PLAN_METADATA_KEY] = plan.compact_json()
    if planned is not None:
        # ONNX wants a shape on graph outputs: one the loaded model lacks (ddddocr's common_old
        # declares its output's shape and lists it again in value_info without one, which
        # graphsurgeon's import keeps) gets the planned model's rank, dims left unknown (the
        # plan's shapes hold for its input shapes only); the file was refused as invalid
        for t in planned.graph.outputs:
            if t.shape is None and ranks.get(t.name) is not None:
                t.shape = [None] * len(ranks[t.name])  # type: ignore[arg-type]
    if planned is not None and planned.num_nodes() and res.plan.order_changed:
        # the written model runs its nodes in the planned order: exact against the input
        check = verify(reference_model, planned, feeds=probe)
        if not check.ok:
            raise VerificationError(
                f"the model in the planned order differs from the input on {check.failure()}; "
                "not written. Re-run with --no-reorder, and report the model"
            )
    name = Path(res.input).name if res.input else "model"
    if plot_path is not None:
        from graphopt.algorithms.memory.plot import plot_plan  # noqa: PLC0415 - matplotlib

        plot_plan(
            plan,
            plot_path,
            title=f"{name}: arena {plan.arena_bytes:,} B "
            f"({plan.ratio:.3f}x lower bound), naive {plan.naive_bytes:,} B"
            f"{', in-place' if plan.inplace else ''}",
        )
        res.plot = plot_path
    if planned is not None and out_path is not None and plan_path is not None:
        # the model and its plan are published together: never a new model beside an old plan
        res.output = save(planned, out_path, sidecars={plan_path: lambda f: _dump_plan(plan, f)})
        res.plan_file = plan_path
    if report_path is not None:
        res.report_path = write_report(
            report_path, plan.model or source, None, memory=plan, title=f"graphopt plan: {name}"
        )
    return res
