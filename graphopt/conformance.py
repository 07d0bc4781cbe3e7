"""ONNX backend conformance suite: materialise the cases, load them, check onnxruntime on them.

The cases come from the *installed* ``onnx`` package, so the suite always matches the onnx version
the project runs with:

* ``node``: every node test case defined in ``onnx.backend.test.case.node`` (including the
  ``*_expanded`` function-body variants), written out the way ``onnx``'s
  ``backend/test/cmd_tools.py generate-data`` writes model test cases;
* ``simple``: the model test cases defined in ``onnx.backend.test.case.model`` (the on-disk copies
  shipped in the wheel fill any gap);
* ``light``: the nine "real" models shipped as ``data/light/light_*.onnx`` with the expected output
  stored next to them; the input is the runner's deterministic dummy input
  (``Runner.generate_dummy_data(random=False)``), exactly as ``onnx``'s backend runner feeds them;
* ``pytorch-converted`` and ``pytorch-operator``: copied from ``data/`` in the wheel.

Layout of the cache (one folder per onnx version, built atomically, never rebuilt)::

    CACHE/onnx-1.23.2-f2/index.json                      case list with metadata (see ``Case``)
    CACHE/onnx-1.23.2-f2/<suite>/<name>/model.onnx
    CACHE/onnx-1.23.2-f2/<suite>/<name>/test_data_set_<k>/input_<i>.pb, output_<j>.pb
    CACHE/onnx-1.23.2-f2/<suite>/<name>/ort-<ort version>.json   cached ``ort_reproduces`` verdict

``input_<i>.pb`` is the value of the i-th graph input (for IR < 4 models, of the i-th graph input
that is not an initializer), ``output_<j>.pb`` the expected value of the j-th graph output. Each
is a ``TensorProto``, ``SequenceProto``, ``OptionalProto`` or ``MapProto`` as the graph's type says.

graphopt's own run (:func:`run_case`, :func:`run_all`, ``python -m graphopt.conformance run``;
``make conformance``): every case onnxruntime reproduces goes through ``graphopt optimize`` (the
default pipeline, and every exact pass alone) with its stored inputs as ``feeds``; the written
model must reproduce the stored expected outputs.

Typical use of the cases::

    for case in conformance.cases(cache):          # or conformance.sample(150, 0, cache)
        if conformance.ort_reproduces(case) is not True:
            continue                               # onnxruntime itself cannot reproduce it
        for feeds, expected in case.load():
            ...                                    # optimize case.model with feeds, compare
            conformance.compare(expected, got, case.rtol, case.atol)   # None when equal

Command line::

    python -m graphopt.conformance generate [--cache DIR]
    python -m graphopt.conformance stats [--cache DIR] [--timeout S] [--suite S] [--json FILE]
    python -m graphopt.conformance sample [--cache DIR] [-n 150] [--seed 0]
    python -m graphopt.conformance run [--jobs 2] [--sample N] [--pipeline NAME] [--markdown F]

The cache is ``$GRAPHOPT_CACHE/conformance`` (default ``~/.cache/graphopt/conformance``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import random
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter, defaultdict, deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from graphopt.core.errors import GraphoptError, VerificationError, first_line
from graphopt.core.output import atomic_write_text
from graphopt.core.session import is_ml_dtype, make_session, run_session
from graphopt.fixtures import cache_dir, cache_lock
from graphopt.jobs.optimize import TARGETED_PASSES, optimize
from graphopt.passes import registered_passes

logger = logging.getLogger(__name__)

SUITES: tuple[str, ...] = ("node", "simple", "light", "pytorch-converted", "pytorch-operator")
"""Suites in the order they are listed."""

DEFAULT_RTOL = 1e-3
"""Relative tolerance of ``onnx.backend.test.runner`` (every ``TestCase`` default)."""
DEFAULT_ATOL = 1e-7
"""Absolute tolerance of ``onnx.backend.test.runner``."""
BFLOAT16_RTOL = 2.0**-6
"""The runner's floor for bfloat16 outputs: two bfloat16 ulps."""

FORMAT = 2
"""Bump when the cache layout or the index fields change; it is part of the folder name."""


def default_cache() -> Path:
    """The cache used when none is given: ``$GRAPHOPT_CACHE/conformance`` (default
    ``~/.cache/graphopt/conformance``)."""
    return cache_dir("conformance")


def _cache(cache: str | os.PathLike[str] | None) -> Path:
    return default_cache() if cache is None else Path(cache).expanduser()


_ONNX_DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"
_EXPANDED = re.compile(r"_expanded(_ver\d+)?$")


# --------------------------------------------------------------------------- the case type


@dataclass(frozen=True)
class Case:
    """One conformance case: a model and one or more data sets of (inputs, expected outputs).

    Attributes:
        name: test name as ONNX spells it, e.g. ``"test_abs"``; unique within a suite.
        suite: one of ``SUITES``.
        path: the case folder (holds ``model.onnx`` and ``test_data_set_*``).
        rtol: relative tolerance onnx's runner uses for this case.
        atol: absolute tolerance onnx's runner uses for this case.
        op: the operator the case is about (node suite: the tested op, also for ``*_expanded``
            variants; other suites: the most frequent op of the model), ``domain::Op`` outside
            the default domain.
        op_types: every op type in the model, subgraphs included, ``domain::Op`` outside the
            default domain.
        ir_version: the model's IR version.
        opsets: opset imports, ``{domain: version}`` (``""`` is the default domain).
        inputs: graph input names in feed order (initializers excluded).
        outputs: graph output names, in the order of the expected outputs.
        input_types: ``type_str`` of each input, e.g. ``"tensor(float)[3,4]"``,
            ``"seq(tensor(float))"``.
        output_types: same for each output.
        features: notable traits: ``"expanded"``, ``"ir<4"``, ``"sequence"``, ``"optional"``,
            ``"map"``, ``"string"``, ``"subgraph"``, ``"fp16"``, ``"bf16"``, ``"fp8"``, ``"4bit"``,
            ``"2bit"``, ``"complex"``, and the non-default domains (``"ai.onnx.ml"``,
            ``"ai.onnx.preview.training"``).
    """

    name: str
    suite: str
    path: Path
    rtol: float = DEFAULT_RTOL
    atol: float = DEFAULT_ATOL
    op: str = ""
    op_types: tuple[str, ...] = ()
    ir_version: int = 0
    opsets: dict[str, int] = field(default_factory=dict)
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    input_types: tuple[str, ...] = ()
    output_types: tuple[str, ...] = ()
    features: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        """``"<suite>/<name>"``, unique over all suites."""
        return f"{self.suite}/{self.name}"

    @property
    def model(self) -> Path:
        """Path of the case's ``model.onnx``."""
        return self.path / "model.onnx"

    def load_model(self) -> onnx.ModelProto:
        """Returns the parsed model."""
        return onnx.load(str(self.model))

    def data_set_dirs(self) -> list[Path]:
        """Returns the ``test_data_set_*`` folders, in numeric order."""
        dirs = [p for p in self.path.glob("test_data_set_*") if p.is_dir()]
        return sorted(dirs, key=lambda p: int(p.name.rsplit("_", 1)[1]))

    def load(self) -> list[tuple[dict[str, Any], list[Any]]]:
        """Loads every data set.

        Returns:
            One ``(feeds, expected)`` per data set: ``feeds`` maps each graph input name to its
            value, ``expected`` lists the expected value of each graph output in order. Values are
            numpy arrays (tensors; ml_dtypes dtypes for bfloat16/float8/int4), lists (sequences),
            dicts (maps) or ``None`` (an empty optional); see ``load_value``.
        """
        model = self.load_model()
        init = {i.name for i in model.graph.initializer}
        in_types = [vi.type for vi in model.graph.input if vi.name not in init]
        out_types = [vi.type for vi in model.graph.output]
        data = []
        for ds in self.data_set_dirs():
            feeds = {
                name: load_value(ds / f"input_{i}.pb", in_types[i])
                for i, name in enumerate(self.inputs)
                if (ds / f"input_{i}.pb").exists()
            }
            expected = [
                load_value(ds / f"output_{j}.pb", out_types[j]) for j in range(len(self.outputs))
            ]
            data.append((feeds, expected))
        return data

    def to_json(self) -> dict[str, Any]:
        """Returns the index entry (``path`` relative to the version folder)."""
        return {
            "name": self.name,
            "suite": self.suite,
            "rtol": self.rtol,
            "atol": self.atol,
            "op": self.op,
            "op_types": list(self.op_types),
            "ir_version": self.ir_version,
            "opsets": self.opsets,
            "inputs": list(self.inputs),
            "outputs": list(self.outputs),
            "input_types": list(self.input_types),
            "output_types": list(self.output_types),
            "features": list(self.features),
        }

    @classmethod
    def from_json(cls, root: Path, d: dict[str, Any]) -> Case:
        """Builds a case from an index entry; ``root`` is the version folder."""
        return cls(
            name=d["name"],
            suite=d["suite"],
            path=root / d["suite"] / d["name"],
            rtol=d["rtol"],
            atol=d["atol"],
            op=d["op"],
            op_types=tuple(d["op_types"]),
            ir_version=d["ir_version"],
            opsets=dict(d["opsets"]),
            inputs=tuple(d["inputs"]),
            outputs=tuple(d["outputs"]),
            input_types=tuple(d["input_types"]),
            output_types=tuple(d["output_types"]),
            features=tuple(d["features"]),
        )


