"""Q4_0: blocks of 32 weights in 18 bytes: half-float scale d, then 16 bytes of 4-bit values q.

Byte j of the 16 holds weight j in its low nibble and weight j + 16 in its high nibble;
weight = d * (q - 8), which the kernels read as d * q + m with m = -8d (exact in float32).
"""

import numpy as np

from .f16 import float_to_half_bytes, half_bits_to_float
from .nibbles import nibble_matmul, nibble_matvec

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
    """The reference quantizer's arithmetic (ggml's quantize_row_q4_0_ref), step for step."""
    x = np.asarray(x, dtype=np.float32)
    blocks = x.reshape(-1, BLOCK_SIZE)
    imax = np.abs(blocks).argmax(axis=-1, keepdims=True)
    d = np.take_along_axis(blocks, imax, axis=-1) / -8
    with np.errstate(divide="ignore"):
        inv_d = np.where(d == 0, 0, 1 / d)
    q = np.trunc(blocks * inv_d + np.float32(8.5), dtype=np.float32).astype(np.uint8).clip(0, 15)
    qs = q[:, :16] | (q[:, 16:] << np.uint8(4))
    return np.concatenate([float_to_half_bytes(d[:, 0]), qs], axis=1).reshape(x.shape[0], -1)


def prepare(data: np.ndarray, n_cols: int) -> tuple:
    """The raw rows (still the file's bytes) and the block scales widened to float32."""
    blocks = data.reshape(data.shape[0], -1, TYPE_SIZE)
    d = half_bits_to_float(blocks[:, :, 0:2])
    return data, d, np.float32(-8.0) * d


def matvec(prepared: tuple, x: np.ndarray, out: np.ndarray) -> None:
    data, d, m = prepared
    nibble_matvec(data, d, m, QS_OFFSET, TYPE_SIZE, x, out)


def matmul(prepared: tuple, x: np.ndarray, out: np.ndarray) -> None:
    data, d, m = prepared
    nibble_matmul(data, d, m, QS_OFFSET, TYPE_SIZE, x, out)
