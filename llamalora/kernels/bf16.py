"""BF16 tensors: the top 16 bits of float32 values (sign, 8-bit exponent, 7-bit mantissa).

Rows stay the file's bytes; the kernels widen eight values at a time (a shift into the high half of a
32-bit lane, exact) and multiply them with the float32 activations.
"""

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import blockdot, simd
from .blockdot import LANES, _fmuladd, _reduce, _vf, _vi16, _vi32

BLOCK_SIZE = 1
TYPE_SIZE = 2


def dequantize(data: np.ndarray, n_cols: int) -> np.ndarray:
    bits = np.ascontiguousarray(data).view(np.uint16).reshape(data.shape[0], n_cols)
    return (bits.astype(np.uint32) << 16).view(np.float32)


def quantize(x: np.ndarray) -> np.ndarray:
    """ggml's fp32 → bf16: NaN kept quiet, everything else rounded to nearest even (bit-exact)."""
    n = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    n = np.where((n & 0x7FFFFFFF) > 0x7F800000, (n & np.uint32(0xFFFF0000)) | np.uint32(64 << 16), n)
    n = (n.astype(np.uint64) + (0x7FFF + ((n >> 16) & 1))) >> 16
    return n.astype(np.uint16).view(np.uint8).reshape(x.shape[0], -1)


def _widen(builder, base, byte_offset):
    ptr = builder.gep(base, [byte_offset])
    v = builder.load(builder.bitcast(ptr, _vi16.as_pointer()), align=1)
    return builder.bitcast(builder.shl(builder.zext(v, _vi32), blockdot.ivec(16)), _vf)


@intrinsic
def _row_dot(typingctx, row_addr, x_addr, n):
    """Σ_j widen(row[j])·x[j] over the first n − n % 8 values."""
    sig = types.float32(types.intp, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        row_addr, x_addr, n = args
        i8p = ir.IntType(8).as_pointer()
        row, xs = builder.inttoptr(row_addr, i8p), builder.inttoptr(x_addr, _vf.as_pointer())
        accs = [cgutils.alloca_once_value(builder, ir.Constant(_vf, [0.0] * LANES)) for _ in range(2)]
        with cgutils.for_range(builder, builder.udiv(n, ir.Constant(n.type, 2 * LANES))) as loop:
            for k in range(2):
                step = builder.add(builder.mul(loop.index, ir.Constant(n.type, 2)), ir.Constant(n.type, k))
                w = _widen(builder, row, builder.mul(step, ir.Constant(n.type, 2 * LANES)))
                xv = builder.load(builder.gep(xs, [step]), align=4)
                builder.store(_fmuladd(builder, w, xv, builder.load(accs[k])), accs[k])
        odd = builder.urem(builder.udiv(n, ir.Constant(n.type, LANES)), ir.Constant(n.type, 2))
        with builder.if_then(builder.icmp_unsigned("!=", odd, ir.Constant(n.type, 0))):
            step = builder.sub(builder.udiv(n, ir.Constant(n.type, LANES)), ir.Constant(n.type, 1))
            w = _widen(builder, row, builder.mul(step, ir.Constant(n.type, 2 * LANES)))
            xv = builder.load(builder.gep(xs, [step]), align=4)
            builder.store(_fmuladd(builder, w, xv, builder.load(accs[0])), accs[0])
        total = builder.fadd(builder.load(accs[0]), builder.load(accs[1]))
        return _reduce(builder, total)

    return sig, codegen


@intrinsic
def _row_widen(typingctx, row_addr, out_addr, n):
    """out[j] = widen(row[j]) for the first n − n % 8 values."""
    sig = types.none(types.intp, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        row_addr, out_addr, n = args
        row = builder.inttoptr(row_addr, ir.IntType(8).as_pointer())
        outs = builder.inttoptr(out_addr, _vf.as_pointer())
        with cgutils.for_range(builder, builder.udiv(n, ir.Constant(n.type, LANES))) as loop:
            w = _widen(builder, row, builder.mul(loop.index, ir.Constant(n.type, 2 * LANES)))
            builder.store(w, builder.gep(outs, [loop.index]), align=4)
        return context.get_dummy_value()

    return sig, codegen


@njit(nogil=True, cache=True)
def _tail(bits, r, x, start):
    s = np.float32(0.0)
    raw = np.empty(1, dtype=np.uint32)
    for j in range(start, x.shape[0]):
        raw[0] = np.uint32(bits[r, j]) << 16
        s += raw.view(np.float32)[0] * x[j]
    return s


@njit(nogil=True, cache=True)
def _check(bits, x, out):
    if bits.strides[1] != 2 or x.strides[-1] != 4 or (x.ndim == 2 and x.strides[0] % 4 != 0):
        raise ValueError("kernel arrays need contiguous rows (bf16 rows, float32 x)")
    if bits.shape[1] != x.shape[-1] or out.shape[-1] != bits.shape[0] or (x.ndim == 2 and out.shape[0] != x.shape[0]):
        raise ValueError("kernel arrays disagree in shape (rows, x length, output)")


@njit(parallel=True, nogil=True, cache=True)
def bf16_matvec(bits, x, out):
    _check(bits, x, out)
    n = x.shape[0]
    whole = n - n % LANES
    for r in prange(bits.shape[0]):
        s = _row_dot(bits.ctypes.data + r * bits.strides[0], x.ctypes.data, n)
        if whole < n:
            s += _tail(bits, r, x, whole)
        out[r] = s


@njit(parallel=True, nogil=True, cache=True)
def bf16_matmul(bits, X, out):
    _check(bits, X, out)
    n_rows, n_tokens, n = bits.shape[0], X.shape[0], X.shape[1]
    if n_tokens < simd.MIN_TILED_BATCH or n % LANES != 0:
        for r in prange(n_rows):
            for t in range(n_tokens):
                s = _row_dot(bits.ctypes.data + r * bits.strides[0], X[t].ctypes.data, n)
                if n % LANES != 0:
                    s += _tail(bits, r, X[t], n - n % LANES)
                out[t, r] = s
        return
    row_tile = simd.ROW_TILE
    for g in prange((n_rows + row_tile - 1) // row_tile):
        r0 = g * row_tile
        n_valid = min(row_tile, n_rows - r0)
        tile = np.zeros((row_tile, n), dtype=np.float32)
        for i in range(n_valid):
            _row_widen(bits.ctypes.data + (r0 + i) * bits.strides[0], tile.ctypes.data + i * tile.strides[0], n)
        simd._tile_times_batch(tile, n_valid, X, out, r0)


def prepare(data: np.ndarray, n_cols: int) -> tuple:
    """The raw rows seen as uint16 bits (still the file's bytes)."""
    return (data.view(np.uint16),)


def matvec(prepared: tuple, x: np.ndarray, out: np.ndarray) -> None:
    bf16_matvec(prepared[0], x, out)


def matmul(prepared: tuple, x: np.ndarray, out: np.ndarray) -> None:
    bf16_matmul(prepared[0], x, out)
