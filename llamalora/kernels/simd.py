"""Vectorized matrix × vector kernels for the 4-bit (Q4_0, Q4_1) and 8-bit (Q8_0) block types.

The inner loops are written as generic LLVM vector code (numba intrinsics built with llvmlite): a block's
16 bytes of nibbles are loaded as one <16 x i8>, split into low and high nibbles, widened to
<16 x float> and multiplied with the float32 activations; a <16 x float> accumulator per row runs across
the row's blocks. LLVM lowers these vectors to whatever the host has (AVX-512, AVX2, SSE, NEON), so one
source serves every machine. Activations stay float32 throughout: nothing is quantized on the fly, and the
results are those of the dequantized float32 weights up to float32 rounding.

Rows keep the file's bytes: data is uint8[n_rows, row_nbytes] (each row contiguous, any row stride).
Block scales d and minima m are float32[n_rows, n_blocks] (Q4_0 passes m = -8·d). A 4-bit block has its
nibbles at qs_offset inside block_bytes bytes (Q4_1: 4 and 20, Q4_0: 2 and 18): byte j holds weight j in
its low nibble and weight j + 16 in its high one. A Q8_0 block is a half scale and 32 signed bytes.

Every kernel here has a plain-loop twin (`*_loop`) that computes the same sums without intrinsics.
"""

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

LANES = 16
ROWS_PER_STEP = 4  # rows that share each load of x in the vector kernels

_f32 = ir.FloatType()
_i8 = ir.IntType(8)
_i32 = ir.IntType(32)
_vf = ir.VectorType(_f32, LANES)
_vi8 = ir.VectorType(_i8, LANES)


def _splat(builder, value, vtype):
    undef = ir.Constant(vtype, ir.Undefined)
    one = builder.insert_element(undef, value, ir.Constant(_i32, 0))
    return builder.shuffle_vector(one, undef, ir.Constant(ir.VectorType(_i32, vtype.count), [0] * vtype.count))


def _fmuladd(builder, a, b, c):
    """a·b + c, fused where the target has a fast FMA (llvm.fmuladd never becomes a slow libm call)."""
    fnty = ir.FunctionType(a.type, [a.type, a.type, a.type])
    fn = cgutils.get_or_insert_function(builder.module, fnty, f"llvm.fmuladd.v{a.type.count}f32")
    return builder.call(fn, [a, b, c])


def _reduce(builder, v):
    """Sum of the lanes of v by halving (a fixed order, so the result never depends on the target)."""
    n = v.type.count
    while n > 1:
        n //= 2
        lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_i32, n), list(range(n))))
        hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_i32, n), list(range(n, 2 * n))))
        v = builder.fadd(lo, hi)
    return builder.extract_element(v, ir.Constant(_i32, 0))


def _load(builder, base, byte_offset, vtype, align):
    ptr = builder.gep(base, [byte_offset])
    return builder.load(builder.bitcast(ptr, vtype.as_pointer()), align=align)


def _load_scalar_f32(builder, base, byte_offset):
    ptr = builder.gep(base, [byte_offset])
    return builder.load(builder.bitcast(ptr, _f32.as_pointer()), align=4)


