"""Training on ONNX graphs: recover what compression loses, from the ONNX file alone (needs torch,
the ``graphopt[train]`` extra).

Nothing outside this package imports it at module level: the jobs import it inside the function
that needs it, so ``import graphopt`` and every other command work without torch.

* :class:`~.module.OnnxModule` -- an ONNX graph as a trainable ``torch.nn.Module`` (an
  interpreter over the graph's nodes, parameters named by their ONNX tensors).
* :func:`~.export.write_back` -- trained tensors back into the same graph, by name.
* :mod:`.distill` -- output distillation (Hinton et al. 2015, "Distilling the knowledge in a
  neural network") and feature distillation (Romero et al. 2015, "FitNets: hints for thin deep
  nets") of a student graph from its teacher on unlabeled inputs.
* :mod:`.qat` with :mod:`.fakequant` -- quantization-aware training of a QDQ graph with learned
  step sizes (Esser et al. 2020, "Learned Step Size Quantization", LSQ), exported as the same
  QDQ graph.
* :mod:`.adaround` -- learned rounding of weights (Nagel et al. 2020, "Up or Down? Adaptive
  Rounding for Post-Training Quantization", AdaRound).
"""

from __future__ import annotations

from .export import replace_tensors, same_structure, verify_export, write_back
from .module import OnnxModule

__all__ = ["OnnxModule", "replace_tensors", "same_structure", "verify_export", "write_back"]
