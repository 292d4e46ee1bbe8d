"""Matrix × a few vectors by the integer kernels: a batched decode step reads each weight row once for all its
sequences.

Decode is bound by reading the weights: one token of SmolLM2 streams its ~100 MB of blocks through the integer dot
products of intmatvec.py. A step over several sequences (llamalora/batch.py) has one activation per sequence; here
every step of rows is loaded once and multiplied with up to COLUMNS activations while it is in registers, and with
the next group of activations from L1 after that. Each column goes through exactly the instruction set's step code
and reduction (int_rows.make_rows_columns_dot), and the rows are walked as intmatvec.matvec walks them (adjacent or
spread over the matrix, int_rows.SPREAD_ROWS), so its outputs are intmatvec.matvec's bit for bit, whatever the
other columns are: a sequence's logits in a batch are its logits alone.

Run-time LoRA deltas ride along as in intmatvec.matvec, column by column: each column j may carry its own factors
(A_j, packed s_j·B_j), given as a table of addresses (the rows of decode's LoRA tables). t_j = A_j·x_j is formed
before the row loop, sharing each load of A among the columns whose A is the same array
(low_rank.rank_dots_columns: the same sums as rank_dots, per column); inside the loop, each 16-row chunk adds every
column's s_j·B_j·t_j to its outputs (low_rank.add_rank_columns), so the columns of one adapter at different scales
share the step and A, each reading its own s·B (the scale is folded into B).

A column whose activation the integer path declines (an extreme value) is left untouched and reported, for the
caller to take the portable kernel (columns.matvec_columns).
"""

import numpy as np
from numba import njit, prange

from . import cache, low_rank
from .intmatvec import (BLOCK_BYTES, BLOCK_VALUES, CHUNK_ROWS, KERNELS, LAYOUTS, ROWS_PER_STEP, SPREAD_ROWS,
                        delta_walk)

COLUMNS = 4  # activations per pass over a step's rows: 2-4 rows × 4 columns of accumulators fill the registers
_step_1, _step_2, _step_4 = (KERNELS.rows_columns_dot(ROWS_PER_STEP, n) for n in (1, 2, 4))
_row_1 = KERNELS.rows_columns_dot(1, 1)  # a last row outside the steps, column by column
_quantize_activation = KERNELS.quantize_activation
LORA_FIELDS = 6  # (address, rows, cols) of A, then of packed s·B, per column (decode.LayerPlan.lora_table's rows)


@njit(nogil=True, cache=True)
def _step_group(n_columns, kind, row_addr, row_stride, records, nb, outs, out_offset, out_stride):
    """ROWS_PER_STEP rows of W × n_columns activations (1-4; three as two and one: a kernel less to compile)."""
    if n_columns == 4:
        _step_4(kind, row_addr, row_stride, records, nb, outs, out_offset, out_stride)
        return
    if n_columns >= 2:
        _step_2(kind, row_addr, row_stride, records, nb, outs, out_offset, out_stride)
    if n_columns != 2:
        done = 2 if n_columns == 3 else 0
        _step_1(kind, row_addr, row_stride, records + 8 * done, nb, outs + 8 * done, out_offset, out_stride)


@njit(nogil=True, cache=True)
def _step(kind, row_addr, row_stride, records, nb, outs, n_columns, out_offset, out_stride):
    """One step of ROWS_PER_STEP rows (row_stride apart, their outputs out_stride apart) times every column, in
    groups of COLUMNS."""
    for g in range(0, n_columns, COLUMNS):
        _step_group(min(COLUMNS, n_columns - g), kind, row_addr, row_stride, records + 8 * g, nb, outs + 8 * g,
                    out_offset, out_stride)


@njit(nogil=True, cache=True)
def _rows_alone(kind, row_addr, row_stride, records, nb, outs, n_columns, first, end):
    """Rows first … end - 1, one at a time, times every column."""
    for r in range(first, end):
        for j in range(n_columns):
            _row_1(kind, row_addr + r * row_stride, row_stride, records + 8 * j, nb, outs + 8 * j, 4 * r, 4)


@njit(nogil=True, cache=True)
def _steps(kind, g, part, row_addr, row_stride, records, nb, outs, n_columns):
    """Step g over the first ROWS_PER_STEP·part rows, as intmatvec's _step walks them."""
    if SPREAD_ROWS:
        _step(kind, row_addr + g * row_stride, part * row_stride, records, nb, outs, n_columns, 4 * g, 4 * part)
    else:
        r = g * ROWS_PER_STEP
        _step(kind, row_addr + r * row_stride, row_stride, records, nb, outs, n_columns, 4 * r, 4)


