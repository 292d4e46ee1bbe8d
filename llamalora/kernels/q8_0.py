"""Q8_0: blocks of 32 weights in 34 bytes: half-float scale d, then 32 signed bytes q; weight = d * q."""

import numpy as np

from .f16 import float_to_half_bytes, half_bits_to_float
from .bytes8 import byte_matmul, byte_matvec

BLOCK_SIZE = 32
TYPE_SIZE = 34
QS_OFFSET = 2


def dequantize(data: np.ndarray, n_cols: int) -> np.ndarray:
    blocks = data.reshape(-1, TYPE_SIZE)
    d = half_bits_to_float(blocks[:, 0:2])[:, None]
    q = np.ascontiguousarray(blocks[:, QS_OFFSET:]).view(np.int8).astype(np.float32)
    return (d * q).reshape(data.shape[0], n_cols)


def round_away(v: np.ndarray) -> np.ndarray:
    """Round half away from zero, as C's roundf (numpy's round is to even)."""
    a = np.abs(v)
    floored = np.floor(a)
    return np.sign(v) * (floored + np.floor(2 * (a - floored)))


def quantize(x: np.ndarray) -> np.ndarray:
    """The reference quantizer's arithmetic (ggml's quantize_row_q8_0_ref), step for step."""
    x = np.asarray(x, dtype=np.float32)
    blocks = x.reshape(-1, BLOCK_SIZE)
    d = np.abs(blocks).max(axis=1, keepdims=True) / 127
    with np.errstate(divide="ignore"):
        inv_d = np.where(d == 0, 0, 1 / d)
    q = round_away(blocks * inv_d).astype(np.int8).view(np.uint8)
    return np.concatenate([float_to_half_bytes(d[:, 0]), q], axis=1).reshape(x.shape[0], -1)


def prepare(data: np.ndarray, n_cols: int) -> tuple:
    blocks = data.reshape(data.shape[0], -1, TYPE_SIZE)
    return data, half_bits_to_float(blocks[:, :, 0:2])


def matvec(prepared: tuple, x: np.ndarray, out: np.ndarray) -> None:
    data, d = prepared
    byte_matvec(data, d, QS_OFFSET, TYPE_SIZE, x, out)


def matmul(prepared: tuple, x: np.ndarray, out: np.ndarray) -> None:
    data, d = prepared
    byte_matmul(data, d, QS_OFFSET, TYPE_SIZE, x, out)
