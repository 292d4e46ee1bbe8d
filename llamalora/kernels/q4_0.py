"""Q4_0: blocks of 32 weights in 18 bytes: half-float scale d, then 16 bytes of 4-bit values q.

Byte j of the 16 holds weight j in its low nibble and weight j + 16 in its high nibble;
weight = d * (q - 8), which the kernels read as d * q + m with m = -8d (exact in float32).
"""

import numpy as np

from numba import njit, prange

from .f16 import float_to_half_bits, half_bits_to_float
from . import simd

BLOCK_SIZE = 32
TYPE_SIZE = 18
QS_OFFSET = 2


def dequantize(data: np.ndarray, n_cols: int) -> np.ndarray:
    blocks = data.reshape(-1, TYPE_SIZE)
    d = half_bits_to_float(blocks[:, 0:2])[:, None]
    qs = blocks[:, QS_OFFSET:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int8) - np.int8(8)
    return (d * q.astype(np.float32)).reshape(data.shape[0], n_cols)


def quantize(x: np.ndarray) -> np.ndarray:
    """ggml's quantize_row_q4_0_ref, operation for operation (bit-exact with the reference)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty((x.shape[0], x.shape[1] // BLOCK_SIZE * TYPE_SIZE), dtype=np.uint8)
    quantize_rows(x, out)
    return out


@njit(parallel=True, nogil=True, cache=True)
def quantize_rows(x, out):
    for r in prange(x.shape[0]):
        quantize_row(x[r], out[r])


@njit(nogil=True, cache=True)
def quantize_row(x, out):
    """One row (or any whole number of its blocks: the LoRA merge quantizes rows piece by piece)."""
    nb = x.shape[0] // 32
    d = np.empty(nb, dtype=np.float32)
    for b in range(nb):
        amax = np.float32(0.0)
        vmax = np.float32(0.0)
        for j in range(32):
            v = x[b * 32 + j]
            if abs(v) > amax:
                amax = abs(v)
                vmax = v
        d[b] = vmax / np.float32(-8.0)
    half = float_to_half_bits(d)
    for b in range(nb):
        inv_d = np.float32(1.0) / d[b] if d[b] != 0 else np.float32(0.0)
        base = b * TYPE_SIZE
        out[base] = half[b] & 0xFF
        out[base + 1] = half[b] >> 8
        for j in range(16):
            lo = min(np.int32(x[b * 32 + j] * inv_d + np.float32(8.5)), 15)
            hi = min(np.int32(x[b * 32 + 16 + j] * inv_d + np.float32(8.5)), 15)
            out[base + QS_OFFSET + j] = lo | (hi << 4)


def prepare(data: np.ndarray, n_cols: int) -> tuple:
    """The raw rows (still the file's bytes) and the block scales widened to float32."""
    blocks = data.reshape(data.shape[0], -1, TYPE_SIZE)
    d = half_bits_to_float(blocks[:, :, 0:2])
    return data, d, np.float32(-8.0) * d


def matvec(prepared: tuple, x: np.ndarray, out: np.ndarray) -> None:
    data, d, m = prepared
    simd.q4_matvec(data, d, m, QS_OFFSET, TYPE_SIZE, x, out)


def matmul(prepared: tuple, x: np.ndarray, out: np.ndarray) -> None:
    data, d, m = prepared
    simd.q4_matmul(data, d, m, QS_OFFSET, TYPE_SIZE, x, out)
