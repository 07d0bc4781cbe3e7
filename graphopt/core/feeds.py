"""Model inputs: seeded random feeds for a model's inputs, and calibration data read for them and
streamed in batches.

Random feeds (:func:`random_feeds`): floats ~ N(0, 1), integers 0, bools False, for every graph
input; dynamic dims take the values of a draw of :data:`DIM_DRAWS` (batch 1 or 3, others 7 or 64).

Calibration data (:func:`open_calibration`).

Accepted sources (DESIGN.md, ``--calib DATA``):

- a ``.npz`` file whose arrays are keyed by input name, samples stacked on axis 0;
- a folder of such ``.npz`` files (read one file at a time, in name order);
- a folder of ``.npy`` files named after the inputs (``x.npy``), samples on axis 0;
- a single ``.npy`` file for a model with one input;
- from Python, any iterable of feed dicts ``{input name: array}`` (a sample without the batch axis
  or a batch with it).

Samples may differ in their dynamic dims (text-line crops of different widths): consecutive samples
of one shape are batched together, and a change of shape closes the batch. Only one source file and
one batch are held at a time. Problems are reported as
:class:`~graphopt.core.errors.CalibrationError` (CLI exit 2) naming the input and what was expected.
"""

from __future__ import annotations

import logging
import os
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np

from graphopt.core.errors import CalibrationError, FeedError, ShapeError
from graphopt.core.model import Model

logger = logging.getLogger(__name__)

Feeds = dict[str, np.ndarray]
CalibSource = Union[str, os.PathLike, Iterable[Mapping[str, np.ndarray]], "CalibrationReader"]


@dataclass(frozen=True)
class InputSpec:
    """What the model expects for one input: name, dims (int or None for dynamic), dtype."""

    name: str
    dims: tuple[int | None, ...] | None
    dtype: np.dtype

    @property
    def rank(self) -> int | None:
        return None if self.dims is None else len(self.dims)


def input_specs(model: Model) -> dict[str, InputSpec]:
    """The model's graph inputs as :class:`InputSpec` (initializer-backed inputs excluded)."""
    specs = {}
    for t in model.graph.inputs:
        dims = (
            None
            if t.shape is None
            else tuple(
                int(d) if isinstance(d, (int, np.integer)) and d > 0 else None for d in t.shape
            )
        )
        dtype = np.dtype(t.dtype) if t.dtype is not None else np.dtype(np.float32)
        specs[t.name] = InputSpec(t.name, dims, dtype)
    return specs


def _check_array(spec: InputSpec, arr: np.ndarray, where: str, batched: bool) -> np.ndarray:
    """Validate one input array (with batch axis if ``batched``) and return it, batched."""
    arr = np.asarray(arr)
    if spec.rank is not None:
        if not batched and arr.ndim == spec.rank - 1:
            arr = arr[None]
        elif not batched and arr.ndim == spec.rank:
            pass
        if arr.ndim != spec.rank:
            raise CalibrationError(
                f"calibration input '{spec.name}'{where} has rank {arr.ndim} (shape "
                f"{list(arr.shape)}), but the model expects rank {spec.rank} "
                f"{_fmt(spec.dims)} with samples on axis 0"
            )
        for i, (want, have) in enumerate(zip(spec.dims or (), arr.shape, strict=False)):
            if i > 0 and want is not None and want != have:
                raise CalibrationError(
                    f"calibration input '{spec.name}'{where} has shape {list(arr.shape)}, but the "
                    f"model fixes dim {i} to {want} {_fmt(spec.dims)}"
                )
    want_kind = spec.dtype.kind
    if arr.dtype != spec.dtype:
        if want_kind == "f" and arr.dtype.kind == "f":
            arr = arr.astype(spec.dtype)  # float64 -> float32 and the like
        elif want_kind in "iu" and arr.dtype.kind in "iu":
            arr = arr.astype(spec.dtype)
        else:
            raise CalibrationError(
                f"calibration input '{spec.name}'{where} has dtype {arr.dtype}, but the model "
                f"expects {spec.dtype}; convert the data (e.g. images to float32 as the model's "
                f"preprocessing does)"
            )
    if not_finite_only(arr):
        raise CalibrationError(
            f"calibration input '{spec.name}'{where} holds only NaN/inf values; nothing can be "
            "calibrated on it"
        )
    return arr


def not_finite_only(arr: np.ndarray) -> bool:
    """Whether a non-empty float array holds no finite value at all (only NaN and inf)."""
    return arr.dtype.kind in "fc" and arr.size > 0 and not bool(np.isfinite(arr).any())


def _fmt(dims: tuple[int | None, ...] | None) -> str:
    if dims is None:
        return "[?]"
    return "[" + "x".join("N" if d is None else str(d) for d in dims) + "]"


