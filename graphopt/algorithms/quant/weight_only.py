"""Weight-only quantization: int4/int8 block-wise MatMul/Gemm weights, int8 embedding tables.

Activations stay float; each weight is stored in ``bits`` bits with a scale and zero point per
block of ``block_size`` inputs of every output column (:mod:`graphopt.algorithms.quant.gptq`:
round-to-nearest or GPTQ) and dequantized by the runtime:

- ``portable`` (standard ONNX, opset >= 21): ``MatMul(A, DequantizeLinear(Wq, s, z, axis=0,
  block_size=B))`` with ``Wq``/``z`` uint4 or uint8 ``[K, N]``/``[K/B, N]`` (onnxruntime fuses
  the pair into its 4-bit kernel).
- ``ort``: ``com.microsoft.MatMulNBits(A, Wq, s, z)`` with ``K``, ``N``, ``bits``, ``block_size``
  attributes, ``Wq`` packed ``[N, K/B, B * bits / 8]`` (two 4-bit values a byte, the lower nibble
  first), scales ``[N * K/B]``, zero points packed the same way per column.

Embedding tables (``Gather(table [V, D], ids)`` with a constant float table read only by Gathers
on axis 0) are stored int8 per row, symmetric, and dequantized after the gather:
``Gather(Tq, ids) -> Cast -> Mul(Gather(s [V, 1], ids))``: only the gathered rows are touched.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import ml_dtypes
import numpy as np
import onnx_graphsurgeon as gs

from graphopt.algorithms.quant.gptq import BlockQuant, output_error, quantize_gptq, quantize_rtn
from graphopt.algorithms.quant.sites import Site, detach, find_sites
from graphopt.core.graph import const, insert_nodes, make_node, name_scope
from graphopt.core.model import Model
from graphopt.core.session import make_session

logger = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"
#: the first ONNX opset whose DequantizeLinear takes ``block_size``
BLOCKED_DQ_OPSET = 21
#: embedding tables smaller than this (elements) stay float
MIN_TABLE_ELEMENTS = 1 << 16
ROUNDINGS = ("rtn", "gptq")
TARGETS = ("portable", "ort")

#: site name -> ``X^T X`` of its input over the calibration data
Hessians = Mapping[str, np.ndarray]


@dataclass
class WeightOnlyConfig:
    """How :func:`quantize_weight_only` quantizes.

    Attributes:
        bits: 4 or 8.
        block_size: inputs per block (a power of two, at least 16).
        rounding: ``rtn`` (round to nearest) or ``gptq`` (needs Hessians).
        target: ``portable`` (DequantizeLinear, opset >= 21) or ``ort`` (MatMulNBits).
        embeddings: also store large Gather tables int8 per row.
        accuracy_level: MatMulNBits' ``accuracy_level`` (``ort``): 4 (default) computes with
            int8 activations, 0 in float. 4 is what onnxruntime itself gives the portable form
            (its DequantizeLinear + MatMul fusion defaults to
            ``session.qdq_matmulnbits_accuracy_level=4``), and at 0 onnxruntime 1.32's CPU kernel
            has no fast 8-bit path: 8-bit weights ran at 0.06x of fp32 on the GPT-2 decoder
            (230-300 ms against 17 ms; 2.2 ms at 4), int4 at a small output SQNR cost (16.4 ->
            16.35 dB; int8 38.8 -> 35.4 dB).
        damp: GPTQ damping.
        site_bits: node name -> bits for that MatMul/Gemm (e.g. an 8-bit output head).
    """

    bits: int = 4
    block_size: int = 32
    rounding: str = "rtn"
    target: str = "portable"
    embeddings: bool = True
    accuracy_level: int = 4
    damp: float = 0.01
    site_bits: Mapping[str, int] = field(default_factory=dict)


@dataclass
class WeightOnlyStats:
    """What :func:`quantize_weight_only` did."""

    quantized: list[str] = field(default_factory=list)
    embeddings: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    weight_bytes_before: int = 0
    weight_bytes_after: int = 0
    #: site -> (RTN error, GPTQ error) on the calibration activations (gptq only)
    errors: dict[str, tuple[float, float]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        gains = [r / g for r, g in self.errors.values() if g > 0]
        return {
            "matmuls_quantized": len(self.quantized),
            "embeddings_quantized": len(self.embeddings),
            "weight_bytes_before": self.weight_bytes_before,
            "weight_bytes_after": self.weight_bytes_after,
            "gptq_error_reduction_median": float(np.median(gains)) if gains else None,
        }


def _check_config(cfg: WeightOnlyConfig) -> None:
    if cfg.bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, not {cfg.bits}")
    if cfg.block_size < 16 or cfg.block_size & (cfg.block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, not {cfg.block_size}")
    if cfg.rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, not {cfg.rounding!r}")
    if cfg.target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, not {cfg.target!r}")


def pack_nbits(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack the last axis of uint8 levels: 4 bits two a byte (lower nibble first), 8 bits as is."""
    if bits == 8:
        return q.astype(np.uint8)
    if q.shape[-1] % 2:
        q = np.concatenate([q, np.zeros(q.shape[:-1] + (1,), q.dtype)], axis=-1)
    return (q[..., 0::2] & 0x0F | (q[..., 1::2] & 0x0F) << 4).astype(np.uint8)


