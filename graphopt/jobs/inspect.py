"""Model summary for ``graphopt inspect`` and ``graphopt.inspect``: I/O, opset, op histogram,
params, MACs and activation memory. The JSON keys are fixed by DESIGN.md (``nodes``, ``ops``,
``params``, ``param_bytes``, ``macs``, ``activation_bytes`` {naive, peak}, ``inputs``, ``outputs``,
``opset``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from graphopt.core.cost import ModelCost, model_cost
from graphopt.core.model import Model
from graphopt.core.shapes import prepare
from graphopt.jobs.common import ModelLike, as_model


def inspect(model: ModelLike, input_shapes: Mapping[str, Sequence[int]] | None = None,
            per_node: bool = False) -> dict[str, Any]:
    """The ``graphopt inspect --json`` summary of a model (a path or a Model; not modified)."""
    m = prepare(as_model(model).clone(), input_shapes)
    return inspect_model(m, per_node=per_node)


def inspect_model(model: Model, per_node: bool = False, cost: ModelCost | None = None
                  ) -> dict[str, Any]:
    """A JSON-ready summary of a model whose shapes have been inferred."""
    cost = cost or model_cost(model)
    info: dict[str, Any] = {
        "opset": model.opset,
        "opset_imports": model.opset_imports,
        "ir_version": model.ir_version,
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "inputs": [{"name": t.name, "shape": t.shape, "dtype": str(t.dtype)}
                   for t in model.graph.inputs],
        "outputs": [{"name": t.name, "shape": t.shape, "dtype": str(t.dtype)}
                    for t in model.graph.outputs],
        "nodes": model.num_nodes(),
        "nodes_main_graph": model.num_nodes(subgraphs=False),
        "subgraphs": model.num_subgraphs(),
        "ops": model.op_histogram(),
        "params": cost.params,
        "param_bytes": cost.param_bytes,
        "macs": cost.macs,
        "flops": cost.flops,
        "activation_bytes": {"naive": cost.activation_bytes_naive,
                             "peak": cost.activation_bytes_peak,
                             "peak_node": cost.peak_node,
                             "unknown_shapes": cost.unknown_shapes},
        "metadata": dict(model.metadata),
    }
    if per_node:
        info["per_node"] = [vars(n) for n in cost.nodes]
    return info
