"""bench/corpus.py's table: runs of a few commands each merge into one table by (model,
command), in corpus then command order, with exit counts per command (issue 14)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_corpus", ROOT / "bench" / "corpus.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_corpus"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_chunks_merge_by_model_and_command(tmp_path: Path) -> None:
    b = _bench()
    first = [
        b.Row("silero-vad", "optimize", "0", "ok, exact", "689 -> 100", reason="a | b"),
        b.Row("ppocrv4-det", "optimize", "0", "ok", "672 -> 221", seconds=17.0),
    ]
    out = tmp_path / "t.md"
    out.write_text(b.markdown(b.merge_rows([], first), {}, ["run 1"]))
    rows, runs = b.parse_rows(out.read_text())
    assert runs == ["run 1"]
    assert [(r.model, r.command) for r in rows] == [
        ("ppocrv4-det", "optimize"),  # corpus order, not the order they ran in
        ("silero-vad", "optimize"),
    ]
    assert rows[1].reason == "a | b" and rows[0].seconds == 17.0  # the escaped bar survives
    second = [
        b.Row("ppocrv4-det", "quantize", "1", reason="the int8 model failed its check"),
        b.Row("silero-vad", "optimize", "0", "ok, exact", "689 -> 146"),
    ]
    merged = b.merge_rows(rows, second)
    assert [(r.model, r.command, r.nodes) for r in merged] == [
        ("ppocrv4-det", "optimize", "672 -> 221"),  # kept: not run again
        ("ppocrv4-det", "quantize", "-"),  # added in command order
        ("silero-vad", "optimize", "689 -> 146"),  # replaced by the newer run
    ]
    assert b.exit_counts(merged) == {
        "optimize": {"0": 2, "2": 0, "1": 0, "other": 0},
        "quantize": {"0": 0, "2": 0, "1": 1, "other": 0},
    }
    other = tmp_path / "o.md"
    other.write_text(b.markdown(second, {}, ["run 2"]))
    assert b.main(["--output", str(out), "--merge", str(other)]) == 0
    rows, runs = b.parse_rows(out.read_text())
    assert runs == ["run 1", "run 2"] and len(rows) == 3


def test_verified_column_of_a_command_without_per_output_flags() -> None:
    # prune's verify JSON has no per-output "ok" (its floor judges the whole model): the rows of
    # prunes that exited 0 read "FAILED, min SQNR 27.8 dB" (bert-mini) and "FAILED, exact"
    b = _bench()
    assert b._verified({"verify": {"y": {"sqnr_db": 27.84, "cosine": 0.99}}}) == (
        "ok, min SQNR 27.8 dB"
    )
    assert b._verified({"verify": {"y": {"sqnr_db": "inf"}}}) == "ok, exact"
    assert b._verified({"verify": {"y": {"ok": False, "sqnr_db": 3.0}}}).startswith("FAILED")
