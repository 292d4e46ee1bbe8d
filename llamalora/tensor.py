"""A tensor as it lies in a model file: its ggml type, its shape and its raw bytes.

Shapes are in numpy order: shape[-1] is the contiguous dimension (GGUF's ne[0]); a linear
layer's weight is (out_features, in_features), as in PyTorch. `data` holds the raw bytes as a
uint8 array of shape (n_rows, row_nbytes), a view on the memory-mapped file until something
must change it. Only llamalora.kernels knows what the bytes of a row mean.
"""

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as GGMLType


@dataclass
class Tensor:
    name: str
    type: GGMLType
    shape: tuple[int, ...]
    data: np.ndarray

    @property
    def n_rows(self) -> int:
        return int(np.prod(self.shape[:-1], dtype=np.int64)) if len(self.shape) > 1 else 1

    @property
    def n_cols(self) -> int:
        return int(self.shape[-1])

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)
