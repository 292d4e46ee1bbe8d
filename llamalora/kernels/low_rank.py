"""Run-time LoRA deltas: out += s·B·(A·x), with the weight W left as it is on disk.

The factors stay float32: A [r, n_cols] as adapters store it, and s·B packed by 16 output rows,
float32[ceil(n_rows / 16)·r, 16] (`pack_scaled_b`): the r values of 16 consecutive outputs' rows of s·B lie side by
side in one contiguous KiB (for r = 16), and the chunks follow in output order. So the second half of a delta,
out[i] += Σ_k t[k]·(s·B)[i, k] with t = A·x, reads its factor front to back in steps of 16 outputs, and the
integer matrix × vector (intmatvec.py) can add it to each 16-row chunk of W·x inside its own parallel row loop, while
those rows are in registers and on both threads (a decoded token's deltas are bound by memory: an all-linear
r=16 adapter on SmolLM2 reads 19.5 MB of factors a token beside 94 MB of weights).

Plain numba loops over the factors left the four interleaved rank reductions scalar; these intrinsics keep
16-lane accumulators in registers and read each factor once.
"""

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import simd

LANES = 16       # outputs per chunk of packed s·B
DOT_ROWS = 4     # rows of A per pass over x
OUT_CHUNKS = 4   # chunks of outputs per pass over the ranks
# s·B is prefetched this far ahead of its reads: the hardware prefetchers alone left a cache miss at the start of
# most 1 KiB chunks once the chunks ride in the weight's row loop (SmolLM2 Q4_1, all-linear r=16, one thread:
# decode with / without the adapter 0.86 → 0.88; 1, 2 and 8 KB were measured, 8 KB gained nothing).
B_PREFETCH_BYTES = 2048


