"""graphopt's CPU schedules for the TIR kernels that come out of Relax's fusion.

TVM's default CPU build leaves every kernel as the naive loop nest LegalizeOps wrote: no parallel
loop, no vector loop, the accumulator in memory. MetaSchedule (TVM's tuner) crashes in the 0.27
wheels and DLight's CPU rules cover reductions and GEMV only, so graphopt chooses the loop
transforms itself, from the shapes:

* convolution, depthwise convolution, transposed convolution and pooling (any block with spatial
  axes ``n, c, h, w`` and reduction axes): a register tile of ``fi`` output channels x ``xi`` output
  columns accumulated in a local buffer (registers after LLVM's SROA), ``xi`` the largest power of
  two up to 8 lanes dividing ``W`` (odd widths make LLVM scalarize), vectorized, ``fi`` unrolled and
  as large as the register file allows (24 accumulators with 32 vector registers, 12 with 16);
  reductions outside the tile; the fused epilogue (bias, activation, residual add)
  computed from the registers right after the tile; the outer ``n, co, h`` loops fused and parallel
  above a work threshold (waking the thread pool costs more than small kernels take). Narrow maps
  (``W`` = 10, 5, 1) vectorize over output channels instead, with the weights packed
  ``[co/fi, ci, kh, kw, fi]``. Zero padding stays a separate vectorized stage (computing it inside
  the tile loop, or storing it de-interleaved for stride 2, measured slower). A pooling fused
  behind the convolution (graphopt's Conv+activation+pool groups) stays a parallel stage of the
  same kernel.
* matmul: the same register tile over ``i`` (unrolled) x ``j`` (vectorized), ``k`` outside, batch
  and row tiles parallel; when ``N`` has no power-of-two factor (a 6625-class CTC head) the rows are
  vectorized instead, reading ``A`` through a transposed copy.
* reductions whose reduced axes are innermost (mean, softmax, layer norm): DLight's CPU reduction
  rule, else parallel outer spatial loops.
* injective kernels (element-wise chains, transposes, resize, concat): producers inlined, outer
  loops fused and parallel, innermost loop vectorized.

Every rule runs on a fresh schedule and falls back to the next one if a primitive refuses (a kernel
is never left half-scheduled); the last resort is to leave TVM's loops as they are.
``ApplyCPUSchedules`` counts what it did per rule (``stats``).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

import tvm
from tvm import s_tir, tirx

logger = logging.getLogger(__name__)

Schedule = Any
BlockRV = Any

#: below this many multiply-adds (or elements) a kernel runs on one thread: waking TVM's thread pool
#: costs more than the work
PARALLEL_MIN_WORK = 1 << 21
PARALLEL_MIN_ELEMS = 1 << 15

#: overrides for experiments (``{"xi": 8, "fi": 4}``)
_TUNE: dict[str, int] = {}

_SPATIAL = tirx.IterVar.DataPar
_REDUCE = tirx.IterVar.CommReduce


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


def _vec_factor(n: int, lanes: int, max_vectors: int = 1) -> int:
    """The vector length for an axis of extent ``n``: the largest power of two of at most
    ``max_vectors`` vectors that divides ``n`` (at least 4); 1 when none does. (Odd lengths make
    LLVM scalarize; two-vector tiles spill.)"""
    v = max_vectors * lanes
    while v >= 4:
        if n % v == 0:
            return v
        v //= 2
    return 1


def _divisor(n: int, candidates: list[int]) -> int:
    for c in candidates:
        if c >= 1 and n % c == 0:
            return c
    return 1


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


def _schedule_injective_block(sch: Schedule, block: BlockRV, lanes: int, cores: int) -> None:
    """Outer loops fused and parallel (when large), innermost loop vectorized (when it divides)."""
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
    vec = _divisor(inner, [lanes * 2, lanes, lanes // 2, 4]) if inner >= 4 else 1
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
    if cores > 1 and total >= PARALLEL_MIN_ELEMS and total // max(vec, 1) > 1:
        sch.parallel(outer)


def _vectorize(sch: Schedule, loop: Any) -> None:
    try:
        sch.vectorize(loop)
    except Exception as exc:  # noqa: BLE001 - leave it to LLVM's loop vectorizer
        logger.debug("vectorize refused: %s", str(exc).splitlines()[-1:])


# ---------------------------------------------------------------------- rules


def schedule_conv_like(sch: Schedule, lanes: int, cores: int) -> bool:
    """Register-tiled schedule for the single 4-D spatial + reduction block of a kernel."""
    blocks = _blocks(sch)
    reds = [b for b in blocks if _is_reduction(sch, b)]
    if len(reds) == 2:
        # a Conv+activation+pool group fused into one kernel: tile the convolution, the pooling
        # stays a (parallel) stage of the same kernel
        reds = [b for b in reds if not any(_is_reduction(sch, p) for p in _ancestors(sch, b))]
    if len(reds) != 1:
        return False
    conv = reds[0]
    types = _iter_types(sch, conv)
    nsp = sum(1 for t in types if t == _SPATIAL)
    if nsp != 4 or types[:4] != [_SPATIAL] * 4:
        return False
    loops = sch.get_loops(conv)
    if len(loops) != len(types):
        return False
    ext = _extents(sch, loops)
    if any(e < 0 for e in ext):
        return False
    n_e, f_e, y_e, x_e = ext[:4]
    conv_name = sch.get(conv).name_hint
    if _TUNE.get("dw_skip", 0) and len(ext) == 7 and ext[4] == 1 and f_e > 1:
        return False
    # padding / dilation stages feeding the reduction: keep them (vectorized) unless they are
    # plain copies, which are inlined
    producers = list(sch.get_producers(conv))
    for p in producers:
        if _is_reduction(sch, p):
            return False
    pads = {sch.get(p).name_hint for p in producers if _is_padding(sch.get(p))}
    if _TUNE.get("inline_pad", 0):
        pads = set()
    for p in producers:
        if sch.get(p).name_hint in pads:
            continue  # a real padding stage: a conditional in the inner loop would cost more
        try:
            sch.compute_inline(p)
        except Exception:  # noqa: BLE001
            pass
    # inline the element-wise epilogue into one final block
    _inline_injective(
        sch,
        keep={conv_name}
        | pads
        | {
            sch.get(p).name_hint
            for p in _blocks(sch)
            if sch.get(p).name_hint != conv_name and not sch.get_consumers(p)
        },
    )
    # the register tile
    # 256-bit tiles with many accumulators beat 512-bit tiles with few (AMD runs a 512-bit FMA as
    # two 256-bit halves; more independent accumulators hide the FMA latency)
    tile_lanes = min(lanes, 8)
    xi = _vec_factor(x_e, tile_lanes, max_vectors=1)
    xi = _TUNE.get("xi", xi)
    # vector registers for accumulators: 32-register files (AVX-512, NEON) keep 24, AVX2 12
    acc_budget = 24 if lanes >= 16 or lanes == 4 else 12
    vec_regs = max(1, -(-xi // tile_lanes))
    fi = _divisor(f_e, [c for c in (24, 16, 12, 8, 6, 4, 3, 2) if c * vec_regs <= acc_budget])
    narrow = xi == 1 and _vec_factor(f_e, lanes) > 1
    if narrow:
        # narrow maps (W = 10, 5, 1): vectorize across output channels (weights packed so the
        # vector is contiguous) and unroll a few output columns, each a broadcast input value
        fi = _vec_factor(f_e, lanes)
        xi = _divisor(x_e, [8, 7, 6, 5, 4, 3, 2])
    elif xi == 1:
        fi = 1
    if len(ext) == 7 and ext[4] == 1 and f_e > 1 and _TUNE.get("dw_fi"):
        fi = _TUNE["dw_fi"]
    fi = _TUNE.get("fi", fi)
    red_work = 1
    for e in ext[4:]:
        red_work *= e
    work = n_e * f_e * y_e * x_e * red_work
    logger.debug(
        "conv-like %s: out %s red %s fi=%d xi=%d narrow=%s work=%d",
        conv_name,
        ext[:4],
        ext[4:],
        fi,
        xi,
        narrow,
        work,
    )
    local = sch.cache_write(conv, 0, "local")
    n, f, y, x, *rs = sch.get_loops(conv)
    fo, fi_l = sch.split(f, [None, fi])
    xo, xi_l = sch.split(x, [None, xi])
    if narrow:
        sch.reorder(n, fo, y, xo, *rs, xi_l, fi_l)
    else:
        sch.reorder(n, fo, y, xo, *rs, fi_l, xi_l)
    sch.reverse_compute_at(local, xo, preserve_unit_loops=True)
    if narrow and fi > 1:
        _pack_weights(sch, conv, f_e, fi, None)
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
                sch.unroll(lps[-1])
                sch.unroll(lps[-3])
                return
            if xi > 1 or narrow:
                sch.vectorize(lps[-1]) if (fi > 1 or not narrow) else sch.unroll(lps[-1])
                sch.unroll(lps[-2])
            else:
                sch.vectorize(lps[-1])
        except Exception as exc:  # noqa: BLE001 - leave scalar
            logger.debug("conv tile not vectorized: %s", str(exc).splitlines()[-1:])

    _tile_loops(conv)
    _tile_loops(local)
    outer = sch.fuse(n, fo, y)
    if _TUNE.get("pad_at", 0):
        # pad the rows a tile reads right before it (in cache), inside the parallel loop
        for b in _blocks(sch):
            if sch.get(b).name_hint in pads:
                try:
                    sch.compute_at(b, outer, preserve_unit_loops=True)
                    pads.discard(sch.get(b).name_hint)
                except Exception as exc:  # noqa: BLE001
                    logger.debug("pad compute_at refused: %s", str(exc).splitlines()[-1:])
    if fi > 1 and xi > 1 and not narrow and _TUNE.get("pack", 0):
        _pack_weights(sch, conv, f_e, fi, outer if _TUNE.get("packat", 1) else None)
    if (
        n_e * (f_e // fi) * y_e > 1
        and cores > 1
        and work >= PARALLEL_MIN_WORK
        and not _TUNE.get("serial", 0)
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
            v = _vec_factor(ext_b[-1], lanes) if ext_b[-1] > 0 else 1
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


def schedule_matmul(sch: Schedule, lanes: int, cores: int) -> bool:
    """Register tile for a (batched) matmul: ``[..., i, j] += A[..., i, k] * B[..., k, j]``."""
    blocks = _blocks(sch)
    reds = [b for b in blocks if _is_reduction(sch, b)]
    if len(reds) != 1:
        return False
    mm = reds[0]
    types = _iter_types(sch, mm)
    if types[-1] != _REDUCE or sum(1 for t in types if t == _REDUCE) != 1 or len(types) < 3:
        return False
    name = sch.get(mm).name_hint
    if "matmul" not in name.lower() and "dense" not in name.lower():
        return False
    loops = sch.get_loops(mm)
    ext = _extents(sch, loops)
    if any(e < 0 for e in ext):
        return False
    for p in list(sch.get_producers(mm)):
        try:
            sch.compute_inline(p)
        except Exception:  # noqa: BLE001
            pass
    _inline_injective(
        sch, keep={name} | {sch.get(p).name_hint for p in _blocks(sch) if not sch.get_consumers(p)}
    )
    *batch, i, j, k = sch.get_loops(mm)
    i_e, j_e = ext[-3], ext[-2]
    ji = _vec_factor(j_e, lanes)
    ii = _divisor(i_e, [c for c in (8, 6, 4, 3, 2) if c * max(1, -(-ji // lanes)) <= 16])
    vec_i = ji == 1 and _vec_factor(i_e, lanes) > 1
    if vec_i:
        # N has no power-of-two factor (e.g. a 6625-class CTC head): vectorize over rows instead,
        # reading A through a transposed copy (A is the small operand) so rows are contiguous
        ii = _vec_factor(i_e, lanes)
        ji = _divisor(j_e, [8, 7, 6, 5, 4, 3, 2])
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
                nb = len(ext) - 3
                sch.transform_layout(ac, ("write", 0), lambda *ax: (*ax[:nb], ax[nb + 1], ax[nb]))
            except Exception as exc:  # noqa: BLE001
                logger.debug("matmul A transpose refused: %s", str(exc).splitlines()[-1:])
    local = sch.cache_write(mm, 0, "local")
    io, ii_l = sch.split(i, [None, ii])
    jo, ji_l = sch.split(j, [None, ji])
    if vec_i:
        sch.reorder(*batch, io, jo, k, ji_l, ii_l)
    else:
        sch.reorder(*batch, io, jo, k, ii_l, ji_l)
    sch.reverse_compute_at(local, jo, preserve_unit_loops=True)
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
    outer = sch.fuse(*batch, io) if batch else io
    work = 1
    for e in ext:
        work *= e
    if cores > 1 and work >= PARALLEL_MIN_WORK:
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


def schedule_dlight_reduction(sch: Schedule, lanes: int, cores: int) -> Schedule | bool:
    """DLight's CPU rule for row reductions (softmax, layer norm): parallel rows, vector chunks."""
    from tvm.s_tir import dlight as dl  # noqa: PLC0415

    target = tvm.target.Target.current(allow_none=True)
    if target is None or target.kind.name != "llvm":
        return False
    func = sch.mod["main"]
    res = dl.cpu.Reduction().apply(func, target, False)
    if res is None:
        return False
    return res[0] if isinstance(res, list) else res


