"""Q5_0: blocks of 32 weights in 22 bytes: half-float scale d, a 32-bit word qh of high bits, then 16
bytes of low nibbles; weight = d · (q − 16).

Byte j holds the low four bits of weight j (low nibble) and of weight j + 16 (high nibble); bit i of qh
is the fifth bit of weight i.
"""

import numpy as np
from gguf import GGMLQuantizationType as GGMLType
from numba import njit, prange

from . import blockdot, intmatvec

INT_DRIVER = intmatvec.Q5_0  # intmatvec's id of this type (a global: compiled code takes it as a literal)
from .blockdot import bits, ivec, to_float
from .f16 import block_halves, float_to_half_bits

BLOCK_SIZE = 32
TYPE_SIZE = 22
QH_OFFSET = 2
QS_OFFSET = 6


def decode_5bit(block, k, qh_offset, qs_offset, bias):
    """Weights 8k..8k+7 of a Q5_0 / Q5_1 block: nibble k // 2 of bytes 8·(k % 2).. with bit 8k + lane of
    qh as 16, minus bias."""
    builder, first = block.builder, 8 * k
    high = builder.and_(builder.lshr(block.word(qh_offset), ivec(range(first, first + 8))), ivec(1))
    q = builder.or_(bits(builder, block.bytes(qs_offset + 8 * (k % 2)), 4 * (k // 2), 0x0F), builder.shl(high, ivec(4)))
    if bias:
        q = builder.sub(q, ivec(bias))
    return to_float(builder, q)


def _decode(block, k, biased):
    return decode_5bit(block, k, QH_OFFSET, QS_OFFSET, 16 if biased else 0)


KIND = int(GGMLType.Q5_0)
blockdot.register(KIND, _decode, TYPE_SIZE, BLOCK_SIZE, BLOCK_SIZE, False, dot_bias=16)


@njit(nogil=True, cache=True)
def _matvec(data, scale, minimum, x, out):
    blockdot.matvec(KIND, data, scale, minimum, x, out)


@njit(nogil=True, cache=True)
def _matmul(data, scale, minimum, x, out):
    blockdot.matmul(KIND, data, scale, minimum, x, out)


@njit(nogil=True, cache=True)
def _dequantize_rows(data, scale, minimum, out):
    blockdot.dequantize_rows(KIND, data, scale, minimum, out)


@njit(nogil=True, cache=True)
def scales(data):
    """The block scales widened to float32, [n_rows, n_blocks], twice (also the portable kernels' unused minima)."""
    d = block_halves(data, TYPE_SIZE, 0)
    return d, d


def prepare(data: np.ndarray, n_cols: int) -> tuple:
    """The raw rows and, for the portable kernels, the widened block scales (`scales`). The integer kernel reads the
    halves in the blocks, so there the rows alone are kept; prompt batches and the rare declined activation widen
    them per call."""
    return (data,) if intmatvec.ENABLED else (data, *scales(data))


def dequantize(data: np.ndarray, n_cols: int) -> np.ndarray:
    data = np.ascontiguousarray(data)
    return blockdot.dequantize_prepared(_dequantize_rows, (data, *scales(data)), n_cols)


def quantize(x: np.ndarray) -> np.ndarray:
    """ggml's quantize_row_q5_0_ref, operation for operation (bit-exact with the reference)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty((x.shape[0], x.shape[1] // BLOCK_SIZE * TYPE_SIZE), dtype=np.uint8)
    quantize_rows(x, out)
    return out


@njit(parallel=True, nogil=True, cache=True)
def quantize_rows(x, out):
    nb = x.shape[1] // 32
    for r in prange(x.shape[0]):
        d = np.empty(nb, dtype=np.float32)
        for b in range(nb):
            amax = np.float32(0.0)
            vmax = np.float32(0.0)
            for j in range(32):
                v = x[r, b * 32 + j]
                if abs(v) > amax:
                    amax = abs(v)
                    vmax = v
            d[b] = vmax / np.float32(-16.0)
        half = float_to_half_bits(d)
        for b in range(nb):
            inv_d = np.float32(1.0) / d[b] if d[b] != 0 else np.float32(0.0)
            base = b * TYPE_SIZE
            out[r, base] = half[b] & 0xFF
            out[r, base + 1] = half[b] >> 8
            qh = np.uint32(0)
            for j in range(16):
                q0 = min(np.int32(x[r, b * 32 + j] * inv_d + np.float32(16.5)), 31)
                q1 = min(np.int32(x[r, b * 32 + 16 + j] * inv_d + np.float32(16.5)), 31)
                out[r, base + QS_OFFSET + j] = (q0 & 0x0F) | ((q1 & 0x0F) << 4)
                qh |= np.uint32(((q0 >> 4) & 1) << j) | np.uint32(((q1 >> 4) & 1) << (j + 16))
            for i in range(4):
                out[r, base + QH_OFFSET + i] = (qh >> (8 * i)) & 0xFF


def matvec(prepared: tuple, x: np.ndarray, out: np.ndarray) -> None:
    data = prepared[0]
    # (the integer kernel declines extreme x)
    if not (intmatvec.ENABLED and intmatvec.matvec_without_delta(INT_DRIVER, data, x, out)):
        _matvec(data, *(prepared[1:] if len(prepared) > 1 else scales(data)), x, out)


def matmul(prepared: tuple, x: np.ndarray, out: np.ndarray) -> None:
    data = prepared[0]
    _matmul(data, *(prepared[1:] if len(prepared) > 1 else scales(data)), x, out)
