"""The inspect job (``graphopt inspect``, ``graphopt.inspect``): I/O, opset, op histogram, params,
MACs and activation memory of a model.

The JSON keys are fixed by DESIGN.md (``nodes``, ``ops``, ``params``, ``param_bytes``, ``macs``,
``activation_bytes`` {naive, peak}, ``inputs``, ``outputs``, ``opset``). A model given by path is
loaded without reading its external weights: every figure comes from the tensors' dims, so a
model of several GB is inspected in seconds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from graphopt.core.cost import ModelCost, model_cost
from graphopt.core.model import Model
from graphopt.core.shapes import prepare
from graphopt.jobs.common import ModelLike, as_model, jsonable, source_path


@dataclass
class InspectResult:
    """A model's summary.

    Attributes:
        model: the model inspected (input shapes fixed, shapes inferred; a copy when a Model was
            given).
        cost: MACs, params and activation bytes per node and in total.
        path: the file inspected (None for a model built in memory).
        per_node: whether :meth:`to_json` lists every node's cost.
    """

    model: Model
    cost: ModelCost
    path: str | None = None
    per_node: bool = False

    @property
    def producer(self) -> str:
        return f"{self.model.producer_name} {self.model.producer_version}".strip()

    def to_json(self) -> dict[str, Any]:
        """The ``graphopt inspect --json`` object."""
        m, cost = self.model, self.cost
        info: dict[str, Any] = {
            "model": self.path,
            "opset": m.opset,
            "opset_imports": m.opset_imports,
            "ir_version": m.ir_version,
            "producer": self.producer,
            "inputs": [
                {"name": t.name, "shape": t.shape, "dtype": str(t.dtype)} for t in m.graph.inputs
            ],
            "outputs": [
                {"name": t.name, "shape": t.shape, "dtype": str(t.dtype)} for t in m.graph.outputs
            ],
            "nodes": m.num_nodes(),
            "nodes_main_graph": m.num_nodes(subgraphs=False),
            "subgraphs": m.num_subgraphs(),
            "ops": m.op_histogram(),
            "params": cost.params,
            "param_bytes": cost.param_bytes,
            "macs": cost.macs,
            "flops": cost.flops,
            "activation_bytes": {
                "naive": cost.activation_bytes_naive,
                "peak": cost.activation_bytes_peak,
                "peak_node": cost.peak_node,
                "unknown_shapes": cost.unknown_shapes,
            },
            "metadata": dict(m.metadata),
        }
        if self.per_node:
            info["per_node"] = [vars(n) for n in cost.nodes]
        return jsonable(info)  # type: ignore[no-any-return]


def inspect(
    model: ModelLike,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    per_node: bool = False,
) -> InspectResult:
    """Summarize a model (a path or a Model; a Model is not modified).

    Args:
        model: the model, or the path of an ONNX file (its external weights are not read).
        input_shapes: fixed shapes for dynamic inputs (``{"x": (1, 3, 640, 640)}``).
        per_node: also list every node's cost in :meth:`InspectResult.to_json`.
    """
    m = as_model(model, load_weights=False)
    if m is model:
        m = m.clone()
    prepare(m, input_shapes, check_size=False)
    return InspectResult(m, model_cost(m), source_path(model), per_node)
