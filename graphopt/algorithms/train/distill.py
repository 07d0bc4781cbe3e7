"""Knowledge distillation of a student graph from a teacher graph on unlabeled inputs.

The teacher is the original model, the student the compressed one (pruned, or fake-quantized for
QAT); no labels are needed (Hinton et al. 2015, "Distilling the knowledge in a neural network";
Romero et al. 2015, "FitNets: hints for thin deep nets" for the feature term). Loss per output,
chosen from the teacher's values:

* ``logits`` (rank 2/3, last axis >= 2 classes, not normalized): ``MSE + T^2 KL(softmax(t/T) ||
  softmax(s/T))``;
* ``probs`` (already a softmax over the last axis): ``KL(t || s)`` -- but when both graphs compute
  the output with a last-axis ``Softmax`` (PP-OCR rec/cls), the loss is taken on its input as
  ``logits`` instead: saturated probabilities carry almost no gradient;
* ``map`` (anything else): ``MSE``; with ``sigmoid_kl``, when both graphs compute a map output
  with a ``Sigmoid`` (a text detector's probability map), the Bernoulli KL divergence per
  element on the Sigmoid's input (``bernoulli``: ``BCE(s_logit, sigmoid(t_logit)) -
  H(sigmoid(t_logit))``, zero at a match): its gradient in the logit is ``sigmoid(s) -
  sigmoid(t)``, where the MSE of the probabilities loses a factor ``s (1 - s)`` and leaves
  confidently wrong pixels alone;

plus ``feature_weight * mean MSE(s_f, t_f) / mean(t_f^2)`` over feature pairs: tensors of the same
name in both graphs, of the same shape (after the next unpruned layer) or pruned, compared on the
teacher channels the student kept (found by correlation, :func:`matched_channels`), or explicit
pairs. Teacher values are computed once per training
feed and cached (the training set is the fixed calibration set). Adam with a short linear warmup
and a cosine learning rate (:func:`lr_factor`),
a step budget and an optional wall-clock budget (the schedule then runs on whichever budget is
further along, :func:`schedule_step`); every ``eval_every`` steps the held-out fidelity
(``metric(student_outputs, teacher_outputs) -> float``, higher is better, e.g. top-1 agreement)
and the held-out distillation loss are measured; training stops early once the metric reaches
``target``. The student with the lowest held-out loss is kept (a coarse metric such as agreement
on a few dozen samples ties too often to select by).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .module import OnnxModule

logger = logging.getLogger(__name__)

Tensor = torch.Tensor
Feeds = Mapping[str, np.ndarray]
Metric = Callable[[dict[str, Tensor], dict[str, Tensor]], float]


@dataclass
class DistillConfig:
    steps: int = 300
    lr: float = 1e-3
    #: fraction of ``steps`` over which the learning rate rises linearly before the cosine decay
    warmup: float = 0.05
    weight_decay: float = 0.0
    batch_size: int = 16
    temperature: float = 2.0
    kl_weight: float = 1.0
    mse_weight: float = 1.0
    feature_weight: float = 0.0
    #: (teacher tensor, student tensor) pairs; empty with feature_weight > 0: shared names
    features: Sequence[tuple[str, str]] = ()
    #: teacher feature name -> the channels (axis 1) the student kept (pruned layers' outputs);
    #: found by :func:`matched_channels` for the shared names when not given
    feature_channels: Mapping[str, Sequence[int]] = field(default_factory=dict)
    #: at most this many shared feature tensors, spread over the graph (their teacher values
    #: are cached for every training batch)
    max_features: int | None = 8
    #: a map output under a Sigmoid in both graphs: Bernoulli KL on its logits (else its MSE).
    #: Off by default: on PP-OCR det pruned 30% (150 s, load 3.2) it ended at map IoU 0.888
    #: against the MSE's 0.894
    sigmoid_kl: bool = False
    time_budget_s: float | None = None
    eval_every: int = 50
    target: float | None = None
    seed: int = 0
    #: ``augment(batch, generator) -> batch`` applied to every training batch (the teacher then
    #: labels each augmented batch; no cache)
    augment: Callable[[dict[str, Tensor], torch.Generator], dict[str, Tensor]] | None = None
    #: called as progress(step, loss, held_out_metric_or_None)
    progress: Callable[[int, float, float | None], None] | None = None


@dataclass
class DistillResult:
    steps: int
    seconds: float
    best_metric: float | None  # metric of the kept student
    initial_metric: float | None
    best_loss: float | None  # held-out loss of the kept student
    initial_loss: float | None
    stopped: str  # "steps", "time", "target"
    history: list[tuple[int, float, float | None]] = field(default_factory=list)
    #: the learning-rate multiplier of the last step (near 0 once the schedule has run out)
    final_lr_factor: float = 1.0
    #: the tensor each output loss compares -> its loss kind (see the module docstring)
    loss_kinds: dict[str, str] = field(default_factory=dict)


def output_kind(t: Tensor) -> str:
    """``logits``, ``probs`` or ``map`` (see the module docstring)."""
    if t.dim() in (2, 3) and t.shape[-1] >= 2 and t.is_floating_point():
        s = t.sum(-1)
        if bool((t >= 0).all()) and bool(torch.allclose(s, torch.ones_like(s), atol=1e-3)):
            return "probs"
        return "logits"
    return "map"


def output_loss(s: Tensor, t: Tensor, kind: str, cfg: DistillConfig) -> Tensor:
    if kind == "logits":
        temp = cfg.temperature
        kl = (
            F.kl_div(
                F.log_softmax(s / temp, -1),
                F.log_softmax(t / temp, -1),
                reduction="none",
                log_target=True,
            )
            .sum(-1)
            .mean()
        )
        return cfg.mse_weight * F.mse_loss(s, t) + cfg.kl_weight * temp * temp * kl
    if kind == "probs":
        eps = 1e-8
        return cfg.kl_weight * (t * (torch.log(t + eps) - torch.log(s + eps))).sum(-1).mean()
    if kind == "bernoulli":
        p = torch.sigmoid(t)
        kl = F.binary_cross_entropy_with_logits(s, p) - F.binary_cross_entropy_with_logits(t, p)
        return cfg.mse_weight * kl
    return cfg.mse_weight * F.mse_loss(s, t) / (t.pow(2).mean() + 1e-12)


def lr_factor(step: int, steps: int, warmup: float = 0.05) -> float:
    """Learning-rate multiplier after ``step`` optimizer steps: linear warmup over the first
    ``warmup * steps`` steps (from ``1 / w``), then cosine decay to 0 at ``steps`` (Loshchilov &
    Hutter 2017, "SGDR"; Goyal et al. 2017 for the warmup). Adam's first steps on a model that
    already matches its teacher closely (least-squares start) otherwise overshoot at the higher
    rates that long runs on more data want."""
    steps = max(steps, 1)
    w = int(round(warmup * steps))
    if w > 0 and step < w:
        return (step + 1) / w
    return 0.5 * (1 + math.cos(math.pi * min(step - w, steps - w) / max(steps - w, 1)))


def schedule_step(done: int, steps: int, elapsed: float, budget: float | None) -> int:
    """The step of the learning-rate schedule after ``done`` optimizer steps: with a wall-clock
    ``budget`` (seconds, ``elapsed`` of it spent), the schedule follows whichever of the step and
    time budgets is further along, so a run stopped by the clock (``--time-budget`` with a large
    ``--steps``) still warms up and decays to 0 instead of ending at the full rate."""
    if budget is None or budget <= 0:
        return done
    return max(done, min(steps, int(steps * elapsed / budget)))


def feature_loss(s: Tensor, t: Tensor, channels: Tensor | None = None) -> Tensor:
    """Normalized MSE between a student feature and the teacher's (its kept channels)."""
    if channels is not None:
        t = t.index_select(1, channels)
    return F.mse_loss(s, t) / (t.pow(2).mean() + 1e-12)


