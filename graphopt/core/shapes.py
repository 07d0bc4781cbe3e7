"""Shapes: fix dynamic input dims, infer every tensor's shape, fall back to onnxruntime where ONNX's
shape inference gives up. :func:`prepare` does both and is what every job runs on a loaded model.

Order of trust: shapes computed from the graph (ONNX inference with data propagation), then shapes
observed by running onnxruntime on a dummy input with every intermediate tensor exposed. Shapes
that a model *declares* for its outputs or in ``value_info`` are never trusted: they are dropped
before inference (a published CRNN declares a wrong rank-2 output), keeping only element types.
"""

from __future__ import annotations

import copy
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt.core.errors import ShapeError, first_line
from graphopt.core.feeds import random_feeds
from graphopt.core.graph import node_subgraphs, tensor_map
from graphopt.core.model import PROTO_LIMIT, Model
from graphopt.core.session import make_session, run_model

logger = logging.getLogger(__name__)

Shape = tuple[int, ...]
_SPEC = re.compile(r"^(?P<name>.+):(?P<dims>\d+(?:[x,]\d+)*)?$")


def _dims(text: str, what: str) -> Shape:
    """``1x3x640x640`` (or ``2,5``; empty: a scalar) as a tuple of positive ints."""
    text = text.strip()
    if text and not re.fullmatch(r"\d+(?:[x,]\d+)*", text):
        raise ShapeError(
            f"bad {what}: expected NAME:D1xD2x... with positive integers, e.g. x:1x3x640x640"
        )
    return _checked(tuple(int(d) for d in re.split(r"[x,]", text)) if text else (), what)


def _checked(dims: Sequence[object], what: str) -> Shape:
    if not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) for d in dims):
        raise ShapeError(f"bad {what}: dimensions must be positive integers, got {list(dims)}")
    out = tuple(int(d) for d in dims)  # type: ignore[call-overload]
    if any(d <= 0 for d in out):
        raise ShapeError(f"bad {what}: dimensions must be positive")
    if any(d >= 2**31 for d in out):
        raise ShapeError(f"bad {what}: dimension too large")
    return out


def parse_input_shapes(
    specs: Iterable[str] | Mapping[str, str | Sequence[int]] | None,
) -> dict[str, Shape]:
    """The one parser of input shapes (``--input-shape``, recipe tables, the Python API).

    Args:
        specs: ``NAME:1x3x640x640`` strings (``NAME:`` alone is a scalar, ``,`` may replace
            ``x``; the name is everything before the last ``:``), or a mapping from input name to
            such a dims string or to a sequence of positive integers.

    Raises:
        ShapeError: a malformed spec, a dimension that is not a positive integer or is >= 2**31.
    """
    out: dict[str, Shape] = {}
    if specs is None:
        return out
    if isinstance(specs, Mapping):
        for name, dims in specs.items():
            what = f"input shape for '{name}'"
            if isinstance(dims, str):
                out[str(name)] = _dims(dims, what)
            elif isinstance(dims, Sequence):
                out[str(name)] = _checked(list(dims), what)
            else:
                raise ShapeError(
                    f"bad {what}: give a list of positive integers or a string like "
                    f"'1x3x224x224', not {dims!r}"
                )
        return out
    if isinstance(specs, str):
        specs = [specs]
    for spec in specs:
        m = _SPEC.match(str(spec).strip())
        if not m:
            raise ShapeError(
                f"bad --input-shape '{spec}': expected NAME:D1xD2x... with positive integers, "
                f"e.g. x:1x3x640x640"
            )
        out[m.group("name")] = _dims(m.group("dims") or "", f"--input-shape '{spec}'")
    return out


