"""The validation every command shares before any pass runs: the loader's checks of every field a
file can lie about (:func:`graphopt.core.loader.load`), then, for a model that is meant to run,
onnxruntime's own loader on it.

The onnxruntime check opens the model at ``ORT_DISABLE_ALL`` (nothing is computed, no constant is
folded; large weights are handed over without a copy, :func:`graphopt.core.session.make_session`).
What onnxruntime refuses there is the user's to fix, and is a :class:`ModelLoadError` (exit 2) with
onnxruntime's reason on one line: a Conv with ``group=0``, a weight whose shape does not match its
input, a ``Reshape`` to an impossible shape, huge dilations ... A model onnxruntime cannot run
because it lacks a kernel (an ``ai.onnx.ml`` or training op, an opset newer than it knows) is
another matter: nothing is wrong with the file, so ``inspect`` (which never runs a model) works, and
the commands that must run or verify it say that they cannot (:class:`RuntimeUnavailableError`,
exit 2); a command that runs nothing (``optimize --no-verify``) may go on.
"""

from __future__ import annotations

import logging
import os
import re

import numpy as np
import onnxruntime as ort

from graphopt.core.errors import GraphoptError, ModelLoadError, first_line
from graphopt.core.feeds import random_feeds
from graphopt.core.loader import load
from graphopt.core.model import Model
from graphopt.core.session import (
    ZERO_COPY_BYTES,
    SessionOpenError,
    input_names,
    keep_outputs,
    keep_session,
    open_check,
    over_segment_size,
    run_feeds,
    run_session,
)
from graphopt.core.shapes import check_run_size, inputs_static

logger = logging.getLogger(__name__)

