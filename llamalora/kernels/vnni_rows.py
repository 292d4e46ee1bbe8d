"""What the VNNI kernels (vnni.py) share: the activation as limb records, and rows streamed in steps.

quantize_activation turns x float32[n] (n a multiple of 32) into one record per pair of 32-value blocks: the
three limbs of X = round(x / s) per value (in a layout's register order), the blocks' scales s per 32-bit lane,
the lanes' corrections for a weight offset and their sums of x (see the record description below).
make_rows_dot builds a kernel that runs a type's step (a block pair, a super-block) along n_rows rows at once,
each row's stream prefetched PREFETCH_BYTES ahead; the IR helpers are the pieces the steps are made of.
"""

from typing import Callable, NamedTuple

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import simd

N_LIMBS = 3
X_MAX = 8355000          # |X| ≤ X_MAX keeps the top limb in [-127, 127] (127·65793 = 8355711)
DIGIT_BIAS = 128 * 65793  # X + DIGIT_BIAS ≥ 0 has base-256 digits u; X's balanced digits are u - 128
TINY, HUGE = 2.0 ** -100, 2.0 ** 100   # block magnitudes the integer path takes
LAYOUT_Q4, LAYOUT_Q8, LAYOUT_K = 0, 1, 2
Q6_K_OFFSET = 32  # Q6_K's q - 32, taken out by LAYOUT_K's correction
# A block pair's record: limbs int8[N_LIMBS][64], lane scales float32[16], lane corrections int32[2][16],
# lane sums of x float32[16]. The corrections take the weight offset k out of the chained limb products: Q4
# layout (k = 8), one: -8·Σ of the lane's four X; Q8 layout (k = 128), -128·(Σ l0·256 + Σ l1) for the chained
# top limbs and -128·Σ l2 for the last; K layout (Q6_K's k = 32; Q4_K has none), one: -32·Σ of the lane's X.
# The K layout's sums part holds block sums instead (_put_block_sums).
SCALES_AT = 64 * N_LIMBS
CORRECTIONS_AT = SCALES_AT + 64
SUMS_AT = CORRECTIONS_AT + 64 * 2
PAIR_BYTES = SUMS_AT + 64

_f32, _i8, _i32 = ir.FloatType(), ir.IntType(8), ir.IntType(32)
_v16f, _v16i, _v64b = ir.VectorType(_f32, 16), ir.VectorType(_i32, 16), ir.VectorType(_i8, 64)