# --------------------------------------------------------------------------- value (de)serialising


def load_value(path: str | os.PathLike[str], type_proto: onnx.TypeProto) -> Any:
    """Reads one stored value as the graph's type says it is.

    Args:
        path: an ``input_*.pb`` / ``output_*.pb`` file.
        type_proto: the graph input's or output's type.

    Returns:
        ``numpy.ndarray`` for a tensor (``TensorProto``), ``list`` for a sequence
        (``SequenceProto``), ``dict`` for a map (``MapProto``), and for an optional
        (``OptionalProto``) its element, or ``None`` when empty.
    """
    raw = Path(path).read_bytes()
    kind = type_proto.WhichOneof("value")
    if kind == "sequence_type":
        seq = onnx.SequenceProto()
        seq.ParseFromString(raw)
        return numpy_helper.to_list(seq)
    if kind == "optional_type":
        opt = onnx.OptionalProto()
        opt.ParseFromString(raw)
        return numpy_helper.to_optional(opt)
    if kind == "map_type":
        mp = onnx.MapProto()
        mp.ParseFromString(raw)
        return numpy_helper.to_dict(mp)
    if kind == "sparse_tensor_type":
        sp = onnx.SparseTensorProto()
        sp.ParseFromString(raw)
        return sp
    tensor = onnx.TensorProto()
    tensor.ParseFromString(raw)
    return numpy_helper.to_array(tensor)


def _value_proto(value: Any, type_proto: onnx.TypeProto, name: str) -> Any:
    """Serialises a test value the way ``cmd_tools.generate_data`` does."""
    kind = type_proto.WhichOneof("value")
    if kind == "map_type":
        return numpy_helper.from_dict(value, name)
    if kind == "sequence_type":
        return numpy_helper.from_list(value, name)
    if kind == "optional_type":
        return numpy_helper.from_optional(value, name)
    if isinstance(value, onnx.TensorProto):
        return value
    return numpy_helper.from_array(np.asarray(value), name)


# --------------------------------------------------------------------------- model metadata

_ELEM_FEATURE: dict[int, str] = {
    onnx.TensorProto.FLOAT16: "fp16",
    onnx.TensorProto.BFLOAT16: "bf16",
    onnx.TensorProto.STRING: "string",
    onnx.TensorProto.COMPLEX64: "complex",
    onnx.TensorProto.COMPLEX128: "complex",
}
for _n in ("FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ", "FLOAT8E8M0"):
    if hasattr(onnx.TensorProto, _n):
        _ELEM_FEATURE[getattr(onnx.TensorProto, _n)] = "fp8"
for _n in ("INT4", "UINT4", "FLOAT4E2M1"):
    if hasattr(onnx.TensorProto, _n):
        _ELEM_FEATURE[getattr(onnx.TensorProto, _n)] = "4bit"
for _n in ("INT2", "UINT2"):
    if hasattr(onnx.TensorProto, _n):
        _ELEM_FEATURE[getattr(onnx.TensorProto, _n)] = "2bit"


def _type_features(tp: onnx.TypeProto, out: set[str]) -> None:
    kind = tp.WhichOneof("value")
    if kind == "tensor_type":
        elem = int(tp.tensor_type.elem_type)
        if elem in _ELEM_FEATURE:
            out.add(_ELEM_FEATURE[elem])
    elif kind == "sequence_type":
        out.add("sequence")
        _type_features(tp.sequence_type.elem_type, out)
    elif kind == "optional_type":
        out.add("optional")
        _type_features(tp.optional_type.elem_type, out)
    elif kind == "map_type":
        out.add("map")
        _type_features(tp.map_type.value_type, out)
    elif kind == "sparse_tensor_type":
        out.add("sparse")


def type_str(tp: onnx.TypeProto) -> str:
    """ONNX-style text of a type: ``tensor(float)[3,4]``, ``seq(tensor(int64))``,
    ``optional(seq(tensor(float)))``, ``map(string,tensor(int64))``; unknown dims are ``?``."""
    kind = tp.WhichOneof("value")
    if kind in ("tensor_type", "sparse_tensor_type"):
        t = getattr(tp, kind)
        elem = onnx.helper.tensor_dtype_to_string(t.elem_type).split(".")[-1].lower()
        name = "tensor" if kind == "tensor_type" else "sparse_tensor"
        text = f"{name}({elem})"
        if t.HasField("shape"):
            dims = [
                str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?")
                for d in t.shape.dim
            ]
            text += f"[{','.join(dims)}]"
        return text
    if kind == "sequence_type":
        return f"seq({type_str(tp.sequence_type.elem_type)})"
    if kind == "optional_type":
        return f"optional({type_str(tp.optional_type.elem_type)})"
    if kind == "map_type":
        key = onnx.helper.tensor_dtype_to_string(tp.map_type.key_type).split(".")[-1].lower()
        return f"map({key},{type_str(tp.map_type.value_type)})"
    return "undefined"


