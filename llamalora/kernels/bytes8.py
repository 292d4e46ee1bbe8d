"""Kernels for 8-bit block types (Q8_0): weight = d * q per block of 32 signed bytes.

The rows stay the file's bytes; q sits at qs_offset inside each block of block_bytes bytes.
Activations stay float32.
"""

import numpy as np
from numba import njit, prange

ROW_TILE = 512


@njit(parallel=True, nogil=True, cache=True, fastmath=True)
def byte_matvec_portable(data, d, qs_offset, block_bytes, x, out):
    nb = d.shape[1]
    for r in prange(data.shape[0]):
        row = data[r]
        acc = np.float32(0.0)
        for b in range(nb):
            base = b * block_bytes + qs_offset
            s = np.float32(0.0)
            for j in range(32):
                s += np.float32(np.int8(row[base + j])) * x[b * 32 + j]
            acc += d[r, b] * s
        out[r] = acc


@njit(parallel=True, nogil=True, cache=True)
def byte_dequantize_tile(data, d, qs_offset, block_bytes, r0, r1, tile):
    nb = d.shape[1]
    for i in prange(r1 - r0):
        r = r0 + i
        for b in range(nb):
            base = b * block_bytes + qs_offset
            for j in range(32):
                tile[i, b * 32 + j] = d[r, b] * np.float32(np.int8(data[r, base + j]))


def byte_matvec(data, d, qs_offset, block_bytes, x, out):
    byte_matvec_portable(data, d, qs_offset, block_bytes, x, out)


def byte_matmul(data, d, qs_offset, block_bytes, x, out):
    """out = x @ W.T for a batch: W is widened to float32 a tile of rows at a time, never whole."""
    n_rows, n_cols = data.shape[0], d.shape[1] * 32
    tile = np.empty((min(ROW_TILE, n_rows), n_cols), dtype=np.float32)
    for r0 in range(0, n_rows, ROW_TILE):
        r1 = min(r0 + ROW_TILE, n_rows)
        byte_dequantize_tile(data, d, qs_offset, block_bytes, r0, r1, tile)
        np.matmul(x, tile[: r1 - r0].T, out=out[:, r0:r1])
