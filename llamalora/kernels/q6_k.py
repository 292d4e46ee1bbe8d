"""Q6_K: super-blocks of 256 weights in 210 bytes: 128 bytes ql of low nibbles, 64 bytes qh of 2-bit
high parts, 16 signed 8-bit sub-block scales, then the half-float d.

16 sub-blocks of 16; weight = d·sc[j]·(q − 32). Each half n of the block (128 weights) reads ql[64n..],
qh[32n..]: weight 32i + l of the half is nibble (i // 2) of ql[64n + 32·(i % 2) + l] with bits 2i..2i+1
of qh[32n + l] on top.
"""

import numpy as np
from gguf import GGMLQuantizationType as GGMLType
from numba import njit, prange

from . import blockdot, intmatvec, kquants_ref

INT_DRIVER = intmatvec.Q6_K  # intmatvec's id of this type (a global: compiled code takes it as a literal)
from .blockdot import bits, ivec, to_float
from .f16 import half_to_float

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


@njit(parallel=True, nogil=True, cache=True)
def scales(data):
    """Per sub-block of 16 the float32 scale d·sc of raw rows, [n_rows, n_cols/16], passed twice (as the kernels'
    unused minima too): what the portable kernels read (exact products)."""
    n_sb = data.shape[1] // TYPE_SIZE
    scale = np.empty((data.shape[0], 16 * n_sb), dtype=np.float32)
    for r in prange(data.shape[0]):
        for b in range(n_sb):
            at = b * TYPE_SIZE
            d = half_to_float(np.uint16(data[r, at + D_OFFSET]) | (np.uint16(data[r, at + D_OFFSET + 1]) << 8))
            for j in range(16):
                sc = np.int64(data[r, at + SCALES_OFFSET + j])
                scale[r, 16 * b + j] = d * np.float32(sc - 256 if sc > 127 else sc)
    return scale, scale


def prepare(data: np.ndarray, n_cols: int) -> tuple:
    """The raw rows and, for the portable kernels, the sub-blocks' float32 scales (`scales`). The integer kernel
    reads them from the blocks, so there the rows alone are kept; prompt batches and the rare declined activation
    widen them per call."""
    return (data,) if intmatvec.ENABLED else (data, *scales(data))


def dequantize(data: np.ndarray, n_cols: int) -> np.ndarray:
    data = np.ascontiguousarray(data)
    return blockdot.dequantize_prepared(_dequantize_rows, (data, *scales(data)), n_cols)


def quantize(x: np.ndarray) -> np.ndarray:
    """ggml's quantize_row_q6_K_ref (what llama-quantize writes without an importance matrix)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty((x.shape[0], x.shape[1] // BLOCK_SIZE * TYPE_SIZE), dtype=np.uint8)
    kquants_ref.quantize_q6_k_rows(x, out)
    return out


def matvec(prepared: tuple, x: np.ndarray, out: np.ndarray) -> None:
    data = prepared[0]
    # (the integer kernel declines extreme x)
    if not (intmatvec.ENABLED and intmatvec.matvec_without_delta(INT_DRIVER, data, x, out)):
        _matvec(data, *(prepared[1:] if len(prepared) > 1 else scales(data)), x, out)


def matmul(prepared: tuple, x: np.ndarray, out: np.ndarray) -> None:
    data = prepared[0]
    _matmul(data, *(prepared[1:] if len(prepared) > 1 else scales(data)), x, out)
