"""Vectorized kernels for the 4-bit (Q4_0, Q4_1) and 8-bit (Q8_0) block types: W·x and X·Wᵀ.

These are the portable kernels: generic LLVM vector code emitted through numba intrinsics (llvmlite IR).
In the matvec row loop a block's bytes are loaded sixteen at a time as <16 x i8>, widened to <16 x i32>,
split into nibbles, converted to <16 x float> and multiplied with the float32 activations; a vector
accumulator runs across a row's blocks. LLVM lowers the vectors to what the host has (AVX-512 whole;
AVX2, SSE and NEON in pieces), so one source serves every machine. Activations stay float32: nothing is
quantized on the fly, and results are those of the dequantized weights up to float32 rounding.
On AVX-512 VNNI and AVX2 targets the type modules use intmatvec.py's integer matvec instead (these kernels remain
its fallback, the matmul path, and the whole path under LLAMALORA_KERNELS=portable).

Rows keep the file's bytes: data is uint8[n_rows, row_nbytes] (each row contiguous, any row stride).
Block scales d and minima m are float32[n_rows, n_blocks] (Q4_0 passes m = -8·d). A 4-bit block holds
its nibbles at qs_offset inside block_bytes bytes (Q4_1: 4 and 20, Q4_0: 2 and 18): byte j has weight j
in its low nibble and weight j + 16 in its high one. A Q8_0 block is a half scale and 32 signed bytes.

matvec: out[r] = Σ_b d[r,b]·(q_rb · x_b) + Σ_b m[r,b]·Σx_b, one row per step (x stays in L1).
matmul: a tile of rows is widened to float32 once, then a register-blocked loop multiplies it with every
token of the batch (3 rows × 4 tokens of accumulators), so each weight is unpacked once per batch.
Batches of fewer than MIN_TILED_BATCH tokens take the matvec path per token.
The `*_loop` functions are plain numba loops computing the same sums without intrinsics.

Speed is bound by the int → float conversions (one per weight), not by memory: on an AVX2 Zen core the
4-bit matvec (then in 8 lanes) read about 3.5 GB/s of blocks and Q8_0 about 5.5 GB/s per thread, 5-6× the
plain loops; on an AVX-512 Xeon (Rocket Lake) one thread reads about 13.5 GB/s of Q4_1 and 20 GB/s of
Q8_0 with 16 lanes (1.25× the 8-lane loop there), vnni.py 15 and 21 GB/s.
"""

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import target

LANES = 8          # float lanes per vector in the matmul tiles: AVX2's width (LLVM splits or widens elsewhere)
ROW_LANES = 16     # float lanes of the matvec row loop: a block's 32 weights in two vectors (AVX-512 runs them
                   # whole, 1.2× faster than 8 lanes there; AVX2 and NEON split them)
TILE_ROWS = 3      # rows × tokens of accumulators in the matmul micro-kernel: 12 vectors + 3 row vectors
TILE_TOKENS = 4    # fit AVX2's 16 registers (x is read from memory by the FMA)
WIDE_LANES, WIDE_TILE_ROWS = 16, 6  # on AVX-512: 24 accumulators of 16 floats + 6 row vectors of its 32 registers
ROW_TILE = 48      # rows widened to float32 per matmul work item (a multiple of both tiles' rows)
TOKEN_CHUNK = 64   # tokens multiplied with a row tile while they stay in L2
MIN_TILED_BATCH = 4  # smaller batches run the matvec kernel per token (widening a tile costs about one matvec)
Q8_BLOCK_BYTES = 34
Q8_QS_OFFSET = 2

_f32 = ir.FloatType()
_i8 = ir.IntType(8)
_i32 = ir.IntType(32)
_vi8 = ir.VectorType(_i8, LANES)
_vi32 = ir.VectorType(_i32, LANES)


# --- IR helpers -------------------------------------------------------------------------------------