def _walk_nodes(graph: onnx.GraphProto) -> Iterable[tuple[onnx.NodeProto, bool]]:
    """Yields (node, inside_subgraph) for every node, subgraphs included."""
    stack: list[tuple[onnx.GraphProto, bool]] = [(graph, False)]
    while stack:
        g, sub = stack.pop()
        for node in g.node:
            yield node, sub
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    stack.append((attr.g, True))
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    stack.extend((sg, True) for sg in attr.graphs)


def _op_key(node: onnx.NodeProto) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"


def _describe(
    model: onnx.ModelProto, name: str, suite: str, rtol: float, atol: float, op: str | None
) -> Case:
    """Builds the ``Case`` metadata of a model (the path is filled in by the caller)."""
    g = model.graph
    init = {i.name for i in g.initializer}
    ins = [vi for vi in g.input if vi.name not in init]
    feats: set[str] = set()
    ops: Counter[str] = Counter()
    for node, sub in _walk_nodes(g):
        ops[_op_key(node)] += 1
        if sub:
            feats.add("subgraph")
        if node.domain not in ("", "ai.onnx"):
            feats.add(node.domain)
    for t in list(g.initializer):
        if t.data_type in _ELEM_FEATURE:
            feats.add(_ELEM_FEATURE[t.data_type])
    for vi in [*ins, *g.output]:
        _type_features(vi.type, feats)
    for imp in model.opset_import:
        if imp.domain not in ("", "ai.onnx"):
            feats.add(imp.domain)
    if model.ir_version < 4:
        feats.add("ir<4")
    if _EXPANDED.search(name):
        feats.add("expanded")
    if op is None:
        op = ops.most_common(1)[0][0] if ops else ""
    return Case(
        name=name,
        suite=suite,
        path=Path(),
        rtol=rtol,
        atol=atol,
        op=op,
        op_types=tuple(sorted(ops)),
        ir_version=model.ir_version,
        opsets={i.domain: i.version for i in model.opset_import},
        inputs=tuple(vi.name for vi in ins),
        outputs=tuple(vi.name for vi in g.output),
        input_types=tuple(type_str(vi.type) for vi in ins),
        output_types=tuple(type_str(vi.type) for vi in g.output),
        features=tuple(sorted(feats)),
    )


# --------------------------------------------------------------------------- generation


def version_dir(cache: str | os.PathLike[str] | None = None) -> Path:
    """Returns the cache's folder for the installed onnx version."""
    return _cache(cache) / f"onnx-{onnx.__version__}-f{FORMAT}"


def _write_generated(root: Path, tc: Any) -> None:
    """Writes one ``onnx.backend.test.case.test_case.TestCase`` with its data sets."""
    case_dir = root / tc.kind / tc.name
    case_dir.mkdir(parents=True)
    (case_dir / "model.onnx").write_bytes(tc.model.SerializeToString())
    g = tc.model.graph
    for k, (inputs, outputs) in enumerate(tc.data_sets):
        ds = case_dir / f"test_data_set_{k}"
        ds.mkdir()
        for i, value in enumerate(inputs):
            vi = g.input[i]
            proto = _value_proto(value, vi.type, vi.name)
            (ds / f"input_{i}.pb").write_bytes(proto.SerializeToString())
        for j, value in enumerate(outputs):
            vi = g.output[j]
            proto = _value_proto(value, vi.type, vi.name)
            (ds / f"output_{j}.pb").write_bytes(proto.SerializeToString())


def _collect_generated() -> list[Any]:
    """Runs onnx's node and model test-case generators (the ``export*`` snippets)."""
    import onnx.backend.test.case.model as model_cases  # noqa: PLC0415
    import onnx.backend.test.case.node as node_cases  # noqa: PLC0415

    state = np.random.get_state()
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            node = list(node_cases.collect_testcases())
            model = [tc for tc in model_cases.collect_testcases() if tc.kind == "simple"]
    finally:
        np.random.set_state(state)
    return node + model


def _light_cases() -> list[tuple[str, Path, float, float]]:
    """The "real" models of ``onnx.backend.test.case.model`` that point to local light models."""
    import onnx.backend.test.case.model as model_cases  # noqa: PLC0415

    out = []
    for tc in model_cases.collect_testcases():
        if (
            tc.kind != "real"
            or not tc.url
            or not tc.url.startswith("onnx/backend/test/data/light/")
        ):
            continue
        path = _ONNX_DATA / "light" / Path(tc.url).name
        if path.exists():
            out.append((tc.name, path, float(tc.rtol), float(tc.atol)))
    return out


def _write_light(root: Path, name: str, path: Path) -> None:
    """Materialises a light model with the runner's dummy input and the shipped output."""
    from onnx.backend.test.runner import Runner  # noqa: PLC0415

    model = onnx.load(str(path))
    case_dir = root / "light" / name
    ds = case_dir / "test_data_set_0"
    ds.mkdir(parents=True)
    shutil.copyfile(path, case_dir / "model.onnx")
    init = {i.name for i in model.graph.initializer}
    n = 0
    for vi in model.graph.input:
        if vi.name in init:
            continue
        value = Runner.generate_dummy_data(vi, seed=0, name=name, random=False)
        (ds / f"input_{n}.pb").write_bytes(
            numpy_helper.from_array(value, vi.name).SerializeToString()
        )
        n += 1
    prefix = str(path.with_suffix(""))
    for j in range(len(model.graph.output)):
        src = Path(f"{prefix}_output_{j}.pb")
        if not src.exists():
            raise FileNotFoundError(f"light model {name}: no stored output {src.name}")
        shutil.copyfile(src, ds / f"output_{j}.pb")


def _tolerances(case_dir: Path) -> tuple[float, float]:
    """rtol/atol of an on-disk case (``data.json`` overrides, as in onnx's loader)."""
    rtol, atol = DEFAULT_RTOL, DEFAULT_ATOL
    dj = case_dir / "data.json"
    if dj.exists():
        d = json.loads(dj.read_text())
        rtol, atol = float(d.get("rtol", rtol)), float(d.get("atol", atol))
    return rtol, atol


def generate(cache: str | os.PathLike[str] | None = None, *, force: bool = False) -> Path:
    """Materialises the conformance cases of the installed onnx into ``cache``.

    Idempotent: the cases go to ``version_dir(cache)``, built in a temporary sibling and
    renamed into place when complete; an existing complete folder is returned as is.

    Args:
        cache: cache root (default :func:`default_cache`); one sub-folder per onnx version.
        force: rebuild even when the folder exists (the ORT verdicts cached there are lost).

    Returns:
        The version folder (holds ``index.json`` and one folder per suite).
    """
    root = version_dir(cache)
    if (root / "index.json").exists() and not force:
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with cache_lock(root.parent / f".{root.name}.lock"):
        if force or not (root / "index.json").exists():
            _build(root)
    return root


