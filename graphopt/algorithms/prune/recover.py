"""Recovery after channel pruning: closed-form least-squares refit of the weight layers.

After channels are removed, every weight layer (Conv with group 1, Gemm, MatMul with a constant
weight) whose input changed is refit so that, fed with the *pruned* model's activations, it
reproduces the *original* model's output on its kept output channels (He et al. 2017, "Channel
pruning for accelerating very deep neural networks"; Luo et al. 2017, ThiNet):

    W*, b* = argmin_{W,b} sum_p || [x_p, 1] [W; b] - y_p ||^2 + lam ||W||^2
           = (X^T X + lam I)^-1 X^T Y

where ``x_p`` is an im2col patch of the pruned input at output position ``p`` (a row of the input
for Gemm/MatMul) and ``y_p`` the original layer output there (before BN or activation, so a
BatchNormalization that follows stays consistent). A MatMul whose only reader is an ``Add`` of a
constant bias vector (a Linear layer as exporters write it: transformer projections and FFNs) is
fit with the ones column too, and the intercept is added to that bias: the mean that removed
heads or neurons contributed is restored. ``X^T X`` and ``X^T Y`` are accumulated in
float64 batch by batch; for convolutions only ``positions`` randomly sampled output positions per
sample are taken, so memory is bounded by the layer's patch width, not by the image size. ``lam``
is relative: ``ridge * mean(diag(X^T X))``.

Layers are refit level by level from input to output: a layer is refit only after every refit layer
upstream of it, so its inputs come from the already-recovered pruned model. Layers of one level
share onnxruntime runs.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.algorithms.prune.handlers import constant
from graphopt.core.model import Model
from graphopt.core.session import make_session

logger = logging.getLogger(__name__)


@dataclass
class _Layer:
    node: gs.Node
    kind: str
    kept_out: np.ndarray | None  # original output channels kept (None: all)
    level: int = 0
    weight: np.ndarray | None = None  # the layer's weight as pruned (before the refit)
    xtx: np.ndarray | None = None
    xty: np.ndarray | None = None
    rows: int = 0


def _refittable(node: gs.Node, opset: int) -> str | None:
    if node.op == "Conv" and int(node.attrs.get("group", 1)) == 1:
        w = constant(node.inputs[1], opset)
        return "conv" if w is not None and w.ndim == 4 else None
    if node.op == "Gemm" and not node.attrs.get("transA", 0):
        return "gemm" if constant(node.inputs[1], opset) is not None else None
    if node.op == "MatMul":
        w = constant(node.inputs[1], opset)
        if w is None or w.ndim != 2:
            return None
        return "matmul+bias" if bias_add(node, opset) is not None else "matmul"
    return None


def bias_add(node: gs.Node, opset: int) -> tuple[gs.Node, int] | None:
    """The ``Add`` that adds a constant bias vector to a MatMul's output (what exporters write
    for a Linear layer on a rank > 2 input) and the index of its bias input, or None."""
    out = node.outputs[0]
    if len(out.outputs) != 1:
        return None
    add = out.outputs[0]
    if add.op != "Add" or len(add.inputs) != 2:
        return None
    k = 1 if add.inputs[0] is out else 0
    if add.inputs[1 - k] is not out:
        return None
    b = constant(add.inputs[k], opset)
    w = constant(node.inputs[1], opset)
    if b is None or w is None or b.ndim != 1 or b.shape[0] != w.shape[1]:
        return None
    return add, k


def _fit_width(node: gs.Node, kind: str, opset: int) -> int:
    w = constant(node.inputs[1], opset)
    if w is None:
        return 0
    if kind == "conv":
        return int(np.prod(w.shape[1:])) + 1
    if kind == "gemm":
        return int(w.shape[1] if node.attrs.get("transB", 0) else w.shape[0]) + 1
    return int(w.shape[0]) + (kind == "matmul+bias")


def _conv_patches(
    x: np.ndarray, node: gs.Node, w_shape: tuple[int, ...], out_hw: tuple[int, int], pos: np.ndarray
) -> np.ndarray:
    """im2col rows ``[P, C*kh*kw]`` of one sample ``x`` [C,H,W] at flat output positions ``pos``."""
    kh, kw = w_shape[2], w_shape[3]
    sh, sw = node.attrs.get("strides", [1, 1])
    dh, dw = node.attrs.get("dilations", [1, 1])
    pads = list(node.attrs.get("pads", [0, 0, 0, 0]))
    auto = node.attrs.get("auto_pad", "NOTSET")
    if isinstance(auto, bytes):
        auto = auto.decode()
    ho, wo = out_hw
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        ph = max(0, (ho - 1) * sh + (kh - 1) * dh + 1 - x.shape[1])
        pw = max(0, (wo - 1) * sw + (kw - 1) * dw + 1 - x.shape[2])
        if auto == "SAME_UPPER":
            pads = [ph // 2, pw // 2, ph - ph // 2, pw - pw // 2]
        else:
            pads = [ph - ph // 2, pw - pw // 2, ph // 2, pw // 2]
    elif auto == "VALID":
        pads = [0, 0, 0, 0]
    xp = np.pad(x, ((0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    oh, ow = pos // wo, pos % wo
    r = oh[:, None] * sh + np.arange(kh)[None, :] * dh  # [P, kh]
    c = ow[:, None] * sw + np.arange(kw)[None, :] * dw  # [P, kw]
    patch = xp[:, r[:, :, None], c[:, None, :]]  # [C, P, kh, kw]
    return patch.transpose(1, 0, 2, 3).reshape(len(pos), -1)


def _rows(
    layer: _Layer, x: np.ndarray, y: np.ndarray, rng: np.random.Generator, positions: int
) -> tuple[np.ndarray, np.ndarray]:
    """Design rows X (with a ones column unless MatMul) and targets Y for one batch."""
    node = layer.node
    if layer.kind == "conv":
        w = layer.weight
        assert w is not None
        n, _, ho, wo = y.shape
        xs, ys = [], []
        for i in range(n):
            k = min(positions, ho * wo)
            pos = rng.choice(ho * wo, size=k, replace=False) if k < ho * wo else np.arange(ho * wo)
            xs.append(_conv_patches(x[i], node, w.shape, (ho, wo), pos))
            ys.append(y[i].reshape(y.shape[1], -1)[:, pos].T)
        xm, ym = np.concatenate(xs), np.concatenate(ys)
    else:
        xm = x.reshape(-1, x.shape[-1])
        ym = y.reshape(-1, y.shape[-1])
        if len(xm) > positions * 8:
            sel = rng.choice(len(xm), size=positions * 8, replace=False)
            xm, ym = xm[sel], ym[sel]
    if layer.kind != "matmul":
        xm = np.concatenate([xm, np.ones((len(xm), 1), xm.dtype)], axis=1)
    if layer.kept_out is not None:
        ym = ym[:, layer.kept_out]
    return xm.astype(np.float64), ym.astype(np.float64)


def _write(layer: _Layer, sol: np.ndarray, opset: int) -> None:
    node = layer.node
    w = layer.weight
    assert w is not None
    dtype = w.dtype
    if layer.kind == "conv":
        cout = sol.shape[1]
        new_w = sol[:-1].T.reshape((cout,) + w.shape[1:]).astype(dtype)
        bias = sol[-1].astype(dtype)
        node.inputs[1] = gs.Constant(f"{node.name}_W_recovered", np.ascontiguousarray(new_w))
        b = gs.Constant(f"{node.name}_B_recovered", np.ascontiguousarray(bias))
        if len(node.inputs) > 2:
            node.inputs[2] = b
        else:
            node.inputs.append(b)
    elif layer.kind == "gemm":
        wk = sol[:-1].astype(dtype)
        new_b = wk.T if node.attrs.get("transB", 0) else wk
        node.inputs[1] = gs.Constant(f"{node.name}_B_recovered", np.ascontiguousarray(new_b))
        c = gs.Constant(f"{node.name}_C_recovered", np.ascontiguousarray(sol[-1].astype(dtype)))
        if len(node.inputs) > 2:
            node.inputs[2] = c
        else:
            node.inputs.append(c)
        node.attrs["alpha"] = 1.0
        node.attrs["beta"] = 1.0
    elif layer.kind == "matmul+bias":
        # y = x W + c fitted to the MatMul's output: W replaces the weight, c joins the bias
        found = bias_add(node, opset)
        assert found is not None  # checked when the layer was chosen
        add, k = found
        node.inputs[1] = gs.Constant(
            f"{node.name}_W_recovered", np.ascontiguousarray(sol[:-1].astype(dtype))
        )
        bias = constant(add.inputs[k], opset)
        assert bias is not None
        new_b = (bias.astype(np.float64) + sol[-1]).astype(bias.dtype)
        add.inputs[k] = gs.Constant(f"{add.name}_B_recovered", np.ascontiguousarray(new_b))
    else:
        node.inputs[1] = gs.Constant(
            f"{node.name}_W_recovered", np.ascontiguousarray(sol.astype(dtype))
        )


def recover(
    original: Model,
    pruned: Model,
    calib: Sequence[Mapping[str, np.ndarray]],
    kept_out: Mapping[str, np.ndarray],
    changed: set[str],
    positions: int = 256,
    ridge: float = 1e-3,
    seed: int = 0,
    max_width: int = 8192,
) -> dict[str, int]:
    """Refit, in place, the weight layers of ``pruned`` whose data input is in or downstream of
    ``changed`` (tensor names whose channels were cut).

    Args:
        original: the model before pruning (same tensor names).
        pruned: the pruned model, changed in place.
        calib: feed dicts (a few dozen samples are enough).
        kept_out: layer name -> indices of the original output channels it kept.
        changed: names of tensors that lost channels.
        positions: output positions sampled per sample and conv layer (memory bound).
        ridge: relative ridge regularisation.
        seed: sampling seed.
        max_width: layers with more weights per output (the normal equations are width x width
            float64) are left as pruned.

    Returns:
        counters: ``layers_refit``, ``rows`` (total design rows).
    """
    g = pruned.graph
    dirty = set(changed)
    level_of: dict[str, int] = {}
    layers: list[_Layer] = []
    skipped = 0
    for node in g.nodes:
        ins = [i for i in node.inputs if isinstance(i, gs.Variable) and i.name]
        lv = max((level_of.get(i.name, 0) for i in ins), default=0)
        is_dirty = any(i.name in dirty for i in ins)
        kind = _refittable(node, pruned.opset)
        width = _fit_width(node, kind, pruned.opset) if kind else 0
        if kind and width > max_width:
            logger.info(
                "recovery: %s skipped (%d weights per output > max_width %d)",
                node.name,
                width,
                max_width,
            )
            skipped += 1
        elif kind and node.inputs[0].name in dirty:
            lay = _Layer(
                node, kind, kept_out.get(node.name), lv + 1, constant(node.inputs[1], pruned.opset)
            )
            layers.append(lay)
            lv += 1
        for o in node.outputs:
            if is_dirty:
                dirty.add(o.name)
            if lv:
                level_of[o.name] = lv
    if not layers:
        return {"layers_refit": 0, "rows": 0, "layers_too_wide": skipped}
    rng = np.random.default_rng(seed)
    total_rows = 0
    orig_proto = original.to_onnx()
    for level in sorted({lay.level for lay in layers}):
        batch = [lay for lay in layers if lay.level == level]
        xin = sorted({lay.node.inputs[0].name for lay in batch})
        yout = sorted({lay.node.outputs[0].name for lay in batch})
        s_pruned = make_session(pruned, outputs=xin, truncate=True)
        s_orig = make_session(orig_proto, outputs=yout, truncate=True)
        in_p = {i.name for i in s_pruned.get_inputs()}
        in_o = {i.name for i in s_orig.get_inputs()}
        for feeds in calib:
            xs = dict(zip(xin, s_pruned.run(xin, {k: v for k, v in feeds.items() if k in in_p})))
            ys = dict(zip(yout, s_orig.run(yout, {k: v for k, v in feeds.items() if k in in_o})))
            for lay in batch:
                xm, ym = _rows(
                    lay, xs[lay.node.inputs[0].name], ys[lay.node.outputs[0].name], rng, positions
                )
                if lay.xtx is None:
                    lay.xtx = np.zeros((xm.shape[1], xm.shape[1]))
                    lay.xty = np.zeros((xm.shape[1], ym.shape[1]))
                lay.xtx += xm.T @ xm
                lay.xty += xm.T @ ym  # type: ignore[operator]
                lay.rows += len(xm)
        for lay in batch:
            assert lay.xtx is not None and lay.xty is not None
            d = lay.xtx.shape[0]
            lam = ridge * float(np.mean(np.diag(lay.xtx))) + 1e-12
            reg = np.full(d, lam)
            if lay.kind != "matmul":
                reg[-1] = 1e-12 * lam  # the bias column is not shrunk
            try:
                sol = np.linalg.solve(lay.xtx + np.diag(reg), lay.xty)
            except np.linalg.LinAlgError:
                logger.debug("recovery: singular system for %s, skipped", lay.node.name)
                continue
            _write(lay, sol, pruned.opset)
            total_rows += lay.rows
            lay.xtx = lay.xty = None
        logger.debug("recovery level %d: %d layers", level, len(batch))
    return {"layers_refit": len(layers), "rows": total_rows, "layers_too_wide": skipped}
