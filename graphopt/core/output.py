"""The one way graphopt writes a file: atomically, beside the destination, never over an input.

Every file a job writes (model, external data, report, plot, plan JSON, npz, library, manifest)
goes through this module:

* :func:`check_outputs` refuses, before any work is done, an output path that resolves to an input
  (also through a symbolic or a hard link: ``st_dev``/``st_ino`` are compared), that exists and is
  not a regular file (folder, device node, FIFO, socket), or that is another output of the same
  run. The refusal is an :class:`~graphopt.core.errors.OutputPathError` (CLI exit 2).
* :func:`atomic_output` (a file object), :func:`atomic_path` (a temporary path, for writers that
  want a file name: ``np.savez``, ``savefig``, ``export_library``), :func:`atomic_write_bytes` and
  :func:`atomic_write_text` write a temporary file in the destination folder, ``fsync`` it and
  ``os.replace`` it over the destination. The temporary file is removed on any exception
  (``KeyboardInterrupt`` included); a reader sees the old file or the new one, never a part.
* :func:`staged_model_output` writes everything of one model (the ``.onnx`` file and its external
  data) into one temporary folder beside the destination and publishes it so that a reader never
  sees a model paired with another write's data: the data file's name is unique per write
  (``NAME.<12 hex>.data``), it is moved into place first (nothing refers to it yet), the model is
  renamed last (the atomic switch), and the data files of the model it replaced are removed after.
  Publishing holds an exclusive ``flock`` on the destination folder, so two processes writing the
  same output publish one after the other (the last complete write wins, and its data is the one
  left).

Temporary names start with ``.graphopt-<pid>-``: a run killed by SIGKILL (which nothing can catch)
leaves at most such a hidden entry, never a partial file under the output name, and the next write
into that folder removes the entries of processes that no longer exist.

Signals. :func:`graphopt.core.interrupt.on_signal` is the SIGINT/SIGTERM handler the command
line installs: it raises :class:`~graphopt.core.interrupt.Interrupted` (a ``KeyboardInterrupt``
carrying the signal number), so every ``with`` block above unwinds and removes its temporary. The
steps that must not be cut in two (creating a temporary and registering it for removal, the
renames that publish a result, the removal of a temporary) run as critical sections
(:func:`~graphopt.core.interrupt.critical`): a signal that arrives inside one is held and raised as
soon as it ends. Every temporary is registered while it exists
(:func:`~graphopt.core.interrupt.register_temporary`): a signal whose exception lands at the start
of a ``finally`` clause, before its critical section, skips that clean-up, and the command line's
signal handling removes what is still registered on its way out. A full disk or a missing
permission, while writing or publishing, is an :class:`~graphopt.core.errors.OutputPathError`
naming the destination and the system's reason.
:func:`~graphopt.core.interrupt.published_paths` lists what this process has published, so
that an interrupted or failed run can say which outputs are already complete.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import stat
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import onnx

from graphopt.core.errors import OutputPathError
from graphopt.core.interrupt import (
    critical,
    record_published,
    register_temporary,
    release_temporary,
)

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

#: prefix of every temporary file or folder this module creates beside a destination
TEMP_PREFIX = ".graphopt-"
#: models larger than this are not parsed to find the external data they replace
_OLD_MODEL_PARSE_LIMIT = 256 << 20


# ------------------------------------------------------------------------------------ checks


def _stat(p: Path) -> os.stat_result | None:
    """``os.stat`` following links; None when nothing (or a dangling link) is there."""
    try:
        return p.stat()
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno in (errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG):
            return None
        raise


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def check_output_path(path: PathLike, inputs: Iterable[PathLike | None] = ()) -> Path:
    """Check one output path (see :func:`check_outputs`); return it as a Path."""
    return check_outputs(inputs=inputs, outputs=[path])[0]


def check_outputs(
    inputs: Iterable[PathLike | None] = (), outputs: Iterable[PathLike | None] = ()
) -> list[Path]:
    """Refuse output paths that would overwrite an input, a non-regular file or each other.

    Call it once per run with every input file (the model and its external data files, feeds,
    calibration files) and every output path, before any work is done. ``None`` entries are
    skipped, so optional outputs can be passed as they are.

    Args:
        inputs: files the run reads.
        outputs: files the run will write.

    Returns:
        The outputs as Paths (``None`` entries dropped), in the given order.

    Raises:
        OutputPathError: an output resolves to an input (same path after following links, or the
            same file through a hard link), exists and is not a regular file (folder, device,
            FIFO, socket), or is the same file as another output of the run.
    """
    ins: list[tuple[Path, os.stat_result | None]] = []
    for p in inputs:
        if p is None:
            continue
        path = Path(p)
        try:
            ins.append((path.resolve(), _stat(path)))
        except OSError:
            continue
    outs: list[Path] = []
    seen: list[tuple[Path, Path, os.stat_result | None]] = []
    for p in outputs:
        if p is None:
            continue
        out = Path(p)
        try:
            st = _stat(out)
            resolved = out.resolve()
        except OSError as exc:
            raise OutputPathError(f"cannot write {out}: {exc.strerror or exc}") from None
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise OutputPathError(
                f"output {out} is {_kind(st.st_mode)}; give the path of a regular file"
            )
        for in_path, in_st in ins:
            same = resolved == in_path or (
                st is not None
                and in_st is not None
                and (st.st_dev, st.st_ino) == (in_st.st_dev, in_st.st_ino)
            )
            if same:
                raise OutputPathError(
                    f"output {out} is the input file {in_path}; choose another output path"
                )
        for other, other_resolved, other_st in seen:
            same = resolved == other_resolved or (
                st is not None
                and other_st is not None
                and (st.st_dev, st.st_ino) == (other_st.st_dev, other_st.st_ino)
            )
            if same:
                raise OutputPathError(
                    f"output {out} is also the output {other} of this run; give each output its "
                    "own path"
                )
        seen.append((out, resolved, st))
        outs.append(out)
    return outs


# ------------------------------------------------------------------------- temporary entries


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, under another user
        return True
    return True


_TEMP_RE = re.compile(rf"^{re.escape(TEMP_PREFIX)}(\d+)-")


def clean_stale_temporaries(folder: PathLike) -> int:
    """Remove the temporary entries of processes that no longer exist (a run killed by SIGKILL
    mid-write) from ``folder``; return how many were removed. Entries of live processes stay."""
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for e in entries:
        m = _TEMP_RE.match(e.name)
        if m is None or _pid_alive(int(m.group(1))):
            continue
        try:
            with critical():
                if e.is_dir(follow_symlinks=False):
                    shutil.rmtree(e.path, ignore_errors=True)
                else:
                    os.unlink(e.path)
            removed += 1
            logger.debug("removed %s, left by a process that no longer exists", e.path)
        except OSError:
            continue
    return removed


def _prepare_dest(path: PathLike) -> Path:
    """The destination as a Path: a regular file or nothing yet, its folder created."""
    dest = Path(path)
    st = _stat(dest)
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise OutputPathError(
            f"output {dest} is {_kind(st.st_mode)}; give the path of a regular file"
        )
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputPathError(f"cannot write {dest}: {exc.strerror or exc}") from None
    clean_stale_temporaries(dest.parent)
    return dest


def _temp_prefix() -> str:
    return f"{TEMP_PREFIX}{os.getpid()}-"


def _new_temp_file(folder: Path, suffix: str) -> Path:
    """Create an empty temporary file in ``folder`` with the permissions a new file gets (0666
    less the umask; ``tempfile.mkstemp`` would make it owner-only)."""
    for _ in range(100):
        p = folder / f"{_temp_prefix()}{uuid.uuid4().hex[:12]}{suffix}"
        try:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return p
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(folder))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_path(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink(p: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(p)


def _check_still_regular(dest: Path) -> None:
    """Refuse, right before the rename, a destination that became a non-regular file since the
    run's checks (a FIFO or device node created meanwhile is never replaced)."""
    st = _stat(dest)
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise OutputPathError(
            f"output {dest} is {_kind(st.st_mode)}; give the path of a regular file"
        )


