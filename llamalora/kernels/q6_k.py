"""Q6_K: super-blocks of 256 weights in 210 bytes: 128 bytes ql of low nibbles, 64 bytes qh of 2-bit
high parts, 16 signed 8-bit sub-block scales, then the half-float d.

16 sub-blocks of 16; weight = d·sc[j]·(q − 32). Each half n of the block (128 weights) reads ql[64n..],
qh[32n..]: weight 32i + l of the half is nibble (i // 2) of ql[64n + 32·(i % 2) + l] with bits 2i..2i+1
of qh[32n + l] on top.
"""

import numpy as np
from gguf import GGMLQuantizationType as GGMLType
from numba import njit

from . import blockdot, kquants_ref
from .blockdot import bits, ivec, load_bytes, to_float
from .f16 import half_bits_to_float

BLOCK_SIZE = 256
TYPE_SIZE = 210
SUB = 16
QH_OFFSET = 128
SCALES_OFFSET = 192
D_OFFSET = 208


def _decode(block, k, biased):
    """Weights 8k..8k+7: half n = k // 16, quarter i = k // 4 % 4 of it, bytes 8·(k % 4).. of ql and qh."""
    builder, n, i, lane = block.builder, k // 16, k // 4 % 4, k % 4
    low = bits(builder, block.bytes(64 * n + 32 * (i % 2) + 8 * lane), 4 * (i // 2), 0x0F)
    high = builder.shl(bits(builder, block.bytes(QH_OFFSET + 32 * n + 8 * lane), 2 * i, 3), ivec(4))
    q = builder.or_(low, high)
    return to_float(builder, builder.sub(q, ivec(32)) if biased else q)


KIND = int(GGMLType.Q6_K)
blockdot.register(KIND, _decode, TYPE_SIZE, BLOCK_SIZE, SUB, False, dot_bias=32)


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
    """The raw rows and, per sub-block of 16, the float32 scale d·sc (also passed as the unused minima)."""
    blocks = data.reshape(data.shape[0], -1, TYPE_SIZE)
    d = half_bits_to_float(blocks[:, :, D_OFFSET:D_OFFSET + 2])[..., None]
    sc = np.ascontiguousarray(blocks[:, :, SCALES_OFFSET:SCALES_OFFSET + 16]).view(np.int8).astype(np.float32)
    scale = np.ascontiguousarray((d * sc).reshape(data.shape[0], -1))
    return data, scale, scale


def dequantize(data: np.ndarray, n_cols: int) -> np.ndarray:
    return blockdot.dequantize_prepared(_dequantize_rows, prepare(np.ascontiguousarray(data), n_cols), n_cols)


def quantize(x: np.ndarray) -> np.ndarray:
    """ggml's quantize_row_q6_K_ref (what llama-quantize writes without an importance matrix)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty((x.shape[0], x.shape[1] // BLOCK_SIZE * TYPE_SIZE), dtype=np.uint8)
    kquants_ref.quantize_q6_k_rows(x, out)
    return out


def matvec(prepared: tuple, x: np.ndarray, out: np.ndarray) -> None:
    _matvec(*prepared, x, out)


def matmul(prepared: tuple, x: np.ndarray, out: np.ndarray) -> None:
    _matmul(*prepared, x, out)
