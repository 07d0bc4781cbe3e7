"""The tuning database: which schedule template and parameters won for a kernel on a target.

A JSON file of records keyed by (kernel signature, target, CPU features):

* **kernel signature** -- TVM's structural hash of the fused PrimFunc (as Relax's fusion emits it,
  before scheduling) without its ``global_symbol``: variable, buffer and block names do not take
  part, so the same computation on the same shapes has the same signature in any model (two
  models that share a 3x3 conv share its record);
* **target** -- the canonical LLVM target (``mtriple``, ``mcpu``, ``mattr``, ``num-cores``);
* **CPU features** -- for this host, the vector and dot-product flags of ``/proc/cpuinfo``
  (``avx2 fma avx512f avx512_vnni ...``); for a board measured over RPC, ``rpc:<device key>``.

A record holds the template, its parameters (``null``: the template's hand rule), the measured
times of the winner and of the hand rule (and the hand rule's first timing, ``baseline_ms``, which
the share of a kernel in a model is computed from, so that a later run takes the same decisions),
the number of candidates measured, and ``kind``:
``tuned`` (searched) or ``baseline`` (only the hand rule was timed: the kernel was under the skip
threshold). Applying a record is deterministic (template + parameters), so the file is small and
can be shared between machines of the same kind. Writes go through :mod:`graphopt.core.output`
(temporary file, then rename) after merging with what is on disk, so two tuning runs on one file
keep each other's records.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import platform
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from graphopt.core.errors import GraphoptError
from graphopt.core.output import atomic_write_text

logger = logging.getLogger(__name__)

FORMAT = "graphopt-tvm-tuning/1"
#: flags of /proc/cpuinfo that change which schedule wins
_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx_vnni",
    "amx_int8",
    "asimd",
    "asimddp",
    "sve",
    "i8mm",
)


class TuningDBError(GraphoptError):
    """The tuning database file cannot be read (not JSON, or another format)."""


def kernel_signature(func: Any) -> str:
    """Structural hash of a PrimFunc without its symbol name, as 16 hex digits."""
    import tvm_ffi  # noqa: PLC0415

    f = func.without_attr("global_symbol") if func.attrs and "global_symbol" in func.attrs else func
    return f"{int(tvm_ffi.structural_hash(f, map_free_vars=True)) & (2**64 - 1):016x}"


def param_buffers(func: Any) -> list[tuple[tuple[int, ...], str]]:
    """(shape, dtype) of each parameter of a static-shaped PrimFunc."""
    out = []
    bmap = getattr(func, "buffer_map", None)
    for prm in func.params:
        buf = bmap[prm] if bmap is not None else prm
        out.append((tuple(int(d) for d in buf.shape), str(buf.dtype)))
    return out


def describe_kernel(func: Any, name: str = "") -> str:
    """A short human description: the name and the parameter shapes."""
    shapes = ["x".join(str(d) for d in shp) or "scalar" for shp, _dt in param_buffers(func)]
    return f"{name} [{', '.join(shapes)}]" if name else f"[{', '.join(shapes)}]"


def host_cpu_features() -> str:
    """``<machine>:<flags>`` of this host (the flags that matter for schedules)."""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags |= set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return f"{platform.machine()}:{' '.join(f for f in _FLAGS if f in flags)}"


def target_string(target: dict[str, Any]) -> str:
    """A canonical string of a TVM target dict (the keys that change code generation)."""
    parts = [str(target.get("kind", "llvm"))]
    for k in ("mtriple", "mcpu", "mattr", "num-cores", "arch"):
        v = target.get(k)
        if v is None:
            continue
        if isinstance(v, (list, tuple)):
            v = ",".join(sorted(str(x) for x in v))
        parts.append(f"-{k}={v}")
    return " ".join(parts)


@dataclass
class TuningRecord:
    """The best schedule found for one kernel on one target."""

    signature: str
    target: str
    cpu: str
    template: str
    params: dict[str, Any] | None
    ms: float | None
    hand_ms: float | None
    trials: int
    kind: str = "tuned"  # tuned | baseline
    desc: str = ""
    #: the hand rule's first timing (never updated: the skip decisions depend on it, so they are
    #: the same in every run)
    baseline_ms: float | None = None
    measured_at: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return record_key(self.signature, self.target, self.cpu)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TuningRecord:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


def record_key(signature: str, target: str, cpu: str) -> str:
    return hashlib.sha256(f"{signature}|{target}|{cpu}".encode()).hexdigest()[:24]


class TuningDB:
    """A tuning database in memory, optionally backed by a JSON file (``path``)."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.records: dict[str, TuningRecord] = {}
        if self.path is not None and self.path.exists():
            self.records = _read(self.path)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[TuningRecord]:
        return iter(self.records.values())

    def get(self, signature: str, target: str, cpu: str) -> TuningRecord | None:
        return self.records.get(record_key(signature, target, cpu))

    def put(self, rec: TuningRecord) -> None:
        if not rec.measured_at:
            rec.measured_at = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        self.records[rec.key] = rec

    def save(self) -> None:
        """Merge with the file as it is now on disk (records of other runs kept; a tuned record
        beats a baseline one, else this run's wins) and write it atomically."""
        if self.path is None:
            return
        merged = _read(self.path) if self.path.exists() else {}
        for k, rec in self.records.items():
            old = merged.get(k)
            if old is not None and old.kind == "tuned" and rec.kind == "baseline":
                continue
            merged[k] = rec
        self.records = merged
        doc = {
            "format": FORMAT,
            "records": [r.to_json() for r in sorted(merged.values(), key=lambda r: r.key)],
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps(doc, indent=1) + "\n")

    def chooser(
        self, target: str, cpu: str
    ) -> Callable[[Any], tuple[str, dict[str, Any] | None] | None]:
        """``choose(func)`` for :class:`~graphopt.algorithms.tvm.schedules.ApplyCPUSchedules`:
        the recorded (template, params) of a tuned kernel, None otherwise (hand rules)."""

        def choose(func: Any) -> tuple[str, dict[str, Any] | None] | None:
            rec = self.get(kernel_signature(func), target, cpu)
            if rec is None or rec.kind != "tuned":
                return None
            return rec.template, rec.params

        return choose


def _read(path: Path) -> dict[str, TuningRecord]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TuningDBError(f"cannot read the tuning database {path}: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise TuningDBError(
            f"{path} is not a graphopt tuning database (expected format '{FORMAT}')"
        )
    out: dict[str, TuningRecord] = {}
    try:
        for d in doc.get("records", []):
            rec = TuningRecord.from_json(d)
            out[rec.key] = rec
    except (TypeError, AttributeError) as exc:
        raise TuningDBError(f"{path}: malformed record ({exc})") from None
    return out


def measurement_cpu(target_name: str, rpc_key: str | None) -> str:
    """The CPU-features part of a record's key for where the candidates are measured: this host's
    flags (llvm, local), ``rpc:<key>`` for boards behind a tracker, ``qemu-aarch64`` for the
    emulated AArch64 servers of the tests (their timings mean nothing)."""
    if rpc_key:
        return f"rpc:{rpc_key}"
    if target_name == "aarch64":
        return "qemu-aarch64"
    return host_cpu_features()
