"""A picture of a memory plan: the arena over time, one rectangle per tensor (matplotlib, imported
lazily: it is an optional dependency, the ``plot`` extra)."""

from __future__ import annotations

import os

from graphopt.algorithms.memory.planner import MemoryPlan
from graphopt.core.output import atomic_path


def plot_plan(plan: MemoryPlan, path: str | os.PathLike[str], title: str = "") -> None:
    """Write a picture of the arena over time (PNG unless ``path`` names another format that
    matplotlib writes): every tensor a rectangle (step on x, offset on y). Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    scale, unit = (1 << 20, "MiB") if plan.arena_bytes >= 1 << 22 else (1 << 10, "KiB")
    colors = {
        "input": "#4c72b0",
        "output": "#c44e52",
        "activation": "#55a868",
        "subgraph": "#8172b2",
        "loop": "#937860",
    }
    fig, ax = plt.subplots(figsize=(12, 6), dpi=110)
    rects, cols = [], []
    for t in plan.tensors.values():
        if not t.nbytes:
            continue
        rects.append(Rectangle((t.start, t.offset / scale), t.end - t.start + 1, t.nbytes / scale))
        cols.append(colors.get(t.kind, "#55a868"))
    ax.add_collection(
        PatchCollection(rects, facecolor=cols, edgecolor="black", linewidth=0.3, alpha=0.8)
    )
    ax.axhline(
        plan.arena_bytes / scale,
        color="black",
        linewidth=1,
        label=f"arena {plan.arena_bytes / scale:.2f} {unit}",
    )
    ax.axhline(
        plan.bound / scale,
        color="red",
        linestyle="--",
        linewidth=1,
        label=f"lower bound {plan.bound / scale:.2f} {unit}",
    )
    ax.axvline(
        plan.peak_step + 0.5,
        color="grey",
        linestyle=":",
        linewidth=1,
        label=f"peak at {plan.peak_node or plan.peak_step}",
    )
    for kind, c in colors.items():
        if any(t.kind == kind for t in plan.tensors.values()):
            ax.add_patch(Rectangle((0, 0), 0, 0, facecolor=c, label=kind))
    ax.set_xlim(0, plan.steps)
    ax.set_ylim(0, plan.arena_bytes / scale * 1.08 or 1)
    ax.set_xlabel("step (node in execution order)")
    ax.set_ylabel(f"arena offset ({unit})")
    ax.set_title(
        title
        or f"memory plan: arena {plan.arena_bytes / scale:.2f} {unit}, "
        f"{plan.arena_bytes / plan.bound if plan.bound else 1:.3f}x lower bound, "
        f"naive {plan.naive_bytes / scale:.1f} {unit}"
    )
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.11), fontsize=8, ncol=4, frameon=False)
    fig.tight_layout()
    fmt = os.path.splitext(os.fspath(path))[1][1:].lower() or "png"
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt)
    finally:
        plt.close(fig)
