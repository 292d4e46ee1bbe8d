"""F16 tensors, and the half-float bits that quantized blocks keep their scales in.

numba has no float16 arrays: half floats travel as uint16 bits and numpy converts them (exactly) to
float32 outside the jitted code.
"""

import numpy as np

BLOCK_SIZE = 1
TYPE_SIZE = 2


def half_bits_to_float(bits: np.ndarray) -> np.ndarray:
    """float32 values of little-endian half floats stored as byte pairs (..., 2) uint8."""
    return np.ascontiguousarray(bits).view(np.float16)[..., 0].astype(np.float32)


def float_to_half_bytes(x: np.ndarray) -> np.ndarray:
    """(..., 2) uint8 bytes of x rounded to half floats (round to nearest even, as ggml does)."""
    return x.astype(np.float16)[..., None].view(np.uint8)


def dequantize(data: np.ndarray, n_cols: int) -> np.ndarray:
    return np.ascontiguousarray(data).view(np.float16).astype(np.float32).reshape(data.shape[0], n_cols)


def quantize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return np.ascontiguousarray(x.astype(np.float16)).view(np.uint8).reshape(x.shape[0], -1)