@contextlib.contextmanager
def _write_errors(dest: Path) -> Iterator[None]:
    """Turn an OSError (no permission, disk full, ...) into the user's error, naming the path."""
    try:
        yield
    except OutputPathError:
        raise
    except OSError as exc:
        raise OutputPathError(f"cannot write {dest}: {exc.strerror or exc}") from None


# ----------------------------------------------------------------------------- single files


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """A temporary path in ``path``'s folder (same suffix) that replaces ``path`` when the block
    ends without an exception; removed on any exception (signals included).

    For writers that want a file name (``np.savez``, ``Figure.savefig``, ``export_library``)::

        with atomic_path(out) as tmp:
            np.savez(tmp, **arrays)

    Raises:
        OutputPathError: ``path`` is not a regular file, or it cannot be written (no permission,
            disk full: also when the writer in the block fails so).
    """
    dest = _prepare_dest(path)
    suffix = dest.suffix if 0 < len(dest.suffix) <= 16 else ""
    tmp: Path | None = None
    try:
        with _write_errors(dest):
            with critical():
                tmp = _new_temp_file(dest.parent, suffix)
                register_temporary(tmp)
            st = _stat(dest)
            if st is not None:  # a replaced file keeps its permissions
                os.chmod(tmp, stat.S_IMODE(st.st_mode))
        with _write_errors(dest):
            yield tmp
        with _write_errors(dest):
            if not tmp.is_file() or tmp.is_symlink():
                raise OutputPathError(f"nothing was written to {dest}")
            _fsync_path(tmp)
            with critical():
                _check_still_regular(dest)
                os.replace(tmp, dest)
                release_temporary(tmp)
                tmp = None
                record_published(dest)
            _fsync_dir(dest.parent)
    finally:
        if tmp is not None:
            with critical():
                _unlink(tmp)
                release_temporary(tmp)


