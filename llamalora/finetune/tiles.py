"""Products with a base weight that stays in its file type: each row tile is dequantized into a small float
buffer just before BLAS uses it, so the whole model never exists in float32.

The tile values equal llamalora.kernels.dequantize's exactly (same float32 operations), so training sees the
same weights inference runs with.
"""

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as GGMLType
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from .. import kernels
from ..kernels import simd
from ..errors import ModelFileError
from .blas import gemm

# Elements of one dequantized tile: 1 Mi floats = 4 MiB in float32. Bigger tiles give BLAS fewer, longer
# products (one training step on one core: 167 tok/s with 128 Ki-element tiles, 178 with 512 Ki, 182 with 1 Mi).
TILE_ELEMENTS = 1 << 20


@dataclass
class BaseWeight:
    """A frozen linear weight [n_rows, n_cols] in its file type, with the block scales widened to float32."""

    name: str
    type: GGMLType
    n_rows: int
    n_cols: int
    data: np.ndarray           # uint8[n_rows, row_nbytes], usually a view on the mapped file
    scales: np.ndarray | None  # float32[n_rows, n_blocks] (quantized types)
    minima: np.ndarray | None  # float32[n_rows, n_blocks] (q4_1; zeros for q4_0, whose offset is applied to q)

    @property
    def tile_rows(self) -> int:
        return int(max(16, min(self.n_rows, TILE_ELEMENTS // max(self.n_cols, 1))))


def base_weight(tensor) -> BaseWeight:
    qtype = GGMLType(tensor.type)
    data = tensor.data
    if qtype == GGMLType.F32 or qtype == GGMLType.F16:
        return BaseWeight(tensor.name, qtype, tensor.n_rows, tensor.n_cols, data, None, None)
    if qtype not in (GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q8_0):
        raise ModelFileError(f"{tensor.name}: type {qtype.name} cannot be fine-tuned on "
                             "(supported: F32, F16, Q4_0, Q4_1, Q8_0)")
    widened = kernels.block_scales(qtype, data)
    scales = np.ascontiguousarray(widened[0].reshape(tensor.n_rows, -1), dtype=np.float32)
    if qtype == GGMLType.Q4_1:
        minima = np.ascontiguousarray(widened[1].reshape(tensor.n_rows, -1), dtype=np.float32)
    else:
        minima = np.zeros_like(scales)
    return BaseWeight(tensor.name, qtype, tensor.n_rows, tensor.n_cols, data, scales, minima)


def dequantize_tile(w: BaseWeight, r0: int, r1: int, out: np.ndarray) -> np.ndarray:
    """Rows r0..r1 of w as float32 (out is a scratch buffer of at least r1 - r0 rows); returns the tile."""
    tile = out[: r1 - r0]
    if w.type == GGMLType.F32:
        return w.data[r0:r1].view(np.float32)
    if w.type == GGMLType.F16:
        tile[...] = w.data[r0:r1].view(np.float16)
    elif w.type == GGMLType.Q4_1:
        q4_tile(w.data, w.scales, w.minima, r0, 0, 4, 20, tile)
    elif w.type == GGMLType.Q4_0:
        q4_tile(w.data, w.scales, w.minima, r0, 8, 2, 18, tile)
    else:
        q8_tile(w.data, w.scales, r0, tile)
    return tile


def q4_tile(data, scales, minima, r0, offset, qs_offset, type_size, out):
    """out[i] = row r0 + i of 4-bit blocks: d * (q - offset) + m (q4_0: offset 8, m 0; q4_1: offset 0)."""
    q4_rows(data, scales, minima, r0, offset, qs_offset, type_size, out, 0, out.shape[0])


def q8_tile(data, scales, r0, out):
    q8_rows(data, scales, r0, out, 0, out.shape[0])


# The rows are widened in <16 x ...> vectors written as LLVM IR: numba's own loops stay scalar here (the
# 16-weight inner loops are unrolled rather than vectorized), and widening took a seventh of a training step.
# Each weight is d * q + m by a float32 multiply and a separate add, unfused, as kernels.dequantize computes it.

_f32 = ir.FloatType()
_i32 = ir.IntType(32)
_v16i8 = ir.VectorType(ir.IntType(8), 16)
_v16i32 = ir.VectorType(_i32, 16)
_v16f32 = ir.VectorType(_f32, 16)


def _make_widen_row(kind):
    """Intrinsic (row_addr, d_addr, m_addr, out_addr, n_blocks, offset, qs_offset, type_size) -> None: the
    row's n_blocks * 32 weights as float32 at out_addr. kind "q4": d * (q - offset) + m of nibbles (byte j: low
    nibble weight j, high nibble weight j + 16); "q8": d * q of signed bytes at qs_offset (m_addr unused)."""

    @intrinsic
    def widen_row(typingctx, row_addr, d_addr, m_addr, out_addr, n_blocks, offset, qs_offset, type_size):
        sig = types.none(*([types.intp] * 8))

        def codegen(context, builder, signature, args):
            row_addr, d_addr, m_addr, out_addr, n_blocks, offset, qs_offset, type_size = args
            i8p = ir.IntType(8).as_pointer()
            row, dbase, mbase, obase = (builder.inttoptr(a, i8p) for a in (row_addr, d_addr, m_addr, out_addr))
            intp = n_blocks.type

            def load(base, byte_offset, ty, align):
                return builder.load(builder.bitcast(builder.gep(base, [byte_offset]), ty.as_pointer()), align=align)

            def store(value, byte_offset):
                builder.store(value, builder.bitcast(builder.gep(obase, [byte_offset]), _v16f32.as_pointer()),
                              align=4)

            off = simd._splat(builder, builder.trunc(offset, _i32), 16)
            with cgutils.for_range(builder, n_blocks) as loop:
                b = loop.index
                q_off = builder.add(builder.mul(b, type_size), qs_offset)
                d = simd._splat(builder, load(dbase, builder.mul(b, ir.Constant(intp, 4)), _f32, 4), 16)
                out_off = builder.mul(b, ir.Constant(intp, 128))
                if kind == "q4":
                    m = simd._splat(builder, load(mbase, builder.mul(b, ir.Constant(intp, 4)), _f32, 4), 16)
                    q = builder.zext(load(row, q_off, _v16i8, 1), _v16i32)
                    halves = (builder.and_(q, ir.Constant(_v16i32, [15] * 16)),
                              builder.lshr(q, ir.Constant(_v16i32, [4] * 16)))
                    for k, half in enumerate(halves):
                        w = builder.fmul(d, builder.sitofp(builder.sub(half, off), _v16f32))
                        store(builder.fadd(w, m), builder.add(out_off, ir.Constant(intp, 64 * k)))
                else:
                    for k in range(2):
                        q = builder.sext(load(row, builder.add(q_off, ir.Constant(intp, 16 * k)), _v16i8, 1), _v16i32)
                        store(builder.fmul(d, builder.sitofp(q, _v16f32)), builder.add(out_off, ir.Constant(intp, 64 * k)))
            return context.get_dummy_value()

        return sig, codegen

    return widen_row


_widen_q4_row = _make_widen_row("q4")
_widen_q8_row = _make_widen_row("q8")


@njit(nogil=True, cache=True)
def q4_rows(data, scales, minima, r0, offset, qs_offset, type_size, out, i0, i1):
    n_blocks = scales.shape[1]
    for i in range(i0, i1):
        r = r0 + i
        _widen_q4_row(data.ctypes.data + r * data.strides[0], scales.ctypes.data + r * scales.strides[0],
                      minima.ctypes.data + r * minima.strides[0], out.ctypes.data + i * out.strides[0],
                      n_blocks, offset, qs_offset, type_size)


@njit(nogil=True, cache=True)
def q8_rows(data, scales, r0, out, i0, i1):
    n_blocks = scales.shape[1]
    for i in range(i0, i1):
        r = r0 + i
        _widen_q8_row(data.ctypes.data + r * data.strides[0], scales.ctypes.data + r * scales.strides[0],
                      scales.ctypes.data, out.ctypes.data + i * out.strides[0], n_blocks, 0, 2, 34)


# ---- the products, their tiles shared among threads ----
#
# With several threads, the tiles of one product are handed out in order to whichever thread is free; each
# thread dequantizes its tile and multiplies it with single-threaded BLAS. A thread that the machine's other
# work holds up then delays only its own tile, where BLAS's own team, splitting every product into fixed halves,
# would make the other thread wait for it on every tile. One mechanism runs on the hot path: these threads (the
# numba dequantizers release the GIL), with BLAS on one thread (set_tile_threads' caller sees to that).

_team = {"threads": 1, "pool": None}
_local = threading.local()


def set_tile_threads(n: int) -> None:
    """Run each product's tiles on n threads: the caller and n - 1 workers."""
    n = max(1, int(n))
    if n == _team["threads"]:
        return
    if _team["pool"] is not None:
        _team["pool"].shutdown()
    _team["threads"] = n
    _team["pool"] = ThreadPoolExecutor(n - 1, thread_name_prefix="llamalora-tiles") if n > 1 else None


def tile_threads() -> int:
    return _team["threads"]


def tile_ranges(w: BaseWeight, threads: int) -> list:
    """(r0, r1) of every tile; with several threads, at least two tiles per thread when rows allow (64 or more
    rows a tile), so that a held-up thread's share can pass to the others."""
    step = w.tile_rows
    if threads > 1:
        step = min(step, max(64, -(-w.n_rows // (2 * threads))))
    return [(r0, min(r0 + step, w.n_rows)) for r0 in range(0, w.n_rows, step)]


def thread_buffer(key: str, shape: tuple, dtype) -> np.ndarray:
    """A buffer of this thread's that lives across calls: fresh memory on every product costs page faults."""
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    size = int(np.prod(shape))
    buf = buffers.get((key, np.dtype(dtype)))
    if buf is None or buf.size < size:
        buf = buffers[(key, np.dtype(dtype))] = np.empty(size, dtype=dtype)
    return buf[:size].reshape(shape)


def for_each_tile(w: BaseWeight, work) -> None:
    """work(i, r0, r1, tile) for the tiles of w in order, spread over the tile threads."""
    threads = _team["threads"]
    ranges = tile_ranges(w, threads)
    tile_rows = max(r1 - r0 for r0, r1 in ranges)

    def run(claim):
        buf = thread_buffer("tile", (tile_rows, w.n_cols), np.float32)
        for i in iter(claim, None):
            r0, r1 = ranges[i]
            work(i, r0, r1, dequantize_tile(w, r0, r1, buf))

    if threads == 1 or len(ranges) == 1:
        pending = iter(range(len(ranges)))
        run(lambda: next(pending, None))
        return
    lock = threading.Lock()
    pending = iter(range(len(ranges)))

    def claim():
        with lock:
            return next(pending, None)

    helpers = [_team["pool"].submit(run, claim) for _ in range(min(threads, len(ranges)) - 1)]
    try:
        run(claim)
    finally:
        for helper in helpers:
            helper.result()


def times_wt(w: BaseWeight, x: np.ndarray) -> np.ndarray:
    """x @ W.T for x [n, n_cols] (a forward product), in x's dtype."""
    out = np.empty((x.shape[0], w.n_rows), dtype=x.dtype)

    def work(i, r0, r1, tile):
        if x.dtype != np.float32:
            tile = tile.astype(x.dtype)
        np.matmul(x, tile.T, out=out[:, r0:r1])

    for_each_tile(w, work)
    return out


def add_times_w(w: BaseWeight, dy: np.ndarray, dx: np.ndarray, accumulate: bool = True) -> None:
    """dx += dy @ W for dy [n, n_rows] (a backward product through a frozen weight); accumulate False writes
    dx = dy @ W whatever dx held.

    The tiles' parts are added in tile order whichever thread made them, so the sums come out the same
    from run to run. On one thread BLAS adds each part into dx itself (beta 1), in that same order."""
    if _team["threads"] == 1:
        def add(i, r0, r1, tile):
            if dx.dtype != np.float32:
                tile = tile.astype(dx.dtype)
            gemm(dy[:, r0:r1], tile, dx, 1.0, 1.0 if accumulate or i > 0 else 0.0)

        for_each_tile(w, add)
        return
    if not accumulate:
        dx[...] = 0
    turn = [0]  # the next tile to add; -1 once a tile failed, so that no thread waits for it
    done = threading.Condition()

    def work(i, r0, r1, tile):
        try:
            if dx.dtype != np.float32:
                tile = tile.astype(dx.dtype)
            part = thread_buffer("part", dx.shape, dx.dtype)
            np.matmul(dy[:, r0:r1], tile, out=part)
        except BaseException:
            with done:
                turn[0] = -1
                done.notify_all()
            raise
        with done:
            done.wait_for(lambda: turn[0] in (i, -1))
            if turn[0] == -1:
                raise RuntimeError("another tile of this product failed")
            np.add(dx, part, out=dx)
            turn[0] += 1
            done.notify_all()

    for_each_tile(w, work)


def rows(w: BaseWeight, ids: np.ndarray) -> np.ndarray:
    """float32 rows ids of w (an embedding lookup)."""
    ids = np.asarray(ids, dtype=np.int64)
    return kernels.dequantize_rows(w.type, w.data, w.n_cols, ids)
