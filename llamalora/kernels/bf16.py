"""BF16 tensors: the top 16 bits of float32 values (sign, 8-bit exponent, 7-bit mantissa).

Rows stay the file's bytes; halfdot's kernels widen 16 values at a time (a shift into the high half of a
32-bit lane, exact) and multiply them with the float32 activations.
"""

import numpy as np

from . import halfdot

BLOCK_SIZE = 1
TYPE_SIZE = 2


def dequantize(data: np.ndarray, n_cols: int) -> np.ndarray:
    bits = np.ascontiguousarray(data).view(np.uint16).reshape(data.shape[0], n_cols)
    return (bits.astype(np.uint32) << 16).view(np.float32)


def quantize(x: np.ndarray) -> np.ndarray:
    """ggml's fp32 → bf16: NaN kept quiet, everything else rounded to nearest even (bit-exact)."""
    n = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    n = np.where((n & 0x7FFFFFFF) > 0x7F800000, (n & np.uint32(0xFFFF0000)) | np.uint32(64 << 16), n)
    n = (n.astype(np.uint64) + (0x7FFF + ((n >> 16) & 1))) >> 16
    return n.astype(np.uint16).view(np.uint8).reshape(x.shape[0], -1)


_matvec, _matmul = halfdot.kind_kernels(halfdot.BF16)
prepare = halfdot.prepare


def matvec(prepared: tuple, x: np.ndarray, out: np.ndarray) -> None:
    _matvec(prepared[0], x, out)


def matmul(prepared: tuple, x: np.ndarray, out: np.ndarray) -> None:
    _matmul(prepared[0], x, out)
