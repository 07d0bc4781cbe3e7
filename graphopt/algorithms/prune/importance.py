"""Channel importance, the pruning ratio, and the selection of the channels to remove.

Importance of an element (a producer's output channel), normalized by its producer's mean so that
elements of different layers are comparable when summed into units:

* ``l1`` / ``l2``: ``||W[c]||_1`` / ``||W[c]||_2`` of the producer's output-channel weight slice;
* ``bn``: ``|gamma_c|`` of the BatchNormalization that scales the channel (network slimming);
  producers with no BN fall back to ``l1``;
* ``activation``: ``mean |y_c|`` of the producer's output on calibration data (onnxruntime with the
  producers' outputs exposed);
* ``output``: the error a unit's removal leaves in the outputs of the MatMul/Gemm layers that read
  it once they are refit by least squares (what recovery does), on calibration data: the Optimal
  Brain Surgeon cost ``tr(W_P^T ([H^-1]_PP)^-1 W_P)`` with ``H = X^T X`` of the consumer's input
  (plus a ones column) and ``P`` the unit's input positions (an attention head: its ``Dh`` context
  columns and output-projection rows; an FFN neuron: one row of the second MatMul), summed over
  consumers (:func:`_unit_costs`). It ranks units by what removing them changes downstream, where
  ``activation`` and the weight norms see only the producer side (Q/K/V columns say little about
  a head's output). Groups that no MatMul/Gemm reads fall back to ``activation``.

A unit's score is the sum over its elements. :func:`select` removes the least important free units
of every group (or of the whole model, ``scope="global"``) for a ratio checked by
:func:`validate_ratio`, with a floor and rounding to multiples of ``round_to``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal, overload

import numpy as np

from graphopt.algorithms.prune.analysis import Analysis
from graphopt.algorithms.prune.groups import Group, groups
from graphopt.algorithms.prune.handlers import constant
from graphopt.core.errors import GraphoptError
from graphopt.core.model import Model
from graphopt.core.session import make_session

#: the importance criteria, for option parsers
CRITERIA = ("l1", "l2", "bn", "activation", "output")

#: the criteria that read calibration data
CALIB_CRITERIA = ("activation", "output")

Feeds = Mapping[str, np.ndarray]


class PruneRatioError(GraphoptError):
    """A pruning ratio outside [0, 1), or a per-group ratio mapping that is malformed."""


def _one_ratio(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise PruneRatioError(
            f"{name} must be a number between 0 and 1 (0 allowed, 1 not), got {value!r}"
        )
    r = float(value)
    if not math.isfinite(r) or not 0.0 <= r < 1.0:
        raise PruneRatioError(
            f"{name} must be between 0 and 1 (0 allowed, 1 not), got {value!r}: "
            f"it is the fraction removed, e.g. 0.3 for 30%"
        )
    return r


@overload
def validate_ratio(ratio: object, name: str = ..., *, per_group: Literal[False]) -> float: ...


@overload
def validate_ratio(
    ratio: object, name: str = ..., *, per_group: bool = ...
) -> float | dict[str, float]: ...


def validate_ratio(
    ratio: object, name: str = "pruning ratio", *, per_group: bool = True
) -> float | dict[str, float]:
    """Check a pruning ratio and return it as a float, or as a dict of floats.

    Args:
        ratio: the fraction of channels (or weights) to remove, ``0 <= r < 1``; with ``per_group``
            also a mapping ``{group name: r}`` where ``"*"`` is the default for other groups.
        name: how the message calls it (``"--ratio"``, ``"option 'ratio'"``, ...).
        per_group: whether a mapping is accepted.

    Raises:
        PruneRatioError: (a ``GraphoptError``) for anything else, saying what is expected.
    """
    if isinstance(ratio, Mapping):
        if not per_group:
            raise PruneRatioError(f"{name} must be one number between 0 and 1 here, not a mapping")
        if not ratio:
            raise PruneRatioError(
                f"{name}: the per-group mapping is empty (give at least '*': default ratio)"
            )
        out: dict[str, float] = {}
        for k, v in ratio.items():
            if not isinstance(k, str) or not k:
                raise PruneRatioError(
                    f"{name}: per-group keys must be group names (the first "
                    f"producer's node name) or '*', got {k!r}"
                )
            out[k] = _one_ratio(v, f"{name} of '{k}'")
        return out
    return _one_ratio(ratio, name)


# ---------------------------------------------------------------------------------- criteria
def weight_importance(an: Analysis, p_norm: int = 1) -> np.ndarray:
    """Per-element Lp norm of the producer's output-channel weight slice, divided by the
    producer's mean (so elements of different layers are comparable when summed into units)."""
    imp = np.zeros(an.n_elements, dtype=np.float64)
    for p in an.producers:
        w = np.moveaxis(p.weight.astype(np.float64), p.weight_axis, 0).reshape(p.size, -1)
        v = np.abs(w).sum(1) if p_norm == 1 else np.sqrt((w * w).sum(1))
        imp[p.start : p.start + p.size] = v / (v.mean() + 1e-12)
    return imp