def _make_rows_dot(n_rows, kind):
    """Intrinsic (row_addr, row_stride, d_addr, d_stride, x_addr, nb, qs_offset, block_bytes) -> n_rows float32:
    for each of n_rows consecutive rows, sum over blocks b of d[b] · (q_b · x_b) (the m term is not included).
    Addresses and strides are in bytes; kind is "q4" (nibbles) or "q8" (signed bytes)."""

    @intrinsic
    def rows_dot(typingctx, row_addr, row_stride, d_addr, d_stride, x_addr, nb, qs_offset, block_bytes):
        sig = types.UniTuple(types.float32, n_rows)(*([types.intp] * 8))

        def codegen(context, builder, signature, args):
            row_addr, row_stride, d_addr, d_stride, x_addr, nb, qs_offset, block_bytes = args
            i8p = _i8.as_pointer()
            rows = builder.inttoptr(row_addr, i8p)
            dbase = builder.inttoptr(d_addr, i8p)
            xbase = builder.inttoptr(x_addr, i8p)
            intp = row_addr.type
            zero = ir.Constant(_vf, [0.0] * LANES)
            accs = [cgutils.alloca_once_value(builder, zero) for _ in range(n_rows)]
            low_mask = ir.Constant(_vi8, [15] * LANES)
            shift = ir.Constant(_vi8, [4] * LANES)
            with cgutils.for_range(builder, nb) as loop:
                b = loop.index
                x_off = builder.mul(b, ir.Constant(intp, 32 * 4))
                x_lo = _load(builder, xbase, x_off, _vf, 4)
                x_hi = _load(builder, xbase, builder.add(x_off, ir.Constant(intp, LANES * 4)), _vf, 4)
                q_off = builder.add(builder.mul(b, block_bytes), qs_offset)
                d_off = builder.mul(b, ir.Constant(intp, 4))
                for r in range(n_rows):
                    row_off = builder.mul(row_stride, ir.Constant(intp, r))
                    off = builder.add(row_off, q_off)
                    if kind == "q4":
                        q = _load(builder, rows, off, _vi8, 1)
                        f_lo = builder.uitofp(builder.and_(q, low_mask), _vf)
                        f_hi = builder.uitofp(builder.lshr(q, shift), _vf)
                    else:
                        f_lo = builder.sitofp(_load(builder, rows, off, _vi8, 1), _vf)
                        f_hi = builder.sitofp(
                            _load(builder, rows, builder.add(off, ir.Constant(intp, LANES)), _vi8, 1), _vf)
                    s = _fmuladd(builder, f_hi, x_hi, builder.fmul(f_lo, x_lo))
                    dr = _load_scalar_f32(builder, dbase, builder.add(builder.mul(d_stride, ir.Constant(intp, r)), d_off))
                    acc = builder.load(accs[r])
                    builder.store(_fmuladd(builder, _splat(builder, dr, _vf), s, acc), accs[r])
            sums = [_reduce(builder, builder.load(a)) for a in accs]
            return context.make_tuple(builder, signature.return_type, sums)

        return sig, codegen

    return rows_dot


_q4_dot4 = _make_rows_dot(ROWS_PER_STEP, "q4")
_q4_dot1 = _make_rows_dot(1, "q4")
_q8_dot4 = _make_rows_dot(ROWS_PER_STEP, "q8")
_q8_dot1 = _make_rows_dot(1, "q8")


@njit(nogil=True, cache=True)
def block_sums(x):
    """float32 sum of x over each block of 32 (what the per-block minima multiply)."""
    nb = x.shape[0] // 32
    sums = np.empty(nb, dtype=np.float32)
    for b in range(nb):
        s = np.float32(0.0)
        for j in range(32):
            s += x[b * 32 + j]
        sums[b] = s
    return sums


@njit(nogil=True, cache=True)
def _check_layout(data, d, x, block_bytes):
    if data.strides[1] != 1 or d.strides[1] != 4 or x.strides[0] != 4:
        raise ValueError("kernel arrays must have contiguous rows (data uint8, d float32, x float32)")
    if data.shape[1] < d.shape[1] * block_bytes or x.shape[0] != d.shape[1] * 32 or d.shape[0] != data.shape[0]:
        raise ValueError("kernel arrays disagree in shape (data rows, scale blocks, x length)")


@njit(nogil=True, cache=True, fastmath=True)
def _min_term(m, r, xsum):
    s = np.float32(0.0)
    for b in range(xsum.shape[0]):
        s += m[r, b] * xsum[b]
    return s