def _const(like, value):
    return ir.Constant(like.type, value)


def _splat(builder, value, lanes=LANES):
    undef = ir.Constant(ir.VectorType(value.type, lanes), ir.Undefined)
    one = builder.insert_element(undef, value, ir.Constant(_i32, 0))
    return builder.shuffle_vector(one, undef, ir.Constant(ir.VectorType(_i32, lanes), [0] * lanes))


def _fmuladd(builder, a, b, c):
    """a·b + c, fused where the target has a fast FMA (llvm.fmuladd never becomes a slow libm call)."""
    fnty = ir.FunctionType(a.type, [a.type, a.type, a.type])
    fn = cgutils.get_or_insert_function(builder.module, fnty, f"llvm.fmuladd.v{a.type.count}f32")
    return builder.call(fn, [a, b, c])


def _reduce(builder, v):
    """Sum of the lanes of v by halving (a fixed order, the same on every target)."""
    n = v.type.count
    while n > 1:
        n //= 2
        lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_i32, n), list(range(n))))
        hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_i32, n), list(range(n, 2 * n))))
        v = builder.fadd(lo, hi)
    return builder.extract_element(v, ir.Constant(_i32, 0))


def _prefetch(builder, address, locality=3):
    """Prefetch the line at the i8* address for reading: locality 3 into every cache level, 2 from the second on."""
    fnty = ir.FunctionType(ir.VoidType(), [address.type, _i32, _i32, _i32])
    fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
    builder.call(fn, [address, ir.Constant(_i32, 0), ir.Constant(_i32, locality), ir.Constant(_i32, 1)])


def _load(builder, base, byte_offset, vtype, align):
    ptr = builder.gep(base, [byte_offset])
    return builder.load(builder.bitcast(ptr, vtype.as_pointer()), align=align)


def _store(builder, value, base, byte_offset):
    ptr = builder.gep(base, [byte_offset])
    builder.store(value, builder.bitcast(ptr, value.type.as_pointer()), align=4)


