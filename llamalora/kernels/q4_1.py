"""Q4_1: blocks of 32 weights in 20 bytes: half-float scale d and minimum m, then 16 bytes of 4-bit q.

Byte j of the 16 holds weight j in its low nibble and weight j + 16 in its high nibble;
weight = d * q + m.
"""

import numpy as np

from numba import njit, prange

from .f16 import block_halves, float_to_half_bits, half_bits_to_float
from . import intmatvec, simd

INT_DRIVER = intmatvec.Q4_1  # intmatvec's id of this type (a global: compiled code takes it as a literal)

BLOCK_SIZE = 32
TYPE_SIZE = 20
QS_OFFSET = 4


def dequantize(data: np.ndarray, n_cols: int) -> np.ndarray:
    blocks = data.reshape(-1, TYPE_SIZE)
    d = half_bits_to_float(blocks[:, 0:2])[:, None]
    m = half_bits_to_float(blocks[:, 2:4])[:, None]
    qs = blocks[:, QS_OFFSET:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)
    return (d * q + m).reshape(data.shape[0], n_cols)


def quantize(x: np.ndarray) -> np.ndarray:
    """ggml's quantize_row_q4_1_ref, operation for operation (bit-exact with the reference)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty((x.shape[0], x.shape[1] // BLOCK_SIZE * TYPE_SIZE), dtype=np.uint8)
    quantize_rows(x, out)
    return out


@njit(parallel=True, nogil=True, cache=True)
def quantize_rows(x, out):
    for r in prange(x.shape[0]):
        quantize_row(x[r], out[r])


# fastmath=False stated, not defaulted: numba hands a caller's fastmath to callees that leave it unset, and a
# fused multiply-add here would change the bytes
@njit(nogil=True, cache=True, fastmath=False)
def quantize_row(x, out):
    """One row (or any whole number of its blocks: the LoRA merge quantizes rows piece by piece)."""
    nb = x.shape[0] // 32
    d = np.empty(nb, dtype=np.float32)
    lo = np.empty(nb, dtype=np.float32)
    for b in range(nb):
        vmin = x[b * 32]
        vmax = x[b * 32]
        for j in range(1, 32):
            v = x[b * 32 + j]
            vmin = min(vmin, v)
            vmax = max(vmax, v)
        d[b] = (vmax - vmin) / np.float32(15.0)
        lo[b] = vmin
    half_d = float_to_half_bits(d)
    half_m = float_to_half_bits(lo)
    for b in range(nb):
        inv_d = np.float32(1.0) / d[b] if d[b] != 0 else np.float32(0.0)
        base = b * TYPE_SIZE
        out[base] = half_d[b] & 0xFF
        out[base + 1] = half_d[b] >> 8
        out[base + 2] = half_m[b] & 0xFF
        out[base + 3] = half_m[b] >> 8
        for j in range(16):
            q0 = min(np.int32((x[b * 32 + j] - lo[b]) * inv_d + np.float32(0.5)), 15)
            q1 = min(np.int32((x[b * 32 + 16 + j] - lo[b]) * inv_d + np.float32(0.5)), 15)
            out[base + QS_OFFSET + j] = q0 | (q1 << 4)


@njit(nogil=True, cache=True)
def scales(data):
    """Block scales d and minima m of raw rows, float32[n_rows, n_blocks] each."""
    return block_halves(data, TYPE_SIZE, 0), block_halves(data, TYPE_SIZE, 2)


def prepare(data: np.ndarray, n_cols: int) -> tuple:
    """The raw rows (still the file's bytes), with the block scales widened to float32 where the portable kernels
    read them every token. The integer kernels (intmatvec.py) read the halves inside the blocks, so there the
    widened arrays are not kept (they would add 4 to 8 bytes per 18- or 20-byte block to the memory use, and to the
    bytes each token streams); prompt batches and the rare declined activation widen them per call (`scales`)."""
    return (data,) if intmatvec.ENABLED else (data, *scales(data))


def matvec(prepared: tuple, x: np.ndarray, out: np.ndarray) -> None:
    data = prepared[0]
    # (the integer kernel declines extreme x)
    if not (intmatvec.ENABLED and intmatvec.matvec_without_delta(INT_DRIVER, data, x, out)):
        d, m = prepared[1:] if len(prepared) > 1 else scales(data)
        simd.q4_matvec(data, d, m, QS_OFFSET, TYPE_SIZE, x, out)


def matmul(prepared: tuple, x: np.ndarray, out: np.ndarray) -> None:
    data = prepared[0]
    d, m = prepared[1:] if len(prepared) > 1 else scales(data)
    simd.q4_matmul(data, d, m, QS_OFFSET, TYPE_SIZE, x, out)