@njit(parallel=True, nogil=True, cache=True)
def q4_matvec(data, d, m, qs_offset, block_bytes, x, out):
    """out[r] = Σ_b d[r,b]·(q_rb · x_b) + Σ_b m[r,b]·Σx_b for 4-bit blocks (see the module docstring)."""
    _check_layout(data, d, x, block_bytes)
    n_rows, nb = data.shape[0], d.shape[1]
    xsum = block_sums(x)
    row_addr, row_stride = data.ctypes.data, data.strides[0]
    d_addr, d_stride = d.ctypes.data, d.strides[0]
    x_addr = x.ctypes.data
    n_steps = n_rows // ROWS_PER_STEP
    for g in prange(n_steps + n_rows % ROWS_PER_STEP):
        if g < n_steps:
            r = g * ROWS_PER_STEP
            s = _q4_dot4(row_addr + r * row_stride, row_stride, d_addr + r * d_stride, d_stride,
                         x_addr, nb, qs_offset, block_bytes)
            out[r] = s[0] + _min_term(m, r, xsum)
            out[r + 1] = s[1] + _min_term(m, r + 1, xsum)
            out[r + 2] = s[2] + _min_term(m, r + 2, xsum)
            out[r + 3] = s[3] + _min_term(m, r + 3, xsum)
        else:
            r = n_steps * ROWS_PER_STEP + g - n_steps
            s1 = _q4_dot1(row_addr + r * row_stride, row_stride, d_addr + r * d_stride, d_stride,
                          x_addr, nb, qs_offset, block_bytes)
            out[r] = s1[0] + _min_term(m, r, xsum)


@njit(parallel=True, nogil=True, cache=True)
def q8_matvec(data, d, x, out):
    """out[r] = Σ_b d[r,b]·(q_rb · x_b) for Q8_0 blocks (2-byte half scale, 32 signed bytes)."""
    _check_layout(data, d, x, 34)
    n_rows, nb = data.shape[0], d.shape[1]
    row_addr, row_stride = data.ctypes.data, data.strides[0]
    d_addr, d_stride = d.ctypes.data, d.strides[0]
    x_addr = x.ctypes.data
    n_steps = n_rows // ROWS_PER_STEP
    for g in prange(n_steps + n_rows % ROWS_PER_STEP):
        if g < n_steps:
            r = g * ROWS_PER_STEP
            s = _q8_dot4(row_addr + r * row_stride, row_stride, d_addr + r * d_stride, d_stride,
                         x_addr, nb, 2, 34)
            out[r] = s[0]
            out[r + 1] = s[1]
            out[r + 2] = s[2]
            out[r + 3] = s[3]
        else:
            r = n_steps * ROWS_PER_STEP + g - n_steps
            out[r] = _q8_dot1(row_addr + r * row_stride, row_stride, d_addr + r * d_stride, d_stride,
                              x_addr, nb, 2, 34)[0]


@njit(nogil=True, cache=True)
def q4_matmul(data, d, m, qs_offset, block_bytes, X, out):
    """out[t, r] = row r · X[t] for a batch X float32[b, n_cols], out float32[b, n_rows]."""
    for t in range(X.shape[0]):
        q4_matvec(data, d, m, qs_offset, block_bytes, X[t], out[t])


@njit(nogil=True, cache=True)
def q8_matmul(data, d, X, out):
    """out[t, r] = row r · X[t] for a batch X float32[b, n_cols], out float32[b, n_rows]."""
    for t in range(X.shape[0]):
        q8_matvec(data, d, X[t], out[t])


# Plain loops: the same sums without intrinsics (the reference the vector kernels are tested against).

@njit(parallel=True, nogil=True, cache=True, fastmath=True)
def q4_matvec_loop(data, d, m, qs_offset, block_bytes, x, out):
    nb = d.shape[1]
    xsum = block_sums(x)
    for r in prange(data.shape[0]):
        acc = np.float32(0.0)
        for b in range(nb):
            base = b * block_bytes + qs_offset
            s = np.float32(0.0)
            for j in range(16):
                q = data[r, base + j]
                s += np.float32(q & 15) * x[b * 32 + j] + np.float32(q >> 4) * x[b * 32 + 16 + j]
            acc += d[r, b] * s + m[r, b] * xsum[b]
        out[r] = acc


@njit(parallel=True, nogil=True, cache=True, fastmath=True)
def q8_matvec_loop(data, d, x, out):
    nb = d.shape[1]
    for r in prange(data.shape[0]):
        acc = np.float32(0.0)
        for b in range(nb):
            base = b * 34 + 2
            s = np.float32(0.0)
            for j in range(32):
                s += np.float32(np.int8(data[r, base + j])) * x[b * 32 + j]
            acc += d[r, b] * s
        out[r] = acc
