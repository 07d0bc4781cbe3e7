"""Interleaved latency and `optimize --bench` (figures are never asserted, only their shape)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from graphopt.cli import main
from graphopt.core.feeds import random_feeds
from graphopt.core.latency import Timings, interleaved, interleaved_latency, round_order
from graphopt.core.loader import load
from graphopt.fixtures import fixture_path


def test_interleaved_latency_reports_every_candidate() -> None:
    m = load(fixture_path("cnn.onnx"))
    res = interleaved_latency({"a": m, "b": m.clone()}, random_feeds(m), runs=3, warmup=1)
    assert set(res) == {"a", "b"}
    assert all(set(v) == {"disable_all", "all"} and min(v.values()) > 0 for v in res.values())


def test_optimize_bench_json(tmp_path: Path, capsys) -> None:
    assert (
        main(
            [
                "optimize",
                str(fixture_path("cnn.onnx")),
                "-o",
                str(tmp_path / "o.onnx"),
                "--bench",
                "--json",
            ]
        )
        == 0
    )
    lat = json.loads(capsys.readouterr().out)["latency_ms"]
    assert set(lat) == {"before", "after"} and set(lat["after"]) == {"disable_all", "all"}


def test_round_order_balances_positions() -> None:
    # two candidates: each runs first in half of the rounds
    firsts = [round_order(["a", "b"], r)[0] for r in range(8)]
    assert firsts.count("a") == firsts.count("b") == 4
    # three: every permutation in six rounds, so no fixed neighbour either
    orders = {tuple(round_order(["a", "b", "c"], r)) for r in range(6)}
    assert len(orders) == 6


def test_interleaved_calls_warmup_then_rounds_and_ratios() -> None:
    calls: list[str] = []
    t = interleaved(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, runs=4, warmup=2
    )
    assert calls[:4] == ["a", "b", "a", "b"]  # warm-up
    assert calls[4:] == ["a", "b", "b", "a", "b", "a", "a", "b"]  # A B, B A, rotated: B A, A B
    assert t.count("a") == t.count("b") == 4 and t.rounds["a"] == [0, 1, 2, 3]
    fake = Timings({"a": [2.0, 4.0, 2.0], "b": [1.0, 1.0, 2.0]}, {"a": [0, 1, 2], "b": [0, 1, 2]})
    assert fake.ratio("a", "b") == 2.0  # median 2 / median 1
    assert fake.ratio("a", "b", paired=True) == 2.0  # median of 2, 4, 1
    assert fake.medians_ms() == {"a": 2000.0, "b": 1000.0}


def test_interleaved_budget_and_per_candidate_limit() -> None:
    slow_calls = []

    def slow() -> None:
        slow_calls.append(1)
        time.sleep(0.01)

    t = interleaved(
        {"slow": slow, "fast": lambda: None},
        runs=10,
        warmup=0,
        max_seconds={"slow": 0.02},
        min_runs=3,
    )
    assert t.count("fast") == 10 and 3 <= t.count("slow") < 10
    t2 = interleaved({"x": lambda: time.sleep(0.001)}, runs=2, warmup=0, budget_s=0.05, max_runs=20)
    assert 2 < t2.count("x") <= 20


def test_interleaved_thread_cpu_clock_ignores_sleeping() -> None:
    # a sleeping candidate takes wall time but no CPU time of the calling thread: the clock a
    # loaded machine cannot inflate
    def sleep() -> None:
        time.sleep(0.02)

    wall = interleaved({"sleep": sleep}, runs=3, warmup=0)
    cpu = interleaved({"sleep": sleep}, runs=3, warmup=0, clock=time.thread_time)
    assert wall.median_ms("sleep") >= 15.0
    assert cpu.median_ms("sleep") < 5.0
