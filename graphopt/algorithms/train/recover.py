"""Recovery drivers on graphopt models: distill a pruned model from its original, and train a
static QDQ model with QAT, each written back into the same graph and checked in onnxruntime.

These are what the jobs call (``graphopt prune --recover distill``, ``graphopt quantize --qat``);
they take and return :class:`~graphopt.core.model.Model` objects and plain feed dicts, and keep
the torch side (:class:`~.module.OnnxModule`, :func:`~.distill.distill`, :mod:`.qat`) inside.

Fidelity during training is the held-out SQNR (dB, the worst output) of the student against the
teacher, the same measure the jobs' checks use; training stops early once it reaches
``target_sqnr``. The student with the lowest held-out distillation loss is kept (see
:mod:`.distill`), written back by tensor name (:func:`~.export.write_back`), and the written
graph is run in onnxruntime (ORT_DISABLE_ALL) against the module on held-out feeds.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from graphopt.core.cost import model_cost
from graphopt.core.model import Model
from graphopt.core.verify import sqnr_db

from .distill import DistillConfig, DistillResult, distill
from .export import same_structure, verify_export, write_back
from .module import OnnxModule

logger = logging.getLogger(__name__)

Feeds = Mapping[str, np.ndarray]
#: ``progress(step, total_steps, loss, held_out_sqnr_db_or_None)``
TrainProgress = Callable[[int, int, float, "float | None"], None]

#: default Adam learning rates (digits CNN and PP-OCR cls, see the prototype report in the README)
DISTILL_LR = 1e-3
QAT_LR = 1e-4


@dataclass
class TrainReport:
    """What a recovery run did (``to_json`` goes into the job's JSON under ``training``)."""

    method: str  # "distill" or "qat"
    steps: int
    seconds: float
    stopped: str  # "steps", "time" or "target"
    train_samples: int
    held_out_samples: int
    initial_sqnr_db: float | None
    final_sqnr_db: float | None
    initial_loss: float | None
    final_loss: float | None
    export_rel_err: float
    history: list[tuple[int, float, float | None]] = field(default_factory=list)
    #: the inputs trained on random crops (:func:`random_crop`)
    crop_inputs: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "history"}
        d["history"] = [[s, loss, m] for s, loss, m in self.history]
        return d


def sqnr_metric(s: Mapping[str, torch.Tensor], t: Mapping[str, torch.Tensor]) -> float:
    """The worst output's SQNR (dB) of the student ``s`` against the teacher ``t``."""
    return min(sqnr_db(t[n].numpy(), s[n].numpy()) for n in t)


