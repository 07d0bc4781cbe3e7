"""Rendered OCR data for benchmarks: text lines and pages drawn with PIL, PP-OCR preprocessing,
CTC decoding and character accuracy. Shared by the quantization and pruning benchmarks.

Everything is deterministic for a given seed. Text is drawn with a DejaVu font (Debian
``fonts-dejavu-core``), from words and numbers whose characters are all in the PP-OCRv4 recognizer's
dictionary (read from the model's ``character`` metadata), so ground truth is known exactly.

    from bench.ocr_data import text_lines, rec_batch, ctc_decode, char_accuracy
    lines = text_lines(64, seed=1)                  # [(HxWx3 uint8 image, "text"), ...]
    x = rec_batch([img for img, _ in lines[:8]])    # (8, 3, 48, 320) float32, PP-OCR normalized
"""

from __future__ import annotations

import glob
import math
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

WORDS = (
    "the quick brown fox jumps over lazy dog invoice total amount date number street road city "
    "price order customer account payment balance receipt station market office hotel river "
    "north south east west green black white orange yellow purple model graph optimize tensor "
    "compiler kernel matrix vector layer network camera photo letter paper window garden "
    "Monday Friday January October Berlin London Paris Tokyo Beijing Shanghai Sydney Toronto "
    "VAT ID NO TEL FAX USD EUR GBP Qty Item Unit Cash Card Change Thank you Welcome"
).split()
PUNCT = [",", ".", ":", "-", "/", "#", "%", "(", ")", "+"]


def font_path() -> str:
    """A TrueType font available on this machine (DejaVu Sans preferred)."""
    for pat in (
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/truetype/dejavu/*.ttf",
        "/usr/share/fonts/**/*.ttf",
    ):
        hits = sorted(glob.glob(pat, recursive=True))
        if hits:
            return hits[0]
    try:  # matplotlib ships DejaVu
        import matplotlib

        p = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
        if p.is_file():
            return str(p)
    except ImportError:
        pass
    raise FileNotFoundError("no TrueType font found: install fonts-dejavu-core")


@lru_cache(maxsize=4)
def rec_characters(model_path: str | None = None) -> tuple[str, ...]:
    """The recognizer's CTC alphabet: index 0 'blank', then the dictionary, then ' '."""
    import onnx

    if model_path is None:
        from graphopt.fixtures import real_model

        model_path = str(real_model("rec")[0])
    m = onnx.load(model_path, load_external_data=False)
    meta = {p.key: p.value for p in m.metadata_props}
    chars = meta["character"].splitlines()
    return tuple(["blank", *chars, " "])


def _random_text(rng: np.random.Generator, alphabet: set[str]) -> str:
    parts: list[str] = []
    for _ in range(int(rng.integers(1, 5))):
        r = rng.random()
        if r < 0.6:
            w = str(rng.choice(WORDS))
            if rng.random() < 0.2:
                w = w.upper()
        elif r < 0.85:
            w = str(int(rng.integers(0, 100000)))
            if rng.random() < 0.3:
                w = f"{w}.{int(rng.integers(0, 100)):02d}"
        else:
            w = str(rng.choice(WORDS)) + str(rng.choice(PUNCT))
        parts.append(w)
    text = " ".join(parts)
    text = "".join(c for c in text if c in alphabet)
    return text.strip() or "0"


