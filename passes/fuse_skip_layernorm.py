"""Residual Add + LayerNorm -> onnxruntime's ``SkipLayerNormalization`` (the ``ort`` target).

::

    s = a + b            (optionally a = a' + bias, bias a constant of the hidden size)
    y = LayerNormalization(s, gamma, beta, axis=-1, epsilon=eps)
      -> y, _, _, s = com.microsoft.SkipLayerNormalization(a', b, gamma, beta, bias, epsilon=eps)

``SkipLayerNormalization(input, skip, gamma, beta, bias)`` computes ``s = input + skip + bias`` and
``LayerNorm(s) * gamma + beta`` over the last axis in one kernel; its fourth output is ``s``, used
when the sum is read by other nodes too (the residual stream of pre-LN transformers) or is a graph
output. The RMS form ``SimplifiedLayerNormalization`` / ``RMSNormalization`` of the sum becomes
``com.microsoft.SkipSimplifiedLayerNormalization(input, skip, gamma, bias)`` (no beta).

Conditions (from onnxruntime's CPU kernels, checked in the installed build's registry with
:func:`graphopt.core.kernels.ort_contrib_runs`): the normalisation is over the last axis only
(``axis = -1``, ``stash_type = 1``), its extra outputs (mean, inverse std) are unused, gamma/beta
are constant with the hidden size ``H`` elements, the input is 2-D or 3-D with a static last
axis ``H``, and the skip has the input's shape or, for a 3-D input ``(B, S, H)``, ``(1, S, H)`` or
``(S, H)`` (the broadcasts the kernel supports); a folded bias is a constant of ``H`` elements
whose sum is read by nothing else. The skip may be a constant (a position embedding of shape
``(S, H)``); a 1-D constant is a bias, not a skip. Anything else is kept as it is.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.core.errors import OptionError
from graphopt.core.graph import const, local_topo_order, make_node
from graphopt.core.kernels import ort_contrib_runs
from graphopt.core.model import Model
from graphopt.core.pass_manager import Pass, PassResult, register_pass

logger = logging.getLogger(__name__)

TARGETS = ("ort",)
MS = "com.microsoft"
#: normalisation op -> the fused op (RMS forms have no beta)
FUSED = {
    "LayerNormalization": "SkipLayerNormalization",
    "SimplifiedLayerNormalization": "SkipSimplifiedLayerNormalization",
    "RMSNormalization": "SkipSimplifiedLayerNormalization",
}


def _producer(t: gs.Tensor) -> gs.Node | None:
    return t.inputs[0] if isinstance(t, gs.Variable) and len(t.inputs) == 1 else None


def _dims(t: gs.Tensor) -> list[Any] | None:
    shape = getattr(t, "shape", None)
    if shape is None or any(d is None or (isinstance(d, str) and not d) for d in shape):
        return None
    return list(shape)


def _dtype(t: gs.Tensor) -> np.dtype | None:
    if isinstance(t, gs.Constant):
        return np.asarray(t.values).dtype
    return np.dtype(t.dtype) if getattr(t, "dtype", None) is not None else None


def _vector(t: gs.Tensor | None, h: int) -> np.ndarray | None:
    """The values of a constant with ``h`` elements along its last axis only, else None."""
    if not isinstance(t, gs.Constant):
        return None
    v = np.asarray(t.values)
    if v.size != h or v.shape[-1:] != (h,):
        return None
    return v.reshape(-1)


def _vector_tensor(t: gs.Tensor, name: str, dtype: np.dtype | None) -> gs.Tensor:
    """``t`` itself when it is already 1-D (shared constants stay shared), else a 1-D copy."""
    v = np.asarray(t.values) if isinstance(t, gs.Constant) else None
    assert v is not None
    return t if v.ndim == 1 else const(name, v.reshape(-1), dtype)


class Fusion:
    """One LayerNorm and its residual Add, checked; :meth:`apply` rewrites them."""

    def __init__(self, graph: gs.Graph, norm: gs.Node) -> None:
        self.graph = graph
        self.norm = norm
        self.outs = {id(t) for t in graph.outputs}

    def _escapes(self, t: gs.Tensor, readers: int = 1) -> bool:
        return len(t.outputs) != readers or id(t) in self.outs

    def check(self) -> str | None:  # noqa: PLR0911, PLR0912 - one reason per condition
        """None when the fusion applies, else why not (also sets the parts it found)."""
        norm = self.norm
        fused = FUSED.get(norm.op)
        if fused is None or (norm.domain or "") not in ("", "ai.onnx"):
            return "not a LayerNorm"
        self.fused = fused
        if any(o.name and (o.outputs or id(o) in self.outs) for o in norm.outputs[1:]):
            return "its mean/inverse-std outputs are used"
        if int(norm.attrs.get("stash_type", 1)) != 1:
            return "stash_type is not float"
        s = norm.inputs[0]
        dims = _dims(s)
        if dims is None or len(dims) not in (2, 3) or not isinstance(dims[-1], int):
            return "the input is not 2-D/3-D with a static hidden size"
        h = dims[-1]
        if int(norm.attrs.get("axis", -1)) % len(dims) != len(dims) - 1:
            return "not normalised over the last axis only"
        dt = _dtype(s)
        if dt is None or not ort_contrib_runs(fused, MS, dt):
            return f"the installed onnxruntime has no {fused} kernel for {dt}"
        self.gamma = _vector(norm.inputs[1] if len(norm.inputs) > 1 else None, h)
        if self.gamma is None:
            return "gamma is not a constant of the hidden size"
        self.beta = None
        if fused == "SkipLayerNormalization" and len(norm.inputs) > 2 and norm.inputs[2].name:
            self.beta = _vector(norm.inputs[2], h)
            if self.beta is None:
                return "beta is not a constant of the hidden size"
        self.eps = float(norm.attrs.get("epsilon", 1e-5))
        add = _producer(s)
        if add is None or add.op != "Add" or (add.domain or "") != "" or len(add.inputs) != 2:
            return "its input is not an Add"
        a, b = add.inputs
        if isinstance(a, gs.Constant) and isinstance(b, gs.Constant):
            return "the Add's inputs are both constant"
        da, db = _dims(a), _dims(b)
        if da is None or db is None:
            return "the Add's input shapes are unknown"
        if da != dims or isinstance(a, gs.Constant):  # the input is the full-shape tensor
            a, b, da, db = b, a, db, da
        if da != dims or not (db == dims or (len(dims) == 3 and db in ([1, *dims[1:]], dims[1:]))):
            return f"the skip's shape {db} is not one the kernel broadcasts to {dims}"
        self.add, self.sum = add, s
        self.input, self.skip = a, b
        self.bias_add: gs.Node | None = None
        self.bias: np.ndarray | None = None
        for i, t in enumerate((a, b)):
            p = _producer(t)
            if p is None or p.op != "Add" or (p.domain or "") != "" or len(p.inputs) != 2:
                continue
            if self._escapes(t):
                continue
            k = [j for j, u in enumerate(p.inputs) if isinstance(u, gs.Constant)]
            if len(k) != 1:
                continue
            other = p.inputs[1 - k[0]]
            vec = _vector(p.inputs[k[0]], h)
            if vec is None or _dims(other) != _dims(t) or _dtype(p.inputs[k[0]]) != dt:
                continue
            self.bias_add, self.bias = p, vec
            if i == 0:
                self.input = other
            else:
                self.skip = other
            break
        return None

    def apply(self) -> None:
        """Replace the Add(s) and the norm by the fused node (in the norm's place)."""
        norm, dt = self.norm, _dtype(self.sum)
        assert self.gamma is not None
        gamma_t = norm.inputs[1]
        inputs: list[gs.Tensor] = [self.input, self.skip, _vector_tensor(gamma_t, "skln_gamma", dt)]
        if self.fused == "SkipLayerNormalization":
            if self.beta is not None:
                inputs.append(_vector_tensor(norm.inputs[2], "skln_beta", dt))
            else:
                inputs.append(const("skln_beta", np.zeros_like(self.gamma), dt))
        if self.bias is not None:
            assert self.bias_add is not None
            bias_t = next(t for t in self.bias_add.inputs if isinstance(t, gs.Constant))
            inputs.append(_vector_tensor(bias_t, "skln_bias", dt))
        outputs = [norm.outputs[0]]
        keep_sum = self._escapes(self.sum)
        if keep_sum:
            outputs += [gs.Variable.empty(), gs.Variable.empty(), self.sum]
        for n in (norm, self.add, self.bias_add):
            if n is not None:
                n.inputs.clear()
                n.outputs.clear()
        node = make_node(
            self.fused, inputs, outputs, {"epsilon": self.eps}, name="skip_layernorm", domain=MS
        )
        nodes = self.graph.nodes
        nodes.insert(next(i for i, n in enumerate(nodes) if n is norm), node)


@register_pass
class FuseSkipLayerNormPass(Pass):
    """Add (+ bias) + LayerNorm -> com.microsoft.SkipLayerNormalization (ort target)."""

    name = "fuse-skip-layernorm"

    def __init__(self, target: str = "ort") -> None:
        if target not in TARGETS:
            raise OptionError(
                f"fuse-skip-layernorm lowers to onnxruntime's fused ops: target must be 'ort', "
                f"not {target!r}"
            )
        self.target = target

    def call(self, model: Model) -> PassResult:
        stats: dict[str, int] = {}
        for graph in list(model.walk_graphs()):
            done = 0
            for norm in list(graph.nodes):
                if norm.op not in FUSED or not norm.outputs:
                    continue
                f = Fusion(graph, norm)
                why = f.check()
                if why is not None:
                    logger.debug("fuse-skip-layernorm: skip %s: %s", norm.name, why)
                    continue
                f.apply()
                key = "skip-simplified-layernorm" if "Simplified" in f.fused else "skip-layernorm"
                key += "-bias" if f.bias is not None else ""
                stats[key] = stats.get(key, 0) + 1
                done += 1
            if done:
                graph.cleanup(remove_unused_graph_inputs=False, recurse_subgraphs=False)
                graph.nodes = local_topo_order(graph)
        return PassResult(model, bool(stats), stats)
