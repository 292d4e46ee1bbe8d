"""Vector kernels shared by the block types whose weights are scale · q (+ minimum) per sub-block.

A type describes its block (bytes, weights, weights per scale) and how to unpack one block's integer
q into <8 x float> vectors in LLVM IR (`decode(block, k)`: the k-th 8 weights of a block); this module builds, from that, the three kernels a
type needs: W·x (matvec), X·Wᵀ (matmul) and the exact dequantization of rows. The types' scales and
minima are widened once to float32 per sub-block (`prepare` in each type's module), so the kernels
read the file's packed q bytes and one float per sub-block:

    weight = scale[s] · q + minimum[s]        (minimum is 0 for types without one)

matvec: out[r] = Σ_s scale[r,s]·(q_s · x_s) + Σ_s minimum[r,s]·Σx_s, one row per step, x stays in L1.
matmul: a tile of rows is dequantized to float32 once, then simd's register-blocked loop multiplies it
with every token of the batch; batches smaller than simd.MIN_TILED_BATCH run the matvec per token.
dequantize: scale·q then + minimum as two float32 operations (never fused), which is what the gguf
package and ggml's reference decoders compute, so the rows are bit-exact.
"""

import numpy as np
from llvmlite import ir
from numba import literally, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import simd

LANES = 8
N_ACCUMULATORS = 4  # independent sums across sub-blocks, so fused multiply-adds do not wait on each other

_f32 = ir.FloatType()
_i8 = ir.IntType(8)
_i16 = ir.IntType(16)
_i32 = ir.IntType(32)
_vf = ir.VectorType(_f32, LANES)
_vi8 = ir.VectorType(_i8, LANES)
_vi16 = ir.VectorType(_i16, LANES)
_vi32 = ir.VectorType(_i32, LANES)


# --- IR helpers for the types' decoders ------------------------------------------------------------------

def ivec(value) -> ir.Constant:
    """<8 x i32> constant: one value in every lane, or a list of 8 lane values."""
    return ir.Constant(_vi32, list(value) if isinstance(value, (list, tuple, range)) else [value] * LANES)


def byte_offset(off, n: int):
    return ir.Constant(off.type, n)


def load_bytes(builder, row, off, n: int = 0):
    """<8 x i32> of the 8 unsigned bytes at row + off + n."""
    ptr = builder.gep(row, [builder.add(off, byte_offset(off, n))])
    return builder.zext(builder.load(builder.bitcast(ptr, _vi8.as_pointer()), align=1), _vi32)


def load_u32_splat(builder, row, off, n: int):
    """<8 x i32> with the little-endian 32-bit word at row + off + n in every lane."""
    ptr = builder.gep(row, [builder.add(off, byte_offset(off, n))])
    word = builder.load(builder.bitcast(ptr, _i32.as_pointer()), align=1)
    undef = ir.Constant(_vi32, ir.Undefined)
    one = builder.insert_element(undef, word, ir.Constant(_i32, 0))
    return builder.shuffle_vector(one, undef, ir.Constant(_vi32, [0] * LANES))


class BlockBytes:
    """One block's bytes for a decoder: each 8-byte (or 32-bit) load is emitted once, when first asked
    for, so the IR (and x86's source-order scheduling) interleaves unpacking with the products instead of
    unpacking a whole super-block into more vectors than there are registers."""

    def __init__(self, builder, row, off):
        self.builder, self.row, self.off = builder, row, off
        self.loaded = {}

    def bytes(self, n: int):
        """<8 x i32> of the unsigned bytes n..n+7 of the block."""
        if ("b", n) not in self.loaded:
            self.loaded["b", n] = load_bytes(self.builder, self.row, self.off, n)
        return self.loaded["b", n]

    def word(self, n: int):
        """<8 x i32> with the 32-bit word at byte n of the block in every lane."""
        if ("w", n) not in self.loaded:
            self.loaded["w", n] = load_u32_splat(self.builder, self.row, self.off, n)
        return self.loaded["w", n]


def bits(builder, v, shift: int, mask: int):
    """(v >> shift) & mask, lane by lane."""
    if shift:
        v = builder.lshr(v, ivec(shift))
    return builder.and_(v, ivec(mask))


def to_float(builder, v):
    return builder.sitofp(v, _vf)


