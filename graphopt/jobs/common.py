"""What the jobs share: a model given as a :class:`~graphopt.core.model.Model` or a path, the
output-path rule (the input is never written), and the before/after block of every job that turns
one model into another (optimize, quantize, prune, fp16).

The before/after block is :class:`TransformResult`: the input and output paths, nodes, MACs,
params and weight bytes before and after, op histograms, the verification against the input and
what every pass did. Its :meth:`TransformResult.change_json` gives the JSON keys DESIGN.md fixes
for these commands (``input``, ``output``, ``nodes_before``, ``nodes_after``, ``macs_before``,
``macs_after``, ``verify``, ``passes``); each job's result adds its own keys to it.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from graphopt.core.cost import model_cost
from graphopt.core.errors import VerificationError
from graphopt.core.model import Model
from graphopt.core.output import check_outputs, external_files
from graphopt.core.saver import save
from graphopt.core.validate import check_tensor_io, open_model
from graphopt.core.verify import VerifyReport
from graphopt.jobs.report import write_report

logger = logging.getLogger(__name__)

#: a Model, or the path of an ONNX file
ModelLike = Model | str | os.PathLike[str]


def as_model(
    model: ModelLike,
    load_weights: bool = True,
    runs: bool = True,
    tensors_only: str | None = None,
    smoke: bool = True,
    keep_session: bool = False,
    keep_outputs: bool = False,
) -> Model:
    """``model`` itself when it is a :class:`Model`, else the model loaded from that path and
    validated (:func:`graphopt.core.validate.open_model`: every field of the file, and
    onnxruntime's loader when the weights are loaded).

    Args:
        model: a Model or the path of an ONNX file.
        load_weights: ``False``: external weights are checked but not read, enough to inspect
            (onnxruntime is not asked).
        runs: the job runs the model (verifies, calibrates): onnxruntime must have kernels for
            it. ``False`` (``optimize --no-verify``) lets a model onnxruntime cannot run through.
        tensors_only: the name of a command that works on numeric tensors only: a model with an
            optional, sequence, map or string input or output is refused (exit 2).
        smoke: run a small model once on generated inputs first (off for ``run``, which runs
            it on the user's inputs at once).
        keep_session: a model loaded here keeps the session its validation opened, for the
            job's own run of it (:func:`graphopt.core.session.take_session`).
        keep_outputs: the job's own run is on the seeded inputs: a large model loaded here is
            run on them while it is validated, its outputs kept for that run
            (:func:`graphopt.core.validate.check_runnable`).
    """
    m = (
        model
        if isinstance(model, Model)
        else open_model(
            model,
            load_weights=load_weights,
            runs=runs,
            smoke=smoke,
            keep_session=keep_session,
            keep_outputs=keep_outputs,
        )
    )
    if tensors_only:
        check_tensor_io(m, tensors_only)
    return m


def source_path(model: ModelLike) -> str | None:
    """The file a model comes from: the path given, or the path a :class:`Model` was loaded
    from (None for a model built in memory)."""
    if isinstance(model, Model):
        return str(model.path) if model.path is not None else None
    return str(model)


def output_paths(
    source: ModelLike | None, *outputs: str | os.PathLike[str] | None, inputs: Iterable[object] = ()
) -> list[Path | None]:
    """Check every output of a run before any work (:func:`graphopt.core.output.check_outputs`):
    none may be the input model, its external data, another input file, a folder, a device node
    or FIFO, or another output of the run.
    Returns the outputs as Paths, None where none was asked for, in the given order.

    Raises:
        OutputPathError: an output that cannot be written.
    """
    src = source_path(source) if source is not None else None
    files = [str(x) for x in inputs if isinstance(x, (str, os.PathLike))]
    if isinstance(source, Model):  # the input's external data files are inputs too
        files += [str(f) for f in getattr(source, "external_files", [])]
    elif src is not None:
        files += [str(f) for f in external_files(src)]
    checked = iter(check_outputs(inputs=[src, *files], outputs=outputs))
    return [None if o is None else next(checked) for o in outputs]


def output_path(
    output: str | os.PathLike[str] | None,
    source: ModelLike | None = None,
    inputs: Iterable[object] = (),
) -> Path | None:
    """:func:`output_paths` for a run with one output."""
    return output_paths(source, output, inputs=inputs)[0]


def lossy_floors(
    min_sqnr: float | None, min_cosine: float | None, default_sqnr: float
) -> tuple[float | None, float | None]:
    """The SQNR and cosine floors of a lossy command's check.

    ``min_sqnr`` (dB) defaults to the command's ``default_sqnr``; ``min_sqnr <= 0`` turns the
    check's floors off (the output is written whatever its SQNR, with a warning; NaN or inf where
    the original has none still fails, which only ``--force`` overrides). The cosine
    floor defaults to the lowest cosine that noise at the SQNR floor can give,
    ``sqrt(1 - 10^(-SQNR/10))`` (0.949 at 10 dB, 0.9995 at 30 dB), so it only bites when set
    higher, or when the SQNR floor is lowered; ``min_cosine`` sets it.

    Returns:
        ``(min_sqnr_db, min_cosine)``: ``-inf`` and None when off.
    """
    sqnr = default_sqnr if min_sqnr is None else float(min_sqnr)
    if sqnr <= 0:
        logger.warning(
            "no accuracy floor (--min-sqnr %g): the output is written whatever its SQNR", sqnr
        )
        return -math.inf, min_cosine
    cos = math.sqrt(1.0 - 10.0 ** (-sqnr / 10.0)) if min_cosine is None else float(min_cosine)
    return sqnr, round(cos, 4)


def decide(
    report: VerifyReport | None,
    *,
    what: str,
    judged_on: str,
    advice: str,
    force: bool = False,
    writing: bool = True,
) -> None:
    """Let the check decide: when ``report`` failed, raise :class:`VerificationError` (exit 1;
    the caller writes nothing) naming the output, the figure, the floor, the data it was judged
    on and what to do; with ``force`` (or when nothing is to be written) log a warning instead.

    Args:
        report: the check (None: not run; nothing to decide).
        what: the result in words (``"int8 model"``).
        judged_on: the inputs it was judged on (``"16 calibration samples"``).
        advice: what the user can do.
        force: write anyway (``--force``), with a warning.
        writing: the job was asked to write something.
    """
    if report is None or report.ok:
        return
    msg = f"{what} failed its check on {judged_on}: {report.failure()}"
    if force:
        logger.warning("%s; written anyway (--force)", msg)
        return
    if not writing:
        logger.warning("%s", msg)
        return
    raise VerificationError(f"{msg}; not written. {advice}")


def jsonable(obj: Any) -> Any:
    """``obj`` with numpy scalars and arrays, paths, tuples and non-finite floats turned into
    what :func:`json.dumps` writes as standard JSON (NaN -> null, inf -> "inf")."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        if math.isnan(f):
            return None
        if math.isinf(f):
            return "inf" if f > 0 else "-inf"
        return f
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    return obj


def path_or_none(p: str | os.PathLike[str] | None) -> str | None:
    return None if p is None else os.fspath(p)


@dataclass(frozen=True)
class ModelNumbers:
    """The figures the before/after block compares."""

    nodes: int
    ops: dict[str, int]
    params: int
    param_bytes: int
    macs: int
    activation_peak: int

    @classmethod
    def of(cls, model: Model) -> ModelNumbers:
        cost = model_cost(model)
        return cls(
            model.num_nodes(),
            model.op_histogram(),
            int(cost.params),
            int(cost.param_bytes),
            int(cost.macs),
            int(cost.activation_bytes_peak),
        )


@dataclass(kw_only=True)
class TransformResult:
    """What a job that turns one model into another did (optimize, quantize, prune, fp16).

    Attributes:
        model: the transformed model.
        original: the input model as the job saw it (input shapes fixed, shapes inferred);
            None when the job did not keep it (``optimize`` of a file without a report or
            ``bench``: the input's IR becomes the result, its figures are taken in ``before``
            and its outputs computed before the passes).
        verify: the transformed model against the input in onnxruntime (None when skipped).
        input: the input file (None for a model built in memory).
        output: the file written (None when the job was not asked to write one).
        report_path: the HTML report written (None when not asked for).
        seconds: wall time of the job, writing included.
    """

    model: Model
    original: Model | None
    verify: VerifyReport | None = None
    input: str | None = None
    output: Path | None = None
    report_path: Path | None = None
    seconds: float = 0.0
    #: ``model.to_onnx()`` made while verifying, for the writer (None when there is none; reset
    #: by whoever replaces or changes ``model``)
    export: onnx.ModelProto | None = field(default=None, repr=False, compare=False)

    @cached_property
    def before(self) -> ModelNumbers:
        """Nodes, op histogram, params, MACs and activation peak of the input."""
        return ModelNumbers.of(self.kept_original())

    @cached_property
    def after(self) -> ModelNumbers:
        """The same figures for the transformed model."""
        return ModelNumbers.of(self.model)

    def kept_original(self) -> Model:
        """``original``; raises ValueError when the job did not keep it."""
        if self.original is None:
            raise ValueError(
                "the job did not keep its input model (optimize keeps it with keep_original=True, "
                "a report or bench)"
            )
        return self.original

    def pass_stats(self) -> dict[str, dict[str, Any]]:
        """What each pass (or step) did: ``{name: {counter: value}}``."""
        return {}

    def verify_json(self) -> dict[str, Any] | None:
        """Per output: ``max_abs_err``, ``cosine``, ``sqnr_db`` (and more)."""
        return self.verify.to_json() if self.verify is not None else None

    def change_json(self) -> dict[str, Any]:
        """The shared before/after keys of the optimize, quantize, prune and fp16 JSON."""
        b, a = self.before, self.after
        return {
            "input": self.input,
            "output": path_or_none(self.output),
            "nodes_before": b.nodes,
            "nodes_after": a.nodes,
            "macs_before": b.macs,
            "macs_after": a.macs,
            "params_before": b.params,
            "params_after": a.params,
            "param_bytes_before": b.param_bytes,
            "param_bytes_after": a.param_bytes,
            "ops_before": b.ops,
            "ops_after": a.ops,
            "verify": self.verify_json(),
            "passes": self.pass_stats(),
            "report": path_or_none(self.report_path),
            "seconds": round(self.seconds, 3),
        }

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` object of the command (JSON-ready: no NaN, no numpy types)."""
        return jsonable(self.change_json())  # type: ignore[no-any-return]


def write_outputs(
    res: TransformResult,
    out_path: Path | None,
    report_path: Path | None,
    title: str,
    *,
    verified: bool = True,
    **report: Any,
) -> None:
    """Write what a transforming job was asked to write: the model (``res.output``) and the HTML
    report (``res.report_path``, titled ``title`` and the input's file name).

    Args:
        verified: False when the model was not checked (a warning says it is written anyway).
        report: further sections of the report (:func:`graphopt.jobs.report.write_report`).
    """
    if out_path is not None:
        if not verified:
            logger.warning("%s is written unverified (--no-verify)", out_path)
        res.output = save(res.model, out_path, proto=res.export)
        res.export = None  # written: not needed any more
    if report_path is not None:
        name = Path(res.input).name if res.input else "model"
        res.report_path = write_report(
            report_path, res.kept_original(), res.model, title=f"{title} {name}", **report
        )