def _block_weights(builder, rows, q_off, kind, lanes=LANES):
    """The 32 weights' q of the block whose q bytes start at q_off, as 32 / lanes vectors of <lanes x float>
    in weight order, exact small integers."""
    intp = q_off.type
    vi8, vi32, vf = ir.VectorType(_i8, lanes), ir.VectorType(_i32, lanes), ir.VectorType(_f32, lanes)
    if kind == "q4":
        low, high = [], []
        for k in range(16 // lanes):
            q = builder.zext(_load(builder, rows, builder.add(q_off, ir.Constant(intp, lanes * k)), vi8, 1), vi32)
            low.append(builder.sitofp(builder.and_(q, ir.Constant(vi32, [15] * lanes)), vf))
            high.append(builder.sitofp(builder.lshr(q, ir.Constant(vi32, [4] * lanes)), vf))
        return low + high
    return [builder.sitofp(builder.sext(_load(builder, rows, builder.add(q_off, ir.Constant(intp, lanes * k)), vi8, 1),
                                        vi32), vf) for k in range(32 // lanes)]


def _make_row_dot(kind, lanes=LANES):
    """Intrinsic (row_addr, d_addr, x_addr, nb, qs_offset, block_bytes) -> float32:
    Σ_b d[b]·(q_b · x_b) over one row's nb blocks (no minima), in <lanes x float> vectors. Addresses are in
    bytes."""

    @intrinsic
    def row_dot(typingctx, row_addr, d_addr, x_addr, nb, qs_offset, block_bytes):
        sig = types.float32(*([types.intp] * 6))

        def codegen(context, builder, signature, args):
            row_addr, d_addr, x_addr, nb, qs_offset, block_bytes = args
            i8p = _i8.as_pointer()
            rows, dbase, xbase = (builder.inttoptr(a, i8p) for a in (row_addr, d_addr, x_addr))
            vf = ir.VectorType(_f32, lanes)
            acc = cgutils.alloca_once_value(builder, ir.Constant(vf, [0.0] * lanes))
            with cgutils.for_range(builder, nb) as loop:
                b = loop.index
                x_off = builder.mul(b, _const(b, 128))
                xs = [_load(builder, xbase, builder.add(x_off, _const(b, 4 * lanes * k)), vf, 4)
                      for k in range(32 // lanes)]
                qs = _block_weights(builder, rows, builder.add(builder.mul(b, block_bytes), qs_offset), kind, lanes)
                s = builder.fmul(qs[0], xs[0])
                for k in range(1, 32 // lanes):
                    s = _fmuladd(builder, qs[k], xs[k], s)
                d = builder.load(builder.bitcast(builder.gep(dbase, [builder.mul(b, _const(b, 4))]),
                                                 _f32.as_pointer()), align=4)
                builder.store(_fmuladd(builder, _splat(builder, d, lanes), s, builder.load(acc)), acc)
            return _reduce(builder, builder.load(acc))

        return sig, codegen

    return row_dot


def _make_row_dequantize(kind):
    """Intrinsic (row_addr, d_addr, m_addr, out_addr, nb, qs_offset, block_bytes) -> None: writes the
    row's nb·32 float32 weights d·q + m to out (m_addr is ignored for Q8_0)."""

    @intrinsic
    def row_dequantize(typingctx, row_addr, d_addr, m_addr, out_addr, nb, qs_offset, block_bytes):
        sig = types.none(*([types.intp] * 7))

        def codegen(context, builder, signature, args):
            row_addr, d_addr, m_addr, out_addr, nb, qs_offset, block_bytes = args
            i8p = _i8.as_pointer()
            rows, dbase, mbase, obase = (builder.inttoptr(a, i8p) for a in (row_addr, d_addr, m_addr, out_addr))
            with cgutils.for_range(builder, nb) as loop:
                b = loop.index
                qs = _block_weights(builder, rows, builder.add(builder.mul(b, block_bytes), qs_offset), kind)
                scale_off = builder.mul(b, _const(b, 4))
                d = _splat(builder, builder.load(builder.bitcast(builder.gep(dbase, [scale_off]), _f32.as_pointer())))
                if kind == "q4":
                    m = _splat(builder, builder.load(builder.bitcast(builder.gep(mbase, [scale_off]), _f32.as_pointer())))
                out_off = builder.mul(b, _const(b, 128))
                for k in range(4):
                    w = _fmuladd(builder, d, qs[k], m) if kind == "q4" else builder.fmul(d, qs[k])
                    _store(builder, w, obase, builder.add(out_off, _const(b, 32 * k)))
            return context.get_dummy_value()

        return sig, codegen

    return row_dequantize


def _literal_ints(*args):
    """The values of integer-literal types, or None where one is not."""
    if not all(isinstance(a, types.IntegerLiteral) for a in args):
        return None
    return [a.literal_value for a in args]


@intrinsic(prefer_literal=True)
def _tile_dot(typingctx, lanes, n_rows, n_tokens, w_addr, w_stride, x_addr, x_stride, n):
    """(lanes, n_rows, n_tokens, w_addr, w_stride, x_addr, x_stride, n) -> n_rows·n_tokens float32: the dot
    products of n_rows float32 rows with n_tokens float32 rows, each of n values (a multiple of lanes), result
    [r·n_tokens + t], in accumulators of `lanes` floats. Strides are in bytes; the first three are constants."""
    shape = _literal_ints(lanes, n_rows, n_tokens)
    if shape is None:
        return None
    n_lanes, rows, tokens = shape
    sig = types.UniTuple(types.float32, rows * tokens)(lanes, n_rows, n_tokens, *([types.intp] * 5))

    def codegen(context, builder, signature, args):
        w_addr, w_stride, x_addr, x_stride, n = args[3:]
        i8p = _i8.as_pointer()
        vf = ir.VectorType(_f32, n_lanes)
        w, x = builder.inttoptr(w_addr, i8p), builder.inttoptr(x_addr, i8p)
        zero = ir.Constant(vf, [0.0] * n_lanes)
        accs = [[cgutils.alloca_once_value(builder, zero) for _ in range(tokens)] for _ in range(rows)]
        w_offs = [builder.mul(w_stride, _const(w_stride, r)) for r in range(rows)]
        x_offs = [builder.mul(x_stride, _const(x_stride, t)) for t in range(tokens)]
        with cgutils.for_range(builder, builder.udiv(n, _const(n, n_lanes))) as loop:
            off = builder.mul(loop.index, _const(n, n_lanes * 4))
            ws = [_load(builder, w, builder.add(off, w_offs[r]), vf, 4) for r in range(rows)]
            for t in range(tokens):
                xv = _load(builder, x, builder.add(off, x_offs[t]), vf, 4)
                for r in range(rows):
                    builder.store(_fmuladd(builder, ws[r], xv, builder.load(accs[r][t])), accs[r][t])
        sums = [_reduce(builder, builder.load(accs[r][t])) for r in range(rows) for t in range(tokens)]
        return context.make_tuple(builder, signature.return_type, sums)

    return sig, codegen


_q4_row_dot = _make_row_dot("q4", ROW_LANES)
_q8_row_dot = _make_row_dot("q8", ROW_LANES)
_q4_row_dequantize = _make_row_dequantize("q4")
_q8_row_dequantize = _make_row_dequantize("q8")


# --- matrix × vector ----------------------------------------------------------------------------------

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
def _check_layout(data, d, m, x, block_bytes, out):
    if data.strides[1] != 1 or d.strides[1] != 4 or m.strides[1] != 4 or x.strides[-1] != 4:
        raise ValueError("kernel arrays need contiguous rows (data uint8, d and m float32, x float32)")
    if x.ndim == 2 and x.strides[0] % 4 != 0:
        raise ValueError("kernel activations need float32-aligned rows")
    if (data.shape[1] < d.shape[1] * block_bytes or x.shape[-1] != d.shape[1] * 32
            or d.shape[0] != data.shape[0] or m.shape[0] != data.shape[0] or m.shape[1] != d.shape[1]):
        raise ValueError("kernel arrays disagree in shape (data rows, scale blocks, x length)")
    if out.shape[-1] != data.shape[0] or (x.ndim == 2 and out.shape[0] != x.shape[0]):
        raise ValueError("kernel output has the wrong shape")


@njit(nogil=True, cache=True, fastmath=True)
def _min_term(m, r, xsum):
    s = np.float32(0.0)
    for b in range(xsum.shape[0]):
        s += m[r, b] * xsum[b]
    return s


@njit(parallel=True, nogil=True, cache=True)
def q4_matvec(data, d, m, qs_offset, block_bytes, x, out):
    """out[r] = Σ_b d[r,b]·(q_rb · x_b) + Σ_b m[r,b]·Σx_b for 4-bit blocks (see the module docstring)."""
    _check_layout(data, d, m, x, block_bytes, out)
    xsum = block_sums(x)
    row_addr, row_stride = data.ctypes.data, data.strides[0]
    d_addr, d_stride = d.ctypes.data, d.strides[0]
    for r in prange(data.shape[0]):
        out[r] = _q4_row_dot(row_addr + r * row_stride, d_addr + r * d_stride, x.ctypes.data,
                             d.shape[1], qs_offset, block_bytes) + _min_term(m, r, xsum)


@njit(parallel=True, nogil=True, cache=True)
def q8_matvec(data, d, x, out):
    """out[r] = Σ_b d[r,b]·(q_rb · x_b) for Q8_0 blocks (2-byte half scale, 32 signed bytes)."""
    _check_layout(data, d, d, x, Q8_BLOCK_BYTES, out)
    row_addr, row_stride = data.ctypes.data, data.strides[0]
    d_addr, d_stride = d.ctypes.data, d.strides[0]
    for r in prange(data.shape[0]):
        out[r] = _q8_row_dot(row_addr + r * row_stride, d_addr + r * d_stride, x.ctypes.data,
                             d.shape[1], Q8_QS_OFFSET, Q8_BLOCK_BYTES)


# --- matrix × batch -----------------------------------------------------------------------------------

def make_tile_times_batch(lanes, tile_rows, tile_tokens):
    """Compiled (tile, n_valid, X, out, r0): out[t, r0 + i] = tile[i] · X[t] for i < n_valid (tile rows past
    n_valid are zero padding), tile_rows × tile_tokens dot products at a time in accumulators of `lanes` floats.
    The three are closure constants: numba types them as the literals _tile_dot needs, and its cache keys each
    shape apart."""

    @njit(nogil=True, cache=True)
    def tile_times_batch(tile, n_valid, X, out, r0):
        n_cols, n_tokens = tile.shape[1], X.shape[0]
        w_addr, w_stride = tile.ctypes.data, tile.strides[0]
        x_addr, x_stride = X.ctypes.data, X.strides[0]
        for c0 in range(0, n_tokens, TOKEN_CHUNK):
            c1 = min(c0 + TOKEN_CHUNK, n_tokens)
            full = c1 - (c1 - c0) % tile_tokens
            for i0 in range(0, n_valid, tile_rows):
                w = w_addr + i0 * w_stride
                n_here = min(tile_rows, n_valid - i0)
                for t0 in range(c0, full, tile_tokens):
                    s = _tile_dot(lanes, tile_rows, tile_tokens, w, w_stride, x_addr + t0 * x_stride, x_stride,
                                  n_cols)
                    for i in range(n_here):
                        for t in range(tile_tokens):
                            out[t0 + t, r0 + i0 + i] = s[i * tile_tokens + t]
                for t in range(full, c1):
                    s1 = _tile_dot(lanes, tile_rows, 1, w, w_stride, x_addr + t * x_stride, x_stride, n_cols)
                    for i in range(n_here):
                        out[t, r0 + i0 + i] = s1[i]

    return tile_times_batch


def wide_registers() -> bool:
    """Whether the target numba compiles for has 32 vector registers of 16 floats (AVX-512)."""
    return target.has("avx512f")


WIDE_TILES = wide_registers()
_narrow_tile_times_batch = make_tile_times_batch(LANES, TILE_ROWS, TILE_TOKENS)
_wide_tile_times_batch = make_tile_times_batch(WIDE_LANES, WIDE_TILE_ROWS, TILE_TOKENS)


@njit(nogil=True, cache=True)
def tile_times_batch(tile, n_valid, X, out, r0):
    """out[t, r0 + i] = tile[i] · X[t] for i < n_valid: every matmul's inner loop. On AVX-512 targets
    (WIDE_TILES) 16-lane vectors in a 6 × 4 tile, each FMA doing twice an 8-lane one's work (a 128-token
    prompt at -t 1: SmolLM2 Q4_1 304 -> 341 tokens/s, the 1B-shaped Q4_0 39.9 -> 41.2, whose long rows leave
    the tile waiting on L2 instead); elsewhere 8 lanes in a 3 × 4 tile, which fits 16 registers (the wide one
    would spill there). Rows must be a whole number of 16 values for the wide tile."""
    if WIDE_TILES and tile.shape[1] % WIDE_LANES == 0:
        _wide_tile_times_batch(tile, n_valid, X, out, r0)
    else:
        _narrow_tile_times_batch(tile, n_valid, X, out, r0)


@njit(parallel=True, nogil=True, cache=True)
def q4_matmul(data, d, m, qs_offset, block_bytes, X, out):
    """out[t, r] = row r · X[t] for a batch X float32[b, n_cols], out float32[b, n_rows] (4-bit blocks)."""
    _check_layout(data, d, m, X, block_bytes, out)
    n_rows, nb = data.shape[0], d.shape[1]
    row_addr, row_stride = data.ctypes.data, data.strides[0]
    d_addr, d_stride = d.ctypes.data, d.strides[0]
    m_addr, m_stride = m.ctypes.data, m.strides[0]
    if X.shape[0] < MIN_TILED_BATCH:
        xsums = np.empty((X.shape[0], nb), dtype=np.float32)
        for t in range(X.shape[0]):
            xsums[t] = block_sums(X[t])
        for r in prange(n_rows):
            for t in range(X.shape[0]):
                out[t, r] = _q4_row_dot(row_addr + r * row_stride, d_addr + r * d_stride, X[t].ctypes.data,
                                        nb, qs_offset, block_bytes) + _min_term(m, r, xsums[t])
        return
    for g in prange((n_rows + ROW_TILE - 1) // ROW_TILE):
        r0 = g * ROW_TILE
        n_valid = min(ROW_TILE, n_rows - r0)
        tile = np.zeros((ROW_TILE, nb * 32), dtype=np.float32)
        for i in range(n_valid):
            r = r0 + i
            _q4_row_dequantize(row_addr + r * row_stride, d_addr + r * d_stride, m_addr + r * m_stride,
                               tile.ctypes.data + i * tile.strides[0], nb, qs_offset, block_bytes)
        tile_times_batch(tile, n_valid, X, out, r0)


@njit(parallel=True, nogil=True, cache=True)
def q8_matmul(data, d, X, out):
    """out[t, r] = row r · X[t] for a batch X float32[b, n_cols], out float32[b, n_rows] (Q8_0 blocks)."""
    _check_layout(data, d, d, X, Q8_BLOCK_BYTES, out)
    n_rows, nb = data.shape[0], d.shape[1]
    row_addr, row_stride = data.ctypes.data, data.strides[0]
    d_addr, d_stride = d.ctypes.data, d.strides[0]
    if X.shape[0] < MIN_TILED_BATCH:
        for r in prange(n_rows):
            for t in range(X.shape[0]):
                out[t, r] = _q8_row_dot(row_addr + r * row_stride, d_addr + r * d_stride, X[t].ctypes.data,
                                        nb, Q8_QS_OFFSET, Q8_BLOCK_BYTES)
        return
    for g in prange((n_rows + ROW_TILE - 1) // ROW_TILE):
        r0 = g * ROW_TILE
        n_valid = min(ROW_TILE, n_rows - r0)
        tile = np.zeros((ROW_TILE, nb * 32), dtype=np.float32)
        for i in range(n_valid):
            r = r0 + i
            _q8_row_dequantize(row_addr + r * row_stride, d_addr + r * d_stride, 0,
                               tile.ctypes.data + i * tile.strides[0], nb, Q8_QS_OFFSET, Q8_BLOCK_BYTES)
        tile_times_batch(tile, n_valid, X, out, r0)


# --- plain loops: the same sums without intrinsics ------------------------------------------------------

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
            base = b * Q8_BLOCK_BYTES + Q8_QS_OFFSET
            s = np.float32(0.0)
            for j in range(32):
                s += np.float32(np.int8(data[r, base + j])) * x[b * 32 + j]
            acc += d[r, b] * s
        out[r] = acc


@njit(nogil=True, cache=True)
def q4_matmul_loop(data, d, m, qs_offset, block_bytes, X, out):
    for t in range(X.shape[0]):
        q4_matvec_loop(data, d, m, qs_offset, block_bytes, X[t], out[t])


@njit(nogil=True, cache=True)
def q8_matmul_loop(data, d, X, out):
    for t in range(X.shape[0]):
        q8_matvec_loop(data, d, X[t], out[t])