def _splat(builder, value):
    undef = ir.Constant(_vf, ir.Undefined)
    one = builder.insert_element(undef, value, ir.Constant(_i32, 0))
    return builder.shuffle_vector(one, undef, ir.Constant(_vi32, [0] * LANES))


def _fmuladd(builder, a, b, c):
    fnty = ir.FunctionType(a.type, [a.type, a.type, a.type])
    fn = cgutils.get_or_insert_function(builder.module, fnty, f"llvm.fmuladd.v{a.type.count}f32")
    return builder.call(fn, [a, b, c])


def _reduce(builder, v):
    n = v.type.count
    while n > 1:
        n //= 2
        lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_i32, n), list(range(n))))
        hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_i32, n), list(range(n, 2 * n))))
        v = builder.fadd(lo, hi)
    return builder.extract_element(v, ir.Constant(_i32, 0))


def _load_float(builder, base, index):
    ptr = builder.gep(builder.bitcast(base, _f32.as_pointer()), [index])
    return builder.load(ptr, align=4)


# --- kernels built from a type's decoder ------------------------------------------------------------------

# ggml type id -> (decode, block_bytes, block_weights, sub, has_minimum, dot_bias), filled in by the types'
# modules. decode(block, k, biased) gives q of weights 8k..8k+7; with biased False it leaves out a constant
# dot_bias that every q carries (Q6_K's −32, Q3_K's −4, Q5_0's −16): the dot products subtract
# dot_bias·scale·Σx once per sub-block instead of once per weight (one vector operation fewer per 8 weights),
# while dequantization keeps ggml's exact scale·(q − bias).
# The kernels below take the type id as a compile-time constant (numba's literally), so each type gets its
# own machine code from one source, and the per-type wrappers that pass the constant cache like any function.
LAYOUTS = {}


def register(kind: int, decode, block_bytes: int, block_weights: int, sub: int, has_minimum: bool,
             dot_bias: int = 0) -> None:
    LAYOUTS[kind] = (decode, block_bytes, block_weights, sub, has_minimum, dot_bias)


def _literal_layout(kind):
    if not isinstance(kind, types.IntegerLiteral) or kind.literal_value not in LAYOUTS:
        return None
    return LAYOUTS[kind.literal_value]


@intrinsic
def layout(typingctx, kind):
    """(block_bytes, block_weights, sub, has_minimum, dot_bias) of a type, as constants."""
    found = _literal_layout(kind)
    if found is None:
        return None
    values = found[1:4] + (int(found[4]), found[5])
    sig = types.UniTuple(types.intp, 5)(kind)

    def codegen(context, builder, signature, args):
        return context.make_tuple(builder, signature.return_type,
                                  [context.get_constant(types.intp, v) for v in values])

    return sig, codegen


