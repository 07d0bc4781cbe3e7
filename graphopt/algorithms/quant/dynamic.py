"""Dynamic int8 quantization of MatMul/Gemm with constant weights.

For every site ``Y = A @ W (+ b)`` (:mod:`graphopt.algorithms.quant.sites`) the weight is
quantized symmetrically per output column, ``W ~ s_w[n] * Wq[:, n]`` with
``s_w[n] = max_k |W[k, n]| / qmax`` (``qmax`` 127, or 63 with ``reduce_range``), and the activation
at run time per tensor, asymmetric uint8: ``A ~ s_a * (Aq - z_a)`` with ``s_a`` and ``z_a`` from the
tensor's own min and max (``DynamicQuantizeLinear``). Then
``Y = s_a * s_w[n] * sum_k (Aq - z_a)[., k] Wq[k, n] (+ b)``, an integer product with int32
accumulation scaled back to float.

Two encodings (``emit``):

- ``integer`` (portable, standard ONNX): ``DynamicQuantizeLinear(A) -> (Aq, s_a, z_a)``, shared by
  every site that reads ``A``; ``MatMulInteger(Aq, Wq, z_a)``, ``Cast`` to float,
  ``Mul(s_a, s_w)``, ``Mul``, and the bias ``Add``. This is what
  ``onnxruntime.quantization.quantize_dynamic`` writes; onnxruntime fuses it into
  ``MatMulIntegerToFloat`` / ``DynamicQuantizeMatMul`` at its extended level.
- ``ort``: one ``com.microsoft.DynamicQuantizeMatMul(A, Wq, s_w, None, b)`` per site: the
  activation quantization, the integer product, the scaling and the bias in one kernel.

Which runs faster is measured, not assumed (bench/transformers_quant.py); the quantize job picks
``ort`` for ``--target ort`` and ``integer`` otherwise.

Once the products are int8, the residual ``Add`` before each ``LayerNormalization`` is written as
``Sum`` (``residual_sum``, :mod:`graphopt.algorithms.residual_sum`): onnxruntime would fuse the
pair into ``com.microsoft.SkipLayerNormalization``, whose CPU kernel is 2-10x slower than the two
ops at transformer sizes (bert-mini, one interleaved run on a loaded machine: 1.43x -> 1.53x
over fp32, where ``quantize_dynamic``, which leaves half of its norms unfused, gave 1.49x).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.algorithms.quant.sites import detach, find_sites
from graphopt.algorithms.residual_sum import sum_residual_adds
from graphopt.core.graph import const, insert_nodes, make_node, name_scope
from graphopt.core.model import Model

logger = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"
EMITS = ("integer", "ort")


@dataclass
class DynamicConfig:
    """How :func:`quantize_dynamic_matmuls` quantizes.

    Attributes:
        per_channel: one weight scale per output column (else one per tensor).
        reduce_range: 7-bit weights (``qmax`` 63): no int16 saturation in AVX2's u8s8 kernels.
        pair_bound: 8-bit weights whose aligned row pairs sum to at most 128 in magnitude: no
            int16 saturation either, at most one bit lost and usually a fraction of one.
        emit: ``integer`` (standard ONNX) or ``ort`` (``com.microsoft.DynamicQuantizeMatMul``).
        fuse_bias: fold a constant bias ``Add`` into the site (the ``ort`` kernel's bias input).
        min_k: leave products over fewer inputs float.
        residual_sum: write the residual ``Add`` before each ``LayerNormalization`` as ``Sum``
            (onnxruntime's slower fused SkipLayerNormalization is then not formed).
    """

    per_channel: bool = True
    reduce_range: bool = False
    pair_bound: bool = False
    emit: str = "integer"
    fuse_bias: bool = True
    min_k: int = 16
    residual_sum: bool = True


@dataclass
class DynamicStats:
    """What :func:`quantize_dynamic_matmuls` did."""

    quantized: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    biases_fused: int = 0
    residual_sums: list[str] = field(default_factory=list)
    weight_bytes_before: int = 0
    weight_bytes_after: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "matmuls_quantized": len(self.quantized),
            "biases_fused": self.biases_fused,
            "residual_adds_as_sum": len(self.residual_sums),
            "weight_bytes_before": self.weight_bytes_before,
            "weight_bytes_after": self.weight_bytes_after,
        }


def weight_int8(
    w: np.ndarray, per_channel: bool, qmax: int, pair_bound: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 of a ``[K, N]`` weight: ``(Wq [K, N] int8, scales [N] or scalar)``.

    With ``pair_bound`` the scale also bounds the sum of every aligned pair of rows,
    ``|Wq[2i, n]| + |Wq[2i+1, n]| <= qmax + 1`` (see :data:`PAIR_BOUND`)."""
    a = np.abs(w)
    m = a.max(axis=0) if per_channel else np.asarray(a.max())
    if pair_bound:
        if a.shape[0] % 2:
            a = np.concatenate([a, np.zeros((1, a.shape[1]), a.dtype)])
        pairs = a[0::2] + a[1::2]
        p = pairs.max(axis=0) if per_channel else np.asarray(pairs.max())
        m = np.maximum(m, p)
    s = (m.astype(np.float64) / qmax).astype(np.float32)
    s = np.where(s > 0, s, np.float32(1.0)).astype(np.float32)
    q = np.clip(np.rint(w / s), -qmax, qmax).astype(np.int8)
    return q, s


def quantize_dynamic_matmuls(
    model: Model, config: DynamicConfig | None = None, keep_float: Iterable[str] = ()
) -> DynamicStats:
    """Rewrite every MatMul/Gemm with a constant weight into dynamic int8, in place.

    Args:
        model: changed in place (the ``com.microsoft`` opset is imported for ``emit='ort'``).
        config: see :class:`DynamicConfig`.
        keep_float: node names to leave float.

    Returns:
        The :class:`DynamicStats`; ``quantized`` empty means nothing changed.
    """
    cfg = config or DynamicConfig()
    if cfg.emit not in EMITS:
        raise ValueError(f"emit must be one of {EMITS}, not {cfg.emit!r}")
    sites, skipped = find_sites(model, keep_float, fuse_bias=cfg.fuse_bias, min_k=cfg.min_k)
    stats = DynamicStats(skipped=skipped)
    if not sites:
        return stats
    g = model.graph
    qmax = 63 if cfg.reduce_range else 127
    shared: dict[int, tuple[gs.Variable, gs.Variable, gs.Variable]] = {}
    new: list[gs.Node] = []
    seen_weights: set[int] = set()
    with name_scope(g):
        for site in sites:
            q, s = weight_int8(site.weight, cfg.per_channel, qmax, cfg.pair_bound)
            if id(site.weight_tensor) not in seen_weights:
                seen_weights.add(id(site.weight_tensor))
                stats.weight_bytes_before += site.weight.nbytes
            stats.weight_bytes_after += q.nbytes + s.nbytes
            base = site.name or "matmul"
            wq = const(f"{base}_Wq", q, np.int8)
            out = site.output
            if site.bias is not None:
                stats.biases_fused += site.bias_add is not None
            detach(site)
            if cfg.emit == "ort":
                ins: list[gs.Tensor] = [site.act, wq, const(f"{base}_Ws", s)]
                if site.bias is not None:
                    ins += [gs.Variable.empty(), const(f"{base}_bias", site.bias)]
                new.append(
                    make_node("DynamicQuantizeMatMul", ins, [out], name=base, domain=MS_DOMAIN)
                )
            else:
                key = id(site.act)
                if key not in shared:
                    dql = make_node("DynamicQuantizeLinear", [site.act], name=f"{base}_dql")
                    aq = dql.outputs[0]
                    sa = gs.Variable(f"{dql.name}_scale", dtype=np.float32, shape=[])
                    za = gs.Variable(f"{dql.name}_zp", dtype=np.uint8, shape=[])
                    dql.outputs = [aq, sa, za]
                    aq.dtype = np.uint8
                    new.append(dql)
                    shared[key] = (aq, sa, za)
                aq, sa, za = shared[key]
                mmi = make_node("MatMulInteger", [aq, wq, za], name=f"{base}_int")
                mmi.outputs[0].dtype = np.int32
                cast = make_node("Cast", mmi.outputs, attrs={"to": 1}, name=f"{base}_cast")
                cast.outputs[0].dtype = np.float32
                scale = make_node("Mul", [sa, const(f"{base}_Ws", s)], name=f"{base}_scale")
                scale.outputs[0].dtype = np.float32
                y_out: gs.Variable = (
                    out if site.bias is None else gs.Variable(f"{base}_nobias", dtype=np.float32)
                )
                mul = make_node(
                    "Mul", [cast.outputs[0], scale.outputs[0]], [y_out], name=f"{base}_rescale"
                )
                new += [mmi, cast, scale, mul]
                if site.bias is not None:
                    new.append(
                        make_node(
                            "Add", [y_out, const(f"{base}_bias", site.bias)], [out], name=base
                        )
                    )
            stats.quantized.append(site.name)
        g.nodes = [n for n in g.nodes if n.outputs or n.inputs]
        insert_nodes(g, new)
        g.cleanup(remove_unused_graph_inputs=False)
    if cfg.residual_sum:
        stats.residual_sums = sum_residual_adds(model)
    if cfg.emit == "ort":
        model.opset_imports.setdefault(MS_DOMAIN, 1)
    logger.info(
        "quantize: %d MatMul/Gemm dynamic int8 (%s), %d left float",
        len(stats.quantized),
        cfg.emit,
        len(stats.skipped),
    )
    return stats
