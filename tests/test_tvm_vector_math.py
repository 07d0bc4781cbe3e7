"""Vectorizable float32 exp, sigmoid and erf in the CPU kernels (algorithms.tvm.vector_math).

TVM's LLVM backend turned every ``exp`` / ``sigmoid`` / ``erf`` of a vectorized epilogue into one
libm call per lane (``expf``, ``erff``); YOLOv8's SiLU and BERT's GELU spent more time there than
in their convolutions and matmuls. The scheduled kernels now hold none of these calls, and the
arithmetic that replaces them matches numpy to float32 precision. No timing is asserted
(bench/tvm.py and bench/tvm_revisions.py measure it).
"""

from __future__ import annotations

import re

import numpy as np
import pytest

tvm = pytest.importorskip("tvm", reason="apache-tvm is not installed (pip install 'graphopt[tvm]')")

from tvm import te, topi  # noqa: E402
from tvm.tirx import PrimFunc  # noqa: E402

from graphopt.algorithms.tvm import measure as M  # noqa: E402
from graphopt.algorithms.tvm import schedules as S  # noqa: E402
from graphopt.algorithms.tvm.vector_math import math_calls, rewrite_vector_math  # noqa: E402

pytestmark = pytest.mark.tvm

TARGET = tvm.target.Target({"kind": "llvm", "num-cores": 2})


def _lib(func: PrimFunc):
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), TARGET)
    return getattr(lib, "mod", lib)


def _run(func: PrimFunc, args: list[np.ndarray]) -> list[np.ndarray]:
    ts = [tvm.runtime.tensor(a) for a in args]
    _lib(func)["main"](*ts)
    return [t.numpy() for t in ts]


def _libm_calls(func: PrimFunc) -> set[str]:
    asm = _lib(func).inspect_source("asm")
    return {c for c in re.findall(r"call\S*\s+(\w+)", asm) if c.startswith(("exp", "erf"))}


def silu_conv_kernel() -> PrimFunc:
    """Conv + bias + SiLU, as YOLOv8's fused kernels."""
    x = te.placeholder((1, 8, 10, 16), name="x")
    w = te.placeholder((16, 8, 3, 3), name="w")
    b = te.placeholder((1, 16, 1, 1), name="b")
    y = topi.add(topi.nn.conv2d_nchw(x, w, 1, 1, 1), b)
    return te.create_prim_func([x, w, b, topi.multiply(y, topi.sigmoid(y))])


def gelu_kernel() -> PrimFunc:
    """BERT's GELU: 0.5 x (1 + erf(x / sqrt(2)))."""
    x = te.placeholder((4, 64), name="x")
    y = te.compute(
        x.shape, lambda i, j: 0.5 * x[i, j] * (1.0 + te.erf(x[i, j] * 0.70710678)), name="gelu"
    )
    return te.create_prim_func([x, y])


@pytest.mark.parametrize("kernel", [silu_conv_kernel, gelu_kernel])
def test_scheduled_kernels_call_no_scalar_libm(kernel) -> None:
    """The hand rules' kernels hold no exp/sigmoid/erf call and their machine code calls no
    expf/erff (before: one call per lane); outputs match the unscheduled kernel."""
    func = kernel()
    assert math_calls(func)  # the kernel as TVM writes it has them
    assert _libm_calls(func)  # ... and TVM compiles them to libm calls
    with TARGET:
        new, rule = S.schedule_func(func, 8, 2)
    assert new is not None and rule in ("conv", "injective")
    assert math_calls(new) == {}
    assert _libm_calls(new) == set()
    args = M.kernel_args(func).arrays(0)
    for ref, got in zip(_run(func, args), _run(new, args)):
        np.testing.assert_allclose(got, ref, rtol=2e-6, atol=2e-6)


def _elementwise(fn) -> PrimFunc:
    x = te.placeholder((4096,), name="x")
    return te.create_prim_func([x, te.compute(x.shape, lambda i: fn(x[i]), name="y")])


def test_exp_sigmoid_erf_accuracy_and_ends() -> None:
    """exp: relative error under 3 ulp wherever float32 exp is a normal number; sigmoid 0 and 1
    at the ends, never NaN; erf: absolute error under 5e-7."""
    xs = np.concatenate(
        [np.linspace(-87.0, 88.0, 2048), np.random.default_rng(0).standard_normal(2048) * 4]
    ).astype(np.float32)
    x64 = xs.astype(np.float64)
    exp = _run(rewrite_vector_math(_elementwise(te.exp)), [xs, np.zeros_like(xs)])[1]
    np.testing.assert_allclose(exp, np.exp(x64), rtol=3.6e-7)
    big = np.array([-1000.0, -100.0, -88.7, 0.0, 88.7, 100.0, 1000.0] * 585, np.float32)[:4096]
    big = np.pad(big, (0, 4096 - big.size))
    sig = _run(rewrite_vector_math(_elementwise(te.sigmoid)), [big, np.zeros_like(big)])[1]
    assert not np.isnan(sig).any()
    with np.errstate(over="ignore"):
        ref_sig = 1.0 / (1.0 + np.exp(-big.astype(np.float64)))
    np.testing.assert_allclose(sig, ref_sig, atol=1e-7)
    erf = _run(rewrite_vector_math(_elementwise(te.erf)), [xs, np.zeros_like(xs)])[1]
    from math import erf as merf  # noqa: PLC0415

    ref = np.array([merf(v) for v in x64])
    np.testing.assert_allclose(erf, ref, rtol=0, atol=5e-7)


def test_other_dtypes_are_left_alone() -> None:
    """Only float32 calls are rewritten (the polynomials are float32's)."""
    x = te.placeholder((64,), name="x", dtype="float64")
    func = te.create_prim_func([x, te.compute(x.shape, lambda i: te.exp(x[i]), name="y")])
    assert math_calls(rewrite_vector_math(func)) == {"tirx.exp": 1}
