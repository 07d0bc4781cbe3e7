"""A model with more than 2 GB of weights (external data): load, optimize, quantize and save within
bounded memory, and ``graphopt inspect`` in seconds without reading the weights.

The model (four 11,460 x 11,460 float32 MatMul weights, 2.1 GB, plus a bias) is written chunk-wise
from a seeded generator straight into its ``.data`` file, never held in memory. Each job runs in a
child process that reports its peak resident memory (``VmHWM`` from /proc/self/status); the bound is
about 1.5x the weight size. The optimized output is checked against a numpy reference computed from
memory-mapped weights. Marked ``slow``; ``.ci/run`` (``make test``) runs it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

pytestmark = pytest.mark.slow

N = 11_460
LAYERS = 4
WEIGHT_BYTES = LAYERS * N * N * 4  # 2.10 GB
BOUND = 1.5
# quantize holds the float weights (memory-mapped; their pages are released before the int8 model
# runs), the int8 weights (0.25x) and, while the int8 model is checked, the dequantized copy of one
# layer: measured 1.39x on 2026-11-23 (7.1x before zero-copy sessions, block-wise weight
# quantization and page release)
QUANTIZE_BOUND = BOUND
GRAPHOPT = Path(sys.executable).with_name("graphopt")

JOB = r"""
import json, sys, time
from pathlib import Path

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0

job, src, out = sys.argv[1], sys.argv[2], sys.argv[3]
base = hwm()
t0 = time.time()
from graphopt.core.loader import load
from graphopt.core.saver import save
from graphopt.jobs.optimize import optimize_model
from graphopt.passes import registered_passes
after_import = hwm()
model = load(src)
loaded = hwm()
report = {"job": job, "base": base, "after_import": after_import, "loaded": loaded}
if job == "optimize":
    res = optimize_model(model, verify_output=False)
    report["optimized"] = hwm()
    report["passes"] = {k: v for k, v in res.stats().items()}
    save(res.model, out)
elif job == "quantize":
    import numpy as np
    from graphopt.jobs.quantize import quantize
    x = model.graph.inputs[0]
    rng = np.random.default_rng(0)
    calib = [{x.name: rng.standard_normal(tuple(x.shape)).astype(np.float32)} for _ in range(2)]
    res = quantize(model, calib, method="minmax", optimize=False, verify_output=False,
                   sensitivity=False, eval_samples=1)
    report["quantized"] = hwm()
    save(res.model, out)
