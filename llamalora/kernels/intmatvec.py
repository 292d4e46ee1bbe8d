"""Matrix × vector by integer dot products, exact to float32 rounding: the driver of vnni.py (AVX-512 VNNI) and
avx2.py (AVX2), whichever the compile target has.

Both turn the activation into integers once per call (int_rows.block_scales: X = round(x / s) per block of 32, s =
max|x| / X_MAX, so |x - s·X| ≤ s/2, the float32 rounding of the block's largest value) and multiply them with the
weights' codes as the file holds them; they differ in how X is split into limbs their multiply-adds take (VNNI:
three bytes into vpdpbusd; AVX2: two 16-bit halves into vpmaddwd). Q4_0, Q4_1, Q5_0, Q8_0, Q4_K and Q6_K rows are
read in place, block scales and all, so a weight needs no widened scale arrays beside it.

ISA is the instruction set taken: VNNI when the target has AVX-512 F, BW and VNNI, AVX2 when it has AVX2, FMA and
F16C (target.py), none otherwise or under LLAMALORA_KERNELS=portable; ENABLED when one is. The type modules and
dispatch.matvec call `matvec` when ENABLED and take the portable kernels for what it declines (an extreme
activation) and everywhere else.
"""

import os

import numpy as np
from numba import njit, prange

from . import avx2, cache, low_rank, target, vnni
from .int_rows import BLOCK_BYTES, BLOCK_VALUES, Q4_0, Q4_1, Q4_K, Q5_0, Q6_K, Q8_0  # noqa: F401

NONE, VNNI, AVX2 = "none", "avx512vnni", "avx2"


def target_isa() -> str:
    """The integer kernels' instruction set on the compile target (NONE without one)."""
    if target.has("avx512f", "avx512bw", "avx512vnni"):
        return VNNI
    if target.has("avx2", "fma", "f16c"):
        return AVX2
    return NONE


ISA = NONE if os.environ.get("LLAMALORA_KERNELS", "auto") == "portable" else target_isa()
ENABLED = ISA != NONE
# The chosen set's kernels and its activation records (numba compiles only the set its callers reach)
_KERNELS = avx2 if ISA == AVX2 else vnni
_rows_dot, _row_dot = _KERNELS.rows_dot, _KERNELS.row_dot
_quantize_activation = _KERNELS.quantize_activation
ROWS_PER_STEP = _KERNELS.ROWS_PER_STEP
LAYOUTS = np.array(_KERNELS.LAYOUTS, dtype=np.int64)
# FMAs into an accumulator lane per block of 32, by kernel id: the error bound counts a rounding for each
LANE_FMAS_PER_BLOCK = _KERNELS.LANE_FMAS_PER_BLOCK

NO_FACTORS = np.zeros((0, 0), dtype=np.float32)
NO_PACKED_B = np.zeros((0, low_rank.LANES), dtype=np.float32)
CHUNK_ROWS = low_rank.LANES  # rows of W per iteration of the parallel loop when a LoRA delta rides along

@njit(nogil=True, cache=True, inline="always")
def _rows_with_delta(kind, row_addr, row_stride, records, nb, out_addr, n_rows, chunk, t_addr, rank, b_addr,
                     chunk_bytes, next_addr, next_lines, lines_per_chunk):
    """Rows chunk·CHUNK_ROWS … of W·x, then their outputs' s·B·t, and the chunk's share of next A's lines."""
    if next_lines:
        low_rank.prefetch_lines(next_addr, chunk * lines_per_chunk, min((chunk + 1) * lines_per_chunk, next_lines))
    first = chunk * CHUNK_ROWS
    end = min(first + CHUNK_ROWS, n_rows)
    whole = first + (end - first) // ROWS_PER_STEP * ROWS_PER_STEP
    for r in range(first, whole, ROWS_PER_STEP):
        _rows_dot(kind, row_addr + r * row_stride, row_stride, records, nb, out_addr + 4 * r)
    for r in range(whole, end):
        _row_dot(kind, row_addr + r * row_stride, row_stride, records, nb, out_addr + 4 * r)
    low_rank.add_rank_columns(t_addr, rank, b_addr + chunk * chunk_bytes, end - first, out_addr + 4 * first)