def static_input_shapes(
    model: Model, input_shapes: Mapping[str, Sequence[int]] | None = None
) -> dict[str, Shape]:
    """The fixed shape of every graph input: from ``input_shapes`` where given, else the model's
    own static dims (what a compiler that needs every dim, such as TVM, takes).

    Raises:
        ShapeError: ``input_shapes`` names an unknown input, or an input stays dynamic.
    """
    given = parse_input_shapes(input_shapes) if input_shapes else {}
    names = [t.name for t in model.graph.inputs]
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise ShapeError(f"--input-shape names unknown inputs {unknown}; inputs are {names}")
    shapes: dict[str, Shape] = {}
    dynamic: list[tuple[str, list[object]]] = []
    for t in model.graph.inputs:
        if t.name in given:
            shapes[t.name] = given[t.name]
            continue
        if t.shape is None:  # rank unknown (a scalar declares an empty shape: fixed, ())
            dynamic.append((t.name, []))
            continue
        dims = list(t.shape)
        if not all(isinstance(d, (int, np.integer)) and d > 0 for d in dims):
            dynamic.append((t.name, dims))
            continue
        shapes[t.name] = tuple(int(d) for d in dims)
    if dynamic:
        name, dims = dynamic[0]
        options = " ".join(f"--input-shape {n}:{_example(d)}" for n, d in dynamic)
        raise ShapeError(
            f"input '{name}' has dynamic shape {_fmt(dims)}"
            + (f" ({len(dynamic) - 1} more inputs too)" if len(dynamic) > 1 else "")
            + f"; a fixed shape is needed here: give the sizes to compile for, e.g. {options} "
            f"(input_shapes={{'{name}': (...)}})"
        )
    return shapes


def _example(dims: Sequence[object]) -> str:
    """``1x128``: an ``--input-shape`` example for dims (a dynamic leading dim 1, others 128)."""
    if not dims:
        return "1x3x640x640"
    return "x".join(
        str(d) if isinstance(d, (int, np.integer)) and d > 0 else ("128" if i else "1")
        for i, d in enumerate(dims)
    )


def is_static(shape: Sequence[object] | None) -> bool:
    """Every dim a known non-negative int (a plain loop: called for every tensor by liveness,
    the cost model and the passes)."""
    if shape is None:
        return False
    for d in shape:
        if type(d) is int:
            if d < 0:
                return False
        elif not (isinstance(d, (int, np.integer)) and d >= 0):
            return False
    return True


def fix_input_shapes(model: Model, shapes: Mapping[str, Sequence[int]]) -> Model:
    """Set the given graph inputs to static shapes. Raises :class:`ShapeError` on a mismatch."""
    inputs = {t.name: t for t in model.graph.inputs}
    for name, dims in shapes.items():
        if name not in inputs:
            raise ShapeError(
                f"--input-shape names '{name}', but the model's inputs are: {', '.join(inputs)}"
            )
        t = inputs[name]
        dims = tuple(int(d) for d in dims)
        if t.shape is not None and len(t.shape) != len(dims):
            raise ShapeError(
                f"input '{name}' has rank {len(t.shape)} {_fmt(t.shape)}, but --input-shape gives "
                f"rank {len(dims)} {_fmt(dims)}"
            )
        if t.shape is not None:
            for i, (have, want) in enumerate(zip(t.shape, dims)):
                if isinstance(have, (int, np.integer)) and have > 0 and have != want:
                    raise ShapeError(
                        f"input '{name}' has fixed dim {i} = {have}, but --input-shape gives {want}"
                    )
        t.shape = list(dims)
    return model


def _fmt(shape: Sequence[object] | None) -> str:
    if shape is None:
        return "[?]"
    return "[" + ",".join(str(d) if d is not None else "?" for d in shape) + "]"


def _strip_declared_shapes(proto: onnx.ModelProto) -> None:
    """Drop value_info and output shapes (keeping element types) in every graph of ``proto``."""

    def strip(g: onnx.GraphProto) -> None:
        del g.value_info[:]
        for o in g.output:
            if o.type.HasField("tensor_type"):
                o.type.tensor_type.ClearField("shape")
        for node in g.node:
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    strip(a.g)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    for sg in a.graphs:
                        strip(sg)

    strip(proto.graph)


