"""Interleaved latency and `optimize --bench` (figures are never asserted, only their shape)."""

from __future__ import annotations

import json
from pathlib import Path

from graphopt.cli import main
from graphopt.core.feeds import random_feeds
from graphopt.core.latency import interleaved_latency
from graphopt.core.loader import load
from graphopt.fixtures import fixture_path


def test_interleaved_latency_reports_every_candidate() -> None:
    m = load(fixture_path("cnn.onnx"))
    res = interleaved_latency({"a": m, "b": m.clone()}, random_feeds(m), runs=3, warmup=1)
    assert set(res) == {"a", "b"}
    assert all(set(v) == {"disable_all", "all"} and min(v.values()) > 0 for v in res.values())


def test_optimize_bench_json(tmp_path: Path, capsys) -> None:
    assert main(["optimize", str(fixture_path("cnn.onnx")), "-o", str(tmp_path / "o.onnx"),
                 "--bench", "--json"]) == 0
    lat = json.loads(capsys.readouterr().out)["latency_ms"]
    assert set(lat) == {"before", "after"} and set(lat["after"]) == {"disable_all", "all"}