report["saved"] = hwm()
report["peak"] = hwm()
report["seconds"] = round(time.time() - t0, 1)
print("REPORT " + json.dumps(report))
"""


def _write_model(folder: Path) -> Path:
    """MatMul -> Identity -> MatMul -> Relu -> MatMul -> MatMul + bias; weights N(0, 1/N)."""
    data = folder / "large.onnx.data"
    rng = np.random.default_rng(2026)
    scale = np.float32(1.0 / np.sqrt(N))
    inits = []
    rows = 1024
    with open(data, "wb") as f:
        for i in range(LAYERS):
            offset = f.tell()
            for r0 in range(0, N, rows):
                r = min(rows, N - r0)
                f.write((rng.standard_normal((r, N), dtype=np.float32) * scale).tobytes())
            t = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=[N, N])
            t.data_location = TensorProto.EXTERNAL
            for k, v in (
                ("location", data.name),
                ("offset", str(offset)),
                ("length", str(4 * N * N)),
            ):
                e = t.external_data.add()
                e.key, e.value = k, v
            inits.append(t)
    inits.append(
        helper.make_tensor(
            "bias", TensorProto.FLOAT, [N], (np.arange(N, dtype=np.float32) / N).tolist()
        )
    )
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["h0"]),
        helper.make_node("Identity", ["h0"], ["h0i"]),
        helper.make_node("MatMul", ["h0i", "w1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["r1"]),
        helper.make_node("MatMul", ["r1", "w2"], ["h2"]),
        helper.make_node("MatMul", ["h2", "w3"], ["h3"]),
        helper.make_node("Add", ["h3", "bias"], ["y"]),
    ]
    g = helper.make_graph(
        nodes,
        "large",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, N])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, N])],
        inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], producer_name="large")
    m.ir_version = 8
    path = folder / "large.onnx"
    path.write_bytes(m.SerializeToString())
    return path


def _reference(folder: Path, x: np.ndarray) -> np.ndarray:
    w = np.memmap(folder / "large.onnx.data", dtype=np.float32, mode="r", shape=(LAYERS, N, N))
    h = x.astype(np.float64)
    for i in range(LAYERS):
        h = h @ np.asarray(w[i], dtype=np.float64)
        if i == 1:
            h = np.maximum(h, 0)
    bias = np.arange(N, dtype=np.float32) / N
    return (h + bias).astype(np.float32)


@pytest.fixture(scope="module")
def large_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    folder = tmp_path_factory.mktemp("large")
    need = 3.5 * WEIGHT_BYTES  # the model, the optimized copy and the int8 copy
    if shutil.disk_usage(folder).free < need:
        pytest.skip(f"needs {need / 1e9:.1f} GB of free disk in {folder}")
    path = _write_model(folder)
    yield path
    shutil.rmtree(folder, ignore_errors=True)


def _run_job(job: str, src: Path, out: Path) -> dict[str, Any]:
    r = subprocess.run(
        [sys.executable, "-c", JOB, job, str(src), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("REPORT ")][-1]
    return json.loads(line[len("REPORT ") :])


def _gb(n: float) -> str:
    return f"{int(n) / 1e9:.2f} GB"


def test_inspect_without_loading_weights(large_model: Path) -> None:
    """``graphopt inspect`` reads dims, not weights: seconds and little memory for 2.1 GB."""
    cmd = [str(GRAPHOPT)] if GRAPHOPT.is_file() else [sys.executable, "-m", "graphopt.cli"]
    script = (
        "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], "
        "capture_output=True, text=True); print(r.stdout); sys.stderr.write(r.stderr); "
        "print('MAXRSS', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024); "
        "sys.exit(r.returncode)"
    )
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-c", script, *cmd, "inspect", str(large_model), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    seconds = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    maxrss = int(r.stdout.rsplit("MAXRSS", 1)[1].split()[0])
    info = json.loads(r.stdout.rsplit("MAXRSS", 1)[0])
    assert info["params"] == LAYERS * N * N + N
    assert info["param_bytes"] >= WEIGHT_BYTES
    assert info["macs"] >= LAYERS * N * N
    # reading the weights would need at least their size in memory
    assert maxrss < WEIGHT_BYTES / 4, f"inspect used {_gb(maxrss)}: were the weights read?"
    print(f"inspect: {seconds:.1f} s, peak RSS {_gb(maxrss)}")


def test_optimize_and_save_within_bounded_memory(large_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "large.opt.onnx"
    rep = _run_job("optimize", large_model, out)
    print(f"optimize: {rep}")
    assert int(rep["peak"]) <= BOUND * WEIGHT_BYTES, (
        f"peak RSS {_gb(rep['peak'])} > {BOUND} x {_gb(WEIGHT_BYTES)}: {rep}"
    )
    proto = onnx.load(str(out), load_external_data=False)
    ops = [n.op_type for n in proto.graph.node]
    assert "Identity" not in ops
    (data,) = out.parent.glob(out.name + ".*.data")  # one data file, named per write
    assert data.stat().st_size >= WEIGHT_BYTES
    onnx.checker.check_model(str(out))
    # the optimized model computes what the input computes (numpy on memory-mapped weights)
    import onnxruntime as ort

    x = np.random.default_rng(0).standard_normal((1, N)).astype(np.float32)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(out), so, providers=["CPUExecutionProvider"])
    got = sess.run(None, {"x": x})[0]
    del sess
    ref = _reference(large_model.parent, x)
    err = float(np.abs(got - ref).max())
    assert err <= 1e-5 + 1e-4 * float(np.abs(ref).max()), err
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_quantize_and_save_within_bounded_memory(large_model: Path, tmp_path: Path) -> None:
    from graphopt.passes import registered_passes

    if "quantize-int8" not in registered_passes():
        pytest.skip("quantize-int8 is not registered")
    out = tmp_path / "large.int8.onnx"
    rep = _run_job("quantize", large_model, out)
    print(f"quantize: {rep}")
    assert int(rep["peak"]) <= QUANTIZE_BOUND * WEIGHT_BYTES, (
        f"peak RSS {_gb(rep['peak'])} > {QUANTIZE_BOUND} x {_gb(WEIGHT_BYTES)}: {rep}"
    )
    onnx.checker.check_model(str(out))
    proto = onnx.load(str(out), load_external_data=False)
    assert any(n.op_type == "DequantizeLinear" for n in proto.graph.node)
    size = out.stat().st_size + sum(p.stat().st_size for p in out.parent.glob(out.name + ".*.data"))
    assert size < WEIGHT_BYTES / 3, f"int8 model is {_gb(size)}"
    shutil.rmtree(tmp_path, ignore_errors=True)