def _collect(g: onnx.GraphProto, out: dict[str, tuple[int, list[object] | None]]) -> None:
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        tt = vi.type.tensor_type if vi.type.HasField("tensor_type") else None
        if tt is None:
            continue
        shape: list[object] | None = None
        if tt.HasField("shape"):
            shape = []
            for d in tt.shape.dim:
                if d.HasField("dim_value"):
                    shape.append(int(d.dim_value))
                elif d.HasField("dim_param"):
                    shape.append(d.dim_param)
                else:
                    shape.append(None)
        out[vi.name] = (tt.elem_type, shape)
    for node in g.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                _collect(a.g, out)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for sg in a.graphs:
                    _collect(sg, out)


#: above this many bytes of weights, shape inference runs on a weightless export (no copy)
WEIGHTLESS_BYTES = 64 << 20


def onnx_infer(model: Model) -> dict[str, tuple[int, list[object] | None]]:
    """ONNX shape inference (data propagation on) on an export of ``model`` with its declared
    shapes dropped: tensor name -> (element type, dims or None). The model is not changed."""
    proto = model.to_onnx(weights=model.param_bytes() < WEIGHTLESS_BYTES)
    _strip_declared_shapes(proto)
    if proto.ByteSize() >= PROTO_LIMIT:
        proto = _weightless(proto)
    try:
        inferred = onnx.shape_inference.infer_shapes(
            proto, check_type=False, strict_mode=False, data_prop=True
        )
    except Exception as exc:  # inference bugs on exotic graphs must not stop us: fall back
        logger.debug("onnx shape inference failed: %s", exc)
        inferred = proto
    found: dict[str, tuple[int, list[object] | None]] = {}
    _collect(inferred.graph, found)
    return found


_SYMBOLIC: list[Any] = []


def _symbolic_module() -> Any:
    """onnxruntime's symbolic shape inference module, or None without sympy.

    Loaded from its file: importing ``onnxruntime.tools`` imports torch when it is installed
    (seconds), which shape inference does not need."""
    if not _SYMBOLIC:
        mod = None
        try:
            import importlib.util  # noqa: PLC0415

            import sympy  # noqa: F401, PLC0415 - the module needs it; fail fast without

            spec = importlib.util.find_spec("onnxruntime")
            origin = spec.origin if spec is not None else None
            path = os.path.join(os.path.dirname(origin or ""), "tools", "symbolic_shape_infer.py")
            file_spec = importlib.util.spec_from_file_location("graphopt._ort_symbolic", path)
            if origin and os.path.exists(path) and file_spec and file_spec.loader:
                mod = importlib.util.module_from_spec(file_spec)
                file_spec.loader.exec_module(mod)
                logging.getLogger(mod.__name__).setLevel(logging.ERROR)
        except Exception as exc:  # noqa: BLE001 - optional: ONNX inference alone then
            logger.debug("symbolic shape inference unavailable: %s", first_line(exc))
            mod = None
        _SYMBOLIC.append(mod)
    return _SYMBOLIC[0]


