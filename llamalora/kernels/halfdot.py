"""Vector kernels for 2-byte float weights (F16, BF16): W·x and X·Wᵀ on the file's rows.

Rows stay the file's bytes (uint16[n_rows, n_cols], any row stride). The kernels load 16 values at a
time and widen them to <16 x float> in registers, which is exact for both types, then multiply them with
the float32 activations:

    F16           <16 x half> fpext <16 x float>: one vcvtph2ps (x86 F16C / AVX-512) or fcvtl pair (ARM)
    F16_PORTABLE  the same values from integer operations, for targets where LLVM would call a library
                  routine per value instead (x86 without F16C, other architectures)
    BF16          the 16 bits shifted into the high half of a 32-bit lane

Results are those of the float32 product with the widened weights up to float32 rounding: only the order
of the sum differs, and it is fixed (16 lanes per row, one accumulator per row, halved at the end, then
the n % 16 tail), the same for a row whether it is computed alone or with its neighbours.

matvec: ROWS rows per step share each load of x (their accumulators stay in registers); threads take
groups of rows. matmul: a tile of rows is widened to float32 once, then a register-blocked loop multiplies
it with every token of the batch (6 rows × 4 tokens of 16-lane accumulators on AVX-512, simd's 8-lane
loop elsewhere or when rows are not a whole number of 16 values); batches smaller than simd.MIN_TILED_BATCH run the matvec
kernel per token.
"""

import numpy as np
from llvmlite import ir
from numba import literally, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import simd, target

F16, F16_PORTABLE, BF16 = 0, 1, 2
KINDS = (F16, F16_PORTABLE, BF16)
LANES = 16   # values widened and multiplied per step: one AVX-512 register, two AVX2 / four NEON ones
# Rows per matvec step: 4 share each load of x (4 accumulators + x + widened weights fit any target's registers).
# Adjacent, except where the host's prefetchers follow sequential streams of their own best (AMD,
# target.host_spreads_rows): there a step takes rows g, g + n/4, g + n/2, g + 3n/4. On an EPYC Zen 4, compiled for
# Haswell, one core read SmolLM2's F16 weights at 22.0 GB/s so, 18.9 one row at a time and 9.8 four adjacent rows
# a step; the 1B-shaped model's 22.9, 20.1 and 13.0 (the host's AVX-512 code alike; CPU time, alternated in one
# process).
ROWS = 4
SPREAD_ROWS = target.host_spreads_rows()

_f32 = ir.FloatType()
_i16 = ir.IntType(16)
_i32 = ir.IntType(32)


def hardware_f16() -> bool:
    """Whether LLVM widens half floats with an instruction on the target numba compiles for (x86 with
    F16C, 64-bit ARM); elsewhere fpext on half becomes a library call per value."""
    import llvmlite.binding as llvm

    triple = llvm.get_process_triple()
    if triple.startswith(("aarch64", "arm64")):
        return True
    if not triple.startswith(("x86_64", "i386", "i686")):
        return False
    return target.has("f16c")


F16_KIND = F16 if hardware_f16() else F16_PORTABLE


def _ivec(width, value):
    return ir.Constant(ir.VectorType(_i32, width), [value] * width)


def _widen(builder, kind, base, byte_offset, width):
    """<width x float> of the `width` 2-byte values at base + byte_offset (base an i8*), exact."""
    vi16, vi32, vf = (ir.VectorType(t, width) for t in (_i16, _i32, _f32))
    ptr = builder.bitcast(builder.gep(base, [byte_offset]), vi16.as_pointer())
    bits = builder.load(ptr, align=1)
    if kind == F16:
        return builder.fpext(builder.bitcast(bits, ir.VectorType(ir.HalfType(), width)), vf)
    h = builder.zext(bits, vi32)
    if kind == BF16:
        return builder.bitcast(builder.shl(h, _ivec(width, 16)), vf)
    # F16_PORTABLE: a normal half's exponent and mantissa move into a float's by a shift and a re-bias;
    # a subnormal one is mantissa · 2^-24 (exact); infinity and NaN get the float's all-ones exponent
    magnitude = builder.and_(h, _ivec(width, 0x7FFF))
    shifted = builder.shl(magnitude, _ivec(width, 13))
    normal = builder.add(shifted, _ivec(width, (127 - 15) << 23))
    special = builder.or_(shifted, _ivec(width, 0x7F800000))
    scale = ir.Constant(vf, [2.0 ** -24] * width)
    subnormal = builder.bitcast(builder.fmul(builder.sitofp(magnitude, vf), scale), vi32)
    value = builder.select(builder.icmp_unsigned(">=", magnitude, _ivec(width, 0x7C00)), special, normal)
    value = builder.select(builder.icmp_unsigned("<", magnitude, _ivec(width, 0x0400)), subnormal, value)
    sign = builder.shl(builder.and_(h, _ivec(width, 0x8000)), _ivec(width, 16))
    return builder.bitcast(builder.or_(value, sign), vf)


