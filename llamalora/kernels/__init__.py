"""Tensor types and the kernels that compute with them: the only package that knows block layouts.

One module per ggml type (f32, f16, bf16, q4_0, q4_1, q5_0, q5_1, q8_0, the K-quants, iq4_nl) holds its block layout, an exact dequantizer and
quantizer (byte for byte those of ggml's reference code, as the `gguf` package implements them) and,
for types a model computes with, `prepare` (raw rows → what its kernels read) and `matvec` / `matmul`.
Everything else goes through the functions below, by type.
"""

import os
from dataclasses import dataclass

import numba
import numpy as np
from gguf import GGMLQuantizationType as GGMLType

from ..errors import ModelFileError
from . import bf16, dense, f16, f32, iq4_nl, low_rank, q2_k, q3_k, q4_0, q4_1, q4_k, q5_0, q5_1, q5_k, q6_k, q8_0

# A decode step launches a few hundred small parallel loops: OpenMP starts one in about 3 µs here,
# TBB in 11 µs and numba's own workqueue in 30 µs, so prefer OpenMP unless the user chose a layer.
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]

TYPES = {
    GGMLType.F32: f32,
    GGMLType.F16: f16,
    GGMLType.Q4_0: q4_0,
    GGMLType.Q4_1: q4_1,
    GGMLType.Q8_0: q8_0,
    GGMLType.BF16: bf16,
    GGMLType.Q5_0: q5_0,
    GGMLType.Q5_1: q5_1,
    GGMLType.Q2_K: q2_k,
    GGMLType.Q3_K: q3_k,
    GGMLType.Q4_K: q4_k,
    GGMLType.Q5_K: q5_k,
    GGMLType.Q6_K: q6_k,
    GGMLType.IQ4_NL: iq4_nl,
}


def supported_types() -> list[GGMLType]:
    return list(TYPES)


def type_module(ggml_type):
    try:
        return TYPES[GGMLType(ggml_type)]
    except (KeyError, ValueError):
        name = getattr(ggml_type, "name", str(ggml_type))
        raise ModelFileError(f"tensor type {name} is not supported (supported: {type_names()})") from None


def type_names() -> str:
    return ", ".join(t.name for t in TYPES)


def block_size(ggml_type) -> int:
    return type_module(ggml_type).BLOCK_SIZE


def row_nbytes(ggml_type, n_cols: int) -> int:
    """Bytes of one row of n_cols values; n_cols must be a whole number of blocks."""
    module = type_module(ggml_type)
    if n_cols % module.BLOCK_SIZE:
        raise ModelFileError(f"a row of {n_cols} values is not a whole number of {GGMLType(ggml_type).name} "
                             f"blocks of {module.BLOCK_SIZE}")
    return n_cols // module.BLOCK_SIZE * module.TYPE_SIZE


def dequantize(ggml_type, data: np.ndarray, n_cols: int, out: np.ndarray | None = None) -> np.ndarray:
    """float32[n_rows, n_cols] of raw rows uint8[n_rows, row_nbytes], written to `out` when given (a reused
    buffer spares the page faults of fresh memory, which cost more than the conversion itself)."""
    module = type_module(ggml_type)
    if out is None:
        return module.dequantize(data, n_cols)
    if module is f16:
        return f16.dequantize(data, n_cols, out)
    out[...] = module.dequantize(data, n_cols)
    return out


def dequantize_rows(ggml_type, data: np.ndarray, n_cols: int, rows: np.ndarray) -> np.ndarray:
    """float32[len(rows), n_cols]: only the chosen rows are read (an embedding lookup)."""
    return type_module(ggml_type).dequantize(np.ascontiguousarray(data[rows]), n_cols)


def quantize(ggml_type, x: np.ndarray) -> np.ndarray:
    """uint8[n_rows, row_nbytes] of x float32[n_rows, n_cols]."""
    x = np.asarray(x, dtype=np.float32)
    row_nbytes(ggml_type, x.shape[-1])
    return type_module(ggml_type).quantize(x.reshape(-1, x.shape[-1]))


@dataclass
class Weight:
    """A linear layer's weight ready for the kernels: its type, shape and the type's prepared arrays."""

    type: GGMLType
    n_rows: int
    n_cols: int
    prepared: tuple
    name: str = ""


def prepare(tensor) -> Weight:
    """Weight of a Tensor. F16, BF16 and quantized rows stay views on the file; only block scales are widened."""
    module = type_module(tensor.type)
    if module is f32:
        prepared = (np.ascontiguousarray(module.dequantize(tensor.data, tensor.n_cols)),)
    else:
        prepared = module.prepare(tensor.data, tensor.n_cols)
    return Weight(GGMLType(tensor.type), tensor.n_rows, tensor.n_cols, prepared, tensor.name)


def block_scales(ggml_type, data: np.ndarray) -> tuple:
    """The block scales (and, where the type has them, minima) of Q4_0, Q4_1 or Q8_0 raw rows, float32[n_rows,
    n_blocks] each: Q4_0 gives (d, -8·d), Q4_1 (d, m), Q8_0 (d,)."""
    return type_module(ggml_type).scales(data)