def batches(
    feeds: Sequence[Feeds], batch_size: int, dynamic_batch: bool
) -> list[dict[str, Tensor]]:
    """Group per-sample feeds into batches along axis 0 (one per batch when the model's batch
    dim is fixed)."""
    if not dynamic_batch or batch_size <= 1:
        return [{k: torch.from_numpy(np.asarray(v)) for k, v in f.items()} for f in feeds]
    out = []
    for i in range(0, len(feeds), batch_size):
        group = feeds[i : i + batch_size]
        out.append(
            {
                k: torch.from_numpy(np.concatenate([np.asarray(f[k]) for f in group]))
                for k in group[0]
            }
        )
    return out


def batchable(m: OnnxModule, samples: Sequence[Feeds]) -> bool:
    """Whether ``m`` takes batches: declared dynamic batch dims, or (a graph exported at batch 1
    whose shape arithmetic does not pin the batch) a 2-sample batch runs and gives the two
    single-sample results."""
    if m.dynamic_batch:
        return True
    if len(samples) < 2:
        return False
    both = batches(samples[:2], 2, True)[0]
    try:
        with torch.no_grad():
            out = m.run(both)
            singles = [m.run(batches([f], 1, True)[0]) for f in samples[:2]]
    except (RuntimeError, ValueError):
        return False
    for n in m.output_names:
        ref = torch.cat([s[n] for s in singles])
        if out[n].shape != ref.shape or not torch.allclose(out[n], ref, rtol=1e-4, atol=1e-5):
            return False
    return True


