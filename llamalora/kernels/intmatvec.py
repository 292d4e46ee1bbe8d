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

import functools
import os

import numpy as np
from numba import njit, prange

from . import avx2, cache, low_rank, target, vnni
from .int_rows import (BLOCK_BYTES, BLOCK_VALUES, Q4_0, Q4_1, Q4_K, Q5_0, Q6_K, Q8_0,  # noqa: F401
                       ROWS_PER_STEP, SPREAD_ROWS)

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
KERNELS = avx2 if ISA == AVX2 else vnni
_rows_dot, _row_dot = KERNELS.rows_dot, KERNELS.row_dot
_quantize_activation = KERNELS.quantize_activation
LAYOUTS = np.array(KERNELS.LAYOUTS, dtype=np.int64)
# FMAs into an accumulator lane per block of 32, by kernel id: the error bound counts a rounding for each
LANE_FMAS_PER_BLOCK = KERNELS.LANE_FMAS_PER_BLOCK

NO_FACTORS = np.zeros((0, 0), dtype=np.float32)
NO_PACKED_B = np.zeros((0, low_rank.LANES), dtype=np.float32)
CHUNK_ROWS = low_rank.LANES  # rows of W per iteration of the parallel loop when a LoRA delta rides along

@njit(nogil=True, cache=True, inline="always")
def _step(kind, g, part, row_addr, row_stride, records, nb, out_addr):
    """Step g of the ROWS_PER_STEP-row kernel over the first ROWS_PER_STEP·part rows: rows g, g + part, g + 2·part
    ... where int_rows.SPREAD_ROWS (each row stream of the step runs on through the matrix), else the adjacent
    rows g·ROWS_PER_STEP ... ."""
    if SPREAD_ROWS:
        _rows_dot(kind, row_addr + g * row_stride, part * row_stride, records, nb, out_addr + 4 * g, 4 * part)
    else:
        r = g * ROWS_PER_STEP
        _rows_dot(kind, row_addr + r * row_stride, row_stride, records, nb, out_addr + 4 * r, 4)


@njit(nogil=True, cache=True, inline="always")
def _chunk_delta(chunk, n_rows, t_addr, rank, b_addr, chunk_bytes, out_addr, next_addr, next_lines, lines_per_chunk):
    """The s·B·t of chunk's outputs (rows chunk·CHUNK_ROWS …), and the chunk's share of next A's lines."""
    if next_lines:
        low_rank.prefetch_lines(next_addr, chunk * lines_per_chunk, min((chunk + 1) * lines_per_chunk, next_lines))
    first = chunk * CHUNK_ROWS
    low_rank.add_rank_columns(t_addr, rank, b_addr + chunk * chunk_bytes, min(CHUNK_ROWS, n_rows - first),
                              out_addr + 4 * first)


@njit(nogil=True, cache=True, inline="always")
def _chunks_with_delta(kind, group, n_groups, row_addr, row_stride, records, nb, out_addr, n_rows, t_addr, rank,
                       b_addr, chunk_bytes, next_addr, next_lines, lines_per_chunk):
    """Chunk group `group` of CHUNK_ROWS-row chunks, W·x and then each chunk's delta: with SPREAD_ROWS, chunks
    group, group + n_groups … (one row of each per step: every stream runs through a chunk's rows in turn), else
    chunk `group` alone (its rows ROWS_PER_STEP at a time)."""
    if SPREAD_ROWS:
        for i in range(CHUNK_ROWS):
            r = group * CHUNK_ROWS + i
            _rows_dot(kind, row_addr + r * row_stride, n_groups * CHUNK_ROWS * row_stride, records, nb,
                      out_addr + 4 * r, 4 * n_groups * CHUNK_ROWS)
        for k in range(ROWS_PER_STEP):
            _chunk_delta(group + k * n_groups, n_rows, t_addr, rank, b_addr, chunk_bytes, out_addr, next_addr,
                         next_lines, lines_per_chunk)
        return
    first = group * CHUNK_ROWS
    end = min(first + CHUNK_ROWS, n_rows)
    whole = first + (end - first) // ROWS_PER_STEP * ROWS_PER_STEP
    for r in range(first, whole, ROWS_PER_STEP):
        _rows_dot(kind, row_addr + r * row_stride, row_stride, records, nb, out_addr + 4 * r, 4)
    for r in range(whole, end):
        _row_dot(kind, row_addr + r * row_stride, row_stride, records, nb, out_addr + 4 * r, 4)
    _chunk_delta(group, n_rows, t_addr, rank, b_addr, chunk_bytes, out_addr, next_addr, next_lines, lines_per_chunk)


@njit(nogil=True, cache=True, inline="always")
def _lone_chunk_with_delta(kind, chunk, row_addr, row_stride, records, nb, out_addr, n_rows, t_addr, rank, b_addr,
                           chunk_bytes, next_addr, next_lines, lines_per_chunk):
    """A chunk left over from the spread groups: its rows one at a time, then its delta."""
    for r in range(chunk * CHUNK_ROWS, min((chunk + 1) * CHUNK_ROWS, n_rows)):
        _row_dot(kind, row_addr + r * row_stride, row_stride, records, nb, out_addr + 4 * r, 4)
    _chunk_delta(chunk, n_rows, t_addr, rank, b_addr, chunk_bytes, out_addr, next_addr, next_lines, lines_per_chunk)


