"""Pass infrastructure: :class:`Pass`, :class:`PassResult`, :class:`PassManager` and the registry
that :func:`register_pass` fills (the catalogue of built-in passes, which imports a pass module by
name, is :mod:`graphopt.passes`).

A pass transforms a :class:`~graphopt.core.model.Model` in place and returns a
:class:`PassResult` saying exactly whether it changed anything (the manager iterates to a fixed
point on that flag) and with counters in ``stats``. ``Pass.__call__`` wraps ``call`` with
``requires`` (pre-conditions) and ``ensures`` (post-conditions: the graph is still acyclic, every
node input is produced or is a graph input or constant); any exception escaping a pass becomes a
:class:`~graphopt.core.errors.PassError` that names the pass and the passes that ran before it.
User errors (:class:`~graphopt.core.errors.GraphoptError`) pass through.
"""

from __future__ import annotations

import abc
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from graphopt.core.errors import GraphoptError, PassError
from graphopt.core.graph import name_scope
from graphopt.core.model import Model

logger = logging.getLogger(__name__)

Stats = dict[str, Any]


@dataclass
class PassResult:
    """What a pass did: the model (transformed in place), whether anything changed, and counters."""

    model: Model
    modified: bool
    stats: Stats = field(default_factory=dict)


class Pass(abc.ABC):
    """A graph transformation or analysis. Subclasses set ``name`` and implement :meth:`call`."""

    name: ClassVar[str] = ""
    #: one line for ``graphopt list-passes``; defaults to the first docstring line
    summary: ClassVar[str] = ""
    #: True for passes that only compute numbers (cost, memory plan) and never change the model
    analysis: ClassVar[bool] = False
    #: True for passes that change numerics by design (quantize, prune, fp16); verify tolerances
    #: differ
    lossy: ClassVar[bool] = False

    def __call__(self, model: Model) -> PassResult:
        self.requires(model)
        with name_scope(model.graph):
            result = self.call(model)
        if not isinstance(result, PassResult):
            raise TypeError(
                f"{type(self).__name__}.call returned {type(result).__name__}, not PassResult"
            )
        if self.analysis and result.modified:
            raise RuntimeError("an analysis pass reported modified=True")
        if result.modified:
            self.ensures(result.model)
        return result

    @abc.abstractmethod
    def call(self, model: Model) -> PassResult:
        """Transform ``model`` in place and say what changed."""

    def requires(self, model: Model) -> None:  # noqa: B027 - optional hook
        """Pre-conditions; raise to refuse. Default: none."""

    def ensures(self, model: Model) -> None:
        """Post-conditions checked after a modifying run: the graph is well formed."""
        model.check_well_formed()

    @classmethod
    def describe(cls) -> str:
        if cls.summary:
            return cls.summary
        doc = (cls.__doc__ or "").strip().splitlines()
        return doc[0] if doc else ""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


_REGISTRY: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available by its ``name`` to the CLI, recipes and
    ``get_pass``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    other = _REGISTRY.get(cls.name)
    if other is not None and other is not cls and other.__qualname__ != cls.__qualname__:
        raise ValueError(
            f"pass name '{cls.name}' registered twice ({other.__name__}, {cls.__name__})"
        )
    _REGISTRY[cls.name] = cls
    return cls


def registered_pass_classes() -> dict[str, type[Pass]]:
    """The passes registered so far, by name (a built-in pass registers when its module is
    imported; :func:`graphopt.passes.registered_passes` imports them all first)."""
    return dict(_REGISTRY)


@dataclass
class PassRecord:
    """One run of one pass inside a :class:`PassManager` run."""

    name: str
    step: int
    modified: bool
    seconds: float
    stats: Stats


@dataclass
class ManagerResult:
    model: Model
    modified: bool
    records: list[PassRecord]
    steps: int

    def stats_by_pass(self) -> dict[str, Stats]:
        """Counters summed over steps, per pass name (numbers added, other values last-wins)."""
        out: dict[str, Stats] = {}
        for rec in self.records:
            acc = out.setdefault(rec.name, {})
            for k, v in rec.stats.items():
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    acc[k] = v
                else:
                    acc[k] = acc.get(k, 0) + v
        return out


class PassManager:
    """Runs passes in order, repeatedly, until a full sweep changes nothing (or ``steps`` sweeps).

    Args:
        passes: pass instances (:func:`graphopt.passes.resolve_passes` turns names into them).
        steps: maximum number of sweeps over the pass list.
        early_stop: stop as soon as a sweep reports no modification.
        on_pass: optional callback after each pass run (for progress display).
    """

    def __init__(
        self,
        passes: Sequence[Pass],
        steps: int = 1,
        early_stop: bool = True,
        on_pass: Callable[[PassRecord], None] | None = None,
    ) -> None:
        for p in passes:
            if not isinstance(p, Pass):
                raise TypeError(
                    f"PassManager takes Pass instances, not {p!r}; build them from names with "
                    "graphopt.passes.resolve_passes"
                )
        self.passes = list(passes)
        self.steps = max(1, int(steps))
        self.early_stop = early_stop
        self.on_pass = on_pass

    def __call__(self, model: Model) -> ManagerResult:
        records: list[PassRecord] = []
        history: list[str] = []
        any_modified = False
        step = 0
        # passes run in a row without changing the model: once every pass has, it is a fixed point
        clean = 0
        done = False
        for step in range(1, self.steps + 1):
            sweep_modified = False
            for p in self.passes:
                if self.early_stop and clean >= len(self.passes):
                    done = True
                    break
                t0 = time.perf_counter()
                try:
                    result = p(model)
                except (GraphoptError, PassError):
                    raise
                except Exception as exc:  # an internal error: name the pass and its predecessors
                    logger.debug("pass %s raised", p.name, exc_info=True)
                    raise PassError(p.name, f"{type(exc).__name__}: {exc}", history) from exc
                dt = time.perf_counter() - t0
                model = result.model
                rec = PassRecord(p.name, step, result.modified, dt, dict(result.stats))
                records.append(rec)
                history.append(p.name)
                if self.on_pass:
                    self.on_pass(rec)
                logger.debug(
                    "pass %s step %d modified=%s %.3fs %s",
                    p.name,
                    step,
                    result.modified,
                    dt,
                    result.stats,
                )
                sweep_modified |= result.modified
                clean = 0 if result.modified else clean + 1
            any_modified |= sweep_modified
            if done or (self.early_stop and not sweep_modified):
                break
        return ManagerResult(model, any_modified, records, step)