@njit(parallel=True, nogil=True, cache=True)
def matvec(kind, data, x, out, a, packed_b, a_next, one_thread):
    """out = W·x (+ s·B·(a·x) when a has rows: a run-time LoRA delta, packed_b = low_rank.pack_scaled_b(s·B))
    for rows data uint8[n_rows, ≥ n_blocks·BLOCK_BYTES[kind]] of the driver kind (int_rows.Q4_0 ... Q6_K); False
    (out untouched) for an x the integer path does not take.

    With a delta, the parallel loop runs over chunks of 16 rows, and each chunk adds its 16 outputs' s·B·t (t =
    a·x, formed first) right after its rows: s·B streams beside the weight, on every thread, instead of in a pass
    of its own after the loop. The sums are those of low_rank.add_low_rank_matvec after W·x. a_next (the A
    factor the caller multiplies next, or an empty array) is prefetched into L2 a share per chunk, so that its
    serial a·x reads it from cache. one_thread: the caller runs on one thread (numba's get_num_threads() == 1,
    which compiled code cannot read and still be cached); the rows then go through a plain loop (decode on one
    thread: +1.2-1.5% tokens/s against a one-thread OpenMP loop, SmolLM2 Q4_1 and the 1B-shaped q4_0). (SmolLM2
    Q4_1 with an all-linear r=16 adapter, decode with / without it, one thread: 0.86 with the delta after the loop,
    0.88 inside it, 0.89-0.90 with a_next prefetched; AVX-512 VNNI.)"""
    if data.strides[1] != 1 or x.strides[0] != 4 or out.strides[0] != 4:
        raise ValueError("kernel arrays need contiguous rows (data uint8, x float32)")
    if x.shape[0] % BLOCK_VALUES[kind] != 0 or data.shape[1] < x.shape[0] // BLOCK_VALUES[kind] * BLOCK_BYTES[kind]:
        raise ValueError("kernel arrays disagree in shape (data rows, x length)")
    if out.shape[0] != data.shape[0]:
        raise ValueError("kernel output has the wrong shape")
    nb = x.shape[0] // 32
    buf, records, ok = _quantize_activation(x, LAYOUTS[kind])
    if not ok:
        return False
    row_addr, row_stride, out_addr = data.ctypes.data, data.strides[0], out.ctypes.data
    n_rows, rank = data.shape[0], a.shape[0]
    if rank == 0:
        n_steps = n_rows // ROWS_PER_STEP
        if one_thread:
            for r in range(0, n_steps * ROWS_PER_STEP, ROWS_PER_STEP):
                _rows_dot(kind, row_addr + r * row_stride, row_stride, records, nb, out_addr + 4 * r)
        else:
            for g in prange(n_steps):
                r = g * ROWS_PER_STEP
                _rows_dot(kind, row_addr + r * row_stride, row_stride, records, nb, out_addr + 4 * r)
        for r in range(n_steps * ROWS_PER_STEP, n_rows):
            _row_dot(kind, row_addr + r * row_stride, row_stride, records, nb, out_addr + 4 * r)
        return buf.size > 0  # True; buf is used here so that it outlives the loop that reads it by address
    low_rank.check_factors(a, packed_b, x, out)
    t = np.empty(rank, dtype=np.float32)
    low_rank.rank_dots(a.ctypes.data, rank, x.ctypes.data, x.shape[0], t.ctypes.data)
    t_addr, b_addr, chunk_bytes = t.ctypes.data, packed_b.ctypes.data, 4 * low_rank.LANES * rank
    n_chunks = (n_rows + CHUNK_ROWS - 1) // CHUNK_ROWS
    next_lines = (a_next.size * 4 + 63) // 64
    lines_per_chunk = (next_lines + n_chunks - 1) // n_chunks
    next_addr = a_next.ctypes.data
    if one_thread:  # (an OpenMP loop of one thread here slowed tokens 4-7 times for seconds after loading)
        for chunk in range(n_chunks):
            _rows_with_delta(kind, row_addr, row_stride, records, nb, out_addr, n_rows, chunk, t_addr, rank, b_addr,
                             chunk_bytes, next_addr, next_lines, lines_per_chunk)
    else:
        for chunk in prange(n_chunks):
            _rows_with_delta(kind, row_addr, row_stride, records, nb, out_addr, n_rows, chunk, t_addr, rank, b_addr,
                             chunk_bytes, next_addr, next_lines, lines_per_chunk)
    return buf.size + t.size > 0  # True; buf and t outlive the loop that reads them by address


@njit(nogil=True, cache=True)
def matvec_without_delta(kind, data, x, out):
    """out = W·x for rows data uint8[n_rows, ≥ n_blocks·BLOCK_BYTES[kind]] of the driver kind (the K-quants' n_cols
    a multiple of 256); False (out untouched) for an x the integer path does not take."""
    return matvec(kind, data, x, out, NO_FACTORS, NO_PACKED_B, NO_FACTORS, False)


for _function in (matvec, matvec_without_delta):
    cache.follows(_function, cache.KERNEL_SOURCES)
