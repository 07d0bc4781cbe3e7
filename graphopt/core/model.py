"""The in-memory model: an onnx-graphsurgeon graph plus everything ONNX carries beside it.

``Model`` keeps what graphsurgeon alone would drop on a round trip: ir_version, opset imports of
every domain, metadata properties, producer fields, doc string and model-local functions.
If/Loop/Scan subgraphs live inside the gs graph as node attributes and round-trip with it.

Weights are held lazily: graphsurgeon's ``LazyValues`` wrap the original ``TensorProto`` and only
become numpy arrays when a pass reads them. Passes must never write into a constant's array in
place (clones share arrays); they assign a new array instead.

Files are read by :func:`graphopt.core.loader.load` and written by :func:`graphopt.core.saver.save`
(this module imports neither).
"""

from __future__ import annotations

import contextlib
import graphlib
import logging
import mmap
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt.core.errors import ModelLoadError, in_file
from graphopt.core.graph import constant_nbytes, node_subgraphs, tensor_map

logger = logging.getLogger(__name__)

#: protobuf cannot serialize a message of 2 GiB or more
PROTO_LIMIT = 2**31 - 1


@dataclass
class Model:
    """An ONNX model held as a graphsurgeon graph plus model-level fields."""

    graph: gs.Graph
    ir_version: int = onnx.IR_VERSION
    opset_imports: dict[str, int] = field(default_factory=dict)
    producer_name: str = ""
    producer_version: str = ""
    domain: str = ""
    model_version: int = 0
    doc_string: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    functions: list[onnx.FunctionProto] = field(default_factory=list)
    #: where the model was loaded from (None for models built in memory)
    path: Path | None = None
    #: True when the source file kept its weights in external data files
    external_data: bool = False
    #: default values of graph inputs that the source also listed as initializers (overridable
    #: weights): the inputs stay inputs (gs.Variable, so no pass folds them) and the defaults are
    #: written back as initializers on export
    input_defaults: dict[str, onnx.TensorProto] = field(default_factory=dict)
    #: False when loaded with ``load_weights=False`` from a file with external data
    weights_loaded: bool = True
    #: the external data files the weights were read (memory-mapped) from; never overwritten
    external_files: list[Path] = field(default_factory=list)
    #: declared types of graph inputs and outputs (any graph) that are not plain tensors
    #: (optional, sequence, map, sparse tensor), by value name: graphsurgeon cannot hold them, so
    #: the IR tensors carry no dtype and the types are written back untouched on export
    value_types: dict[str, onnx.TypeProto] = field(default_factory=dict)
    #: dynamic input dims that are functions of other input dims (dim name -> expression over
    #: other dim names, e.g. ``total_sequence -> past_sequence + sequence``), found by symbolic
    #: shape inference (:func:`graphopt.core.shapes.infer_shapes`); generated inputs obey them
    dim_relations: dict[str, str] = field(default_factory=dict)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_onnx(
        cls, proto: onnx.ModelProto, path: Path | None = None, external_data: bool = False
    ) -> Model:
        """Wrap a ``ModelProto`` (its tensors are referenced lazily, not copied)."""
        try:
            graph = gs.import_onnx(proto)
        except Exception as exc:  # graphsurgeon raises assorted errors on malformed graphs
            raise ModelLoadError(f"cannot read the graph{in_file(path)}: {exc}") from None
        opsets = {imp.domain or "": imp.version for imp in proto.opset_import}
        # graphsurgeon keeps only the default-domain opset on the graph itself
        graph.opset = opsets.get("", graph.opset)
        graph.import_domains = None
        input_defaults = _keep_overridable_inputs(proto, graph)
        value_types = non_tensor_types(proto)
        _restore_type_attributes(proto.graph, graph)
        _restore_output_shapes(proto.graph, graph)
        _normalize_dtypes(graph, value_types)
        _name_nodes(graph)
        return cls(
            graph=graph,
            ir_version=proto.ir_version or onnx.IR_VERSION,
            opset_imports=opsets,
            producer_name=proto.producer_name,
            producer_version=proto.producer_version,
            domain=proto.domain,
            model_version=proto.model_version,
            doc_string=proto.doc_string,
            metadata={p.key: p.value for p in proto.metadata_props},
            functions=list(proto.functions),
            path=path,
            external_data=external_data,
            input_defaults=input_defaults,
            value_types=value_types,
        )

    # ------------------------------------------------------------------ export
    def to_onnx(self, check: bool = False, weights: bool = True) -> onnx.ModelProto:
        """Export to a ``ModelProto``. Large weights are referenced, not copied, where possible.

        With ``weights=False`` constants of 64 KiB or more (other than int64 shape data) are
        exported as external references to no file: dims and types only, for shape inference on
        large models without a copy of the weights.
        """
        if not weights:
            with swapped_constants(self, weightless_stub):
                return self.to_onnx(check=False)
        self.graph.opset = self.opset
        with _onnx_backed_values(self):
            proto = gs.export_onnx(self.graph, do_type_check=False)
        _fix_float8_fnuz(self, proto)
        del proto.opset_import[:]
        opsets = dict(self.opset_imports)
        opsets[""] = self.opset
        for node_domain in self.domains_used():
            if node_domain not in opsets:
                opsets[node_domain] = 1
        for dom, ver in sorted(opsets.items()):
            proto.opset_import.append(onnx.helper.make_opsetid(dom, ver))
        proto.ir_version = self.ir_version
        proto.producer_name = self.producer_name or "graphopt"
        proto.producer_version = self.producer_version
        proto.domain = self.domain
        proto.model_version = self.model_version
        proto.doc_string = self.doc_string
        del proto.metadata_props[:]
        for k, v in self.metadata.items():
            proto.metadata_props.append(onnx.StringStringEntryProto(key=k, value=str(v)))
        del proto.functions[:]
        proto.functions.extend(self.functions)
        if self.value_types:
            for g in proto_graphs(proto):
                for vi in list(g.input) + list(g.output):
                    if vi.name in self.value_types:
                        vi.type.CopyFrom(self.value_types[vi.name])
        if self.input_defaults:
            inputs = {vi.name for vi in proto.graph.input}
            have = {t.name for t in proto.graph.initializer}
            for name, tp in self.input_defaults.items():
                if name in inputs and name not in have:
                    proto.graph.initializer.append(tp)
        if proto.ir_version < 4:
            _list_initializers_as_inputs(proto.graph)
        if check:
            check_proto(proto)
        return proto

    def clone(self) -> Model:
        """A structural copy. Constant arrays are shared, which is safe because passes never write
        into them in place."""
        g = self.graph.copy()
        return Model(
            graph=g,
            ir_version=self.ir_version,
            opset_imports=dict(self.opset_imports),
            producer_name=self.producer_name,
            producer_version=self.producer_version,
            domain=self.domain,
            model_version=self.model_version,
            doc_string=self.doc_string,
            metadata=dict(self.metadata),
            functions=list(self.functions),
            path=self.path,
            external_data=self.external_data,
            input_defaults=dict(self.input_defaults),
            weights_loaded=self.weights_loaded,
            external_files=list(self.external_files),
            value_types=dict(self.value_types),
            dim_relations=dict(self.dim_relations),
        )

    # ------------------------------------------------------------------ queries
    @property
    def opset(self) -> int:
        return int(self.opset_imports.get("", self.graph.opset or 13))

    @opset.setter
    def opset(self, value: int) -> None:
        self.opset_imports[""] = int(value)
        self.graph.opset = int(value)

    def domains_used(self) -> set[str]:
        return {n.domain for _, n in self.walk_nodes() if n.domain not in (None, "", "ai.onnx")}

    def walk_graphs(self) -> Iterator[gs.Graph]:
        """The main graph and every subgraph (If/Loop/Scan bodies), outermost first."""
        stack = [self.graph]
        while stack:
            g = stack.pop()
            yield g
            for node in g.nodes:
                if node.attrs:  # most nodes hold no attribute, let alone a subgraph
                    stack.extend(node_subgraphs(node))

    def walk_nodes(self) -> Iterator[tuple[gs.Graph, gs.Node]]:
        for g in self.walk_graphs():
            for n in g.nodes:
                yield g, n

    def num_subgraphs(self) -> int:
        return sum(1 for _ in self.walk_graphs()) - 1

    def op_histogram(self, subgraphs: bool = True) -> dict[str, int]:
        hist: dict[str, int] = {}
        nodes = (n for _, n in self.walk_nodes()) if subgraphs else iter(self.graph.nodes)
        for n in nodes:
            key = n.op if n.domain in (None, "", "ai.onnx") else f"{n.domain}.{n.op}"
            hist[key] = hist.get(key, 0) + 1
        return dict(sorted(hist.items(), key=lambda kv: (-kv[1], kv[0])))

    def num_nodes(self, subgraphs: bool = True) -> int:
        return sum(1 for _ in self.walk_nodes()) if subgraphs else len(self.graph.nodes)

    def initializers(self) -> dict[str, gs.Constant]:
        """Constant tensors of the main graph by name (weights, biases, shape constants)."""
        return {n: t for n, t in tensor_map(self.graph).items() if isinstance(t, gs.Constant)}

    def io_types(self) -> dict[str, str]:
        """The main graph's inputs and outputs whose type is not a tensor, by name
        (``optional(tensor(float))``, ``seq(tensor(int64))``, ``map(int64,tensor(float))``)."""
        names = [t.name for t in list(self.graph.inputs) + list(self.graph.outputs)]
        return {n: type_string(self.value_types[n]) for n in names if n in self.value_types}

    def param_bytes(self) -> int:
        return sum(int(constant_nbytes(t)) for t in self.initializers().values())

    def check_well_formed(self) -> None:
        """Raise ``RuntimeError`` if any graph has a cycle or a node input nobody produces."""
        for g in self.walk_graphs():
            check_graph(g, outer=_outer_names(self, g))