def _fmuladd(builder, a, b, c):
    name = f"llvm.fmuladd.v{a.type.count}f32" if isinstance(a.type, ir.VectorType) else "llvm.fmuladd.f32"
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(a.type, [a.type] * 3), name)
    return builder.call(fn, [a, b, c])


def _literal_kind(kind):
    if not isinstance(kind, types.IntegerLiteral) or kind.literal_value not in KINDS:
        return None
    return kind.literal_value


def _make_rows_dot(n_rows):
    """Intrinsic (kind, row_addr, row_stride, x_addr, n) -> n_rows float32: row_i · x for the rows at
    row_addr + i·row_stride (bytes), each of n 2-byte values, x float32[n]."""

    @intrinsic
    def rows_dot(typingctx, kind, row_addr, row_stride, x_addr, n):
        k = _literal_kind(kind)
        if k is None:
            return None
        sig = types.UniTuple(types.float32, n_rows)(kind, types.intp, types.intp, types.intp, types.intp)

        def codegen(context, builder, signature, args):
            _, row_addr, row_stride, x_addr, n = args
            intp = n.type
            i8p = ir.IntType(8).as_pointer()
            rows, xs = builder.inttoptr(row_addr, i8p), builder.inttoptr(x_addr, i8p)
            vf = ir.VectorType(_f32, LANES)
            accs = [cgutils.alloca_once_value(builder, ir.Constant(vf, [0.0] * LANES)) for _ in range(n_rows)]
            tails = [cgutils.alloca_once_value(builder, ir.Constant(_f32, 0.0)) for _ in range(n_rows)]
            row_offs = [builder.mul(row_stride, ir.Constant(intp, i)) for i in range(n_rows)]
            whole = builder.udiv(n, ir.Constant(intp, LANES))
            with cgutils.for_range(builder, whole) as loop:
                w_off = builder.mul(loop.index, ir.Constant(intp, 2 * LANES))
                x_ptr = builder.gep(xs, [builder.mul(loop.index, ir.Constant(intp, 4 * LANES))])
                xv = builder.load(builder.bitcast(x_ptr, vf.as_pointer()), align=4)
                for i in range(n_rows):
                    w = _widen(builder, k, rows, builder.add(row_offs[i], w_off), LANES)
                    builder.store(_fmuladd(builder, w, xv, builder.load(accs[i])), accs[i])
            start = builder.mul(whole, ir.Constant(intp, LANES))
            with cgutils.for_range_slice(builder, start, n, ir.Constant(intp, 1), intp=intp) as (j, _):
                x_ptr = builder.gep(xs, [builder.mul(j, ir.Constant(intp, 4))])
                xj = builder.load(builder.bitcast(x_ptr, _f32.as_pointer()), align=4)
                for i in range(n_rows):
                    w1 = _widen(builder, k, rows, builder.add(row_offs[i], builder.mul(j, ir.Constant(intp, 2))), 1)
                    w = builder.extract_element(w1, ir.Constant(_i32, 0))
                    builder.store(_fmuladd(builder, w, xj, builder.load(tails[i])), tails[i])
            sums = [builder.fadd(simd._reduce(builder, builder.load(accs[i])), builder.load(tails[i]))
                    for i in range(n_rows)]
            return context.make_tuple(builder, signature.return_type, sums)

        return sig, codegen

    return rows_dot


_dot_rows = _make_rows_dot(ROWS)
_dot_row = _make_rows_dot(1)