def matmul_nbits_inputs(bq: BlockQuant, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(B [N, blocks, blob], scales [N * blocks], zero points packed)`` of MatMulNBits."""
    n = bq.q.shape[1]
    blocks = bq.scales.shape[0]
    kp = blocks * bq.block_size
    q = np.zeros((kp, n), np.uint8)
    q[:k] = bq.q
    qt = q.T.reshape(n, blocks, bq.block_size)
    b = pack_nbits(qt, bq.bits)
    scales = np.ascontiguousarray(bq.scales.T).reshape(-1).astype(np.float32)
    zp = pack_nbits(np.ascontiguousarray(bq.zero_points.T), bq.bits).reshape(-1)
    return b, scales, zp


def _as_storage(a: np.ndarray, bits: int) -> np.ndarray:
    return a.astype(ml_dtypes.uint4) if bits == 4 else a.astype(np.uint8)


def quantize_weight_only(
    model: Model,
    config: WeightOnlyConfig | None = None,
    hessians: Hessians | None = None,
    keep_float: Iterable[str] = (),
    on_site: Callable[[int, int], None] | None = None,
) -> WeightOnlyStats:
    """Store the weights of every MatMul/Gemm with a constant 2-D weight (and large embedding
    tables) in ``bits`` bits, in place.

    The caller raises the model's opset to :data:`BLOCKED_DQ_OPSET` for ``target='portable'``.

    Args:
        config: see :class:`WeightOnlyConfig`.
        hessians: site name -> ``X^T X`` of its input (``gptq``; a site without one is rounded
            to nearest).
        keep_float: node names to leave float.
        on_site: ``on_site(done, total)`` after every site (progress).

    Returns:
        The :class:`WeightOnlyStats`; nothing quantized means nothing changed.
    """
    cfg = config or WeightOnlyConfig()
    _check_config(cfg)
    if cfg.target == "portable" and model.opset < BLOCKED_DQ_OPSET:
        raise ValueError(f"portable weight-only needs opset >= {BLOCKED_DQ_OPSET}")
    sites, skipped = find_sites(model, keep_float, fuse_bias=cfg.target == "ort")
    stats = WeightOnlyStats(skipped=skipped)
    g = model.graph
    new: list[gs.Node] = []
    seen: set[int] = set()
    with name_scope(g):
        for i, site in enumerate(sites):
            h = (hessians or {}).get(site.name) if cfg.rounding == "gptq" else None
            bits = int(cfg.site_bits.get(site.name, cfg.bits))
            if h is not None:
                bq = quantize_gptq(site.weight, h, bits, cfg.block_size, damp=cfg.damp)
                rtn = quantize_rtn(site.weight, bits, cfg.block_size)
                stats.errors[site.name] = (
                    output_error(site.weight, rtn.dequantize(), h),
                    output_error(site.weight, bq.dequantize(), h),
                )
            else:
                bq = quantize_rtn(site.weight, bits, cfg.block_size)
            if id(site.weight_tensor) not in seen:
                seen.add(id(site.weight_tensor))
                stats.weight_bytes_before += site.weight.nbytes
            new += _emit_site(site, bq, cfg, stats)
            stats.quantized.append(site.name)
            if on_site is not None:
                on_site(i + 1, len(sites))
        if cfg.embeddings:
            new += _quantize_tables(g, keep_float, stats)
        if not new:
            return stats
        g.nodes = [n for n in g.nodes if n.outputs or n.inputs]
        insert_nodes(g, new)
        g.cleanup(remove_unused_graph_inputs=False)
    if cfg.target == "ort" and stats.quantized:
        model.opset_imports.setdefault(MS_DOMAIN, 1)
    logger.info(
        "quantize: %d MatMul/Gemm weights int%d (block %d, %s, %s), %d tables int8",
        len(stats.quantized),
        cfg.bits,
        cfg.block_size,
        cfg.rounding,
        cfg.target,
        len(stats.embeddings),
    )
    return stats


def collect_hessians(
    model: Model,
    feeds: Iterable[Mapping[str, np.ndarray]],
    keep_float: Iterable[str] = (),
) -> dict[str, np.ndarray]:
    """``X^T X`` (float64 ``[K, K]``) of every site's input over ``feeds``, the float model's
    activations flattened to ``[samples, K]`` (one onnxruntime session, every input at once)."""
    sites, _ = find_sites(model, keep_float)
    acts = sorted({s.act.name for s in sites})
    if not acts:
        return {}
    sess = make_session(model, outputs=acts, truncate=True)
    accepted = {i.name for i in sess.get_inputs()}
    acc: dict[str, np.ndarray] = {}
    for f in feeds:
        outs = sess.run(acts, {k: v for k, v in f.items() if k in accepted})
        for name, a in zip(acts, outs, strict=True):
            x = np.asarray(a, np.float64).reshape(-1, np.shape(a)[-1])
            acc[name] = acc.get(name, 0) + x.T @ x
    return {s.name: acc[s.act.name] for s in sites if s.act.name in acc}


def _emit_site(
    site: Site, bq: BlockQuant, cfg: WeightOnlyConfig, stats: WeightOnlyStats
) -> list[gs.Node]:
    base = site.name or "matmul"
    out = site.output
    detach(site)
    if cfg.target == "ort":
        b, s, z = matmul_nbits_inputs(bq, site.k)
        stats.weight_bytes_after += b.nbytes + s.nbytes + z.nbytes
        ins: list[gs.Tensor] = [
            site.act,
            const(f"{base}_Wq", b, np.uint8),
            const(f"{base}_Ws", s),
            const(f"{base}_Wz", z, np.uint8),
        ]
        if site.bias is not None:
            ins += [gs.Variable.empty(), const(f"{base}_bias", site.bias)]
        attrs = {
            "K": site.k,
            "N": site.n,
            "bits": bq.bits,
            "block_size": cfg.block_size,
            "accuracy_level": cfg.accuracy_level,
        }
        return [make_node("MatMulNBits", ins, [out], attrs=attrs, name=base, domain=MS_DOMAIN)]
    q = _as_storage(bq.q, bq.bits)
    z = _as_storage(bq.zero_points, bq.bits)
    stats.weight_bytes_after += (
        bq.q.size * bq.bits // 8 + bq.scales.nbytes + bq.zero_points.size * bq.bits // 8
    )
    dq = make_node(
        "DequantizeLinear",
        [
            gs.Constant(f"{base}_Wq", q),
            const(f"{base}_Ws", bq.scales),
            gs.Constant(f"{base}_Wz", z),
        ],
        attrs={"axis": 0, "block_size": cfg.block_size},
        name=f"{base}_dq",
    )
    dq.outputs[0].dtype = np.float32
    dq.outputs[0].shape = [site.k, site.n]
    nodes = [dq]
    y = out if site.bias is None else gs.Variable(f"{base}_nobias", dtype=np.float32)
    nodes.append(make_node("MatMul", [site.act, dq.outputs[0]], [y], name=base))
    if site.bias is not None:
        nodes.append(make_node("Add", [y, const(f"{base}_bias", site.bias)], [out], name=base))
    return nodes


def quantize_embeddings(model: Model, keep_float: Iterable[str] = ()) -> WeightOnlyStats:
    """Only the embedding tables (int8 per row; see the module docstring), in place."""
    stats = WeightOnlyStats()
    g = model.graph
    with name_scope(g):
        new = _quantize_tables(g, keep_float, stats)
        if new:
            g.nodes = [n for n in g.nodes if n.outputs or n.inputs]
            insert_nodes(g, new)
            g.cleanup(remove_unused_graph_inputs=False)
    return stats


def _quantize_tables(
    g: gs.Graph, keep_float: Iterable[str], stats: WeightOnlyStats
) -> list[gs.Node]:
    """Int8 per-row storage of large constant tables read only by Gathers on axis 0."""
    keep = set(keep_float)
    readers: dict[int, list[gs.Node]] = {}
    tables: dict[int, gs.Constant] = {}
    for node in g.nodes:
        for t in node.inputs:
            if isinstance(t, gs.Constant) and np.dtype(t.dtype) == np.float32:
                readers.setdefault(id(t), []).append(node)
                tables[id(t)] = t
    outs = {id(t) for t in g.outputs}
    new: list[gs.Node] = []
    for key, nodes in readers.items():
        t = tables[key]
        v = np.asarray(t.values)
        if v.ndim != 2 or v.size < MIN_TABLE_ELEMENTS or key in outs:
            continue
        if not all(
            n.op == "Gather"
            and n.inputs[0] is t
            and int(n.attrs.get("axis", 0)) == 0
            and n.name not in keep
            for n in nodes
        ):
            continue
        m = np.abs(v).max(axis=1, keepdims=True).astype(np.float64)
        s = np.where(m > 0, m / 127.0, 1.0).astype(np.float32)
        q = np.clip(np.rint(v / s), -127, 127).astype(np.int8)
        tq = const(f"{t.name}_q", q, np.int8)
        ts = const(f"{t.name}_scale", s)
        stats.weight_bytes_before += v.nbytes
        stats.weight_bytes_after += q.nbytes + s.nbytes
        for n in nodes:
            ids, out = n.inputs[1], n.outputs[0]
            n.inputs.clear()
            n.outputs.clear()
            gq = make_node("Gather", [tq, ids], attrs={"axis": 0}, name=f"{n.name}_q")
            gq.outputs[0].dtype = np.int8
            cast = make_node("Cast", gq.outputs, attrs={"to": 1}, name=f"{n.name}_cast")
            cast.outputs[0].dtype = np.float32
            gs_ = make_node("Gather", [ts, ids], attrs={"axis": 0}, name=f"{n.name}_scale")
            gs_.outputs[0].dtype = np.float32
            mul = make_node("Mul", [cast.outputs[0], gs_.outputs[0]], [out], name=str(n.name))
            new += [gq, cast, gs_, mul]
            stats.embeddings.append(str(n.name))
    return new
