"""Tiny hand-built graphs for the fusion and recognition pass tests (not a test module).

Unlike ``helpers_graphs.make_model`` (which runs onnx.checker and so needs declared output shapes),
``build`` declares outputs without shapes and lets ``graphopt.core.shapes.prepare`` infer every
shape, which the fusion rules read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphopt.core.model import Model
from graphopt.core.shapes import prepare

RNG = np.random.default_rng(1234)


def rand(*shape: int, lo: float = -1.0, hi: float = 1.0) -> np.ndarray:
    return RNG.uniform(lo, hi, size=shape).astype(np.float32)


def node(
    op: str, inputs: Sequence[str], outputs: Sequence[str] | str, **attrs: Any
) -> onnx.NodeProto:
    outs = [outputs] if isinstance(outputs, str) else list(outputs)
    domain = attrs.pop("domain", "")
    return helper.make_node(op, list(inputs), outs, name=outs[0] + "_node", domain=domain, **attrs)


def build(
    nodes: Sequence[onnx.NodeProto],
    inputs: Mapping[str, Sequence[int]],
    outputs: Sequence[str],
    inits: Mapping[str, Any] | None = None,
    opset: int = 17,
    graph_inputs_extra: Sequence[onnx.ValueInfoProto] = (),
) -> Model:
    """A model from nodes; initializers from numpy arrays (floats become float32 scalars)."""
    init = []
    for k, v in (inits or {}).items():
        arr = np.asarray(v, dtype=np.float32) if isinstance(v, float) else np.asarray(v)
        init.append(numpy_helper.from_array(arr, k))
    g = helper.make_graph(
        list(nodes),
        "g",
        [helper.make_tensor_value_info(k, TensorProto.FLOAT, list(s)) for k, s in inputs.items()]
        + list(graph_inputs_extra),
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        init,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return prepare(Model.from_onnx(m))


def bn_params(prefix: str, c: int) -> dict[str, np.ndarray]:
    return {
        f"{prefix}.g": rand(c, lo=0.5, hi=1.5),
        f"{prefix}.b": rand(c),
        f"{prefix}.m": rand(c, lo=-0.2, hi=0.2),
        f"{prefix}.v": rand(c, lo=0.5, hi=2.0),
    }


def bn_inputs(prefix: str) -> list[str]:
    return [f"{prefix}.g", f"{prefix}.b", f"{prefix}.m", f"{prefix}.v"]