def add_low_rank(w: np.ndarray, a: np.ndarray, scaled_b: np.ndarray) -> None:
    """w += scaled_b @ a in place (a LoRA delta merged into float32 weights)."""
    dense.add_low_rank(w, np.ascontiguousarray(a, dtype=np.float32), np.ascontiguousarray(scaled_b, dtype=np.float32))


def pack_scaled_b(scaled_b: np.ndarray) -> np.ndarray:
    """s·B float32[n_rows, r] in the layout the run-time deltas read (low_rank.pack_scaled_b)."""
    return low_rank.pack_scaled_b(np.asarray(scaled_b, dtype=np.float32))


def add_low_rank_matvec(a: np.ndarray, packed_b: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
    """out += s·B·(a @ x) in place for one token x float32[n_cols] (a run-time LoRA delta; packed_b is
    pack_scaled_b(s·B))."""
    low_rank.add_low_rank_matvec(a, packed_b, x, out)


def add_low_rank_matmul(a: np.ndarray, packed_b: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
    """out += (x @ a.T) @ (s·B).T in place for a batch x float32[b, n_cols] (run-time LoRA deltas)."""
    low_rank.add_low_rank_matmul(a, packed_b, x, out)


def row_norms(w: np.ndarray) -> np.ndarray:
    """float32[n_rows]: the Euclidean norm of each row of w float32[n_rows, n_cols] (DoRA's weight norm)."""
    out = np.empty(w.shape[0], dtype=np.float32)
    dense.row_norms(np.ascontiguousarray(w, dtype=np.float32), out)
    return out


MERGE_SOURCES = {GGMLType.F16: dense.SOURCE_F16, GGMLType.F32: dense.SOURCE_F32}
MERGE_TARGETS = {GGMLType.Q4_0: dense.TARGET_Q4_0, GGMLType.Q4_1: dense.TARGET_Q4_1, GGMLType.Q8_0: dense.TARGET_Q8_0,
                 GGMLType.F16: dense.TARGET_F16, GGMLType.F32: dense.TARGET_F32}
MERGE_TILE_ROWS = 16  # rows per work item of the fused merge


def merge_low_rank(base_type, base_data: np.ndarray, target_type, a: np.ndarray, b: np.ndarray, scale: float,
                   scratch: np.ndarray | None = None) -> np.ndarray:
    """uint8[n_rows, row_nbytes] of W + scale·(b @ a) in target_type, W the raw rows base_data of base_type.

    a float32[r, n_cols], b float32[n_rows, r]. Quantized bases are widened to float32 first (into `scratch`
    when given); F16 and F32 bases are read directly. Q4_0, Q4_1, Q8_0, F16 and F32 targets are formed tile by
    tile in one pass; other types go through dequantize, add_low_rank and quantize.
    """
    n_rows, n_cols = b.shape[0], a.shape[1]
    a = np.ascontiguousarray(a, dtype=np.float32)
    scaled_b = np.ascontiguousarray(np.float32(scale) * np.asarray(b, dtype=np.float32), dtype=np.float32)
    base_type, target_type = GGMLType(base_type), GGMLType(target_type)
    fused = target_type in MERGE_TARGETS and n_cols % 32 == 0
    if fused and base_type in MERGE_SOURCES:
        source, kind = np.ascontiguousarray(base_data), MERGE_SOURCES[base_type]
    else:
        if scratch is None or scratch.size < n_rows * n_cols:
            scratch = np.empty(n_rows * n_cols, dtype=np.float32)
        w = dequantize(base_type, base_data, n_cols, out=scratch[:n_rows * n_cols].reshape(n_rows, n_cols))
        if not fused:
            dense.add_low_rank(w, a, scaled_b)
            return quantize(target_type, w)
        source, kind = w.view(np.uint8), dense.SOURCE_F32
    out = np.empty((n_rows, row_nbytes(target_type, n_cols)), dtype=np.uint8)
    dense.merge_low_rank_rows(source, kind, dense.pack_rank_columns(a), scaled_b, MERGE_TARGETS[target_type], out,
                              MERGE_TILE_ROWS)
    return out


def matvec(weight: Weight, x: np.ndarray, out: np.ndarray) -> None:
    """out float32[n_rows] = W · x for x float32[n_cols] (decode: one token)."""
    if weight.type == GGMLType.F32:
        dense.matvec(weight.prepared[0], x, out)
    else:
        TYPES[weight.type].matvec(weight.prepared, x, out)


def matmul(weight: Weight, x: np.ndarray, out: np.ndarray) -> None:
    """out float32[b, n_rows] = x @ W.T for x float32[b, n_cols] (a prompt batch)."""
    if weight.type == GGMLType.F32:
        dense.matmul(weight.prepared[0], x, out)
    else:
        TYPES[weight.type].matmul(weight.prepared, x, out)
