"""F32 tensors: the bytes are the values."""

import numpy as np

BLOCK_SIZE = 1
TYPE_SIZE = 4


def dequantize(data: np.ndarray, n_cols: int) -> np.ndarray:
    return np.ascontiguousarray(data).view(np.float32).reshape(data.shape[0], n_cols)


def quantize(x: np.ndarray) -> np.ndarray:
    """A new array holding x's bytes (never a view: callers reuse their float buffers)."""
    x = np.array(x, dtype=np.float32, order="C", copy=True)
    return x.view(np.uint8).reshape(x.shape[0], -1)
