"""What the installed onnxruntime can run: its CPU kernel registry, read once.

A pass that emits an op the model did not have (``HardSwish``, ``Swish``, ``Gelu``,
``LayerNormalization``...) asks :func:`ort_runs` first and keeps the original nodes when the
answer is no: graphopt's output must run where its input ran (``Swish`` is ONNX opset 24, which
onnxruntime 1.32 has no kernel for).

An op runs when onnxruntime's CPU provider registers a kernel for the op's schema version at the
model's opset (:func:`kernel_registry`, from ``get_all_opkernel_def``), or, for ops onnxruntime
runs by expanding their ONNX function body (``HardSwish``, ``Mish``) and so registers no kernel
for, when a one-node model of the op loads in an onnxruntime session (probed once per op, opset
and element type).
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import onnx
import onnxruntime as ort

logger = logging.getLogger(__name__)

_CPU = "CPUExecutionProvider"


@functools.cache
def kernel_registry() -> dict[tuple[str, str], tuple[tuple[int, int], ...]]:
    """``(domain, op) -> ((first version, last version), ...)`` of every CPU kernel the installed
    onnxruntime registers (``""`` is the default domain). Read once per process."""
    try:
        from onnxruntime.capi import _pybind_state  # noqa: PLC0415

        defs = _pybind_state.get_all_opkernel_def()
    except Exception as exc:  # noqa: BLE001 - a build without the introspection call
        logger.debug("onnxruntime kernel registry unavailable: %s", exc)
        return {}
    table: dict[tuple[str, str], set[tuple[int, int]]] = {}
    for k in defs:
        if k.provider != _CPU:
            continue
        domain = "" if k.domain in ("", "ai.onnx") else k.domain
        table.setdefault((domain, k.op_name), set()).add(tuple(k.version_range))  # type: ignore[arg-type]
    return {key: tuple(sorted(v)) for key, v in table.items()}


def _since_version(op: str, opset: int, domain: str) -> int | None:
    """The version of ``op``'s schema in force at ``opset`` (None when onnx knows no such op)."""
    try:
        return int(onnx.defs.get_schema(op, opset, domain).since_version)
    except Exception:  # noqa: BLE001 - onnx raises SchemaError for unknown ops
        return None


@functools.cache
def _probe(op: str, opset: int, domain: str, elem: int) -> bool:
    """Whether a one-node model ``y = op(x)`` loads in onnxruntime (ops expanded as functions)."""
    h = onnx.helper
    node = h.make_node(op, ["x"], ["y"], domain=domain)
    graph = h.make_graph(
        [node],
        "probe",
        [h.make_tensor_value_info("x", elem, [2])],
        [h.make_tensor_value_info("y", elem, None)],
    )
    imports = [h.make_opsetid("", opset if not domain else 17)]
    if domain:
        imports.append(h.make_opsetid(domain, opset))
    model = h.make_model(graph, opset_imports=imports, ir_version=min(onnx.IR_VERSION, 10))
    so = ort.SessionOptions()
    so.log_severity_level = 4
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        ort.InferenceSession(model.SerializeToString(), so, providers=[_CPU])
    except Exception as exc:  # noqa: BLE001 - any refusal means: does not run
        logger.debug("onnxruntime cannot run %s(%d): %s", op, opset, exc)
        return False
    return True


def ort_runs(op: str, opset: int, domain: str = "", dtype: np.dtype | None = None) -> bool:
    """Whether the installed onnxruntime (CPU) runs ``op`` in a model of ``opset``.

    Args:
        op: the op type.
        opset: the model's opset for ``domain``.
        domain: the op's domain (``""``: ONNX).
        dtype: the element type it would run on (float32 when None); used only for the probe of
            ops without a registered kernel.
    """
    domain = "" if domain == "ai.onnx" else domain
    since = _since_version(op, opset, domain) if not domain.startswith("com.") else opset
    if since is None:
        return False
    for lo, hi in kernel_registry().get((domain, op), ()):
        if lo <= since <= hi:
            return True
    elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype or np.float32))
    return _probe(op, opset, domain, elem)


def ort_contrib_runs(op: str, domain: str = "com.microsoft", dtype: np.dtype | None = None) -> bool:
    """Whether the installed onnxruntime (CPU) registers a kernel for one of its own ops: a
    ``com.microsoft`` op, or one it registers in the ONNX domain although ONNX has no such op
    (``SimplifiedLayerNormalization``). Such ops are version 1 of their domain.

    Args:
        op: the op type.
        domain: ``com.microsoft`` or ``""``.
        dtype: the element type it would run on (float32 when None), checked against the
            type constraint ``T`` of the registered kernels (any type when it lists none).
    """
    domain = "" if domain == "ai.onnx" else domain
    if not any(lo <= 1 <= hi for lo, hi in kernel_registry().get((domain, op), ())):
        return False
    elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype or np.float32))
    types = _contrib_types(domain, op)
    short = onnx.helper.tensor_dtype_to_string(elem).removeprefix("TensorProto.").lower()
    return f"tensor({short})" in types if types else True


@functools.cache
def _contrib_types(domain: str, op: str) -> frozenset[str]:
    """Types (``tensor(float)`` ...) of the ``T`` constraint of the version-1 CPU kernels of an
    onnxruntime op; empty when the registry does not say."""
    try:
        from onnxruntime.capi import _pybind_state  # noqa: PLC0415

        defs = _pybind_state.get_all_opkernel_def()
    except Exception:  # noqa: BLE001 - a build without the introspection call
        return frozenset()
    out: set[str] = set()
    for k in defs:
        kd = "" if k.domain in ("", "ai.onnx") else k.domain
        if k.provider == _CPU and kd == domain and k.op_name == op and k.version_range[0] <= 1:
            out.update(getattr(k, "type_constraints", {}).get("T", ()))
    return frozenset(out)
