"""Per-kernel time of a compiled library, measured inside the model run.

apache-tvm 0.27's Relax VM has no profiling VM (``profile=True`` is gone); it has
``VirtualMachine.set_instrument(f)``: ``f(func, symbol, before_run, ret, *args)`` runs before and
after every call instruction. :func:`profile_kernels` runs the model ``runs`` times with an
instrument that takes the wall time between the before and after callbacks of each call, sums it
per kernel for each run, and reports the median per kernel over the runs beside the median
end-to-end time of uninstrumented runs (interleaved with them). The VM's own builtins
(``vm.builtin.*``: allocation, reshape views) are reported together as one row.

In-graph times include the cache state the model leaves behind (a kernel timed alone runs with
warm caches), which is what matters for where the model's time goes; the callback costs a few
microseconds per call, so the sum of the kernels slightly exceeds the plain run on models with
many tiny kernels.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any

#: builtins of the VM, reported as one row
BUILTINS = "(vm builtins)"


@dataclass
class KernelTime:
    """One kernel's share of the model."""

    name: str
    calls: int
    ms: float
    share: float
    shapes: list[list[int]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "calls": self.calls,
            "ms": self.ms,
            "share": self.share,
            "shapes": self.shapes,
        }


@dataclass
class KernelProfile:
    """Per-kernel medians and the end-to-end median of one library on one input."""

    total_ms: float
    kernels_ms: float
    runs: int
    kernels: list[KernelTime]

    def to_json(self) -> dict[str, Any]:
        return {
            "total_ms": self.total_ms,
            "kernels_ms": self.kernels_ms,
            "runs": self.runs,
            "kernels": [k.to_json() for k in self.kernels],
        }


def profile_kernels(vm: Any, args: list[Any], runs: int = 10, entry: str = "main") -> KernelProfile:
    """Time every kernel call of ``vm[entry](*args)`` in the model run (see module doc)."""
    from tvm.runtime.vm import VMInstrumentReturnKind  # noqa: PLC0415

    no_op = int(VMInstrumentReturnKind.NO_OP)
    per_run: list[dict[str, float]] = []
    calls: dict[str, int] = {}
    shapes: dict[str, list[list[int]]] = {}
    state: dict[str, Any] = {}

    def instrument(func: Any, name: Any, before: bool, ret: Any, *fargs: Any) -> int:
        if before:
            state["t"] = time.perf_counter()
            return no_op
        dt = time.perf_counter() - state["t"]
        key = str(name)
        if key.startswith("vm.builtin") or key.startswith("vm."):
            key = BUILTINS
        cur = state["cur"]
        cur[key] = cur.get(key, 0.0) + dt
        if state["first"]:
            calls[key] = calls.get(key, 0) + 1
            if key != BUILTINS and key not in shapes:
                shapes[key] = [[int(d) for d in a.shape] for a in fargs if hasattr(a, "shape")]
        return no_op

    f = vm[entry]
    f(*args)  # warm-up
    totals: list[float] = []
    for i in range(max(1, runs)):
        t0 = time.perf_counter()
        f(*args)
        totals.append((time.perf_counter() - t0) * 1e3)
        state["cur"], state["first"] = {}, i == 0
        vm.set_instrument(instrument)
        try:
            f(*args)
        finally:
            vm.set_instrument(None)
        per_run.append(state["cur"])
    names = list(calls)
    med = {n: statistics.median(r.get(n, 0.0) for r in per_run) * 1e3 for n in names}
    kern_total = sum(med.values()) or 1.0
    rows = [
        KernelTime(n, calls[n], med[n], med[n] / kern_total, shapes.get(n, []))
        for n in sorted(names, key=lambda n: -med[n])
    ]
    return KernelProfile(statistics.median(totals), sum(med.values()), len(per_run), rows)
