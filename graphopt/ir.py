"""The in-memory model: an onnx-graphsurgeon graph plus everything ONNX carries beside it.

``Model`` keeps what graphsurgeon alone would drop on a round trip: ir_version, opset imports of every
domain, metadata properties, producer fields, doc string and model-local functions. If/Loop/Scan
subgraphs live inside the gs graph as node attributes and round-trip with it.

Weights are held lazily: graphsurgeon's ``LazyValues`` wrap the original ``TensorProto`` and only become
numpy arrays when a pass reads them. Passes must never write into a constant's array in place (clones
share arrays); they assign a new array instead.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from graphopt.errors import ModelLoadError

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

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_onnx(cls, proto: onnx.ModelProto, path: Path | None = None,
                  external_data: bool = False) -> Model:
        """Wrap a ``ModelProto`` (its tensors are referenced lazily, not copied)."""
        try:
            graph = gs.import_onnx(proto)
        except Exception as exc:  # graphsurgeon raises assorted errors on malformed graphs
            raise ModelLoadError(f"cannot read the graph{_where(path)}: {exc}") from None
        opsets = {imp.domain or "": imp.version for imp in proto.opset_import}
        # graphsurgeon keeps only the default-domain opset on the graph itself
        graph.opset = opsets.get("", graph.opset)
        graph.import_domains = None
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
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Model:
        """Load an ONNX file (external data included). Raises :class:`ModelLoadError`."""
        proto, p, external = load_proto(path)
        return cls.from_onnx(proto, path=p, external_data=external)

    # ------------------------------------------------------------------ export
    def to_onnx(self, check: bool = False) -> onnx.ModelProto:
        """Export to a ``ModelProto``. Large weights are referenced, not copied, where possible."""
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
        if check:
            check_proto(proto)
        return proto

    def save(self, path: str | os.PathLike[str], **kwargs: Any) -> Path:
        """Write atomically (see :func:`graphopt.emit.onnx.save_model`)."""
        from graphopt.emit.onnx import save_model

        return save_model(self, path, **kwargs)

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
                for attr in node.attrs.values():
                    if isinstance(attr, gs.Graph):
                        stack.append(attr)
                    elif isinstance(attr, (list, tuple)):
                        stack.extend(a for a in attr if isinstance(a, gs.Graph))

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


def constant_nbytes(t: gs.Constant) -> int:
    v = t._values
    if isinstance(v, gs.ir.tensor.LazyValues):
        return int(v.nbytes)
    return int(np.asarray(v).nbytes)


def _where(path: Path | None) -> str:
    return f" in {path}" if path else ""


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
    """Check that ``graph`` is a DAG whose node inputs are all defined."""
    import networkx as nx

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
    dg = nx.DiGraph()
    dg.add_nodes_from(range(len(graph.nodes)))
    for i, n in enumerate(graph.nodes):
        for t in n.inputs:
            if not t.name:  # optional input left empty
                continue
            if t.name in producers:
                dg.add_edge(producers[t.name], i)
            elif t.name not in defined and not isinstance(t, gs.Constant):
                raise RuntimeError(f"node '{n.name}' ({n.op}) reads '{t.name}', which nothing produces")
    for t in graph.outputs:
        if t.name not in producers and t.name not in defined:
            raise RuntimeError(f"graph output '{t.name}' is not produced")
    if not nx.is_directed_acyclic_graph(dg):
        cyc = nx.find_cycle(dg)
        raise RuntimeError(f"graph has a cycle through node '{graph.nodes[cyc[0][0]].name}'")


def check_proto(proto: onnx.ModelProto, path: Path | None = None) -> None:
    """``onnx.checker`` on a proto (or on its file when the proto is too large to serialize)."""
    try:
        if proto.ByteSize() < PROTO_LIMIT:
            onnx.checker.check_model(proto)
        elif path is not None:
            onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid model"
        raise ModelLoadError(f"invalid ONNX model{_where(path)}: {first}") from None


def _external_tensors(proto: onnx.ModelProto) -> list[onnx.TensorProto]:
    return [t for t in external_data_helper._get_all_tensors(proto)
            if external_data_helper.uses_external_data(t)]


def check_external_data(proto: onnx.ModelProto, base_dir: Path) -> None:
    """Refuse external data that is missing, outside the model's folder, or shorter than declared."""
    base = base_dir.resolve()
    sizes: dict[Path, int] = {}
    for t in _external_tensors(proto):
        info = external_data_helper.ExternalDataInfo(t)
        loc = info.location or ""
        if not loc or os.path.isabs(loc) or loc.startswith(("\\", "/")):
            raise ModelLoadError(
                f"tensor '{t.name}' points at external data '{loc}', which is not a relative path "
                f"inside the model's folder; refusing to read it")
        target = (base / loc).resolve()
        if base != target and base not in target.parents:
            raise ModelLoadError(
                f"tensor '{t.name}' points at external data '{loc}' outside the model's folder "
                f"{base}; refusing to read it")
        if not target.is_file():
            raise ModelLoadError(
                f"external data file '{loc}' for tensor '{t.name}' is missing (expected {target}); "
                f"copy it next to the model")
        size = sizes.setdefault(target, target.stat().st_size)
        offset = int(info.offset or 0)
        length = int(info.length) if info.length else None
        if length is None:
            n = int(np.prod(t.dims)) if len(t.dims) else 1
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
            length = n * itemsize
        if offset < 0 or offset + length > size:
            raise ModelLoadError(
                f"external data file '{loc}' is too short for tensor '{t.name}' "
                f"(needs bytes {offset}..{offset + length}, file has {size})")


def load_proto(path: str | os.PathLike[str], load_weights: bool = True
               ) -> tuple[onnx.ModelProto, Path, bool]:
    """Read and sanity-check an ONNX file. Returns (proto, path, uses_external_data)."""
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"no such file: {p}")
    if p.is_dir():
        raise ModelLoadError(f"{p} is a folder, not an ONNX file")
    if p.stat().st_size == 0:
        raise ModelLoadError(f"{p} is empty")
    try:
        proto = onnx.load_model(str(p), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as exc:
        raise ModelLoadError(
            f"{p} is not a readable ONNX model (truncated or not a protobuf: {type(exc).__name__})"
        ) from None
    if not proto.HasField("graph") or proto.ir_version <= 0 or not proto.opset_import:
        raise ModelLoadError(
            f"{p} is not an ONNX model (no graph, IR version or opset; truncated or another format?)")
    external = bool(_external_tensors(proto))
    if external:
        check_external_data(proto, p.parent)
        if load_weights:
            try:
                external_data_helper.load_external_data_for_model(proto, str(p.parent))
            except (OSError, ValueError) as exc:
                raise ModelLoadError(f"cannot read external data of {p}: {exc}") from None
    if load_weights:
        check_proto(proto, p)
    return proto, p, external


def load(path: str | os.PathLike[str]) -> Model:
    """Load an ONNX file into a :class:`Model`."""
    return Model.load(path)
