"""Quantization-aware training of a QDQ graph, exported as the same QDQ graph.

Scales learn as in Esser et al. 2020, "Learned Step Size Quantization" (LSQ, ICLR); the student
is distilled from the float model (:mod:`.distill`).

The static path (graphopt's ``quantize``) decides *where* Q/DQ pairs go and calibrates their
scales; QAT starts from its output and only changes values, so the trained model is exactly the
graph the static path writes, with other numbers in its initializers:

* ``QuantizeLinear -> DequantizeLinear`` on an activation becomes ``FakeQuant(x, scale, zp)``
  (:func:`.fakequant.fake_quant`: straight-through rounding, LSQ-learned ``scale``, fixed ``zp``);
* ``DequantizeLinear(W_int8, s_w, 0)`` on a weight becomes ``FakeQuantWeight(W, s_w, 0)`` over a
  *latent float weight* ``W`` (initialized from the float model when given, else from the
  dequantized weight) with the symmetric range the static path used (``[-127, 127]``, or
  ``[-63, 63]`` with reduce_range); ``s_w`` learns too;
* ``DequantizeLinear(b_int32, s_x * s_w, 0)`` on a Conv/Gemm bias becomes
  ``FakeQuantBias(b, s_x, s_w)`` over a latent float bias, rounded with the *current* scales
  exactly as the export will (float64 ``round(b / float32(s_x * s_w))``): its rounding error is
  tiny, but it flips activation roundings downstream, so leaving it out makes the module differ
  from the graph by ~0.5% on the digits CNN. The export writes the int32 bias and its scale
  ``s_x * s_w`` from the learned scales, which keeps onnxruntime's integer kernels valid.

:func:`export_qdq` writes ``round(W / s_w)``, the scales and the int32 biases back into the QDQ
graph by name (:func:`.export.replace_tensors`): same nodes, same initializer names, shapes and
dtypes. Zero points are not trained (they are integers in the graph).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch

from .export import replace_tensors
from .fakequant import fake_quant, quantize_int
from .module import OnnxModule
from .ops import NodeSpec

logger = logging.getLogger(__name__)

DOMAIN = "graphopt.train"
LATENT = "__latent"


@dataclass
class WeightQ:
    """A fake-quantized weight: where its integers, scale and zero point live in the graph."""

    int_name: str
    scale: str
    zero_point: str
    axis: int | None
    qmin: int
    qmax: int
    dtype: np.dtype


@dataclass
class BiasQ:
    int_name: str
    scale: str
    zero_point: str
    act_scale: str
    weight_scale: str
    scale_value: np.ndarray | None = None  # the static scale (used when no consumer scales)


@dataclass
class QdqMap:
    """What :func:`prepare_qat` rewrote (latent name -> graph tensors)."""

    act_scales: dict[str, str] = field(default_factory=dict)  # scale -> zero point
    weights: dict[str, WeightQ] = field(default_factory=dict)
    biases: dict[str, BiasQ] = field(default_factory=dict)
    kept: int = 0  # Q/DQ nodes left as they are (not a pair)


def _int_range(dtype: np.dtype) -> tuple[int, int]:
    info = np.iinfo(dtype)
    return int(info.min), int(info.max)


def prepare_qat(
    qdq: onnx.ModelProto, float_model: onnx.ModelProto | None = None, weight_qmax: int | None = None
) -> tuple[onnx.ModelProto, QdqMap]:
    """Rewrite a QDQ model for training (see the module docstring). ``qdq`` is not changed.

    Args:
        qdq: the static QDQ model.
        float_model: the float model it was made from (same node names), to start the latent
            weights from the float weights rather than from their rounded values.
        weight_qmax: symmetric weight range; default: inferred per weight (127, or 63 when every
            integer fits in 7 bits, as with reduce_range).
    """
    out = copy.deepcopy(qdq)
    g = out.graph
    consts, _ = OnnxModule.collect_constants(g, "")
    float_w: dict[tuple[str, int], np.ndarray] = {}
    if float_model is not None:
        fconsts, _ = OnnxModule.collect_constants(float_model.graph, "")
        for n in float_model.graph.node:
            for slot in (1, 2):
                if slot < len(n.input) and n.input[slot] in fconsts:
                    float_w[(n.name, slot)] = fconsts[n.input[slot]]
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    qmap = QdqMap()
    replacement: dict[int, onnx.NodeProto] = {}
    latent_inits: list[onnx.TensorProto] = []

    def attr(n: onnx.NodeProto, key: str, default: Any) -> Any:
        for a in n.attribute:
            if a.name == key:
                return onnx.helper.get_attribute_value(a)
        return default

    def dequantized(n: onnx.NodeProto) -> np.ndarray:
        q = consts[n.input[0]].astype(np.float64)
        s = consts[n.input[1]].astype(np.float64)
        z = consts[n.input[2]].astype(np.float64) if len(n.input) > 2 and n.input[2] else 0.0
        if s.ndim == 1 and q.ndim > 1:
            shape = [1] * q.ndim
            shape[attr(n, "axis", 1) % q.ndim] = -1
            s = s.reshape(shape)
            z = np.asarray(z).reshape(shape) if np.ndim(z) else z
        return ((q - z) * s).astype(np.float32)

    def float_init(dq: onnx.NodeProto, fallback: np.ndarray) -> np.ndarray:
        for c in consumers.get(dq.output[0], []):
            for slot in (1, 2):
                if slot < len(c.input) and c.input[slot] == dq.output[0]:
                    w = float_w.get((c.name, slot))
                    if w is not None and w.shape == fallback.shape:
                        return w.astype(np.float32)
        return fallback

    for idx, n in enumerate(g.node):
        if n.op_type != "DequantizeLinear" or n.domain not in ("", "ai.onnx"):
            continue
        x, scale = n.input[0], n.input[1]
        zp = n.input[2] if len(n.input) > 2 else ""
        if scale not in consts or (zp and zp not in consts):
            qmap.kept += 1
            continue
        if x in consts:  # a constant weight or bias
            ints = consts[x]
            latent = x + LATENT
            init = float_init(n, dequantized(n))
            latent_inits.append(onnx.numpy_helper.from_array(init, latent))
            if ints.dtype == np.int32:
                qmap.biases[latent] = BiasQ(x, scale, zp, "", "", consts[scale])
                replacement[idx] = onnx.helper.make_node(
                    "Identity", [latent], list(n.output), name=n.name
                )
                continue
            lo, hi = _int_range(ints.dtype)
            if ints.dtype == np.int8:
                top = weight_qmax or (63 if np.abs(ints.astype(np.int32)).max() <= 63 else 127)
                lo, hi = -top, top
            axis = attr(n, "axis", 1) if consts[scale].size > 1 else None
            qmap.weights[latent] = WeightQ(x, scale, zp, axis, lo, hi, ints.dtype)
            replacement[idx] = onnx.helper.make_node(
                "FakeQuantWeight",
                [latent, scale, zp],
                list(n.output),
                name=n.name,
                domain=DOMAIN,
                qmin=lo,
                qmax=hi,
                axis=-1 if axis is None else axis,
                per_channel=int(axis is not None),
            )
            continue
        q = producer.get(x)
        q_zp = q.input[2] if q is not None and len(q.input) > 2 else ""
        if q is None or q.op_type != "QuantizeLinear" or q.input[1] != scale or q_zp != zp:
            qmap.kept += 1
            continue
        lo, hi = _int_range(consts[zp].dtype if zp else np.dtype(np.uint8))
        qmap.act_scales[scale] = zp
        replacement[idx] = onnx.helper.make_node(
            "FakeQuant",
            [q.input[0], scale, zp],
            list(n.output),
            name=n.name,
            domain=DOMAIN,
            qmin=lo,
            qmax=hi,
        )
    # a QuantizeLinear whose outputs all went to converted DQs goes; the rest stays in order
    converted = {id(g.node[i]) for i in replacement}
    graph_outs = {o.name for o in g.output}
    ordered = []
    for idx, n in enumerate(g.node):
        if idx in replacement:
            ordered.append(replacement[idx])
        elif (
            n.op_type == "QuantizeLinear"
            and n.output[0] not in graph_outs
            and all(id(c) in converted for c in consumers.get(n.output[0], []))
        ):
            continue
        else:
            ordered.append(n)
    del g.node[:]
    g.node.extend(ordered)
    g.initializer.extend(latent_inits)
    if not any(o.domain == DOMAIN for o in out.opset_import):
        out.opset_import.append(onnx.helper.make_opsetid(DOMAIN, 1))
    new_nodes = list(replacement.values())
    # a bias is fake-quantized with the scale its consumer's activation and weight scales give
    fq_scale = {
        nn.output[0]: nn.input[1]
        for nn in new_nodes
        if nn.op_type in ("FakeQuant", "FakeQuantWeight")
    }
    for node in g.node:
        if node.op_type != "Identity" or not node.input or node.input[0] not in qmap.biases:
            continue
        b = qmap.biases[node.input[0]]
        user = next((c for c in g.node if len(c.input) > 2 and c.input[2] == node.output[0]), None)
        if user is None or user.input[0] not in fq_scale or user.input[1] not in fq_scale:
            logger.debug("qat: bias %s: consumer scales not found, trains unquantized", b.int_name)
            continue
        b.act_scale, b.weight_scale = fq_scale[user.input[0]], fq_scale[user.input[1]]
        fused = onnx.helper.make_node(
            "FakeQuantBias",
            [node.input[0], b.act_scale, b.weight_scale],
            list(node.output),
            name=node.name,
            domain=DOMAIN,
        )
        node.CopyFrom(fused)
    return out, qmap


def _fake_quant_builder(spec: NodeSpec) -> Any:
    lo, hi = int(spec.attr("qmin")), int(spec.attr("qmax"))

    def run(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None = None) -> torch.Tensor:
        z = zp if zp is not None else torch.zeros((), dtype=torch.uint8)
        return fake_quant(x, scale, z, lo, hi, axis=1 if scale.numel() > 1 else None)

    return run


def _fake_quant_weight_builder(spec: NodeSpec) -> Any:
    lo, hi = int(spec.attr("qmin")), int(spec.attr("qmax"))
    axis = int(spec.attr("axis")) if spec.attr("per_channel") else None

    def run(w: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None = None) -> torch.Tensor:
        z = zp if zp is not None else torch.zeros((), dtype=torch.int8)
        return fake_quant(w, scale, z, lo, hi, axis=axis)

    return run


def _fake_quant_bias_builder(spec: NodeSpec) -> Any:
    def run(b: torch.Tensor, s_x: torch.Tensor, s_w: torch.Tensor) -> torch.Tensor:
        return fake_quant_bias(b, s_x, s_w)

    return run


def bias_scale(s_x: torch.Tensor, s_w: torch.Tensor) -> torch.Tensor:
    """``float32(s_x * s_w)`` computed in float64, as the static path writes it."""
    sx = s_x.detach().abs().clamp_min(1e-12).to(torch.float64)
    sw = s_w.detach().abs().clamp_min(1e-12).to(torch.float64)
    return (sx * sw).to(torch.float32)


def bias_int(b: torch.Tensor, sb: torch.Tensor) -> torch.Tensor:
    """``round(b / s_b)`` in float64, saturated to int32 (as int64)."""
    q = torch.round(b.detach().to(torch.float64) / sb.to(torch.float64))
    return q.clamp(-(2**31), 2**31 - 1).to(torch.int64)


def fake_quant_bias(b: torch.Tensor, s_x: torch.Tensor, s_w: torch.Tensor) -> torch.Tensor:
    """The int32 bias as onnxruntime dequantizes it (``float(q) * s_b``); gradient straight
    through to ``b`` only (the scales learn from the activations and weights)."""
    sb = bias_scale(s_x, s_w)
    deq = bias_int(b, sb).to(torch.float32) * sb
    return b + (deq - b).detach()


CUSTOM_OPS = {
    (DOMAIN, "FakeQuant"): _fake_quant_builder,
    (DOMAIN, "FakeQuantBias"): _fake_quant_bias_builder,
    (DOMAIN, "FakeQuantWeight"): _fake_quant_weight_builder,
}


class QatModule(OnnxModule):
    """A QDQ model as a trainable module: latent weights, LSQ scales (see the module docstring).

    Args:
        qdq: the static QDQ model (``ModelProto`` or graphopt ``Model``).
        float_model: the float model it came from (latent weights start from its weights).
        train_scales: learn the activation and weight scales (LSQ); else only weights.
        trainable: policy for the float tensors outside Q/DQ (layers kept float), as in
            :class:`OnnxModule`.
    """

    def __init__(
        self,
        qdq: onnx.ModelProto | Any,
        float_model: onnx.ModelProto | Any = None,
        train_scales: bool = True,
        trainable: str | Iterable[str] = "weights",
        weight_qmax: int | None = None,
    ) -> None:
        qproto = qdq if isinstance(qdq, onnx.ModelProto) else qdq.to_onnx()
        fproto = (
            float_model
            if float_model is None or isinstance(float_model, onnx.ModelProto)
            else float_model.to_onnx()
        )
        proto, qmap = prepare_qat(qproto, fproto, weight_qmax)
        extra = set(qmap.weights) | set(qmap.biases)
        if train_scales:
            extra |= set(qmap.act_scales) | {w.scale for w in qmap.weights.values()}
        super().__init__(
            proto, trainable=trainable, custom_ops=CUSTOM_OPS, fuse=True, extra_trainable=extra
        )
        self.qmap = qmap
        self.qdq_proto = qproto

    def scale_names(self) -> set[str]:
        """ONNX names of the trained scales (activations and weights)."""
        return set(self.qmap.act_scales) | {w.scale for w in self.qmap.weights.values()}

    def param_groups(self, lr: float, scale_lr: float | None = None) -> list[dict[str, Any]]:
        """Adam parameter groups: weights at ``lr``, scales at ``scale_lr`` (default
        ``lr / 100``). Adam's steps are about ``lr`` in absolute size whatever the gradient,
        and scales are ~100x smaller than weights, so one learning rate would move them ~100x
        faster in relative terms (LSQ's gradient scale does not help under Adam)."""
        scales = self.scale_names()
        named = list(self.named_onnx_parameters())
        return [
            {"params": [p for n, p in named if n not in scales], "lr": lr},
            {
                "params": [p for n, p in named if n in scales],
                "lr": lr / 100 if scale_lr is None else scale_lr,
            },
        ]

    def export_values(self) -> dict[str, np.ndarray]:
        """Graph tensor name -> value for :func:`.export.replace_tensors` on the QDQ model."""
        qm = self.qmap
        vals: dict[str, np.ndarray] = {}

        def scale(name: str) -> torch.Tensor:
            return self.tensor(name).detach().abs().clamp_min(1e-12)

        for name in qm.act_scales:
            vals[name] = scale(name).numpy().astype(np.float32)
        for latent, w in qm.weights.items():
            s = scale(w.scale)
            z = self.tensor(w.zero_point) if w.zero_point else torch.zeros((), dtype=torch.int8)
            ints = quantize_int(self.tensor(latent), s, z, w.qmin, w.qmax, w.axis)
            vals[w.int_name] = ints.numpy().astype(w.dtype)
            vals[w.scale] = s.numpy().astype(np.float32)
        for latent, b in qm.biases.items():
            if b.act_scale and b.weight_scale:
                sb = bias_scale(self.tensor(b.act_scale), self.tensor(b.weight_scale))
            else:
                sb = torch.from_numpy(np.asarray(b.scale_value, np.float32))
            assert b.scale_value is not None
            shp = np.shape(b.scale_value)
            sb = sb.reshape(shp) if sb.numel() == int(np.prod(shp)) else sb
            vals[b.int_name] = bias_int(self.tensor(latent), sb).numpy().astype(np.int32)
            vals[b.scale] = sb.numpy().astype(np.float32)
        skip = set(qm.weights) | set(qm.biases) | set(vals)
        for name, arr in self.trained_tensors().items():
            if name not in skip:
                vals[name] = arr
        return vals


def export_qdq(module: QatModule) -> onnx.ModelProto:
    """The static QDQ graph with the trained integers, scales and int32 biases."""
    return replace_tensors(module.qdq_proto, module.export_values())