def _build(root: Path) -> None:
    """Builds ``root`` in a temporary sibling and renames it into place."""
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=root.name + ".tmp-", dir=root.parent))
    try:
        entries: list[Case] = []
        seen: set[str] = set()
        node_op: dict[str, str] = {}
        t_collect = time.perf_counter()
        generated = _collect_generated()
        t_collect = time.perf_counter() - t_collect
        for tc in generated:
            key = f"{tc.kind}/{tc.name}"
            if key in seen:
                logger.warning("duplicate case %s skipped", key)
                continue
            seen.add(key)
            _write_generated(tmp, tc)
            op: str | None = None
            if tc.kind == "node":
                base = _EXPANDED.sub("", tc.name)
                if base == tc.name and len(tc.model.graph.node) == 1:
                    node_op[base] = _op_key(tc.model.graph.node[0])
                op = node_op.get(base)
            entries.append(
                _describe(tc.model, tc.name, tc.kind, float(tc.rtol), float(tc.atol), op)
            )
        for name, path, rtol, atol in _light_cases():
            if f"light/{name}" in seen:
                continue
            seen.add(f"light/{name}")
            _write_light(tmp, name, path)
            entries.append(_describe(onnx.load(str(path)), name, "light", rtol, atol, None))
        for suite in ("node", "simple", "pytorch-converted", "pytorch-operator"):
            src = _ONNX_DATA / suite
            if not src.is_dir():
                continue
            for case_dir in sorted(p for p in src.iterdir() if (p / "model.onnx").exists()):
                if f"{suite}/{case_dir.name}" in seen:
                    continue
                seen.add(f"{suite}/{case_dir.name}")
                shutil.copytree(case_dir, tmp / suite / case_dir.name)
                rtol, atol = _tolerances(case_dir)
                model = onnx.load(str(case_dir / "model.onnx"), load_external_data=False)
                entries.append(_describe(model, case_dir.name, suite, rtol, atol, None))
        order = {s: i for i, s in enumerate(SUITES)}
        entries.sort(key=lambda c: (order.get(c.suite, len(order)), c.name))
        index = {
            "format": FORMAT,
            "onnx_version": onnx.__version__,
            "numpy_version": np.__version__,
            "generated_s": round(time.perf_counter() - t0, 2),
            "collect_s": round(t_collect, 2),
            "cases": [c.to_json() for c in entries],
        }
        (tmp / "index.json").write_text(json.dumps(index, indent=1))
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info(
        "generated %d cases in %.1f s into %s", len(entries), time.perf_counter() - t0, root
    )


def index(cache: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Returns the parsed ``index.json`` (generating the cases first when needed)."""
    root = generate(cache)
    return json.loads((root / "index.json").read_text())


def cases(
    cache: str | os.PathLike[str] | None = None, suites: Sequence[str] | None = None
) -> list[Case]:
    """Returns every case (generating them first when needed), sorted by suite then name.

    Args:
        cache: cache root (default :func:`default_cache`).
        suites: only these suites (default: all).
    """
    root = generate(cache)
    data = json.loads((root / "index.json").read_text())
    out = [Case.from_json(root, d) for d in data["cases"]]
    if suites is not None:
        out = [c for c in out if c.suite in suites]
    return out


# --------------------------------------------------------------------------- comparison


def compare(expected: Sequence[Any], got: Sequence[Any], rtol: float, atol: float) -> str | None:
    """Compares outputs the way ``onnx.backend.test.runner.Runner.assert_similar_outputs`` does.

    Same count; sequences element-wise; tensors: same shape, same dtype, strings exactly,
    numbers with ``numpy.testing.assert_allclose(rtol, atol)`` (NaN equals NaN); bfloat16 with
    rtol at least two bfloat16 ulps; other ml_dtypes (float8, int4, ...) compared as float32.
    Maps compare keys exactly and values as tensors; an empty optional (``None``) only equals
    ``None``.

    Returns:
        ``None`` when they match, else a one-line description of the first difference.
    """
    if len(expected) != len(got):
        return f"{len(got)} outputs, expected {len(expected)}"
    for i, (ref, out) in enumerate(zip(expected, got, strict=True)):
        msg = _compare_one(ref, out, rtol, atol)
        if msg is not None:
            return f"output {i}: {msg}"
    return None


def _compare_one(ref: Any, out: Any, rtol: float, atol: float) -> str | None:
    if ref is None or out is None:
        return (
            None
            if ref is None and out is None
            else f"optional: got {type(out).__name__}, expected {type(ref).__name__}"
        )
    if isinstance(ref, dict):
        if not isinstance(out, dict):
            return f"got {type(out).__name__}, expected map"
        if set(ref) != set(out):
            return "map keys differ"
        for k in ref:
            msg = _compare_one(np.asarray(ref[k]), np.asarray(out[k]), rtol, atol)
            if msg:
                return f"map[{k!r}]: {msg}"
        return None
    if isinstance(ref, (list, tuple)):
        if not isinstance(out, (list, tuple)):
            return f"got {type(out).__name__}, expected sequence"
        if len(ref) != len(out):
            return f"sequence of {len(out)}, expected {len(ref)}"
        for j, (r, o) in enumerate(zip(ref, out, strict=True)):
            msg = _compare_one(r, o, rtol, atol)
            if msg:
                return f"[{j}]: {msg}"
        return None
    ref = np.asarray(ref)
    out = np.asarray(out)
    if ref.shape != out.shape:
        return f"shape {out.shape}, expected {ref.shape}"
    if ref.dtype == object or ref.dtype.kind in "US":
        ok = np.array_equal(out.astype(object), ref.astype(object))
        return None if ok else "strings differ"
    if out.dtype != ref.dtype:
        return f"dtype {out.dtype}, expected {ref.dtype}"
    if ref.dtype.kind == "b":
        return None if np.array_equal(ref, out) else f"{int((ref != out).sum())} booleans differ"
    r_tol = rtol
    if ref.dtype.name == "bfloat16":
        r_tol = max(rtol, BFLOAT16_RTOL)
    if is_ml_dtype(ref.dtype):
        ref = ref.astype(np.float32)
        out = out.astype(np.float32)
    try:
        np.testing.assert_allclose(out, ref, rtol=r_tol, atol=atol)
    except AssertionError:
        with np.errstate(all="ignore"):
            a, b = out.astype(np.float64), ref.astype(np.float64)
            bad = ~np.isclose(a, b, rtol=r_tol, atol=atol, equal_nan=True)
            err = np.abs(a - b)[bad]
            worst = (
                float(np.nanmax(err)) if err.size and not np.all(np.isnan(err)) else float("nan")
            )
        return f"{int(bad.sum())}/{ref.size} values differ (max abs err {worst:.3g})"
    except TypeError as e:
        return f"cannot compare {ref.dtype}: {e}"
    return None


# --------------------------------------------------------------------------- onnxruntime


def _ort_version() -> str:
    return str(ort.__version__)


def ort_session(model: str | os.PathLike[str] | onnx.ModelProto) -> Any:
    """An onnxruntime CPU session with ``ORT_DISABLE_ALL`` and one thread."""
    return make_session(model, "disable_all", threads=1)


def _classify(exc: BaseException, stage: str) -> str:
    """Turns an onnxruntime exception into ``"<category>: <first line>"``."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = re.sub(r"\s+", " ", text)[:300]
    low = text.lower()
    if "could not find an implementation" in low or "not_implemented" in low:
        cat = "kernel missing"
    elif (
        "is not a registered function/op" in low
        or "no opset import for domain" in low
        or ("opset" in low and ("not supported" in low or "is under development" in low))
    ):
        cat = "op or opset unknown"
    elif "type" in low and ("not supported" in low or "unsupported" in low):
        cat = "type unsupported"
    elif stage == "load":
        cat = "load failure"
    else:
        cat = "run failure"
    return f"{cat}: {text}"


def _run_ort(case: Case) -> bool | str:
    """The uncached check behind ``ort_reproduces``."""
    try:
        data = case.load()
    except Exception as e:  # noqa: BLE001 - any unreadable data is a refusal reason
        return f"data unreadable: {type(e).__name__}: {e}"
    try:
        sess = ort_session(case.model)
    except Exception as e:  # noqa: BLE001
        return _classify(e, "load")
    for k, (feeds, expected) in enumerate(data):
        try:
            got = run_session(sess, list(case.outputs), feeds)
        except GraphoptError as e:
            return f"input not feedable: {e}"
        except Exception as e:  # noqa: BLE001
            return _classify(e, "run")
        msg = compare(expected, got, case.rtol, case.atol)
        if msg is not None:
            where = f"data set {k} " if len(data) > 1 else ""
            return f"mismatch: {where}{msg}"
    return True


def _verdict_path(case: Case) -> Path:
    return case.path / f"ort-{_ort_version()}.json"


def cached_verdict(case: Case) -> bool | str | None:
    """Returns the cached ``ort_reproduces`` verdict of a case, or ``None`` when not yet run."""
    p = _verdict_path(case)
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())["verdict"]
    except (OSError, ValueError, KeyError):
        return None