@intrinsic
def widen_row(typingctx, kind, row_addr, out_addr, n):
    """out float32[n] = the n 2-byte values at row_addr, widened (exact)."""
    k = _literal_kind(kind)
    if k is None:
        return None
    sig = types.none(kind, types.intp, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        _, row_addr, out_addr, n = args
        intp = n.type
        i8p = ir.IntType(8).as_pointer()
        row, outs = builder.inttoptr(row_addr, i8p), builder.inttoptr(out_addr, i8p)
        whole = builder.udiv(n, ir.Constant(intp, LANES))
        with cgutils.for_range(builder, whole) as loop:
            w = _widen(builder, k, row, builder.mul(loop.index, ir.Constant(intp, 2 * LANES)), LANES)
            ptr = builder.gep(outs, [builder.mul(loop.index, ir.Constant(intp, 4 * LANES))])
            builder.store(w, builder.bitcast(ptr, w.type.as_pointer()), align=4)
        start = builder.mul(whole, ir.Constant(intp, LANES))
        with cgutils.for_range_slice(builder, start, n, ir.Constant(intp, 1), intp=intp) as (j, _):
            w = builder.extract_element(_widen(builder, k, row, builder.mul(j, ir.Constant(intp, 2)), 1),
                                        ir.Constant(_i32, 0))
            ptr = builder.gep(outs, [builder.mul(j, ir.Constant(intp, 4))])
            builder.store(w, builder.bitcast(ptr, _f32.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


@njit(nogil=True, cache=True)
def check_layout(bits, x, out):
    if bits.strides[1] != 2 or x.strides[-1] != 4 or (x.ndim == 2 and x.strides[0] % 4 != 0):
        raise ValueError("kernel arrays need contiguous rows (2-byte weights, float32 x)")
    if bits.shape[1] != x.shape[-1] or out.shape[-1] != bits.shape[0] or (x.ndim == 2 and out.shape[0] != x.shape[0]):
        raise ValueError("kernel arrays disagree in shape (rows, x length, output)")


@njit(nogil=True, cache=True)
def _rows_times_vector(kind, bits, x, out, g):
    """out[r] = row r · x for the ROWS rows of group g (fewer at the end of the matrix): rows g, g + part, … (part =
    n_rows // ROWS) with SPREAD_ROWS, the group part the n_rows % ROWS rows after them; else rows g·ROWS …"""
    n_rows, n = bits.shape[0], x.shape[0]
    addr, stride = bits.ctypes.data, bits.strides[0]
    part = n_rows // ROWS
    if SPREAD_ROWS and g < part:
        s = _dot_rows(kind, addr + g * stride, part * stride, x.ctypes.data, n)
        for i in range(ROWS):
            out[g + i * part] = s[i]
        return
    r0 = g * ROWS
    if r0 + ROWS <= n_rows:
        s = _dot_rows(kind, addr + r0 * stride, stride, x.ctypes.data, n)
        for i in range(ROWS):
            out[r0 + i] = s[i]
    else:
        for r in range(r0, n_rows):
            out[r] = _dot_row(kind, addr + r * stride, stride, x.ctypes.data, n)[0]


@njit(parallel=True, nogil=True, cache=True)
def matvec(kind, bits, x, out):
    """out[r] = row r · x for bits uint16[n_rows, n] (F16 or BF16 values by kind), x float32[n]."""
    literally(kind)
    check_layout(bits, x, out)
    for g in prange((bits.shape[0] + ROWS - 1) // ROWS):
        _rows_times_vector(kind, bits, x, out, g)


@njit(parallel=True, nogil=True, cache=True)
def matmul(kind, bits, X, out):
    """out[t, r] = row r · X[t] for a batch X float32[b, n], out float32[b, n_rows]."""
    literally(kind)
    check_layout(bits, X, out)
    n_rows, n_tokens, n = bits.shape[0], X.shape[0], X.shape[1]
    if n_tokens < simd.MIN_TILED_BATCH or n % simd.LANES != 0:
        for g in prange((n_rows + ROWS - 1) // ROWS):
            for t in range(n_tokens):
                _rows_times_vector(kind, bits, X[t], out[t], g)
        return
    row_tile = simd.ROW_TILE
    addr, stride = bits.ctypes.data, bits.strides[0]
    for g in prange((n_rows + row_tile - 1) // row_tile):
        r0 = g * row_tile
        n_valid = min(row_tile, n_rows - r0)
        tile = np.zeros((row_tile, n), dtype=np.float32)
        for i in range(n_valid):
            widen_row(kind, addr + (r0 + i) * stride, tile.ctypes.data + i * tile.strides[0], n)
        simd.tile_times_batch(tile, n_valid, X, out, r0)


def kind_kernels(kind):
    """A type module's compiled (matvec, matmul) on bits uint16[n_rows, n] of one kind: kind is a closure
    constant, which numba types as the literal matvec and matmul need (and keys the cached code on)."""

    @njit(nogil=True, cache=True)
    def kind_matvec(bits, x, out):
        matvec(kind, bits, x, out)

    @njit(nogil=True, cache=True)
    def kind_matmul(bits, x, out):
        matmul(kind, bits, x, out)

    return kind_matvec, kind_matmul


def prepare(data: np.ndarray, n_cols: int) -> tuple:
    """The raw rows seen as uint16 bits (still the file's bytes): F16's and BF16's prepare."""
    return (data.view(np.uint16),)


@njit(parallel=True, nogil=True, cache=True)
def widen_rows(kind, bits, out):
    """out float32[n_rows, n] = the rows' values (exact)."""
    literally(kind)
    for r in prange(bits.shape[0]):
        widen_row(kind, bits.ctypes.data + r * bits.strides[0], out.ctypes.data + r * out.strides[0], bits.shape[1])
