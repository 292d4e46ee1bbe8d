"""F16 tensors, and the half-float bits that quantized blocks keep their scales in.

numba has no float16 arrays: half floats travel as uint16 bits and numpy converts them (exactly) to
float32 outside the jitted code.
"""

import numpy as np
from numba import njit

BLOCK_SIZE = 1
TYPE_SIZE = 2


def half_bits_to_float(bits: np.ndarray) -> np.ndarray:
    """float32 values of little-endian half floats stored as byte pairs (..., 2) uint8."""
    return np.ascontiguousarray(bits).view(np.float16)[..., 0].astype(np.float32)


def float_to_half_bytes(x: np.ndarray) -> np.ndarray:
    """(..., 2) uint8 bytes of x rounded to half floats (round to nearest even, as ggml does)."""
    return x.astype(np.float16)[..., None].view(np.uint8)


@njit(nogil=True, cache=True)
def float_to_half_bits(x):
    """uint16 half-float bits of float32 x, rounded to nearest even as numpy and ggml round.

    Normal results round by adding a bias to the float's bits (ties go to the even mantissa);
    subnormal ones are |x|·2^24 rounded to an integer, which float32 holds exactly.
    """
    bits = np.empty(x.shape[0], dtype=np.uint16)
    raw = x.view(np.uint32)
    for i in range(x.shape[0]):
        u = raw[i]
        sign = (u >> 16) & 0x8000
        a = u & 0x7FFFFFFF
        if a >= 0x47800000:  # overflows to infinity, or is infinity / NaN
            h = 0x7E00 if a > 0x7F800000 else 0x7C00
        elif a < 0x38800000:  # half subnormal or zero
            h = np.int64(np.rint(abs(x[i]) * np.float32(16777216.0)))
        else:
            h = (a + np.uint32(0xC8000FFF) + ((a >> 13) & 1)) >> 13
        bits[i] = np.uint16(sign | (h & 0xFFFF))
    return bits


def dequantize(data: np.ndarray, n_cols: int) -> np.ndarray:
    return np.ascontiguousarray(data).view(np.float16).astype(np.float32).reshape(data.shape[0], n_cols)


def quantize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return np.ascontiguousarray(x.astype(np.float16)).view(np.uint8).reshape(x.shape[0], -1)
