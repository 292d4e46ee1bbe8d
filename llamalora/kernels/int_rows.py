"""What the integer row kernels share (vnni.py on AVX-512 VNNI, avx2.py on AVX2; intmatvec.py drives them): the
activation's block scales, rows streamed in steps, and the IR pieces the steps are made of.

Each instruction set keeps its own record of the activation (integers X = round(x / s) per block of 32, split into
limbs its multiply-adds take, with per-lane corrections and sums), built by its quantize_activation from
block_scales. make_rows_dot builds a kernel that runs a type's step (a block or block pair, a super-block) along
n_rows rows at once, each row's stream software-prefetched some bytes ahead (or not: each instruction set's
module says what it measured).
"""

from typing import Callable, NamedTuple

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import simd, target

X_MAX = 8355000          # |X| ≤ X_MAX < 2^23: VNNI's top limb stays in [-127, 127] (127·65793 = 8355711)
TINY, HUGE = 2.0 ** -100, 2.0 ** 100   # block magnitudes the integer path takes

# Kernel ids (their order indexes the tables below and every instruction set's table of steps)
Q4_0, Q4_1, Q8_0, Q4_K, Q6_K, Q5_0 = range(6)
BLOCK_BYTES = (18, 20, 34, 144, 210, 22)
BLOCK_VALUES = (32, 32, 32, 256, 256, 32)

_f32, _i8, _i32 = ir.FloatType(), ir.IntType(8), ir.IntType(32)


# --- IR helpers -------------------------------------------------------------------------------------

def load_at(builder, base, byte_offset, vtype, align):
    ptr = builder.gep(base, [byte_offset])
    return builder.load(builder.bitcast(ptr, vtype.as_pointer()), align=align)


def splat_i32(value, lanes=16):
    return ir.Constant(ir.VectorType(_i32, lanes), [value] * lanes)


def block_heads(builder, row, starts, n_halves):
    """float32 <2·n_halves> of the leading halves (d, or d and m) of the blocks at byte offsets `starts` of row."""
    head_type = ir.IntType(16 * n_halves)
    heads = ir.Constant(ir.VectorType(head_type, len(starts)), ir.Undefined)
    for j, start in enumerate(starts):
        heads = builder.insert_element(heads, load_at(builder, row, start, head_type, 1), ir.Constant(_i32, j))
    halves = builder.bitcast(heads, ir.VectorType(ir.HalfType(), len(starts) * n_halves))
    return builder.fpext(halves, ir.VectorType(_f32, len(starts) * n_halves))


def lanes_of(builder, v, indices):
    """<len(indices) x T> of v's elements at `indices` (one per lane)."""
    return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_i32, len(indices)), list(indices)))


# --- K-quant scales, decoded once per super-block ------------------------------------------------------

def _q4_k_code_tables():
    """Lane j < 8: sub-block j's 6-bit scale, lane 8 + j: its minimum, from the super-block's first 16 bytes h (d,
    dmin, 12 packed bytes; ggml's get_scale_min_k4): code = (h[a] >> shift & low) | (h[b] >> 6 << 4 & high)."""
    lanes = []
    for lane in range(16):
        j, minimum = lane % 8, 4 * (lane >= 8)
        if j < 4:   # bytes 4-7 scales, 8-11 minima, 6 bits
            lanes.append((4 + j + minimum, 0, 63, 0, 0))
        else:       # low 4 bits in the nibbles of bytes 12-15, the top two above the first eight's 6 bits
            lanes.append((8 + j, minimum, 15, j + minimum, 0x30))
    return [list(column) for column in zip(*lanes)]


