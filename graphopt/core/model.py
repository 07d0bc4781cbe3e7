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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt.core.errors import ModelLoadError, in_file
from graphopt.core.graph import constant_nbytes, node_subgraphs

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
        proto = gs.export_onnx(self.graph, do_type_check=False)
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
        if self.input_defaults:
            inputs = {vi.name for vi in proto.graph.input}
            have = {t.name for t in proto.graph.initializer}
            for name, tp in self.input_defaults.items():
                if name in inputs and name not in have:
                    proto.graph.initializer.append(tp)
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
        return {n: t for n, t in self.graph.tensors().items() if isinstance(t, gs.Constant)}

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
    tensors = graph.tensors()
    order = [vi.name for vi in proto.graph.input]
    for name in overridable:
        t = tensors.get(name)
        if isinstance(t, gs.Constant):
            shape = list(t.shape)
            dtype = t.dtype
            t.to_variable(dtype=dtype, shape=shape)
            if not hasattr(t, "type"):  # Variable.__init__ sets it; to_variable does not
                t.type = "tensor_type"
    tensors = graph.tensors()
    graph.inputs = [tensors[n] for n in order if n in tensors]
    return defaults


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
            for t in g.tensors().values():
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
        for t in g.tensors().values():
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
            names.update(g.tensors().keys())
    return names


def check_graph(graph: gs.Graph, outer: set[str] | None = None) -> None:
    """Check that ``graph`` is a DAG whose node inputs are all defined.

    Runs after every modifying pass, so it uses the standard library's ``graphlib`` (cheap)
    rather than networkx.
    """
    outer = outer or set()
    defined = {t.name for t in graph.inputs} | outer
    for name, t in graph.tensors().items():
        if isinstance(t, gs.Constant):
            defined.add(name)
    producers: dict[str, int] = {}
    for i, n in enumerate(graph.nodes):
        for o in n.outputs:
            if o.name in producers:
                raise RuntimeError(f"tensor '{o.name}' is produced by two nodes")
            producers[o.name] = i
    deps: dict[int, set[int]] = {}
    for i, n in enumerate(graph.nodes):
        preds = deps.setdefault(i, set())
        for t in n.inputs:
            if not t.name:  # optional input left empty
                continue
            if t.name in producers:
                preds.add(producers[t.name])
            elif t.name not in defined and not isinstance(t, gs.Constant):
                raise RuntimeError(
                    f"node '{n.name}' ({n.op}) reads '{t.name}', which nothing produces"
                )
    for t in graph.outputs:
        if t.name not in producers and t.name not in defined:
            raise RuntimeError(f"graph output '{t.name}' is not produced")
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
