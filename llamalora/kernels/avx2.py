"""Matrix × vector for Q4_0, Q4_1, Q5_0, Q8_0, Q4_K and Q6_K with AVX2 integer dot products (vpmaddwd), exact to
float32 rounding: the AVX2 counterpart of vnni.py, driven by intmatvec.py.

- Activation: X = round(x / s) per block of 32 as in vnni.py (int_rows.block_scales, |X| ≤ X_MAX < 2^23), split
  into two 16-bit limbs, X = H·65536 + L with L = X mod 2^16 in [-32768, 32767] and H in [-128, 128]. One record
  per block holds H[32] and L[32] (int16, the block's values in order), its scale s in 8 lanes and what a layout
  needs besides (see the record description above HIGH_AT).
- Weights: the file's bytes and halves, widened in registers to 16 int16 lanes a vpmovzxbw / vpmovsxbw: a Q4_0 or
  Q4_1 block's 16 bytes z (weights 0-15 in the low nibbles, 16-31 in the high ones) go in whole, beside z >> 4,
  against limbs arranged so that the high nibbles inside z cancel (two instructions widen 32 weights); Q5_0 masks
  its nibbles and adds 16 where its fifth bit is set, Q8_0 takes two loads of 16 signed bytes, Q4_K masks, Q6_K
  ORs its two high bits in and subtracts its 32.
- vpmaddwd multiplies 16 int16 pairs and adds each two into an int32 lane, exactly (|w·limb| < 2^23): a block's
  eight lanes of four weights get Th = Σ w·H and Tl = Σ w·L, and t = Th·65536 + Tl = Σ w·X, computed modulo 2^32
  and so exact whenever the true sum fits: Q4_0's Σ (q - 8)·X per lane is below 4·8·X_MAX < 2^28 (the offset
  taken out by the lane's -8·ΣX, kept in the record), Q4_1's Σ q·X below 4·15·X_MAX, Q5_0's (offset 16: the
  correction twice) 4·16·X_MAX, Q4_K's (sub-blocks of 32, one register pair each) 4·15·X_MAX, Q6_K's (a
  register per sub-block of 16: two weights a lane) 2·32·X_MAX. Q8_0's lanes reach 4·128·X_MAX > 2^31, so Th
  (|·| ≤ 2^16) and Tl (≤ 2^24) are each exact in float and joined there, Th·65536 + Tl by one FMA.
- An FMA per block adds t·(d·s) into eight float32 lanes (Q6_K one FMA
  per sub-block of 16, by d·sc·s); Q4_1 adds m·(the lane's Σx) into an accumulator of its own, Q4_K subtracts its
  minima once per super-block, (dmin·m)·(block sums of x, kept in the super-block's first record); the lanes are
  summed once, at the row's end.

The work per weight is about that of the float kernels (simd.py, blockdot.py) on AVX2: two 16-bit products a
weight against a widening to 32 bits, a conversion and an FMA; what the integer kernels save is memory. The rows
are read in place, block scales and all, where the portable kernels also stream the float32 scales (and minima)
widened at load: for Q4_0 that is 26 bytes a block against 18. Error: besides |x - s·X| ≤ s/2, a float32
rounding per FMA into a lane (one per block, Q6_K two) and a few per block and per row (tests/test_int_kernels.py
states the bound).
"""

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import simd
from .int_rows import (PREFETCH_BYTES, Q4_0, Q4_1, Q4_K, Q5_0, Q6_K, Q8_0, ROWS_PER_STEP, RowStep, block_scales, lanes_of, load_at,
                       make_rows_columns_dot, make_rows_dot, prefetch_ahead, q4_k_scales_and_minima, q6_k_scales)

_f32, _i8, _i16, _i32 = ir.FloatType(), ir.IntType(8), ir.IntType(16), ir.IntType(32)
_v8f, _v8i, _v16s, _v16b = (ir.VectorType(_f32, 8), ir.VectorType(_i32, 8), ir.VectorType(_i16, 16),
                            ir.VectorType(_i8, 16))

# --- the activation as two 16-bit limbs: a record per block of 32 -----------------------------------------------