def bn_importance(an: Analysis) -> np.ndarray:
    """|gamma| of the BatchNorms that scale each element (l1 where none does), normalized per
    producer."""
    imp = np.zeros(an.n_elements, dtype=np.float64)
    seen = np.zeros(an.n_elements, dtype=bool)
    for labels, gamma in an.gammas:
        m = labels >= 0
        np.add.at(imp, labels[m], gamma[m])
        seen[labels[m]] = True
    l1 = weight_importance(an, 1)
    for p in an.producers:
        sl = slice(p.start, p.start + p.size)
        if seen[sl].all():
            imp[sl] = imp[sl] / (imp[sl].mean() + 1e-12)
        else:
            imp[sl] = l1[sl]
    return imp


def activation_importance(model: Model, an: Analysis, calib: Sequence[Feeds]) -> np.ndarray:
    """Per-element ``mean |y_c|`` of the producers' outputs over ``calib``, normalized per
    producer (``model``: the model ``an`` was built from, tensor names as analysed)."""
    if not calib:
        raise GraphoptError("criterion 'activation' needs calibration data (--calib DATA)")
    names = [p.out_name for p in an.producers]
    sess = make_session(model, outputs=names, truncate=True)
    inputs = {i.name for i in sess.get_inputs()}
    acc = np.zeros(an.n_elements)
    for feeds in calib:
        outs = sess.run(names, {k: v for k, v in feeds.items() if k in inputs})
        for p, y in zip(an.producers, outs):
            axis = an.labels[p.out_name][0] if p.out_name in an.labels else 1
            y = np.moveaxis(np.abs(y.astype(np.float64)), axis, 0).reshape(p.size, -1)
            acc[p.start : p.start + p.size] += y.mean(1)
    for p in an.producers:
        sl = slice(p.start, p.start + p.size)
        acc[sl] /= acc[sl].mean() + 1e-12
    return acc


def _unit_costs(
    xtx: np.ndarray, w: np.ndarray, units_: np.ndarray, damp: float = 1e-2
) -> tuple[np.ndarray, np.ndarray]:
    """(unit ids, the output error each unit's removal leaves once the consumer is refit) for a
    consumer with Gram matrix ``xtx`` [K+1, K+1] (inputs plus a ones column), weight ``w`` [K, M]
    and the unit of every input position ``units_`` [K] (-1: none).

    Optimal Brain Surgeon for a linear layer (Hassibi & Stork 1993; the structured form of
    Kurtic et al. 2022, oBERT, and Frantar & Alistarh 2022, OBC): removing the rows ``P`` of ``W``
    and refitting the rest by least squares raises ``sum ||X W - X' W'||^2`` by
    ``tr(W_P^T ([H^-1]_PP)^-1 W_P)`` with ``H = X^T X`` (damped by ``damp`` times its mean
    diagonal)."""
    ids = np.unique(units_[units_ >= 0])
    k = len(units_)
    h = xtx + np.eye(len(xtx)) * (damp * float(np.mean(np.diag(xtx))) + 1e-12)
    hinv = np.linalg.inv(h)[:k, :k]
    out = np.zeros(len(ids))
    for j, u in enumerate(ids.tolist()):
        pos = np.nonzero(units_ == u)[0]
        wp = w[pos]
        block = hinv[np.ix_(pos, pos)]
        out[j] = float(np.trace(wp.T @ np.linalg.solve(block, wp)))
    return ids, out


def output_importance(
    model: Model, an: Analysis, calib: Sequence[Feeds], max_width: int = 8192
) -> np.ndarray:
    """Per-element ``output`` importance (see the module docstring): each unit's Optimal Brain
    Surgeon cost in its MatMul/Gemm consumers' outputs over ``calib``, put on the unit's largest
    element; the groups that no such consumer reads (or only one wider than ``max_width`` inputs,
    whose Gram matrix would not fit) get :func:`activation_importance`."""
    if not calib:
        raise GraphoptError("criterion 'output' needs calibration data (--calib DATA)")
    fixed_unit = an.unit[an.fixed]
    consumers = [
        s
        for s in an.slices
        if s.role == "consumer"
        and s.node.op in ("MatMul", "Gemm")
        and s.index == 1
        and len(s.labels) <= max_width
    ]
    names = sorted({s.node.inputs[0].name for s in consumers})
    energy = np.zeros(an.n_elements + 1)
    seen = np.zeros(an.n_elements + 1, dtype=bool)
    if names:
        sess = make_session(model, outputs=names, truncate=True)
        inputs = {i.name for i in sess.get_inputs()}
        weights = []
        for s in consumers:
            w = constant(s.node.inputs[1], model.opset)
            assert w is not None  # the analysis sliced it
            w = np.moveaxis(w.astype(np.float64), s.axis, 0).reshape(len(s.labels), -1)
            lab_units = np.where(s.labels >= 0, an.unit[np.maximum(s.labels, 0)], -1)
            lab_units[lab_units == fixed_unit] = -1
            weights.append((s.node.inputs[0].name, w, lab_units))
        grams = {name: np.zeros((w.shape[0] + 1, w.shape[0] + 1)) for name, w, _ in weights}
        for feeds in calib:
            outs = dict(
                zip(names, sess.run(names, {k: v for k, v in feeds.items() if k in inputs}))
            )
            for name, x in outs.items():
                if name not in grams:
                    continue
                x = x.astype(np.float64).reshape(-1, x.shape[-1])
                x = np.concatenate([x, np.ones((len(x), 1))], axis=1)
                grams[name] += x.T @ x
        for name, w, lab_units in weights:
            ids, e = _unit_costs(grams[name], w, lab_units)
            np.add.at(energy, ids, e)
            seen[ids] = True
    act = activation_importance(model, an, calib)
    out = np.zeros(an.n_elements, dtype=np.float64)
    for grp in groups(an):
        if grp.blocked:
            continue
        if seen[grp.free].all():
            out[grp.free] = energy[grp.free] / (energy[grp.free].mean() + 1e-12)
        else:
            for p in grp.producers:
                out[p.start : p.start + p.size] = act[p.start : p.start + p.size]
    return out


