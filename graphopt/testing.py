"""Shared helpers for pass tests (DESIGN.md, "Testing").

:func:`check_pass` runs a pass on a copy of a model and checks, in one call:

1. onnxruntime (``ORT_DISABLE_ALL``, fixed seed) before and after agree within ``rtol``/``atol``
   (or ``min_sqnr_db`` for lossy passes);
2. ``modified`` is what the caller expects, and the result passes
   ``onnx.checker.check_model(full_check=True)``;
3. the caller's structural assertion holds (op counts via :func:`op_counts`);
4. for negative cases (``expect_modified=False``) the model is left exactly as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphopt.core.feeds import random_feeds
from graphopt.core.model import Model
from graphopt.core.pass_manager import Pass, PassResult
from graphopt.core.verify import VerifyReport, verify
from graphopt.passes import get_pass


def op_counts(model: Model) -> dict[str, int]:
    """Op histogram over the main graph and subgraphs."""
    return model.op_histogram()


def full_check(model: Model) -> None:
    """``onnx.checker`` with ``full_check`` (shape inference in strict mode) on the exported
    model."""
    onnx.checker.check_model(model.to_onnx(), full_check=True)


def ort_optimized_ops(model: Model, tmp_path: str | Path) -> dict[str, int]:
    """Op types (by ``op_type``, any domain) of the graph onnxruntime ``ORT_ENABLE_ALL`` makes of
    ``model``: its saved optimized model, written into the folder ``tmp_path``."""
    import onnxruntime as ort

    from graphopt.core.session import session_options

    so = session_options("all")
    dst = Path(tmp_path) / f"ort_optimized_{len(list(Path(tmp_path).iterdir()))}.onnx"
    so.optimized_model_filepath = str(dst)
    ort.InferenceSession(
        model.to_onnx().SerializeToString(), so, providers=["CPUExecutionProvider"]
    )
    got: dict[str, int] = {}
    for n in onnx.load(str(dst)).graph.node:
        got[n.op_type] = got.get(n.op_type, 0) + 1
    return got


def fingerprint(model: Model) -> bytes:
    """Bytes that change whenever the exported model changes."""
    return model.to_onnx().SerializeToString(deterministic=True)


def check_pass(
    model: Model,
    pass_: Pass | str,
    *,
    expect_modified: bool = True,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    min_sqnr_db: float | None = None,
    feeds: Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]] | None = None,
    seed: int = 0,
    structure: Callable[[Model], Any] | None = None,
    checker: bool = True,
    **pass_options: Any,
) -> tuple[PassResult, VerifyReport]:
    """Run ``pass_`` on a clone of ``model`` and assert the DESIGN.md checks. Returns the result.

    Raises ``AssertionError`` with a readable message on any failed check.
    """
    p = get_pass(pass_, **pass_options) if isinstance(pass_, str) else pass_
    original = model.clone()
    before = fingerprint(original)
    work = model.clone()
    if feeds is None:
        feeds = random_feeds(original, seed=seed)
    result = p(work)
    assert result.modified == expect_modified, (
        f"{p.name}: modified={result.modified}, expected {expect_modified} (stats {result.stats})"
    )
    if not expect_modified:
        assert fingerprint(result.model) == before, (
            f"{p.name} reported no change but changed the model"
        )
    if checker:
        full_check(result.model)
    report = verify(
        original, result.model, feeds=feeds, rtol=rtol, atol=atol, min_sqnr_db=min_sqnr_db
    )
    assert report.ok, f"{p.name}: outputs differ: {report.to_json()}"
    if structure is not None:
        structure(result.model)
    return result, report


def tagged_model(value: float, n: int = 256) -> onnx.ModelProto:
    """``y = x @ W`` with every weight equal to ``value``, the value also in the metadata: saved
    with external data, a model paired with another write's data is caught by :func:`read_tag`."""
    w = numpy_helper.from_array(np.full((n, n), value, np.float32), "w")
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
        [w],
    )
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    helper.set_model_props(proto, {"tag": str(value)})
    return proto


def read_tag(path: str | Path) -> float:
    """The tag of a complete :func:`tagged_model`; raises AssertionError for a model holding
    another write's data."""
    proto = onnx.load(str(path))
    tag = float({p.key: p.value for p in proto.metadata_props}["tag"])
    w = numpy_helper.to_array(proto.graph.initializer[0])
    if not np.all(w == tag):
        raise AssertionError(f"model tagged {tag} holds weights {np.unique(w)[:4]}")
    return tag