LAYOUT_Q4, LAYOUT_Q5, LAYOUT_Q8, LAYOUT_K = 0, 1, 2, 3
# A block's record: H int16[32], L int16[32], the scale s float32[8] (one per lane), corrections int32[8], sums
# float32[8]. Lane i of a block's products holds its weights 2i, 2i+1, 16 + 2i, 17 + 2i. The limbs are those of
# X_j, except in the Q4 layout, whose second half holds X'_j = X_(16+j) - 16·X_j: Q4_0's and Q4_1's low weights are
# the whole bytes z_j = lo_j + 16·hi_j (no mask), and Σ z_j·X_j + Σ hi_j·X'_j = Σ lo_j·X_j + Σ hi_j·X_(16+j)
# (|X'| ≤ 17·X_MAX: its H stays within ±2168). Q4 layout: corrections -8·Σ of the lane's four X (Q4_0's offset),
# sums the lane's Σx (Q4_1's minima); Q5 layout (Q5_0): the corrections; Q8 layout: neither; K layout: the sums
# part of a super-block's first record holds its eight block sums of x (Q4_K's minima), the others none.
HIGH_AT, LOW_AT, SCALES_AT, CORRECTIONS_AT, SUMS_AT = 0, 64, 128, 160, 192
RECORD_BYTES = 224
LANE_WEIGHTS = [[2 * i, 2 * i + 1, 16 + 2 * i, 17 + 2 * i] for i in range(8)]


def _lane_sums(builder, v):
    """<8 x T> of the sums over each lane's four weights (LANE_WEIGHTS) of a <32 x T> block vector."""
    parts = [builder.shuffle_vector(v, v, ir.Constant(_v8i, [w[k] for w in LANE_WEIGHTS])) for k in range(4)]
    add = builder.fadd if isinstance(v.type.element, ir.FloatType) else builder.add
    return add(add(parts[0], parts[1]), add(parts[2], parts[3]))