def register_order(layout):
    """For each byte of a pair register, its index among the pair's 64 activations (block 0's 32, then
    block 1's). Q4: [weights 0-15 of block 0, of block 1, weights 16-31 of block 0, of block 1] (the low
    nibbles of both blocks' 16 bytes, then the high ones); Q8 and K: block 0's 32 weights, then block 1's."""
    if layout == LAYOUT_Q4:
        return [(t // 16) % 2 * 32 + (t // 32) * 16 + t % 16 for t in range(64)]
    return list(range(64))


def lane_blocks(layout):
    """Which block of the pair each 32-bit lane (four bytes) of a pair register belongs to."""
    return [register_order(layout)[4 * lane] // 32 for lane in range(16)]


# --- IR helpers -------------------------------------------------------------------------------------

def dpbusd(builder, acc, unsigned_bytes, signed_bytes):
    """acc + Σ of four u8·s8 products per 32-bit lane (vpdpbusd, no saturation)."""
    fnty = ir.FunctionType(_v16i, [_v16i, _v64b, _v64b])
    fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.avx512.vpdpbusd.512")
    return builder.call(fn, [acc, unsigned_bytes, signed_bytes])


def load_at(builder, base, byte_offset, vtype, align):
    ptr = builder.gep(base, [byte_offset])
    return builder.load(builder.bitcast(ptr, vtype.as_pointer()), align=align)


def splat_i32(value):
    return ir.Constant(_v16i, [value] * 16)


TIMES_256_MASK = [-128 if t % 4 == 0 else t % 16 - 1 for t in range(64)]  # vpshufb: each byte one up in its lane


def times_256(builder, t, mask):
    """t·256 of int32 lanes (no overflow here) as a byte shuffle inside each lane: vpshufb runs on the
    shuffle port, beside the multiply-adds, where a shift would compete with them. The mask (TIMES_256_MASK)
    is read from memory, or LLVM turns the shuffle back into a shift."""
    fnty = ir.FunctionType(_v64b, [_v64b, _v64b])
    fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.avx512.pshuf.b.512")
    return builder.bitcast(builder.call(fn, [builder.bitcast(t, _v64b), mask]), _v16i)


def _lane_sums(builder, v):
    """<16 x T> sums of each four consecutive elements of a <64 x T> vector (lanes of a pair register)."""
    total = None
    for k in range(4):
        part = builder.shuffle_vector(v, v, ir.Constant(_v16i, list(range(k, 64, 4))))
        total = part if total is None else (builder.fadd(total, part) if isinstance(v.type.element, ir.FloatType)
                                            else builder.add(total, part))
    return total


# --- the activation as limbs --------------------------------------------------------------------------

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


def _make_quantize_pair(layout):
    """Intrinsic (x0_addr, x1_addr, inv0, inv1, s0, s1, record_addr) -> None: one pair record from the two
    blocks of 32 float32 at x0_addr and x1_addr (inv = 1/s; inv = 0 makes a block zero)."""
    k_offset = {LAYOUT_Q4: 8, LAYOUT_Q8: 128, LAYOUT_K: Q6_K_OFFSET}[layout]

    @intrinsic
    def quantize_pair(typingctx, x0_addr, x1_addr, inv0, inv1, s0, s1, record_addr):
        sig = types.none(types.intp, types.intp, types.float64, types.float64, types.float32, types.float32,
                         types.intp)

        def codegen(context, builder, signature, args):
            x0_addr, x1_addr, inv0, inv1, s0, s1, record_addr = args
            v32f, v32d, v32i = ir.VectorType(_f32, 32), ir.VectorType(ir.DoubleType(), 32), ir.VectorType(_i32, 32)
            v64i = ir.VectorType(_i32, 64)
            rint = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v32d, [v32d]), "llvm.rint.v32f64")
            ys, xs = [], []
            for addr, inv in ((x0_addr, inv0), (x1_addr, inv1)):
                x = builder.load(builder.inttoptr(addr, v32f.as_pointer()), align=4)
                zero = builder.fcmp_ordered("==", inv, ir.Constant(inv.type, 0.0))
                xs.append(builder.select(zero, ir.Constant(v32f, [0.0] * 32), x))
                q = builder.fptosi(builder.call(rint, [builder.fmul(builder.fpext(x, v32d),
                                                                    simd._splat(builder, inv, 32))]), v32i)
                ys.append(builder.add(q, ir.Constant(v32i, [DIGIT_BIAS] * 32)))
            order = ir.Constant(v64i, register_order(layout))
            y = builder.shuffle_vector(ys[0], ys[1], order)
            rec = builder.inttoptr(record_addr, _i8.as_pointer())

            def store(value, offset):
                ptr = builder.gep(rec, [ir.Constant(_i32, offset)])
                builder.store(value, builder.bitcast(ptr, value.type.as_pointer()), align=64)

            limb_sums = []
            for i in range(N_LIMBS):
                u = builder.and_(builder.lshr(y, ir.Constant(v64i, [8 * (N_LIMBS - 1 - i)] * 64)),
                                 ir.Constant(v64i, [255] * 64))
                store(builder.trunc(builder.xor(u, ir.Constant(v64i, [128] * 64)), _v64b), 64 * i)
                limb_sums.append(_lane_sums(builder, builder.sub(u, ir.Constant(v64i, [128] * 64))))
            if layout != LAYOUT_Q8:  # Σ of the lane's X, from its limbs
                corrections = [builder.add(builder.mul(builder.add(builder.mul(limb_sums[0], splat_i32(256)),
                                                                   limb_sums[1]), splat_i32(256)), limb_sums[2])]
            else:
                corrections = [builder.add(builder.mul(limb_sums[0], splat_i32(256)), limb_sums[1]), limb_sums[2]]
            for i, correction in enumerate(corrections):
                store(builder.mul(correction, splat_i32(-k_offset)), CORRECTIONS_AT + 64 * i)
            v2f = ir.VectorType(_f32, 2)
            ss = builder.insert_element(ir.Constant(v2f, ir.Undefined), s0, ir.Constant(_i32, 0))
            ss = builder.insert_element(ss, s1, ir.Constant(_i32, 1))
            store(builder.shuffle_vector(ss, ss, ir.Constant(_v16i, lane_blocks(layout))), SCALES_AT)
            store(_lane_sums(builder, builder.shuffle_vector(xs[0], xs[1], order)), SUMS_AT)
            return context.get_dummy_value()

        return sig, codegen

    return quantize_pair


MASK_BYTES = np.array(TIMES_256_MASK, dtype=np.int8).view(np.uint8)
_quantize_pair_q4 = _make_quantize_pair(LAYOUT_Q4)
_quantize_pair_q8 = _make_quantize_pair(LAYOUT_Q8)
_quantize_pair_k = _make_quantize_pair(LAYOUT_K)


@njit(nogil=True, cache=True)
def quantize_activation(x, layout):
    """(buffer, address of the first record, ok): per block pair a record of PAIR_BYTES, 64-byte aligned,
    in the layout's register order (see the record description above SCALES_AT), then TIMES_256_MASK.
    A missing last block is zero.
    ok is False when a block's largest |x| is not finite or outside [TINY, HUGE]."""
    nb = x.shape[0] // 32
    n_pairs = (nb + 1) // 2
    buf = np.empty(n_pairs * PAIR_BYTES + 128 + 16 * n_pairs, dtype=np.uint8)
    start = (-buf.ctypes.data) % 64
    end = start + n_pairs * PAIR_BYTES
    buf[end:end + 64] = MASK_BYTES
    scratch = buf[end + 64:end + 64 + 16 * n_pairs]
    scale = scratch[:8 * n_pairs].view(np.float32)  # 2 per pair
    top = scratch[8 * n_pairs:12 * n_pairs].view(np.int32)
    top_as_float = scratch[8 * n_pairs:12 * n_pairs].view(np.float32)
    scale[:] = 0
    for b in range(nb):
        top[0] = _block_top_bits(x.ctypes.data + 128 * b)
        if top[0] == 0:
            continue
        amax = np.float64(top_as_float[0])
        if not (TINY <= amax <= HUGE):  # also inf and NaN
            return buf, 0, False
        scale[b] = np.float32(amax / X_MAX)
    for p in range(n_pairs):
        x0 = x.ctypes.data + 256 * p
        x1 = x0 + 128 if 2 * p + 1 < nb else x0
        s0, s1 = scale[2 * p], scale[2 * p + 1]
        inv0 = 1.0 / np.float64(s0) if s0 != 0 else 0.0
        inv1 = 1.0 / np.float64(s1) if s1 != 0 else 0.0
        record = buf.ctypes.data + start + p * PAIR_BYTES
        if layout == LAYOUT_Q4:
            _quantize_pair_q4(x0, x1, inv0, inv1, s0, s1, record)
        elif layout == LAYOUT_Q8:
            _quantize_pair_q8(x0, x1, inv0, inv1, s0, s1, record)
        else:
            _quantize_pair_k(x0, x1, inv0, inv1, s0, s1, record)
            _put_block_sums(x, p, buf[start + p * PAIR_BYTES + SUMS_AT:start + (p + 1) * PAIR_BYTES].view(np.float32))
    return buf, buf.ctypes.data + start, True


@njit(nogil=True, cache=True)
def _put_block_sums(x, p, sums):
    """The K layout's sums part of pair p: its two blocks' sums of x (each rounded once, from float64) at lanes
    8 + 2·(p mod 4) and the next, zero elsewhere: a super-block's four records add up (exactly) to its eight
    block sums in lanes 8-15, beside Q4_K's minima."""
    sums[:] = 0
    for half in range(2):
        total = 0.0
        for j in range(64 * p + 32 * half, 64 * p + 32 * half + 32):
            total += np.float64(x[j])
        sums[8 + 2 * (p % 4) + half] = np.float32(total)


# --- the row kernels -----------------------------------------------------------------------------------

# Decode streams the weights from memory once per token. The hardware prefetchers alone leave the loop waiting on
# loads (half its in-cache speed); a software prefetch 8 KB ahead in each row (past the row's end: the next rows,
# which follow in memory) and two rows per step (sharing each record load) doubled the streaming GB/s on one
# core. 1-8 KB ahead and 1, 2, 4 rows per step were measured; 2 rows 8 KB ahead was best.
PREFETCH_BYTES = 8192
ROWS_PER_STEP = 2


def prefetch_ahead(builder, c, row, start, n_bytes):
    """Prefetch the n_bytes of row from byte `start` on, PREFETCH_BYTES ahead (one per 64-byte line)."""
    for offset in range(0, n_bytes, 64):
        simd._prefetch(builder, builder.gep(row, [builder.add(start, c(PREFETCH_BYTES + offset))]))


def chained_limbs(builder, w, limb, mask):
    """Σ w·X per lane from unsigned bytes w and the activation's limbs, ((Σw·l0)·256 + Σw·l1)·256 + Σw·l2:
    exact modulo 2^32 (every step wraps, so the result is exact whenever the true Σ w·X fits in int32)."""
    t = dpbusd(builder, splat_i32(0), w, limb[0])
    for i in range(1, N_LIMBS):
        t = dpbusd(builder, times_256(builder, t, mask), w, limb[i])
    return t


def record_part(builder, c, records, pair_index, offset, vtype):
    """A 64-byte part of the pair record pair_index (offset 0, 64, 128: the limbs; SCALES_AT ...)."""
    return load_at(builder, records, builder.add(builder.mul(pair_index, c(PAIR_BYTES)), c(offset)), vtype, 64)


class RowStep(NamedTuple):
    """A type's part of make_rows_dot's kernel: n_units(builder, c, nb) -> how many steps along the rows;
    unit(env, index, prefetch) emits one step for all rows (env: builder, c (an intp constant), nb, rows (i8*),
    records (i8*), mask (TIMES_256_MASK), acc[k][a] (float <16 x f32> accumulators a of row k)); tail(env) what
    follows the loop (an odd last block); finish(builder, accumulators of a row) the row's 16 lanes (default:
    their sum)."""
    n_accumulators: int
    n_units: Callable
    unit: Callable
    tail: Callable | None = None
    finish: Callable | None = None


def make_rows_dot(n_rows, steps):
    """Intrinsic (kind, row_addr, row_stride, records_addr, nb, out_addr) -> None: out[k] = row k · x for n_rows
    rows (row k at row_addr + k·row_stride) of nb blocks of 32 values, x as quantize_activation's records, by
    the RowStep steps[kind] (a switch on kind around the types' loops; another kind does nothing)."""

    @intrinsic
    def rows_dot(typingctx, kind, row_addr, row_stride, records_addr, nb, out_addr):
        sig = types.none(types.intp, types.intp, types.intp, types.intp, types.intp, types.intp)

        def codegen(context, builder, signature, args):
            kind, row_addr, row_stride, records_addr, nb, out_addr = args
            _emit_rows_dot(builder, steps, n_rows, kind, row_addr, row_stride, [records_addr], nb, [out_addr])
            return context.get_dummy_value()

        return sig, codegen

    return rows_dot


def make_rows_columns_dot(n_rows, n_columns, steps):
    """Intrinsic (kind, row_addr, row_stride, records_table, nb, out_table, out_offset) -> None: make_rows_dot's
    products for n_columns activations at once: column j's records at the address records_table[j], its outputs
    at out_table[j] + out_offset (two int64 arrays of addresses; the offset in bytes). Every column gets the step
    code of make_rows_dot in turn (the rows' prefetches with the first column only), so its sums are those of the
    one-column kernel, operation for operation; the rows' loads and unpacking, the same values for every column,
    are left to LLVM to share (its value numbering merges them: nothing is stored between them)."""

    @intrinsic
    def rows_columns_dot(typingctx, kind, row_addr, row_stride, records_table, nb, out_table, out_offset):
        sig = types.none(*[types.intp] * 7)

        def codegen(context, builder, signature, args):
            kind, row_addr, row_stride, records_table, nb, out_table, out_offset = args
            intp = nb.type

            def column(table, j):
                return builder.load(builder.gep(builder.inttoptr(table, intp.as_pointer()), [ir.Constant(intp, j)]))

            records = [column(records_table, j) for j in range(n_columns)]
            outs = [builder.add(column(out_table, j), out_offset) for j in range(n_columns)]
            _emit_rows_dot(builder, steps, n_rows, kind, row_addr, row_stride, records, nb, outs)
            return context.get_dummy_value()

        return sig, codegen

    return rows_columns_dot


def _emit_rows_dot(builder, steps, n_rows, kind, row_addr, row_stride, records_addrs, nb, out_addrs):
    """The body of the kernels above: for each column j, out_addrs[j][k] = row k · (the activation whose records
    are at records_addrs[j])."""
    intp = nb.type
    c = lambda v: ir.Constant(intp, v)  # noqa: E731
    rows = [builder.inttoptr(builder.add(row_addr, builder.mul(row_stride, c(k))), _i8.as_pointer())
            for k in range(n_rows)]
    records = [builder.inttoptr(a, _i8.as_pointer()) for a in records_addrs]
    n_pairs = builder.lshr(builder.add(nb, c(1)), c(1))
    mask = load_at(builder, records[0], builder.mul(n_pairs, c(PAIR_BYTES)), _v64b, 64)
    outs = [builder.inttoptr(a, _f32.as_pointer()) for a in out_addrs]
    done = builder.append_basic_block("rows_dot.done")
    switch = builder.switch(kind, done)
    for k_index, step in enumerate(steps):
        block = builder.append_basic_block(f"rows_dot.kind{k_index}")
        switch.add_case(c(k_index), block)
        builder.position_at_end(block)
        zero = ir.Constant(_v16f, [0.0] * 16)
        envs = [{"builder": builder, "c": c, "nb": nb, "rows": rows, "records": column_records, "mask": mask,
                 "acc": [[cgutils.alloca_once_value(builder, zero) for _ in range(step.n_accumulators)]
                         for _ in range(n_rows)]}
                for column_records in records]
        with cgutils.for_range(builder, step.n_units(builder, c, nb)) as loop:
            for j, env in enumerate(envs):
                step.unit(env, loop.index, PREFETCH_BYTES > 0 and j == 0)
        if step.tail is not None:
            for env in envs:
                step.tail(env)
        for env, out in zip(envs, outs):
            for k in range(n_rows):
                accs = [builder.load(a) for a in env["acc"][k]]
                if step.finish is not None:
                    total = step.finish(builder, accs)
                else:
                    total = accs[0]
                    for a in accs[1:]:
                        total = builder.fadd(total, a)
                builder.store(simd._reduce(builder, total), builder.gep(out, [c(k)]))
        builder.branch(done)
    builder.position_at_end(done)


def block_heads(builder, row, starts, n_halves):
    """float32 <2·n_halves> of the leading halves (d, or d and m) of the blocks at byte offsets `starts` of row."""
    head_type = ir.IntType(16 * n_halves)
    heads = ir.Constant(ir.VectorType(head_type, len(starts)), ir.Undefined)
    for j, start in enumerate(starts):
        heads = builder.insert_element(heads, load_at(builder, row, start, head_type, 1), ir.Constant(_i32, j))
    halves = builder.bitcast(heads, ir.VectorType(ir.HalfType(), len(starts) * n_halves))
    return builder.fpext(halves, ir.VectorType(_f32, len(starts) * n_halves))


def lanes_of(builder, v, indices):
    """<16 x T> of v's elements at `indices` (one per lane)."""
    return builder.shuffle_vector(v, v, ir.Constant(_v16i, list(indices)))
