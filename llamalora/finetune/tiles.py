"""Products with a base weight that stays in its file type: each row tile is dequantized into a small float
buffer just before BLAS uses it, so the whole model never exists in float32.

The tile values equal llamalora.kernels.dequantize's exactly (same float32 operations), so training sees the
same weights inference runs with.
"""

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as GGMLType
from numba import njit

from .. import kernels
from ..errors import ModelFileError

# Elements of one dequantized tile: 128 Ki floats = 512 KiB in float32, about an L2 cache.
TILE_ELEMENTS = 1 << 17


@dataclass
class BaseWeight:
    """A frozen linear weight [n_rows, n_cols] in its file type, with the block scales widened to float32."""

    name: str
    type: GGMLType
    n_rows: int
    n_cols: int
    data: np.ndarray           # uint8[n_rows, row_nbytes], usually a view on the mapped file
    scales: np.ndarray | None  # float32[n_rows, n_blocks] (quantized types)
    minima: np.ndarray | None  # float32[n_rows, n_blocks] (q4_1; zeros for q4_0, whose offset is applied to q)

    @property
    def tile_rows(self) -> int:
        return int(max(16, min(self.n_rows, TILE_ELEMENTS // max(self.n_cols, 1))))


def base_weight(tensor) -> BaseWeight:
    qtype = GGMLType(tensor.type)
    data = tensor.data
    if qtype == GGMLType.F32 or qtype == GGMLType.F16:
        return BaseWeight(tensor.name, qtype, tensor.n_rows, tensor.n_cols, data, None, None)
    if qtype not in (GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q8_0):
        raise ModelFileError(f"{tensor.name}: type {qtype.name} cannot be fine-tuned on "
                             "(supported: F32, F16, Q4_0, Q4_1, Q8_0)")
    prepared = kernels.prepare(tensor).prepared
    scales = np.ascontiguousarray(prepared[1].reshape(tensor.n_rows, -1), dtype=np.float32)
    if qtype == GGMLType.Q4_1:
        minima = np.ascontiguousarray(prepared[2].reshape(tensor.n_rows, -1), dtype=np.float32)
    else:
        minima = np.zeros_like(scales)
    return BaseWeight(tensor.name, qtype, tensor.n_rows, tensor.n_cols, data, scales, minima)


def dequantize_tile(w: BaseWeight, r0: int, r1: int, out: np.ndarray) -> np.ndarray:
    """Rows r0..r1 of w as float32 (out is a scratch buffer of at least r1 - r0 rows); returns the tile."""
    tile = out[: r1 - r0]
    if w.type == GGMLType.F32:
        return w.data[r0:r1].view(np.float32)
    if w.type == GGMLType.F16:
        tile[...] = w.data[r0:r1].view(np.float16)
    elif w.type == GGMLType.Q4_1:
        q4_tile(w.data, w.scales, w.minima, r0, 0, 4, 20, tile)
    elif w.type == GGMLType.Q4_0:
        q4_tile(w.data, w.scales, w.minima, r0, 8, 2, 18, tile)
    else:
        q8_tile(w.data, w.scales, r0, tile)
    return tile


# Tiles are dequantized on the calling thread: the matmuls' BLAS threads do the parallel work, and a second
# thread team (numba's) spinning beside them slows both down badly on a busy machine.


def q4_tile(data, scales, minima, r0, offset, qs_offset, type_size, out):
    """out[i] = row r0 + i of 4-bit blocks: d * (q - offset) + m (q4_0: offset 8, m 0; q4_1: offset 0)."""
    q4_rows(data, scales, minima, r0, offset, qs_offset, type_size, out, 0, out.shape[0])


def q8_tile(data, scales, r0, out):
    q8_rows(data, scales, r0, out, 0, out.shape[0])


@njit(nogil=True, cache=True)
def q4_rows(data, scales, minima, r0, offset, qs_offset, type_size, out, i0, i1):
    n_blocks = scales.shape[1]
    for i in range(i0, i1):
        r = r0 + i
        for b in range(n_blocks):
            d = scales[r, b]
            m = minima[r, b]
            base = b * type_size + qs_offset
            for j in range(16):
                byte = np.int32(data[r, base + j])
                out[i, b * 32 + j] = d * np.float32((byte & 15) - offset) + m
                out[i, b * 32 + 16 + j] = d * np.float32((byte >> 4) - offset) + m


@njit(nogil=True, cache=True)
def q8_rows(data, scales, r0, out, i0, i1):
    n_blocks = scales.shape[1]
    for i in range(i0, i1):
        r = r0 + i
        for b in range(n_blocks):
            d = scales[r, b]
            base = b * 34 + 2
            for j in range(32):
                q = np.int32(data[r, base + j])
                if q > 127:
                    q -= 256
                out[i, b * 32 + j] = d * np.float32(q)


def scratch(w: BaseWeight) -> np.ndarray:
    return np.empty((w.tile_rows, w.n_cols), dtype=np.float32)


def times_wt(w: BaseWeight, x: np.ndarray) -> np.ndarray:
    """x @ W.T for x [n, n_cols] (a forward product), in x's dtype."""
    out = np.empty((x.shape[0], w.n_rows), dtype=x.dtype)
    buf = scratch(w)
    step = w.tile_rows
    for r0 in range(0, w.n_rows, step):
        r1 = min(r0 + step, w.n_rows)
        tile = dequantize_tile(w, r0, r1, buf)
        if x.dtype != np.float32:
            tile = tile.astype(x.dtype)
        np.matmul(x, tile.T, out=out[:, r0:r1])
    return out


def add_times_w(w: BaseWeight, dy: np.ndarray, dx: np.ndarray) -> None:
    """dx += dy @ W for dy [n, n_rows] (a backward product through a frozen weight)."""
    buf = scratch(w)
    part = np.empty_like(dx)
    step = w.tile_rows
    for r0 in range(0, w.n_rows, step):
        r1 = min(r0 + step, w.n_rows)
        tile = dequantize_tile(w, r0, r1, buf)
        if dx.dtype != np.float32:
            tile = tile.astype(dx.dtype)
        np.matmul(dy[:, r0:r1], tile, out=part)
        dx += part


def rows(w: BaseWeight, ids: np.ndarray) -> np.ndarray:
    """float32 rows ids of w (an embedding lookup)."""
    ids = np.asarray(ids, dtype=np.int64)
    return kernels.dequantize_rows(w.type, w.data, w.n_cols, ids)
