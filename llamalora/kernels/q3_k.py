"""Q3_K: super-blocks of 256 weights in 110 bytes: 32 bytes hmask of high bits, 64 bytes of 2-bit low
parts, 12 bytes of 6-bit sub-block scales (packed), then the half-float d.

16 sub-blocks of 16; weight = d·(sc[j] − 32)·q with q = low − 4 + 4·hbit in −4..3. Weight 128n + 32j + l
(l < 32) has its low bits at bits 2j of byte 32n + l of the 2-bit parts and its high bit at bit 4n + j of
hmask[l].
"""

import numpy as np
from gguf import GGMLQuantizationType as GGMLType
from numba import njit

from . import blockdot, kquants_ref
from .blockdot import bits, ivec, to_float
from .f16 import half_bits_to_float

BLOCK_SIZE = 256
TYPE_SIZE = 110
SUB = 16
QS_OFFSET = 32
SCALES_OFFSET = 96
D_OFFSET = 108


def scale_codes(scales: np.ndarray) -> np.ndarray:
    """The 16 signed sub-block scales (int8 [..., 16], −32..31) of 12 packed bytes [..., 12]: bytes 0-7
    hold the low four bits of scales 0-7 (low nibbles) and 8-15 (high nibbles), bytes 8-11 the top two
    bits of scale 4i + j at bits 2i of byte 8 + j."""
    low, high = scales[..., 0:8], scales[..., 8:12]
    low4 = np.concatenate([low & 0x0F, low >> 4], axis=-1)
    high2 = np.concatenate([(high >> (2 * i)) & 3 for i in range(4)], axis=-1)
    return (low4 | (high2 << 4)).astype(np.int8) - np.int8(32)


def _decode(block, k, biased):
    """Weights 8k..8k+7 = 128n + 32j + 8·lane..: bits 2j of the 2-bit parts, bit 4n + j of hmask."""
    builder, n, j, lane = block.builder, k // 16, k // 4 % 4, k % 4
    low = bits(builder, block.bytes(QS_OFFSET + 32 * n + 8 * lane), 2 * j, 3)
    high = builder.shl(bits(builder, block.bytes(8 * lane), 4 * n + j, 1), ivec(2))
    q = builder.or_(low, high)
    return to_float(builder, builder.sub(q, ivec(4)) if biased else q)


KIND = int(GGMLType.Q3_K)
blockdot.register(KIND, _decode, TYPE_SIZE, BLOCK_SIZE, SUB, False, dot_bias=4)


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
    """The raw rows and, per sub-block of 16, the float32 scale d·(sc − 32) (also passed as the unused minima)."""
    blocks = data.reshape(data.shape[0], -1, TYPE_SIZE)
    d = half_bits_to_float(blocks[:, :, D_OFFSET:D_OFFSET + 2])[..., None]
    sc = scale_codes(blocks[:, :, SCALES_OFFSET:SCALES_OFFSET + 12]).astype(np.float32)
    scale = np.ascontiguousarray((d * sc).reshape(data.shape[0], -1))
    return data, scale, scale


def dequantize(data: np.ndarray, n_cols: int) -> np.ndarray:
    return blockdot.dequantize_prepared(_dequantize_rows, prepare(np.ascontiguousarray(data), n_cols), n_cols)


def quantize(x: np.ndarray) -> np.ndarray:
    """ggml's quantize_row_q3_K_ref (what llama-quantize writes without an importance matrix)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty((x.shape[0], x.shape[1] // BLOCK_SIZE * TYPE_SIZE), dtype=np.uint8)
    kquants_ref.quantize_q3_k_rows(x, out)
    return out


def matvec(prepared: tuple, x: np.ndarray, out: np.ndarray) -> None:
    _matvec(*prepared, x, out)


def matmul(prepared: tuple, x: np.ndarray, out: np.ndarray) -> None:
    _matmul(*prepared, x, out)
