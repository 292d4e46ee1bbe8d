"""Q8_0: blocks of 32 weights in 34 bytes: half-float scale d, then 32 signed bytes q; weight = d * q."""

import numpy as np

from numba import njit, prange

from .f16 import block_halves, float_to_half_bits, half_bits_to_float
from . import intmatvec, simd

INT_DRIVER = intmatvec.Q8_0  # intmatvec's id of this type (a global: compiled code takes it as a literal)

BLOCK_SIZE = 32
TYPE_SIZE = 34
QS_OFFSET = 2


def dequantize(data: np.ndarray, n_cols: int) -> np.ndarray:
    blocks = data.reshape(-1, TYPE_SIZE)
    d = half_bits_to_float(blocks[:, 0:2])[:, None]
    q = np.ascontiguousarray(blocks[:, QS_OFFSET:]).view(np.int8).astype(np.float32)
    return (d * q).reshape(data.shape[0], n_cols)


def quantize(x: np.ndarray) -> np.ndarray:
    """ggml's quantize_row_q8_0_ref, operation for operation (bit-exact with the reference)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty((x.shape[0], x.shape[1] // BLOCK_SIZE * TYPE_SIZE), dtype=np.uint8)
    quantize_rows(x, out)
    return out


@njit(parallel=True, nogil=True, cache=True)
def quantize_rows(x, out):
    for r in prange(x.shape[0]):
        quantize_row(x[r], out[r])


# fastmath=False stated, not defaulted: numba hands a caller's fastmath to callees that leave it unset, and a
# fused multiply-add here would change the bytes
@njit(nogil=True, cache=True, fastmath=False)
def quantize_row(x, out):
    """One row (or any whole number of its blocks: the LoRA merge quantizes rows piece by piece)."""
    nb = x.shape[0] // 32
    d = np.empty(nb, dtype=np.float32)
    for b in range(nb):
        amax = np.float32(0.0)
        for j in range(32):
            amax = max(amax, abs(x[b * 32 + j]))
        d[b] = amax / np.float32(127.0)
    half = float_to_half_bits(d)
    for b in range(nb):
        inv_d = np.float32(1.0) / d[b] if d[b] != 0 else np.float32(0.0)
        base = b * TYPE_SIZE
        out[base] = half[b] & 0xFF
        out[base + 1] = half[b] >> 8
        for j in range(32):
            v = x[b * 32 + j] * inv_d
            # C's roundf (half away from zero) without adding 0.5, which rounds 0.49999997 up
            a = abs(v)
            whole = np.floor(a)
            q = np.int32(whole + np.floor(np.float32(2.0) * (a - whole)))
            out[base + QS_OFFSET + j] = np.uint8((q if v >= 0 else -q) & 0xFF)


@njit(nogil=True, cache=True)
def scales(data):
    """Block scales d of raw rows, float32[n_rows, n_blocks], as a 1-tuple."""
    return (block_halves(data, TYPE_SIZE, 0),)


def prepare(data: np.ndarray, n_cols: int) -> tuple:
    """The raw rows (still the file's bytes), with the block scales widened to float32 where the portable kernels
    read them every token. The integer kernels (intmatvec.py) read the halves inside the blocks, so there the
    widened arrays are not kept (they would add 4 to 8 bytes per 18- or 20-byte block to the memory use, and to the
    bytes each token streams); prompt batches and the rare declined activation widen them per call (`scales`)."""
    return (data,) if intmatvec.ENABLED else (data, *scales(data))


def matvec(prepared: tuple, x: np.ndarray, out: np.ndarray) -> None:
    data = prepared[0]
    # (the integer kernel declines extreme x)
    if not (intmatvec.ENABLED and intmatvec.matvec_without_delta(INT_DRIVER, data, x, out)):
        (d,) = prepared[1:] if len(prepared) > 1 else scales(data)
        simd.q8_matvec(data, d, x, out)


def matmul(prepared: tuple, x: np.ndarray, out: np.ndarray) -> None:
    data = prepared[0]
    (d,) = prepared[1:] if len(prepared) > 1 else scales(data)
    simd.q8_matmul(data, d, x, out)