# ---------------------------------------------------------------------- helpers


def _keep_overridable_inputs(
    proto: onnx.ModelProto, graph: gs.Graph
) -> dict[str, onnx.TensorProto]:
    """Turn initializers that are also graph inputs back into graph inputs (gs.Variable).

    graphsurgeon imports them as constants and drops them from the inputs, which would change the
    model's interface and let passes fold a value the caller may override. Returns the defaults.
    """
    init_names = {t.name for t in proto.graph.initializer}
    overridable = [vi.name for vi in proto.graph.input if vi.name in init_names]
    if not overridable:
        return {}
    defaults = {t.name: t for t in proto.graph.initializer if t.name in set(overridable)}
    tensors = tensor_map(graph)
    order = [vi.name for vi in proto.graph.input]
    for name in overridable:
        t = tensors.get(name)
        if isinstance(t, gs.Constant):
            shape = list(t.shape)
            dtype = t.dtype
            t.to_variable(dtype=dtype, shape=shape)
            if not hasattr(t, "type"):  # Variable.__init__ sets it; to_variable does not
                t.type = "tensor_type"
    tensors = tensor_map(graph)
    graph.inputs = [tensors[n] for n in order if n in tensors]
    return defaults


#: float8 types graphsurgeon's exporter writes as their non-"fnuz" twin (its table maps
#: ``float8_e4m3fnuz`` to FLOAT8E4M3FN)
_FNUZ = {"float8_e4m3fnuz": "FLOAT8E4M3FNUZ", "float8_e5m2fnuz": "FLOAT8E5M2FNUZ"}


