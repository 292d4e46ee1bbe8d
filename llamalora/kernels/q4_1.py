"""Q4_1: blocks of 32 weights in 20 bytes: half-float scale d and minimum m, then 16 bytes of 4-bit q.

Byte j of the 16 holds weight j in its low nibble and weight j + 16 in its high nibble;
weight = d * q + m.
"""

import numpy as np

from .f16 import float_to_half_bytes, half_bits_to_float
from .nibbles import nibble_matmul, nibble_matvec

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
    """The reference quantizer's arithmetic (ggml's quantize_row_q4_1_ref), step for step."""
    x = np.asarray(x, dtype=np.float32)
    blocks = x.reshape(-1, BLOCK_SIZE)
    lo = blocks.min(axis=-1, keepdims=True)
    hi = blocks.max(axis=-1, keepdims=True)
    d = (hi - lo) / 15
    with np.errstate(divide="ignore"):
        inv_d = np.where(d == 0, 0, 1 / d)
    q = np.trunc((blocks - lo) * inv_d + np.float32(0.5), dtype=np.float32).astype(np.uint8).clip(0, 15)
    qs = q[:, :16] | (q[:, 16:] << np.uint8(4))
    parts = [float_to_half_bytes(d[:, 0]), float_to_half_bytes(lo[:, 0]), qs]
    return np.concatenate(parts, axis=1).reshape(x.shape[0], -1)


def prepare(data: np.ndarray, n_cols: int) -> tuple:
    """The raw rows (still the file's bytes) and the block scales and minima widened to float32."""
    blocks = data.reshape(data.shape[0], -1, TYPE_SIZE)
    return data, half_bits_to_float(blocks[:, :, 0:2]), half_bits_to_float(blocks[:, :, 2:4])


def matvec(prepared: tuple, x: np.ndarray, out: np.ndarray) -> None:
    data, d, m = prepared
    nibble_matvec(data, d, m, QS_OFFSET, TYPE_SIZE, x, out)


def matmul(prepared: tuple, x: np.ndarray, out: np.ndarray) -> None:
    data, d, m = prepared
    nibble_matmul(data, d, m, QS_OFFSET, TYPE_SIZE, x, out)