@intrinsic
def row_dot(typingctx, kind, row_addr, scale_addr, x_addr, nb):
    """Σ_s scale[s]·(q_s · x_s) over one row's nb blocks, q without the type's dot_bias and minima not
    included. Addresses are in bytes."""
    found = _literal_layout(kind)
    if found is None:
        return None
    decode, block_bytes, block_weights, sub = found[:4]
    n_vectors, per_sub, subs = block_weights // LANES, sub // LANES, block_weights // sub
    sig = types.float32(kind, types.intp, types.intp, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        _, row_addr, scale_addr, x_addr, nb = args
        i8p = _i8.as_pointer()
        row, scales = builder.inttoptr(row_addr, i8p), builder.inttoptr(scale_addr, i8p)
        xs = builder.inttoptr(x_addr, _vf.as_pointer())
        zero = ir.Constant(_vf, [0.0] * LANES)
        accs = [cgutils.alloca_once_value(builder, zero) for _ in range(N_ACCUMULATORS)]
        with cgutils.for_range(builder, nb) as loop:
            b = loop.index
            block = BlockBytes(builder, row, builder.mul(b, byte_offset(b, block_bytes)))
            x0 = builder.mul(b, byte_offset(b, n_vectors))
            for s in range(subs):
                t = None
                for k in range(s * per_sub, (s + 1) * per_sub):
                    xv = builder.load(builder.gep(xs, [builder.add(x0, byte_offset(b, k))]), align=4)
                    q = decode(block, k, False)
                    t = builder.fmul(q, xv) if t is None else _fmuladd(builder, q, xv, t)
                scale = _load_float(builder, scales, builder.add(builder.mul(b, byte_offset(b, subs)),
                                                                 byte_offset(b, s)))
                acc = accs[s % N_ACCUMULATORS]
                builder.store(_fmuladd(builder, _splat(builder, scale), t, builder.load(acc)), acc)
        total = builder.load(accs[0])
        for acc in accs[1:]:
            total = builder.fadd(total, builder.load(acc))
        return _reduce(builder, total)

    return sig, codegen


@intrinsic
def row_dequantize(typingctx, kind, row_addr, scale_addr, minimum_addr, out_addr, nb):
    """out = scale·q (+ minimum) for the row's nb blocks, each product and sum rounded to float32
    separately (as ggml does)."""
    found = _literal_layout(kind)
    if found is None:
        return None
    decode, block_bytes, block_weights, sub, has_minimum = found[:5]
    n_vectors, per_sub, subs = block_weights // LANES, sub // LANES, block_weights // sub
    sig = types.none(kind, types.intp, types.intp, types.intp, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        _, row_addr, scale_addr, minimum_addr, out_addr, nb = args
        i8p = _i8.as_pointer()
        row, scales, minima = (builder.inttoptr(a, i8p) for a in (row_addr, scale_addr, minimum_addr))
        outs = builder.inttoptr(out_addr, _vf.as_pointer())
        with cgutils.for_range(builder, nb) as loop:
            b = loop.index
            block = BlockBytes(builder, row, builder.mul(b, byte_offset(b, block_bytes)))
            for s in range(subs):
                index = builder.add(builder.mul(b, byte_offset(b, subs)), byte_offset(b, s))
                scale = _splat(builder, _load_float(builder, scales, index))
                if has_minimum:
                    minimum = _splat(builder, _load_float(builder, minima, index))
                for k in range(s * per_sub, (s + 1) * per_sub):
                    w = builder.fmul(scale, decode(block, k, True))
                    if has_minimum:
                        w = builder.fadd(w, minimum)
                    ptr = builder.gep(outs, [builder.add(builder.mul(b, byte_offset(b, n_vectors)), byte_offset(b, k))])
                    builder.store(w, ptr, align=4)
        return context.get_dummy_value()

    return sig, codegen


@njit(nogil=True, cache=True)
def sub_sums(x, sub):
    """float32 sums of x over each run of `sub` values (what the per-sub-block minima multiply)."""
    n = x.shape[0] // sub
    sums = np.empty(n, dtype=np.float32)
    for s in range(n):
        t = np.float32(0.0)
        for j in range(sub):
            t += x[s * sub + j]
        sums[s] = t
    return sums


@njit(nogil=True, cache=True, fastmath=True)
def minimum_term(minimum, r, xsum):
    t = np.float32(0.0)
    for s in range(xsum.shape[0]):
        t += minimum[r, s] * xsum[s]
    return t


@njit(nogil=True, cache=True)
def offset_terms(scale, minimum, r, xsum, has_minimum, dot_bias):
    """What row_dot leaves out of row r · x: Σ_s minimum[r,s]·Σx_s and −dot_bias·Σ_s scale[r,s]·Σx_s."""
    t = np.float32(0.0)
    if has_minimum:
        t += minimum_term(minimum, r, xsum)
    if dot_bias:
        t -= np.float32(dot_bias) * minimum_term(scale, r, xsum)
    return t


@njit(nogil=True, cache=True)
def check_layout(data, scale, minimum, x, out, block_bytes, block_weights, sub):
    if data.strides[1] != 1 or scale.strides[1] != 4 or minimum.strides[1] != 4 or x.strides[-1] != 4:
        raise ValueError("kernel arrays need contiguous rows (data uint8, scales float32, x float32)")
    if x.ndim == 2 and x.strides[0] % 4 != 0:
        raise ValueError("kernel activations need float32-aligned rows")
    nb = x.shape[-1] // block_weights
    if (x.shape[-1] % block_weights != 0 or data.shape[1] < nb * block_bytes or scale.shape[0] != data.shape[0]
            or scale.shape[1] != nb * (block_weights // sub) or minimum.shape[0] != data.shape[0]
            or minimum.shape[1] != scale.shape[1]):
        raise ValueError("kernel arrays disagree in shape (data rows, scales, x length)")
    if out.shape[-1] != data.shape[0] or (x.ndim == 2 and out.shape[0] != x.shape[0]):
        raise ValueError("kernel output has the wrong shape")


# The three kernels of a type, for data uint8[n_rows, row_nbytes] (the file's rows, any row stride) and
# scale, minimum float32[n_rows, n_sub_blocks] (types without minima pass scale again as minimum).
# `kind` is the type's ggml id and must be a constant where they are called (see the types' modules).

@njit(parallel=True, nogil=True, cache=True)
def matvec(kind, data, scale, minimum, x, out):
    """out[r] = row r · x."""
    literally(kind)
    block_bytes, block_weights, sub, has_minimum, dot_bias = layout(kind)
    check_layout(data, scale, minimum, x, out, block_bytes, block_weights, sub)
    nb = x.shape[0] // block_weights
    xsum = sub_sums(x, sub) if has_minimum or dot_bias else np.empty(0, dtype=np.float32)
    row_addr, row_stride = data.ctypes.data, data.strides[0]
    scale_addr, scale_stride = scale.ctypes.data, scale.strides[0]
    for r in prange(data.shape[0]):
        v = row_dot(kind, row_addr + r * row_stride, scale_addr + r * scale_stride, x.ctypes.data, nb)
        out[r] = v + offset_terms(scale, minimum, r, xsum, has_minimum, dot_bias)


@njit(parallel=True, nogil=True, cache=True)
def dequantize_rows(kind, data, scale, minimum, out):
    """out[r] = row r's weights as float32, exactly as ggml's reference decoder gives them."""
    literally(kind)
    block_bytes, block_weights, sub, has_minimum, dot_bias = layout(kind)
    nb = out.shape[1] // block_weights
    for r in prange(data.shape[0]):
        row_dequantize(kind, data.ctypes.data + r * data.strides[0], scale.ctypes.data + r * scale.strides[0],
                       minimum.ctypes.data + r * minimum.strides[0], out.ctypes.data + r * out.strides[0], nb)


@njit(parallel=True, nogil=True, cache=True)
def matmul(kind, data, scale, minimum, X, out):
    """out[t, r] = row r · X[t] for a batch X float32[b, n_cols], out float32[b, n_rows]."""
    literally(kind)
    block_bytes, block_weights, sub, has_minimum, dot_bias = layout(kind)
    check_layout(data, scale, minimum, X, out, block_bytes, block_weights, sub)
    n_rows, n_tokens, n_cols = data.shape[0], X.shape[0], X.shape[1]
    nb = n_cols // block_weights
    row_addr, row_stride = data.ctypes.data, data.strides[0]
    scale_addr, scale_stride = scale.ctypes.data, scale.strides[0]
    minimum_addr, minimum_stride = minimum.ctypes.data, minimum.strides[0]
    if n_tokens < simd.MIN_TILED_BATCH:
        xsums = np.zeros((n_tokens, n_cols // sub if has_minimum or dot_bias else 0), dtype=np.float32)
        if has_minimum or dot_bias:
            for t in range(n_tokens):
                xsums[t] = sub_sums(X[t], sub)
        for r in prange(n_rows):
            for t in range(n_tokens):
                v = row_dot(kind, row_addr + r * row_stride, scale_addr + r * scale_stride, X[t].ctypes.data, nb)
                out[t, r] = v + offset_terms(scale, minimum, r, xsums[t], has_minimum, dot_bias)
        return
    row_tile = simd.ROW_TILE
    for g in prange((n_rows + row_tile - 1) // row_tile):
        r0 = g * row_tile
        n_valid = min(row_tile, n_rows - r0)
        tile = np.zeros((row_tile, n_cols), dtype=np.float32)
        for i in range(n_valid):
            r = r0 + i
            row_dequantize(kind, row_addr + r * row_stride, scale_addr + r * scale_stride,
                           minimum_addr + r * minimum_stride, tile.ctypes.data + i * tile.strides[0], nb)
        simd.tile_times_batch(tile, n_valid, X, out, r0)


def dequantize_prepared(dequantize_rows_of_type, prepared: tuple, n_cols: int) -> np.ndarray:
    data, scale, minimum = prepared
    out = np.empty((data.shape[0], n_cols), dtype=np.float32)
    dequantize_rows_of_type(data, scale, minimum, out)
    return out
