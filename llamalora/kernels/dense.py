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
