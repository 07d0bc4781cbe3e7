"""PyTorch entry point: ``from_torch(module, example_inputs) -> Model`` via ``torch.onnx.export``.

The TorchScript-based exporter (``dynamo=False``) is tried first: it is stable for the convolutional
and MLP modules graphopt targets and needs nothing beyond torch. When it fails (an op it cannot
trace) the dynamo exporter (``dynamo=True``, needs ``onnxscript``) is tried next. The module is put
in ``eval()`` mode for the export and restored afterwards. torch is an optional dependency: without
it a :class:`~graphopt.core.errors.GraphoptError` says how to install it.
"""

from __future__ import annotations

import io
import logging
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx

from graphopt.core.errors import GraphoptError
from graphopt.core.model import Model

logger = logging.getLogger(__name__)


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        raise GraphoptError(
            "from_torch needs PyTorch, which is not installed; install it with "
            "`pip install graphopt[torch]` or `pip install torch --index-url "
            "https://download.pytorch.org/whl/cpu`"
        ) from None
    return torch


def _as_tuple(example_inputs: Any, torch: Any) -> tuple[Any, ...]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs)
    raise GraphoptError(
        "example_inputs must be a tensor or a tuple of tensors, not "
        f"{type(example_inputs).__name__}"
    )


def from_torch(
    module: Any,
    example_inputs: Any,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_axes: Mapping[str, Mapping[int, str] | Sequence[int]] | None = None,
    opset: int = 17,
    dynamo: bool | None = None,
) -> Model:
    """Export a ``torch.nn.Module`` to ONNX and return it as a :class:`Model`.

    Args:
        module: the module (exported in eval mode; its training flag is restored afterwards).
        example_inputs: a tensor or tuple of tensors used to trace the module.
        input_names, output_names: ONNX names (default ``input``/``input_1``..., ``output``...).
        dynamic_axes: e.g. ``{"input": {0: "batch"}}``; other dims are fixed to the example's.
        opset: ONNX opset to export to.
        dynamo: force one exporter (None: TorchScript first, dynamo as fallback).

    Raises:
        GraphoptError: torch missing, bad example inputs, or both exporters failed.
    """
    torch = _torch()
    if not isinstance(module, torch.nn.Module):
        raise GraphoptError(f"from_torch expects a torch.nn.Module, not {type(module).__name__}")
    args = _as_tuple(example_inputs, torch)
    n_in = len(args)
    names_in = (
        list(input_names)
        if input_names
        else (["input"] if n_in == 1 else [f"input_{i}" for i in range(n_in)])
    )
    if len(names_in) != n_in:
        raise GraphoptError(f"{len(names_in)} input_names for {n_in} example inputs")
    attempts = [False, True] if dynamo is None else [bool(dynamo)]
    was_training = module.training
    module.eval()
    errors: list[str] = []
    try:
        for use_dynamo in attempts:
            try:
                proto = _export(
                    torch, module, args, names_in, output_names, dynamic_axes, opset, use_dynamo
                )
            except GraphoptError:
                raise
            except Exception as exc:  # noqa: BLE001 - torch raises many exception types
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                errors.append(f"{'dynamo' if use_dynamo else 'torchscript'}: {first}")
                logger.info("torch.onnx.export (dynamo=%s) failed: %s", use_dynamo, first)
                continue
            model = Model.from_onnx(proto)
            model.producer_name = model.producer_name or "pytorch"
            return model
    finally:
        module.train(was_training)
    raise GraphoptError("torch.onnx.export failed: " + "; ".join(errors))


def _export(
    torch: Any,
    module: Any,
    args: tuple[Any, ...],
    input_names: list[str],
    output_names: Sequence[str] | None,
    dynamic_axes: Any,
    opset: int,
    dynamo: bool,
) -> onnx.ModelProto:
    kwargs: dict[str, Any] = {"input_names": input_names, "opset_version": opset}
    if output_names:
        kwargs["output_names"] = list(output_names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not dynamo:
            if dynamic_axes:
                kwargs["dynamic_axes"] = {
                    k: dict(v) if isinstance(v, Mapping) else list(v)
                    for k, v in dynamic_axes.items()
                }
            buf = io.BytesIO()
            with torch.no_grad():
                torch.onnx.export(
                    module, args, buf, dynamo=False, do_constant_folding=True, **kwargs
                )
            return onnx.load_model_from_string(buf.getvalue())
        if dynamic_axes:
            kwargs["dynamic_axes"] = {
                k: dict(v) if isinstance(v, Mapping) else list(v) for k, v in dynamic_axes.items()
            }
        with tempfile.TemporaryDirectory(prefix="graphopt-torch-") as d:
            path = Path(d) / "model.onnx"
            with torch.no_grad():
                prog = torch.onnx.export(module, args, dynamo=True, **kwargs)
            prog.save(str(path))
            return onnx.load_model(str(path), load_external_data=True)