def _store_verdict(case: Case, verdict: bool | str) -> None:
    atomic_write_text(_verdict_path(case), json.dumps({"verdict": verdict}))


def ort_reproduces(case: Case, *, use_cache: bool = True) -> bool | str:
    """Whether onnxruntime reproduces a case's expected outputs.

    Runs the model in onnxruntime (CPU, ``ORT_DISABLE_ALL``, 1 thread) on every data set and
    compares with ``compare`` at the case's tolerances. The verdict is cached next to the case
    (``ort-<onnxruntime version>.json``), so a second call is a file read.

    Args:
        case: the case.
        use_cache: read the cached verdict when there is one (the result is always stored).

    Returns:
        ``True``, or why not, as ``"<category>: <detail>"``: ``kernel missing``,
        ``op or opset unknown``, ``type unsupported``, ``load failure``, ``run failure``,
        ``input not feedable``, ``data unreadable``, ``mismatch``, and from ``check_all`` also
        ``crash`` and ``timeout``.
    """
    if use_cache:
        v = cached_verdict(case)
        if v is not None:
            return v
    try:
        verdict = _run_ort(case)
    except Exception as e:  # noqa: BLE001 - a harness bug must not stop a whole run
        logger.exception("%s: harness error", case.id)
        verdict = f"harness error: {type(e).__name__}: {e}"
    _store_verdict(case, verdict)
    return verdict


def check_all(
    items: Sequence[Case],
    *,
    timeout_s: float = 300.0,
    use_cache: bool = True,
    worker: Sequence[str] | None = None,
    jobs: int = 1,
) -> dict[str, bool | str]:
    """``ort_reproduces`` for many cases, in worker processes that may crash or hang.

    A case that kills its worker is recorded as ``"crash: ..."``, one that runs past
    ``timeout_s`` as ``"timeout: ..."``; the worker is restarted and the run goes on. Verdicts
    are cached like ``ort_reproduces``'s.

    Args:
        items: the cases.
        timeout_s: seconds one case may take.
        use_cache: skip cases with a cached verdict.
        worker: command line of the worker process (default: ``python -m graphopt.conformance
            _worker``; tests pass a worker that crashes or hangs).
        jobs: worker processes run side by side.

    Returns:
        ``{case.id: verdict}`` for every case.
    """
    out: dict[str, bool | str] = {}
    todo: list[Case] = []
    for c in items:
        v = cached_verdict(c) if use_cache else None
        if v is None:
            todo.append(c)
        else:
            out[c.id] = v
    requests = [
        {"op": "verdict", "root": str(c.path.parent.parent), "case": c.to_json()} for c in todo
    ]
    for n, (i, reply) in enumerate(_pool(requests, jobs=jobs, timeout_s=timeout_s, worker=worker)):
        c = todo[i]
        if isinstance(reply, str):
            _store_verdict(c, reply)
            out[c.id] = reply
            logger.warning("%s: %s", c.id, reply)
        else:
            out[c.id] = reply["verdict"]
        if (n + 1) % 200 == 0:
            logger.info("%d/%d cases checked", n + 1, len(todo))
    return out


def _pool(
    requests: Sequence[dict[str, Any]],
    *,
    jobs: int = 1,
    timeout_s: float = 300.0,
    worker: Sequence[str] | None = None,
) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """Sends each request (one JSON line) to one of ``jobs`` worker processes and yields
    ``(index, reply)`` as replies come (not in order). A worker that dies or runs past
    ``timeout_s`` on a request is replaced; that request's reply is ``"crash: ..."`` or
    ``"timeout: ..."`` instead of a dict."""
    cmd = list(worker or [sys.executable, "-m", "graphopt.conformance", "_worker"])
    pending = deque(enumerate(requests))
    procs: list[subprocess.Popen[str] | None] = [None] * max(1, jobs)
    busy: dict[int, tuple[int, float]] = {}  # slot -> (request index, deadline)

    def stop(slot: int, kill: bool) -> int:
        proc = procs[slot]
        procs[slot] = None
        if proc is None:
            return 0
        if kill:
            proc.kill()
        return proc.wait()

    try:
        while pending or busy:
            for slot in range(len(procs)):
                if slot in busy or not pending:
                    continue
                proc = procs[slot]
                if proc is None or proc.poll() is not None:
                    proc = procs[slot] = subprocess.Popen(
                        cmd,
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.DEVNULL,
                        text=True,
                        bufsize=1,
                    )
                i, req = pending.popleft()
                assert proc.stdin is not None
                busy[slot] = (i, time.monotonic() + timeout_s)
                with contextlib.suppress(BrokenPipeError):
                    proc.stdin.write(json.dumps(req) + "\n")
                    proc.stdin.flush()
            streams: dict[Any, int] = {procs[s].stdout: s for s in busy}  # type: ignore[union-attr]
            wait = max(0.0, min(d for _, d in busy.values()) - time.monotonic())
            ready, _, _ = select.select(list(streams), [], [], wait)
            for stream in ready:
                slot = streams[stream]
                i, _ = busy.pop(slot)
                line = stream.readline()  # type: ignore[union-attr]
                if line:
                    yield i, json.loads(line)
                else:
                    yield i, f"crash: worker exited with {stop(slot, kill=False)}"
            now = time.monotonic()
            for slot, (i, deadline) in list(busy.items()):
                if deadline <= now and procs[slot] is not None:
                    busy.pop(slot)
                    stop(slot, kill=True)
                    yield i, f"timeout: over {timeout_s:.0f} s"
    finally:
        for slot, proc in enumerate(procs):
            if proc is None:
                continue
            if proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
            try:
                proc.wait(timeout=30 if slot not in busy else 0.1)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _worker() -> None:
    """Reads one JSON request per line on stdin, writes one JSON reply per line on stdout:
    ``{"op": "verdict", ...}`` -> ``{"verdict": ...}`` and ``{"op": "run", ...}`` -> a
    :class:`RunOutcome` as JSON.

    Anything native code prints on stdout is sent to stderr so it cannot corrupt the replies.
    """
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    for line in sys.stdin:
        msg = json.loads(line)
        case = Case.from_json(Path(msg["root"]), msg["case"])
        if msg.get("op", "verdict") == "verdict":
            reply: dict[str, Any] = {"verdict": ort_reproduces(case, use_cache=False)}
        else:
            reply = run_case(case, RunConfig.from_json(msg["config"])).to_json()
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


