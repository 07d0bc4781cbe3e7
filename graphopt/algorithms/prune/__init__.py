"""Structured pruning: channel-dependency analysis, groups, importance, application, recovery.

Modules, lowest first: ``heads`` (the label rules of attention heads and of MatMuls of two
activations), ``handlers`` (the table of op handlers: how channel labels flow through each op, and
how its hard-coded widths are rewritten), ``analysis`` (the walk, producing :class:`Analysis`),
``groups`` (dependency groups of producers), ``recover`` (least-squares refit), ``importance``
(criteria, ratio validation, selection), ``apply`` (removing or zeroing the selected channels).
The names below are the public API.
"""

from __future__ import annotations

from graphopt.algorithms.prune.analysis import Analysis, ConstSlice, Producer, analyze
from graphopt.algorithms.prune.apply import apply_pruning, zero_pruned
from graphopt.algorithms.prune.groups import Group, group_width, groups, prunable_macs
from graphopt.algorithms.prune.handlers import HANDLERS, OpHandler, ShapeFix, kept_positions
from graphopt.algorithms.prune.importance import (
    CALIB_CRITERIA,
    CRITERIA,
    PruneRatioError,
    activation_importance,
    bn_importance,
    importance,
    keep_elements,
    output_importance,
    select,
    unit_scores,
    validate_ratio,
    weight_importance,
)
from graphopt.algorithms.prune.recover import recover

__all__ = [
    "CALIB_CRITERIA",
    "CRITERIA",
    "HANDLERS",
    "Analysis",
    "ConstSlice",
    "Group",
    "OpHandler",
    "Producer",
    "PruneRatioError",
    "ShapeFix",
    "activation_importance",
    "analyze",
    "apply_pruning",
    "bn_importance",
    "group_width",
    "groups",
    "importance",
    "keep_elements",
    "kept_positions",
    "output_importance",
    "prunable_macs",
    "recover",
    "select",
    "unit_scores",
    "validate_ratio",
    "weight_importance",
    "zero_pruned",
]
