"""Q5_K: super-blocks of 256 weights in 176 bytes: half-float d and dmin, 12 bytes of 6-bit sub-block
scales and minima (packed as in Q4_K), 32 bytes qh of high bits, then 128 bytes of low nibbles.

8 sub-blocks of 32; weight = d·sc[j]·q − dmin·m[j] with q = low nibble + 16·(bit j of qh[l]) for the
sub-block's l-th weight. Bytes 32i..32i+31 of the nibbles hold sub-block 2i low and 2i+1 high.
"""

import numpy as np
from gguf import GGMLQuantizationType as GGMLType
from numba import njit

from . import blockdot, kquants_ref
from .blockdot import bits, to_float
from .f16 import half_bits_to_float
from .q4_k import scale_min_codes

BLOCK_SIZE = 256
TYPE_SIZE = 176
SUB = 32
QH_OFFSET = 16
QS_OFFSET = 48


def _decode(block, k, biased):
    """Weights 8k..8k+7 (sub-block j = k // 4): nibble j % 2 of the q bytes plus bit j of qh as 16."""
    builder, j, lane = block.builder, k // 4, k % 4
    v = block.bytes(QS_OFFSET + 32 * (j // 2) + 8 * lane)
    high = builder.shl(bits(builder, block.bytes(QH_OFFSET + 8 * lane), j, 1), blockdot.ivec(4))
    return to_float(builder, builder.or_(bits(builder, v, 4 * (j % 2), 0x0F), high))


KIND = int(GGMLType.Q5_K)
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
    """The raw rows and, per sub-block of 32, the float32 scale d·sc and minimum −dmin·m."""
    blocks = data.reshape(data.shape[0], -1, TYPE_SIZE)
    d = half_bits_to_float(blocks[:, :, 0:2])[..., None]
    dmin = half_bits_to_float(blocks[:, :, 2:4])[..., None]
    sc, mn = scale_min_codes(blocks[:, :, 4:16])
    scale = (d * sc.astype(np.float32)).reshape(data.shape[0], -1)
    minimum = -(dmin * mn.astype(np.float32)).reshape(data.shape[0], -1)
    return data, np.ascontiguousarray(scale), np.ascontiguousarray(minimum)


def dequantize(data: np.ndarray, n_cols: int) -> np.ndarray:
    return blockdot.dequantize_prepared(_dequantize_rows, prepare(np.ascontiguousarray(data), n_cols), n_cols)


def quantize(x: np.ndarray) -> np.ndarray:
    """ggml's quantize_row_q5_K_ref (what llama-quantize writes without an importance matrix)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty((x.shape[0], x.shape[1] // BLOCK_SIZE * TYPE_SIZE), dtype=np.uint8)
    kquants_ref.quantize_q5_k_rows(x, out)
    return out


def matvec(prepared: tuple, x: np.ndarray, out: np.ndarray) -> None:
    _matvec(*prepared, x, out)


def matmul(prepared: tuple, x: np.ndarray, out: np.ndarray) -> None:
    _matmul(*prepared, x, out)
