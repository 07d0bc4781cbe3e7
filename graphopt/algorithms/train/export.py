"""Write trained tensors back into the ONNX graph they came from, and check the result.

Training changes values, never structure, so the export is a copy of the input ``ModelProto``
with the trained tensors replaced *by name*: initializers and ``Constant`` node values (with the
original dtype and shape; a changed shape is an error). Node list, names, opsets and metadata are
untouched, so every tool that understood the input understands the output, and a structural diff
shows only value changes. (``torch.onnx.export`` would re-trace the module and emit a different
graph: other node names, folded or split ops.)
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from graphopt.core.session import make_session

logger = logging.getLogger(__name__)


def _graphs(g: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield g
    for n in g.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for sub in a.graphs:
                    yield from _graphs(sub)


def replace_tensors(proto: onnx.ModelProto, values: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``proto`` whose initializers / ``Constant`` outputs named in ``values`` hold them.

    Raises:
        KeyError: a name is neither an initializer nor a Constant node output.
        ValueError: a value's shape differs from the tensor it replaces.
    """
    out = copy.deepcopy(proto)
    todo = dict(values)

    def new_tensor(old: onnx.TensorProto, name: str) -> onnx.TensorProto:
        arr = np.asarray(todo.pop(name))
        old_shape = tuple(old.dims)
        if tuple(arr.shape) != old_shape:
            raise ValueError(f"{name}: shape {arr.shape} differs from the graph's {old_shape}")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(old.data_type)
        t = numpy_helper.from_array(np.array(arr, dtype=dtype, order="C"), name)
        return t

    for g in _graphs(out.graph):
        for i, t in enumerate(g.initializer):
            if t.name in todo:
                g.initializer[i].CopyFrom(new_tensor(t, t.name))
        for n in g.node:
            if n.op_type == "Constant" and n.output and n.output[0] in todo:
                for a in n.attribute:
                    if a.name == "value":
                        a.t.CopyFrom(new_tensor(a.t, n.output[0]))
                        a.t.name = a.t.name or n.output[0]
                        break
                else:
                    raise ValueError(f"Constant {n.output[0]} has no tensor value to replace")
    if todo:
        raise KeyError(f"not in the graph: {sorted(todo)[:5]}")
    return out


def write_back(module: Any, proto: onnx.ModelProto) -> onnx.ModelProto:
    """The ONNX model ``proto`` with ``module``'s trained tensors (an :class:`OnnxModule`, or
    anything with ``trained_tensors() -> {name: array}``)."""
    return replace_tensors(proto, module.trained_tensors())


def same_structure(a: onnx.ModelProto, b: onnx.ModelProto) -> list[str]:
    """Differences other than tensor values (empty list: same graph)."""
    diffs = []

    def sig(g: onnx.GraphProto) -> Any:
        nodes = [
            (
                n.op_type,
                n.domain,
                n.name,
                tuple(n.input),
                tuple(n.output),
                tuple(sorted(a.name for a in n.attribute)),
            )
            for n in g.node
        ]
        inits = [(t.name, t.data_type, tuple(t.dims)) for t in g.initializer]
        io = [(v.name, v.type.SerializeToString()) for v in list(g.input) + list(g.output)]
        return nodes, inits, io

    ga, gb = list(_graphs(a.graph)), list(_graphs(b.graph))
    if len(ga) != len(gb):
        return [f"{len(ga)} graphs vs {len(gb)}"]
    for x, y in zip(ga, gb):
        for what, u, v in zip(("nodes", "initializers", "inputs/outputs"), sig(x), sig(y)):
            if u != v:
                diffs.append(f"graph {x.name!r}: {what} differ")
    if [(o.domain, o.version) for o in a.opset_import] != [
        (o.domain, o.version) for o in b.opset_import
    ]:
        diffs.append("opset imports differ")
    return diffs


def ort_run(
    proto: onnx.ModelProto,
    feeds: Mapping[str, np.ndarray],
    outputs: Sequence[str] | None = None,
    level: str = "disable_all",
    threads: int = 2,
) -> list[np.ndarray]:
    """Run ``proto`` in onnxruntime (CPU, graph optimizations ``level``)."""
    sess = make_session(proto, level, threads)
    names = {i.name for i in sess.get_inputs()}
    return sess.run(
        list(outputs) if outputs else None, {k: v for k, v in feeds.items() if k in names}
    )


def max_rel_err(ref: np.ndarray, out: np.ndarray) -> float:
    """``max|ref - out| / max|ref|`` (0 for two empty or all-zero arrays)."""
    ref = np.asarray(ref, np.float64)
    out = np.asarray(out, np.float64)
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    err = float(np.max(np.abs(ref - out))) if ref.size else 0.0
    return err / scale if scale else err


def verify_export(
    module: Any,
    proto: onnx.ModelProto,
    feeds: Sequence[Mapping[str, np.ndarray]],
    rtol: float = 1e-4,
    level: str = "disable_all",
) -> dict[str, float]:
    """Run ``proto`` in onnxruntime and ``module`` in torch on each feed; worst relative error per
    output (``max|d| / max|ref|``). Raises AssertionError above ``rtol``."""
    worst: dict[str, float] = {}
    was_training = module.training
    module.eval()
    try:
        for f in feeds:
            ref = ort_run(proto, f, level=level)
            with torch.no_grad():
                got = module.run({k: torch.from_numpy(np.asarray(v)) for k, v in f.items()})
            for name, r in zip(module.output_names, ref):
                e = max_rel_err(r, got[name].numpy())
                worst[name] = max(worst.get(name, 0.0), e)
    finally:
        module.train(was_training)
    bad = {k: v for k, v in worst.items() if v > rtol}
    if bad:
        raise AssertionError(f"export differs from the module: {bad} (rtol {rtol})")
    return worst