def q4_k_scales_and_minima(builder, row, start):
    """<16 x float> of the Q4_K super-block at byte `start` of row: d·sc of its eight sub-blocks in lanes 0-7,
    dmin·m in lanes 8-15 (exact products: an 11-bit half times a 6-bit code)."""
    v16i = ir.VectorType(_i32, 16)
    a, shift, low, b, high = (ir.Constant(v16i, t) for t in _q4_k_code_tables())
    head = builder.zext(load_at(builder, row, start, ir.VectorType(_i8, 16), 1), v16i)
    code = builder.and_(builder.lshr(builder.shuffle_vector(head, head, a), shift), low)
    top = builder.shl(builder.lshr(builder.shuffle_vector(head, head, b), splat_i32(6)), splat_i32(4))
    code = builder.or_(code, builder.and_(top, high))
    d_dmin = lanes_of(builder, block_heads(builder, row, (start,), 2), [0] * 8 + [1] * 8)
    return builder.fmul(builder.uitofp(code, ir.VectorType(_f32, 16)), d_dmin)


def q6_k_scales(builder, row, start):
    """<16 x float> d·sc of the 16 sub-blocks of the Q6_K super-block at byte `start` of row (exact products)."""
    c = lambda v: ir.Constant(start.type, v)  # noqa: E731
    sc = builder.sext(load_at(builder, row, builder.add(start, c(192)), ir.VectorType(_i8, 16), 1),
                      ir.VectorType(_i32, 16))
    d = lanes_of(builder, block_heads(builder, row, (builder.add(start, c(208)),), 1), [0] * 16)
    return builder.fmul(builder.sitofp(sc, ir.VectorType(_f32, 16)), d)


# --- the activation's block scales ----------------------------------------------------------------------

@intrinsic
def _block_top_bits(typingctx, x_addr):
    """The largest of the 32 float32 magnitudes at x_addr, as int32 bits (bits order non-negative floats as
    their values; inf and NaN are above every finite value)."""
    sig = types.int32(types.intp)

    def codegen(context, builder, signature, args):
        v32i = ir.VectorType(_i32, 32)
        bits = builder.load(builder.inttoptr(args[0], v32i.as_pointer()), align=4)
        mag = builder.and_(bits, ir.Constant(v32i, [0x7FFFFFFF] * 32))
        umax = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_i32, [v32i]),
                                              "llvm.vector.reduce.umax.v32i32")
        return builder.call(umax, [mag])

    return sig, codegen