# --------------------------------------------------------------------------- sampling

SAMPLE_QUOTA: dict[str, float] = {
    "node": 0.74,
    "simple": 0.06,
    "light": 0.02,
    "pytorch-converted": 0.10,
    "pytorch-operator": 0.08,
}
"""Share of a sample per suite (the node share is spread over as many op types as it allows)."""


_LIGHT_ORDER = (
    "test_squeezenet",
    "test_shufflenet",
    "test_inception_v1",
    "test_densenet121",
    "test_inception_v2",
    "test_resnet50",
    "test_bvlc_alexnet",
    "test_zfnet512",
    "test_vgg19",
)
"""Light models by parameter count (1.2 M to 144 M): a sample takes the cheapest first."""


def sample(
    n: int = 150,
    seed: int = 0,
    cache: str | os.PathLike[str] | None = None,
    *,
    reproducible: bool = True,
) -> list[Case]:
    """A fixed, stratified sample of the cases for a fast test run.

    Each suite gets its ``SAMPLE_QUOTA`` share of ``n``. Inside a suite the cases are grouped by
    ``Case.op``; the groups are visited round-robin in a seeded order, and inside each group the
    cases in a seeded order, non-``expanded`` variants first, so the sample spreads over as many
    op types as it can. The light suite takes its smallest models first (``_LIGHT_ORDER``).
    With ``reproducible``, a case onnxruntime does not reproduce is passed over for the next one
    (verdicts of the candidates visited are computed and cached), so every returned case is
    usable as a test.

    Args:
        n: about how many cases.
        seed: the sample is a function of (installed onnx, onnxruntime, n, seed).
        cache: cache root (default :func:`default_cache`).
        reproducible: only cases ``ort_reproduces`` accepts.

    Returns:
        The cases, sorted by ``Case.id``.
    """
    rng = random.Random(seed)
    by_suite: dict[str, list[Case]] = defaultdict(list)
    for c in cases(cache):
        by_suite[c.suite].append(c)
    picked: list[Case] = []
    for suite in SUITES:
        pool = by_suite.get(suite, [])
        quota = max(1, round(n * SAMPLE_QUOTA.get(suite, 0.0))) if pool else 0
        groups: dict[str, list[Case]] = defaultdict(list)
        for c in pool:
            groups[c.op if suite == "node" else c.name].append(c)
        keys = sorted(groups)
        rng.shuffle(keys)
        if suite == "light":
            keys.sort(
                key=lambda k: _LIGHT_ORDER.index(k) if k in _LIGHT_ORDER else len(_LIGHT_ORDER)
            )
        queues = {}
        for k in keys:
            g = sorted(groups[k], key=lambda c: c.name)
            rng.shuffle(g)
            g.sort(key=lambda c: "expanded" in c.features)
            queues[k] = g
        taken = 0
        while taken < quota and any(queues.values()):
            for k in keys:
                if taken >= quota:
                    break
                q = queues[k]
                while q:
                    c = q.pop(0)
                    if not reproducible or ort_reproduces(c) is True:
                        picked.append(c)
                        taken += 1
                        break
    return sorted(picked, key=lambda c: c.id)


# --------------------------------------------------------------------------- graphopt on the cases

#: statuses of a graphopt run on a case, in table order
STATUSES: tuple[str, ...] = ("ok", "refused", "failed", "wrong", "crash")
"""``ok``: the output was written and reproduces the expected outputs; ``refused``: a
:class:`~graphopt.core.errors.GraphoptError` (exit 2 with a reason); ``failed``: exit 1 (an
internal error, a failed verification, a broken pass invariant); ``wrong``: the output was written
but does not reproduce the expected outputs; ``crash``: the worker died or ran past its time."""


@dataclass(frozen=True)
class RunConfig:
    """How a case goes through graphopt: the default pipeline (``passes=None``) or given passes.

    Attributes:
        name: the table's row name: ``default`` or the pass name.
        passes: the passes run instead of the default pipeline.
        target: the optimize target (``ort`` for the passes that lower to onnxruntime's ops).
    """

    name: str
    passes: tuple[str, ...] | None = None
    target: str = "portable"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "passes": self.passes, "target": self.target}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RunConfig:
        passes = d.get("passes")
        return cls(d["name"], tuple(passes) if passes is not None else None, d["target"])


def run_configs() -> list[RunConfig]:
    """The default pipeline, then every exact (not lossy) registered pass alone."""
    out = [RunConfig("default")]
    for name, cls in registered_passes().items():
        if not cls.lossy:
            target = "ort" if name in TARGETED_PASSES else "portable"
            out.append(RunConfig(name, (name,), target))
    return out


