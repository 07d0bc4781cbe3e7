"""Model inputs: seeded random feeds for a model's inputs, and calibration data read for them and
streamed in batches.

Random feeds (:func:`random_feeds`): floats ~ N(0, 1), integers 0, bools False, for every graph
input; a dynamic leading dim is taken as a batch of 1, other dynamic dims must be fixed.

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
    return arr


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
        try:
            return np.load(f, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise CalibrationError(f"cannot read {f}: {exc}") from None

    @staticmethod
    def _npz(f: Path) -> Iterator[tuple[str, Feeds]]:
        try:
            with np.load(f, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
            raise CalibrationError(f"cannot read {f}: {exc}") from None
        yield f" in {f.name}", data

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
        counts = {k: v.shape[0] for k, v in data.items()}
        if len(set(counts.values())) > 1:
            raise CalibrationError(
                f"calibration data{where} gives different sample counts per input: {counts}"
            )
        n = next(iter(counts.values()), 0)
        for i in range(0, n, self.batch_size):
            yield {k: v[i : i + self.batch_size] for k, v in data.items()}

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
                if len(pending) > 1
                else np.ascontiguousarray(pending[0][k])
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
                chunk = {k: v[:room] for k, v in chunk.items()}
            n = next(iter(chunk.values())).shape[0] if chunk else 0
            if n == 0:
                continue
            if pending and any(pending[0][k].shape[1:] != v.shape[1:] for k, v in chunk.items()):
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
                    with np.load(p, allow_pickle=False) as z:
                        name = next((k for k in self.specs if k in z.files), None)
                        if name is None:
                            return None
                        n = int(z[name].shape[0])
                else:
                    n = int(np.load(p, mmap_mode="r").shape[0])
            except (ValueError, OSError, IndexError, EOFError, zipfile.BadZipFile):
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
    if unknown:
        raise FeedError(
            f"{what} names unknown model input(s) {', '.join(map(repr, unknown))}; "
            f"the model's inputs are {', '.join(map(repr, specs)) or 'none'}"
        )
    if complete:
        missing = [k for k in specs if k not in feeds]
        if missing:
            raise FeedError(
                f"{what} gives no array for model input(s) {', '.join(map(repr, missing))}"
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
                f"{what} '{name}' has shape {list(arr.shape)}, but the model expects "
                f"{_fmt(dims)}{anysize}"
            )
        if arr.dtype != spec.dtype:
            same_kind = (arr.dtype.kind == "f" and spec.dtype.kind == "f") or (
                arr.dtype.kind in "iu" and spec.dtype.kind in "iu"
            )
            if not same_kind:
                raise FeedError(
                    f"{what} '{name}' has dtype {arr.dtype}, but the model expects {spec.dtype}"
                )
            arr = arr.astype(spec.dtype)
        out[name] = arr
    return out


def read_feeds(path: str | os.PathLike[str]) -> Feeds:
    """Arrays keyed by input name from a ``.npz`` file. Raises :class:`FeedError`."""
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise FeedError(f"cannot read feeds from {path}: {exc}") from None
    if isinstance(z, np.ndarray):
        raise FeedError(f"{path} holds one array; give a .npz keyed by input name")
    try:
        with z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise FeedError(f"cannot read feeds from {path}: {exc}") from None


def read_array(path: str | os.PathLike[str], what: str = "input") -> np.ndarray:
    """One array from a ``.npy`` file. Raises :class:`FeedError`."""
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise FeedError(f"cannot read {what} from {path}: {exc}") from None
    if not isinstance(arr, np.ndarray):
        arr.close()
        raise FeedError(f"{path} is a .npz archive; give one array per {what} as a .npy file")
    return arr


# ---------------------------------------------------------------------- random feeds


#: random test inputs larger than this are refused (a declared dim over 2^31 must not exhaust
#: memory)
MAX_FEED_BYTES = 2**31


def _concrete_dims(
    name: str, shape: Sequence[object] | None, fallback: Mapping[str, int]
) -> list[int]:
    if shape is None:
        raise ShapeError(
            f"input '{name}' has no declared shape; give --input-shape {name}:D1xD2x..."
        )
    dims = []
    for i, d in enumerate(shape):
        if isinstance(d, (int, np.integer)) and d >= 0:
            dims.append(int(d))
        elif isinstance(d, str) and d in fallback:
            dims.append(fallback[d])
        elif i == 0:
            dims.append(1)  # a dynamic leading dim is a batch dim: use 1
        else:
            raise ShapeError(
                f"input '{name}' has dynamic dims {list(shape)}; fix them with "
                f"--input-shape {name}:"
                + "x".join(str(x) if isinstance(x, int) and x > 0 else "N" for x in shape)
            )
    return dims


def random_feeds(
    model: Model, seed: int = 0, shapes: Mapping[str, Sequence[int]] | None = None
) -> Feeds:
    """Seeded random inputs for every graph input: floats ~ N(0,1), integers 0, bools False."""
    rng = np.random.default_rng(seed)
    feeds: Feeds = {}
    for t in model.graph.inputs:
        dims = (
            list(shapes[t.name])
            if shapes and t.name in shapes
            else _concrete_dims(t.name, t.shape, {})
        )
        dtype = np.dtype(t.dtype) if t.dtype is not None else np.dtype(np.float32)
        nbytes = int(np.prod(dims, dtype=object)) * dtype.itemsize if dims else dtype.itemsize
        if nbytes > MAX_FEED_BYTES:
            raise ShapeError(
                f"input '{t.name}' of shape {dims} is too large to build a test input "
                f"({nbytes / 2**30:.3g} GiB); fix smaller dims with --input-shape {t.name}:..."
            )
        if np.issubdtype(dtype, np.floating):
            feeds[t.name] = rng.standard_normal(dims).astype(dtype)
        elif dtype == np.bool_:
            feeds[t.name] = np.zeros(dims, dtype=dtype)
        else:
            feeds[t.name] = np.zeros(dims, dtype=dtype)
    return feeds