@njit(nogil=True, cache=True)
def _chunk_deltas(chunk, n_rows, n_columns, t_addrs, ranks, b_addrs, outs, next_addr, next_lines, lines_per_chunk):
    """Every column's s·B·t on chunk's outputs (rows chunk·CHUNK_ROWS …), and the chunk's share of next A's lines."""
    if next_lines:
        low_rank.prefetch_lines(next_addr, chunk * lines_per_chunk, min((chunk + 1) * lines_per_chunk, next_lines))
    first = chunk * CHUNK_ROWS
    for j in range(n_columns):
        if ranks[j]:
            low_rank.add_rank_columns(t_addrs[j], ranks[j], b_addrs[j] + chunk * 4 * low_rank.LANES * ranks[j],
                                      min(CHUNK_ROWS, n_rows - first), outs[j] + 4 * first)


@njit(nogil=True, cache=True)
def _chunks_with_deltas(kind, group, n_groups, row_addr, row_stride, records, nb, outs, n_columns, n_rows, t_addrs,
                        ranks, b_addrs, next_addr, next_lines, lines_per_chunk):
    """Chunk group `group` times every column, then each chunk's deltas (intmatvec's _chunks_with_delta's walk)."""
    outs_addr = outs.ctypes.data
    if SPREAD_ROWS:
        for i in range(CHUNK_ROWS):
            r = group * CHUNK_ROWS + i
            _step(kind, row_addr + r * row_stride, n_groups * CHUNK_ROWS * row_stride, records, nb, outs_addr,
                  n_columns, 4 * r, 4 * n_groups * CHUNK_ROWS)
        for k in range(ROWS_PER_STEP):
            _chunk_deltas(group + k * n_groups, n_rows, n_columns, t_addrs, ranks, b_addrs, outs, next_addr,
                          next_lines, lines_per_chunk)
        return
    first = group * CHUNK_ROWS
    end = min(first + CHUNK_ROWS, n_rows)
    whole = first + (end - first) // ROWS_PER_STEP * ROWS_PER_STEP
    for r in range(first, whole, ROWS_PER_STEP):
        _step(kind, row_addr + r * row_stride, row_stride, records, nb, outs_addr, n_columns, 4 * r, 4)
    _rows_alone(kind, row_addr, row_stride, records, nb, outs_addr, n_columns, whole, end)
    _chunk_deltas(group, n_rows, n_columns, t_addrs, ranks, b_addrs, outs, next_addr, next_lines, lines_per_chunk)


@njit(nogil=True, cache=True)
def _lone_chunk_with_deltas(kind, chunk, row_addr, row_stride, records, nb, outs, n_columns, n_rows, t_addrs, ranks,
                            b_addrs, next_addr, next_lines, lines_per_chunk):
    """A chunk left over from the spread groups: its rows one at a time, then its deltas."""
    first = chunk * CHUNK_ROWS
    _rows_alone(kind, row_addr, row_stride, records, nb, outs.ctypes.data, n_columns, first,
                min(first + CHUNK_ROWS, n_rows))
    _chunk_deltas(chunk, n_rows, n_columns, t_addrs, ranks, b_addrs, outs, next_addr, next_lines, lines_per_chunk)


@njit(nogil=True, cache=True)
def _columns_in(kind, data, X, out, lora):
    """What matvec_columns's loops read, prepared serially (in the parallel function numba would make each array
    fill a parallel region of its own): the columns the integer path takes, their records and output addresses,
    their ranks, and t_j = A_j·X[j] for those with a delta."""
    b, n = X.shape
    if data.strides[1] != 1 or X.strides[1] != 4 or out.strides[1] != 4:
        raise ValueError("kernel arrays need contiguous rows (data uint8, X and out float32)")
    if n % BLOCK_VALUES[kind] != 0 or data.shape[1] < n // BLOCK_VALUES[kind] * BLOCK_BYTES[kind]:
        raise ValueError("kernel arrays disagree in shape (data rows, x length)")
    if out.shape[0] != b or out.shape[1] != data.shape[0] or lora.shape[0] != b or lora.shape[1] < LORA_FIELDS:
        raise ValueError("kernel output or LoRA table has the wrong shape")
    n_rows = data.shape[0]
    ok = np.zeros(b, dtype=np.bool_)
    records = np.zeros(b, dtype=np.int64)  # of the columns taken, in order
    outs = np.zeros(b, dtype=np.int64)
    taken = np.zeros(b, dtype=np.int64)
    ranks = np.zeros(b, dtype=np.int64)
    buffers = []
    n_taken = 0
    for j in range(b):
        buf, rec, good = _quantize_activation(X[j], LAYOUTS[kind])
        buffers.append(buf)
        if good:
            ok[j] = True
            records[n_taken], outs[n_taken], taken[n_taken], ranks[n_taken] = rec, out[j].ctypes.data, j, lora[j, 1]
            n_taken += 1
    max_rank = 0
    for i in range(n_taken):
        max_rank = max(max_rank, ranks[i])
    t = np.zeros((n_taken, max_rank), dtype=np.float32)
    t_addrs = np.zeros(n_taken, dtype=np.int64)
    b_addrs = np.zeros(n_taken, dtype=np.int64)
    if max_rank:
        a_addrs = np.zeros(n_taken, dtype=np.int64)
        for i in range(n_taken):
            e = lora[taken[i]]
            t_addrs[i], a_addrs[i], b_addrs[i] = t[i].ctypes.data, e[0], e[3]
            if ranks[i] and (e[2] != n or e[4] != (n_rows + low_rank.LANES - 1) // low_rank.LANES * ranks[i]
                             or e[5] != low_rank.LANES):
                raise ValueError("low-rank factors do not fit the weight")
        low_rank.rank_dots_columns(a_addrs, ranks[:n_taken], X, taken[:n_taken], t)
    return ok, buffers, records, outs, n_taken, ranks, max_rank, t, t_addrs, b_addrs


