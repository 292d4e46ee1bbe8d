"""Float32 matrices: F32 and F16 weights (widened once at load) and run-time LoRA factors."""

import numpy as np
from numba import njit, prange

from . import q4_0, q4_1, q8_0
from .f16 import float_to_half_bits, widen_halves


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


# Kinds of rows merge_low_rank_rows reads and writes (one compiled kernel serves them all: it branches per row piece)
SOURCE_F16, SOURCE_F32 = 0, 1
TARGET_Q4_0, TARGET_Q4_1, TARGET_Q8_0, TARGET_F16, TARGET_F32 = 0, 1, 2, 3, 4


@njit(parallel=True, nogil=True, cache=True, fastmath=True)
def merge_low_rank_rows(src, src_kind, a, scaled_b, target_kind, out, tile_rows, piece):
    """out = rows of (W + scaled_b @ a) in the target type, W read from src (raw F16 or F32 rows, uint8), in one pass.

    Tiles of `tile_rows` rows go to the threads; a tile is walked `piece` columns at a time (a whole number of
    32-value blocks) so the piece of `a` it needs stays in L1 across the tile's rows, and each piece of a row is
    widened, gets its low-rank delta (summed apart from W, then added once) and is quantized while it is in cache.
    The quantizers are the type modules' own, so the bytes are those of quantize() on the same float32 values.
    """
    n_rows, n_cols, r = scaled_b.shape[0], a.shape[1], a.shape[0]
    n_tiles = (n_rows + tile_rows - 1) // tile_rows
    for t in prange(n_tiles):
        w = np.empty(piece, dtype=np.float32)
        delta = np.empty(piece, dtype=np.float32)
        for c0 in range(0, n_cols, piece):
            c1 = min(c0 + piece, n_cols)
            n = c1 - c0
            for i in range(t * tile_rows, min((t + 1) * tile_rows, n_rows)):
                if src_kind == SOURCE_F16:
                    widen_halves(src.ctypes.data + i * src.strides[0] + 2 * c0, w.ctypes.data, n)
                else:
                    w[:n] = src[i].view(np.float32)[c0:c1]
                delta[:n] = 0
                k = 0
                while k + 4 <= r:  # four rank terms per sweep: fewer loads and stores of delta per multiply-add
                    b0, b1, b2, b3 = scaled_b[i, k], scaled_b[i, k + 1], scaled_b[i, k + 2], scaled_b[i, k + 3]
                    a0, a1, a2, a3 = a[k, c0:c1], a[k + 1, c0:c1], a[k + 2, c0:c1], a[k + 3, c0:c1]
                    for j in range(n):
                        delta[j] += b0 * a0[j] + b1 * a1[j] + b2 * a2[j] + b3 * a3[j]
                    k += 4
                while k < r:
                    bk = scaled_b[i, k]
                    ak = a[k, c0:c1]
                    for j in range(n):
                        delta[j] += bk * ak[j]
                    k += 1
                for j in range(n):
                    w[j] += delta[j]
                x = w[:n]
                if target_kind == TARGET_Q4_0:
                    q4_0.quantize_row(x, out[i, c0 // 32 * q4_0.TYPE_SIZE:c1 // 32 * q4_0.TYPE_SIZE])
                elif target_kind == TARGET_Q4_1:
                    q4_1.quantize_row(x, out[i, c0 // 32 * q4_1.TYPE_SIZE:c1 // 32 * q4_1.TYPE_SIZE])
                elif target_kind == TARGET_Q8_0:
                    q8_0.quantize_row(x, out[i, c0 // 32 * q8_0.TYPE_SIZE:c1 // 32 * q8_0.TYPE_SIZE])
                elif target_kind == TARGET_F16:  # (a view as the target of a store writes a copy inside prange)
                    out[i, 2 * c0:2 * c1] = float_to_half_bits(x).view(np.uint8)
                else:
                    out[i, 4 * c0:4 * c1] = x.view(np.uint8)