@contextlib.contextmanager
def staged_files(*paths: PathLike) -> Iterator[list[Path]]:
    """Temporary paths, one per destination, in one temporary folder beside the first; when the
    block ends without an exception every destination is replaced in one critical section under
    the folder's lock, the first destination last (a compiled library and its manifest:
    ``with staged_files(lib, manifest) as (tmp_lib, tmp_manifest): ...``). The folder is removed
    in every case and carries the process id, so a killed run's folder is cleaned by the next
    write (:func:`clean_stale_temporaries`).

    Raises:
        OutputPathError: a destination is not a regular file, is not in the first one's folder,
            or cannot be written.
    """
    dests = [_prepare_dest(p) for p in paths]
    parent = dests[0].parent
    if len({d.name for d in dests}) != len(dests):
        raise OutputPathError(f"two outputs of one write share the name {dests[0].name}")
    for d in dests[1:]:
        if d.resolve().parent != parent.resolve():
            raise OutputPathError(f"{d} must sit beside {dests[0]}")
    clean_stale_temporaries(parent)
    folder: Path | None = None
    try:
        with _write_errors(dests[0]):
            with critical():
                folder = Path(tempfile.mkdtemp(prefix=_temp_prefix(), dir=parent))
                register_temporary(folder)
        staged = [folder / d.name for d in dests]  # same names: a library finds its manifest
        with _write_errors(dests[0]):
            yield staged
        with _write_errors(dests[0]):
            for d, t in zip(dests, staged, strict=True):
                if not t.is_file() or t.is_symlink():
                    raise OutputPathError(f"nothing was written to {d}")
                _fsync_path(t)
            with _folder_lock(parent):
                for d in dests:
                    _check_still_regular(d)
                with critical():  # every rename, or (a signal before the first) none
                    for d, t in list(zip(dests, staged, strict=True))[::-1]:
                        os.replace(t, d)
                        record_published(d)
            _fsync_dir(parent)
    finally:
        if folder is not None:
            with critical():
                shutil.rmtree(folder, ignore_errors=True)
                release_temporary(folder)


