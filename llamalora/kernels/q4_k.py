"""Q4_K: super-blocks of 256 weights in 144 bytes: half-float d and dmin, 12 bytes of 6-bit sub-block
scales and minima (8 of each, packed), then 128 bytes of 4-bit q.

The 256 weights are 8 sub-blocks of 32; weight = d·sc[j]·q − dmin·m[j]. Bytes 32i..32i+31 of q hold
sub-block 2i in their low nibbles and sub-block 2i+1 in their high nibbles.
"""

import numpy as np
from gguf import GGMLQuantizationType as GGMLType
from numba import njit

from . import blockdot, kquants_ref
from .blockdot import bits, load_bytes, to_float
from .f16 import half_bits_to_float

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
    """ggml's quantize_row_q4_K_ref (what llama-quantize writes without an importance matrix)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty((x.shape[0], x.shape[1] // BLOCK_SIZE * TYPE_SIZE), dtype=np.uint8)
    kquants_ref.quantize_q4_k_rows(x, out)
    return out


def matvec(prepared: tuple, x: np.ndarray, out: np.ndarray) -> None:
    _matvec(*prepared, x, out)


def matmul(prepared: tuple, x: np.ndarray, out: np.ndarray) -> None:
    _matmul(*prepared, x, out)