@intrinsic
def prefetch_lines(typingctx, address, first, end):
    """Prefetch the 64-byte lines first … end - 1 from address on into the second-level cache."""
    sig = types.none(types.intp, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        address, first, end = args
        base = builder.inttoptr(address, ir.IntType(8).as_pointer())
        with cgutils.for_range_slice(builder, first, end, ir.Constant(first.type, 1), intp=first.type) as (line, _):
            simd._prefetch(builder, builder.gep(base, [builder.mul(line, ir.Constant(line.type, 64))]), 2)
        return context.get_dummy_value()

    return sig, codegen


def pack_scaled_b(scaled_b: np.ndarray) -> np.ndarray:
    """s·B float32[n_rows, r] as float32[ceil(n_rows / 16)·r, 16]: chunk c holds rows 16c … 16c + 15 of s·B
    transposed ([r, 16]); the rows past n_rows are zeros."""
    n_rows, r = scaled_b.shape
    n_chunks = -(-n_rows // LANES)
    padded = np.zeros((n_chunks * LANES, r), dtype=np.float32)
    padded[:n_rows] = scaled_b
    return np.ascontiguousarray(padded.reshape(n_chunks, LANES, r).transpose(0, 2, 1).reshape(n_chunks * r, LANES))


def _vector(builder, base, byte_offset, width):
    return simd._load(builder, base, byte_offset, ir.VectorType(ir.FloatType(), width), 4)


def _scalar(builder, base, byte_offset):
    return builder.extract_element(_vector(builder, base, byte_offset, 1), ir.Constant(ir.IntType(32), 0))


def _emit_rows_dot(builder, a, row0, n_rows, xs, n, ts):
    """ts[j][row0 + i] = a[row0 + i, :] · xs[j] for i < n_rows and every column j (a float32[·, n] at the i8* a;
    xs[j], ts[j] float32 i8*): each A vector is loaded once for all the columns, and each column's sums are formed
    exactly as with that column alone."""
    intp = n.type
    c = lambda v: ir.Constant(intp, v)  # noqa: E731
    vf = ir.VectorType(ir.FloatType(), LANES)
    accs = [[cgutils.alloca_once_value(builder, ir.Constant(vf, [0.0] * LANES)) for _ in range(n_rows)] for _ in xs]
    rows = [builder.mul(builder.mul(builder.add(row0, c(i)), n), c(4)) for i in range(n_rows)]
    whole = builder.udiv(n, c(LANES))
    with cgutils.for_range(builder, whole, intp=intp) as loop:
        offset = builder.mul(loop.index, c(4 * LANES))
        avs = [_vector(builder, a, builder.add(row, offset), LANES) for row in rows]
        for x, column in zip(xs, accs):
            xv = _vector(builder, x, offset, LANES)
            for acc, av in zip(column, avs):
                builder.store(simd._fmuladd(builder, av, xv, builder.load(acc)), acc)
    sums = [[cgutils.alloca_once_value(builder, simd._reduce(builder, builder.load(acc))) for acc in column]
            for column in accs]
    with cgutils.for_range_slice(builder, builder.mul(whole, c(LANES)), n, c(1), intp=intp) as (j, _):
        offset = builder.mul(j, c(4))
        ajs = [_scalar(builder, a, builder.add(row, offset)) for row in rows]
        for x, column in zip(xs, sums):
            xj = _scalar(builder, x, offset)
            for acc, aj in zip(column, ajs):
                builder.store(builder.fadd(builder.fmul(aj, xj), builder.load(acc)), acc)
    for t, column in zip(ts, sums):
        for i, acc in enumerate(column):
            ptr = builder.gep(t, [builder.mul(builder.add(row0, c(i)), c(4))])
            builder.store(builder.load(acc), builder.bitcast(ptr, ir.FloatType().as_pointer()))


def _five_argument_intrinsic(emit, addresses):
    """An intrinsic of five intp arguments returning nothing: emit(builder, *args) with the arguments at the
    positions `addresses` turned into i8* pointers."""

    def typer(typingctx, a0, a1, a2, a3, a4):
        def codegen(context, builder, signature, values):
            i8p = ir.IntType(8).as_pointer()
            emit(builder, *(builder.inttoptr(v, i8p) if i in addresses else v for i, v in enumerate(values)))
            return context.get_dummy_value()

        return types.none(*[types.intp] * 5), codegen

    typer.__name__ = emit.__name__
    return intrinsic(typer)


def _rank_dots(builder, a, r, xs, n, ts):
    intp = n.type
    groups = builder.udiv(r, ir.Constant(intp, DOT_ROWS))
    with cgutils.for_range(builder, groups, intp=intp) as loop:
        _emit_rows_dot(builder, a, builder.mul(loop.index, ir.Constant(intp, DOT_ROWS)), DOT_ROWS, xs, n, ts)
    with cgutils.for_range_slice(builder, builder.mul(groups, ir.Constant(intp, DOT_ROWS)), r,
                                 ir.Constant(intp, 1), intp=intp) as (k, _):
        _emit_rows_dot(builder, a, k, 1, xs, n, ts)


# rank_dots(a_addr, r, x_addr, n, t_addr): t[k] = a[k, :] · x for k < r: a float32[r, n] at a_addr (C order),
# x float32[n], t float32[r]; DOT_ROWS rows share each load of x, each row's sum in 16 lanes, halved at the end,
# then the n % 16 tail.
def _rank_dots_1(builder, a, r, x, n, t):
    _rank_dots(builder, a, r, [x], n, [t])


rank_dots = _five_argument_intrinsic(_rank_dots_1, (0, 2, 4))


def _rank_dots_of(n_columns):
    """rank_dots for n_columns activations at once: (a_addr, r, x_table, n, t_table), column j's x and t at the
    addresses x_table[j] and t_table[j] (int64 arrays); A is read once for them all, each column's t as rank_dots
    forms it."""

    def emit(builder, a, r, x_table, n, t_table):
        i64p = ir.IntType(64).as_pointer()
        i8p = ir.IntType(8).as_pointer()

        def column(table, j):
            ptr = builder.gep(builder.bitcast(table, i64p), [ir.Constant(ir.IntType(32), j)])
            return builder.inttoptr(builder.load(ptr), i8p)

        _rank_dots(builder, a, r, [column(x_table, j) for j in range(n_columns)], n,
                   [column(t_table, j) for j in range(n_columns)])

    emit.__name__ = f"rank_dots_{n_columns}"
    return _five_argument_intrinsic(emit, (0, 2, 4))


_rank_dots_2, _rank_dots_3, _rank_dots_4 = (_rank_dots_of(k) for k in (2, 3, 4))


@njit(nogil=True, cache=True)
def rank_dots_columns(a_addrs, ranks, X, columns, t):
    """t[i, :ranks[i]] = A_i · X[columns[i]] for every i with a rank, A_i float32[ranks[i], n] at a_addrs[i]: the
    columns of one A (the same address and rank) share each pass over it, four at a time (run-time LoRA deltas of a
    batch: the sequences of one adapter, at any scale)."""
    n = X.shape[1]
    m = a_addrs.shape[0]
    done = np.zeros(m, dtype=np.bool_)
    x_table = np.zeros(4, dtype=np.int64)
    t_table = np.zeros(4, dtype=np.int64)
    for i in range(m):
        if done[i] or ranks[i] == 0:
            continue
        k = 0
        for j in range(i, m):
            if not done[j] and a_addrs[j] == a_addrs[i] and ranks[j] == ranks[i]:
                done[j] = True
                x_table[k], t_table[k] = X[columns[j]].ctypes.data, t[j].ctypes.data
                k += 1
                if k == 4:
                    _rank_dots_group(k, a_addrs[i], ranks[i], x_table, n, t_table)
                    k = 0
        if k:
            _rank_dots_group(k, a_addrs[i], ranks[i], x_table, n, t_table)


@njit(nogil=True, cache=True, inline="always")
def _rank_dots_group(k, a_addr, r, x_table, n, t_table):
    if k == 4:
        _rank_dots_4(a_addr, r, x_table.ctypes.data, n, t_table.ctypes.data)
    elif k == 3:
        _rank_dots_3(a_addr, r, x_table.ctypes.data, n, t_table.ctypes.data)
    elif k == 2:
        _rank_dots_2(a_addr, r, x_table.ctypes.data, n, t_table.ctypes.data)
    else:
        rank_dots(a_addr, r, x_table[0], n, t_table[0])


def _emit_rank_columns(builder, t, r, packed, out, col, width):
    """out[col : col + width] += Σ_k t[k]·(s·B)[col : col + width, k] (width = 16·chunks from a chunk's start, or
    1), in rank order, from packed s·B (pack_scaled_b) at the i8* packed."""
    intp = r.type
    c = lambda v: ir.Constant(intp, v)  # noqa: E731
    lanes = min(width, LANES)
    vf = ir.VectorType(ir.FloatType(), lanes)
    accs = [cgutils.alloca_once_value(builder, ir.Constant(vf, [0.0] * lanes)) for _ in range(width // lanes)]
    chunk, lane = builder.udiv(col, c(LANES)), builder.urem(col, c(LANES))
    chunk_bytes = builder.mul(r, c(4 * LANES))
    base = builder.add(builder.mul(chunk, chunk_bytes), builder.mul(lane, c(4)))
    with cgutils.for_range(builder, r, intp=intp) as loop:
        k = loop.index
        tv = simd._splat(builder, _scalar(builder, t, builder.mul(k, c(4))), lanes)
        row = builder.add(base, builder.mul(k, c(4 * LANES)))
        for h, acc in enumerate(accs):
            offset = builder.add(row, builder.mul(chunk_bytes, c(h)))
            if width > 1:
                simd._prefetch(builder, builder.gep(packed, [builder.add(offset, c(B_PREFETCH_BYTES))]))
            b = _vector(builder, packed, offset, lanes)
            builder.store(simd._fmuladd(builder, tv, b, builder.load(acc)), acc)
    for h, acc in enumerate(accs):
        ptr = builder.bitcast(builder.gep(out, [builder.mul(builder.add(col, c(lanes * h)), c(4))]), vf.as_pointer())
        builder.store(builder.fadd(builder.load(ptr, align=4), builder.load(acc)), ptr, align=4)


def _add_rank_columns(builder, t, r, packed, n, out):
    intp = n.type
    c = lambda v: ir.Constant(intp, v)  # noqa: E731
    step = LANES * OUT_CHUNKS
    wide_end = builder.mul(builder.udiv(n, c(step)), c(step))
    with cgutils.for_range_slice(builder, c(0), wide_end, c(step), intp=intp) as (col, _):
        _emit_rank_columns(builder, t, r, packed, out, col, step)
    chunk_end = builder.mul(builder.udiv(n, c(LANES)), c(LANES))
    with cgutils.for_range_slice(builder, wide_end, chunk_end, c(LANES), intp=intp) as (col, _):
        _emit_rank_columns(builder, t, r, packed, out, col, LANES)
    with cgutils.for_range_slice(builder, chunk_end, n, c(1), intp=intp) as (col, _):
        _emit_rank_columns(builder, t, r, packed, out, col, 1)


# add_rank_columns(t_addr, r, packed_addr, n, out_addr): out[i] += Σ_k t[k]·(s·B)[i, k] for i < n, s·B packed
# (pack_scaled_b) at packed_addr, t float32[r]. Each output's sum over the ranks is formed apart (rank order) and
# added to out once; OUT_CHUNKS chunks of 16 outputs share each pass over the ranks.
add_rank_columns = _five_argument_intrinsic(_add_rank_columns, (0, 2, 4))


@njit(nogil=True, cache=True)
def check_factors(a, packed_b, x, out):
    """Raise unless a [r, n_cols], packed_b (pack_scaled_b of an [n_rows, r] s·B), x [n_cols] and out [n_rows] are
    C-contiguous float32 of matching shapes (the intrinsics read them by address, without bounds)."""
    r, n_cols = a.shape
    # (a rank-1 factor's row stride is free: numpy calls such an array C-contiguous whatever it says)
    if (packed_b.shape != ((out.shape[0] + LANES - 1) // LANES * r, LANES) or x.shape[0] != n_cols
            or a.strides[1] != 4 or (r > 1 and a.strides[0] != 4 * n_cols) or packed_b.strides != (4 * LANES, 4)
            or x.strides[0] != 4 or out.strides[0] != 4):
        raise ValueError("low-rank factors, x and out must be C-contiguous float32 of matching shapes")


@njit(nogil=True, cache=True)
def add_low_rank_matvec(a, packed_b, x, out):
    """out += s·B·(a @ x) for one token x float32[n_cols]: a run-time LoRA delta, a [r, n_cols] and s·B packed
    by pack_scaled_b. One thread: a delta is small (r·(n_rows + n_cols) values) and a parallel launch per delta
    would cost more than it saves (intmatvec.matvec adds it inside the weight's own parallel loop instead)."""
    check_factors(a, packed_b, x, out)
    r = a.shape[0]
    t = np.empty(r, dtype=np.float32)
    rank_dots(a.ctypes.data, r, x.ctypes.data, a.shape[1], t.ctypes.data)
    add_rank_columns(t.ctypes.data, r, packed_b.ctypes.data, out.shape[0], out.ctypes.data)


@njit(parallel=True, nogil=True, cache=True)
def add_low_rank_matmul(a, packed_b, X, out):
    """out[t] += s·B·(a @ X[t]) for a batch X float32[b, n_cols], the tokens split among the threads.
    Compiled rather than numpy's BLAS, whose own thread pool (sized to the machine, not to -t) spins beside the
    kernels' threads: with the other core busy, a 64-token SmolLM2 prompt with an all-linear adapter at -t 1 took
    0.9-1.2 s through BLAS and 0.19 s here (0.175 s without the adapter)."""
    for t in prange(X.shape[0]):
        add_low_rank_matvec(a, packed_b, X[t], out[t])
