"""graphopt's transformer quantization modes against onnxruntime's quantizers (issue 13).

Per model: fp32; ``onnxruntime.quantization.quantize_dynamic`` per tensor and per channel (int8
weights); graphopt dynamic (portable DynamicQuantizeLinear + MatMulInteger, and ``--target ort``
DynamicQuantizeMatMul), graphopt static (calibrated QDQ, where calibration data exists) and, on
the decoder, onnxruntime's 4-bit weight quantizer (``MatMulNBitsQuantizer``, block 128 and 32)
against graphopt weight-only int4 (round-to-nearest and GPTQ, MatMulNBits and portable
DequantizeLinear) and int8.

Figures: latency (onnxruntime ORT_ENABLE_ALL, one thread, spinning off, all candidates of a model
interleaved, median; ``speedup`` = fp32 / candidate, paired per round), SQNR of the first output
against fp32 on held-out inputs, model file size and its ratio to fp32, next-token top-1
agreement with fp32 on held-out decode steps (decoder), accuracy (digits transformer).

``run(models, quick)`` returns one dict per (model, candidate) (bench/transformers.py imports
it); run alone it writes bench/results/transformers_quant.md and .json.
Usage: python bench/transformers_quant.py [--quick] [--models bert-mini,...]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
# run as a script, bench/ is first on the path and its transformers.py would shadow the package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

from graphopt import corpus  # noqa: E402
from graphopt.core.latency import interleaved  # noqa: E402
from graphopt.core.output import atomic_write_text  # noqa: E402
from graphopt.core.session import make_session  # noqa: E402
from graphopt.core.verify import sqnr_db  # noqa: E402
from graphopt.fixtures import fixture_path  # noqa: E402

DEFAULT_MODELS = (
    "bert-mini",
    "whisper-tiny-encoder",
    "gpt2-small-past",
    "gpt2-trained-bytes",
    "digits-transformer",
)
DECODER = "gpt2-small-past"
TRAINED = "gpt2-trained-bytes"
DIGITS = "digits-transformer"
#: the trained decoder: GPT-2 on bytes (vocabulary 256), 2 layers, 128 wide, 4 heads
TRAINED_CFG = dict(vocab_size=256, n_positions=128, n_embd=128, n_layer=2, n_head=4)
TRAINED_STEPS = 200
TRAINED_SEQ = 64

Feed = dict[str, np.ndarray]


# ---------------------------------------------------------------------- data


def _stdlib_text(modules: Sequence[str]) -> bytes:
    import importlib
    import inspect

    return b"\n".join(inspect.getsource(importlib.import_module(m)).encode() for m in modules)


#: training text (Python's own sources: on every machine, deterministic per Python version)
TRAIN_MODULES = ("argparse", "json.decoder", "json.encoder", "dataclasses", "textwrap", "shlex")
#: held-out text (other modules)
HELD_MODULES = ("statistics", "fractions", "string", "calendar")


def trained_decoder() -> Path:
    """A GPT-2 trained for :data:`TRAINED_STEPS` steps on bytes of Python's sources (seeded,
    CPU), exported ``input_ids [1, S] -> logits [1, S, 256]`` (TorchScript, opset 17) into the
    graphopt cache on first use: a decoder whose next-token predictions mean something, unlike
    the random-weight corpus export, whose flat logits flip under any weight noise."""
    import hashlib

    from graphopt.fixtures import cache_dir

    key = hashlib.sha256(
        json.dumps(
            [TRAINED_CFG, TRAINED_STEPS, TRAINED_SEQ, TRAIN_MODULES, sys.version_info[:2]]
        ).encode()
    ).hexdigest()[:10]
    dest = cache_dir("bench") / f"gpt2-trained-bytes-{key}.onnx"
    if dest.is_file():
        return dest
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel  # type: ignore[attr-defined]

    torch.manual_seed(0)
    # config keywords in one untyped dict (transformers' stubs type each keyword differently)
    settings: dict[str, Any] = {
        **TRAINED_CFG,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "attn_implementation": "eager",
    }
    cfg = GPT2Config(**settings)
    lm = GPT2LMHeadModel(cfg)
    data = torch.tensor(list(_stdlib_text(TRAIN_MODULES)), dtype=torch.long)
    opt = torch.optim.AdamW(lm.parameters(), lr=3e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    lm.train()
    for step in range(TRAINED_STEPS):
        idx = torch.randint(0, len(data) - TRAINED_SEQ - 1, (16,), generator=g)
        batch = torch.stack([data[i : i + TRAINED_SEQ + 1] for i in idx.tolist()])
        loss = lm(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        for group in opt.param_groups:
            group["lr"] = 3e-3 * (1 - step / TRAINED_STEPS)
    lm.eval()

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lm = lm

        def forward(self, input_ids):  # noqa: ANN001, ANN202
            b, n = input_ids.shape
            pos = torch.arange(n, dtype=torch.long).unsqueeze(0).expand(b, n)
            mask = torch.ones_like(input_ids)
            return self.lm(
                input_ids=input_ids, attention_mask=mask, position_ids=pos, use_cache=False
            ).logits

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".tmp.onnx")
    with torch.no_grad():
        torch.onnx.export(
            Logits(),
            (batch[:1, :-1],),
            str(tmp),
            opset_version=17,
            dynamo=False,
            input_names=["input_ids"],
            output_names=["logits"],
            dynamic_axes={"input_ids": {0: "batch", 1: "sequence"}},
        )
    tmp.replace(dest)
    print(f"trained decoder: final loss {float(loss):.3f} -> {dest}", file=sys.stderr)
    return dest


def _byte_feeds(modules: Sequence[str], n: int, seed: int) -> list[Feed]:
    text = np.frombuffer(_stdlib_text(modules), np.uint8).astype(np.int64)
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(text) - TRAINED_SEQ, n)
    return [{"input_ids": text[s : s + TRAINED_SEQ][None]} for s in starts]


def _prefill(n: int, seq: int, seed: int) -> list[Feed]:
    """Decoder prompts of ``seq`` tokens with an empty cache (calibration for GPTQ/static)."""
    e = corpus.entry(DECODER)
    rng = np.random.default_rng(seed)
    pnames = [k for k in e.feed_shapes if k.startswith("past_key_values.")]
    _, heads, _, hd = e.feed_shapes[pnames[0]]
    out = []
    for _ in range(n):
        ids = corpus._zipf_ids(rng, seq, 256, 50257).reshape(1, seq)  # noqa: SLF001
        f: Feed = {
            "input_ids": ids,
            "attention_mask": np.ones((1, seq), np.int64),
            "position_ids": np.arange(seq, dtype=np.int64)[None],
        }
        for p in pnames:
            f[p] = np.zeros((1, heads, 0, hd), np.float32)
        out.append(f)
    return out


def _data(name: str, quick: bool) -> tuple[Path, list[Feed], list[Feed], dict[str, Any]]:
    """``(fp32 path, calibration feeds, held-out feeds, extra)``."""
    if name == DIGITS:
        ev = np.load(fixture_path("digits_eval.npz"))
        cal = np.load(fixture_path("digits_calib.npz"))
        n = 180 if quick else len(ev["x"])
        held = [{"x": ev["x"][:n]}]
        calib = [{"x": cal["x"][i : i + 32]} for i in range(0, len(cal["x"]), 32)]
        return fixture_path("digits_transformer.onnx"), calib, held, {"labels": ev["y"][:n]}
    if name == TRAINED:
        n = 8 if quick else 32
        return (
            trained_decoder(),
            _byte_feeds(TRAIN_MODULES, n, seed=2),
            _byte_feeds(HELD_MODULES, n, seed=1),
            {},
        )
    path = corpus.get(name)
    if name == DECODER:
        held = corpus.feeds(name, n=24 if quick else 64, seed=1)
        return path, _prefill(8 if quick else 32, 64, seed=5), held, {}
    batch = 1 if name.startswith("whisper") else None
    held = corpus.feeds(name, n=2 if quick else 4, seed=1, batch=batch)
    calib = corpus.feeds(name, n=2 if quick else 8, seed=2, batch=batch)
    return path, calib, held, {}


# ---------------------------------------------------------------------- candidates


def _ort_dynamic(src: Path, dst: Path, per_channel: bool) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), per_channel=per_channel, weight_type=QuantType.QInt8)


def _ort_4bit(src: Path, dst: Path, block: int) -> None:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(onnx.load(str(src)), bits=4, block_size=block)
    q.process()
    q.model.save_model_to_file(str(dst), use_external_data_format=False)


def _go(fn: Callable[..., Any], src: Path, dst: Path, **kw: Any) -> None:
    fn(str(src), output=dst, verify_output=False, measure_speed=False, **kw)


def _candidates(name: str, calib: list[Feed], quick: bool) -> dict[str, Callable[..., object]]:
    from graphopt.jobs.quantize import quantize
    from graphopt.jobs.quantize_modes import quantize_dynamic, quantize_weight_only_job

    c: dict[str, Callable[..., object]] = {
        "ort quantize_dynamic per-tensor": lambda s, d: _ort_dynamic(s, d, False),
        "ort quantize_dynamic per-channel": lambda s, d: _ort_dynamic(s, d, True),
        "graphopt dynamic": lambda s, d: _go(quantize_dynamic, s, d),
        "graphopt dynamic --target ort": lambda s, d: _go(quantize_dynamic, s, d, target="ort"),
    }
    decoder = name in (DECODER, TRAINED)
    if not decoder and not (quick and name.startswith("whisper")):
        c["graphopt static"] = lambda s, d: quantize(
            str(s), calib, output=d, verify_output=False, measure_speed=False, min_sqnr=0
        )
    if decoder:
        c.update(
            {
                "ort MatMulNBits 4-bit b128": lambda s, d: _ort_4bit(s, d, 128),
                "ort MatMulNBits 4-bit b32": lambda s, d: _ort_4bit(s, d, 32),
                "graphopt int4 b32 rtn (ort)": lambda s, d: _go(
                    quantize_weight_only_job, s, d, target="ort"
                ),
                "graphopt int4 b32 gptq (ort)": lambda s, d: _go(
                    quantize_weight_only_job, s, d, calib=calib, rounding="gptq", target="ort"
                ),
                "graphopt int4 b32 gptq (portable)": lambda s, d: _go(
                    quantize_weight_only_job, s, d, calib=calib, rounding="gptq"
                ),
                "graphopt int4 b16 gptq head int8 (ort)": lambda s, d: _go(
                    quantize_weight_only_job,
                    s,
                    d,
                    calib=calib,
                    rounding="gptq",
                    target="ort",
                    block_size=16,
                    head_bits=8,
                ),
                "graphopt int8 b32 rtn (ort)": lambda s, d: _go(
                    quantize_weight_only_job, s, d, bits=8, target="ort"
                ),
            }
        )
    return c


# ---------------------------------------------------------------------- measurement


def _outputs(sess: Any, feeds: Sequence[Feed], first_only: bool = True) -> list[np.ndarray]:
    names = {i.name for i in sess.get_inputs()}
    out_name = [sess.get_outputs()[0].name]
    return [
        np.asarray(sess.run(out_name, {k: v for k, v in f.items() if k in names})[0]) for f in feeds
    ]


def measure(name: str, quick: bool = False, workdir: Path | None = None) -> list[dict[str, Any]]:
    """Every candidate of one model: a row each (see the module docstring)."""
    src, calib, held, extra = _data(name, quick)
    tmp = Path(tempfile.mkdtemp(prefix="tq-", dir=workdir))
    paths: dict[str, Path] = {"fp32": Path(src)}
    build_s: dict[str, float] = {}
    notes: dict[str, str] = {}
    for cand, make in _candidates(name, calib, quick).items():
        dst = tmp / f"{len(paths)}.onnx"
        t0 = time.perf_counter()
        try:
            make(Path(src), dst)
        except Exception as exc:  # noqa: BLE001 - a failed candidate is a row, not a crash
            notes[cand] = f"failed: {str(exc).splitlines()[0][:160]}"
            continue
        build_s[cand] = time.perf_counter() - t0
        paths[cand] = dst
    sessions = {k: make_session(str(p), "all", 1) for k, p in paths.items()}
    refs = _outputs(sessions["fp32"], held)
    rows: dict[str, dict[str, Any]] = {}
    fp32_size = Path(src).stat().st_size
    for k, sess in sessions.items():
        outs = _outputs(sess, held)
        r: dict[str, Any] = {
            "model": name,
            "candidate": k,
            "sqnr_db": round(
                sqnr_db(
                    np.concatenate([x.ravel() for x in refs]),
                    np.concatenate([x.ravel() for x in outs]),
                ),
                2,
            ),
            "size_mb": round(paths[k].stat().st_size / 1e6, 2),
            "size_ratio": round(paths[k].stat().st_size / fp32_size, 3),
            "build_s": round(build_s.get(k, 0.0), 1),
        }
        if name == DECODER:  # decode steps: the next token after the cache
            a = np.concatenate([x[:, -1].argmax(-1) for x in refs])
            b = np.concatenate([x[:, -1].argmax(-1) for x in outs])
            r["top1_agreement"] = round(float((a == b).mean()), 3)
        if name == TRAINED:  # every position of held-out text
            a = np.concatenate([x.argmax(-1).ravel() for x in refs])
            b = np.concatenate([x.argmax(-1).ravel() for x in outs])
            r["top1_agreement"] = round(float((a == b).mean()), 3)
        if name == DIGITS:
            r["accuracy"] = round(float((outs[0].argmax(-1) == extra["labels"]).mean()), 4)
        rows[k] = r
    feed = held[0]
    runners = {}
    for k, sess in sessions.items():
        names = {i.name for i in sess.get_inputs()}
        f = {a: v for a, v in feed.items() if a in names}
        runners[k] = lambda s=sess, f=f: s.run(None, f)
    runs = {"whisper-tiny-encoder": 6 if quick else 15}.get(name, 20 if quick else 60)
    t = interleaved(runners, runs=runs, warmup=2)
    for k in sessions:
        rows[k]["latency_ms"] = round(t.median_ms(k), 3)
        rows[k]["speedup"] = round(1.0 / t.ratio(k, "fp32", paired=True), 3)
    out = list(rows.values())
    for cand, why in notes.items():
        out.append({"model": name, "candidate": cand, "note": why})
    return out


def run(models: Sequence[str] = DEFAULT_MODELS, quick: bool = False) -> list[dict[str, Any]]:
    """Rows for every model (see :func:`measure`); a model that cannot be built is one row
    with a ``note``."""
    logging.disable(logging.INFO)  # onnxruntime's quantizers log every node at INFO
    rows: list[dict[str, Any]] = []
    for name in models:
        try:
            rows += measure(name, quick)
        except corpus.CorpusUnavailable as exc:
            rows.append({"model": name, "candidate": "-", "note": f"unavailable: {exc}"})
    return rows


def section(
    models: Sequence[tuple[str, Path, Any]], *, quick: bool, workdir: Path
) -> tuple[dict[str, Any], str]:
    """The ``quant`` section of ``bench/transformers.py``: :func:`run` on the models it benches
    that this module knows (by name; ``workdir`` unused: each measurement has its own folder),
    as (JSON, markdown)."""
    names = [m[0] for m in models]
    chosen = [n for n in DEFAULT_MODELS if n in names or n == "gpt2-trained-bytes"]
    rows = run(chosen, quick)
    return {"rows": rows}, report(rows, "")


def report(rows: Sequence[dict[str, Any]], header: str) -> str:
    cols = [
        "model",
        "candidate",
        "speedup",
        "latency_ms",
        "sqnr_db",
        "top1_agreement",
        "accuracy",
        "size_mb",
        "size_ratio",
        "build_s",
        "note",
    ]
    used = [c for c in cols if any(c in r for r in rows)]
    lines = [header, "", "| " + " | ".join(used) + " |", "|" + "---|" * len(used)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in used) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "transformers_quant.md"))
    a = ap.parse_args()
    rows = run([m for m in a.models.split(",") if m], a.quick)
    import platform

    header = (
        f"# Transformer quantization modes ({time.strftime('%Y-%m-%d')}, {platform.machine()}, "
        f"{'quick' if a.quick else 'full'}; ORT_ENABLE_ALL, 1 thread, interleaved; speedup = "
        "fp32 / candidate)"
    )
    text = report(rows, header)
    atomic_write_text(Path(a.out), text)
    atomic_write_text(Path(a.out).with_suffix(".json"), json.dumps(rows, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