def split_samples(feeds: Sequence[Feeds]) -> list[dict[str, np.ndarray]]:
    """Feeds with a batch axis -> one feed per sample (batch 1)."""
    out = []
    for f in feeds:
        n = min(np.asarray(v).shape[0] for v in f.values())
        out += [{k: np.asarray(v)[i : i + 1] for k, v in f.items()} for i in range(n)]
    return out


def softmax_logits(teacher: OnnxModule, student: OnnxModule, output: str, rank: int) -> str | None:
    """The input of a last-axis Softmax computing ``output`` in both graphs (same name)."""
    steps = [m.producer(output) for m in (teacher, student)]
    if any(s is None or s.op != "Softmax" for s in steps):
        return None
    t, s = steps
    assert t is not None and s is not None
    if t.inputs[0] != s.inputs[0] or not t.inputs[0]:
        return None
    opset = teacher.opsets.get("", 13)
    axis = int(t.attrs.get("axis", -1 if opset >= 13 else 1))
    return t.inputs[0] if axis in (-1, rank - 1) else None


def sigmoid_logits(teacher: OnnxModule, student: OnnxModule, output: str) -> str | None:
    """The input of a ``Sigmoid`` computing ``output`` in both graphs (same name)."""
    steps = [m.producer(output) for m in (teacher, student)]
    if any(s is None or s.op != "Sigmoid" for s in steps):
        return None
    t, s = steps
    assert t is not None and s is not None
    return t.inputs[0] if t.inputs[0] and t.inputs[0] == s.inputs[0] else None


def matched_channels(t: Tensor, s: Tensor, min_corr: float = 0.5) -> list[int] | None:
    """The teacher channel (axis 1) that each channel of a pruned student tensor reproduces.

    Pruning keeps a subset of a layer's output channels and least squares refits them to the
    original's kept channels, so each student channel correlates almost perfectly with one
    teacher channel. Channel ``j`` of ``s`` maps to the teacher channel of highest Pearson
    correlation over the batch and positions; the map is returned only when every correlation
    is at least ``min_corr`` and no teacher channel is taken twice (else None: the tensor is no
    feature pair, e.g. a constant channel or a layer whose channels were mixed).
    """
    if t.dim() < 2 or s.dim() != t.dim() or s.shape[0] != t.shape[0]:
        return None
    if s.shape[2:] != t.shape[2:] or s.shape[1] > t.shape[1]:
        return None

    def unit(x: Tensor) -> Tensor:
        f = x.detach().transpose(0, 1).reshape(x.shape[1], -1).double()
        f = f - f.mean(1, keepdim=True)
        return f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)

    corr = unit(s) @ unit(t).T  # (C_student, C_teacher)
    val, best = corr.max(1)
    picked = best.tolist()
    if bool((val < min_corr).any()) or len(set(picked)) != len(picked):
        return None
    return [int(i) for i in picked]


#: ops whose outputs are feature candidates (activations, residual sums, concatenations)
FEATURE_OPS = ("Relu", "Add", "Clip", "HardSwish(fused)", "Mul", "Sigmoid", "Concat", "Resize")