def _fnuz_elem_type(dt: Any) -> int | None:
    """The ONNX element type of a ``float8_e4m3fnuz``/``float8_e5m2fnuz`` dtype (None for any
    other dtype, or when the installed onnx lacks the type)."""
    key = getattr(dt, "name", None) if not isinstance(dt, (int, np.integer)) else None
    if key in _FNUZ and hasattr(onnx.TensorProto, _FNUZ[key]):
        return int(getattr(onnx.TensorProto, _FNUZ[key]))
    return None


def _fix_float8_fnuz(model: Model, proto: onnx.ModelProto) -> None:
    """Give the value infos of ``float8_e4m3fnuz``/``float8_e5m2fnuz`` tensors their own ONNX
    element type back (graphsurgeon exports them as the non-fnuz type, which onnxruntime then
    refuses as a type mismatch)."""
    fix: dict[str, int] = {}
    seen: dict[Any, int | None] = {}  # dtype -> ONNX type to write back (None: not fnuz)
    for g in model.walk_graphs():
        for name, t in tensor_map(g).items():
            if not isinstance(t, gs.Variable):
                continue
            dt = t.dtype
            try:
                elem = seen[dt]
            except KeyError:  # a few distinct dtypes per model: numpy's dtype.name is slow
                elem = seen[dt] = _fnuz_elem_type(dt)
            except TypeError:  # an unhashable dtype value: decide it alone
                elem = _fnuz_elem_type(dt)
            if elem is not None:
                fix[name] = elem
    if not fix:
        return
    for g in proto_graphs(proto):
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            if vi.name in fix and vi.type.HasField("tensor_type"):
                vi.type.tensor_type.elem_type = fix[vi.name]