@dataclass
class RunOutcome:
    """What one graphopt run did on one case (see :data:`STATUSES`)."""

    case: str
    config: str
    status: str
    detail: str = ""
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def run_case(case: Case, config: RunConfig | None = None, *, write: bool = True) -> RunOutcome:
    """Runs one case through ``graphopt optimize`` (the job), as a user would: the stored inputs
    are the feeds it verifies on, the output is written, then run in onnxruntime on every data
    set and compared with the expected outputs at the case's tolerances.

    Args:
        case: a case onnxruntime reproduces (see :func:`ort_reproduces`).
        config: the pipeline (default: the default pipeline).
        write: write the output as the CLI does (False: run the optimized model from memory).
    """
    config = config or RunConfig("default")
    t0 = time.perf_counter()

    def outcome(status: str, detail: str = "") -> RunOutcome:
        detail = " ".join(detail.split())[:400]
        return RunOutcome(case.id, config.name, status, detail, time.perf_counter() - t0)

    data = case.load()
    feeds = [f for f, _ in data]
    with tempfile.TemporaryDirectory(prefix="graphopt-conformance-") as d:
        out = Path(d) / "model.onnx"
        try:
            res = optimize(
                case.model,
                list(config.passes) if config.passes is not None else None,
                target=config.target,
                feeds=feeds,
                output=out if write else None,
            )
        except GraphoptError as e:
            return outcome("refused", first_line(e))
        except Exception as e:  # noqa: BLE001 - every failure is a finding of the run
            if isinstance(e, VerificationError):
                return outcome("failed", f"verification: {first_line(e)}")
            return outcome("failed", f"{type(e).__name__}: {first_line(e)}")
        try:
            sess = ort_session(out if write else res.model.to_onnx())
        except Exception as e:  # noqa: BLE001
            return outcome("wrong", f"onnxruntime cannot load the output: {first_line(e)}")
        for k, (f, expected) in enumerate(data):
            try:
                got = run_session(sess, list(case.outputs), f)
            except Exception as e:  # noqa: BLE001
                return outcome("wrong", f"the output does not run: {first_line(e)}")
            msg = compare(expected, got, case.rtol, case.atol)
            if msg is not None:
                where = f"data set {k} " if len(data) > 1 else ""
                return outcome("wrong", f"{where}{msg}")
    return outcome("ok")


def run_all(
    items: Sequence[Case],
    configs: Sequence[RunConfig] | None = None,
    *,
    jobs: int = 1,
    timeout_s: float = 300.0,
    progress: bool = False,
) -> list[RunOutcome]:
    """:func:`run_case` for every case and config, in ``jobs`` worker processes (a crash or a
    hang is the outcome ``crash`` of that run; the other runs go on).

    Returns:
        The outcomes, in (case, config) order.
    """
    configs = list(configs) if configs is not None else run_configs()
    pairs = [(c, cfg) for c in items for cfg in configs]
    requests = [
        {
            "op": "run",
            "root": str(c.path.parent.parent),
            "case": c.to_json(),
            "config": cfg.to_json(),
        }
        for c, cfg in pairs
    ]
    results: list[RunOutcome | None] = [None] * len(pairs)
    t0 = time.perf_counter()
    for n, (i, reply) in enumerate(_pool(requests, jobs=jobs, timeout_s=timeout_s)):
        c, cfg = pairs[i]
        if isinstance(reply, str):
            results[i] = RunOutcome(c.id, cfg.name, "crash", reply, timeout_s)
            logger.warning("%s [%s]: %s", c.id, cfg.name, reply)
        else:
            results[i] = RunOutcome(**reply)
        if progress and (n + 1) % 500 == 0:
            logger.info("%d/%d runs (%.0f s)", n + 1, len(pairs), time.perf_counter() - t0)
    return [r for r in results if r is not None]


def summarize(outcomes: Sequence[RunOutcome]) -> dict[str, Any]:
    """Counts per config and status, and the findings (every outcome that is not ``ok``).

    Returns:
        ``{"configs": {config: {status: count, "cases": n}}, "total": {...}, "findings":
        [outcome JSON...]}``.
    """
    per: dict[str, Counter[str]] = {}
    for o in outcomes:
        per.setdefault(o.config, Counter())[o.status] += 1
    total: Counter[str] = Counter()
    for cnt in per.values():
        total.update(cnt)
    rows = {
        k: {"cases": sum(v.values()), **{s: v.get(s, 0) for s in STATUSES}} for k, v in per.items()
    }
    return {
        "configs": rows,
        "total": {"cases": sum(total.values()), **{s: total.get(s, 0) for s in STATUSES}},
        "findings": [o.to_json() for o in outcomes if o.status != "ok"],
    }