#: onnxruntime exception types and messages that mean "no kernel / not supported here", not
#: "this model is wrong"
_UNSUPPORTED_TYPES = ("NotImplemented",)
_UNSUPPORTED_TEXT = (
    "Could not find an implementation for",
    "is not a registered function/op",
    "NOT_IMPLEMENTED",
    "is under development",
    "Unsupported model IR version",
    "is not currently registered or supported",
)
_PREFIX = re.compile(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*\w+\s*:\s*")


class RuntimeUnavailableError(ModelLoadError):
    """onnxruntime cannot run a valid model (no kernel for one of its ops, an opset it does not
    know): graphopt cannot verify or run it. Exit 2."""


_NODE = re.compile(
    r"Non-zero status code returned while running (\S+) node\. Name:'([^']*)' Status Message: "
)
_SOURCE = re.compile(r"/onnxruntime_src/\S+:\d+ [^\[]*?\) ")


def ort_reason(exc: BaseException) -> str:
    """onnxruntime's message on one line, without its ``[ONNXRuntimeError] : 1 : FAIL :`` prefix
    and source locations: ``Conv node 'conv': Input channels C is not equal to ...``."""
    text = _PREFIX.sub("", " ".join(first_line(exc).split()))
    text = _NODE.sub(lambda m: f"{m.group(1)} node '{m.group(2)}': ", text)
    return _SOURCE.sub("", text)


def is_unsupported(exc: BaseException) -> bool:
    """Whether onnxruntime's refusal means it lacks support (a kernel, an opset), rather than that
    the model is invalid."""
    text = str(exc)
    if type(exc).__name__ in _UNSUPPORTED_TYPES:
        return True
    if "ShapeInferenceError" in text or "TypeInferenceError" in text:
        return False
    return any(t in text for t in _UNSUPPORTED_TEXT)


def check_runnable(
    model: Model,
    *,
    require_kernels: bool = True,
    smoke: bool = True,
    keep: bool = False,
    keep_outputs: bool = False,
) -> None:
    """Open ``model`` in onnxruntime (``ORT_DISABLE_ALL``, weights not copied when large) and turn
    a refusal into the user's error.

    Args:
        model: a loaded model (its weights loaded).
        require_kernels: raise :class:`RuntimeUnavailableError` when onnxruntime lacks support for
            the model (otherwise that is only logged: the command runs nothing).
        smoke: also run a small model once (:func:`smoke_run`).
        keep: keep the session for the job's own run of the model
            (:func:`graphopt.core.session.keep_session`) instead of closing it.
        keep_outputs: the job runs the model next on the seeded inputs
            (:func:`graphopt.core.feeds.random_feeds`, seed 0): a model over
            :data:`~graphopt.core.session.SEGMENT_NODES` nodes (whose session is not kept) is
            run on them segment by segment as its segments are opened, and its outputs are
            kept for the job's reference run (:func:`graphopt.core.session.keep_outputs`); a
            failure to run (not to open) leaves the job's own run to report it.

    Raises:
        ModelLoadError: onnxruntime refuses the model (the model is invalid).
        RuntimeUnavailableError: onnxruntime has no kernel for it (``require_kernels`` only).
    """
    name = model.path.name if model.path is not None else "the model"
    try:
        if keep_outputs and _run_segments_and_keep(model):
            return
        # a model over SEGMENT_NODES nodes is opened one segment at a time (None: nothing kept;
        # such a model is over the smoke run's size too)
        sess = open_check(model)
    except GraphoptError:
        raise
    except MemoryError:
        raise ModelLoadError(f"onnxruntime ran out of memory opening {name}") from None
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        reason = ort_reason(exc)
        if is_unsupported(exc):
            if not require_kernels:
                logger.info("onnxruntime cannot run %s: %s", name, reason)
                return
            raise RuntimeUnavailableError(
                f"onnxruntime {ort.__version__} cannot run {name}, so graphopt cannot run or "
                f"verify it: {reason} ('graphopt inspect' works without onnxruntime)"
            ) from None
        raise ModelLoadError(f"onnxruntime refuses {name}: {reason}") from None
    if sess is None:
        return
    if smoke:
        smoke_run(model, sess, name)
    if keep:
        keep_session(model, sess)


def _run_segments_and_keep(model: Model) -> bool:
    """For a model that is opened as segments (:func:`over_segment_size`, weights
    embedded, static tensor inputs that can be generated): open and run every segment on the
    seeded inputs verification uses, one at a time, and keep the outputs. True when it was
    opened that way (outputs kept or, when only running failed, not); False: not such a model
    (the caller opens it as before). Raises what onnxruntime raises on opening a segment."""
    if (
        not over_segment_size(model)
        or model.param_bytes() >= ZERO_COPY_BYTES
        or model.io_types()
        or not inputs_static(model)
    ):
        return False
    try:
        feeds = random_feeds(model, seed=0)
    except GraphoptError:
        return False
    if any(not isinstance(v, np.ndarray) or v.dtype.kind not in "biuf" for v in feeds.values()):
        return False
    try:
        names, rows = run_feeds(model, [feeds])
    except SessionOpenError as exc:
        raise exc.cause from None  # the loader's refusal, as open_check raises it
    except MemoryError:
        return True
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        logger.debug("validation's run of the segments failed: %s", first_line(exc))
        return True
    keep_outputs(model, feeds, dict(zip(names, rows[0])))
    return True


#: the smoke run is made on models up to this many nodes and bytes of weights and of tensors
SMOKE_MAX_NODES = 10_000
SMOKE_MAX_BYTES = 64 << 20


def smoke_run(model: Model, sess: ort.InferenceSession, name: str) -> None:
    """Run a small model once on the seeded inputs verification uses, and turn a kernel's refusal
    into the user's error.

    onnxruntime checks some attributes only when a kernel runs (a Conv with ``group=0``, a weight
    whose channels or kernel do not match, dilations larger than the input, a Reshape to an
    impossible shape); running once finds them before any pass. Only models that are cheap to run
    are: at most :data:`SMOKE_MAX_NODES` nodes and :data:`SMOKE_MAX_BYTES` of weights, static
    tensor inputs, and no tensor over :data:`SMOKE_MAX_BYTES` by ONNX shape inference. Inputs that
    cannot be generated skip the run (the command itself then asks for ``--feeds``).

    Raises:
        ModelLoadError: onnxruntime fails to run the model.
    """
    if model.num_nodes() > SMOKE_MAX_NODES or model.param_bytes() > SMOKE_MAX_BYTES:
        return
    if model.io_types() or not inputs_static(model):
        return
    try:
        feeds = random_feeds(model, seed=0)
        check_run_size(model, SMOKE_MAX_BYTES, infer=True)
    except GraphoptError:
        return  # no generated inputs, or a large model: the command's own checks decide
    if any(not isinstance(v, np.ndarray) or v.dtype.kind not in "biuf" for v in feeds.values()):
        return
    try:
        run_session(sess, None, {k: v for k, v in feeds.items() if k in input_names(sess)})
    except MemoryError:
        return
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise ModelLoadError(
            f"onnxruntime cannot run {name}: {ort_reason(exc)} (on seeded random inputs)"
        ) from None


def check_tensor_io(model: Model, command: str) -> None:
    """Refuse a model whose graph inputs or outputs are not numeric tensors of numpy types
    (optional, sequence, map or string values; bfloat16, float8, int4 ... tensors), for a command
    that only works on those.

    Raises:
        ModelLoadError: naming the first such input or output and its type.
    """
    types = model.io_types()
    for kind, tensors in (("input", model.graph.inputs), ("output", model.graph.outputs)):
        for t in tensors:
            what = types.get(t.name)
            if what is None and t.dtype is not None:
                dtype = np.dtype(t.dtype)
                if dtype.kind in "OUS":
                    what = "tensor(string)"
                elif getattr(dtype.type, "__module__", "") == "ml_dtypes":
                    what = f"tensor({dtype.name})"
            if what is not None:
                raise ModelLoadError(
                    f"graph {kind} '{t.name}' is {what}; 'graphopt {command}' works on models "
                    "whose inputs and outputs are numeric tensors of numpy types (inspect, "
                    "optimize, plan and run take this one)"
                )


def open_model(
    path: str | os.PathLike[str],
    *,
    load_weights: bool = True,
    runs: bool = True,
    smoke: bool = True,
    keep_session: bool = False,
    keep_outputs: bool = False,
) -> Model:
    """Load and validate a model file: what every command does with its input.

    Args:
        path: the ONNX file.
        load_weights: read (memory-map) external weights; ``False`` checks them without reading
            (``inspect``): the model can then be neither run nor saved, and onnxruntime is not
            asked about it.
        runs: the command runs the model (verification, calibration, ``run``): onnxruntime's
            loader must accept it and have kernels for it. ``False`` still refuses a model
            onnxruntime finds invalid, but lets one it merely cannot run through.
        smoke: run a small model once on generated inputs (:func:`smoke_run`); off for a
            command that runs the model on the user's inputs right away (``run``).
        keep_session: keep onnxruntime's session of the model for the command's own run of
            it (:func:`graphopt.core.session.take_session`).
        keep_outputs: the command runs the model next on the seeded inputs: a large model's
            outputs on them are computed while it is validated (:func:`check_runnable`).

    Raises:
        ModelLoadError: anything wrong with the file (see :mod:`graphopt.core.loader`), or
            onnxruntime refuses it.
    """
    model = load(path, load_weights=load_weights)
    if load_weights:
        check_runnable(
            model,
            require_kernels=runs,
            smoke=runs and smoke,
            keep=keep_session,
            keep_outputs=runs and keep_outputs,
        )
    return model