def _restore_output_shapes(g: onnx.GraphProto, graph: gs.Graph) -> None:
    """Give back the declared shape of a graph output that graphsurgeon imported without one: a
    model that lists its output again in ``value_info`` without a shape (ddddocr's
    common_old.onnx) has that entry win, and ONNX requires a shape on graph outputs, so every
    command that wrote such a model refused its own file as invalid (prune, plan)."""
    declared = {o.name: o.type for o in g.output}
    for t in graph.outputs:
        if not isinstance(t, gs.Variable) or t.shape is not None:
            continue
        tp = declared.get(t.name)
        if tp is None or not tp.HasField("tensor_type") or not tp.tensor_type.HasField("shape"):
            continue
        t.shape = [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in tp.tensor_type.shape.dim
        ]


def _restore_type_attributes(proto: onnx.GraphProto, graph: gs.Graph) -> None:
    """Put back the TypeProto attributes graphsurgeon's importer skips (``Optional(type=...)``,
    ``SequenceEmpty``-style ops): without them the model no longer says what type to make. Nodes
    are matched in order, graph by graph (the importer keeps the order)."""
    if len(proto.node) != len(graph.nodes):
        return
    for pn, node in zip(proto.node, graph.nodes):
        for a in pn.attribute:
            if a.type == onnx.AttributeProto.TYPE_PROTO and a.name not in node.attrs:
                node.attrs[a.name] = a.tp
            elif a.type == onnx.AttributeProto.TYPE_PROTOS and a.name not in node.attrs:
                node.attrs[a.name] = list(a.type_protos)
            elif a.type == onnx.AttributeProto.GRAPH and isinstance(
                node.attrs.get(a.name), gs.Graph
            ):
                _restore_type_attributes(a.g, node.attrs[a.name])
            elif a.type == onnx.AttributeProto.GRAPHS:
                subs = node.attrs.get(a.name)
                if isinstance(subs, list):
                    for pg, sg in zip(a.graphs, subs):
                        if isinstance(sg, gs.Graph):
                            _restore_type_attributes(pg, sg)


def _list_initializers_as_inputs(graph: onnx.GraphProto) -> None:
    """IR < 4 wants every initializer listed as a graph input too: constants a pass created
    (folding) are appended to the inputs, with their type and shape."""
    inputs = {vi.name for vi in graph.input}
    for t in graph.initializer:
        if t.name not in inputs:
            graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, t.dims))