def markdown(summary: dict[str, Any], *, reproduced: int, total_cases: int, seconds: float) -> str:
    """The ``bench/results/conformance.md`` page of a :func:`summarize` result."""
    lines = [
        "# ONNX conformance suite through graphopt",
        "",
        f"onnx {onnx.__version__}, onnxruntime {ort.__version__}; {total_cases} cases generated, "
        f"{reproduced} reproduced by onnxruntime (ORT_DISABLE_ALL): those are run through "
        "`graphopt optimize` with their stored inputs as `feeds`, the written model run in "
        "onnxruntime and compared with the stored expected outputs at the case's tolerances. "
        f"{time.strftime('%Y-%m-%d')}, {seconds / 60:.0f} min on a shared 2-core machine.",
        "",
        "ok: reproduces the expected outputs; refused: exit 2 with a reason; failed: exit 1 "
        "(internal error, failed verification); wrong: written but wrong; crash: the worker "
        "died or timed out.",
        "",
        "| pipeline | cases | " + " | ".join(STATUSES) + " |",
        "|---|" + "---:|" * (len(STATUSES) + 1),
    ]
    for name, row in summary["configs"].items():
        lines.append(
            f"| {name} | {row['cases']} | " + " | ".join(str(row[s]) for s in STATUSES) + " |"
        )
    t = summary["total"]
    lines.append(f"| **all** | {t['cases']} | " + " | ".join(str(t[s]) for s in STATUSES) + " |")
    findings = summary["findings"]
    if findings:
        lines += [
            "",
            "## Findings",
            "",
            "| case | pipeline | status | reason |",
            "|---|---|---|---|",
        ]
        for f in findings:
            reason = f["detail"].replace("|", "\\|")
            lines.append(f"| {f['case']} | {f['config']} | {f['status']} | {reason} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- statistics and CLI


_REASON_PATTERNS = (
    re.compile(r"(?:implementation|kernel) for (\S+?)\(\d+\)"),
    re.compile(r"Op with name \(\S*\) domain \(\S*\) and type \((\S+?)\)"),
    re.compile(r"Fatal error: (\S+?)\(-?\d+\) is not a registered function/op"),
    re.compile(r"No corresponding Numpy type for Tensor Type\. (\S+)"),
    re.compile(r"\b(Batchwise) recurrent operations"),
    re.compile(r"Failed to construct (locale) with name:(\S+?):"),
    re.compile(r"running (\S+) node"),
)


def _reason_key(verdict: str, op: str = "") -> str:
    """Histogram key of a refusal: its category plus the op, type or cause it names.

    Categories whose message names no op (mismatch, crash, ...) get the case's ``op``.
    """
    cat, _, detail = verdict.partition(": ")
    if cat in ("mismatch", "crash", "timeout", "data unreadable", "harness error"):
        return f"{cat} ({op})" if op else cat
    for pat in _REASON_PATTERNS:
        m = pat.search(detail)
        if m:
            return f"{cat} ({' '.join(m.groups())})"
    detail = re.sub(r"Load model from \S+ failed:", "", detail)
    return f"{cat}: {detail[:90]}"


def stats(
    cache: str | os.PathLike[str] | None = None,
    *,
    timeout_s: float = 300.0,
    suites: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Generates (when needed), checks every case in onnxruntime, and summarises.

    Returns:
        ``{"onnx", "onnxruntime", "generated_s", "check_s", "suites": {suite: {"cases",
        "ort_reproduces"}}, "total", "reproduces", "reasons": {reason: count},
        "features": {feature: [cases, reproduces]}, "verdicts": {case id: verdict}}``.
    """
    t0 = time.perf_counter()
    root = generate(cache)
    gen_s = time.perf_counter() - t0
    idx = json.loads((root / "index.json").read_text())
    items = [c for c in cases(cache) if suites is None or c.suite in suites]
    t1 = time.perf_counter()
    verdicts = check_all(items, timeout_s=timeout_s)
    check_s = time.perf_counter() - t1
    per_suite: dict[str, dict[str, int]] = {}
    reasons: Counter[str] = Counter()
    feats: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for c in items:
        s = per_suite.setdefault(c.suite, {"cases": 0, "ort_reproduces": 0})
        s["cases"] += 1
        ok = verdicts[c.id] is True
        s["ort_reproduces"] += ok
        for f in c.features:
            feats[f][0] += 1
            feats[f][1] += ok
        if not ok:
            reasons[_reason_key(str(verdicts[c.id]), c.op)] += 1
    return {
        "onnx": onnx.__version__,
        "onnxruntime": _ort_version(),
        "generated_s": idx.get("generated_s") if gen_s < 1.0 else round(gen_s, 2),
        "check_s": round(check_s, 2),
        "suites": per_suite,
        "total": len(items),
        "reproduces": sum(v is True for v in verdicts.values()),
        "reasons": dict(reasons.most_common()),
        "features": dict(sorted(feats.items())),
        "verdicts": verdicts,
    }


def _cmd_run(args: argparse.Namespace) -> int:
    """``run``: every reproduced case through every pipeline; prints the table, exit 1 on any
    failure, wrong result or crash, or when refusals reach 1% of the runs."""
    t0 = time.perf_counter()
    every = cases(args.cache, args.suite)
    chosen = sample(args.sample, 0, args.cache) if args.sample else every
    chosen = [c for c in chosen if not args.suite or c.suite in args.suite]
    chosen = [c for c in chosen if not args.case or any(k in c.id for k in args.case)]
    verdicts = check_all(chosen, jobs=args.jobs)
    todo = [c for c in chosen if verdicts[c.id] is True]
    configs = [c for c in run_configs() if not args.pipeline or c.name in args.pipeline]
    logger.info(
        "%d cases (%d reproduced by onnxruntime) x %d pipelines",
        len(chosen),
        len(todo),
        len(configs),
    )
    outcomes = run_all(todo, configs, jobs=args.jobs, timeout_s=args.timeout, progress=True)
    summary = summarize(outcomes)
    seconds = time.perf_counter() - t0
    print(f"{'pipeline':24} {'cases':>6} " + " ".join(f"{s:>8}" for s in STATUSES))
    for name, row in [*summary["configs"].items(), ("all", summary["total"])]:
        print(f"{name:24} {row['cases']:6} " + " ".join(f"{row[s]:8}" for s in STATUSES))
    for f in summary["findings"]:
        print(f"{f['status']:8} {f['config']:22} {f['case']}: {f['detail']}")
    if args.markdown:
        text = markdown(summary, reproduced=len(todo), total_cases=len(chosen), seconds=seconds)
        atomic_write_text(args.markdown, text)
    if args.json:
        atomic_write_text(args.json, json.dumps([o.to_json() for o in outcomes], indent=0))
    t = summary["total"]
    bad = t["failed"] + t["wrong"] + t["crash"]
    return 1 if bad or t["refused"] >= 0.01 * max(1, t["cases"]) else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``generate``, ``stats``, ``sample`` and ``run``."""
    p = argparse.ArgumentParser(
        prog="python -m graphopt.conformance", description=(__doc__ or "").split("\n", 1)[0]
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("generate", "stats", "sample", "run"):
        sp = sub.add_parser(name)
        sp.add_argument(
            "--cache", default=None, help="cache root (default $GRAPHOPT_CACHE/conformance)"
        )
        if name == "generate":
            sp.add_argument("--force", action="store_true", help="rebuild the version folder")
        if name == "stats":
            sp.add_argument("--timeout", type=float, default=300.0, help="seconds per case")
            sp.add_argument("--suite", action="append", choices=SUITES, help="only this suite")
            sp.add_argument("--json", help="also write the full result (verdicts too) here")
            sp.add_argument("--failures", action="store_true", help="list every refused case")
        if name == "sample":
            sp.add_argument("-n", type=int, default=150)
            sp.add_argument("--seed", type=int, default=0)
            sp.add_argument("--all", action="store_true", help="include non-reproducible cases")
        if name == "run":
            sp.add_argument("--jobs", type=int, default=2, help="worker processes")
            sp.add_argument("--timeout", type=float, default=600.0, help="seconds per run")
            sp.add_argument("--suite", action="append", choices=SUITES, help="only this suite")
            sp.add_argument("--case", action="append", help="only cases whose id contains this")
            sp.add_argument(
                "--pipeline", action="append", help="only this pipeline (default, or a pass name)"
            )
            sp.add_argument("--sample", type=int, help="only the fixed sample of about N cases")
            sp.add_argument("--markdown", help="write the table and the findings here")
            sp.add_argument("--json", help="write every outcome here")
    sub.add_parser("_worker")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.cmd == "_worker":
        logging.disable(logging.CRITICAL)
        _worker()
        return 0
    if args.cmd == "generate":
        t0 = time.perf_counter()
        root = generate(args.cache, force=args.force)
        idx = json.loads((root / "index.json").read_text())
        counts = Counter(c["suite"] for c in idx["cases"])
        print(f"onnx {onnx.__version__}: {len(idx['cases'])} cases in {root}")
        print(
            f"generation took {idx['generated_s']} s (this call {time.perf_counter() - t0:.1f} s)"
        )
        for s in SUITES:
            print(f"  {s:18} {counts.get(s, 0):5}")
        return 0
    if args.cmd == "sample":
        for c in sample(args.n, args.seed, args.cache, reproducible=not args.all):
            print(f"{c.id}\t{c.op}")
        return 0
    if args.cmd == "run":
        return _cmd_run(args)
    res = stats(args.cache, timeout_s=args.timeout, suites=args.suite)
    print(f"onnx {res['onnx']}, onnxruntime {res['onnxruntime']}")
    print(f"generation {res['generated_s']} s, onnxruntime check {res['check_s']} s")
    print(f"{'suite':18} {'cases':>6} {'ORT ok':>7}")
    for s in SUITES:
        if s in res["suites"]:
            d = res["suites"][s]
            print(f"{s:18} {d['cases']:6} {d['ort_reproduces']:7}")
    print(f"{'total':18} {res['total']:6} {res['reproduces']:7}")
    print("\nrefusal reasons:")
    for r, k in res["reasons"].items():
        print(f"{k:6}  {r}")
    print("\nfeatures (cases / ORT ok):")
    for f, (k, ok) in res["features"].items():
        print(f"  {f:28} {k:5} {ok:5}")
    if args.failures:
        print("\nrefused cases:")
        for cid, v in sorted(res["verdicts"].items()):
            if v is not True:
                print(f"  {cid}: {v}")
    if args.json:
        atomic_write_text(args.json, json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
