"""Convert a float32 model to float16, keeping float32 where half precision breaks numerics.

Rewrite: every node that computes in float32 is given float16 tensors (weights converted,
activations produced in half) unless it is *kept* in float32; at every boundary between a float16
producer and a float32 consumer (or the reverse) one ``Cast`` is inserted, shared by all consumers
of that tensor::

    y = Op(x, W)              ->   y16 = Op(Cast(x, to=FLOAT16), W16)      W16 = clip(W, +-65504)
    z = KeptOp(y)             ->   z   = KeptOp(Cast(y16, to=FLOAT))

Weights are rounded to the nearest float16 (relative error <= 2^-11) and clipped to the finite range
``|w| <= 65504`` so that no constant becomes ``inf``. Graph inputs and outputs keep float32 by
default (``keep_io_types=True``: Casts at the edges, output names kept).

Kept in float32:

* reductions and powers (``ReduceMean``/``ReduceSum``/... , ``Pow``, ``LayerNormalization``,
  ``GroupNormalization``...), and the chain that turns a reduction into a normalizer (``Add(eps) ->
  Sqrt -> Div/Reciprocal``): a sum of squares overflows float16 at 256 and ``eps`` of 1e-12 rounds
  to 0 in half precision;
* ``Resize``/``Upsample`` ``roi``/``scales`` inputs (the schema wants float there) -- the data input
  itself may be half;
* ops whose onnxruntime CPU kernel rejects float16 (``ORT_CPU_FP16`` says ``"none"``: the schema
  refuses float16, e.g. ``Range``); with ``kernels="native"`` also those that onnxruntime's CPU
  provider only runs by inserting its own Casts (``"cast"``: nearly all compute ops on x86);
* control-flow nodes (``If``/``Loop``/``Scan``) at their boundary: their subgraphs are converted
  separately with float32 outputs, so both branches of an ``If`` still agree on types;
* ``Sigmoid``/``Softmax`` nodes that produce a float32 graph output (probabilities near 0 are
  subnormal in half; the output is cast to float32 anyway);
* ``Softmax`` inputs with ``keep_softmax=True``; and any op type or node name given in
  ``keep_fp32``;
* with ``feeds`` (the data the model will see, like calibration data): every node that reads or
  writes a float32 tensor whose observed range (:func:`observe_ranges`, the float32 model run in
  onnxruntime on the feeds) overflows float16 -- largest finite ``|x|`` above
  ``FP16_MAX / FP16_HEADROOM`` (16376: room for data a little louder than the feeds and for the
  op's own intermediate sums) -- or underflows it -- nonzero, but every ``|x|`` below the smallest
  normal float16 (6.1e-5), where half keeps a few significant bits at best. Audio scaled to int16
  (the openWakeWord melspectrogram) squares to 1e9 in a power spectrum: in half that is ``inf``,
  and every output NaN.

``ORT_CPU_FP16`` was measured by building a one-node float16 model per op type, loading it in
onnxruntime 1.32's CPU provider with an optimized-model dump, and looking whether onnxruntime ran
the node as is (``native``), wrapped it in Casts (``cast``) or refused it (``none``). Op types not
in the table are probed the same way, on the node itself, the first time they are met.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from graphopt.core.const_eval import literal_value
from graphopt.core.errors import GraphoptError, OptionError
from graphopt.core.graph import name_scope, unique_name
from graphopt.core.model import Model
from graphopt.core.session import run_model, session_options

logger = logging.getLogger(__name__)

F32 = np.dtype(np.float32)
F16 = np.dtype(np.float16)
FP16_MAX = float(np.finfo(np.float16).max)
#: a tensor observed above ``FP16_MAX / FP16_HEADROOM`` is kept float32 (see the module docstring)
FP16_HEADROOM = 4.0
#: the smallest normal float16 (2^-14): a nonzero tensor observed entirely below it underflows
FP16_TINY = float(np.finfo(np.float16).tiny)

# Measured with onnxruntime 1.32 (CPUExecutionProvider, x86-64), one fp16 node per op type:
# native = runs with fp16 kernel; cast = ORT inserts Casts around it (runs in fp32); none = refused.
ORT_CPU_FP16: dict[str, str] = {
    **dict.fromkeys(
        (
            "Cast",
            "Compress",
            "Concat",
            "ConstantOfShape",
            "Constant",
            "Expand",
            "Flatten",
            "Gather",
            "GatherElements",
            "Identity",
            "IsNaN",
            "LayerNormalization",
            "Max",
            "Min",
            "Mod",
            "Not",
            "Reshape",
            "Round",
            "ScatterND",
            "Shape",
            "Shrink",
            "Sign",
            "Slice",
            "Split",
            "Squeeze",
            "Transpose",
            "Unsqueeze",
        ),
        "native",
    ),
    **dict.fromkeys(
        (
            "Abs",
            "Acos",
            "Add",
            "ArgMax",
            "Asin",
            "Atan",
            "AveragePool",
            "BatchNormalization",
            "Ceil",
            "Clip",
            "Conv",
            "ConvTranspose",
            "Cos",
            "CumSum",
            "DepthToSpace",
            "Det",
            "Div",
            "Dropout",
            "Einsum",
            "Elu",
            "Equal",
            "Erf",
            "Exp",
            "EyeLike",
            "Floor",
            "Gelu",
            "Gemm",
            "GlobalAveragePool",
            "GlobalLpPool",
            "GlobalMaxPool",
            "GridSample",
            "GRU",
            "Greater",
            "Hardmax",
            "HardSigmoid",
            "HardSwish",
            "InstanceNormalization",
            "LeakyRelu",
            "Less",
            "Log",
            "LogSoftmax",
            "LpNormalization",
            "LpPool",
            "LRN",
            "LSTM",
            "MatMul",
            "MaxPool",
            "Mean",
            "MeanVarianceNormalization",
            "Mish",
            "Mul",
            "Neg",
            "NonZero",
            "Pad",
            "Pow",
            "PRelu",
            "Reciprocal",
            "ReduceL1",
            "ReduceL2",
            "ReduceLogSum",
            "ReduceLogSumExp",
            "ReduceMax",
            "ReduceMean",
            "ReduceMin",
            "ReduceProd",
            "ReduceSum",
            "ReduceSumSquare",
            "Relu",
            "Resize",
            "Selu",
            "Sigmoid",
            "Sin",
            "Sinh",
            "Size",
            "Softmax",
            "Softplus",
            "Softsign",
            "SpaceToDepth",
            "Sqrt",
            "Sub",
            "Sum",
            "Tan",
            "Tanh",
            "ThresholdedRelu",
            "Tile",
            "TopK",
            "Trilu",
            "Upsample",
            "Where",
        ),
        "cast",
    ),
    **dict.fromkeys(("Range", "Celu", "IsInf", "GroupNormalization"), "none"),
}

#: accumulate many values or raise to powers: float16 overflows (256^2 > 65504) or loses the sum
ALWAYS_FP32: frozenset[str] = frozenset(
    {
        "Pow",
        "ReduceMean",
        "ReduceSum",
        "ReduceSumSquare",
        "ReduceL1",
        "ReduceL2",
        "ReduceLogSum",
        "ReduceLogSumExp",
        "ReduceProd",
        "LayerNormalization",
        "GroupNormalization",
        "InstanceNormalization",
        "MeanVarianceNormalization",
        "LpNormalization",
        "CumSum",
        "RandomNormal",
        "RandomUniform",
        "RandomNormalLike",
        "RandomUniformLike",
        "Multinomial",
    }
)
#: ops on the path reduction -> normalizer (var + eps, sqrt, 1/x, x/std) that stay float32
NORM_CHAIN: frozenset[str] = frozenset({"Add", "Sqrt", "Reciprocal", "Div", "Max", "Clip"})
#: control flow: converted inside, float32 at the boundary
CONTROL_FLOW: frozenset[str] = frozenset({"If", "Loop", "Scan"})
#: (op, input index) that must stay float32 even when the node runs in half
FP32_INPUTS: dict[str, frozenset[int]] = {"Resize": frozenset({1, 2}), "Upsample": frozenset({1})}
#: ops where clipping an out-of-range constant to +-65504 changes nothing that matters (bounds)
SATURATION_SAFE: frozenset[str] = frozenset({"Clip", "Max", "Min"})
#: ops producing probabilities, kept float32 when they produce a float32 graph output
PROBABILITY_OPS: frozenset[str] = frozenset({"Sigmoid", "Softmax", "LogSoftmax", "Exp"})
#: ops that accept any input type (no Cast needed in front of them)
ANY_INPUT: frozenset[str] = frozenset({"Shape", "Size", "Cast"})
#: ops whose float output type comes from an attribute, not from their inputs
SOURCE_OPS: frozenset[str] = frozenset({"Constant", "ConstantOfShape", "Cast"})


def _dtype(t: gs.Tensor) -> np.dtype | None:
    try:
        d = t.dtype
        return np.dtype(d) if d is not None else None
    except TypeError:
        return None


def _overflowing_input(node: gs.Node) -> bool:
    """True when a float constant input has finite values beyond the float16 range (e.g. a
    BatchNormalization running variance of 4.8e7, where clipping would change the result)."""
    for t in node.inputs:
        v = literal_value(t) if t.name else None
        if v is not None and v.dtype == F32 and v.size:
            finite = v[np.isfinite(v)]
            if finite.size and float(np.abs(finite).max()) > FP16_MAX:
                return True
    return False


def _to_f16(values: np.ndarray) -> tuple[np.ndarray, int]:
    """Clip to the finite float16 range (no inf) and round; returns (array, values clipped)."""
    v = np.asarray(values)
    clipped = int(np.count_nonzero(np.abs(v) > FP16_MAX))
    return np.asarray(np.clip(v, -FP16_MAX, FP16_MAX), dtype=np.float16), clipped


def _set_values(c: gs.Constant, arr: np.ndarray) -> None:
    """Give a constant a new array (never written in place) and export it with its own dtype."""
    c.values = arr
    c._export_dtype = None  # graphsurgeon would otherwise export with the imported dtype


# ------------------------------------------------------------------ kernel probe


def probe_node(node: gs.Node, opset: int) -> str:
    """Classify onnxruntime CPU's float16 support for ``node`` by loading it as a one-node model."""
    helper = onnx.helper
    inputs, inits, in_names = [], [], []
    keep = FP32_INPUTS.get(node.op, frozenset())
    for i, t in enumerate(node.inputs):
        if not t.name:
            in_names.append("")
            continue
        name = f"i{i}"
        in_names.append(name)
        dt = _dtype(t)
        half = dt == F32 and i not in keep
        if isinstance(t, gs.Constant):
            arr = np.asarray(t.values)
            arr = arr.astype(np.float16) if half else arr
            inits.append(onnx.numpy_helper.from_array(arr, name))
        else:
            elem = (
                onnx.TensorProto.FLOAT16
                if half
                else (
                    helper.np_dtype_to_tensor_dtype(dt)
                    if dt is not None
                    else onnx.TensorProto.FLOAT
                )
            )
            shape = [d if isinstance(d, int) else None for d in t.shape] if t.shape else None
            inputs.append(helper.make_tensor_value_info(name, elem, shape))
    outs = []
    for j, o in enumerate(node.outputs):
        dt = _dtype(o)
        elem = (
            onnx.TensorProto.FLOAT16 if dt in (None, F32) else helper.np_dtype_to_tensor_dtype(dt)
        )
        outs.append(helper.make_tensor_value_info(f"o{j}", elem, None))
    attrs = {k: v for k, v in node.attrs.items() if not isinstance(v, gs.Graph)}
    proto_node = helper.make_node(
        node.op, in_names, [f"o{j}" for j in range(len(node.outputs))], domain=node.domain or ""
    )
    for k, v in attrs.items():
        if isinstance(v, gs.Constant):
            v = onnx.numpy_helper.from_array(np.asarray(v.values), k)
        elif isinstance(v, np.ndarray):
            v = onnx.numpy_helper.from_array(v, k)
        try:
            proto_node.attribute.append(helper.make_attribute(k, v))
        except (TypeError, ValueError):
            return "none"
    graph = helper.make_graph([proto_node], "probe", inputs, outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    so = session_options("disable_all")
    with tempfile.TemporaryDirectory(prefix="graphopt-fp16-") as d:
        so.optimized_model_filepath = os.path.join(d, "o.onnx")
        try:
            ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
            ops = [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]
        except Exception as exc:  # noqa: BLE001 - any refusal means "no float16 here"
            logger.debug("fp16 probe of %s refused: %s", node.op, str(exc).splitlines()[0])
            return "none"
    return "cast" if "Cast" in ops and node.op != "Cast" else "native"


_PROBED: dict[tuple[str, str], str] = {}


def ort_fp16_support(node: gs.Node, opset: int = 17) -> str:
    """``native``/``cast``/``none`` for a node's op type (table first, else probe once per type)."""
    if not node.domain or node.domain == "ai.onnx":
        known = ORT_CPU_FP16.get(node.op)
        if known is not None:
            return known
    key = (node.domain or "", node.op)
    if key not in _PROBED:
        _PROBED[key] = probe_node(node, opset)
        logger.info("probed onnxruntime CPU float16 support of %s: %s", node.op, _PROBED[key])
    return _PROBED[key]


# ------------------------------------------------------------------ the conversion


# ------------------------------------------------------------------ observed ranges


@dataclass(frozen=True)
class TensorRange:
    """What one float32 tensor held over the feeds.

    Attributes:
        max_abs: the largest finite ``|x|`` (0.0 when none).
        nonzero: whether any finite value was nonzero.
    """

    max_abs: float
    nonzero: bool

    def overflows(self) -> bool:
        """Above the float16 range less its headroom (:data:`FP16_HEADROOM`)."""
        return self.max_abs > FP16_MAX / FP16_HEADROOM

    def underflows(self) -> bool:
        """Nonzero, but entirely below the smallest normal float16."""
        return self.nonzero and self.max_abs < FP16_TINY


def observe_ranges(
    model: Model, feeds: Mapping[str, Any] | Sequence[Mapping[str, Any]]
) -> dict[str, TensorRange]:
    """The range of every float32 tensor of the main graph (graph inputs, intermediate tensors,
    outputs) when the model runs on ``feeds`` in onnxruntime (``ORT_DISABLE_ALL``), over all feed
    dicts. Tensors inside subgraphs are not observed.

    Raises:
        GraphoptError: onnxruntime cannot run the model on the feeds.
    """
    items = [feeds] if isinstance(feeds, Mapping) else list(feeds)
    g = model.graph
    consts = {n for n, t in g.tensors().items() if isinstance(t, gs.Constant)}
    names = [
        name for name, t in g.tensors().items() if name and name not in consts and _dtype(t) == F32
    ]
    if not names or not items:
        return {}
    out: dict[str, TensorRange] = {}
    for f in items:
        values = run_model(model, f, outputs=names)
        for name, v in values.items():
            if not isinstance(v, np.ndarray) or v.dtype.kind != "f" or not v.size:
                continue
            finite = np.abs(v[np.isfinite(v)])
            m = float(finite.max()) if finite.size else 0.0
            nz = bool(finite.size and m > 0)
            prev = out.get(name)
            if prev is not None:
                m, nz = max(m, prev.max_abs), nz or prev.nonzero
            out[name] = TensorRange(m, nz)
    return out


@dataclass
class Fp16Conversion:
    """What :func:`convert_float16` did.

    Attributes:
        modified: whether anything changed.
        stats: ``nodes_fp16``, ``casts_inserted``, ``weights_fp16``, ``values_clipped`` and
            ``kept_fp32`` (names of the nodes kept in float32, sorted).
    """

    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def kept_fp32(self) -> list[str]:
        """Names of the nodes kept in float32."""
        return list(self.stats.get("kept_fp32", []))


class Fp16Converter:
    """The float16 placement and rewrite (see the module docstring), configured once."""

    def __init__(
        self,
        keep_fp32: Iterable[str] | str | None = None,
        keep_io_types: bool = True,
        keep_softmax: bool = False,
        kernels: str = "any",
        feeds: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        """Args:
            keep_fp32: op types or node names to keep in float32 (list or comma-separated).
            keep_io_types: keep float32 graph inputs/outputs (Casts at the edges).
            keep_softmax: keep Softmax (and its input) in float32.
            kernels: ``any`` keeps only ops onnxruntime CPU refuses in half; ``native`` also keeps
                ops that onnxruntime CPU would only run through its own Casts.
            feeds: one feed dict or a list of them: the model is run on them first and every
                node touching a tensor whose range over- or underflows float16 stays float32
                (:func:`observe_ranges`). None: no observation.

        Raises:
            OptionError: ``kernels`` is neither ``any`` nor ``native``.
        """
        if isinstance(keep_fp32, str):
            keep_fp32 = [s.strip() for s in keep_fp32.split(",") if s.strip()]
        self.keep_fp32 = set(keep_fp32 or ())
        self.keep_io_types = keep_io_types
        self.keep_softmax = keep_softmax
        if kernels not in ("any", "native"):
            raise OptionError(f"fp16: kernels must be 'any' or 'native', not {kernels!r}")
        self.kernels = kernels
        self.feeds = feeds
        self.ranges: dict[str, TensorRange] = {}

    # -------------------------------------------------------------- decisions
    def _float_inputs(self, node: gs.Node, orig: dict[int, np.dtype | None]) -> list[int]:
        keep = FP32_INPUTS.get(node.op, frozenset())
        return [
            i
            for i, t in enumerate(node.inputs)
            if t.name and orig.get(id(t)) == F32 and i not in keep
        ]

    def _reason_fp32(self, node: gs.Node, opset: int) -> str | None:
        """Why ``node`` must stay float32 (None: it may run in half)."""
        if node.op in self.keep_fp32 or node.name in self.keep_fp32:
            return "keep_fp32 option"
        if node.op in CONTROL_FLOW:
            return "control flow boundary"
        if node.op in ALWAYS_FP32:
            return "reduction/power"
        if self.keep_softmax and node.op in ("Softmax", "LogSoftmax"):
            return "keep_softmax option"
        if node.domain not in (None, "", "ai.onnx"):
            return "custom domain"
        if node.op not in SATURATION_SAFE and _overflowing_input(node):
            return "a constant input exceeds the float16 range"
        for t in list(node.inputs) + list(node.outputs):
            r = self.ranges.get(t.name) if t.name else None
            if r is not None and r.overflows():
                return f"'{t.name}' reaches {r.max_abs:.3g} on the feeds (float16 overflow)"
            if r is not None and r.underflows():
                return f"'{t.name}' stays below {r.max_abs:.3g} on the feeds (float16 underflow)"
        support = ort_fp16_support(node, opset)
        if support == "none" or (self.kernels == "native" and support != "native"):
            return f"onnxruntime CPU fp16 support: {support}"
        return None

    def run(self, model: Model) -> Fp16Conversion:
        """Convert ``model`` (shapes inferred) in place."""
        graphs = list(model.walk_graphs())
        orig: dict[int, np.dtype | None] = {}
        consumers: dict[int, list[tuple[gs.Node, int]]] = {}
        graph_out_ids: set[int] = set()
        for g in graphs:
            graph_out_ids.update(id(t) for t in g.outputs)
            for t in g.tensors().values():
                orig.setdefault(id(t), _dtype(t))
            for t in g.inputs:
                orig.setdefault(id(t), _dtype(t))
            for n in g.nodes:
                for i, t in enumerate(n.inputs):
                    consumers.setdefault(id(t), []).append((n, i))
        if not any(d == F32 for d in orig.values()):
            return Fp16Conversion(False, {"nodes_fp16": 0})
        self.ranges = {}
        if self.feeds is not None:
            try:
                self.ranges = observe_ranges(model, self.feeds)
            except GraphoptError as exc:
                logger.warning("fp16: ranges not observed (%s); judged on constants only", exc)
        kept_for_range = 0

        # 1. precision of every compute node
        half: dict[int, bool] = {}
        kept: list[str] = []
        for g in graphs:
            for n in g.nodes:
                if n.op in SOURCE_OPS or n.op in ANY_INPUT:
                    continue
                float_out = any(orig.get(id(o)) == F32 for o in n.outputs)
                float_in = bool(self._float_inputs(n, orig))
                if not (float_in or float_out):
                    continue
                # float outputs made from non-float inputs take their type from an attribute
                reason = self._reason_fp32(n, model.opset) if float_in else "float from attribute"
                if reason and "on the feeds" in reason:
                    kept_for_range += 1
                if reason:
                    kept.append(n.name)
                    logger.debug("fp16: keep %s (%s) in float32: %s", n.name, n.op, reason)
                half[id(n)] = reason is None
        # probabilities returned as float32 outputs are computed in float32: values near 0 are
        # subnormal in half (below 6e-5 a sigmoid of -10 keeps 3 significant bits at best)
        if self.keep_io_types:
            outs = {id(t) for t in model.graph.outputs}
            for n in model.graph.nodes:
                if (
                    n.op in PROBABILITY_OPS
                    and half.get(id(n))
                    and any(id(o) in outs for o in n.outputs)
                ):
                    half[id(n)] = False
                    kept.append(n.name)
        # normalizer chains: reduction -> Add(eps) -> Sqrt -> Div/Reciprocal stay float32
        for g in graphs:
            for n in g.nodes:
                if n.op in ALWAYS_FP32 and n.op.startswith("Reduce"):
                    self._keep_chain(n, half, kept)

        def half_use(node: gs.Node, i: int) -> bool:
            return bool(half.get(id(node))) and i not in FP32_INPUTS.get(node.op, frozenset())

        # 2. source nodes (Constant, ConstantOfShape, Cast to float) go half when all readers are
        for g in graphs:
            for n in g.nodes:
                if n.op not in SOURCE_OPS or len(n.outputs) != 1:
                    continue
                out = n.outputs[0]
                if orig.get(id(out)) != F32 or id(out) in graph_out_ids:
                    continue
                uses = consumers.get(id(out), [])
                if uses and all(half_use(c, i) for c, i in uses):
                    half[id(n)] = True

        # 3. rewrite, graph by graph (outer first, so outer tensors have their final dtype)
        stats: dict[str, Any] = {
            "nodes_fp16": 0,
            "casts_inserted": 0,
            "weights_fp16": 0,
            "values_clipped": 0,
        }
        const_copy: dict[int, gs.Constant] = {}
        for c in {
            id(t): t
            for g in graphs
            for t in g.tensors().values()
            if isinstance(t, gs.Constant) and orig.get(id(t)) == F32
        }.values():
            uses = consumers.get(id(c), [])
            if uses and all(half_use(n, i) for n, i in uses) and id(c) not in graph_out_ids:
                arr, clipped = _to_f16(c.values)
                _set_values(c, arr)
                stats["weights_fp16"] += 1
                stats["values_clipped"] += clipped
        main = model.graph
        if not self.keep_io_types:
            for t in main.inputs:
                if orig.get(id(t)) == F32:
                    t.dtype = F16
        for g in graphs:
            self._rewrite_graph(g, g is main, orig, half, half_use, const_copy, stats)
        changed = bool(
            stats["nodes_fp16"]
            or stats["weights_fp16"]
            or stats["casts_inserted"]
            or (not self.keep_io_types and any(orig.get(id(t)) == F32 for t in main.inputs))
        )
        stats["kept_fp32_range"] = kept_for_range
        stats["kept_fp32"] = sorted(set(kept))
        return Fp16Conversion(changed, stats)

    def _keep_chain(self, red: gs.Node, half: dict[int, bool], kept: list[str]) -> None:
        frontier = [red]
        seen: set[int] = set()
        while frontier:
            n = frontier.pop()
            for o in n.outputs:
                for c in o.outputs:
                    if id(c) in seen or c.op not in NORM_CHAIN:
                        continue
                    seen.add(id(c))
                    if half.get(id(c)):
                        half[id(c)] = False
                        kept.append(c.name)
                    if c.op not in ("Div", "Reciprocal"):
                        frontier.append(c)

    def _rewrite_graph(
        self,
        g: gs.Graph,
        is_main: bool,
        orig: dict[int, np.dtype | None],
        half: dict[int, bool],
        half_use: Callable[[gs.Node, int], bool],
        const_copy: dict[int, gs.Constant],
        stats: dict[str, Any],
    ) -> None:
        casts: dict[tuple[int, str], gs.Variable] = {}
        new_nodes: list[gs.Node] = []

        def cast(t: gs.Tensor, to: np.dtype) -> gs.Variable:
            key = (id(t), to.name)
            if key not in casts:
                base = unique_name(f"{t.name}_{'fp16' if to == F16 else 'fp32'}")
                v = gs.Variable(base, dtype=to, shape=t.shape)
                elem = onnx.TensorProto.FLOAT16 if to == F16 else onnx.TensorProto.FLOAT
                new_nodes.append(
                    gs.Node(
                        "Cast", name=f"{base}_cast", inputs=[t], outputs=[v], attrs={"to": elem}
                    )
                )
                stats["casts_inserted"] += 1
                casts[key] = v
            return casts[key]

        for n in list(g.nodes):
            is_half = bool(half.get(id(n)))
            for i, t in enumerate(list(n.inputs)):
                if not t.name or orig.get(id(t)) != F32 or n.op in ANY_INPUT:
                    continue
                want = F16 if half_use(n, i) else F32
                have = _dtype(t)
                if have == want:
                    continue
                if isinstance(t, gs.Constant) and want == F16:
                    if id(t) not in const_copy:
                        arr, clipped = _to_f16(t.values)
                        const_copy[id(t)] = gs.Constant(unique_name(f"{t.name}_fp16"), arr)
                        stats["weights_fp16"] += 1
                        stats["values_clipped"] += clipped
                    n.inputs[i] = const_copy[id(t)]
                else:
                    n.inputs[i] = cast(t, want)
            if is_half:
                stats["weights_fp16" if n.op == "Constant" else "nodes_fp16"] += 1
                self._make_half(n, orig, stats)
            new_nodes.append(n)
        # graph outputs: float32 at the edges of the main graph (option) and always in subgraphs
        for k, t in enumerate(list(g.outputs)):
            if orig.get(id(t)) != F32 or _dtype(t) != F16:
                continue
            if is_main and not self.keep_io_types:
                continue
            if is_main:
                name = t.name
                t.name = unique_name(f"{name}_fp16")
                out = gs.Variable(name, dtype=F32, shape=t.shape)
            else:
                out = gs.Variable(unique_name(f"{t.name}_fp32"), dtype=F32, shape=t.shape)
            new_nodes.append(
                gs.Node(
                    "Cast",
                    name=unique_name(f"{out.name}_cast"),
                    inputs=[t],
                    outputs=[out],
                    attrs={"to": onnx.TensorProto.FLOAT},
                )
            )
            stats["casts_inserted"] += 1
            g.outputs[k] = out
        g.nodes = new_nodes

    def _make_half(
        self, n: gs.Node, orig: dict[int, np.dtype | None], stats: dict[str, Any]
    ) -> None:
        if n.op == "Cast":
            n.attrs["to"] = onnx.TensorProto.FLOAT16
        elif n.op in ("Constant", "ConstantOfShape"):
            key = (
                "value"
                if "value" in n.attrs
                else next((k for k in n.attrs if k.startswith("value")), "value")
            )
            v = n.attrs.get(key)
            if isinstance(v, gs.Constant):
                arr, clipped = _to_f16(v.values)
                n.attrs[key] = gs.Constant(v.name, arr)
                stats["values_clipped"] += clipped
            elif key in ("value_float", "value_floats"):
                arr, clipped = _to_f16(np.asarray(v, np.float32))
                del n.attrs[key]
                n.attrs["value"] = gs.Constant(unique_name("value"), arr.reshape(np.shape(v)))
            elif n.op == "ConstantOfShape" and v is None:
                n.attrs["value"] = gs.Constant(unique_name("value"), np.zeros(1, np.float16))
        for o in n.outputs:
            if orig.get(id(o)) == F32:
                o.dtype = F16


def convert_float16(
    model: Model,
    keep_fp32: Iterable[str] | str | None = None,
    keep_io_types: bool = True,
    keep_softmax: bool = False,
    kernels: str = "any",
    feeds: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
) -> Fp16Conversion:
    """Convert ``model`` (shapes inferred) to float16 in place, keeping float32 where half breaks
    numerics (see the module docstring and :class:`Fp16Converter` for the options)."""
    with name_scope(model.graph):
        return Fp16Converter(keep_fp32, keep_io_types, keep_softmax, kernels, feeds).run(model)