def symbolic_infer(
    model: Model, merges: dict[str, str] | None = None
) -> dict[str, tuple[int, list[object] | None]]:
    """onnxruntime's symbolic shape inference (sympy) on an export of ``model`` with its declared
    shapes dropped: tensor name -> (element type, dims), dims symbolic where they depend on
    dynamic input dims (``batch``, ``seq``, ``2*seq``). Empty when it is unavailable or fails;
    the model is not changed.

    Where ONNX's own inference loses a dim (a ``Reshape`` to a shape computed from ``Shape``), this
    one follows the arithmetic. Dims that broadcasting requires equal are merged (any run that
    succeeds has them equal); ``merges``, when given, receives those merges (dim text -> the
    dim text it was replaced by).
    """
    mod = _symbolic_module()
    if mod is None:
        return {}
    proto = model.to_onnx(weights=model.param_bytes() < WEIGHTLESS_BYTES)
    _strip_declared_shapes(proto)
    if proto.ByteSize() >= PROTO_LIMIT:
        proto = _weightless(proto)
    try:
        # the loop of SymbolicShapeInference.infer_shapes, which writes a file into the current
        # folder when inference is incomplete: here an incomplete result is used as it is
        ssi = mod.SymbolicShapeInference(2**31 - 1, True, False, 0)
        ssi._preprocess(proto)
        while ssi.run_:
            ssi._infer_impl()
        ssi._update_output_from_vi()
        inferred = ssi.out_mp_
        if merges is not None:
            merges.update({str(k): str(v) for k, v in ssi.suggested_merge_.items()})
    except Exception as exc:  # noqa: BLE001 - exotic graphs: ONNX inference alone
        logger.debug("symbolic shape inference failed: %s", first_line(exc))
        return {}
    found: dict[str, tuple[int, list[object] | None]] = {}
    _collect(inferred.graph, found)
    return found


def _merge_symbolic(
    found: dict[str, tuple[int, list[object] | None]],
    symbolic: Mapping[str, tuple[int, list[object] | None]],
) -> int:
    """Complete ONNX's shapes with symbolic ones (in place): a dim ONNX left unknown or named
    ``unk__N`` takes the symbolic inference's dim; a rank conflict keeps ONNX's. Returns how
    many tensors gained information."""
    gained = 0
    for name, (elem, sym) in symbolic.items():
        if sym is None:
            continue
        have = found.get(name)
        if have is None or have[1] is None:
            found[name] = (have[0] if have and have[0] else elem, list(sym))
            gained += 1
            continue
        old = have[1]
        if len(old) != len(sym):
            logger.debug("shape of %s: ONNX %s, symbolic %s; ONNX kept", name, old, sym)
            continue
        new = [o if _known(o) else s for o, s in zip(old, sym)]
        if new != old:
            found[name] = (have[0], new)
            gained += 1
    return gained