def shared_features(
    teacher: OnnxModule,
    student: OnnxModule,
    feeds: Sequence[Mapping[str, Tensor]],
    ops: Sequence[str] = FEATURE_OPS,
    limit: int | None = None,
) -> list[tuple[str, list[int] | None]]:
    """Tensors computed by both graphs (same name) that can be compared: ``(name, None)`` when
    the shapes are equal (unpruned tensors, e.g. after the next unpruned layer), ``(name,
    channels)`` when the student's tensor is a pruned one whose channels map to the teacher's
    (:func:`matched_channels` on ``feeds``). With ``limit``, that many spread evenly over the
    graph (every feature's teacher values are cached for every training batch)."""

    def names(m: OnnxModule) -> list[str]:
        return [
            o
            for s in m.steps
            if s.op in ops
            for o in s.outputs
            if o and o not in m.fused_away and o not in m.output_names
        ]

    common = [n for n in names(student) if n in set(names(teacher))]
    if not common:
        return []
    with torch.no_grad():
        t_out = [teacher.run(f, common) for f in feeds]
        s_out = [student.run(f, common) for f in feeds]
    t = {n: torch.cat([o[n] for o in t_out]) for n in common}
    s = {n: torch.cat([o[n] for o in s_out]) for n in common}
    out: list[tuple[str, list[int] | None]] = []
    for n in common:
        if t[n].shape == s[n].shape:
            out.append((n, None))
        elif (ch := matched_channels(t[n], s[n])) is not None:
            out.append((n, ch))
    if limit is not None and len(out) > limit:
        idx = np.linspace(0, len(out) - 1, limit).round().astype(int)
        out = [out[i] for i in sorted(set(idx.tolist()))]
    return out


