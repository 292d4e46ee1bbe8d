"""Float32 matrices: F32 weights and the fused LoRA merge (W + B·A, requantized row by row)."""

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import q4_0, q4_1, q8_0
from .f16 import float_to_half_bits, widen_row


@njit(parallel=True, nogil=True, cache=True, fastmath=True)
def matvec(w, x, out):
    """out[r] = w[r] · x for w float32[n_rows, n_cols]."""
    for r in prange(w.shape[0]):
        acc = np.float32(0.0)
        for j in range(w.shape[1]):
            acc += w[r, j] * x[j]
        out[r] = acc


def matmul(w: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
    """out = x @ w.T for a batch x float32[b, n_cols]."""
    np.matmul(x, w.T, out=out)


@njit(parallel=True, nogil=True, cache=True, fastmath=True)
def add_low_rank(w, a, scaled_b):
    """w += scaled_b @ a in place, for w float32[n_rows, n_cols], a [r, n_cols], scaled_b [n_rows, r]:
    a LoRA merge without the n_rows × n_cols temporary a BLAS product would need."""
    for i in prange(w.shape[0]):
        for k in range(a.shape[0]):
            coef = scaled_b[i, k]
            for j in range(w.shape[1]):
                w[i, j] += coef * a[k, j]


@njit(parallel=True, nogil=True, cache=True)
def row_norms(w, out):
    """out[i] = ‖w[i, :]‖ (Euclidean, float32 like torch.linalg.norm of float32 rows; the sum of squares is
    formed in float64 so that a 8192-value row loses nothing to its order)."""
    for i in prange(w.shape[0]):
        acc = 0.0
        for j in range(w.shape[1]):
            v = np.float64(w[i, j])
            acc += v * v
        out[i] = np.float32(np.sqrt(acc))


# Kinds of rows merge_low_rank_rows reads and writes (one compiled kernel serves them all: it branches per row)
SOURCE_F16, SOURCE_F32 = 0, 1
TARGET_Q4_0, TARGET_Q4_1, TARGET_Q8_0, TARGET_F16, TARGET_F32 = 0, 1, 2, 3, 4
RANK_ROWS = 4  # rows of W the low-rank micro-kernel updates together


def pack_rank_columns(a: np.ndarray) -> np.ndarray:
    """a float32[r, n] as [n / 16, r, 16]: the r values of 16 columns side by side, so the micro-kernel reads
    one contiguous KiB per 16 columns (rows of a, n·4 bytes apart, would share a single set of L1 lines)."""
    r, n = a.shape
    return np.ascontiguousarray(a.reshape(r, n // 16, 16).transpose(1, 0, 2), dtype=np.float32)


@intrinsic
def add_rank_tile(typingctx, a_addr, b_addr, r, w_addr, n):
    """w[i, :] += Σ_k b[i, k]·a[k, :] for the RANK_ROWS rows of w (float32[RANK_ROWS, n] at w_addr) and of
    b (float32[RANK_ROWS, r] at b_addr); a packed as pack_rank_columns packs it; n a multiple of 16.

    4 rows × 16 columns of accumulators stay in registers across the whole rank (8 of AVX2's 16 vectors), so
    each vector of a is loaded once for four rows: the loop is bound by multiply-adds, not by loads. The sum
    over k is formed apart from w (llvm.fmuladd, in rank order) and added to w once."""
    sig = types.none(types.intp, types.intp, types.intp, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        a_addr, b_addr, r, w_addr, n = args
        f32, vf = ir.FloatType(), ir.VectorType(ir.FloatType(), 8)
        intp = a_addr.type
        zero = ir.Constant(vf, [0.0] * 8)
        fmuladd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vf, [vf, vf, vf]),
                                                 "llvm.fmuladd.v8f32")
        accs = [cgutils.alloca_once(builder, vf) for _ in range(RANK_ROWS * 2)]

        def at(base, offset, ptr_type):
            return builder.inttoptr(builder.add(base, offset), ptr_type.as_pointer())

        def const(value):
            return ir.Constant(intp, value)

        with cgutils.for_range_slice(builder, const(0), n, const(16), intp=intp) as (j, _):
            for acc in accs:
                builder.store(zero, acc)
            col = builder.mul(j, const(4))
            chunk = builder.mul(col, r)  # 16 columns × r ranks × 4 bytes per chunk
            with cgutils.for_range(builder, r, intp=intp) as k_loop:
                k = k_loop.index
                a_row = builder.add(chunk, builder.mul(k, const(64)))
                a_vecs = [builder.load(at(a_addr, builder.add(a_row, const(32 * h)), vf), align=4) for h in range(2)]
                for i in range(RANK_ROWS):
                    b_off = builder.mul(builder.add(builder.mul(const(i), r), k), const(4))
                    b_val = builder.load(at(b_addr, b_off, f32), align=4)
                    b_vec = builder.insert_element(ir.Constant(vf, ir.Undefined), b_val, ir.Constant(ir.IntType(32), 0))
                    b_vec = builder.shuffle_vector(b_vec, ir.Constant(vf, ir.Undefined),
                                                   ir.Constant(ir.VectorType(ir.IntType(32), 8), [0] * 8))
                    for h in range(2):
                        acc = accs[2 * i + h]
                        builder.store(builder.call(fmuladd, [b_vec, a_vecs[h], builder.load(acc)]), acc)
            for i in range(RANK_ROWS):
                for h in range(2):
                    w_off = builder.add(builder.mul(builder.mul(const(i), n), const(4)), builder.add(col, const(32 * h)))
                    ptr = at(w_addr, w_off, vf)
                    builder.store(builder.fadd(builder.load(ptr, align=4), builder.load(accs[2 * i + h])), ptr, align=4)
        return context.get_dummy_value()

    return sig, codegen


@njit(parallel=True, nogil=True, cache=True)
def merge_low_rank_rows(src, src_kind, a_packed, scaled_b, target_kind, out, tile_rows):
    """out = rows of (W + scaled_b @ a) in the target type, W read from src (raw F16 or F32 rows, uint8), in one pass.

    Tiles of `tile_rows` rows (a multiple of RANK_ROWS) go to the threads. RANK_ROWS rows at a time are widened
    into a float32 buffer that stays in cache, get their low-rank delta and are quantized, so every weight
    byte is read and written once. The quantizers are the type modules' own: the bytes are those of quantize()
    on the same float32 values. a_packed is pack_rank_columns(a); rows are a whole number of 32-value blocks.
    """
    n_rows, r = scaled_b.shape
    n_cols = a_packed.shape[0] * 16
    for t in prange((n_rows + tile_rows - 1) // tile_rows):
        w = np.empty((RANK_ROWS, n_cols), dtype=np.float32)
        b = np.zeros((RANK_ROWS, r), dtype=np.float32)  # rows past the end of W keep b = 0
        for i0 in range(t * tile_rows, min((t + 1) * tile_rows, n_rows), RANK_ROWS):
            rows = min(RANK_ROWS, n_rows - i0)
            for h in range(rows):
                i = i0 + h
                if src_kind == SOURCE_F16:
                    widen_row(src.ctypes.data + i * src.strides[0], w[h].ctypes.data, n_cols)
                else:
                    w[h] = src[i].view(np.float32)
                b[h] = scaled_b[i]
            for h in range(rows, RANK_ROWS):
                b[h] = 0
                w[h] = 0
            add_rank_tile(a_packed.ctypes.data, b.ctypes.data, r, w.ctypes.data, n_cols)
            for h in range(rows):
                i = i0 + h
                if target_kind == TARGET_Q4_0:
                    q4_0.quantize_row(w[h], out[i])
                elif target_kind == TARGET_Q4_1:
                    q4_1.quantize_row(w[h], out[i])
                elif target_kind == TARGET_Q8_0:
                    q8_0.quantize_row(w[h], out[i])
                elif target_kind == TARGET_F16:  # (a view as the target of a store writes a copy inside prange)
                    out[i] = float_to_half_bits(w[h]).view(np.uint8)
                else:
                    out[i] = w[h].view(np.uint8)
