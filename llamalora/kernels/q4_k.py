"""Q4_K: super-blocks of 256 weights in 144 bytes: half-float d and dmin, 12 bytes of 6-bit sub-block
scales and minima (8 of each, packed), then 128 bytes of 4-bit q.

The 256 weights are 8 sub-blocks of 32; weight = d·sc[j]·q − dmin·m[j]. Bytes 32i..32i+31 of q hold
sub-block 2i in their low nibbles and sub-block 2i+1 in their high nibbles.
"""

import numpy as np
from gguf import GGMLQuantizationType as GGMLType
from numba import njit, prange

from . import blockdot, intmatvec, kquants_ref

INT_DRIVER = intmatvec.Q4_K  # intmatvec's id of this type (a global: compiled code takes it as a literal)
from .blockdot import bits, to_float
from .f16 import half_to_float

BLOCK_SIZE = 256
TYPE_SIZE = 144
SUB = 32
QS_OFFSET = 16


def scale_min_codes(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 6-bit sub-block scales and minima (uint8 [..., 8] each) of 12 packed bytes [..., 12]
    (ggml's get_scale_min_k4): bytes 0-3 and 4-7 hold scales and minima 0-3 in 6 bits, with the top
    two bits of scales and minima 4-7, whose low four bits are the nibbles of bytes 8-11."""
    d, m, md = scales[..., 0:4], scales[..., 4:8], scales[..., 8:12]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def _decode(block, k, biased):
    """Weights 8k..8k+7: nibble k // 4 % 2 of bytes 32·(k // 8) + 8·(k % 4).. of q."""
    v = block.bytes(QS_OFFSET + 32 * (k // 8) + 8 * (k % 4))
    return to_float(block.builder, bits(block.builder, v, 4 * (k // 4 % 2), 0x0F))


KIND = int(GGMLType.Q4_K)
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


@njit(parallel=True, nogil=True, cache=True)
def scales(data):
    """Per sub-block of 32 the float32 scale d·sc and minimum −dmin·m of raw rows, [n_rows, n_cols/32] each (what
    the portable kernels read; exact products)."""
    n_sb = data.shape[1] // TYPE_SIZE
    scale = np.empty((data.shape[0], 8 * n_sb), dtype=np.float32)
    minimum = np.empty((data.shape[0], 8 * n_sb), dtype=np.float32)
    for r in prange(data.shape[0]):
        for b in range(n_sb):
            at = b * TYPE_SIZE
            d = half_to_float(np.uint16(data[r, at]) | (np.uint16(data[r, at + 1]) << 8))
            dmin = half_to_float(np.uint16(data[r, at + 2]) | (np.uint16(data[r, at + 3]) << 8))
            for j in range(8):  # scale_min_codes, one sub-block
                if j < 4:
                    sc, m = data[r, at + 4 + j] & 63, data[r, at + 8 + j] & 63
                else:
                    sc = (data[r, at + 8 + j] & 15) | ((data[r, at + j] >> 6) << 4)
                    m = (data[r, at + 8 + j] >> 4) | ((data[r, at + 4 + j] >> 6) << 4)
                scale[r, 8 * b + j] = d * np.float32(sc)
                minimum[r, 8 * b + j] = -(dmin * np.float32(m))
    return scale, minimum


def prepare(data: np.ndarray, n_cols: int) -> tuple:
    """The raw rows and, for the portable kernels, the sub-blocks' float32 scales and minima (`scales`). The integer
    kernel decodes them from the blocks, so there the rows alone are kept; prompt batches and the rare declined
    activation widen them per call."""
    return (data,) if intmatvec.ENABLED else (data, *scales(data))


def dequantize(data: np.ndarray, n_cols: int) -> np.ndarray:
    data = np.ascontiguousarray(data)
    return blockdot.dequantize_prepared(_dequantize_rows, (data, *scales(data)), n_cols)


def quantize(x: np.ndarray) -> np.ndarray:
    """ggml's quantize_row_q4_K_ref (what llama-quantize writes without an importance matrix)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty((x.shape[0], x.shape[1] // BLOCK_SIZE * TYPE_SIZE), dtype=np.uint8)
    kquants_ref.quantize_q4_k_rows(x, out)
    return out


def matvec(prepared: tuple, x: np.ndarray, out: np.ndarray) -> None:
    data = prepared[0]
    # (the integer kernel declines extreme x)
    if not (intmatvec.ENABLED and intmatvec.matvec_without_delta(INT_DRIVER, data, x, out)):
        _matvec(data, *(prepared[1:] if len(prepared) > 1 else scales(data)), x, out)


def matmul(prepared: tuple, x: np.ndarray, out: np.ndarray) -> None:
    data = prepared[0]
    _matmul(data, *(prepared[1:] if len(prepared) > 1 else scales(data)), x, out)