def importance(model: Model, an: Analysis, criterion: str, calib: Sequence[Feeds]) -> np.ndarray:
    """Per-element importance for ``criterion`` (one of ``CRITERIA``)."""
    if criterion == "output":
        return output_importance(model, an, calib)
    if criterion == "l1":
        return weight_importance(an, 1)
    if criterion == "l2":
        return weight_importance(an, 2)
    if criterion == "bn":
        return bn_importance(an)
    if criterion == "activation":
        return activation_importance(model, an, calib)
    raise GraphoptError(
        f"unknown pruning criterion '{criterion}' (use one of {', '.join(CRITERIA)})"
    )


# ---------------------------------------------------------------------------------- selection
def unit_scores(an: Analysis, elem_importance: np.ndarray) -> np.ndarray:
    """Importance of every unit (indexed by unit id): the sum over its elements."""
    return np.bincount(
        an.unit[: an.n_elements], weights=elem_importance, minlength=an.n_elements + 1
    )


def select(
    an: Analysis,
    grps: Iterable[Group],
    scores: np.ndarray,
    ratio: float | dict[str, float],
    round_to: int | None = None,
    min_channels: int = 1,
    min_fraction: float = 0.0,
    scope: str = "group",
) -> np.ndarray:
    """Per-unit keep flags.

    ``scope="group"``: every group loses its ``ratio`` least important free units (a dict gives
    per-group ratios by first-producer name, ``"*"`` the default). ``scope="global"``: scores are
    divided by their group's mean and the ``ratio`` least important units of the whole model go,
    so groups lose different fractions. Either way a group keeps at least
    ``max(min_channels, min_fraction * width)`` and, with ``round_to``, a multiple of it.
    """
    grps = [g for g in grps if not g.blocked]
    keep = np.ones(an.n_elements + 1, dtype=bool)
    wanted: dict[int, int] = {}
    if scope == "global":
        r = float(ratio.get("*", 0.0)) if isinstance(ratio, dict) else float(ratio)
        norm = {g.gid: scores[g.free] / (scores[g.free].mean() + 1e-12) for g in grps}
        if grps and r > 0:
            allv = np.concatenate(list(norm.values()))
            n_total = int(round(r * sum(g.width for g in grps)))
            thr = np.sort(allv)[min(n_total, len(allv)) - 1] if n_total > 0 else -np.inf
            for g in grps:
                wanted[g.gid] = int((norm[g.gid] <= thr).sum())
    elif scope != "group":
        raise ValueError(f"unknown pruning scope {scope!r} (group or global)")
    for grp in grps:
        n = grp.width
        if scope == "global":
            n_want = wanted.get(grp.gid, 0)
        else:
            r = ratio.get(grp.name, ratio.get("*", 0.0)) if isinstance(ratio, dict) else ratio
            n_want = int(round(r * n))
        if n_want <= 0:
            continue
        n_fixed = n - len(grp.free)
        floor = max(min_channels, int(np.ceil(min_fraction * n)), n_fixed, 1)
        kept = max(floor, n - n_want)
        if round_to and round_to > 1:
            if n <= round_to:
                continue
            kept = max(round_to, int(round(kept / round_to)) * round_to)
            while kept < floor:
                kept += round_to
            kept = min(kept, n)
        n_remove = min(n - kept, len(grp.free))
        if n_remove <= 0:
            continue
        order = np.argsort(scores[grp.free], kind="stable")
        keep[grp.free[order[:n_remove]]] = False
    return keep


def keep_elements(an: Analysis, keep_unit: np.ndarray) -> np.ndarray:
    """Per-element keep flags from per-unit flags (indexed by unit id)."""
    return keep_unit[an.unit[: an.n_elements]]
