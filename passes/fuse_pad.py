"""Fold a constant Pad into the padding of the Conv, AveragePool or MaxPool that reads it.

``Conv(Pad(x, p, 0), W, B, pads=q) == Conv(x, W, B, pads=q + p_spatial)`` when the Pad is in
``constant`` mode with value 0, pads neither the batch nor the channel axis and only adds (no
negative, cropping pads): a Conv's implicit padding is zeros. For pools the implicit padding
differs, so the fold is done only where it is exact:

* ``MaxPool`` pads with ``-inf``: the Pad value must be ``-inf``; single output (no Indices);
* ``AveragePool`` divides by the window size including padding only with ``count_include_pad=1``:
  the Pad value must be 0 and either ``count_include_pad=1`` or the pool has no padding of its own
  (then the fused pool gets ``count_include_pad=1``, so padded zeros still count);
* pools need ``ceil_mode=0`` (partial windows at the end are treated differently) and every fused
  pad smaller than the kernel (onnxruntime's requirement); nothing with ``auto_pad`` other than
  NOTSET.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.core.graph import make_node
from graphopt.core.pass_manager import register_pass
from graphopt.core.pattern import Match, Op, Opt, Refusal, RewritePass, Rule

logger = logging.getLogger(__name__)


def read_pad(pad: gs.Node, rank: int | None) -> tuple[list[int], float] | None:
    """(pads of length 2*rank in ONNX order, constant value) of a constant-mode Pad, else None."""
    mode = pad.attrs.get("mode", "constant")
    if isinstance(mode, bytes):
        mode = mode.decode()
    if mode != "constant":
        return None
    if "pads" in pad.attrs:  # opset < 11
        pads = [int(p) for p in pad.attrs["pads"]]
        value = float(pad.attrs.get("value", 0.0))
    else:
        if len(pad.inputs) < 2 or not isinstance(pad.inputs[1], gs.Constant):
            return None
        pads = [int(p) for p in np.asarray(pad.inputs[1].values).reshape(-1)]
        value = 0.0
        if len(pad.inputs) >= 3 and pad.inputs[2].name:
            cv = pad.inputs[2]
            if not isinstance(cv, gs.Constant) or np.asarray(cv.values).size != 1:
                return None
            value = float(np.asarray(cv.values).reshape(-1)[0])
        if len(pad.inputs) >= 4 and pad.inputs[3].name:
            ax = pad.inputs[3]
            if not isinstance(ax, gs.Constant) or rank is None:
                return None
            axes = [int(a) % rank for a in np.asarray(ax.values).reshape(-1)]
            full = [0] * (2 * rank)
            k = len(axes)
            for i, a in enumerate(axes):
                full[a], full[a + rank] = pads[i], pads[i + k]
            pads = full
    if rank is not None and len(pads) != 2 * rank:
        return None
    return pads, value


class _FoldPad(Rule):
    modifies = ()
    _checked: tuple[gs.Node | None, list[int] | None] = (None, None)

    def _new_pads(self, m: Match) -> list[int] | None:
        op, pad, x = m["op"], m["pad"], m["x"]
        rank = len(x.shape) if x.shape is not None else None
        got = read_pad(pad, rank)
        if got is None:
            return None
        pads, value = got
        r = len(pads) // 2
        if r < 3 or any(p < 0 for p in pads):
            return None
        if pads[0] or pads[1] or pads[r] or pads[r + 1]:
            return None
        auto = op.attrs.get("auto_pad", "NOTSET")
        if (auto.decode() if isinstance(auto, bytes) else auto) != "NOTSET":
            return None
        sp = r - 2
        old = [int(p) for p in op.attrs.get("pads", [0] * (2 * sp))]
        if len(old) != 2 * sp:
            return None
        add = pads[2:r] + pads[r + 2 :]
        new = [a + b for a, b in zip(old, add, strict=True)]
        if op.op == "Conv":
            ok = value == 0.0
        else:
            if int(op.attrs.get("ceil_mode", 0)) != 0:
                return None
            k = [int(v) for v in op.attrs.get("kernel_shape", [])]
            if len(k) != sp or any(new[i] >= k[i] or new[i + sp] >= k[i] for i in range(sp)):
                return None
            if op.op == "MaxPool":
                ok = value == -np.inf and len(op.outputs) <= 1
            else:
                ok = value == 0.0 and (
                    int(op.attrs.get("count_include_pad", 0)) == 1 or not any(old)
                )
        return new if ok else None

    def check(self, m: Match) -> bool | Refusal:
        # the engine detaches the matched nodes before ``rewrite``: keep what was read from them
        self._checked = (m.root, self._new_pads(m))
        if self._checked[1] is None:
            return Refusal(
                "the pad is not constant, pads batch/channel axes or is negative, its "
                "value differs from what the op pads with, or a pool window would see "
                "only padding"
            )
        return True

    def rewrite(self, m: Match, outputs: list[gs.Variable]) -> list[gs.Node]:
        op = m["op"]
        root, new = self._checked
        assert root is m.root and new is not None
        attrs = dict(op.attrs)
        attrs["pads"] = new
        if op.op == "AveragePool":
            attrs["count_include_pad"] = 1
        inputs = [m["x"]] + [m[k] for k in ("w", "b") if k in m.tensors]
        return [make_node(op.op, inputs, outputs, attrs, name=op.name)]


def _rules() -> list[Rule]:
    pad = Op("Pad", ["x"], name="pad", extra_inputs=True)
    return [
        _FoldPad(Op("Conv", [pad, "w", Opt("b")], name="op"), name="fold-pad-conv"),
        _FoldPad(Op(("AveragePool", "MaxPool"), [pad], name="op"), name="fold-pad-pool"),
    ]


@register_pass
class FusePadPass(RewritePass):
    """Fold constant zero (or -inf before MaxPool) Pad into Conv/pool padding where exact."""

    name = "fuse-pad"
    rules = tuple(_rules())