def mixup(batch: dict[str, torch.Tensor], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Input augmentation for distillation on few unlabeled samples: every float input becomes
    ``(1 - l) x + l x[perm]`` with ``l ~ U(0, 0.4)`` per sample (Zhang et al. 2018, "mixup");
    the teacher labels the mixed input, so no label is invented."""
    n = next(iter(batch.values())).shape[0]
    if n < 2:
        return batch
    lam = torch.rand(n, generator=gen) * 0.4
    perm = torch.randperm(n, generator=gen)
    out = {}
    for k, x in batch.items():
        if x.is_floating_point() and x.dim() >= 1 and x.shape[0] == n:
            w = lam.reshape(n, *([1] * (x.dim() - 1)))
            out[k] = (1 - w) * x + w * x[perm]
        else:
            out[k] = x
    return out


#: fraction of each spatial side a distillation crop keeps (a quarter of the pixels per sample)
CROP_FRACTION = 0.5


def crop_inputs(m: OnnxModule) -> list[str]:
    """The image-like inputs (rank 4: batch, channels, height, width) a crop would cut; whether
    the model is one to train on crops is :func:`dense_on_crops`'s question."""
    return [n for n, d in m.input_dims.items() if len(d) == 4]


def crop_size(side: int, fraction: float = CROP_FRACTION, align: int = 32) -> int:
    """``fraction`` of ``side``, rounded down to a multiple of the largest power of two up to
    ``align`` that divides ``side`` (the strides the full-size input already satisfies: a
    320-pixel side crops to 160, a 96-pixel one to 32, an odd one to any size)."""
    a = math.gcd(side, align)
    return min(side, max(a, int(side * fraction) // a * a))


def random_crop(
    names: Sequence[str], fraction: float = CROP_FRACTION
) -> Callable[[dict[str, torch.Tensor], torch.Generator], dict[str, torch.Tensor]]:
    """Augmentation for fully convolutional models: one random window of :func:`crop_size`
    per batch, the same for every input in ``names`` (samples of a batch share it, so they
    stay one tensor). A training step then costs about ``fraction**2`` of a full-size one, so
    a time budget buys that many more steps over more varied inputs (Krizhevsky et al. 2012
    for random crops; the teacher labels every crop, so no label is invented). Held-out
    fidelity stays measured on the full-size inputs."""

    def aug(batch: dict[str, torch.Tensor], gen: torch.Generator) -> dict[str, torch.Tensor]:
        x = next((batch[n] for n in names if n in batch), None)
        if x is None or x.dim() != 4:
            return batch
        h, w = int(x.shape[2]), int(x.shape[3])
        ch, cw = crop_size(h, fraction), crop_size(w, fraction)
        if (ch, cw) == (h, w):
            return batch
        y0 = int(torch.randint(0, h - ch + 1, (1,), generator=gen))
        x0 = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
        return {
            k: v[:, :, y0 : y0 + ch, x0 : x0 + cw]
            if k in names and v.dim() == 4 and tuple(v.shape[2:]) == (h, w)
            else v
            for k, v in batch.items()
        }

    return aug


def _augmentation(
    mix: bool, crop: Sequence[str]
) -> Callable[[dict[str, torch.Tensor], torch.Generator], dict[str, torch.Tensor]] | None:
    if not crop:
        return mixup if mix else None
    cropper = random_crop(crop)
    if not mix:
        return cropper
    return lambda b, g: mixup(cropper(b, g), g)


def dense_on_crops(s_mod: OnnxModule, t_mod: OnnxModule, names: list[str], feed: Feeds) -> bool:
    """Whether a crop of ``feed`` is a training input for this pair: both graphs run on it and
    every output is a dense map (rank 4) whose height and width shrink with the input's, exactly
    (a text detector's probability map, a segmentation). Such a graph is fully convolutional,
    so the teacher's map of a crop is its map of the window, and a classifier (a vector out),
    a recognizer (a sequence out) or a detector with fixed anchor grids is never cropped: a
    fixed-size graph (shapes fixed with ``--input-shape``) qualifies by running, whatever its
    declared dims."""
    batch = {k: torch.from_numpy(np.asarray(v)) for k, v in feed.items()}
    small = random_crop(names)(batch, torch.Generator().manual_seed(0))
    x, c = batch[names[0]], small[names[0]]
    if tuple(c.shape) == tuple(x.shape):
        return False
    try:
        with torch.no_grad():
            full = t_mod.run(batch)
            outs = [full] + [m.run(small) for m in (s_mod, t_mod)]
    except (RuntimeError, ValueError, IndexError, TypeError) as e:
        logger.info("distill: no random crops (%s: %s)", type(e).__name__, e)
        return False
    fy, fx = x.shape[2] / c.shape[2], x.shape[3] / c.shape[3]
    for n in t_mod.output_names:
        f, shapes = outs[0][n], [o[n].shape for o in outs[1:]]
        if f.dim() != 4 or any(tuple(sh) != tuple(shapes[0]) for sh in shapes):
            return False
        h, w = shapes[0][2], shapes[0][3]
        if h * fy != f.shape[2] or w * fx != f.shape[3]:
            return False
    return True


def _config(
    steps: int,
    lr: float,
    time_budget: float | None,
    target_sqnr: float | None,
    batch_size: int,
    eval_every: int | None,
    augment: bool,
    progress: TrainProgress | None,
    crop: Sequence[str] = (),
) -> DistillConfig:
    cb = None
    if progress is not None:
        prog = progress

        def cb(step: int, loss: float, metric: float | None) -> None:
            prog(step, steps, loss, metric)

    return DistillConfig(
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        time_budget_s=time_budget,
        eval_every=eval_every or max(5, min(50, steps // 10)),
        target=target_sqnr,
        augment=_augmentation(augment, crop),
        progress=cb,
    )


def _report(
    method: str,
    res: DistillResult,
    train: Sequence[Feeds],
    held: Sequence[Feeds],
    err: float,
) -> TrainReport:
    return TrainReport(
        method=method,
        steps=res.steps,
        seconds=res.seconds,
        stopped=res.stopped,
        train_samples=_count(train),
        held_out_samples=_count(held),
        initial_sqnr_db=res.initial_metric,
        final_sqnr_db=res.best_metric,
        initial_loss=res.initial_loss,
        final_loss=res.best_loss,
        export_rel_err=err,
        history=list(res.history),
    )


def _count(feeds: Sequence[Feeds]) -> int:
    return sum(
        min((np.asarray(v).shape[0] if np.ndim(v) else 1) for v in f.values()) for f in feeds
    )


#: models with fewer weight bytes train on one torch thread unless told otherwise: their kernels
#: are too small to split, and OpenMP threads that contend with other processes cost more than
#: they give (digits CNN, 2 loaded cores: 100 steps in 65 s on 2 threads, 6 s on 1)
SMALL_MODEL_BYTES = 4 << 20


def weight_bytes(model: Model) -> int:
    """Bytes of the constant inputs of the model's nodes (``graphopt inspect``'s
    ``param_bytes``): weights held in Constant nodes count too (PP-OCR's exports have no
    initializers, so :meth:`Model.param_bytes` read 0 bytes and the 4.7 MB det model trained
    on one thread)."""
    return int(model_cost(model).param_bytes)


def busy() -> bool:
    """Whether other work keeps most cores busy (1-minute load average over 3/4 of them): then
    OpenMP threads wait on each other's descheduled peers and one thread is faster (PP-OCR det
    distillation at load 4-5 on 2 cores: 2 threads ran random crops no faster than 1 thread ran
    full images with 4x the pixels)."""
    try:
        return os.getloadavg()[0] > 0.75 * (os.cpu_count() or 1)
    except OSError:
        return False


def _threads(threads: int | None, model: Model) -> int:
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    elif weight_bytes(model) < SMALL_MODEL_BYTES or busy():
        torch.set_num_threads(1)
    return old


def distill_model(
    student: Model,
    teacher: Model,
    train: Sequence[Feeds],
    held_out: Sequence[Feeds],
    *,
    steps: int = 300,
    lr: float = DISTILL_LR,
    time_budget: float | None = None,
    target_sqnr: float | None = None,
    batch_size: int = 16,
    eval_every: int | None = None,
    augment: bool = True,
    crop: bool = False,
    threads: int | None = None,
    progress: TrainProgress | None = None,
) -> tuple[Model, TrainReport]:
    """Fine-tune ``student`` to reproduce ``teacher`` on unlabeled ``train`` feeds.

    Args:
        student: the compressed model (e.g. pruned); not changed.
        teacher: the original model (same inputs and outputs).
        train: unlabeled inputs (feed dicts, samples on axis 0).
        held_out: inputs for the running fidelity and the choice of the kept student.
        steps: Adam steps (each on ``batch_size`` samples).
        lr: Adam learning rate (cosine decay to 0 over ``steps``).
        time_budget: stop after this many seconds.
        target_sqnr: stop once the held-out SQNR of every output reaches this (dB).
        augment: mix pairs of inputs (:func:`mixup`); the teacher labels the mixes.
        crop: train on random crops (:func:`random_crop`) of the image inputs when the model
            maps images to dense maps of their size (:func:`dense_on_crops`). Off by default:
            on PP-OCR det pruned 30% (150 s, one thread, load 3.5) half-side crops ran 3.1x
            the steps (270 vs 87) and ended lower (map IoU 0.866 vs 0.894, 10.4 vs 11.3 dB).
        threads: torch threads while training (default: 1 for models under
            :data:`SMALL_MODEL_BYTES` of weights, else torch's).
        progress: ``progress(step, steps, loss, held_out_sqnr)`` after every step.

    Returns:
        The trained student (same graph, new weights) and the :class:`TrainReport`.
    """
    old = _threads(threads, teacher)
    try:
        t0 = time.perf_counter()
        s_proto, t_proto = student.to_onnx(), teacher.to_onnx()
        s_mod, t_mod = OnnxModule(s_proto), OnnxModule(t_proto)
        names = crop_inputs(t_mod) if crop and train else []
        if names and not dense_on_crops(s_mod, t_mod, names, train[0]):
            names = []
        cfg = _config(
            steps, lr, time_budget, target_sqnr, batch_size, eval_every, augment, progress, names
        )
        res = distill(s_mod, t_mod, train, held_out, cfg, metric=sqnr_metric)
        out = write_back(s_mod, s_proto)
        diffs = same_structure(s_proto, out)
        if diffs:
            raise AssertionError(f"distillation changed the graph: {diffs}")
        err = max(
            verify_export(s_mod, out, list(held_out[:2]) or list(train[:1]), rtol=1e-3).values()
        )
        logger.info(
            "distill: %d steps in %.1f s (%s)", res.steps, time.perf_counter() - t0, res.stopped
        )
        report = _report("distill", res, train, held_out, err)
        report.crop_inputs = names
        return Model.from_onnx(out), report
    finally:
        torch.set_num_threads(old)


def qat_model(
    qdq: Model,
    float_model: Model,
    train: Sequence[Feeds],
    held_out: Sequence[Feeds],
    *,
    steps: int = 300,
    lr: float = QAT_LR,
    time_budget: float | None = None,
    target_sqnr: float | None = None,
    batch_size: int = 16,
    eval_every: int | None = None,
    threads: int | None = None,
    progress: TrainProgress | None = None,
) -> tuple[Model, TrainReport]:
    """Quantization-aware training of the static path's QDQ model, distilled from ``float_model``
    (LSQ scales at ``lr / 100``, latent float weights at ``lr``), exported as the same QDQ graph.

    Args:
        qdq: the static int8 QDQ model (``quantize(...).model``); not changed.
        float_model: the float model it was quantized from (``quantize(...).float_model``).
        train, held_out, steps, lr, time_budget, target_sqnr, batch_size, eval_every, threads,
            progress: as :func:`distill_model`.

    Returns:
        The trained QDQ model (same nodes, initializer names, shapes and dtypes) and the report.
    """
    from .qat import QatModule, export_qdq

    old = _threads(threads, float_model)
    try:
        q_proto, f_proto = qdq.to_onnx(), float_model.to_onnx()
        student = QatModule(q_proto, f_proto)
        teacher = OnnxModule(f_proto)
        cfg = _config(steps, lr, time_budget, target_sqnr, batch_size, eval_every, False, progress)
        res = distill(
            student,
            teacher,
            train,
            held_out,
            cfg,
            metric=sqnr_metric,
            params=student.param_groups(lr),
        )
        out = export_qdq(student)
        diffs = same_structure(q_proto, out)
        if diffs:
            raise AssertionError(f"QAT changed the graph: {diffs}")
        err = max(
            verify_export(student, out, list(held_out[:2]) or list(train[:1]), rtol=1e-3).values()
        )
        return Model.from_onnx(out), _report("qat", res, train, held_out, err)
    finally:
        torch.set_num_threads(old)


@dataclass
class RoundingReport:
    """What :func:`adaround_model` did (``to_json`` goes into the job's JSON under ``rounding``)."""

    method: str  # "adaround"
    layers: int
    seconds: float
    samples: int
    #: per layer: (node, held-out relative MSE with nearest rounding, with learned rounding,
    #: fraction of weights rounded the other way)
    per_layer: list[tuple[str, float, float, float]] = field(default_factory=list)
    export_rel_err: float = 0.0

    def to_json(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "per_layer"}
        d["per_layer"] = [
            {"node": n, "mse_nearest": a, "mse_adaround": b, "flipped": f}
            for n, a, b, f in self.per_layer
        ]
        return d


def adaround_model(
    qdq: Model,
    float_model: Model,
    samples: Sequence[Feeds],
    *,
    iters: int = 1000,
    held_out: int = 16,
    threads: int | None = None,
    progress: TrainProgress | None = None,
) -> tuple[Model, RoundingReport]:
    """Learned rounding (AdaRound, Nagel et al. 2020) of every int8 Conv/Gemm weight of the
    static QDQ model, layer by layer in graph order, each on the inputs it receives in the model
    whose earlier layers are already rounded (their own fake-quantized activations), the loss
    after a following Relu as the paper does. Same grid and scales as the static path: only
    the weight integers change (never more than one step from nearest), in the same QDQ graph.
    A layer whose learned rounding is worse than nearest on the held-out samples keeps nearest.

    Args:
        qdq: the static int8 QDQ model; not changed.
        float_model: the float model it was quantized from (reference weights and outputs).
        samples: calibration inputs; the last ``held_out`` samples measure each layer's
            held-out reconstruction error.
        iters: Adam iterations per layer (batches of 32 input samples).
        threads: torch threads (default: 1 for small models).
        progress: ``progress(layer, layers, mse_adaround, None)`` after every layer.
    """
    from .adaround import adaround
    from .distill import batchable, batches, split_samples
    from .fakequant import broadcast_param
    from .qat import QatModule, export_qdq

    old = _threads(threads, float_model)
    try:
        t0 = time.perf_counter()
        q_proto, f_proto = qdq.to_onnx(), float_model.to_onnx()
        qm = QatModule(q_proto, f_proto).eval()
        fm = OnnxModule(f_proto, fuse=False).eval()
        one = split_samples(samples)
        feeds = batches(one, 16, batchable(qm, one[:2]))

        def inputs_of(name: str) -> torch.Tensor:
            with torch.no_grad():
                return torch.cat([qm.run(f, [name])[name] for f in feeds])

        work = []
        for step in qm.steps:
            if step.op not in ("Conv", "Gemm") or len(step.inputs) < 2:
                continue
            src = qm.producer(step.inputs[1] or "")
            if src is None or src.op != "FakeQuantWeight":
                continue
            ref = next((s for s in fm.steps if s.name == step.name), None)
            if ref is not None and ref.inputs[1]:
                work.append((step, src, ref))
        report = RoundingReport("adaround", len(work), 0.0, len(one))
        k = min(held_out, max(len(one) // 4, 1))
        for i, (step, src, ref) in enumerate(work):
            latent, s_name = src.inputs[0] or "", src.inputs[1] or ""
            wq = qm.qmap.weights[latent]
            x = inputs_of(step.inputs[0] or "")
            b = None
            if len(step.inputs) > 2 and step.inputs[2]:
                with torch.no_grad():
                    b = qm.run(feeds[0], [step.inputs[2]])[step.inputs[2]]
            users = [s for s in fm.steps if step.outputs[0] in s.inputs]
            act = torch.relu if users and all(u.op == "Relu" for u in users) else None
            w_ref = fm.tensor(ref.inputs[1] or "").detach()
            scale = broadcast_param(qm.tensor(s_name).detach().abs(), w_ref, wq.axis)
            fn = step.fn

            def layer(inp: torch.Tensor, w: torch.Tensor, fn: Any = fn, b: Any = b) -> torch.Tensor:
                return fn(inp, w, b)  # type: ignore[no-any-return]

            r = adaround(
                layer,
                w_ref,
                x[: len(x) - k],
                x[len(x) - k :],
                scale,
                wq.qmin,
                wq.qmax,
                act=act,
                iters=iters,
            )
            # a layer whose learned rounding does worse on the held-out inputs keeps nearest
            better = r.mse_adaround <= r.mse_nearest
            w_int = r.w_int if better else r.nearest_int
            with torch.no_grad():
                qm.tensor(latent).copy_(w_int.to(torch.float32) * scale)
            report.per_layer.append(
                (
                    step.name,
                    r.mse_nearest,
                    r.mse_adaround if better else r.mse_nearest,
                    r.flipped if better else 0.0,
                )
            )
            if progress is not None:
                progress(i + 1, len(work), r.mse_adaround, None)
        out = export_qdq(qm)
        diffs = same_structure(q_proto, out)
        if diffs:
            raise AssertionError(f"learned rounding changed the graph: {diffs}")
        report.export_rel_err = max(verify_export(qm, out, one[:2], rtol=1e-3).values())
        report.seconds = time.perf_counter() - t0
        return Model.from_onnx(out), report
    finally:
        torch.set_num_threads(old)
