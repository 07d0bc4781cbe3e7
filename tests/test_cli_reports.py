"""`--report` on quantize, prune and plan writes one self-contained page with that step's
figures."""

from __future__ import annotations

from pathlib import Path

from graphopt.cli import main
from graphopt.fixtures import fixture_path

DIGITS = str(fixture_path("digits_cnn.onnx"))
CALIB = str(fixture_path("digits_calib.npz"))


def _page(p: Path) -> str:
    text = p.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html") or text.lstrip().lower().startswith("<!doctype html")
    assert "http://" not in text.replace("http://www.w3.org", "")  # no network resources
    return text


def test_quantize_report(tmp_path: Path, capsys) -> None:
    rep = tmp_path / "q.html"
    assert (
        main(
            [
                "quantize",
                DIGITS,
                "-o",
                str(tmp_path / "q.onnx"),
                "--calib",
                CALIB,
                "--input-shape",
                "x:1x1x8x8",
                "--report",
                str(rep),
                "--json",
            ]
        )
        == 0
    )
    assert "Quantization error per layer" in _page(rep)


def test_prune_report(tmp_path: Path, capsys) -> None:
    rep = tmp_path / "p.html"
    assert (
        main(
            [
                "prune",
                DIGITS,
                "-o",
                str(tmp_path / "p.onnx"),
                "--ratio",
                "0.2",
                "--calib",
                CALIB,
                "--input-shape",
                "x:1x1x8x8",
                "--report",
                str(rep),
                "--json",
            ]
        )
        == 0
    )
    assert "pruned" in _page(rep)


def test_plan_report(tmp_path: Path, capsys) -> None:
    rep = tmp_path / "m.html"
    assert (
        main(["plan", str(fixture_path("mobilenet_block.onnx")), "--report", str(rep), "--json"])
        == 0
    )
    text = _page(rep)
    assert "arena" in text.lower()
