"""Vectorizable float32 ``exp``, ``sigmoid`` and ``erf`` for the CPU kernels.

TVM's LLVM code generator lowers ``tirx.exp`` (and ``sigmoid``, which it writes with ``exp``) to
the ``llvm.exp`` intrinsic and ``tirx.erf`` to ``erff``; with no vector math library LLVM turns
a vector of them into one libm call per lane, so a vectorized epilogue is scalar again. On
YOLOv8's SiLU (``x * sigmoid(x)`` after every convolution) and BERT's GELU (``erf``) those calls
took more time than the convolutions and matmuls they follow (a 1x1 convolution with 128 input
channels spends 2.6 ns per output on its multiply-adds, ``expf`` 5-10 ns).

:func:`rewrite_vector_math` replaces, in a PrimFunc, every float32 call by straight-line
arithmetic that LLVM vectorizes (the same polynomials as TVM's ``topi.fast_exp`` / Eigen):

* ``exp(x)``: Cephes' ``expf``. ``x`` clamped to [-88.376, 88.376]; ``n = floor(x log2(e) +
  1/2)``; ``r = x - n ln2`` with ln2 split in two constants (exact first product); ``e^r = 1 + r +
  r^2 P(r)`` with a degree-5 minimax ``P`` on [-ln2/2, ln2/2]; ``2^n`` built in the exponent bits
  (``(n + 127) << 23`` reinterpreted). Relative error about 2e-7 (1-2 ulp); ``exp`` of a clamped
  argument saturates at 2.4e38 (never inf), ``exp(-88.4)`` and below are 0.
* ``sigmoid(x) = 1 / (1 + exp(-x))`` with that ``exp``: 0 and 1 at the ends, never NaN.
* ``erf(x)``: Eigen's rational approximation ``x P(x^2) / Q(x^2)`` (degrees 6 and 4) on ``x``
  clamped to [-4, 4] (``erf(4) = 1 - 1.5e-8``); absolute error under 4e-7.

Other dtypes (float16, float64) and other calls are left as they are.
"""

from __future__ import annotations

from typing import Any

import tvm
import tvm_ffi
from tvm import tirx

_F32 = "float32"

#: Cephes expf: e^r = 1 + r + r^2 * P(r)
_EXP_P = (
    1.9875691500e-4,
    1.3981999507e-3,
    8.3334519073e-3,
    4.1665795894e-2,
    1.6666665459e-1,
    5.0000001201e-1,
)
_EXP_HI = 88.3762626647949
_LOG2E = 1.44269504088896341
_LN2_HI = 0.693359375  # 8 significant bits: n * _LN2_HI is exact for |n| <= 2^8
_LN2_LO = -2.12194440e-4

#: Eigen's float erf: x * P(x^2) / Q(x^2)
_ERF_ALPHA = (
    -2.72614225801306e-10,
    2.77068142495902e-08,
    -2.10102402082508e-06,
    -5.69250639462346e-05,
    -7.34990630326855e-04,
    -2.95459980854025e-03,
    -1.60960333262415e-02,
)
_ERF_BETA = (
    -1.45660718464996e-05,
    -2.13374055278905e-04,
    -1.68282697438203e-03,
    -7.37332916720468e-03,
    -1.42647390514189e-02,
)


def _c(v: float) -> Any:
    return tirx.const(v, _F32)


def _horner(x: Any, coeffs: tuple[float, ...]) -> Any:
    acc = _c(coeffs[0])
    for c in coeffs[1:]:
        acc = acc * x + _c(c)
    return acc


def _bind(value: Any, body: Any) -> Any:
    """``body(v)`` with ``v`` bound once to ``value`` (a Let; a variable or constant as is)."""
    if isinstance(value, (tirx.Var, tirx.FloatImm)):
        return body(value)
    v = tirx.Var("vm_x", _F32)
    return tirx.Let(v, value, body(v))


def fast_exp(x: Any) -> Any:
    """float32 ``exp(x)`` as vectorizable arithmetic (Cephes; see module doc)."""

    def f(x: Any) -> Any:
        xc = tirx.max(tirx.min(x, _c(_EXP_HI)), _c(-_EXP_HI))

        def g(xc: Any) -> Any:
            n = tirx.floor(xc * _c(_LOG2E) + _c(0.5))

            def h(n: Any) -> Any:
                r = xc - n * _c(_LN2_HI) - n * _c(_LN2_LO)

                def k(r: Any) -> Any:
                    y = _horner(r, _EXP_P) * r * r + r + _c(1.0)
                    bits = tirx.Cast("int32", n + _c(127.0)) << tirx.const(23, "int32")
                    return y * tirx.reinterpret(_F32, bits)

                return _bind(r, k)

            return _bind(n, h)

        return _bind(xc, g)

    return _bind(x, f)


def fast_sigmoid(x: Any) -> Any:
    """float32 ``1 / (1 + exp(-x))`` with :func:`fast_exp`."""
    return _c(1.0) / (_c(1.0) + fast_exp(_c(0.0) - x))


def fast_erf(x: Any) -> Any:
    """float32 ``erf(x)`` as vectorizable arithmetic (Eigen's rational form; see module doc)."""

    def f(x: Any) -> Any:
        xc = tirx.max(tirx.min(x, _c(4.0)), _c(-4.0))

        def g(xc: Any) -> Any:
            def h(x2: Any) -> Any:
                return xc * _horner(x2, _ERF_ALPHA) / _horner(x2, _ERF_BETA)

            return _bind(xc * xc, h)

        return _bind(xc, g)

    return _bind(x, f)


_REWRITES = {"tirx.exp": fast_exp, "tirx.sigmoid": fast_sigmoid, "tirx.erf": fast_erf}
_OPS = {name: tvm.ir.Op.get(name) for name in _REWRITES}


def _rewrite_call(call: Any) -> Any:
    if len(call.args) != 1 or str(getattr(call, "ty", "")) != _F32:
        return call
    for name, op in _OPS.items():
        if call.op.same_as(op):
            return _REWRITES[name](call.args[0])
    return call


def rewrite_vector_math(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """``func`` with its float32 ``exp``, ``sigmoid`` and ``erf`` calls written as vectorizable
    arithmetic (see module doc); ``func`` itself when it has none."""
    return tvm_ffi.structural_map(func, [(tvm.ir.expr.Call, _rewrite_call)])


def math_calls(func: tirx.PrimFunc) -> dict[str, int]:
    """How many ``exp``, ``sigmoid`` and ``erf`` calls (any dtype) ``func`` holds."""
    counts: dict[str, int] = {}

    def visit(call: Any) -> Any:
        for name, op in _OPS.items():
            if call.op.same_as(op):
                counts[name] = counts.get(name, 0) + 1
        return call

    tvm_ffi.structural_map(func, [(tvm.ir.expr.Call, visit)])
    return counts
