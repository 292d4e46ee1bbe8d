"""Q5_1: blocks of 32 weights in 24 bytes: half-float scale d and minimum m, a 32-bit word qh of high
bits, then 16 bytes of low nibbles (laid out as Q5_0); weight = d · q + m.
"""

import numpy as np
from gguf import GGMLQuantizationType as GGMLType
from numba import njit, prange

from . import blockdot
from .f16 import float_to_half_bits, half_bits_to_float
from .q5_0 import decode_5bit

BLOCK_SIZE = 32
TYPE_SIZE = 24
QH_OFFSET = 4
QS_OFFSET = 8


def _decode(block, k, biased):
    return decode_5bit(block, k, QH_OFFSET, QS_OFFSET, 0)


KIND = int(GGMLType.Q5_1)
blockdot.register(KIND, _decode, TYPE_SIZE, BLOCK_SIZE, BLOCK_SIZE, True)


@njit(nogil=True, cache=True)
def _matvec(data, scale, minimum, x, out):
    blockdot.matvec(KIND, data, scale, minimum, x, out)


@njit(nogil=True, cache=True)
def _matmul(data, scale, minimum, x, out):
    blockdot.matmul(KIND, data, scale, minimum, x, out)


@njit(nogil=True, cache=True)
def _dequantize_rows(data, scale, minimum, out):
    blockdot.dequantize_rows(KIND, data, scale, minimum, out)


def prepare(data: np.ndarray, n_cols: int) -> tuple:
    """The raw rows and the block scales and minima widened to float32."""
    blocks = data.reshape(data.shape[0], -1, TYPE_SIZE)
    return (data, np.ascontiguousarray(half_bits_to_float(blocks[:, :, 0:2])),
            np.ascontiguousarray(half_bits_to_float(blocks[:, :, 2:4])))


def dequantize(data: np.ndarray, n_cols: int) -> np.ndarray:
    return blockdot.dequantize_prepared(_dequantize_rows, prepare(np.ascontiguousarray(data), n_cols), n_cols)


def quantize(x: np.ndarray) -> np.ndarray:
    """ggml's quantize_row_q5_1_ref, operation for operation (bit-exact with the reference)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty((x.shape[0], x.shape[1] // BLOCK_SIZE * TYPE_SIZE), dtype=np.uint8)
    quantize_rows(x, out)
    return out


@njit(parallel=True, nogil=True, cache=True)
def quantize_rows(x, out):
    nb = x.shape[1] // 32
    for r in prange(x.shape[0]):
        d = np.empty(nb, dtype=np.float32)
        lo = np.empty(nb, dtype=np.float32)
        for b in range(nb):
            vmin = x[r, b * 32]
            vmax = x[r, b * 32]
            for j in range(1, 32):
                v = x[r, b * 32 + j]
                vmin = min(vmin, v)
                vmax = max(vmax, v)
            d[b] = (vmax - vmin) / np.float32(31.0)
            lo[b] = vmin
        half_d = float_to_half_bits(d)
        half_m = float_to_half_bits(lo)
        for b in range(nb):
            inv_d = np.float32(1.0) / d[b] if d[b] != 0 else np.float32(0.0)
            base = b * TYPE_SIZE
            out[r, base] = half_d[b] & 0xFF
            out[r, base + 1] = half_d[b] >> 8
            out[r, base + 2] = half_m[b] & 0xFF
            out[r, base + 3] = half_m[b] >> 8
            qh = np.uint32(0)
            for j in range(16):
                q0 = min(np.int32((x[r, b * 32 + j] - lo[b]) * inv_d + np.float32(0.5)), 31)
                q1 = min(np.int32((x[r, b * 32 + 16 + j] - lo[b]) * inv_d + np.float32(0.5)), 31)
                out[r, base + QS_OFFSET + j] = (q0 & 0x0F) | ((q1 & 0x0F) << 4)
                qh |= np.uint32(((q0 >> 4) & 1) << j) | np.uint32(((q1 >> 4) & 1) << (j + 16))
            for i in range(4):
                out[r, base + QH_OFFSET + i] = (qh >> (8 * i)) & 0xFF


def matvec(prepared: tuple, x: np.ndarray, out: np.ndarray) -> None:
    _matvec(*prepared, x, out)


def matmul(prepared: tuple, x: np.ndarray, out: np.ndarray) -> None:
    _matmul(*prepared, x, out)