@njit(nogil=True, cache=True, inline="always")
def delta_walk(n_rows, a_next):
    """How a row loop with LoRA deltas walks n_rows rows (here and in int_columns.py, so that a batched column's
    sums are this kernel's): (n_chunks of CHUNK_ROWS rows, n_groups the parallel loop runs over (with SPREAD_ROWS
    ROWS_PER_STEP whole chunks each, else one chunk), lone: the first chunk left to run alone after the groups,
    next A's address, its 64-byte lines and each chunk's share of them to prefetch)."""
    n_chunks = (n_rows + CHUNK_ROWS - 1) // CHUNK_ROWS
    next_lines = (a_next.size * 4 + 63) // 64
    lines_per_chunk = (next_lines + n_chunks - 1) // n_chunks
    n_groups = n_rows // CHUNK_ROWS // ROWS_PER_STEP if SPREAD_ROWS else n_chunks
    lone = n_groups * ROWS_PER_STEP if SPREAD_ROWS else n_chunks
    return n_chunks, n_groups, lone, a_next.ctypes.data, next_lines, lines_per_chunk


@njit(parallel=True, nogil=True, cache=True)
def matvec(kind, data, x, out, a, packed_b, a_next, one_thread):
    """out = W·x (+ s·B·(a·x) when a has rows: a run-time LoRA delta, packed_b = low_rank.pack_scaled_b(s·B))
    for rows data uint8[n_rows, ≥ n_blocks·BLOCK_BYTES[kind]] of the driver kind (int_rows.Q4_0 ... Q6_K); False
    (out untouched) for an x the integer path does not take. A kind the caller passes as a literal (a global or
    closure constant) compiles that type's row loops alone (int_rows' kernels take the literal); a kind known only
    at run time compiles every type's, behind a switch.

    Without a delta the parallel loop runs over steps of ROWS_PER_STEP rows (int_rows.py says which). With one, it
    runs over chunks of 16 rows (with SPREAD_ROWS, groups of ROWS_PER_STEP chunks spread over the matrix), and each
    chunk adds its 16 outputs' s·B·t (t = a·x, formed first) right after its rows: s·B streams beside the weight, on every thread, instead of in a pass
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
        part = n_rows // ROWS_PER_STEP
        if one_thread:
            for g in range(part):
                _step(kind, g, part, row_addr, row_stride, records, nb, out_addr)
        else:
            for g in prange(part):
                _step(kind, g, part, row_addr, row_stride, records, nb, out_addr)
        for r in range(part * ROWS_PER_STEP, n_rows):
            _row_dot(kind, row_addr + r * row_stride, row_stride, records, nb, out_addr + 4 * r, 4)
        return buf.size > 0  # True; buf is used here so that it outlives the loop that reads it by address
    low_rank.check_factors(a, packed_b, x, out)
    t = np.empty(rank, dtype=np.float32)
    low_rank.rank_dots(a.ctypes.data, rank, x.ctypes.data, x.shape[0], t.ctypes.data)
    t_addr, b_addr, chunk_bytes = t.ctypes.data, packed_b.ctypes.data, 4 * low_rank.LANES * rank
    n_chunks, n_groups, lone, next_addr, next_lines, lines_per_chunk = delta_walk(n_rows, a_next)
    if one_thread:  # (an OpenMP loop of one thread here slowed tokens 4-7 times for seconds after loading)
        for group in range(n_groups):
            _chunks_with_delta(kind, group, n_groups, row_addr, row_stride, records, nb, out_addr, n_rows, t_addr,
                               rank, b_addr, chunk_bytes, next_addr, next_lines, lines_per_chunk)
        for chunk in range(lone, n_chunks):
            _lone_chunk_with_delta(kind, chunk, row_addr, row_stride, records, nb, out_addr, n_rows, t_addr, rank,
                                   b_addr, chunk_bytes, next_addr, next_lines, lines_per_chunk)
    else:
        for group in prange(n_groups):
            _chunks_with_delta(kind, group, n_groups, row_addr, row_stride, records, nb, out_addr, n_rows, t_addr,
                               rank, b_addr, chunk_bytes, next_addr, next_lines, lines_per_chunk)
        for chunk in prange(lone, n_chunks):
            _lone_chunk_with_delta(kind, chunk, row_addr, row_stride, records, nb, out_addr, n_rows, t_addr, rank,
                                   b_addr, chunk_bytes, next_addr, next_lines, lines_per_chunk)
    return buf.size + t.size > 0  # True; buf and t outlive the loop that reads them by address


@functools.cache
def _without_delta(kind: int):
    @njit(nogil=True, cache=True)
    def run(data, x, out):
        return matvec(kind, data, x, out, NO_FACTORS, NO_PACKED_B, NO_FACTORS, False)

    cache.follows(run, cache.KERNEL_SOURCES)
    return run


def matvec_without_delta(kind: int, data: np.ndarray, x: np.ndarray, out: np.ndarray) -> bool:
    """out = W·x for rows data uint8[n_rows, ≥ n_blocks·BLOCK_BYTES[kind]] of the driver kind (the K-quants' n_cols
    a multiple of 256); False (out untouched) for an x the integer path does not take. From Python: each kind's
    compiled function has its kind as a closure constant (a literal to matvec), so a call is no literal dispatch
    (numba types a `literally` argument from Python anew on every call: 4 ms)."""
    return _without_delta(int(kind))(data, x, out)


cache.follows(matvec, cache.KERNEL_SOURCES)