def proto_graphs(proto: onnx.ModelProto) -> Iterator[onnx.GraphProto]:
    """The main graph of a ``ModelProto``, every subgraph (If/Loop/Scan bodies, nested) and the
    subgraphs inside its functions."""
    stack: list[onnx.GraphProto] = [proto.graph]
    nodes: list[onnx.NodeProto] = [n for f in proto.functions for n in f.node]
    while stack or nodes:
        if stack:
            g = stack.pop()
            yield g
            nodes.extend(g.node)
            continue
        for a in nodes.pop().attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                stack.append(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                stack.extend(a.graphs)


def _type_name(elem: int) -> str:
    try:
        return str(onnx.TensorProto.DataType.Name(elem)).lower()
    except ValueError:
        return str(elem)


def type_string(tp: onnx.TypeProto) -> str:
    """An ONNX type as ONNX spells it: ``tensor(float)``, ``seq(tensor(int64))``,
    ``optional(tensor(float))``, ``map(int64,tensor(float))``, ``sparse_tensor(float)``; ``?`` for
    a missing type."""
    kind = tp.WhichOneof("value")
    if kind == "tensor_type":
        return f"tensor({_type_name(tp.tensor_type.elem_type)})"
    if kind == "sparse_tensor_type":
        return f"sparse_tensor({_type_name(tp.sparse_tensor_type.elem_type)})"
    if kind == "sequence_type":
        return f"seq({type_string(tp.sequence_type.elem_type)})"
    if kind == "optional_type":
        return f"optional({type_string(tp.optional_type.elem_type)})"
    if kind == "map_type":
        return f"map({_type_name(tp.map_type.key_type)},{type_string(tp.map_type.value_type)})"
    return "?"


def non_tensor_types(proto: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """Inputs and outputs of every graph of ``proto`` whose declared type is not a plain tensor
    (optional, sequence, map, sparse tensor): name -> a copy of the type."""
    found: dict[str, onnx.TypeProto] = {}
    for g in proto_graphs(proto):
        for vi in list(g.input) + list(g.output):
            kind = vi.type.WhichOneof("value")
            if kind is not None and kind != "tensor_type":
                tp = onnx.TypeProto()
                tp.CopyFrom(vi.type)
                found[vi.name] = tp
    return found


#: a sparse initializer is made dense on load; one that would take more than this is refused
MAX_DENSE_BYTES = 256 << 20


def densify(sp: onnx.SparseTensorProto, name: str | None = None) -> np.ndarray:
    """The dense array of a sparse tensor (ONNX's two index layouts: ``[NNZ]`` linear indices or
    ``[NNZ, rank]`` coordinates), its size and indices checked first.

    Raises:
        ModelLoadError: indices out of range or of the wrong layout, or a dense array over
            :data:`MAX_DENSE_BYTES`.
    """
    label = name or sp.values.name
    dims = [int(d) for d in sp.dims]
    try:
        values = onnx.numpy_helper.to_array(sp.values).reshape(-1)
        indices = onnx.numpy_helper.to_array(sp.indices).astype(np.int64)
    except (ValueError, TypeError) as exc:
        raise ModelLoadError(f"sparse initializer '{label}' cannot be read: {exc}") from None
    count = 1
    for d in dims:
        count *= d
    if count * values.dtype.itemsize > MAX_DENSE_BYTES:
        raise ModelLoadError(
            f"sparse initializer '{label}' of dims {dims} would take "
            f"{count * values.dtype.itemsize:,} bytes dense (graphopt holds weights dense; "
            f"limit {MAX_DENSE_BYTES:,})"
        )
    if indices.ndim == 2 and indices.shape[1] == len(dims) and len(dims) > 0:
        if ((indices < 0) | (indices >= np.array(dims))).any():
            raise ModelLoadError(f"sparse initializer '{label}' has indices out of its dims {dims}")
        indices = np.ravel_multi_index(tuple(indices.T), dims) if len(indices) else indices[:, 0]
    elif indices.ndim != 1:
        raise ModelLoadError(f"sparse initializer '{label}' has indices of shape {indices.shape}")
    if len(indices) != len(values) or ((indices < 0) | (indices >= count)).any():
        raise ModelLoadError(
            f"sparse initializer '{label}': {len(values)} values, {len(indices)} indices, some "
            f"outside its {count} elements"
        )
    dense = np.zeros(count, dtype=values.dtype)
    dense[indices] = values
    return dense.reshape(dims)


def _normalize_dtypes(graph: gs.Graph, value_types: Mapping[str, onnx.TypeProto]) -> None:
    """Every IR tensor's dtype a numpy dtype or None, in every graph.

    graphsurgeon leaves the ONNX enum (an int) where its own table has no numpy type (bfloat16,
    float8), and a ``TypeProto`` for optional and map values: the first become the ``ml_dtypes``
    types onnx maps them to, the second carry no dtype (their types live in ``value_types``).
    Sparse initializers become dense arrays (:func:`densify`; graphsurgeon's own reader loses
    raw data and the element type).
    """
    graphs = [graph]
    for g in graphs:
        for n in g.nodes:
            graphs.extend(node_subgraphs(n))
        for t in tensor_map(g).values():
            if isinstance(t, gs.Constant) and isinstance(t._values, gs.ir.tensor.SparseValues):
                t._values = densify(t._values.tensor)
            if not isinstance(t, gs.Variable):
                continue
            if t.name in value_types or getattr(t, "type", "tensor_type") != "tensor_type":
                # graphsurgeon exports only tensor and sequence types; the real type is restored
                # from ``value_types`` on export
                t.dtype = None
                t.shape = None
                t.type = "tensor_type"
            elif isinstance(t.dtype, (int, np.integer)) and not isinstance(t.dtype, bool):
                try:
                    t.dtype = onnx.helper.tensor_dtype_to_np_dtype(int(t.dtype))
                except (KeyError, ValueError, TypeError):
                    t.dtype = None


def _needs_onnx_encoding(v: Any) -> bool:
    """Whether graphsurgeon would write ``v`` wrongly as raw bytes: strings (ONNX keeps them in
    ``string_data``) and the sub-byte types ONNX packs (int4, float4, int2, float6), which numpy
    (ml_dtypes) holds one to a byte."""
    if not isinstance(v, np.ndarray):
        return False
    if v.dtype == np.object_ or v.dtype.kind in "US":
        return True
    return getattr(v.dtype.type, "__module__", "") == "ml_dtypes" and v.dtype.name.startswith(
        ("int4", "uint4", "float4", "int2", "uint2", "float6")
    )


@contextlib.contextmanager
def _onnx_backed_values(model: Model) -> Iterator[None]:
    """While exporting: constants (initializers and node attributes, every graph) whose values
    graphsurgeon cannot encode (:func:`_needs_onnx_encoding`) hold the TensorProto onnx's own
    ``numpy_helper.from_array`` makes of them."""
    swapped: list[tuple[gs.Constant, Any]] = []
    try:
        for g in model.walk_graphs():
            consts = [t for t in tensor_map(g).values() if isinstance(t, gs.Constant)]
            for n in g.nodes:
                for a in n.attrs.values():
                    if isinstance(a, gs.Constant):
                        consts.append(a)
            for t in consts:
                v = t._values
                if _needs_onnx_encoding(v):
                    arr = v.astype(object) if v.dtype.kind in "US" else v
                    swapped.append((t, v))
                    t._values = gs.ir.tensor.LazyValues(onnx.numpy_helper.from_array(arr, t.name))
        yield
    finally:
        for t, v in swapped:
            t._values = v


#: location written into weightless stubs (no such file is ever read)
NO_DATA = "__graphopt_no_data__"


def constant_stub(
    t: gs.Constant, location: str, offset: int = 0, length: int | None = None
) -> onnx.TensorProto | None:
    """An external-data ``TensorProto`` with ``t``'s name, dims and type (None: no ONNX type)."""
    v = t._values
    if isinstance(v, gs.ir.tensor.LazyValues):
        if not isinstance(v.tensor, onnx.TensorProto):
            return None
        dims, dtype = list(v.tensor.dims), v.tensor.data_type
    else:
        arr = np.asarray(v)
        try:
            dtype = onnx.helper.np_dtype_to_tensor_dtype(arr.dtype)
        except (KeyError, ValueError, TypeError):
            return None
        dims = list(arr.shape)
    stub = onnx.TensorProto(name=t.name, dims=dims, data_type=dtype)
    stub.data_location = onnx.TensorProto.EXTERNAL
    entries = [("location", location), ("offset", str(offset))]
    if length is not None:
        entries.append(("length", str(length)))
    for k, val in entries:
        e = stub.external_data.add()
        e.key, e.value = k, val
    return stub


def weightless_stub(t: gs.Constant, min_bytes: int = 1 << 16) -> onnx.TensorProto | None:
    """A dims-only stub for a large non-int64 constant (see ``Model.to_onnx(weights=False)``)."""
    if constant_nbytes(t) < min_bytes or np.dtype(t.dtype) in (np.int64, np.object_):
        return None
    return constant_stub(t, NO_DATA)


@contextlib.contextmanager
def swapped_constants(model: Model, stub_for: Any) -> Iterator[int]:
    """While the block runs, every constant (all graphs) for which ``stub_for(constant)`` returns a
    TensorProto holds that proto instead of its values (exporting then copies no weight data).
    Restores the values afterwards. Yields how many constants were swapped."""
    swapped: list[tuple[gs.Constant, Any]] = []
    seen: set[int] = set()
    try:
        for g in model.walk_graphs():
            for t in tensor_map(g).values():
                if not isinstance(t, gs.Constant) or id(t) in seen:
                    continue
                seen.add(id(t))
                stub = stub_for(t)
                if stub is not None:
                    swapped.append((t, t._values))
                    t._values = gs.ir.tensor.LazyValues(stub)
        yield len(swapped)
    finally:
        for t, values in swapped:
            t._values = values


def _name_nodes(graph: gs.Graph) -> int:
    """Give every unnamed node (all graphs) a unique name and rename duplicates; return how many.

    Passes, reports and the quantizer refer to nodes by name, and ONNX does not require names.
    """
    graphs = [graph]
    for g in graphs:  # grows while it is walked: every subgraph, outermost first
        for n in g.nodes:
            graphs.extend(node_subgraphs(n))
    seen = {n.name for g in graphs for n in g.nodes if n.name}
    renamed = 0
    used: set[str] = set()
    for g in graphs:
        for i, n in enumerate(g.nodes):
            if n.name and n.name not in used:
                used.add(n.name)
                continue
            base = n.name or f"{n.op.lower()}_{i}"
            name, k = base, 1
            while name in used or (name in seen and name != n.name):
                name, k = f"{base}_{k}", k + 1
            n.name = name
            used.add(name)
            renamed += 1
    return renamed


def release_weight_pages(model: Model) -> int:
    """Drop the resident pages of memory-mapped weights from this process (``MADV_DONTNEED``).

    The mappings are read-only views of the model's files, so nothing is lost: a later read faults
    the pages back in. Used between running a large float model and its transformed copy, so that
    both are never resident at once. Returns the bytes released (0 where madvise is unavailable).
    """
    advice = getattr(mmap, "MADV_DONTNEED", None)
    released = 0
    if advice is None:
        return 0
    seen: set[int] = set()
    for g in model.walk_graphs():
        for t in tensor_map(g).values():
            v = getattr(t, "_values", None) if isinstance(t, gs.Constant) else None
            mm = getattr(v, "_mmap", None) if isinstance(v, np.memmap) else None
            if mm is None or id(mm) in seen:
                continue
            seen.add(id(mm))
            try:
                mm.madvise(advice)
                released += len(mm)
            except (OSError, ValueError, AttributeError):
                continue
    return released


def all_graph_output_ids(model: Model) -> set[int]:
    """ids of every tensor that is an output of the main graph or of any subgraph."""
    return {id(t) for g in model.walk_graphs() for t in g.outputs}


def _outer_names(model: Model, graph: gs.Graph) -> set[str]:
    """Names visible to a subgraph from enclosing graphs (for the well-formedness check)."""
    if graph is model.graph:
        return set()
    names: set[str] = set()
    for g in model.walk_graphs():
        if g is not graph:
            names.update(tensor_map(g).keys())
    return names


def check_graph(graph: gs.Graph, outer: set[str] | None = None) -> None:
    """Check that ``graph`` is a DAG whose node inputs are all defined.

    Runs after every modifying pass, so it is linear and cheap: a node order in which every
    producer comes before its readers has no cycle; only otherwise does the standard library's
    ``graphlib`` look for one.
    """
    outer = outer or set()
    defined = {t.name for t in graph.inputs} | outer
    for name, t in tensor_map(graph).items():
        if isinstance(t, gs.Constant):
            defined.add(name)
    producers: dict[str, int] = {}
    for i, n in enumerate(graph.nodes):
        for o in n.outputs:
            if not o.name:  # optional output left empty
                continue
            if o.name in producers:
                raise RuntimeError(f"tensor '{o.name}' is produced by two nodes")
            producers[o.name] = i
    deps: dict[int, set[int]] = {}
    # every edge from an earlier node to a later one: the order is topological, so no cycle
    # (the usual case; graphlib's cycle search is only run when some edge points backwards)
    in_order = True
    for i, n in enumerate(graph.nodes):
        preds = deps.setdefault(i, set())
        for t in n.inputs:
            if not t.name:  # optional input left empty
                continue
            j = producers.get(t.name)
            if j is not None:
                preds.add(j)
                in_order = in_order and j < i
            elif t.name not in defined and not isinstance(t, gs.Constant):
                raise RuntimeError(
                    f"node '{n.name}' ({n.op}) reads '{t.name}', which nothing produces"
                )
    for t in graph.outputs:
        if t.name not in producers and t.name not in defined:
            raise RuntimeError(f"graph output '{t.name}' is not produced")
    if in_order:
        return
    try:
        graphlib.TopologicalSorter(deps).prepare()
    except graphlib.CycleError as exc:
        node = graph.nodes[exc.args[1][0]]
        raise RuntimeError(f"graph has a cycle through node '{node.name or node.op}'") from None


def check_proto(proto: onnx.ModelProto, path: Path | None = None) -> None:
    """``onnx.checker`` on a proto (or on its file when the proto is too large to serialize)."""
    try:
        if proto.ByteSize() < PROTO_LIMIT:
            onnx.checker.check_model(proto)
        elif path is not None:
            onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid model"
        raise ModelLoadError(f"invalid ONNX model{in_file(path)}: {first}") from None
    except UnicodeDecodeError:  # the checker's message quotes a name that is not UTF-8
        raise ModelLoadError(
            f"invalid ONNX model{in_file(path)}: a name or string is not valid UTF-8 "
            "(corrupt file?)"
        ) from None
