"""``fp16``: float32 -> float16 with float32 kept where half breaks numerics.

The rewrite and its numerics (which nodes stay float32, where Casts go, how weights are rounded and
clipped to +-65504) are :mod:`graphopt.algorithms.fp16`; this pass only carries its options::

    y = Op(x, W)              ->   y16 = Op(Cast(x, to=FLOAT16), W16)      W16 = clip(W, +-65504)
    z = KeptOp(y)             ->   z   = KeptOp(Cast(y16, to=FLOAT))

Stats: ``nodes_fp16``, ``casts_inserted``, ``weights_fp16``, ``values_clipped``, ``kept_fp32``,
``kept_fp32_range`` (nodes kept because a range observed on ``feeds`` over- or underflows half).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from graphopt.algorithms.fp16 import Fp16Converter
from graphopt.core.model import Model
from graphopt.core.pass_manager import Pass, PassResult, register_pass


@register_pass
class Fp16Pass(Pass):
    """Convert weights and activations to float16 (float32 kept where it breaks numerics)."""

    name = "fp16"
    lossy = True

    def __init__(
        self,
        keep_fp32: Iterable[str] | str | None = None,
        keep_io_types: bool = True,
        keep_softmax: bool = False,
        kernels: str = "any",
        feeds: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        """Args: see :class:`graphopt.algorithms.fp16.Fp16Converter` (raises OptionError);
        ``feeds`` (set by the optimize job from its own when None): the data whose observed
        ranges keep over- and underflowing nodes in float32."""
        self.converter = Fp16Converter(keep_fp32, keep_io_types, keep_softmax, kernels)
        self.feeds = feeds

    def call(self, model: Model) -> PassResult:
        self.converter.feeds = self.feeds
        res = self.converter.run(model)
        return PassResult(model, res.modified, res.stats)