def distill(
    student: OnnxModule,
    teacher: OnnxModule,
    train: Sequence[Feeds],
    held_out: Sequence[Feeds] = (),
    config: DistillConfig | None = None,
    metric: Metric | None = None,
    params: Sequence[torch.nn.Parameter] | Sequence[dict[str, Any]] | None = None,
) -> DistillResult:
    """Fine-tune ``student`` (in place) to reproduce ``teacher`` on ``train`` feeds.

    Args:
        student, teacher: modules over the student and teacher graphs (same inputs/outputs).
        train: per-sample or batched feeds, regrouped into batches of ``config.batch_size``
            (by gradient accumulation over single samples when the graph's batch dim is fixed).
        held_out: feeds for the fidelity measurements (not trained on).
        metric: ``metric(student_out, teacher_out) -> float`` (higher is better) on the
            concatenated held-out outputs; default: minus the mean output loss.
        params: what trains (default: all of ``student.parameters()``), or Adam parameter
            groups (e.g. :meth:`.qat.QatModule.param_groups`).
    """
    cfg = config or DistillConfig()
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    teacher.eval()
    student.eval()  # BatchNormalization uses running statistics either way; no dropout
    samples = split_samples(train)
    dynamic = all(batchable(m, samples[:2]) for m in (student, teacher))
    train_b = batches(samples, cfg.batch_size, dynamic)
    held_b = batches(split_samples(held_out), cfg.batch_size, dynamic) if held_out else []
    feats: list[tuple[str, str]] = list(cfg.features)
    found: dict[str, Sequence[int]] = {}
    if cfg.feature_weight > 0 and not feats:
        per = max(next(iter(train_b[0].values())).shape[0], 1)
        pairs = shared_features(
            teacher, student, train_b[: max(1, 16 // per)], limit=cfg.max_features
        )
        feats = [(n, n) for n, _ in pairs]
        found = {n: ch for n, ch in pairs if ch is not None}
        logger.info("distill: %d feature tensors (%d pruned)", len(feats), len(found))
    chan = {
        k: torch.as_tensor(list(v), dtype=torch.int64)
        for k, v in {**found, **cfg.feature_channels}.items()
    }
    with torch.no_grad():
        probe = teacher.run(train_b[0])
    # the tensors the output losses compare: the graph outputs, or the logits under a Softmax
    # or (a map) a Sigmoid
    loss_names, bernoulli = [], set()
    for o in teacher.output_names:
        kind = output_kind(probe[o])
        if kind == "probs":
            loss_names.append(softmax_logits(teacher, student, o, probe[o].dim()) or o)
        elif kind == "map" and cfg.sigmoid_kl and (z := sigmoid_logits(teacher, student, o)):
            loss_names.append(z)
            bernoulli.add(z)
        else:
            loss_names.append(o)
    t_names = loss_names + [a for a, _ in feats]
    with torch.no_grad():
        cache = [teacher.run(b, t_names) for b in train_b] if cfg.augment is None else []
        held_t = [
            teacher.run(b, list(dict.fromkeys(loss_names + teacher.output_names))) for b in held_b
        ]
        first = cache[0] if cache else teacher.run(train_b[0], t_names)
    kinds = {n: "bernoulli" if n in bernoulli else output_kind(first[n]) for n in loss_names}
    gen = torch.Generator().manual_seed(cfg.seed)
    logger.info(
        "distill: outputs %s, %d train batches, %d held-out batches",
        kinds,
        len(train_b),
        len(held_b),
    )

    def evaluate() -> tuple[float | None, float | None]:
        """(held-out loss, metric)."""
        if not held_b:
            return None, None
        names = list(dict.fromkeys(loss_names + student.output_names))
        with torch.no_grad():
            outs = [student.run(b, names) for b in held_b]
            s_cat = {n: torch.cat([o[n] for o in outs]) for n in names}
            t_cat = {n: torch.cat([o[n] for o in held_t]) for n in names}
            loss = float(sum(output_loss(s_cat[n], t_cat[n], kinds[n], cfg) for n in loss_names))
        outs_s = {n: s_cat[n] for n in student.output_names}
        outs_t = {n: t_cat[n] for n in teacher.output_names}
        return loss, (float(metric(outs_s, outs_t)) if metric is not None else -loss)

    plist: Any = (
        list(params) if params is not None else [p for p in student.parameters() if p.requires_grad]
    )
    opt = torch.optim.Adam(plist, lr=cfg.lr, weight_decay=cfg.weight_decay)
    base_lr = [g["lr"] for g in opt.param_groups]

    def set_lr(k: int) -> float:
        f = lr_factor(k, cfg.steps, cfg.warmup)
        for g, b in zip(opt.param_groups, base_lr):
            g["lr"] = b * f
        return f

    best_loss, best = evaluate()
    initial_loss, initial = best_loss, best
    best_state = {k: v.detach().clone() for k, v in student.named_parameters()}
    history: list[tuple[int, float, float | None]] = [(0, float("nan"), initial)]
    rng = np.random.default_rng(cfg.seed)
    order: list[int] = []
    stopped = "steps"
    s_names = loss_names + [b for _, b in feats]
    step = 0
    lr_f = 1.0
    t_loop = time.perf_counter()
    # the schedule's clock: what is left of the time budget once the teacher values are cached
    left = None if cfg.time_budget_s is None else cfg.time_budget_s - (t_loop - t0)
    # a model with a fixed batch dim trains on batch_size samples by gradient accumulation
    accum = 1 if dynamic else max(cfg.batch_size, 1)
    for step in range(1, cfg.steps + 1):
        opt.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - t_loop
        lr_f = set_lr(schedule_step(step - 1, cfg.steps, elapsed, left))
        loss_v = 0.0
        for _ in range(accum):
            if not order:
                order = list(rng.permutation(len(train_b)))
            i = order.pop()
            if cfg.augment is None:
                batch, tgt = train_b[i], cache[i]
            else:
                batch = cfg.augment(train_b[i], gen)
                with torch.no_grad():
                    tgt = teacher.run(batch, t_names)
            out = student.run(batch, s_names)
            loss = torch.stack(
                [output_loss(out[n], tgt[n], kinds[n], cfg) for n in loss_names]
            ).sum()
            if feats:
                loss = loss + cfg.feature_weight * sum(
                    feature_loss(out[b], tgt[a], chan.get(a)) for a, b in feats
                ) / len(feats)
            (loss / accum).backward()
            loss_v += float(loss.detach()) / accum
        opt.step()
        m = None
        done = cfg.time_budget_s is not None and time.perf_counter() - t0 > cfg.time_budget_s
        if step % cfg.eval_every == 0 or step == cfg.steps or done:
            held_loss, m = evaluate()
            if held_loss is not None and (best_loss is None or held_loss < best_loss):
                best_loss, best = held_loss, m
                best_state = {k: v.detach().clone() for k, v in student.named_parameters()}
        history.append((step, loss_v, m))
        if cfg.progress is not None:
            cfg.progress(step, loss_v, m)
        if m is not None and cfg.target is not None and m >= cfg.target:
            stopped = "target"
            break
        if done:
            stopped = "time"
            break
    if held_b:
        student.load_state_dict(best_state, strict=False)
    return DistillResult(
        step,
        time.perf_counter() - t0,
        best,
        initial,
        best_loss,
        initial_loss,
        stopped,
        history,
        lr_f,
        dict(kinds),
    )
