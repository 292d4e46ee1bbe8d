"""F16 tensors, and the half-float bits that quantized blocks keep their scales in.

numba has no float16 arrays: half floats travel as uint16 bits. A model's F16 rows stay the file's
bytes; halfdot's kernels widen them 16 at a time in registers (exact) as they multiply.
"""

import math

import numpy as np
from numba import njit, prange

from . import halfdot

BLOCK_SIZE = 1
TYPE_SIZE = 2


def half_bits_to_float(bits: np.ndarray) -> np.ndarray:
    """float32 values of little-endian half floats stored as byte pairs (..., 2) uint8."""
    return np.ascontiguousarray(bits).view(np.float16)[..., 0].astype(np.float32)


@njit(nogil=True, cache=True)
def half_to_float(bits):
    """float32 of one half float's bits (exact: subnormals, infinities and NaN included)."""
    exponent, mantissa = (bits >> 10) & 0x1F, bits & 0x3FF
    if exponent == 0:
        value = math.ldexp(mantissa, -24)
    elif exponent == 31:
        value = math.inf if mantissa == 0 else math.nan
    else:
        value = math.ldexp(mantissa + 1024, exponent - 25)
    return np.float32(-value if bits & 0x8000 else value)


@njit(parallel=True, nogil=True, cache=True)
def block_halves(data, block_bytes, offset):
    """float32[n_rows, n_blocks]: the half float at byte `offset` of every block of every row of data
    uint8[n_rows, row_nbytes] (a quantized type's block scales or minima)."""
    nb = data.shape[1] // block_bytes
    out = np.empty((data.shape[0], nb), dtype=np.float32)
    for r in prange(data.shape[0]):
        for b in range(nb):
            at = b * block_bytes + offset
            out[r, b] = half_to_float(np.uint16(data[r, at]) | (np.uint16(data[r, at + 1]) << 8))
    return out


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


def dequantize(data: np.ndarray, n_cols: int, out: np.ndarray | None = None) -> np.ndarray:
    if out is None:
        out = np.empty((data.shape[0], n_cols), dtype=np.float32)
    _widen_rows(np.ascontiguousarray(data).view(np.uint16).reshape(data.shape[0], n_cols), out)
    return out


def quantize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return np.ascontiguousarray(x.astype(np.float16)).view(np.uint8).reshape(x.shape[0], -1)


# The widening halfdot compiles in: the F16C / NEON instruction, or integer operations where the target lacks
# one (a constant, so numba's cache, keyed on the CPU and its features, holds the right kernels)
KIND = halfdot.F16_KIND


@njit(nogil=True, cache=True)
def widen_row(src_addr, dst_addr, n):
    """float32[n] at dst_addr = the n half floats at src_addr (exact)."""
    halfdot.widen_row(KIND, src_addr, dst_addr, n)


@njit(nogil=True, cache=True)
def _widen_rows(bits, out):
    halfdot.widen_rows(KIND, bits, out)


_matvec, _matmul = halfdot.kind_kernels(KIND)
prepare = halfdot.prepare


def matvec(prepared: tuple, x: np.ndarray, out: np.ndarray) -> None:
    _matvec(prepared[0], x, out)


def matmul(prepared: tuple, x: np.ndarray, out: np.ndarray) -> None:
    _matmul(prepared[0], x, out)