def dim_relations(
    model: Model,
    symbolic: Mapping[str, tuple[int, list[object] | None]],
    merges: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Input dims that the model ties to other input dims, from symbolic inference: a graph
    output that declares dim ``total_sequence`` where inference finds ``past_sequence +
    sequence``, or a merge inference made because a run needs the two equal (a Concat of past
    and current keys multiplied by the mask). The model runs only when the first equals the
    second. Returns dim name -> expression over other input dims; a dim with two different
    expressions is left out."""
    names = {
        d for t in model.graph.inputs if t.shape is not None for d in t.shape if isinstance(d, str)
    }
    pairs: list[tuple[object, object]] = list((merges or {}).items())
    pairs += [(b, a) for a, b in pairs]
    for t in model.graph.outputs:
        got = symbolic.get(t.name)
        if t.shape is not None and got is not None and got[1] is not None:
            if len(got[1]) == len(t.shape):
                pairs += list(zip(t.shape, got[1]))
    found: dict[str, str] = {}
    clash: set[str] = set()
    for declared, inferred in pairs:
        if not isinstance(declared, str) or declared not in names:
            continue
        if not isinstance(inferred, str) or inferred == declared:
            continue
        try:
            import sympy

            expr = sympy.sympify(inferred, locals={k: sympy.Symbol(k) for k in names})
        except Exception:  # noqa: BLE001 - a dim text sympy cannot read: no relation
            continue
        free = {str(s) for s in expr.free_symbols}
        if expr.is_Symbol or not free or not free <= names or declared in free:
            continue
        if found.get(declared, inferred) != inferred:
            clash.add(declared)
        found[declared] = inferred
    return {k: v for k, v in found.items() if k not in clash}


def _known(d: object) -> bool:
    """A dim that says something: an int, or a name that is not a fresh ``unk__N``."""
    if isinstance(d, (int, np.integer)):
        return True
    return isinstance(d, str) and bool(d) and not d.startswith("unk__")


def _fresh_unknowns(shape: Sequence[object] | None) -> bool:
    return shape is None or not all(_known(d) for d in shape)


def _weightless(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose large float initializers carry no data (for inference on >2 GiB models)."""
    light = onnx.ModelProto()
    light.CopyFrom(proto)
    for t in light.graph.initializer:
        if t.data_type != onnx.TensorProto.INT64 and t.ByteSize() > 1 << 16:
            dims = list(t.dims)
            t.ClearField("raw_data")
            t.ClearField("float_data")
            t.dims[:] = dims
            # an external reference with no file: inference only needs dims and type
            t.data_location = onnx.TensorProto.EXTERNAL
            e = t.external_data.add()
            e.key, e.value = "location", "__none__"
    return light


def _applied(
    model: Model, found: Mapping[str, tuple[int, list[object] | None]]
) -> Iterator[tuple[gs.Variable, Any, list[object] | None]]:
    """What :func:`_apply` sets: every tensor it changes, with its new dtype and shape."""
    inputs = {t.name for t in model.graph.inputs}
    for g in model.walk_graphs():
        for name, t in tensor_map(g).items():
            if (
                isinstance(t, gs.Constant)
                or name not in found
                or name in inputs
                or name in model.value_types
            ):
                continue
            elem, shape = found[name]
            dtype = t.dtype
            if elem:
                try:
                    dtype = onnx.helper.tensor_dtype_to_np_dtype(elem)
                except Exception:  # noqa: BLE001 - exotic element types keep their onnx enum
                    dtype = elem
            yield t, dtype, shape


def _apply(model: Model, found: Mapping[str, tuple[int, list[object] | None]]) -> None:
    for t, dtype, shape in list(_applied(model, found)):
        t.dtype = dtype
        t.shape = shape


def _limit_from_env(name: str, default: int) -> int:
    """A byte limit from the environment (``GRAPHOPT_MAX_TENSOR_BYTES=64e9``), else ``default``."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(float(text))
    except ValueError:
        raise ShapeError(f"{name}={text!r} is not a number of bytes") from None
    if value <= 0:
        raise ShapeError(f"{name}={text!r} must be positive")
    return value


def _physical_memory() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 1 << 40


def max_tensor_bytes() -> int:
    """The largest single tensor graphopt lets onnxruntime compute: ``GRAPHOPT_MAX_TENSOR_BYTES``,
    by default the machine's physical memory (a model that needs a larger one cannot run here)."""
    return _limit_from_env("GRAPHOPT_MAX_TENSOR_BYTES", _physical_memory())


def static_nbytes(dtype: object, shape: Sequence[object] | None) -> int | None:
    """Bytes of a tensor of this dtype and static shape (exact for any size), None if either is
    unknown."""
    if dtype is None or not is_static(shape):
        return None
    try:
        itemsize = np.dtype(dtype).itemsize  # type: ignore[call-overload]
    except TypeError:
        return None
    n = 1
    for d in shape or ():
        n *= int(d)  # type: ignore[call-overload]
    return n * itemsize


def largest_tensor(
    model: Model, found: Mapping[str, tuple[int, list[object] | None]] | None = None
) -> tuple[str, int, list[object]] | None:
    """The largest tensor of static shape the model computes (every graph): name, bytes, shape.

    With ``found`` (:func:`onnx_infer`'s result): the largest once those shapes were applied
    (:func:`_apply`), the model itself left unchanged (no copy of it is made)."""
    new = {id(t): (dtype, shape) for t, dtype, shape in _applied(model, found)} if found else {}
    best: tuple[str, int, list[object]] | None = None
    for g in model.walk_graphs():
        for n in g.nodes:
            for o in n.outputs:
                dtype, shape = new.get(id(o), (o.dtype, o.shape))
                size = static_nbytes(dtype, shape)
                if size is not None and (best is None or size > best[1]):
                    best = (o.name, size, list(shape or ()))
    return best


def size_refusal(
    model: Model,
    limit: int | None = None,
    found: Mapping[str, tuple[int, list[object] | None]] | None = None,
) -> str | None:
    """Why ``model`` must not be run at its current input shapes (a tensor larger than ``limit``,
    default :func:`max_tensor_bytes`), or None; ``found``: with these inferred shapes applied
    (see :func:`largest_tensor`)."""
    limit = max_tensor_bytes() if limit is None else limit
    big = largest_tensor(model, found)
    if big is None or big[1] <= limit:
        return None
    name, size, shape = big
    return (
        f"running the model needs tensor '{name}' of shape {shape} ({fmt_bytes(size)}), more "
        f"than the {fmt_bytes(limit)} a tensor may take (GRAPHOPT_MAX_TENSOR_BYTES)"
    )


def fmt_bytes(n: int) -> str:
    """``1.5 GiB``, ``4 TiB``, ``3e+06 EiB``: a byte count for a message."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024:
            return f"{n:.3g} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n:.3g} EiB"


def check_run_size(model: Model, limit: int | None = None, infer: bool = False) -> None:
    """Refuse to run a model whose inferred tensors include one over ``limit`` bytes.

    Args:
        model: the model, its shapes inferred (:func:`prepare`), or ``infer=True``: then ONNX
            shape inference runs on an export first (the model is not changed).
        limit: the largest tensor allowed (default :func:`max_tensor_bytes`).

    Raises:
        ShapeError: naming the tensor, its shape and size (a ConstantOfShape/Expand/Tile/Range
            bomb, or input shapes too large for this machine).
    """
    why = size_refusal(model, limit, onnx_infer(model) if infer else None)
    if why is not None:
        raise ShapeError(f"{why}; graphopt cannot run or verify it at these input shapes")


def missing_shapes(model: Model) -> list[str]:
    """Names of main-graph node outputs whose shape is not static (values that are not tensors,
    such as optionals and sequences, excluded)."""
    skip = model.value_types
    return [
        o.name
        for n in model.graph.nodes
        for o in n.outputs
        if o.name and not is_static(o.shape) and o.name not in skip
    ]


def inputs_static(model: Model) -> bool:
    return all(is_static(t.shape) for t in model.graph.inputs)


def infer_shapes(
    model: Model, ort_fallback: bool = True, feeds: Mapping[str, np.ndarray] | None = None
) -> Model:
    """Fill ``shape`` and ``dtype`` of every tensor in place; return ``model``.

    Declared shapes are discarded first. When input shapes are static and ONNX inference leaves some
    main-graph tensor unknown, onnxruntime runs once on a dummy input with those tensors exposed.
    """
    if not getattr(model, "weights_loaded", True):
        ort_fallback = False  # its external weights were not read: onnxruntime cannot run it
    found = onnx_infer(model)
    if not inputs_static(model) and any(
        _fresh_unknowns(shape) for _, shape in found.values()
    ):  # dynamic input dims: follow them symbolically where ONNX's inference loses them
        merges: dict[str, str] = {}
        symbolic = symbolic_infer(model, merges)
        n = _merge_symbolic(found, symbolic)
        logger.debug("symbolic shape inference completed %d shapes", n)
        model.dim_relations.update(dim_relations(model, symbolic, merges))
    inputs = {t.name for t in model.graph.inputs}
    declared_rank = {t.name: len(t.shape) for t in model.graph.outputs if t.shape is not None}
    # nothing declared survives unless re-derived: clear main-graph variables that inference missed
    for name, t in tensor_map(model.graph).items():
        if isinstance(t, gs.Variable) and name not in inputs and name not in found:
            t.shape = None
    _apply(model, found)
    missing = missing_shapes(model)
    too_big = size_refusal(model) if missing and ort_fallback else None
    if too_big is not None:
        logger.info(
            "not running onnxruntime to find the %d unknown shapes: %s", len(missing), too_big
        )
        ort_fallback = False
    if missing and ort_fallback and inputs_static(model):
        try:
            observed = observe_shapes(model, missing, feeds=feeds)
        except Exception as exc:  # noqa: BLE001 - a failed fallback leaves shapes unknown
            logger.debug("onnxruntime shape fallback failed: %s", exc)
            observed = {}
        tensors = tensor_map(model.graph)
        before: dict[str, tuple[Any, Any]] = {}
        for g_name, (dtype, shape) in observed.items():
            t = tensors.get(g_name)
            if t is not None and isinstance(t, gs.Variable):
                before[g_name] = (t.shape, t.dtype)
                t.shape = list(shape)
                t.dtype = dtype
        if before and any(node_subgraphs(n) for n in model.graph.nodes):
            # a shape seen on one run holds for the If branch taken; onnxruntime also infers the
            # branch not taken, which such shapes can make fail: then they are given up
            try:
                make_session(model)
            except Exception as exc:  # noqa: BLE001
                logger.debug("observed shapes dropped (%s)", first_line(exc))
                for g_name, (old_shape, old_dtype) in before.items():
                    tensors[g_name].shape, tensors[g_name].dtype = old_shape, old_dtype
                observed = {}
        logger.debug("onnxruntime filled %d of %d unknown shapes", len(observed), len(missing))
    for t in model.graph.outputs:
        # ONNX wants a shape on graph outputs: where nothing could be derived keep only the rank
        if t.shape is None and t.name in declared_rank:
            t.shape = [None] * declared_rank[t.name]
    return model


def observe_shapes(
    model: Model, names: Sequence[str], feeds: Mapping[str, np.ndarray] | None = None
) -> dict[str, tuple[np.dtype, Shape]]:
    """Run onnxruntime once with ``names`` exposed as outputs and return their dtypes and shapes.

    The Model itself is not touched."""
    feeds = dict(feeds) if feeds else random_feeds(model, seed=0)
    outs = run_model(model, feeds, outputs=list(names))
    return {k: (v.dtype, tuple(int(d) for d in v.shape)) for k, v in outs.items()}


def prepare(
    model: Model,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    feeds: Mapping[str, np.ndarray] | None = None,
    check_size: bool = True,
) -> Model:
    """Fix the given input dims and infer every shape (in place); ``feeds`` drive the onnxruntime
    shape fallback where random inputs would take the wrong path.

    With ``check_size`` (every job that runs the model) a model that needs a tensor larger than
    :func:`max_tensor_bytes` at these shapes is refused (:func:`check_run_size`); ``inspect``,
    which runs nothing, reports such a model instead.
    """
    if input_shapes:
        fix_input_shapes(model, input_shapes)
    infer_shapes(model, feeds=feeds)
    if check_size:
        check_run_size(model)
    return model


def shape_snapshot(model: Model) -> Callable[[], None]:
    """Every variable's shape and dtype (in every graph) and ``model.dim_relations`` as they are
    now; the function returned puts them back.

    A job that plans or transforms the model it loaded in place rather than a copy of it
    (:func:`prepare` fixes input dims and fills every shape) takes one first, and gives the model
    its declared shapes back before writing it (the written model keeps its dynamic dims and
    writes only the shapes the input declared).
    """
    saved = [
        (t, copy.copy(t.shape), t.dtype)
        for g in model.walk_graphs()
        for t in tensor_map(g).values()
        if isinstance(t, gs.Variable)
    ]
    relations = dict(model.dim_relations)

    def restore() -> None:
        for t, shape, dtype in saved:
            t.shape, t.dtype = shape, dtype
        model.dim_relations = dict(relations)

    return restore
