"""Static int8 quantization as QDQ: ``op(x, W, b) -> DQ(Q(x)) , DQ(W_q), DQ(b_q) -> op -> Q -> DQ``.

Maths (see :mod:`graphopt.algorithms.quant.graph`): activations affine,
``q = clamp(round(x / s) + z)``, ``s = (hi - lo) / 255`` from the calibrated range ``[lo, hi]``
(widened to contain 0); weights symmetric int8 per output channel, ``s_c = max|W_c| / 127`` (63
with ``reduce_range``); biases int32 with scale ``s_x * s_c``. Ranges come from calibration
observers (:mod:`graphopt.algorithms.quant.observers`): either given as ``ranges`` (tensor -> (lo,
hi)) or measured here from ``calib`` (an iterable of feed dicts; passes do no file I/O). Without
either the pass changes nothing. The whole job (optimize first, opset upgrade, mixed precision,
reports) is :func:`graphopt.jobs.quantize.quantize`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from graphopt.algorithms.quant.calibrate import collect_ranges
from graphopt.algorithms.quant.graph import (
    QuantConfig,
    apply_quantization,
    choose_activation_type,
    plan_quantization,
    upgrade_opset,
)
from graphopt.algorithms.quant.observers import OBSERVERS
from graphopt.core.errors import OptionError
from graphopt.core.model import Model
from graphopt.core.pass_manager import Pass, PassResult, register_pass

logger = logging.getLogger(__name__)


@register_pass
class QuantizeInt8Pass(Pass):
    """Static int8 quantization (QDQ) from calibrated activation ranges."""

    name = "quantize-int8"
    lossy = True

    def __init__(
        self,
        ranges: Mapping[str, tuple[float, float]] | None = None,
        calib: Iterable[Mapping[str, Any]] | None = None,
        method: str = "mse",
        activations: str = "auto",
        per_channel: bool = True,
        reduce_range: bool | None = None,
        keep_float: Iterable[str] = (),
        op_types: Iterable[str] | None = None,
    ) -> None:
        if method not in OBSERVERS:
            raise OptionError(
                f"quantize-int8: unknown calibration method {method!r}; choose one "
                f"of {', '.join(OBSERVERS)}"
            )
        choose_activation_type(activations, reduce_range)  # raises on a bad value
        self.ranges = dict(ranges) if ranges is not None else None
        self.calib = calib
        self.method = method
        self.activations = activations
        self.per_channel = per_channel
        self.reduce_range = reduce_range
        self.keep_float = tuple(keep_float)
        self.op_types = tuple(op_types) if op_types is not None else None

    def call(self, model: Model) -> PassResult:
        if self.ranges is None and self.calib is None:
            logger.debug("quantize-int8: no ranges and no calibration data; nothing done")
            return PassResult(model, False, {})
        plan = plan_quantization(model, keep_float=self.keep_float, op_types=self.op_types)
        if not plan.nodes:
            logger.debug("quantize-int8: no quantizable node")
            return PassResult(model, False, {})
        ranges = self.ranges
        if ranges is None:
            assert self.calib is not None
            ranges = collect_ranges(model, plan.observed(), self.calib, method=self.method).ranges
        dtype, rr, _ = choose_activation_type(self.activations, self.reduce_range)
        if self.per_channel and model.opset < 13:
            upgraded = upgrade_opset(model, 13)
            model.graph, model.opset_imports = upgraded.graph, upgraded.opset_imports
            plan = plan_quantization(model, keep_float=self.keep_float, op_types=self.op_types)
        st = apply_quantization(model, plan, ranges, QuantConfig(dtype, self.per_channel, rr))
        stats = {
            "nodes_quantized": st.nodes,
            "tensors_quantized": st.tensors,
            "weights_quantized": st.weights,
            "biases_quantized": st.biases,
            "activations_absorbed": st.absorbed,
        }
        return PassResult(model, st.nodes > 0, stats)