def _make_quantize_block(layout):
    """Intrinsic (x_addr, inv, s, record_addr, sum_addr) -> None: the record of the 32 float32 at x_addr (inv =
    1/s; inv = 0 makes the block zero); the K layout also writes the block's sum of x (summed in float64 in a fixed
    order, rounded once) to sum_addr, a lane of its super-block's first record."""

    @intrinsic
    def quantize_block(typingctx, x_addr, inv, s, record_addr, sum_addr):
        sig = types.none(types.intp, types.float64, types.float32, types.intp, types.intp)

        def codegen(context, builder, signature, args):
            x_addr, inv, s, record_addr, sum_addr = args
            v32f, v32d, v32i, v32s = (ir.VectorType(t, 32) for t in (_f32, ir.DoubleType(), _i32, _i16))
            rint = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v32d, [v32d]), "llvm.rint.v32f64")
            x = builder.load(builder.inttoptr(x_addr, v32f.as_pointer()), align=4)
            zero = builder.fcmp_ordered("==", inv, ir.Constant(inv.type, 0.0))
            x = builder.select(zero, ir.Constant(v32f, [0.0] * 32), x)
            scaled = builder.fmul(builder.fpext(x, v32d), simd._splat(builder, inv, 32))
            X = builder.fptosi(builder.call(rint, [scaled]), v32i)
            limbed = X
            if layout == LAYOUT_Q4:   # second half X_(16+j) - 16·X_j
                first = builder.shuffle_vector(X, X, ir.Constant(v32i, [0] * 16 + list(range(16))))
                limbed = builder.sub(X, builder.mul(first, ir.Constant(v32i, [0] * 16 + [16] * 16)))
            low = builder.trunc(limbed, v32s)   # mod 2^16 as a signed 16-bit value
            high = builder.ashr(builder.sub(limbed, builder.sext(low, v32i)), ir.Constant(v32i, [16] * 32))
            high = builder.trunc(high, v32s)
            rec = builder.inttoptr(record_addr, _i8.as_pointer())

            def store(value, offset):
                ptr = builder.gep(rec, [ir.Constant(_i32, offset)])
                builder.store(value, builder.bitcast(ptr, value.type.as_pointer()), align=32)

            store(high, HIGH_AT)
            store(low, LOW_AT)
            store(simd._splat(builder, s, 8), SCALES_AT)
            if layout in (LAYOUT_Q4, LAYOUT_Q5):
                store(builder.mul(_lane_sums(builder, X), ir.Constant(_v8i, [-8] * 8)), CORRECTIONS_AT)
            if layout == LAYOUT_Q4:
                store(_lane_sums(builder, x), SUMS_AT)
            if layout == LAYOUT_K:
                total = builder.fpext(x, v32d)
                for width in (16, 8, 4, 2, 1):
                    halves = [builder.shuffle_vector(total, total, ir.Constant(ir.VectorType(_i32, width),
                                                                                list(range(k, k + width))))
                              for k in (0, width)]
                    total = builder.fadd(*halves)
                block_sum = builder.fptrunc(builder.extract_element(total, ir.Constant(_i32, 0)), _f32)
                builder.store(block_sum, builder.inttoptr(sum_addr, _f32.as_pointer()), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return quantize_block


_quantize_block_q4 = _make_quantize_block(LAYOUT_Q4)
_quantize_block_q5 = _make_quantize_block(LAYOUT_Q5)
_quantize_block_q8 = _make_quantize_block(LAYOUT_Q8)
_quantize_block_k = _make_quantize_block(LAYOUT_K)


@njit(nogil=True, cache=True)
def quantize_activation(x, layout):
    """(buffer, address of the first record, ok): per block of 32 a record of RECORD_BYTES, 32-byte aligned (see
    the record description above HIGH_AT). ok is False when a block's largest |x| is not finite or outside
    [TINY, HUGE] (int_rows.block_scales)."""
    nb = x.shape[0] // 32
    buf = np.empty(nb * RECORD_BYTES + 32 + 8 * nb, dtype=np.uint8)
    start = (-buf.ctypes.data) % 32
    end = start + nb * RECORD_BYTES
    scale = buf[end:end + 4 * nb].view(np.float32)
    if not block_scales(x, scale, buf[end + 4 * nb:end + 4 * nb + 4].view(np.int32)):
        return buf, 0, False
    for b in range(nb):
        s = scale[b]
        inv = 1.0 / np.float64(s) if s != 0 else 0.0
        record = buf.ctypes.data + start + b * RECORD_BYTES
        if layout == LAYOUT_Q4:
            _quantize_block_q4(x.ctypes.data + 128 * b, inv, s, record, 0)
        elif layout == LAYOUT_Q5:
            _quantize_block_q5(x.ctypes.data + 128 * b, inv, s, record, 0)
        elif layout == LAYOUT_Q8:
            _quantize_block_q8(x.ctypes.data + 128 * b, inv, s, record, 0)
        else:   # the block's sum in lane b mod 8 of its super-block's first record
            first = buf.ctypes.data + start + (b - b % 8) * RECORD_BYTES
            _quantize_block_k(x.ctypes.data + 128 * b, inv, s, record, first + SUMS_AT + 4 * (b % 8))
    return buf, buf.ctypes.data + start, True


# --- IR helpers -------------------------------------------------------------------------------------

def pmaddwd(builder, a, b):
    """<8 x i32>: a[2i]·b[2i] + a[2i+1]·b[2i+1] of <16 x i16> a, b (vpmaddwd; exact unless both pairs are -2^15)."""
    fnty = ir.FunctionType(_v8i, [_v16s, _v16s])
    fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.avx2.pmadd.wd")
    return builder.call(fn, [a, b])


def splat_half(builder, row, offset, lanes=8):
    """<lanes x float> of the half at byte `offset` of row (broadcast as 16 bits, then widened: two instructions)."""
    bits = load_at(builder, row, offset, _i16, 1)
    vh = ir.VectorType(_i16, lanes)
    splat = builder.shuffle_vector(builder.insert_element(ir.Constant(vh, ir.Undefined), bits, ir.Constant(_i32, 0)),
                                   ir.Constant(vh, ir.Undefined), ir.Constant(ir.VectorType(_i32, lanes), [0] * lanes))
    return builder.fpext(builder.bitcast(splat, ir.VectorType(ir.HalfType(), lanes)), ir.VectorType(_f32, lanes))


def nibbles(builder, row, offset):
    """(low, high) <16 x i16> of the low and high nibbles of the 16 bytes at `offset` of row. The masks act on
    32-bit lanes, which keeps LLVM from narrowing the work to bytes and widening twice (one vpmovzxbw, two vpand,
    one vpsrld instead of two of each)."""
    z = builder.bitcast(builder.zext(load_at(builder, row, offset, _v16b, 1), _v16s), _v8i)
    mask = ir.Constant(_v8i, [0x000F000F] * 8)
    low = builder.and_(z, mask)
    high = builder.and_(builder.lshr(z, ir.Constant(_v8i, [4] * 8)), mask)
    return builder.bitcast(low, _v16s), builder.bitcast(high, _v16s)


def record_part(builder, c, records, block, offset, vtype):
    """A part of block `block`'s record (HIGH_AT + 32·half, LOW_AT + 32·half, SCALES_AT, ...)."""
    return load_at(builder, records, builder.add(builder.mul(block, c(RECORD_BYTES)), c(offset)), vtype, 32)


def limbs(builder, c, records, block):
    """(H, L) of a block, each as its two halves (<16 x i16> of weights 0-15, 16-31)."""
    return tuple([record_part(builder, c, records, block, at + 32 * h, _v16s) for h in range(2)]
                 for at in (HIGH_AT, LOW_AT))


def limb_products(builder, weights, high, low):
    """(Th, Tl) <8 x i32>: Σ w·H and Σ w·L per lane over the weight registers and the limbs' matching halves."""
    th = tl = None
    for w, h, l in zip(weights, high, low):
        ph, pl = pmaddwd(builder, w, h), pmaddwd(builder, w, l)
        th, tl = (ph, pl) if th is None else (builder.add(th, ph), builder.add(tl, pl))
    return th, tl


def joined(builder, th, tl):
    """Th·65536 + Tl (modulo 2^32)."""
    return builder.add(builder.shl(th, ir.Constant(_v8i, [16] * 8)), tl)


def fma_into(builder, acc, v, factor):
    builder.store(simd._fmuladd(builder, v, factor, builder.load(acc)), acc)


def spilled(builder, v):
    """A stack copy of the float vector v, whose lanes lane_splat reads back (a lane broadcast from memory is a
    load, where one from a register is a shuffle with an index vector of its own: with four rows' sixteen scales
    those indices spilled the registers)."""
    slot = cgutils.alloca_once(builder, v.type)
    builder.store(v, slot)
    return builder.bitcast(slot, _f32.as_pointer())


def lane_splat(builder, spilled_vector, lane):
    """<8 x float> of lane `lane` of a spilled vector."""
    value = builder.load(builder.gep(spilled_vector, [ir.Constant(_i32, lane)]), align=4)
    return simd._splat(builder, value, 8)


# --- the steps ---------------------------------------------------------------------------------------

# (block bytes, offset of q) per type
GEOMETRY = {"q4_0": (18, 2), "q4_1": (20, 4), "q8_0": (34, 2), "q5_0": (22, 6)}
Q5_QH_OFFSET = 2  # Q5_0's 32-bit word of fifth bits (bit j: weight j's)


def _fifth_bits(builder, row, start, half):
    """<16 x i16> 16 where the Q5_0 weights 16·half … 16·half + 15 of the block at `start` have their fifth bit."""
    c = lambda v: ir.Constant(start.type, v)  # noqa: E731
    bits = load_at(builder, row, builder.add(start, c(Q5_QH_OFFSET + 2 * half)), _i16, 1)
    splat = builder.shuffle_vector(builder.insert_element(ir.Constant(_v16s, ir.Undefined), bits, ir.Constant(_i32, 0)),
                                   ir.Constant(_v16s, ir.Undefined), ir.Constant(ir.VectorType(_i32, 16), [0] * 16))
    one_bit = ir.Constant(_v16s, [1 << j for j in range(16)])
    is_set = builder.icmp_unsigned("!=", builder.and_(splat, one_bit), ir.Constant(_v16s, [0] * 16))
    return builder.select(is_set, ir.Constant(_v16s, [16] * 16), ir.Constant(_v16s, [0] * 16))


def _block_step(kind):
    """A RowStep of the 32-value block types: a step is two blocks (one prefetch per row), an odd last block
    follows the loop."""
    block_bytes, qs_offset = GEOMETRY[kind]

    def block(env, b, prefetch):
        builder, c, records = env["builder"], env["c"], env["records"]
        start = builder.mul(b, c(block_bytes))
        high, low = limbs(builder, c, records, b)
        s = record_part(builder, c, records, b, SCALES_AT, _v8f)
        corr = record_part(builder, c, records, b, CORRECTIONS_AT, _v8i) if kind in ("q4_0", "q5_0") else None
        sums = record_part(builder, c, records, b, SUMS_AT, _v8f) if kind == "q4_1" else None
        for row, acc in zip(env["rows"], env["acc"]):
            if prefetch:
                prefetch_ahead(env, row, start, 1)  # a line per two blocks: 36 to 68 bytes
            if kind == "q8_0":
                w = [builder.sext(load_at(builder, row, builder.add(start, c(qs_offset + 16 * h)), _v16b, 1), _v16s)
                     for h in range(2)]
                th, tl = limb_products(builder, w, high, low)
                v = simd._fmuladd(builder, builder.sitofp(th, _v8f), ir.Constant(_v8f, [65536.0] * 8),
                                  builder.sitofp(tl, _v8f))
            elif kind == "q5_0":
                w = [builder.or_(half, _fifth_bits(builder, row, start, h))
                     for h, half in enumerate(nibbles(builder, row, builder.add(start, c(qs_offset))))]
            else:   # the whole bytes and their high nibbles (the Q4 layout's limbs)
                z = builder.zext(load_at(builder, row, builder.add(start, c(qs_offset)), _v16b, 1), _v16s)
                w = [z, builder.lshr(z, ir.Constant(_v16s, [4] * 16))]
            if kind != "q8_0":
                t = joined(builder, *limb_products(builder, w, high, low))
                if corr is not None:  # -8·ΣX: Q5_0's offset 16 takes it twice
                    t = builder.add(t, corr)
                    if kind == "q5_0":
                        t = builder.add(t, corr)
                v = builder.sitofp(t, _v8f)
            fma_into(builder, acc[0], v, builder.fmul(splat_half(builder, row, start), s))
            if kind == "q4_1":  # the minima in an accumulator of their own
                fma_into(builder, acc[1], splat_half(builder, row, builder.add(start, c(2))), sums)

    def unit(env, p, prefetch):
        builder, c = env["builder"], env["c"]
        block(env, builder.mul(p, c(2)), prefetch)
        block(env, builder.add(builder.mul(p, c(2)), c(1)), False)

    def tail(env):
        builder, c, nb = env["builder"], env["c"], env["nb"]
        with builder.if_then(builder.icmp_unsigned("!=", builder.and_(nb, c(1)), c(0))):
            block(env, builder.sub(nb, c(1)), False)

    # one FMA chain a row (the rows of a step run side by side; a row's sum must not depend on the kernel that
    # computes it, for the delta path and thread counts give the same bits)
    return RowStep(2 if kind == "q4_1" else 1, lambda builder, c, nb: builder.lshr(nb, c(1)), unit, tail)


def _q4_k_unit(env, sb, prefetch):
    """One Q4_K super-block: sub-blocks 2p and 2p + 1 (blocks 8·sb + 2p, + 1 of the records) are the low and high
    nibbles of q bytes 32p … 32p + 31. acc[0] -= (dmin·m)·(block sums of x) once per super-block, then += Σ q·X ·
    (d·sc·s) per sub-block: one accumulator a row, and one block's limbs live at a time (with four rows a step,
    a pair's limbs and the accumulators spilled the sixteen registers)."""
    builder, c, records = env["builder"], env["c"], env["records"]
    start = builder.mul(sb, c(144))
    first = builder.mul(sb, c(8))
    scm = []   # per row: d·sc of the eight sub-blocks in lanes 0-7, dmin·m in lanes 8-15
    sums = record_part(builder, c, records, first, SUMS_AT, _v8f)
    for row, acc in zip(env["rows"], env["acc"]):
        if prefetch:
            prefetch_ahead(env, row, start, 144)
        scales_and_minima = q4_k_scales_and_minima(builder, row, start)
        scm.append(spilled(builder, scales_and_minima))
        minima = builder.fneg(lanes_of(builder, scales_and_minima, range(8, 16)))   # exact
        fma_into(builder, acc[0], minima, sums)
    mask = ir.Constant(_v8i, [0x000F000F] * 8)
    for p in range(4):
        for sub in range(2):   # low nibbles: sub-block 2p, high: 2p + 1
            block = builder.add(first, c(2 * p + sub))
            high, low = limbs(builder, c, records, block)
            s = record_part(builder, c, records, block, SCALES_AT, _v8f)
            for row, acc, scales in zip(env["rows"], env["acc"], scm):
                w = []
                for h in range(2):
                    z = builder.bitcast(builder.zext(load_at(builder, row, builder.add(start, c(16 + 32 * p + 16 * h)),
                                                             _v16b, 1), _v16s), _v8i)
                    w.append(builder.bitcast(builder.and_(_shifted(builder, z, -4 * sub), mask), _v16s))
                t = joined(builder, *limb_products(builder, w, high, low))
                d_sc = lane_splat(builder, scales, 2 * p + sub)
                fma_into(builder, acc[0], builder.sitofp(t, _v8f), builder.fmul(d_sc, s))


def _shifted(builder, v, shift):
    """v << shift (right for a negative shift) on 32-bit lanes."""
    if shift > 0:
        return builder.shl(v, ir.Constant(_v8i, [shift] * 8))
    return builder.lshr(v, ir.Constant(_v8i, [-shift] * 8)) if shift < 0 else v


def _q6_k_unit(env, sb, prefetch):
    """One Q6_K super-block: in half n, weight 32i + l (block 8·sb + 4n + i, i < 4) is nibble i // 2 of ql[32·(i % 2)
    + l] with bits 2i, 2i + 1 of qh[l] above it. Each register of 16 weights is one sub-block:
    acc[0] += Σ (q - 32)·X · (d·sc·s) per sub-block."""
    builder, c, records = env["builder"], env["c"], env["records"]
    start = builder.mul(sb, c(210))
    mask_low, mask_high = ir.Constant(_v8i, [0x000F000F] * 8), ir.Constant(_v8i, [0x00300030] * 8)
    thirty_two = ir.Constant(_v16s, [32] * 16)
    dsc = []   # per row: d·sc of the 16 sub-blocks
    for row in env["rows"]:
        if prefetch:
            prefetch_ahead(env, row, start, 210)
        dsc.append(spilled(builder, q6_k_scales(builder, row, start)))
    for n in range(2):
        for i in range(4):   # one block's limbs live at a time (four rows' sixteen scales already take the stack)
            block = builder.add(builder.mul(sb, c(8)), c(4 * n + i))
            high_limb, low_limb = limbs(builder, c, records, block)
            s = record_part(builder, c, records, block, SCALES_AT, _v8f)
            for row, acc, scales in zip(env["rows"], env["acc"], dsc):
                for r in range(2):    # weights 16r … 16r + 15 of the block: sub-block 2·(4n + i) + r
                    ql = load_at(builder, row, builder.add(start, c(64 * n + 32 * (i % 2) + 16 * r)), _v16b, 1)
                    qh = load_at(builder, row, builder.add(start, c(128 + 32 * n + 16 * r)), _v16b, 1)
                    ql, qh = (builder.bitcast(builder.zext(q, _v16s), _v8i) for q in (ql, qh))
                    low = builder.and_(_shifted(builder, ql, -4 * (i // 2)), mask_low)
                    high = builder.and_(_shifted(builder, qh, 4 - 2 * i), mask_high)
                    w = builder.sub(builder.bitcast(builder.or_(low, high), _v16s), thirty_two)
                    th, tl = pmaddwd(builder, w, high_limb[r]), pmaddwd(builder, w, low_limb[r])
                    d_sc = lane_splat(builder, scales, 2 * (4 * n + i) + r)
                    fma_into(builder, acc[0], builder.sitofp(joined(builder, th, tl), _v8f), builder.fmul(d_sc, s))


def _super_blocks(builder, c, nb):
    return builder.lshr(nb, c(3))


# --- the kernels: steps of ROWS_PER_STEP rows (and of a last single row), each switching on the kind ----------

LAYOUTS = (LAYOUT_Q4, LAYOUT_Q4, LAYOUT_Q8, LAYOUT_K, LAYOUT_K, LAYOUT_Q5)   # by kernel id
STEPS = {Q4_0: _block_step("q4_0"), Q4_1: _block_step("q4_1"), Q8_0: _block_step("q8_0"), Q5_0: _block_step("q5_0"),
         Q4_K: RowStep(1, _super_blocks, _q4_k_unit), Q6_K: RowStep(1, _super_blocks, _q6_k_unit)}
# FMAs into an accumulator lane per block of 32, by kernel id (the error bound counts a rounding for each)
LANE_FMAS_PER_BLOCK = (1, 1, 1, 1.125, 2, 1)   # Q4_K: its minima, once per eight blocks

rows_dot = make_rows_dot(ROWS_PER_STEP, [STEPS[kind] for kind in range(len(STEPS))], 8, PREFETCH_BYTES)
row_dot = rows_dot if ROWS_PER_STEP == 1 else make_rows_dot(1, [STEPS[kind] for kind in range(len(STEPS))], 8,
                                                            PREFETCH_BYTES)


def rows_columns_dot(n_rows, n_columns):
    """The kernel of n_rows rows × n_columns activations (int_rows.make_rows_columns_dot, this set's steps): each
    column's sums are rows_dot's."""
    return make_rows_columns_dot(n_rows, n_columns, [STEPS[kind] for kind in range(len(STEPS))], 8,
                                 PREFETCH_BYTES)
