"""The run job (``graphopt run``, ``graphopt.run``): run an ONNX model in onnxruntime or a library
written by ``graphopt compile`` on given inputs, and optionally write the outputs to an ``.npz``.

Inputs are checked against the model (or the library's manifest) first: an unknown input name, a
missing input, a wrong rank, static dim or dtype kind is a :class:`~graphopt.core.errors.FeedError`
naming the input. An ONNX model run without inputs gets seeded random ones.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from graphopt.core.errors import GraphoptError
from graphopt.core.feeds import FileFeeds, InputSpec, check_feeds, random_feeds, read_array
from graphopt.core.model import Model
from graphopt.core.output import atomic_output
from graphopt.core.session import run_model
from graphopt.core.shapes import check_run_size
from graphopt.core.validate import ort_reason
from graphopt.jobs.common import (
    ModelLike,
    as_model,
    jsonable,
    output_path,
    path_or_none,
    source_path,
)
from graphopt.jobs.compile import open_artifact

#: an input: an array, or the path of a ``.npy`` file
InputValue = np.ndarray | str | os.PathLike[str]


@dataclass
class RunResult:
    """The outputs of one run.

    Attributes:
        artifact: the model or library run (its path; None for a model built in memory).
        outputs: output name -> array.
        output_file: the ``.npz`` written (None when not asked for).
    """

    artifact: str | None
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    output_file: Path | None = None

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per output: shape, dtype, min and max."""
        out: dict[str, dict[str, Any]] = {}
        for k, v in self.outputs.items():
            num = v.size > 0 and v.dtype.kind in "biuf"
            out[k] = {
                "shape": list(v.shape),
                "dtype": str(v.dtype),
                "min": v.min().item() if num else None,
                "max": v.max().item() if num else None,
            }
        return out

    def to_json(self) -> dict[str, Any]:
        """The ``graphopt run --json`` object."""
        return jsonable(
            {
                "artifact": self.artifact,  # type: ignore[no-any-return]
                "outputs": self.summary(),
                "output_file": path_or_none(self.output_file),
            }
        )


def _arrays(inputs: Mapping[str, InputValue]) -> FileFeeds:
    """The inputs as arrays (``.npy`` files read and checked), each remembering its file."""
    return FileFeeds(
        {
            k: v if isinstance(v, np.ndarray) else read_array(v, f"input '{k}'")
            for k, v in inputs.items()
        },
        {k: v for k, v in inputs.items() if not isinstance(v, np.ndarray)},
    )


def run(
    artifact: ModelLike,
    inputs: Mapping[str, InputValue] | None = None,
    *,
    output: str | os.PathLike[str] | None = None,
    seed: int = 0,
) -> RunResult:
    """Run an ONNX model (onnxruntime, ``ORT_DISABLE_ALL``) or a compiled library once.

    Args:
        artifact: a Model, the path of an ``.onnx`` file, or a library from ``graphopt compile``.
        inputs: input name -> array or ``.npy`` path; every input must be given, except that an
            ONNX model run without any inputs gets seeded random ones.
        output: write the outputs to this ``.npz`` (atomically).
        seed: seed of the random inputs.

    Raises:
        FeedError: an input cannot be read or does not match the model.
        ModelLoadError, GraphoptError: the model or library cannot be loaded.
    """
    src = artifact if isinstance(artifact, Model) else Path(artifact)
    out_path = output_path(output, artifact, inputs=(inputs or {}).values())
    given = _arrays(inputs or {})
    if isinstance(src, Model) or src.suffix.lower() == ".onnx":
        model = as_model(artifact, smoke=False)
        check_run_size(model, infer=True)
        feeds = check_feeds(model, given, "--input") if given else random_feeds(model, seed=seed)
        try:
            outs = run_model(model, feeds)
        except GraphoptError:
            raise
        except Exception as exc:  # noqa: BLE001 - onnxruntime's refusal of the user's model
            raise GraphoptError(
                f"onnxruntime cannot run {source_path(artifact) or 'the model'} on "
                f"{'these inputs' if inputs else 'random inputs'}: {ort_reason(exc)}"
            ) from None
    else:
        art = open_artifact(src)
        specs = {
            i["name"]: InputSpec(i["name"], tuple(int(d) for d in i["shape"]), np.dtype(i["dtype"]))
            for i in art.inputs
        }
        outs = art.run(check_feeds(specs, given, "--input"))
    res = RunResult(source_path(artifact), {k: np.asarray(v) for k, v in outs.items()})
    if out_path is not None:
        with atomic_output(out_path) as f:
            np.savez(f, **res.outputs)  # type: ignore[arg-type]  # numpy's stub: **kwds: bool
        res.output_file = out_path
    return res