@contextlib.contextmanager
def atomic_output(
    path: PathLike, mode: str = "wb", encoding: str | None = None
) -> Iterator[IO[Any]]:
    """An open temporary file in ``path``'s folder; on success it is flushed, fsynced and renamed
    over ``path``, on any exception it is removed and ``path`` is left as it was.

    Args:
        path: the destination.
        mode: ``"wb"`` (default) or ``"w"`` (text; ``encoding`` defaults to UTF-8).

    Raises:
        OutputPathError: ``path`` is not a regular file, or it cannot be written.
    """
    if mode not in ("w", "wb", "wt"):
        raise ValueError(f"atomic_output writes a new file: mode must be 'wb' or 'w', not {mode!r}")
    if "b" not in mode and encoding is None:
        encoding = "utf-8"
    with atomic_path(path) as tmp:
        dest = Path(path)
        with _write_errors(dest), open(tmp, mode, encoding=encoding) as f:
            yield f
            f.flush()


def atomic_write_bytes(path: PathLike, data: bytes | bytearray | memoryview) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_output`); return the path."""
    with atomic_output(path, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_output`); return the path."""
    with atomic_output(path, "w", encoding=encoding) as f:
        f.write(text)
    return Path(path)


# ---------------------------------------------------------------------- model + external data


def data_file_pattern(model_name: str) -> re.Pattern[str]:
    """Names of the external data files graphopt writes for a model file named ``model_name``:
    ``NAME.<12 hex>.data`` (one per write) and the older fixed ``NAME.data``."""
    return re.compile(rf"^{re.escape(model_name)}(\.[0-9a-f]{{12}})?\.data$")


def unique_data_name(model_name: str) -> str:
    """A fresh external data file name for a model file named ``model_name``."""
    return f"{model_name}.{uuid.uuid4().hex[:12]}.data"


def external_locations(model_path: PathLike) -> set[str]:
    """The external data locations a model file refers to (empty when it cannot be read)."""
    p = Path(model_path)
    try:
        if not p.is_file() or p.stat().st_size > _OLD_MODEL_PARSE_LIMIT:
            return set()
        proto = onnx.load(str(p), load_external_data=False)
    except Exception:  # noqa: BLE001 - an unreadable old output refers to nothing we know
        return set()
    out: set[str] = set()
    for t in _initializers(proto.graph):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            for e in t.external_data:
                if e.key == "location" and "\0" not in e.value:  # NUL: the loader refuses it
                    out.add(e.value)
    return out


def external_files(model_path: PathLike) -> list[Path]:
    """The external data files a model file refers to, as paths beside it (checked as inputs of
    a run, so that no output lands on the input's weights)."""
    p = Path(model_path)
    return [p.parent / loc for loc in sorted(external_locations(p))]


def _initializers(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _initializers(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _initializers(g)
            elif attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``folder`` (best effort: filesystems without it go unlocked)."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            logger.debug("no flock on %s: publishing unlocked", folder)
        yield
    finally:
        os.close(fd)  # releases the lock


@dataclass
class ModelStaging:
    """The temporary folder one model write fills (see :func:`staged_model_output`).

    Attributes:
        dest: the final model path.
        folder: the temporary folder beside ``dest``.
        data_name: the external data file name this write uses (unique per write); the model's
            tensors refer to it by this name.
        protect: files that must survive the publication (the input model's own data).
    """

    dest: Path
    folder: Path
    data_name: str
    protect: set[Path] = field(default_factory=set)
    #: files published with the model (final path -> staged path), see :meth:`sidecar`
    sidecars: dict[Path, Path] = field(default_factory=dict)

    @property
    def model_path(self) -> Path:
        """Where to write the model file inside the temporary folder."""
        return self.folder / self.dest.name

    @property
    def data_path(self) -> Path:
        """Where to write the external data inside the temporary folder (optional)."""
        return self.folder / self.data_name

    def sidecar(self, dest: PathLike) -> Path:
        """Where to write a file that belongs to this model (``OUT.memplan.json``) inside the
        temporary folder; it is published together with the model, in the same critical
        section, so that an interrupted or failed run never leaves a new model beside an old
        sidecar (or the reverse). ``dest`` must be in the model's folder."""
        final = Path(dest)
        if final.resolve().parent != self.dest.resolve().parent:
            raise ValueError(f"a sidecar of {self.dest} must sit beside it, not at {final}")
        _check_still_regular(final)
        staged = self.folder / f"sidecar-{len(self.sidecars)}{final.suffix}"
        self.sidecars[final] = staged
        return staged

    def publish(self) -> None:
        """Move the staged files into place: sidecars and data first, model last, old data
        removed after."""
        parent = self.dest.parent
        has_data = self.data_path.is_file()
        _fsync_path(self.model_path)
        if has_data:
            _fsync_path(self.data_path)
        for staged in self.sidecars.values():
            _fsync_path(staged)
        pattern = data_file_pattern(self.dest.name)
        with _folder_lock(parent):
            _check_still_regular(self.dest)
            for final in self.sidecars:
                _check_still_regular(final)
            old = {loc for loc in external_locations(self.dest) if pattern.match(loc)}
            with critical():  # every rename, or (a signal before the first) none
                for final, staged in self.sidecars.items():
                    os.replace(staged, final)
                    record_published(final)
                if has_data:
                    os.replace(self.data_path, parent / self.data_name)
                try:
                    os.replace(self.model_path, self.dest)
                except BaseException:
                    if has_data:  # the data alone is of no use to anyone
                        _unlink(parent / self.data_name)
                    raise
                record_published(self.dest)
            _fsync_dir(parent)
            # the model now refers to this write's data only: the old data, and data files of
            # writes that were killed between their two renames, go
            # (a fixed-name NAME.data goes only when the replaced model used it)
            stale = set(old)
            fixed = f"{self.dest.name}.data"
            with contextlib.suppress(OSError):
                stale.update(
                    e.name for e in os.scandir(parent) if e.name != fixed and pattern.match(e.name)
                )
            stale.discard(self.data_name)
            protect = {p.resolve() for p in self.protect}
            with critical():
                for name in sorted(stale):
                    p = parent / name
                    if p.resolve() in protect:
                        continue
                    _unlink(p)
                    logger.debug("removed the replaced external data %s", p)


@contextlib.contextmanager
def staged_model_output(path: PathLike, protect: Iterable[PathLike] = ()) -> Iterator[ModelStaging]:
    """A temporary folder beside ``path`` for one model and its external data; published when the
    block ends without an exception (:meth:`ModelStaging.publish`), removed in every case.

    Write the model to ``staging.model_path`` and, if it has external data, the data to
    ``staging.data_path`` with the tensors' ``location`` set to ``staging.data_name``::

        with staged_model_output(dest, protect=model.external_files) as st:
            write_data(st.data_path); write_model(st.model_path, location=st.data_name)

    Args:
        path: the model's destination.
        protect: files that may match the destination's data file names but must not be removed
            (the input model's external data).

    Raises:
        OutputPathError: ``path`` is not a regular file, or it cannot be written.
    """
    dest = _prepare_dest(path)
    folder: Path | None = None
    try:
        with _write_errors(dest), critical():
            folder = Path(tempfile.mkdtemp(prefix=_temp_prefix(), dir=dest.parent))
            register_temporary(folder)
        staging = ModelStaging(
            dest, folder, unique_data_name(dest.name), {Path(p) for p in protect}
        )
        with _write_errors(dest):
            yield staging
        with _write_errors(dest):
            staging.publish()
    finally:
        if folder is not None:
            with critical():
                shutil.rmtree(folder, ignore_errors=True)
                release_temporary(folder)