@njit(nogil=True, cache=True, inline="always")
def _alive(buffers, records, outs, t):
    """True, after reading each array the loops read by address: numba frees an array after its last use in the
    function, so an array only whose address went into a loop could be freed, and its memory reused by the
    parallel loop's own allocations, while the loop still reads it (10 or 11 columns at two threads did: garbage
    activation records, a segfault)."""
    return len(buffers) + records.size + outs.size + t.size >= 0


@njit(parallel=True, nogil=True, cache=True)
def matvec_columns(kind, data, X, out, lora, a_next, one_thread):
    """out[j] = W·X[j] (+ s_j·B_j·(A_j·X[j]) where lora[j] has a rank: a run-time LoRA delta, lora[j] the
    (address, rows, cols) of A_j and of its packed s_j·B_j, zeros for none) for rows data uint8[n_rows,
    ≥ n_blocks·BLOCK_BYTES[kind]] of the driver kind (int_rows.Q4_0 ...); X float32[b, n_cols], out float32[b,
    n_rows]. Returns bool[b]: False for a column whose activation the integer path declines (out[j] untouched).
    a_next: the A the caller multiplies next (prefetched, as intmatvec.matvec); one_thread as there."""
    ok, buffers, records, outs, n_taken, ranks, max_rank, t, t_addrs, b_addrs = _columns_in(kind, data, X, out, lora)
    nb = X.shape[1] // 32
    row_addr, row_stride, n_rows = data.ctypes.data, data.strides[0], data.shape[0]
    records_addr, outs_addr = records.ctypes.data, outs.ctypes.data
    if max_rank == 0:
        part = n_rows // ROWS_PER_STEP
        if one_thread:
            for g in range(part):
                _steps(kind, g, part, row_addr, row_stride, records_addr, nb, outs_addr, n_taken)
        else:
            for g in prange(part):
                _steps(kind, g, part, row_addr, row_stride, records_addr, nb, outs_addr, n_taken)
        _rows_alone(kind, row_addr, row_stride, records_addr, nb, outs_addr, n_taken, part * ROWS_PER_STEP, n_rows)
        return ok if _alive(buffers, records, outs, t) else ok
    n_chunks, n_groups, lone, next_addr, next_lines, lines_per_chunk = delta_walk(n_rows, a_next)
    if one_thread:
        for group in range(n_groups):
            _chunks_with_deltas(kind, group, n_groups, row_addr, row_stride, records_addr, nb, outs, n_taken, n_rows,
                                t_addrs, ranks, b_addrs, next_addr, next_lines, lines_per_chunk)
        for chunk in range(lone, n_chunks):
            _lone_chunk_with_deltas(kind, chunk, row_addr, row_stride, records_addr, nb, outs, n_taken, n_rows,
                                    t_addrs, ranks, b_addrs, next_addr, next_lines, lines_per_chunk)
    else:
        for group in prange(n_groups):
            _chunks_with_deltas(kind, group, n_groups, row_addr, row_stride, records_addr, nb, outs, n_taken, n_rows,
                                t_addrs, ranks, b_addrs, next_addr, next_lines, lines_per_chunk)
        for chunk in prange(lone, n_chunks):
            _lone_chunk_with_deltas(kind, chunk, row_addr, row_stride, records_addr, nb, outs, n_taken, n_rows,
                                    t_addrs, ranks, b_addrs, next_addr, next_lines, lines_per_chunk)
    return ok if _alive(buffers, records, outs, t) else ok


for _function in (matvec_columns, low_rank.rank_dots_columns):
    cache.follows(_function, cache.KERNEL_SOURCES)
