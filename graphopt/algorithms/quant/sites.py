"""MatMul/Gemm nodes with constant weights: the sites of dynamic and weight-only quantization.

A site is ``Y = A @ W (+ b)`` with ``A`` a float activation of any rank (``[..., K]``) and
``W`` a constant ``[K, N]`` float matrix: a ``MatMul`` whose second input is a 2-D constant, or a
``Gemm`` with ``transA = 0``, a constant ``B`` (``W = alpha * B``, transposed when ``transB``) and
an optional constant bias ``C`` of ``N`` (or 1) values (``b = beta * C``). A ``MatMul`` followed
by an ``Add`` of a constant ``[N]`` vector, where the ``Add`` is the only reader of the product
and the product is no graph output, takes that vector as its bias (``fuse_bias``).

Sites are found once and rewritten by :mod:`graphopt.algorithms.quant.dynamic` and
:mod:`graphopt.algorithms.quant.weight_only`; what is refused is returned with the reason.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.core.model import Model

logger = logging.getLogger(__name__)

#: ops whose weights are quantized
SITE_OPS = ("MatMul", "Gemm")


@dataclass
class Site:
    """One ``Y = A @ W (+ b)``.

    Attributes:
        node: the MatMul or Gemm.
        act: the activation ``A``.
        weight: ``W`` as ``[K, N]`` float32 (transposed and scaled by ``alpha`` for Gemm).
        bias: ``b`` as ``[N]`` float32, or None.
        bias_add: the ``Add`` node folded in as the bias (MatMul), or None.
        output: the tensor that holds ``Y`` (the Add's output when one was folded).
    """

    node: gs.Node
    act: gs.Tensor
    weight: np.ndarray
    bias: np.ndarray | None
    bias_add: gs.Node | None
    output: gs.Variable
    weight_tensor: gs.Constant

    @property
    def name(self) -> str:
        return str(self.node.name)

    @property
    def k(self) -> int:
        return int(self.weight.shape[0])

    @property
    def n(self) -> int:
        return int(self.weight.shape[1])


def _float_const(t: gs.Tensor) -> bool:
    return isinstance(t, gs.Constant) and np.dtype(t.dtype) == np.float32


def _bias_add(node: gs.Node, n: int, graph_outputs: set[int]) -> tuple[gs.Node, np.ndarray] | None:
    out = node.outputs[0]
    if id(out) in graph_outputs or len(out.outputs) != 1:
        return None
    add = out.outputs[0]
    if add.op != "Add" or len(add.inputs) != 2:
        return None
    other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
    if other is out or not _float_const(other):
        return None
    b = np.asarray(other.values)
    if b.size != n or b.ndim < 1 or b.shape[-1] != n:
        return None
    return add, b.reshape(n).astype(np.float32)


def find_sites(
    model: Model,
    keep_float: Iterable[str] = (),
    fuse_bias: bool = True,
    min_k: int = 16,
) -> tuple[list[Site], dict[str, str]]:
    """The quantizable MatMul/Gemm sites of the main graph and why the others are not.

    Args:
        keep_float: node names to leave alone.
        fuse_bias: fold a following ``Add`` of a constant ``[N]`` vector into the site.
        min_k: skip products over fewer than this many inputs (too small to gain).

    Returns:
        ``(sites, skipped)`` with ``skipped``: node name -> reason.
    """
    g = model.graph
    keep = set(keep_float)
    outs = {id(t) for t in g.outputs}
    sites: list[Site] = []
    skipped: dict[str, str] = {}
    for node in g.nodes:
        if node.op not in SITE_OPS or node.domain not in (None, "", "ai.onnx"):
            continue
        name = str(node.name)
        if name in keep:
            skipped[name] = "kept float (requested)"
            continue
        if len(node.inputs) < 2 or len(node.outputs) != 1:
            skipped[name] = "unexpected inputs/outputs"
            continue
        a, bt = node.inputs[0], node.inputs[1]
        if isinstance(a, gs.Constant):
            skipped[name] = "constant activation (fold constants first)"
            continue
        if not _float_const(bt):
            skipped[name] = "weight is not a float32 constant"
            continue
        w = np.asarray(bt.values)
        if w.ndim != 2:
            skipped[name] = f"weight of rank {w.ndim} (only 2-D weights)"
            continue
        bias: np.ndarray | None = None
        bias_add: gs.Node | None = None
        if node.op == "Gemm":
            if node.attrs.get("transA", 0):
                skipped[name] = "Gemm with transA"
                continue
            alpha = float(node.attrs.get("alpha", 1.0))
            beta = float(node.attrs.get("beta", 1.0))
            w = (w.T if node.attrs.get("transB", 0) else w) * np.float32(alpha)
            if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name:
                c = node.inputs[2]
                if not _float_const(c):
                    skipped[name] = "Gemm bias is not a float32 constant"
                    continue
                cv = np.asarray(c.values)
                if cv.size == 1:
                    bias = np.full(w.shape[1], float(cv.reshape(())) * beta, np.float32)
                elif cv.size == w.shape[1] and cv.shape[-1] == w.shape[1]:
                    bias = (cv.reshape(-1) * np.float32(beta)).astype(np.float32)
                else:
                    skipped[name] = f"Gemm bias of shape {list(cv.shape)} (not [N])"
                    continue
        if w.shape[0] < min_k:
            skipped[name] = f"K = {w.shape[0]} < {min_k}: too small to gain"
            continue
        output = node.outputs[0]
        if node.op == "MatMul" and fuse_bias:
            found = _bias_add(node, w.shape[1], outs)
            if found is not None:
                bias_add, bias = found
                output = bias_add.outputs[0]
        sites.append(
            Site(
                node=node,
                act=a,
                weight=np.ascontiguousarray(w, dtype=np.float32),
                bias=bias,
                bias_add=bias_add,
                output=output,
                weight_tensor=bt,
            )
        )
    for name, why in skipped.items():
        logger.debug("quantize: %s not quantized: %s", name, why)
    return sites, skipped


def detach(site: Site) -> None:
    """Disconnect the site's node (and its bias Add) from the graph: their outputs lose their
    producer, so the caller's new nodes can produce ``site.output``."""
    for n in (site.node, site.bias_add):
        if n is not None:
            n.inputs.clear()
            n.outputs.clear()


def matmul_macs_share(model: Model) -> tuple[float, int, int]:
    """How much of the model's work is products with constant weights.

    Returns:
        ``(share, weight_products, conv_nodes)``: the share of MatMul/Gemm nodes with a constant
        2-D weight among MatMul/Gemm/Conv nodes (weighted by weight size), their count and the
        number of Conv nodes.
    """
    wsize = 0
    conv = 0
    conv_size = 0
    count = 0
    other = 0
    for node in model.graph.nodes:
        if node.op in SITE_OPS and len(node.inputs) > 1 and _float_const(node.inputs[1]):
            if np.asarray(node.inputs[1].values).ndim == 2:
                wsize += int(np.asarray(node.inputs[1].values).size)
                count += 1
                continue
        if node.op in ("Conv", "ConvTranspose"):
            conv += 1
            if len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant):
                conv_size += int(np.asarray(node.inputs[1].values).size)
        elif node.op in SITE_OPS:
            other += 1
    total = wsize + conv_size
    return (wsize / total if total else 0.0), count, conv