def render_line(
    text: str, height: int = 48, seed: int = 0, font_size: int | None = None
) -> np.ndarray:
    """Draw ``text`` as one dark-on-light line; returns an HxWx3 uint8 RGB image (H ~ height)."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    size = font_size or int(rng.integers(int(height * 0.55), int(height * 0.75)))
    font = ImageFont.truetype(font_path(), size)
    x0, y0, x1, y1 = font.getbbox(text)
    pad_x, pad_y = int(rng.integers(4, 12)), int(rng.integers(3, 8))
    w, h = x1 - x0 + 2 * pad_x, y1 - y0 + 2 * pad_y
    bg = tuple(int(v) for v in rng.integers(200, 256, size=3))
    fg = tuple(int(v) for v in rng.integers(0, 70, size=3))
    img = Image.new("RGB", (int(w), int(h)), bg)
    ImageDraw.Draw(img).text((pad_x - x0, pad_y - y0), text, font=font, fill=fg)
    arr = np.asarray(img, dtype=np.float32)
    arr += rng.normal(0, 4.0, size=arr.shape)  # a little sensor noise
    return np.clip(arr, 0, 255).astype(np.uint8)


def text_lines(n: int, seed: int = 0, max_ratio: float = 320 / 48) -> list[tuple[np.ndarray, str]]:
    """``n`` rendered lines with their ground truth; lines wider than ``max_ratio`` are re-drawn."""
    rng = np.random.default_rng(seed)
    alphabet = set(rec_characters()[1:-1]) | {" "}
    out: list[tuple[np.ndarray, str]] = []
    while len(out) < n:
        text = _random_text(rng, alphabet)
        img = render_line(text, seed=int(rng.integers(0, 2**31)))
        if img.shape[1] / img.shape[0] <= max_ratio:
            out.append((img, text))
    return out


def rec_preprocess(img: np.ndarray, width: int | None = 320, height: int = 48) -> np.ndarray:
    """PP-OCR rec normalization of one HxWx3 uint8 image -> (3, height, W) float32 in [-1, 1].

    With ``width`` the image is padded (zeros) to that width, as RapidOCR does; with None the width
    is the resized image's own width (variable-width calibration data)."""
    from PIL import Image

    h, w = img.shape[:2]
    rw = int(math.ceil(height * w / h))
    if width is not None:
        rw = min(rw, width)
    im = np.asarray(
        Image.fromarray(img).resize((rw, height), Image.Resampling.BILINEAR), dtype=np.float32
    )
    im = (im.transpose(2, 0, 1) / 255.0 - 0.5) / 0.5
    out = np.zeros((3, height, width or rw), np.float32)
    out[:, :, :rw] = im
    return out


def rec_batch(imgs: Sequence[np.ndarray], width: int = 320) -> np.ndarray:
    return np.stack([rec_preprocess(i, width) for i in imgs]).astype(np.float32)


def ctc_decode(preds: np.ndarray, chars: Sequence[str] | None = None) -> list[str]:
    """Greedy CTC decoding of (N, T, C) probabilities (blank = 0, repeats merged, stripped)."""
    chars = chars or rec_characters()
    idx = preds.argmax(axis=2)
    out = []
    for row in idx:
        keep = np.ones(len(row), bool)
        keep[1:] = row[1:] != row[:-1]
        keep &= row != 0
        out.append("".join(chars[i] for i in row[keep]).strip())
    return out


def edit_distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def char_accuracy(preds: Sequence[str], truths: Sequence[str]) -> float:
    """1 - total edit distance / total ground-truth characters (can be < 0 only in theory)."""
    errs = sum(edit_distance(p, t) for p, t in zip(preds, truths, strict=False))
    total = sum(len(t) for t in truths)
    return 1.0 - errs / max(total, 1)


def render_page(
    lines: Sequence[str], seed: int = 0, width: int = 640, line_height: int = 40
) -> np.ndarray:
    """A page (HxWx3 uint8, RGB) with one text line per entry, left-aligned, for detection and
    end-to-end OCR."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    font = ImageFont.truetype(font_path(), int(line_height * 0.6))
    h = line_height * (len(lines) + 1)
    img = Image.new("RGB", (width, h), (250, 250, 245))
    d = ImageDraw.Draw(img)
    for i, t in enumerate(lines):
        d.text(
            (int(rng.integers(10, 40)), line_height // 2 + i * line_height),
            t,
            font=font,
            fill=(10, 10, 10),
        )
    return np.asarray(img)


def pages(n: int, seed: int = 0, lines_per_page: int = 6) -> list[tuple[np.ndarray, list[str]]]:
    """``n`` rendered pages with the text of their lines (top to bottom)."""
    rng = np.random.default_rng(seed)
    alphabet = set(rec_characters()[1:-1]) | {" "}
    out = []
    for k in range(n):
        lines = [_random_text(rng, alphabet) for _ in range(lines_per_page)]
        out.append((render_page(lines, seed=seed * 1000 + k), lines))
    return out


def det_preprocess(img: np.ndarray, size: int = 320) -> np.ndarray:
    """PP-OCR det normalization: resize to size x size, (x/255 - 0.5)/0.5, NCHW float32."""
    from PIL import Image

    im = np.asarray(
        Image.fromarray(img).resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32
    )
    return ((im / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)[None].astype(np.float32)


def cls_preprocess(img: np.ndarray) -> np.ndarray:
    """PP-OCR cls normalization: (3, 48, 192), padded, [-1, 1]."""
    return rec_preprocess(img, width=192)
