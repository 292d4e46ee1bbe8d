"""Products with a base weight that stays in its file type: each row tile is dequantized into a small float
buffer just before BLAS uses it, so the whole model never exists in float32.

The tile values equal llamalora.kernels.dequantize's exactly (same float32 operations), so training sees the
same weights inference runs with.
"""

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
from .team import row_blocks, run_tasks, team_tasks, thread_buffer

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


def dequantize_tile(w: BaseWeight, r0: int, r1: int, out: np.ndarray, c0: int = 0, c1: int | None = None):
    """Rows r0..r1, columns c0..c1 (default: all; quantized types: on block boundaries, multiples of 32) of w as
    float32 (out is a scratch buffer of at least (r1 - r0) * (c1 - c0) floats); returns the tile."""
    c1 = w.n_cols if c1 is None else c1
    tile = out.reshape(-1)[: (r1 - r0) * (c1 - c0)].reshape(r1 - r0, c1 - c0)
    if w.type == GGMLType.F32:
        return w.data[r0:r1].view(np.float32)[:, c0:c1]
    if w.type == GGMLType.F16:
        tile[...] = w.data[r0:r1].view(np.float16)[:, c0:c1]
    elif w.type == GGMLType.Q4_1:
        q4_rows(w.data, w.scales, w.minima, r0, 0, 4, 20, tile, 0, r1 - r0, c0 // 32)
    elif w.type == GGMLType.Q4_0:
        q4_rows(w.data, w.scales, w.minima, r0, 8, 2, 18, tile, 0, r1 - r0, c0 // 32)
    else:
        q8_rows(w.data, w.scales, r0, tile, 0, r1 - r0, c0 // 32)
    return tile


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
def q4_rows(data, scales, minima, r0, offset, qs_offset, type_size, out, i0, i1, b0):
    """out[i] = blocks b0.. of row r0 + i (as many as out's row holds), for i in i0..i1."""
    n_blocks = out.shape[1] // 32
    for i in range(i0, i1):
        r = r0 + i
        _widen_q4_row(data.ctypes.data + r * data.strides[0] + b0 * type_size,
                      scales.ctypes.data + r * scales.strides[0] + b0 * 4,
                      minima.ctypes.data + r * minima.strides[0] + b0 * 4, out.ctypes.data + i * out.strides[0],
                      n_blocks, offset, qs_offset, type_size)


@njit(nogil=True, cache=True)
def q8_rows(data, scales, r0, out, i0, i1, b0):
    n_blocks = out.shape[1] // 32
    for i in range(i0, i1):
        r = r0 + i
        _widen_q8_row(data.ctypes.data + r * data.strides[0] + b0 * 34,
                      scales.ctypes.data + r * scales.strides[0] + b0 * 4,
                      scales.ctypes.data, out.ctypes.data + i * out.strides[0], n_blocks, 0, 2, 34)


# ---- the products, as tasks for the thread team (team.py) ----
#
# A forward product's tasks are shares of W's rows (columns of the result; the rows of several weights that read
# one input laid end to end); a backward product's are column bands of W (columns of dx), each adding its band's
# row tiles in order, so that no two tasks write the same numbers and every sum is made in one order whatever
# the number of threads (splitting W's rows instead would leave a part per thread to add up afterwards). One
# thread runs one band, all columns: the same tiles and sums as before the products were split.

def tile_ranges(w: BaseWeight, r0: int = 0, r1: int | None = None, n_cols: int | None = None) -> list:
    """(r0, r1) tiles covering rows r0..r1 of w (default all), at most TILE_ELEMENTS floats of n_cols columns
    (default all) each."""
    r1 = w.n_rows if r1 is None else r1
    n_cols = w.n_cols if n_cols is None else n_cols
    step = int(max(16, TILE_ELEMENTS // max(n_cols, 1)))
    return [(t0, min(t0 + step, r1)) for t0 in range(r0, r1, step)]


def split_rows(sizes: list, parts: int) -> list:
    """The rows of weights of sizes (row counts) laid end to end and cut into `parts` about equal shares (at
    least 64 rows each, multiples of 16): each share a list of (weight index, r0, r1)."""
    step = max(64, -(-sum(sizes) // parts // 16) * 16) if parts > 1 else sum(sizes)
    shares, share, room = [], [], step
    for k, n in enumerate(sizes):
        r = 0
        while r < n:
            take = min(room, n - r)
            share.append((k, r, r + take))
            r, room = r + take, room - take
            if room == 0:
                shares.append(share)
                share, room = [], step
    return shares + ([share] if share else [])


def column_bands(n_cols: int) -> list:
    """(c0, c1) bands of a backward product's columns, on 32-column block boundaries: all of them on one thread,
    otherwise team_tasks() bands."""
    blocks = row_blocks(-(-n_cols // 32), min_rows=1)
    return [(32 * b0, min(32 * b1, n_cols)) for b0, b1 in blocks]


def forward_tasks(products: list, x: np.ndarray) -> list:
    """Tasks writing out = x @ W.T for each (w, out, after) of products (x [n, n_cols], out [n, w.n_rows]); the
    weights' rows are shared out evenly among team_tasks() tasks. after(r0, r1), when given, runs once a tile's
    columns out[:, r0:r1] are written (the LoRA term is added there)."""
    def task(share):
        for k, s0, s1 in share:
            w, out, after = products[k]
            for r0, r1 in tile_ranges(w, s0, s1):
                tile = dequantize_tile(w, r0, r1, thread_buffer("tile", (r1 - r0, w.n_cols), np.float32))
                if x.dtype != np.float32:
                    tile = tile.astype(x.dtype)
                np.matmul(x, tile.T, out=out[:, r0:r1])
                if after is not None:
                    after(r0, r1)

    shares = split_rows([w.n_rows for w, _, _ in products], team_tasks())
    return [(lambda share=share: task(share)) for share in shares]


def times_wt(w: BaseWeight, x: np.ndarray) -> np.ndarray:
    """x @ W.T for x [n, n_cols] (a forward product), in x's dtype."""
    out = np.empty((x.shape[0], w.n_rows), dtype=x.dtype)
    run_tasks(forward_tasks([(w, out, None)], x))
    return out


def backward_tasks(products: list, dx: np.ndarray, accumulate: bool = True) -> list:
    """Tasks writing dx += sum of dy @ W over products, a list of (w, dy, after) with dy [n, w.n_rows] (accumulate
    False: dx = the sum, whatever dx held). Each task is a band of dx's columns: the products in order, each
    product's tiles in order, each added into dx by BLAS (beta 1), then after(c0, c1) when given (the LoRA terms
    of that product, on the band's columns)."""
    n_cols = dx.shape[1]

    def task(c0, c1):
        first = not accumulate
        for w, dy, after in products:
            for r0, r1 in tile_ranges(w, n_cols=c1 - c0):
                tile = dequantize_tile(w, r0, r1, thread_buffer("tile", (r1 - r0, c1 - c0), np.float32), c0, c1)
                if dx.dtype != np.float32:
                    tile = tile.astype(dx.dtype)
                gemm(dy[:, r0:r1], tile, dx[:, c0:c1], 1.0, 0.0 if first else 1.0)
                first = False
            if after is not None:
                after(c0, c1)

    return [(lambda c0=c0, c1=c1: task(c0, c1)) for c0, c1 in column_bands(n_cols)]


def add_times_w(w: BaseWeight, dy: np.ndarray, dx: np.ndarray, accumulate: bool = True) -> None:
    """dx += dy @ W for dy [n, n_rows] (a backward product through a frozen weight); accumulate False writes
    dx = dy @ W whatever dx held."""
    run_tasks(backward_tasks([(w, dy, None)], dx, accumulate))


def rows(w: BaseWeight, ids: np.ndarray) -> np.ndarray:
    """float32 rows ids of w (an embedding lookup)."""
    ids = np.asarray(ids, dtype=np.int64)
    return kernels.dequantize_rows(w.type, w.data, w.n_cols, ids)
