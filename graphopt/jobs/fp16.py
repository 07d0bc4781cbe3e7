"""The fp16 job (``graphopt fp16``, ``graphopt.fp16``): convert a model to float16 with the
``fp16`` pass (float32 kept where half precision breaks numerics), check every output's SQNR
against the float32 model in onnxruntime, and write the result only when it holds (floors: SQNR
:data:`MIN_SQNR_DB`, the cosine it implies, NaN/inf matching exactly; ``force`` writes anyway
with a warning, ``min_sqnr=0`` turns the floors off).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from graphopt.core.errors import GraphoptError
from graphopt.core.feeds import FeedSource, feed_list, random_feeds
from graphopt.core.model import Model
from graphopt.core.shapes import infer_shapes, prepare
from graphopt.core.verify import verify
from graphopt.jobs.common import (
    ModelLike,
    TransformResult,
    as_model,
    decide,
    jsonable,
    lossy_floors,
    output_paths,
    source_path,
    write_outputs,
)
from graphopt.passes import get_pass

logger = logging.getLogger(__name__)

#: default floor: every output's SQNR (dB) against the float32 model
MIN_SQNR_DB = 30.0


@dataclass(kw_only=True)
class Fp16Result(TransformResult):
    """What :func:`fp16` did: the before/after block plus the pass's counters.

    Attributes:
        stats: the ``fp16`` pass's counters (``nodes_fp16``, ``casts_inserted``, ...).
        kept_fp32: names of the nodes kept in float32.
    """

    stats: dict[str, Any] = field(default_factory=dict)
    kept_fp32: list[str] = field(default_factory=list)

    def pass_stats(self) -> dict[str, dict[str, Any]]:
        return {"fp16": self.stats}

    def to_json(self) -> dict[str, Any]:
        """The ``graphopt fp16 --json`` object."""
        return jsonable(
            {
                **self.change_json(),  # type: ignore[no-any-return]
                "kept_fp32": self.kept_fp32,
            }
        )


def fp16_model(
    model: Model,
    *,
    keep_fp32: Iterable[str] | str | None = None,
    keep_io_types: bool = True,
    keep_softmax: bool = False,
    kernels: str = "any",
    min_sqnr: float = MIN_SQNR_DB,
    verify_output: bool = True,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    feeds: FeedSource | None = None,
    min_cosine: float | None = None,
    force: bool = False,
) -> Fp16Result:
    """Convert a model in memory to float16 (a converted copy is returned).

    Args:
        keep_fp32: op types or node names kept in float32 (a list or ``"A,B"``).
        keep_io_types: keep float32 graph inputs and outputs (Casts at the edges).
        keep_softmax: keep Softmax in float32.
        kernels: ``any``, or ``native`` to also keep ops onnxruntime CPU has no float16 kernel
            for.
        min_sqnr: every output's SQNR against the float32 model must reach this (dB); 0 turns
            the floors off (with a warning).
        verify_output: run the check (False: no onnxruntime run at all).
        input_shapes: fixed shapes for dynamic inputs.
        feeds: inputs for the check (one feed dict, an iterable of them, or a path in the
            ``--calib`` formats; default: seeded random inputs).
        min_cosine: the cosine floor (default: implied by ``min_sqnr``).
        force: return (and let :func:`fp16` write) the model even when it fails the check.

    Raises:
        VerificationError: an output fails the check (SQNR or cosine below the floor, NaN or inf
            where the float32 model has none), unless ``force``.
    """
    t0 = time.perf_counter()
    given = feed_list(feeds, model)
    original = prepare(model.clone(), input_shapes, given[0] if given else None)
    p = get_pass(
        "fp16",
        keep_fp32=keep_fp32,
        keep_io_types=keep_io_types,
        keep_softmax=keep_softmax,
        kernels=kernels,
        feeds=given if given else _generated(original),  # observed ranges: what overflows half
    )
    res = p(original.clone())
    infer_shapes(res.model)
    report = None
    if verify_output:
        floor_sqnr, floor_cos = lossy_floors(min_sqnr, min_cosine, MIN_SQNR_DB)
        report = verify(
            original, res.model, feeds=given, min_sqnr_db=floor_sqnr, min_cosine=floor_cos
        )
        decide(
            report,
            what="the float16 model",
            judged_on="the given feeds" if feeds is not None else "seeded random inputs",
            advice="Keep more ops in float32 with --keep-fp32 OP,... (Softmax, LayerNormalization "
            "and reductions first), lower --min-sqnr, or write it anyway with --force",
            force=force,
        )
    stats = dict(res.stats)
    kept = list(stats.pop("kept_fp32", []))
    return Fp16Result(
        model=res.model,
        original=original,
        verify=report,
        stats=stats,
        kept_fp32=kept,
        seconds=time.perf_counter() - t0,
    )


def _generated(model: Model) -> dict[str, Any] | None:
    """The seeded inputs the check runs on without feeds (None: none can be generated)."""
    try:
        return random_feeds(model, seed=0)
    except GraphoptError:
        return None


def fp16(
    model: ModelLike,
    *,
    keep_fp32: Iterable[str] | str | None = None,
    keep_io_types: bool = True,
    keep_softmax: bool = False,
    kernels: str = "any",
    min_sqnr: float = MIN_SQNR_DB,
    verify_output: bool = True,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    feeds: FeedSource | None = None,
    output: str | os.PathLike[str] | None = None,
    report: str | os.PathLike[str] | None = None,
    min_cosine: float | None = None,
    force: bool = False,
) -> Fp16Result:
    """The fp16 job: convert to float16, check the SQNR, write the model (and a report).

    Args:
        model: a Model (not changed) or the path of an ONNX file (never written).
        keep_fp32, keep_io_types, keep_softmax, kernels, min_sqnr, verify_output, input_shapes,
            feeds, min_cosine, force: as :func:`fp16_model`.
        output: write the float16 model here (atomically; only once it passed its check).
        report: write a self-contained HTML report here.

    Returns:
        An :class:`Fp16Result`; ``to_json()`` is what ``graphopt fp16 --json`` prints.

    Raises:
        VerificationError: an output fails the check (nothing is written), unless ``force``.
    """
    t0 = time.perf_counter()
    out_path, report_path = output_paths(model, output, report, inputs=[feeds])
    res = fp16_model(
        as_model(model),
        keep_fp32=keep_fp32,
        keep_io_types=keep_io_types,
        keep_softmax=keep_softmax,
        kernels=kernels,
        min_sqnr=min_sqnr,
        verify_output=verify_output,
        input_shapes=input_shapes,
        feeds=feeds,
        min_cosine=min_cosine,
        force=force,
    )
    res.input = source_path(model)
    write_outputs(
        res,
        out_path,
        report_path,
        "graphopt fp16",
        verified=verify_output,
        verify=res.verify,
        summary={
            "nodes kept float32": len(res.kept_fp32),
            "Casts inserted": res.stats.get("casts_inserted", 0),
        },
    )
    res.seconds = time.perf_counter() - t0
    return res
