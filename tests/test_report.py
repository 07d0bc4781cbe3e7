"""The HTML report: self-contained (no network references), every section present, rendered in
headless Chromium (screenshot not blank, inline script ran without error) for a fixture and the
PP-OCR v2 cls model; large graphs collapsed."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import real_or_skip

from graphopt.cli import main
from graphopt.core.loader import load
from graphopt.core.model import Model
from graphopt.core.shapes import prepare
from graphopt.fixtures import fixture_path
from graphopt.jobs.optimize import optimize_model
from graphopt.jobs.report import collapse, render_report, write_report

CHROMIUM = next(
    (
        p
        for p in (
            shutil.which("chromium"),
            shutil.which("chromium-browser"),
            shutil.which("google-chrome"),
        )
        if p
    ),
    None,
)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium not installed (scripts/install-system-deps.sh installs it)"
)
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _chromium(html: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    with tempfile.TemporaryDirectory(prefix="graphopt-chromium-") as profile:
        return subprocess.run(
            [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *extra, html.resolve().as_uri()],
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
        )


def _render_check(html: Path, tmp_path: Path, min_boxes: int) -> np.ndarray:
    """Dump the DOM (script ran: data-ok=1, elements there) and screenshot (not one colour)."""
    dom = _chromium(html, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", dom.stdout)
    assert body, dom.stdout[:500]
    attrs = dict(re.findall(r'data-([a-z]+)="([^"]*)"', body.group(1)))
    assert attrs.get("ok") == "1", f"inline script did not finish: {attrs}"
    assert int(attrs["graphs"]) == 2 and int(attrs["boxes"]) >= min_boxes
    for ident in ("summary-table", "graph-before", "graph-after", "quant", "memory", "prune"):
        assert f'id="{ident}"' in dom.stdout, ident
    png = tmp_path / "shot.png"
    shot = _chromium(html, f"--screenshot={png}", "--window-size=1400,2000")
    assert shot.returncode == 0 and png.is_file(), shot.stderr[-2000:]
    from PIL import Image

    img = np.asarray(Image.open(png).convert("RGB"))
    assert img.shape[:2] == (2000, 1400)
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 20, "blank screenshot"
    # the graph area is drawn: the fused-node fill colour is present
    assert np.any(np.all(img == np.array([0xFF, 0xD9, 0x8A]), axis=-1))
    return img


def _extras(model: Model) -> dict[str, Any]:
    from graphopt.jobs.plan import plan_memory

    plan = plan_memory(model).plan
    convs = [n.name for n in model.graph.nodes if n.op == "Conv"]
    quant = [{"name": n, "op": "Conv", "sqnr_db": 18.0 + 3 * i} for i, n in enumerate(convs)]
    scan = [{"ratio": r, "sqnr_db": 60 - 70 * r, "macs": 1e6 * (1 - r)} for r in (0, 0.1, 0.3, 0.5)]
    return {"memory": plan, "quant": quant, "prune_scan": scan}


def _report(before: Model, after: Model, path: Path, **kw: Any) -> Path:
    res_tables = {"steps": [{"step": "simplify", "nodes": after.num_nodes(), "ok": True}]}
    return write_report(path, before, after, tables=res_tables, **_extras(after), **kw)


def test_report_self_contained(tmp_path: Path) -> None:
    a = prepare(load(fixture_path("mobilenet_block.onnx")))
    res = optimize_model(a)
    text = render_report(res.kept_original(), res.model, verify=res.verify, **_extras(res.model))
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", text)
    assert "@import" not in text and "url(http" not in text
    for section in (
        "summary",
        "verify",
        "groups",
        "graphs",
        "quantization",
        "memory-plan",
        "prune-scan",
    ):
        assert f"id='{section}'" in text, section
    assert "Add+Clip+Mul+Div -&gt; HardSwish" in text
    assert text.count('class="node fused"') >= 5  # 3 Conv+BN, 2 HardSwish
    assert 'class="node replaced"' in text


def test_large_graph_collapsed() -> None:
    path, shapes = real_or_skip("det")
    m = prepare(load(path), shapes)
    boxes, dag, how = collapse(m, max_nodes=300)
    assert len(boxes) <= 300 and "collapsed" in how
    assert sum(len(b.members) for b in boxes) == len({n for b in boxes for n in b.members})
    boxes2, _, how2 = collapse(m, max_nodes=40)
    assert len(boxes2) <= 40 and "runs" in how2


def test_pruned_layers_highlighted() -> None:
    import onnx_graphsurgeon as gs

    a = prepare(load(fixture_path("cnn.onnx")))
    b = a.clone()
    conv = next(n for n in b.graph.nodes if n.op == "Conv")
    w = conv.inputs[1]
    conv.inputs[1] = gs.Constant(w.name + "_p", np.asarray(w.values)[: w.shape[0] // 2])
    text = render_report(a, b)
    assert 'class="node pruned"' in text


@needs_chromium
def test_report_renders_fixture(tmp_path: Path) -> None:
    a = prepare(load(fixture_path("mobilenet_block.onnx")))
    res = optimize_model(a)
    html = _report(res.kept_original(), res.model, tmp_path / "r.html", verify=res.verify)
    _render_check(html, tmp_path, min_boxes=20)


@needs_chromium
@pytest.mark.real
def test_report_renders_real_cls_via_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, shapes = real_or_skip("cls")
    html = tmp_path / "cls.html"
    rc = main(
        [
            "optimize",
            str(path),
            "-o",
            str(tmp_path / "cls.onnx"),
            "--report",
            str(html),
            "--input-shape",
            "x:" + "x".join(map(str, shapes["x"])),
            "--json",
        ]
    )
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert json.loads(cap.out)["report"] == str(html)
    text = html.read_text()
    assert "Conv+BatchNormalization -&gt; Conv" in text
    # add the sections optimize has no data for, then render
    before = prepare(load(path), shapes)
    after = load(tmp_path / "cls.onnx")
    prepare(after, shapes)
    _report(before, after, html)
    _render_check(html, tmp_path, min_boxes=150)