class CalibrationReader:
    """Streams validated batches ``{input name: array}`` from a calibration source.

    Args:
        source: path (``.npz``, ``.npy``, folder) or an iterable of feed dicts.
        specs: the model's inputs (:func:`input_specs`).
        batch_size: samples per batch (batches may be smaller where shapes change).
        limit: stop after this many samples.
        defaults: constant feeds for inputs the data does not give (e.g. a sample rate).
    """

    def __init__(
        self,
        source: Any,
        specs: Mapping[str, InputSpec],
        batch_size: int = 8,
        limit: int | None = None,
        defaults: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        if batch_size < 1:
            raise CalibrationError("calibration batch size must be at least 1")
        self.source = source
        self.specs = dict(specs)
        self.batch_size = int(batch_size)
        fixed = [s.dims[0] for s in self.specs.values() if s.dims and s.dims[0] is not None]
        if fixed:  # a model with a fixed batch dim runs one fixed-size batch at a time
            self.batch_size = min(fixed)
        self.limit = limit
        self.defaults = {k: np.asarray(v) for k, v in (defaults or {}).items()}
        self._check_source()

    # ------------------------------------------------------------------ sources
    def _check_source(self) -> None:
        src = self.source
        if isinstance(src, (str, os.PathLike)):
            p = Path(src)
            if not p.exists():
                raise CalibrationError(f"calibration data {p} does not exist")
            if p.is_file() and p.suffix not in (".npz", ".npy"):
                raise CalibrationError(
                    f"calibration data {p} is not a .npz or .npy file (or a folder of them)"
                )
            if p.is_dir() and not (list(p.glob("*.npz")) or list(p.glob("*.npy"))):
                raise CalibrationError(f"calibration folder {p} holds no .npz or .npy files")

    def _files(self) -> Iterator[tuple[str, Feeds]]:
        """(where, batched feeds) per source chunk: a file, or a folder's .npy set."""
        p = Path(self.source)
        if p.is_file() and p.suffix == ".npz":
            yield from self._npz(p)
        elif p.is_file():
            if len(self.specs) != 1:
                raise CalibrationError(
                    f"{p} is a single .npy file but the model has {len(self.specs)} inputs "
                    f"({', '.join(self.specs)}); use a .npz keyed by input name"
                )
            name = next(iter(self.specs))
            yield f" in {p.name}", {name: self._load_npy(p)}
        else:
            npz = sorted(p.glob("*.npz"))
            if npz:
                for f in npz:
                    yield from self._npz(f)
            else:
                feeds = {}
                for name in self.specs:
                    f = p / f"{name}.npy"
                    if f.is_file():
                        feeds[name] = self._load_npy(f)
                yield f" in {p}", feeds

    @staticmethod
    def _load_npy(f: Path) -> np.ndarray:
        return load_npy(f, CalibrationError, mmap=True)

    @staticmethod
    def _npz(f: Path) -> Iterator[tuple[str, Feeds]]:
        yield f" in {f.name}", load_npz(f, CalibrationError)

    def _samples_from_chunk(
        self, where: str, feeds: Mapping[str, np.ndarray], batched: bool
    ) -> Iterator[Feeds]:
        """Validated batched arrays of one chunk, split into runs of samples (views)."""
        data: Feeds = {}
        for name, spec in self.specs.items():
            if name in feeds:
                data[name] = _check_array(spec, feeds[name], where, batched)
            elif name in self.defaults:
                continue
            else:
                have = ", ".join(sorted(feeds)) or "nothing"
                raise CalibrationError(
                    f"calibration data{where} has no array for model input '{name}' (it has: "
                    f"{have}); key the arrays by the model's input names: {', '.join(self.specs)}"
                )
        # a scalar input has no sample axis: its one value goes with every sample of the chunk
        scalars = {k: v for k, v in data.items() if v.ndim == 0}
        counts = {k: v.shape[0] for k, v in data.items() if v.ndim}
        if len(set(counts.values())) > 1:
            raise CalibrationError(
                f"calibration data{where} gives different sample counts per input: {counts} "
                "(samples are on axis 0 of every input; an input whose batch dim is not its "
                "first, like a recurrent state [2, batch, 128], cannot be calibrated this way)"
            )
        n = next(iter(counts.values()), 1 if scalars else 0)
        for i in range(0, n, self.batch_size):
            yield {k: v[i : i + self.batch_size] if v.ndim else v for k, v in data.items()}

    def _chunks(self) -> Iterator[Feeds]:
        if isinstance(self.source, (str, os.PathLike)):
            for where, feeds in self._files():
                yield from self._samples_from_chunk(where, feeds, batched=True)
        else:
            try:
                it = iter(self.source)
            except TypeError:
                raise CalibrationError(
                    f"calibration data must be a path or an iterable of feed dicts, not "
                    f"{type(self.source).__name__}"
                ) from None
            for k, feeds in enumerate(it):
                if not isinstance(feeds, Mapping):
                    raise CalibrationError(
                        f"calibration item {k} is a {type(feeds).__name__}, not a dict of arrays "
                        f"keyed by input name"
                    )
                yield from self._samples_from_chunk(f" (item {k})", feeds, batched=False)

    # ------------------------------------------------------------------ batching
    def __iter__(self) -> Iterator[Feeds]:
        """Batches of at most ``batch_size`` samples sharing one shape per input."""
        pending: list[Feeds] = []
        pending_n = 0
        seen = 0

        def flush() -> Feeds:
            batch = {
                k: np.ascontiguousarray(np.concatenate([p[k] for p in pending]))
                if len(pending) > 1 and pending[0][k].ndim
                else np.ascontiguousarray(pending[0][k])
                if pending[0][k].ndim
                else pending[0][k]  # a scalar: one value for the batch (ascontiguousarray: 1-D)
                for k in pending[0]
            }
            for k, v in self.defaults.items():
                batch.setdefault(k, v)
            return batch

        for chunk in self._chunks():
            if self.limit is not None:
                room = self.limit - seen
                if room <= 0:
                    break
                chunk = {k: v[:room] if v.ndim else v for k, v in chunk.items()}
            sized = [v for v in chunk.values() if v.ndim]
            n = sized[0].shape[0] if sized else (1 if chunk else 0)
            if n == 0:
                continue
            if pending and any(
                pending[0][k].shape[1:] != v.shape[1:]
                or (v.ndim == 0 and not np.array_equal(pending[0][k], v))
                for k, v in chunk.items()
            ):
                yield flush()
                pending, pending_n = [], 0
            pending.append(chunk)
            pending_n += n
            seen += n
            if pending_n >= self.batch_size:
                yield flush()
                pending, pending_n = [], 0
        if pending:
            yield flush()
        if seen == 0:
            raise CalibrationError("calibration data holds no samples")

    def num_samples(self) -> int | None:
        """Total samples when known without reading the data (single .npz/.npy), else None."""
        if not isinstance(self.source, (str, os.PathLike)):
            return None  # items may be single samples or batches
        else:
            p = Path(self.source)
            if p.is_dir():
                return None
            try:
                if p.suffix == ".npz":
                    shapes = npz_shapes(p, CalibrationError)
                    name = next((k for k in self.specs if k in shapes), None)
                    if name is None:
                        return None
                    n = int(shapes[name][0])
                else:
                    n = int(npy_header(p, CalibrationError).shape[0])
            except (CalibrationError, IndexError):
                return None
        return min(n, self.limit) if self.limit is not None else n


def open_calibration(
    source: CalibSource | None,
    model: Model,
    batch_size: int = 8,
    limit: int | None = None,
    defaults: Mapping[str, np.ndarray] | None = None,
) -> CalibrationReader:
    """A :class:`CalibrationReader` for ``model``'s inputs (passes a reader through unchanged)."""
    if isinstance(source, CalibrationReader):
        return source
    if source is None:
        raise CalibrationError("no calibration data given (--calib DATA)")
    return CalibrationReader(
        source, input_specs(model), batch_size=batch_size, limit=limit, defaults=defaults
    )


# ---------------------------------------------------------------------- given feeds


def check_feeds(
    model: Model | Mapping[str, InputSpec],
    feeds: Mapping[str, Any],
    what: str = "input",
    complete: bool = True,
) -> Feeds:
    """Check arrays given for ``model``'s inputs (a Model, or its :func:`input_specs`) and return
    them in the model's dtypes.

    Every name must be a graph input; each array must have the input's rank, its static dims,
    and a dtype of the same kind (float64 is converted to float32, integer widths likewise); with
    ``complete`` every input must be given.

    Raises:
        FeedError: naming the input, what was given and what the model expects.
    """
    specs = input_specs(model) if isinstance(model, Model) else model
    unknown = [k for k in feeds if k not in specs]
    files = sorted(set(getattr(feeds, "sources", {}).values()))
    origin = f" (in {', '.join(files)})" if files else ""
    if unknown:
        raise FeedError(
            f"{what}{origin} names unknown model input(s) {', '.join(map(repr, unknown))}; "
            f"the model's inputs are {', '.join(map(repr, specs)) or 'none'}"
        )
    if complete:
        missing = [k for k in specs if k not in feeds]
        if missing:
            raise FeedError(
                f"{what}{origin} gives no array for model input(s) {', '.join(map(repr, missing))}"
            )
    out: Feeds = {}
    for name, value in feeds.items():
        spec = specs[name]
        arr = np.asarray(value)
        dims = spec.dims
        if dims is not None and (
            arr.ndim != len(dims)
            or any(want is not None and want != have for want, have in zip(dims, arr.shape))
        ):
            anysize = " (N: any size)" if None in dims else ""
            raise FeedError(
                f"{what} '{name}'{_source(feeds, name)} has shape {list(arr.shape)}, but the "
                f"model expects {_fmt(dims)}{anysize}"
            )
        if arr.dtype != spec.dtype:
            same_kind = (arr.dtype.kind == "f" and spec.dtype.kind == "f") or (
                arr.dtype.kind in "iu" and spec.dtype.kind in "iu"
            )
            if not same_kind:
                raise FeedError(
                    f"{what} '{name}'{_source(feeds, name)} has dtype {arr.dtype}, but the model "
                    f"expects {spec.dtype}"
                )
            arr = arr.astype(spec.dtype)
        if not_finite_only(arr):
            raise FeedError(
                f"{what} '{name}'{_source(feeds, name)} holds only NaN/inf values; give inputs "
                "the model is meant to run on"
            )
        out[name] = arr
    return out


class FileFeeds(dict[str, np.ndarray]):
    """Arrays read from files (``--feeds``, ``--input``), remembering each array's file so that
    a mistake found later is reported with the file's name."""

    def __init__(self, arrays: Mapping[str, np.ndarray], sources: Mapping[str, object]) -> None:
        super().__init__(arrays)
        self.sources = {k: str(v) for k, v in sources.items()}


def _source(feeds: Mapping[str, Any], name: str) -> str:
    src = getattr(feeds, "sources", {}).get(name)
    return f" (from {src})" if src else ""


def read_feeds(path: str | os.PathLike[str]) -> FileFeeds:
    """Arrays keyed by input name from a ``.npz`` file (checked as :func:`load_npz` does).

    Raises:
        FeedError: naming the file.
    """
    p = Path(path)
    if p.suffix.lower() == ".npy" or _magic(p) == b"\x93NUMPY":
        raise FeedError(f"{p} holds one array; give a .npz keyed by input name")
    arrays = load_npz(p, FeedError)
    return FileFeeds(arrays, {k: p for k in arrays})


def read_array(path: str | os.PathLike[str], what: str = "input") -> np.ndarray:
    """One array from a ``.npy`` file (checked as :func:`load_npy` does).

    Raises:
        FeedError: naming the file.
    """
    p = Path(path)
    if zipfile.is_zipfile(p) if p.is_file() else False:
        raise FeedError(f"{p} is a .npz archive; give one array per {what} as a .npy file")
    return load_npy(p, FeedError, what=what)


# ---------------------------------------------------------------------- checked .npy / .npz reading

#: zlib cannot inflate one byte into more than about 1032 bytes: a deflated member that claims a
#: larger size than this many times its compressed size lies about it
_DEFLATE_MAX_RATIO = 1032


@dataclass(frozen=True)
class NpyHeader:
    """What a ``.npy`` header declares, and where the data starts."""

    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool
    offset: int

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= int(d)
        return n * self.dtype.itemsize


def _magic(p: Path) -> bytes:
    try:
        with open(p, "rb") as f:
            return f.read(6)
    except OSError:
        return b""


def _read_header(f: Any, where: str, error: type[Exception]) -> NpyHeader:
    """The header of the ``.npy`` stream ``f`` (positioned at its start); refuses object arrays
    (pickles) and headers that are not a plain array description."""
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"unsupported .npy format version {version}")
    except (ValueError, OSError, EOFError, SyntaxError, TypeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise error(f"cannot read {where}: not a valid .npy array ({reason})") from None
    dtype = np.dtype(dtype)
    if dtype.hasobject:
        raise error(
            f"{where} holds Python objects (pickled data), which graphopt does not load; "
            "save numeric arrays"
        )
    if any(int(d) < 0 for d in shape):
        raise error(f"cannot read {where}: negative dimension in shape {list(shape)}")
    return NpyHeader(tuple(int(d) for d in shape), dtype, bool(fortran), int(f.tell()))


def npy_header(path: str | os.PathLike[str], error: type[Exception] = FeedError) -> NpyHeader:
    """The header of a ``.npy`` file, checked against the file's real length (nothing else is
    read).

    Raises:
        ``error``: the file is missing, empty, not a .npy file, holds objects, or is shorter than
            its header says.
    """
    p = Path(path)
    try:
        size = p.stat().st_size
        if size == 0:
            raise error(f"{p} is empty")
        with open(p, "rb") as f:
            head = _read_header(f, str(p), error)
    except OSError as exc:
        raise error(f"cannot read {p}: {exc.strerror or exc}") from None
    have = size - head.offset
    if head.nbytes > have:
        raise error(
            f"{p} declares a {head.dtype} array of shape {list(head.shape)} "
            f"({head.nbytes:,} bytes) but holds {have:,} bytes of data (truncated or corrupt)"
        )
    return head


def load_npy(
    path: str | os.PathLike[str],
    error: type[Exception] = FeedError,
    *,
    mmap: bool = False,
    what: str = "array",
) -> np.ndarray:
    """One array from a ``.npy`` file, its header checked first (:func:`npy_header`): nothing is
    allocated for a size the file does not back. ``mmap``: map it read-only instead of reading.

    Raises:
        ``error``: naming the file.
    """
    p = Path(path)
    npy_header(p, error)
    try:
        arr = np.load(p, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise error(f"cannot read {what} from {p}: {exc}") from None
    if not isinstance(arr, np.ndarray):
        raise error(f"{p} is a .npz archive; give one array per {what} as a .npy file")
    return arr


def _zip_members(
    path: Path, error: type[Exception]
) -> tuple[zipfile.ZipFile, list[zipfile.ZipInfo]]:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise error(f"cannot read {path}: {exc.strerror or exc}") from None
    if size == 0:
        raise error(f"{path} is empty")
    try:
        z = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise error(f"cannot read {path}: not a .npz archive ({exc})") from None
    return z, z.infolist()


def _check_member(
    z: zipfile.ZipFile, info: zipfile.ZipInfo, where: str, error: type[Exception]
) -> NpyHeader:
    """The header of one ``.npz`` member, checked against the member's size, which is checked
    against its compressed size (what the archive really holds)."""
    if info.compress_type == zipfile.ZIP_STORED:
        if info.file_size != info.compress_size:
            raise error(f"cannot read {where}: stored member sizes disagree (corrupt archive)")
    elif info.compress_type == zipfile.ZIP_DEFLATED:
        if info.file_size > _DEFLATE_MAX_RATIO * info.compress_size + 1024:
            raise error(
                f"cannot read {where}: it claims {info.file_size:,} bytes from "
                f"{info.compress_size:,} compressed bytes, more than deflate can produce "
                "(corrupt or crafted archive)"
            )
    else:
        raise error(
            f"cannot read {where}: compression method {info.compress_type} (numpy writes stored "
            "or deflated members)"
        )
    try:
        with z.open(info) as f:
            head = _read_header(f, where, error)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
        raise error(f"cannot read {where}: {exc}") from None
    have = info.file_size - head.offset
    if head.nbytes > have:
        raise error(
            f"{where} declares a {head.dtype} array of shape {list(head.shape)} "
            f"({head.nbytes:,} bytes) but holds {max(have, 0):,} bytes (truncated or corrupt)"
        )
    return head


def npz_shapes(
    path: str | os.PathLike[str], error: type[Exception] = FeedError
) -> dict[str, tuple[int, ...]]:
    """The arrays of a ``.npz`` file by name, with their shapes, from the headers only (checked as
    :func:`load_npz` does)."""
    p = Path(path)
    z, infos = _zip_members(p, error)
    with z:
        return {
            i.filename[: -len(".npy")]: _check_member(z, i, f"{p} ({i.filename})", error).shape
            for i in infos
            if i.filename.endswith(".npy")
        }


def load_npz(path: str | os.PathLike[str], error: type[Exception] = FeedError) -> Feeds:
    """The arrays of a ``.npz`` file by name.

    Every member's header is checked before anything is read: the declared array must fit in the
    member, and the member's declared size must be one its compressed bytes can produce, so that
    a header or archive that lies about a size never makes graphopt allocate it. Object arrays
    (pickles) are refused; an archive without arrays is refused.

    Raises:
        ``error``: naming the file (and the member).
    """
    p = Path(path)
    z, infos = _zip_members(p, error)
    with z:
        members = [i for i in infos if i.filename.endswith(".npy")]
        if not members:
            raise error(f"{p} holds no arrays")
        for i in members:
            _check_member(z, i, f"{p} ({i.filename})", error)
    try:
        with np.load(p, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise error(f"cannot read {p}: {exc}") from None


#: what ``--feeds`` and the jobs' ``feeds=`` take: one feed dict, an iterable of them, or a path
#: in the ``--calib`` formats (``.npz``, ``.npy``, a folder of them)
FeedSource = str | os.PathLike[str] | Mapping[str, Any] | Iterable[Mapping[str, Any]]

#: at most this many feed dicts are verified on (a longer source is cut)
MAX_FEEDS = 16


def _is_tensor_value(v: Any) -> bool:
    return isinstance(v, (np.ndarray, np.generic, int, float, bool))


def _check_feed(model: Model, feed: Mapping[str, Any], what: str) -> dict[str, Any]:
    """:func:`check_feeds` for the tensor values of one feed dict; sequence (list), map (dict)
    and optional (None) values of non-tensor inputs pass as they are."""
    tensors = {k: v for k, v in feed.items() if _is_tensor_value(v)}
    others = {k: v for k, v in feed.items() if k not in tensors}
    specs = input_specs(model)
    defaults = getattr(model, "input_defaults", {}) or {}
    unknown = [k for k in others if k not in specs]
    missing = [k for k in specs if k not in feed and k not in defaults]
    if unknown or missing:
        check_feeds({k: v for k, v in specs.items() if k not in defaults}, feed, what)
    return {**check_feeds(specs, tensors, what, complete=False), **others}


def _calib_batches(
    source: Path, specs: Mapping[str, InputSpec], limit: int
) -> list[dict[str, Any]]:
    """The batches (of 8 samples at most) of one ``--calib``-format source; CalibrationError or
    IndexError (a rank-0 array: no sample axis) when it is not in that format."""
    out: list[dict[str, Any]] = []
    for batch in CalibrationReader(source, specs, batch_size=8):
        out.append(dict(batch))
        if len(out) >= limit:
            break
    return out


def feed_list(
    source: FeedSource | None,
    model: Model,
    what: str = "--feeds",
    limit: int = MAX_FEEDS,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
) -> list[dict[str, Any]] | None:
    """The feed dicts a verifying job runs on, checked against ``model``'s inputs.

    Args:
        source: None (the job generates inputs), one feed dict ``{input name: value}``, an
            iterable of them (each exactly the model's inputs), or a path in the ``--calib``
            formats, samples on axis 0: a ``.npz``, a folder of them, a folder of ``.npy`` files
            named after the inputs, or one ``.npy``. Each file gives one feed per batch of at
            most 8 of its samples (a (20, 6) array for an [N, 6] input: (8, 6), (8, 6), (4, 6);
            one feed of one sample per file of one sample); files are never batched together.
            A ``.npz`` whose arrays have no common sample axis but fit the model's inputs as
            they are (a scalar input, a fixed [2, N, 128] state beside an [N, 512] input) is
            one feed.
        model: the model the feeds are for.
        what: how the user gave them (for messages).
        limit: keep at most this many.
        input_shapes: the ``--input-shape`` dims the job fixes: a fixed leading dim limits the
            batch (1: one sample per feed).

    Raises:
        FeedError: a source that cannot be read or does not fit the model's inputs.
    """
    if source is None:
        return None
    if isinstance(source, Mapping):
        return [_check_feed(model, source, what)]
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        if not p.exists():
            raise FeedError(f"{what} {p} does not exist")
        specs = input_specs(model)
        for name, dims in (input_shapes or {}).items():
            if name in specs:
                spec = specs[name]
                specs[name] = InputSpec(name, tuple(int(d) for d in dims), spec.dtype)
        files = [p] if p.is_file() and p.suffix == ".npz" else sorted(p.glob("*.npz"))
        if not files:  # .npy file or folder
            try:
                return _calib_batches(p, specs, limit)
            except CalibrationError as exc:
                raise FeedError(f"{what}: {exc}") from None
            except IndexError:
                raise FeedError(
                    f"{what} {p}: a rank-0 array has no sample axis; give a .npz"
                ) from None
        out: list[dict[str, Any]] = []
        for f in files:
            try:
                out += _calib_batches(f, specs, limit - len(out))
            except (CalibrationError, IndexError) as exc:
                try:  # no common sample axis: the file is one feed as it is
                    out.append(check_feeds(model, read_feeds(f), what))
                except FeedError:
                    if isinstance(exc, CalibrationError):
                        raise FeedError(f"{what}: {exc}") from None
                    raise
            if len(out) >= limit:
                break
        return out[:limit]
    try:
        items = iter(source)
    except TypeError:
        raise FeedError(
            f"{what} must be a path, a dict of arrays or an iterable of them, not "
            f"{type(source).__name__}"
        ) from None
    out = []
    for k, feed in enumerate(items):
        if not isinstance(feed, Mapping):
            raise FeedError(f"{what} item {k} is a {type(feed).__name__}, not a dict of arrays")
        out.append(_check_feed(model, feed, f"{what} item {k}"))
        if len(out) >= limit:
            break
    if not out:
        raise FeedError(f"{what} holds no feeds")
    return out


# ---------------------------------------------------------------------- random feeds


#: random test inputs larger than this are refused (a declared dim over 2^31 must not exhaust
#: memory)
MAX_FEED_BYTES = 2**31


#: the concrete values a graph input's dynamic dims take in generated inputs, one pair per draw:
#: (value of a dynamic leading dim, such as a batch, value of any other dynamic dim, such as a
#: sequence length). Verifying commands run the model once per draw, so that a rewrite that holds
#: at one size only is caught; a dim name shared by several inputs takes one value per draw.
DIM_DRAWS: tuple[tuple[int, int], ...] = ((1, 7), (3, 64))


def _is_fixed(d: object) -> bool:
    return bool(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0)


def dynamic_dims(model: Model) -> dict[str, bool]:
    """The dynamic dims of the model's graph inputs (initializer-backed inputs excluded): dim
    name -> whether it is a leading dim (where it first appears). Unnamed dynamic dims are
    keyed ``""`` (leading) and ``"?"`` (other)."""
    defaults = getattr(model, "input_defaults", {}) or {}
    out: dict[str, bool] = {}
    for t in model.graph.inputs:
        if t.name in defaults or t.shape is None:
            continue
        for i, d in enumerate(t.shape):
            if not _is_fixed(d):
                out.setdefault(_dim_key(d, i), i == 0)
    return out


def _dim_key(d: object, axis: int) -> str:
    if isinstance(d, str) and d:
        return d
    return "" if axis == 0 else "?"


def dim_draws(model: Model) -> list[dict[str, int]]:
    """The values of the model's dynamic input dims in each draw (:data:`DIM_DRAWS`): a list of
    ``{dim name: value}``, one entry (empty) when every input dim is fixed. A dim that the model
    ties to others (:attr:`Model.dim_relations`, e.g. ``total_sequence = past_sequence +
    sequence``) takes the value of its expression."""
    dims = dynamic_dims(model)
    if not dims:
        return [{}]
    draws = [
        {k: lead if leading else other for k, leading in dims.items()} for lead, other in DIM_DRAWS
    ]
    relations = {k: v for k, v in getattr(model, "dim_relations", {}).items() if k in dims}
    if relations:
        import sympy

        for values in draws:
            for name, text in relations.items():
                try:
                    syms = {k: sympy.Symbol(k) for k in values}
                    v = sympy.sympify(text, locals=syms).subs(
                        {syms[k]: x for k, x in values.items()}
                    )
                    if v.is_Integer and int(v) > 0:
                        values[name] = int(v)
                except Exception:  # noqa: BLE001 - keep the plain draw
                    continue
    return draws


def drawn_shapes(model: Model, draw: int = 0) -> dict[str, list[int]]:
    """The concrete shape of every graph input in draw ``draw`` (inputs of unknown rank left
    out)."""
    values = dim_draws(model)[draw % len(dim_draws(model))]
    return {
        t.name: _concrete_dims(t.name, t.shape, values)
        for t in model.graph.inputs
        if t.shape is not None
    }


def _concrete_dims(
    name: str, shape: Sequence[object] | None, values: Mapping[str, int]
) -> list[int]:
    if shape is None:
        raise ShapeError(
            f"input '{name}' has no declared shape; give --input-shape {name}:D1xD2x..."
        )
    lead, other = DIM_DRAWS[0]
    dims = []
    for i, d in enumerate(shape):
        if _is_fixed(d):
            dims.append(int(d))  # type: ignore[call-overload]
        else:
            dims.append(values.get(_dim_key(d, i), lead if i == 0 else other))
    return dims


#: inputs of these ops that carry sizes, shapes, axes, counts or bounds (op -> input indices):
#: random values make the model fail or take another path, so a graph input that reaches one of
#: them needs its real values (an initializer default, or ``--feeds``)
SHAPE_INPUTS: dict[str, frozenset[int]] = {
    op: frozenset(idx)
    for op, idx in {
        "Reshape": (1,),
        "Expand": (1,),
        "ConstantOfShape": (0,),
        "Tile": (1,),
        "Resize": (1, 2, 3),
        "Upsample": (1,),
        "Slice": (1, 2, 3, 4),
        "Split": (1,),
        "SplitToSequence": (1,),
        "OneHot": (1,),
        "TopK": (1,),
        "Range": (0, 1, 2),
        "Pad": (1, 3),
        "NonMaxSuppression": (2, 3, 4),
        "Squeeze": (1,),
        "Unsqueeze": (1,),
        "CenterCropPad": (1, 2),
        "Col2Im": (1, 2),
        "AffineGrid": (1,),
        "Trilu": (1,),
        "MaxUnpool": (2,),
        "ReverseSequence": (1,),
        "DFT": (1, 2),
        "STFT": (1, 3),
        "MelWeightMatrix": (0, 1, 2, 3, 4),
        "HannWindow": (0,),
        "HammingWindow": (0,),
        "BlackmanWindow": (0,),
        "SequenceAt": (1,),
        "SequenceErase": (1,),
        "SequenceInsert": (2,),
        "ReduceSum": (1,),
        "ReduceMean": (1,),
        "ReduceMax": (1,),
        "ReduceMin": (1,),
        "ReduceProd": (1,),
        "ReduceL1": (1,),
        "ReduceL2": (1,),
        "ReduceLogSum": (1,),
        "ReduceLogSumExp": (1,),
        "ReduceSumSquare": (1,),
    }.items()
}
#: inputs that must not be zero (integer division)
NONZERO_INPUTS: dict[str, frozenset[int]] = {"Div": frozenset({1}), "Mod": frozenset({1})}
#: inputs that must lie in [0, 1) (a probability)
RATIO_INPUTS: dict[str, frozenset[int]] = {"Dropout": frozenset({1})}
#: ops a value passes through unchanged in meaning (a shape cast to int64, concatenated pieces)
_PASS_THROUGH = {"Cast", "Identity", "Concat", "Squeeze", "Unsqueeze", "Reshape", "CastLike"}


def input_roles(model: Model) -> dict[str, tuple[str, str]]:
    """What each graph input is used for, where random values would not do: input name ->
    (role, where), role ``shape`` (sizes, axes, bounds: needs real values), ``nonzero`` (a
    divisor) or ``ratio`` (a probability); ``where`` names the op and input index. Uses are
    followed through Cast/Identity/Concat/Squeeze/Unsqueeze/Reshape and into subgraphs."""
    readers: dict[str, list[tuple[str, int, list[str]]]] = {}
    for _, node in model.walk_nodes():
        for i, t in enumerate(node.inputs):
            if t is not None and t.name:
                readers.setdefault(t.name, []).append(
                    (node.op, i, [o.name for o in node.outputs if o is not None])
                )
    rank = {"shape": 0, "ratio": 1, "nonzero": 2}
    roles: dict[str, tuple[str, str]] = {}
    for inp in model.graph.inputs:
        seen: set[str] = set()
        stack = [inp.name]
        while stack:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            for op, i, outs in readers.get(name, []):
                role = None
                if i in SHAPE_INPUTS.get(op, ()):
                    role = "shape"
                elif i in RATIO_INPUTS.get(op, ()):
                    role = "ratio"
                elif i in NONZERO_INPUTS.get(op, ()):
                    role = "nonzero"
                elif op in _PASS_THROUGH and (op != "Reshape" or i == 0):
                    stack.extend(outs)
                if role is not None:
                    old = roles.get(inp.name)
                    if old is None or rank[role] < rank[old[0]]:
                        roles[inp.name] = (role, f"input {i} of {op}")
    return roles


def _np_dtype(dtype: Any) -> np.dtype:
    """A graphsurgeon dtype as numpy's (ONNX enums of the types numpy lacks: ml_dtypes)."""
    if dtype is None:
        return np.dtype(np.float32)
    if isinstance(dtype, (int, np.integer)):
        import onnx.helper  # noqa: PLC0415 - only for the types graphsurgeon leaves as enums

        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(int(dtype)))
    return np.dtype(dtype)


def random_feeds(
    model: Model, seed: int = 0, shapes: Mapping[str, Sequence[int]] | None = None, draw: int = 0
) -> Feeds:
    """Seeded inputs for every graph input that the model can run on.

    Dynamic dims take the values of draw ``draw`` of :func:`dim_draws` (by default a leading
    dynamic dim is 1 and any other 7), unless ``shapes`` gives the input's shape.

    Floats ~ N(0,1), integers 0 (an index in range), bools False, strings empty; an input with a
    default (an initializer the file also lists as an input, IR < 4) gets its default; divisors
    are 1 and probabilities 0.5 (:func:`input_roles`).

    Raises:
        FeedError: an input carries sizes, shapes or bounds (:data:`SHAPE_INPUTS`) and has no
            default, or is not a tensor (sequence, map, optional): random values cannot stand
            in for it, the command needs ``--feeds``.
        ShapeError: an input of unknown rank, or an input too large to build.
    """
    rng = np.random.default_rng(seed)
    defaults = getattr(model, "input_defaults", {}) or {}
    value_types = getattr(model, "value_types", {}) or {}
    roles = input_roles(model)
    feeds: Feeds = {}
    draws = dim_draws(model)
    values = draws[draw % len(draws)]
    for t in model.graph.inputs:
        if t.name in defaults:
            import onnx.numpy_helper  # noqa: PLC0415

            feeds[t.name] = onnx.numpy_helper.to_array(defaults[t.name])
            continue
        if t.name in value_types:
            raise FeedError(
                f"input '{t.name}' is not a tensor (a sequence, map or optional value): random "
                f"test inputs cannot stand in for it; give its values with --feeds DATA (.npz)"
            )
        role, where = roles.get(t.name, ("", ""))
        if role == "shape":
            raise FeedError(
                f"input '{t.name}' gives sizes, shapes or bounds ({where}): random test inputs "
                f"would not run the model as it is used; give representative inputs with "
                f"--feeds DATA (.npz keyed by input name)"
            )
        dims = (
            list(shapes[t.name])
            if shapes and t.name in shapes
            else _concrete_dims(t.name, t.shape, values)
        )
        dtype = _np_dtype(t.dtype)
        nbytes = int(np.prod(dims, dtype=object)) * dtype.itemsize if dims else dtype.itemsize
        if nbytes > MAX_FEED_BYTES:
            raise ShapeError(
                f"input '{t.name}' of shape {dims} is too large to build a test input "
                f"({nbytes / 2**30:.3g} GiB); fix smaller dims with --input-shape {t.name}:..."
            )
        if dtype.kind in "OSU":
            feeds[t.name] = np.full(dims, "", dtype=object)
        elif role == "ratio":
            feeds[t.name] = np.full(dims, 0.5, dtype=dtype)
        elif role == "nonzero":
            feeds[t.name] = np.ones(dims, dtype=dtype)
        elif dtype.kind == "f" or dtype.name.startswith(("bfloat16", "float8", "float4")):
            feeds[t.name] = rng.standard_normal(dims).astype(dtype)
        else:
            feeds[t.name] = np.zeros(dims, dtype=dtype)
    return feeds
