"""Float32 matrices: F32 and F16 weights (widened once at load) and run-time LoRA factors."""

import numpy as np
from numba import njit, prange


@njit(parallel=True, nogil=True, cache=True, fastmath=True)
def matvec(w, x, out):
    """out[r] = w[r] · x for w float32[n_rows, n_cols]."""
    for r in prange(w.shape[0]):
        acc = np.float32(0.0)
        for j in range(w.shape[1]):
            acc += w[r, j] * x[j]
        out[r] = acc


def matmul(w: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
    """out = x @ w.T for a batch x float32[b, n_cols]."""
    np.matmul(x, w.T, out=out)


@njit(parallel=True, nogil=True, cache=True, fastmath=True)
def add_low_rank(w, a, scaled_b):
    """w += scaled_b @ a in place, for w float32[n_rows, n_cols], a [r, n_cols], scaled_b [n_rows, r]:
    a LoRA merge without the n_rows × n_cols temporary a BLAS product would need."""
    for i in prange(w.shape[0]):
        for k in range(a.shape[0]):
            coef = scaled_b[i, k]
            for j in range(w.shape[1]):
                w[i, j] += coef * a[k, j]
