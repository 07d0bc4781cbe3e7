"""The tune job: measure schedules for a model's kernels into a tuning database.

``graphopt tune MODEL --target llvm|aarch64 [--trials N] [--db FILE] [--rpc HOST:PORT --key
NAME]``: graphopt's passes and Relax's import and fusion as ``graphopt compile`` runs them, then the
measured search of :mod:`graphopt.algorithms.tvm.search` for every kernel the database lacks
(:func:`graphopt.jobs.compile.tune_module`). ``graphopt compile --db FILE`` then builds with the
recorded schedules and measures nothing for the kernels already there.

TVM is imported lazily: ``import graphopt`` never needs it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from graphopt.algorithms.tvm.emit import import_relax, parse_target, require_tvm
from graphopt.algorithms.tvm.search import Progress
from graphopt.algorithms.tvm.tuning_db import TuningDB
from graphopt.core.errors import OptionError
from graphopt.jobs.common import ModelLike, as_model, jsonable, output_paths, source_path
from graphopt.jobs.compile import TuningSummary, prepare_model, schedule_spec, tune_module

__all__ = ["TuneResult", "default_db_path", "tune"]


def default_db_path() -> Path:
    """``$GRAPHOPT_TUNING_DB``, else ``$GRAPHOPT_CACHE/tvm-tuning.json``, else
    ``~/.cache/graphopt/tvm-tuning.json``."""
    env = os.environ.get("GRAPHOPT_TUNING_DB")
    if env:
        return Path(env)
    cache = os.environ.get("GRAPHOPT_CACHE")
    base = Path(cache) if cache else Path.home() / ".cache" / "graphopt"
    return base / "tvm-tuning.json"


@dataclass
class TuneResult:
    """What :func:`tune` did."""

    input: str | None
    target: str
    db: str
    summary: TuningSummary
    seconds: float

    def to_json(self) -> dict[str, Any]:
        """``graphopt tune --json``: ``input``, ``target``, ``db``, ``measurements``,
        ``kernels``, ``status`` (status -> kernels), ``per_kernel`` and ``seconds``."""
        out = {"input": self.input, **self.summary.to_json()}
        out["target"] = self.target
        out["target_key"] = self.summary.target
        out["db"] = self.db
        out["seconds"] = round(self.seconds, 2)
        return jsonable(out)  # type: ignore[no-any-return]


def tune(
    model: ModelLike,
    target: str = "llvm",
    *,
    db: str | os.PathLike[str] | None = None,
    trials: int = 16,
    rpc: str | None = None,
    key: str | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    min_share: float = 0.01,
    servers: int = 1,
    retune: bool = False,
    progress: Progress | None = None,
) -> TuneResult:
    """Fill the tuning database ``db`` for ``model`` on ``target``.

    Args:
        model: a :class:`~graphopt.core.model.Model` (not changed) or an ONNX path (never written).
        target: ``llvm`` (this host) or ``aarch64``.
        db: the database file (created if missing; default :func:`default_db_path`).
        trials: candidates measured per kernel (the hand rule included).
        rpc: ``HOST:PORT`` of a TVM RPC tracker; the candidates are timed on the servers
            registered under ``key`` (several servers: in parallel). Without it a local tracker
            is started (this host for llvm, qemu-aarch64 servers for aarch64: emulated timings,
            for testing the path only).
        key: the device key of the RPC servers.
        input_shapes: fixed shapes for dynamic inputs.
        min_share: kernels under this share of the model keep their hand rule (not searched).
        servers: local servers to start (without ``rpc``).
        retune: search again the kernels that already have a tuned record.
        progress: ``(message, done, total)`` callback.

    Raises:
        OptionError: bad option values (trials < 1, share outside [0, 1), cuda target, ``rpc``
            without ``key``).
    """
    if trials < 1:
        raise OptionError(f"--trials must be at least 1, got {trials}")
    if not 0 <= min_share < 1:
        raise OptionError(f"--min-share must be in [0, 1), got {min_share}")
    if servers < 1:
        raise OptionError(f"--servers must be at least 1, got {servers}")
    spec = parse_target(target)
    db_path = Path(db) if db is not None else default_db_path()
    output_paths(model, db_path)
    src = source_path(model)
    m = as_model(model)
    require_tvm()
    t0 = time.perf_counter()
    prepared, info = prepare_model(m, input_shapes)
    mod = import_relax(prepared.to_onnx(), info["input_shapes"])
    summary = tune_module(
        mod,
        schedule_spec(spec, info["macs"]),
        TuningDB(db_path),
        fuse_pools=info["pool_groups"] > 0,
        trials=trials,
        rpc=rpc,
        key=key,
        min_share=min_share,
        local_servers=servers,
        progress=progress,
        retune=retune,
    )
    return TuneResult(src, spec.name, str(db_path), summary, time.perf_counter() - t0)
