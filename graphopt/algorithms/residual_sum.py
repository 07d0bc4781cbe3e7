"""Residual sums before a LayerNormalization written as ``Sum``, for onnxruntime's CPU provider.

``LayerNormalization(Add(a, b))``, with ``a`` and ``b`` 3-D activations of one shape (a
transformer's residual stream) and the sum read by the norm alone, is what onnxruntime's
``SkipLayerNormFusion`` (extended level and above; ``skip_layer_norm_fusion.cc``) turns into
``com.microsoft.SkipLayerNormalization``, together with a constant bias ``Add`` on either operand.
On the CPU provider the fused kernel is slower than the two kernels it replaces: onnxruntime
1.32, x86-64 AVX2, one thread, fp32, median of 200 interleaved runs:

==============  ==========================  =====================
shape           Add + LayerNormalization    SkipLayerNormalization
==============  ==========================  =====================
[1, 16, 64]     0.028 ms                    0.030 ms
[1, 64, 128]    0.040 ms                    0.074 ms
[4, 64, 384]    0.160 ms                    0.612 ms
[1, 64, 768]    0.084 ms                    0.313 ms
[1, 1500, 384]  1.085 ms                    11.615 ms
==============  ==========================  =====================

Used by the ``sum-residual-adds`` pass (``optimize``'s portable lowering) and by dynamic int8
quantization. In a dynamically quantized transformer the products are int8 and the norms become a
large share of the run (bert-mini at [4, 64]: the 12 fused norms took 13% of the int8 model's
kernel time).
``Sum(a, b)`` is the same operation as ``Add(a, b)`` (two operands, the same multidirectional
broadcasting, the same float addition, bit for bit), and the fusion does not match it: the
written model runs the addition and the norm as two kernels at every optimization level.

Only the Adds onnxruntime would fuse are rewritten: two non-constant float operands of one known
3-D shape, the sum no graph output and read only, as its data input, by a ``LayerNormalization``
(a pre-norm block's residual sum, also read by the next residual Add, is not fused and stays).
``RMSNormalization``/``SimplifiedLayerNormalization`` readers are left alone: their fused kernel
was not measured.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.core.model import Model

logger = logging.getLogger(__name__)

_DEFAULT_DOMAINS = (None, "", "ai.onnx")
#: element types the fusion takes that ``Sum`` takes too (bfloat16 has no numpy type here)
_SUM_TYPES = (np.dtype(np.float16), np.dtype(np.float32))


def _is_add(node: gs.Node) -> bool:
    return (
        node.op == "Add"
        and node.domain in _DEFAULT_DOMAINS
        and len(node.inputs) == 2
        and len(node.outputs) == 1
    )


def _only_layernorm_reads(t: gs.Tensor) -> bool:
    if len(t.outputs) != 1:
        return False
    c = t.outputs[0]
    return (
        c.op == "LayerNormalization"
        and c.domain in _DEFAULT_DOMAINS
        and bool(c.inputs)
        and c.inputs[0] is t
        and all(x is not t for x in c.inputs[1:])
    )


def _dtype(t: gs.Tensor) -> np.dtype | None:
    try:
        return np.dtype(t.dtype) if t.dtype is not None else None
    except TypeError:
        return None


def _residual(node: gs.Node, outputs: set[int]) -> bool:
    """Whether ``node`` is an Add onnxruntime would fuse into a SkipLayerNormalization."""
    if not _is_add(node):
        return False
    a, b = node.inputs
    if isinstance(a, gs.Constant) or isinstance(b, gs.Constant):
        return False
    if _dtype(a) not in _SUM_TYPES or _dtype(a) != _dtype(b):
        return False
    if a.shape is None or b.shape is None or len(a.shape) != 3 or list(a.shape) != list(b.shape):
        return False
    out = node.outputs[0]
    return id(out) not in outputs and _only_layernorm_reads(out)


def sum_residual_adds(model: Model) -> list[str]:
    """Rewrite every residual ``Add`` read by a ``LayerNormalization`` into ``Sum``, in place
    (see the module docstring).

    Returns:
        The names of the rewritten nodes (empty: nothing changed).
    """
    outputs = {id(t) for t in model.graph.outputs}
    done: list[str] = []
    for node in model.graph.nodes:
        if _residual(node, outputs):
            node.op = "Sum"
            done.append(str(node.name))
    if done:
        logger.info("%d residual Add -> Sum (no SkipLayerNormalization)", len(done))
    return done
