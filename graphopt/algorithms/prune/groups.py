"""Dependency groups: the producers whose channels are pruned together, and what they weigh.

A *group* is a connected component (networkx) of the graph whose nodes are producers and whose
edges join two producers holding elements of one class under the ties (``Analysis.coupled``). Its
*free* units are the units of its elements that are not tied to FIXED; its width is the number of
channel positions of its first producer (free units plus positions tied to FIXED). Block reasons of
the analysis are listed on the groups they touch (at most 8 per group).
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import numpy as np

from graphopt.algorithms.prune.analysis import Analysis, Producer


@dataclass
class Group:
    """A connected set of producers whose channels are pruned together."""

    gid: int
    producers: list[Producer]
    width: int  # number of channel positions (free units + positions tied to FIXED)
    free: np.ndarray  # ids of the units that may be removed
    reasons: list[str]

    @property
    def name(self) -> str:
        """The name of the group's first producer (the key of per-group ratios)."""
        return self.producers[0].node.name

    @property
    def blocked(self) -> bool:
        """Whether no channel of the group may be removed."""
        return len(self.free) == 0


def groups(an: Analysis) -> list[Group]:
    """Connected components of producers sharing units, with their free units and block reasons."""
    unit = an.unit
    fixed_unit = unit[an.fixed]
    gr = nx.Graph()
    unit_owner: dict[int, int] = {}
    for pi, p in enumerate(an.producers):
        gr.add_node(pi)
        for u in np.unique(an.coupled[p.start : p.start + p.size]).tolist():
            if u in unit_owner:
                gr.add_edge(unit_owner[u], pi)
            else:
                unit_owner[u] = pi
    elem_group = np.full(an.n_elements + 1, -1, dtype=np.int64)
    out: list[Group] = []
    comps = sorted(nx.connected_components(gr), key=min)
    for gid, comp in enumerate(comps):
        prods = [an.producers[i] for i in sorted(comp)]
        elems = np.concatenate([np.arange(p.start, p.start + p.size) for p in prods])
        elem_group[elems] = gid
        group_units = np.unique(unit[elems])
        free = group_units[group_units != fixed_unit]
        first = unit[prods[0].start : prods[0].start + prods[0].size]
        n_fixed = int((first == fixed_unit).sum())
        out.append(Group(gid, prods, len(free) + n_fixed, free, []))
    for labels, reason in an.blocks:
        gids = np.unique(elem_group[labels[labels >= 0]])
        for gi in gids.tolist():
            if gi >= 0 and reason not in out[gi].reasons and len(out[gi].reasons) < 8:
                out[gi].reasons.append(reason)
    return out


def group_width(an: Analysis, grp: Group, keep_unit: np.ndarray | None = None) -> tuple[int, int]:
    """Width of the group's first producer before and after pruning."""
    p = grp.producers[0]
    if keep_unit is None:
        return p.size, p.size
    return p.size, int(keep_unit[an.unit[p.start : p.start + p.size]].sum())


def prunable_macs(an: Analysis, node_macs: dict[str, int]) -> tuple[int, int]:
    """(MACs of compute nodes that touch a free unit, total MACs)."""
    unit = an.unit
    fixed_unit = unit[an.fixed]
    total = sum(node_macs.values())
    pr = 0
    for name, labs in an.touched.items():
        if any(((lab >= 0) & (unit[np.maximum(lab, 0)] != fixed_unit)).any() for lab in labs):
            pr += node_macs.get(name, 0)
    return pr, total
