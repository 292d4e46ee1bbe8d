"""Kernels shared by the 4-bit block types (Q4_0, Q4_1): weight = d * q + m per block of 32.

The rows stay the file's bytes; q sits at qs_offset inside each block of block_bytes bytes, weight j
of a block in the low nibble of byte j and weight j + 16 in the high nibble. Activations stay float32.
"""

import numpy as np
from numba import njit, prange

ROW_TILE = 512


@njit(nogil=True, cache=True, fastmath=True)
def block_sums(x):
    nb = x.shape[0] // 32
    sums = np.empty(nb, dtype=np.float32)
    for b in range(nb):
        s = np.float32(0.0)
        for j in range(32):
            s += x[b * 32 + j]
        sums[b] = s
    return sums


@njit(parallel=True, nogil=True, cache=True, fastmath=True)
def nibble_matvec_portable(data, d, m, qs_offset, block_bytes, x, out):
    nb = d.shape[1]
    xsum = block_sums(x)
    for r in prange(data.shape[0]):
        row = data[r]
        acc = np.float32(0.0)
        for b in range(nb):
            base = b * block_bytes + qs_offset
            s = np.float32(0.0)
            for j in range(16):
                q = row[base + j]
                s += np.float32(q & 15) * x[b * 32 + j] + np.float32(q >> 4) * x[b * 32 + 16 + j]
            acc += d[r, b] * s + m[r, b] * xsum[b]
        out[r] = acc


@njit(parallel=True, nogil=True, cache=True)
def nibble_dequantize_tile(data, d, m, qs_offset, block_bytes, r0, r1, tile):
    nb = d.shape[1]
    for i in prange(r1 - r0):
        r = r0 + i
        for b in range(nb):
            base = b * block_bytes + qs_offset
            for j in range(16):
                q = data[r, base + j]
                tile[i, b * 32 + j] = d[r, b] * np.float32(q & 15) + m[r, b]
                tile[i, b * 32 + 16 + j] = d[r, b] * np.float32(q >> 4) + m[r, b]


def nibble_matvec(data, d, m, qs_offset, block_bytes, x, out):
    nibble_matvec_portable(data, d, m, qs_offset, block_bytes, x, out)


def nibble_matmul(data, d, m, qs_offset, block_bytes, x, out):
    """out = x @ W.T for a batch: W is widened to float32 a tile of rows at a time, never whole."""
    n_rows, n_cols = data.shape[0], d.shape[1] * 32
    tile = np.empty((min(ROW_TILE, n_rows), n_cols), dtype=np.float32)
    for r0 in range(0, n_rows, ROW_TILE):
        r1 = min(r0 + ROW_TILE, n_rows)
        nibble_dequantize_tile(data, d, m, qs_offset, block_bytes, r0, r1, tile)
        np.matmul(x, tile[: r1 - r0].T, out=out[:, r0:r1])
