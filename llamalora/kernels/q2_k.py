"""Q2_K: super-blocks of 256 weights in 84 bytes: 16 bytes of 4-bit sub-block scales (low nibble) and
minima (high nibble), 64 bytes of 2-bit q, then half-float d and dmin.

16 sub-blocks of 16; weight = d·sc[j]·q − dmin·m[j]. Weight 128n + 32j + l (l < 32) sits at bits 2j of
byte 32n + l of the q bytes.
"""

import numpy as np
from gguf import GGMLQuantizationType as GGMLType
from numba import njit

from . import blockdot, kquants_ref
from .blockdot import bits, to_float
from .f16 import half_bits_to_float

BLOCK_SIZE = 256
TYPE_SIZE = 84
SUB = 16
QS_OFFSET = 16
D_OFFSET = 80


def _decode(block, k, biased):
    """Weights 8k..8k+7 = 128n + 32j + 8·lane..: bits 2j of q bytes 32n + 8·lane.."""
    n, j, lane = k // 16, k // 4 % 4, k % 4
    return to_float(block.builder, bits(block.builder, block.bytes(QS_OFFSET + 32 * n + 8 * lane), 2 * j, 3))


KIND = int(GGMLType.Q2_K)
blockdot.register(KIND, _decode, TYPE_SIZE, BLOCK_SIZE, SUB, True)


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
    """The raw rows and, per sub-block of 16, the float32 scale d·sc and minimum −dmin·m."""
    blocks = data.reshape(data.shape[0], -1, TYPE_SIZE)
    d = half_bits_to_float(blocks[:, :, D_OFFSET:D_OFFSET + 2])[..., None]
    dmin = half_bits_to_float(blocks[:, :, D_OFFSET + 2:D_OFFSET + 4])[..., None]
    codes = blocks[:, :, 0:16]
    scale = (d * (codes & 0x0F).astype(np.float32)).reshape(data.shape[0], -1)
    minimum = -(dmin * (codes >> 4).astype(np.float32)).reshape(data.shape[0], -1)
    return data, np.ascontiguousarray(scale), np.ascontiguousarray(minimum)


def dequantize(data: np.ndarray, n_cols: int) -> np.ndarray:
    return blockdot.dequantize_prepared(_dequantize_rows, prepare(np.ascontiguousarray(data), n_cols), n_cols)


def quantize(x: np.ndarray) -> np.ndarray:
    """ggml's quantize_row_q2_K_ref (what llama-quantize writes without an importance matrix)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty((x.shape[0], x.shape[1] // BLOCK_SIZE * TYPE_SIZE), dtype=np.uint8)
    kquants_ref.quantize_q2_k_rows(x, out)
    return out


def matvec(prepared: tuple, x: np.ndarray, out: np.ndarray) -> None:
    _matvec(*prepared, x, out)


def matmul(prepared: tuple, x: np.ndarray, out: np.ndarray) -> None:
    _matmul(*prepared, x, out)