def schedule_reduction(sch: Schedule, lanes: int, cores: int) -> bool:
    """Parallel outer spatial loops of every block (mean, softmax, layer norm, global pooling)."""
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
            if total > 1 and cores > 1 and total * red >= PARALLEL_MIN_ELEMS:
                fused = sch.fuse(*loops[:nsp]) if nsp > 1 else loops[0]
                sch.parallel(fused)
        else:
            try:
                _schedule_injective_block(sch, b, lanes, cores)
            except Exception:  # noqa: BLE001
                pass
    return True


def schedule_injective(sch: Schedule, lanes: int, cores: int) -> bool:
    blocks = _blocks(sch)
    if any(_is_reduction(sch, b) for b in blocks):
        return False
    _inline_injective(sch, keep={sch.get(b).name_hint for b in blocks if not sch.get_consumers(b)})
    for b in _blocks(sch):
        _schedule_injective_block(sch, b, lanes, cores)
    return True


RULES: list[tuple[str, Callable[[Schedule, int, int], Schedule | bool]]] = [
    ("conv", schedule_conv_like),
    ("matmul", schedule_matmul),
    ("dlight-reduction", schedule_dlight_reduction),
    ("reduction", schedule_reduction),
    ("injective", schedule_injective),
]


def schedule_func(func: tirx.PrimFunc, lanes: int, cores: int) -> tuple[tirx.PrimFunc | None, str]:
    """Schedule one PrimFunc with the first rule that applies; (None, reason) when none does."""
    for name, rule in RULES:
        sch = s_tir.Schedule(func)
        try:
            res = rule(sch, lanes, cores)
            if isinstance(res, s_tir.Schedule):
                return res.mod["main"], name
            if res:
                return sch.mod["main"], name
        except Exception as exc:  # noqa: BLE001 - a primitive refused; next rule
            lines = [ln for ln in str(exc).splitlines() if "rror" in ln][-2:]
            logger.debug(
                "schedule rule %s failed: %s: %s", name, type(exc).__name__, lines or str(exc)[:300]
            )
    return None, "none"


@tvm.transform.module_pass(opt_level=0, name="GraphoptCPUSchedules")
class ApplyCPUSchedules:
    """Apply graphopt's CPU schedules to every unscheduled PrimFunc of an IRModule."""

    def __init__(self, lanes: int = 8, cores: int = 1) -> None:
        self.lanes = int(lanes)
        self.cores = int(cores)
        self.stats: Counter[str] = Counter()

    def transform_module(self, mod: tvm.IRModule, _ctx: Any) -> tvm.IRModule:
        updates = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc):
                continue
            if func.attrs is not None and "tirx.is_scheduled" in func.attrs:
                continue
            new, rule = schedule_func(func, self.lanes, self.cores)
            self.stats[rule] += 1
            logger.debug("%s: %s", gv.name_hint, rule)
            if new is not None:
                updates[gv] = new.with_attr("tirx.is_scheduled", True)
        for gv, f in updates.items():
            mod[gv] = f
        logger.info("graphopt CPU schedules: %s", dict(self.stats))
        return mod