@njit(nogil=True, cache=True)
def block_scales(x, scale, top):
    """scale[b] = max|x| / X_MAX of each block of 32 (0 for a zero block), as float32, using top int32[≥ 1]
    (a scratch word seen as both int32 and float32 through top_as_float = top.view(float32)); False when a block's
    largest |x| is not finite or outside [TINY, HUGE]."""
    top_as_float = top.view(np.float32)
    for b in range(x.shape[0] // 32):
        scale[b] = 0
        top[0] = _block_top_bits(x.ctypes.data + 128 * b)
        if top[0] == 0:
            continue
        amax = np.float64(top_as_float[0])
        if not (TINY <= amax <= HUGE):  # also inf and NaN
            return False
        scale[b] = np.float32(amax / X_MAX)
    return True


# --- the row kernels -----------------------------------------------------------------------------------

# Decode streams the weights from memory once per token, and how best depends on the host's memory system
# (target.host_spreads_rows). On an AVX-512 Xeon the hardware prefetchers alone left the VNNI loop waiting on loads
# (half its in-cache speed); a software prefetch 8 KB ahead in each row and two adjacent rows per step (sharing each
# record load) doubled the streaming GB/s on one core (1-8 KB ahead and 1, 2, 4 rows per step were measured). On an
# AMD EPYC (Zen 4) adjacent rows confuse the prefetchers (each stream skips every other row): SmolLM2's Q8_0 token
# embedding read 9.4 GB/s on one core two adjacent rows a step 8 KB ahead, 6.0 without the prefetch, 14.4 one row
# at a time. There a step takes four rows spread over the matrix (rows g, g + n/4, g + n/2, g + 3n/4: four streams,
# each running on through its quarter), 1 KB ahead: 19.3 GB/s for that embedding, and rows too long for their
# records to stay in L1 gain most (the 1B-shaped Q4_0's 2048 × 5632 ffn_down: 4.4 GB/s one row at a time, 9.9
# spread; its 2048 × 2048 and 5632 × 2048 weights 10.1-10.4 either way; AVX2 kernels, random blocks, CPU time,
# alternated in one process; the VNNI kernels there: 6.4 and 11.4 GB/s for ffn_down). Intel hosts keep the Xeon's
# choice for both instruction sets.
ROWS_PER_STEP, PREFETCH_BYTES, SPREAD_ROWS = (4, 1024, True) if target.host_spreads_rows() else (2, 8192, False)


def prefetch_ahead(env, row, start, n_bytes):
    """Prefetch the n_bytes of row from byte `start` on, the kernel's prefetch distance ahead (one per 64-byte
    line; past a row's end that is the rows after it)."""
    builder, c, distance = env["builder"], env["c"], env["prefetch_bytes"]
    for offset in range(0, n_bytes, 64):
        simd._prefetch(builder, builder.gep(row, [builder.add(start, c(distance + offset))]))


class RowStep(NamedTuple):
    """A type's part of make_rows_dot's kernel: n_units(builder, c, nb) -> how many steps along the rows;
    unit(env, index, prefetch) emits one step for all rows (env: builder, c (an intp constant), nb, rows (i8*),
    records (i8*), acc[k][a] (float accumulators a of row k), prefetch_bytes, and what the kernel's prologue
    adds; prefetch: whether to prefetch_ahead the rows' bytes of this step); tail(env) what
    follows the loop (an odd last block); finish(builder, accumulators of a row) the row's lanes (default: their
    sum)."""
    n_accumulators: int
    n_units: Callable
    unit: Callable
    tail: Callable | None = None
    finish: Callable | None = None


def make_rows_dot(n_rows, steps, lanes, prefetch_bytes, prologue=None):
    """Intrinsic (kind, row_addr, row_stride, records_addr, nb, out_addr, out_stride) -> None: float32 at out_addr
    + k·out_stride = row k · x for n_rows rows (row k at row_addr + k·row_stride, strides in bytes) of nb blocks of
    32 values, x as the instruction set's records, by
    the RowStep steps[kind] (a switch on kind around the types' loops; another kind does nothing), in float
    accumulators of `lanes` lanes, each row's stream prefetched prefetch_bytes ahead (0: not at all).
    prologue(builder, c, records, nb) -> dict: entries added to every step's env (constants the steps load
    once)."""

    @intrinsic(prefer_literal=True)
    def rows_dot(typingctx, kind, row_addr, row_stride, records_addr, nb, out_addr, out_stride):
        sig = types.none(_kind_type(kind), *([types.intp] * 6))

        def codegen(context, builder, signature, args):
            kind, row_addr, row_stride, records_addr, nb, out_addr, out_stride = args
            _emit_rows_dot(builder, _steps_for(steps, signature.args[0]), lanes, prefetch_bytes, prologue, n_rows,
                           kind, row_addr, row_stride, [records_addr], nb, [out_addr], out_stride)
            return context.get_dummy_value()

        return sig, codegen

    return rows_dot


def make_rows_columns_dot(n_rows, n_columns, steps, lanes, prefetch_bytes, prologue=None):
    """Intrinsic (kind, row_addr, row_stride, records_table, nb, out_table, out_offset, out_stride) -> None:
    make_rows_dot's products for n_columns activations at once (a batched decode step's sequences): column j's
    records at the address records_table[j], its outputs from out_table[j] + out_offset (two int64 arrays of
    addresses; offset and stride in bytes). Every column gets make_rows_dot's step code in turn (the rows'
    prefetches with the first column only), so its sums are those of the one-column kernel, operation for
    operation; the rows' loads and unpacking, the same values for every column, are left to LLVM to share (its
    value numbering merges them: nothing is stored between them)."""

    @intrinsic(prefer_literal=True)
    def rows_columns_dot(typingctx, kind, row_addr, row_stride, records_table, nb, out_table, out_offset, out_stride):
        sig = types.none(_kind_type(kind), *([types.intp] * 7))

        def codegen(context, builder, signature, args):
            kind, row_addr, row_stride, records_table, nb, out_table, out_offset, out_stride = args
            intp = nb.type

            def column(table, j):
                return builder.load(builder.gep(builder.inttoptr(table, intp.as_pointer()), [ir.Constant(intp, j)]))

            records = [column(records_table, j) for j in range(n_columns)]
            outs = [builder.add(column(out_table, j), out_offset) for j in range(n_columns)]
            _emit_rows_dot(builder, _steps_for(steps, signature.args[0]), lanes, prefetch_bytes, prologue, n_rows,
                           kind, row_addr, row_stride, records, nb, outs, out_stride)
            return context.get_dummy_value()

        return sig, codegen

    return rows_columns_dot


def _kind_type(kind):
    """The kernels' kind argument as typed: a literal kind (a constant in the caller, or an argument numba
    compiles per value) keeps its literal type, so that the kernel is emitted for that kind alone."""
    return kind if isinstance(kind, types.IntegerLiteral) else types.intp


def _steps_for(steps, kind_type):
    """The steps a kernel emits for its kind argument's type: the literal kind's alone (the others None), every
    type's for a kind known only at run time. Emitting one type's loop rather than six is most of what a
    first run compiles for a model of one weight type."""
    if not isinstance(kind_type, types.IntegerLiteral):
        return steps
    return [step if k == kind_type.literal_value else None for k, step in enumerate(steps)]


def _emit_rows_dot(builder, steps, lanes, prefetch_bytes, prologue, n_rows, kind, row_addr, row_stride,
                   records_addrs, nb, out_addrs, out_stride):
    """The kernels' body: for each column j, the float32 at out_addrs[j] + k·out_stride = row k · (the activation
    whose records are at records_addrs[j]). The prologue's constants are read from the first column's records
    (they are the same in every record)."""
    intp = nb.type
    c = lambda v: ir.Constant(intp, v)  # noqa: E731
    rows = [builder.inttoptr(builder.add(row_addr, builder.mul(row_stride, c(k))), _i8.as_pointer())
            for k in range(n_rows)]
    records = [builder.inttoptr(a, _i8.as_pointer()) for a in records_addrs]
    shared = prologue(builder, c, records[0], nb) if prologue is not None else {}
    done = builder.append_basic_block("rows_dot.done")
    switch = builder.switch(kind, done)
    for k_index, step in enumerate(steps):
        if step is None:
            continue
        block = builder.append_basic_block(f"rows_dot.kind{k_index}")
        switch.add_case(c(k_index), block)
        builder.position_at_end(block)
        zero = ir.Constant(ir.VectorType(_f32, lanes), [0.0] * lanes)
        envs = [{"builder": builder, "c": c, "nb": nb, "rows": rows, "records": column_records,
                 "acc": [[cgutils.alloca_once_value(builder, zero) for _ in range(step.n_accumulators)]
                         for _ in range(n_rows)],
                 "prefetch_bytes": prefetch_bytes, **shared}
                for column_records in records]
        with cgutils.for_range(builder, step.n_units(builder, c, nb)) as loop:
            for j, env in enumerate(envs):
                step.unit(env, loop.index, prefetch_bytes > 0 and j == 0)
        if step.tail is not None:
            for env in envs:
                step.tail(env)
        for env, out_addr in zip(envs, out_addrs):
            for k in range(n_rows):
                accs = [builder.load(a) for a in env["acc"][k]]
                if step.finish is not None:
                    total = step.finish(builder, accs)
                else:
                    total = accs[0]
                    for a in accs[1:]:
                        total = builder.fadd(total, a)
                out = builder.inttoptr(builder.add(out_addr, builder.mul(out_stride, c(k))), _f32.as_pointer())
                builder.store(simd._reduce(builder, total), out)
        builder.branch(done)
    builder.position_at_end(done)


def minus_minima(builder, accs):
    """A RowStep finish: the first accumulator less the second (the K-quants' minima)."""
    return builder.fsub(accs[0], accs[1])
