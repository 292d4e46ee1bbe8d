"""Matrix × vector for Q4_0, Q4_1, Q5_0, Q8_0, Q4_K and Q6_K with AVX-512 VNNI integer dot products, exact to
float32 rounding.

The portable kernels (simd.py, blockdot.py) convert every weight to float; here the weights stay bytes and the
activation becomes integers instead, once per call, finely enough that nothing is lost beyond float32 rounding:

- Activation: each block of 32 values x_j gets a float32 scale s = max|x_j| / X_MAX and integers
  X_j = round(x_j / s), |X_j| ≤ X_MAX = 8355000 < 2^23, kept as three balanced base-256 digits (limbs)
  X = l0·65536 + l1·256 + l2, every l in [-128, 127]. So x_j = s·X_j + δ_j with |δ_j| ≤ s/2 ≈ 2^-24·max|x|
  of the block: the float32 rounding of the block's largest value. (llama.cpp rounds x to 8 bits instead,
  an error 2^16 times larger, which is why its logits drift from a float computation.)
- Weights stay the file's bytes, and so do the scales: d (and Q4_1's m) are read as halves from each block,
  the K-quants' sub-block scales decoded from each super-block, so a row is one stream of memory. The unsigned
  operand of vpdpbusd (u8 × s8, four products added per 32-bit lane) is the weight's unsigned code q (4 bits,
  Q5_0's 5, Q6_K's 6) or, for Q8_0, the signed byte + 128 (an xor).
- Per block pair (64 weights in one 512-bit register, 16 lanes of 4 weights; an odd last block is paired
  with zero limbs): the 4- to 6-bit types chain the limbs in one integer, t = ((Σq·l0)·256 + Σq·l1)·256 + Σq·l2
  (·256 is a byte shuffle, off the multiply port). Every step wraps modulo 2^32, so t is exact once the true
  Σ q'·X fits in int32. An offset k on the weights (Q4_0's 8, Q5_0's 16, Q6_K's 32, Q8_0's 128) is taken out by
  adding the lane's -k·ΣX, kept in the activation's record, so the lane holds Σ (q - k)·X, |·| ≤ 4·32·X_MAX <
  2^31 (Q6_K's Σ q·X alone reaches 4·63·X_MAX, 98% of the int32 range). Q8_0's lanes reach 4·128·X_MAX, so its
  top two limbs are chained (< 2^25, their correction added there) and the last one (with its own) added in
  float. A float32 accumulator per lane takes t·(d·s) by FMA; Q4_1 adds m·(the lane's Σx) the same way; the 16
  lanes are summed once, at the row's end.
- K-quants (super-blocks of 256: four block pairs): the records are in plain order (a pair's 64 values in
  turn), so a lane's four weights lie in one sub-block, of 32 (Q4_K) or 16 (Q6_K): the lane's factor is
  d·sc·s (d·sc exact in float32: an 11-bit half times a 6- or 8-bit code). Q4_K's minima go in once per
  super-block, (dmin·m)·(block sums of x, kept in the K records) in a second accumulator, subtracted at the end.

Error: besides δ, each output sees a few float32 roundings per block pair (t → float, d·s, the FMA, and
for Q4_1 the lane sums of x and their FMA, for Q4_K the block sums and theirs) and the final 16-lane reduction: tests/test_int_kernels.py
and tests/test_int_kernels_k.py state the bound, 2^-24·((nb/2 + 10)·Σ_b Σ_j (|d q'_j| + |m_j|)·|x_j| + 1.02·Σ_b max_b|x|·
Σ_j |d q'_j|) over the blocks b of 32 (d the weight's scale: Q4_K's and Q6_K's d·sc of its sub-block).

Streaming: decode reads every weight from memory once per token, and on an Intel Xeon the hardware prefetchers
alone left the loop waiting on loads at half its in-cache speed. There each row's stream is prefetched 8 KB ahead
(past a row's end that is the rows after it) and two rows go through a step together, sharing the record loads:
on the one-token path of a random 1B-shaped Q4_0 llama (560 MB of weights, one core of an AVX-512 Xeon) that
took the matrix × vector from 5.6 to 10.5 GB/s; SmolLM2's Q4_1 from 7 to 14, its Q8_0 from 8.4 to 18.5
(benchmarks/bench_kernels.py --stream). AMD's prefetchers follow one row at a time best (int_rows.py). The same machinery (int_rows.py: make_rows_columns_dot, make_rows_dot, shared with the AVX2
kernels) serves every type: a step is a block pair for the 32-value types, a super-block for the K-quants.

A block whose largest |x| is not finite or outside [TINY, HUGE] makes the kernels return False without
writing anything; the caller then takes the portable kernel, so NaN, inf and extreme activations behave
exactly as there.

Selection: intmatvec.py takes these kernels when the compile target (target.py) has AVX-512 F, BW and VNNI;
its driver (`intmatvec.matvec(kind, ...)`, branching per step on the kind) serves every type.
"""

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import simd
from .int_rows import (PREFETCH_BYTES, Q4_0, Q4_1, Q4_K, Q5_0, Q6_K, Q8_0, ROWS_PER_STEP, RowStep, block_heads, block_scales,
                       lanes_of, load_at, make_rows_columns_dot, make_rows_dot, minus_minima, prefetch_ahead, q4_k_scales_and_minima,
                       q6_k_scales, splat_i32)

_f32, _i8, _i32 = ir.FloatType(), ir.IntType(8), ir.IntType(32)
_v16f, _v16i, _v64b = ir.VectorType(_f32, 16), ir.VectorType(_i32, 16), ir.VectorType(_i8, 64)


# --- the activation as limbs: a record per block pair ------------------------------------------------

N_LIMBS = 3
DIGIT_BIAS = 128 * 65793  # X + DIGIT_BIAS ≥ 0 has base-256 digits u; X's balanced digits are u - 128
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


def dpbusd(builder, acc, unsigned_bytes, signed_bytes):
    """acc + Σ of four u8·s8 products per 32-bit lane (vpdpbusd, no saturation)."""
    fnty = ir.FunctionType(_v16i, [_v16i, _v64b, _v64b])
    fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.avx512.vpdpbusd.512")
    return builder.call(fn, [acc, unsigned_bytes, signed_bytes])


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
    ok is False when a block's largest |x| is not finite or outside [TINY, HUGE] (int_rows.block_scales)."""
    nb = x.shape[0] // 32
    n_pairs = (nb + 1) // 2
    buf = np.empty(n_pairs * PAIR_BYTES + 128 + 16 * n_pairs, dtype=np.uint8)
    start = (-buf.ctypes.data) % 64
    end = start + n_pairs * PAIR_BYTES
    buf[end:end + 64] = MASK_BYTES
    scratch = buf[end + 64:end + 64 + 16 * n_pairs]
    scale = scratch[:8 * n_pairs].view(np.float32)  # 2 per pair
    scale[:] = 0
    if not block_scales(x, scale, scratch[8 * n_pairs:12 * n_pairs].view(np.int32)):
        return buf, 0, False
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


# --- the steps ---------------------------------------------------------------------------------------

# (block bytes, offset of q, weight offset k, layout) per type
GEOMETRY = {"q4_0": (18, 2, 8, LAYOUT_Q4), "q4_1": (20, 4, 0, LAYOUT_Q4), "q8_0": (34, 2, 128, LAYOUT_Q8),
            "q5_0": (22, 6, 16, LAYOUT_Q4)}
Q5_QH_OFFSET = 2  # Q5_0's 32-bit word of fifth bits (bit j: weight j's)


def _fifth_bits(builder, row, start0, start1):
    """<64 x i8> 16 where a Q5_0 weight has its fifth bit, in the Q4 register order: the low 16 bits of both blocks'
    qh words, then their high 16 bits."""
    c = lambda v: ir.Constant(start0.type, v)  # noqa: E731
    words = ir.Constant(ir.VectorType(_i32, 2), ir.Undefined)
    for j, start in enumerate((start0, start1)):
        words = builder.insert_element(words, load_at(builder, row, builder.add(start, c(Q5_QH_OFFSET)), _i32, 1),
                                       ir.Constant(_i32, j))
    v4h = ir.VectorType(ir.IntType(16), 4)
    halves = builder.bitcast(words, v4h)   # [qh0 low, qh0 high, qh1 low, qh1 high]
    ordered = builder.shuffle_vector(halves, halves, ir.Constant(ir.VectorType(_i32, 4), [0, 2, 1, 3]))
    bits = builder.bitcast(ordered, ir.VectorType(ir.IntType(1), 64))
    return builder.select(bits, ir.Constant(_v64b, [16] * 64), ir.Constant(_v64b, [0] * 64))


def _block_pair_unit(kind):
    """(unit, tail) for make_rows_dot of the 32-value block types: a step is a block pair (nb // 2 steps);
    an odd last block is paired with zero limbs and sums (its own bytes read twice)."""
    block_bytes, qs_offset, k_offset, layout = GEOMETRY[kind]
    pattern = lane_blocks(layout)
    n_halves = 2 if kind == "q4_1" else 1

    def pair(env, p, b0, b1, prefetch):
        builder, c, records, mask = env["builder"], env["c"], env["records"], env["mask"]
        start0, start1 = builder.mul(b0, c(block_bytes)), builder.mul(b1, c(block_bytes))
        limb = [record_part(builder, c, records, p, 64 * i, _v64b) for i in range(N_LIMBS)]
        n_corr = (1 if layout == LAYOUT_Q4 else 2) if k_offset else 0
        corr = [record_part(builder, c, records, p, CORRECTIONS_AT + 64 * i, _v16i) for i in range(n_corr)]
        s_lanes = record_part(builder, c, records, p, SCALES_AT, _v16f)
        sums = record_part(builder, c, records, p, SUMS_AT, _v16f) if kind == "q4_1" else None
        for row, acc in zip(env["rows"], env["acc"]):
            if prefetch:
                prefetch_ahead(env, row, start0, 1)  # a line per pair: 36 to 68 bytes
            if layout == LAYOUT_Q4:
                v16b = ir.VectorType(_i8, 16)
                both = builder.shuffle_vector(load_at(builder, row, builder.add(start0, c(qs_offset)), v16b, 1),
                                              load_at(builder, row, builder.add(start1, c(qs_offset)), v16b, 1),
                                              ir.Constant(ir.VectorType(_i32, 32), list(range(32))))
                low = builder.and_(both, ir.Constant(both.type, [15] * 32))
                high = builder.lshr(both, ir.Constant(both.type, [4] * 32))
                w = builder.shuffle_vector(low, high, ir.Constant(ir.VectorType(_i32, 64), list(range(64))))
                if kind == "q5_0":
                    w = builder.or_(w, _fifth_bits(builder, row, start0, start1))
                t = chained_limbs(builder, w, limb, mask)
                if corr:  # -8·ΣX: Q5_0's offset 16 takes it twice (|Σ (q - 16)·X| < 2^30, wrapping is exact)
                    t = builder.add(t, corr[0])
                    if kind == "q5_0":
                        t = builder.add(t, corr[0])
                v = builder.sitofp(t, _v16f)
            else:
                v32b = ir.VectorType(_i8, 32)
                w = builder.shuffle_vector(load_at(builder, row, builder.add(start0, c(qs_offset)), v32b, 1),
                                           load_at(builder, row, builder.add(start1, c(qs_offset)), v32b, 1),
                                           ir.Constant(ir.VectorType(_i32, 64), list(range(64))))
                w = builder.xor(w, ir.Constant(_v64b, [-128] * 64))
                t = dpbusd(builder, splat_i32(0), w, limb[0])
                t = builder.add(dpbusd(builder, times_256(builder, t, mask), w, limb[1]), corr[0])
                u = dpbusd(builder, corr[1], w, limb[2])
                v = simd._fmuladd(builder, builder.sitofp(t, _v16f), ir.Constant(_v16f, [256.0] * 16),
                                  builder.sitofp(u, _v16f))
            floats = block_heads(builder, row, (start0, start1), n_halves)  # d, or d and m for Q4_1
            d_lanes = lanes_of(builder, floats, [n_halves * b for b in pattern])
            builder.store(simd._fmuladd(builder, v, builder.fmul(d_lanes, s_lanes), builder.load(acc[0])), acc[0])
            if kind == "q4_1":  # a second accumulator: one FMA latency per pair on each chain
                m_lanes = lanes_of(builder, floats, [2 * b + 1 for b in pattern])
                builder.store(simd._fmuladd(builder, m_lanes, sums, builder.load(acc[1])), acc[1])

    def unit(env, p, prefetch):
        builder, c = env["builder"], env["c"]
        pair(env, p, builder.mul(p, c(2)), builder.add(builder.mul(p, c(2)), c(1)), prefetch)

    def tail(env):
        builder, c, nb = env["builder"], env["c"], env["nb"]
        with builder.if_then(builder.icmp_unsigned("!=", builder.and_(nb, c(1)), c(0))):
            last = builder.sub(nb, c(1))   # its partner's limbs and sums are zero: read the block twice
            pair(env, builder.lshr(nb, c(1)), last, last, False)

    return unit, tail


def _block_pairs(builder, c, nb):
    return builder.lshr(nb, c(1))


def _block_pair_step(kind):
    return RowStep(2 if kind == "q4_1" else 1, _block_pairs, *_block_pair_unit(kind))


# --- K-quants: a step is a super-block of 256 values, four block pairs of records -----------------------------

def _q4_k_unit(env, sb, prefetch):
    """One Q4_K super-block: pairs of sub-blocks (2p, 2p+1) are q bytes 32p..32p+31 (low nibbles: sub-block 2p,
    high: 2p+1), in the K layout's register order. acc[0] += Σ q·X · (d·sc·s) per pair, acc[1] += (dmin·m)·(block
    sums of x) once per super-block (from the records' sums parts)."""
    builder, c, records, mask = env["builder"], env["c"], env["records"], env["mask"]
    start = builder.mul(sb, c(144))
    scm = []   # per row: d·sc of the eight sub-blocks in lanes 0-7, dmin·m in lanes 8-15 (exact products)
    for row in env["rows"]:
        if prefetch:
            prefetch_ahead(env, row, start, 144)
        scm.append(q4_k_scales_and_minima(builder, row, start))
    pairs = [builder.add(builder.mul(sb, c(4)), c(p)) for p in range(4)]
    sums = record_part(builder, c, records, pairs[0], SUMS_AT, _v16f)
    for pair in pairs[1:]:  # the eight block sums in lanes 8-15 (each lane non-zero in one record: exact)
        sums = builder.fadd(sums, record_part(builder, c, records, pair, SUMS_AT, _v16f))
    for acc, scales in zip(env["acc"], scm):   # lanes 0-7 add 0·(d·sc)
        builder.store(simd._fmuladd(builder, scales, sums, builder.load(acc[1])), acc[1])
    for p, pair in enumerate(pairs):
        limb = [record_part(builder, c, records, pair, 64 * i, _v64b) for i in range(N_LIMBS)]
        s_lanes = record_part(builder, c, records, pair, SCALES_AT, _v16f)
        for row, acc, scales in zip(env["rows"], env["acc"], scm):
            qs = load_at(builder, row, builder.add(start, c(16 + 32 * p)), ir.VectorType(_i8, 32), 1)
            w = builder.shuffle_vector(builder.and_(qs, ir.Constant(qs.type, [15] * 32)),
                                       builder.lshr(qs, ir.Constant(qs.type, [4] * 32)),
                                       ir.Constant(ir.VectorType(_i32, 64), list(range(64))))
            v = builder.sitofp(chained_limbs(builder, w, limb, mask), _v16f)
            d_lanes = lanes_of(builder, scales, [2 * p + lane // 8 for lane in range(16)])
            builder.store(simd._fmuladd(builder, v, builder.fmul(d_lanes, s_lanes), builder.load(acc[0])), acc[0])


def _q6_k_unit(env, sb, prefetch):
    """One Q6_K super-block: half n's 64 bytes of ql and 32 of qh give two registers of 64 weights in order,
    weights 0-63 (low nibbles, qh bits 0-1 then 2-3) and 64-127 (high nibbles, bits 4-5 then 6-7): block pairs
    2n and 2n+1. A lane's four weights lie in one sub-block of 16, so a lane scale d·sc·s serves it whole;
    the record's correction takes the 32 out: acc[0] += Σ (q - 32)·X · (d·sc·s)."""
    builder, c, records, mask = env["builder"], env["c"], env["records"], env["mask"]
    start = builder.mul(sb, c(210))
    v32b, v64i = ir.VectorType(_i8, 32), ir.VectorType(_i32, 64)
    dsc = []   # per row: d·sc of the 16 sub-blocks (exact products)
    for row in env["rows"]:
        if prefetch:
            prefetch_ahead(env, row, start, 210)
        dsc.append(q6_k_scales(builder, row, start))
    for n in range(2):
        pairs = [builder.add(builder.mul(sb, c(4)), c(2 * n + h)) for h in range(2)]
        limbs = [[record_part(builder, c, records, pair, 64 * i, _v64b) for i in range(N_LIMBS)] for pair in pairs]
        corrs = [record_part(builder, c, records, pair, CORRECTIONS_AT, _v16i) for pair in pairs]
        s_lanes = [record_part(builder, c, records, pair, SCALES_AT, _v16f) for pair in pairs]
        for row, acc, scales in zip(env["rows"], env["acc"], dsc):
            ql = load_at(builder, row, builder.add(start, c(64 * n)), _v64b, 1)
            qh = load_at(builder, row, builder.add(start, c(128 + 32 * n)), v32b, 1)
            qh_at = [builder.lshr(qh, ir.Constant(v32b, [2 * i] * 32)) for i in range(4)]
            lows = (builder.and_(ql, ir.Constant(_v64b, [15] * 64)), builder.lshr(ql, ir.Constant(_v64b, [4] * 64)))
            for h in range(2):
                high = builder.shuffle_vector(qh_at[2 * h], qh_at[2 * h + 1], ir.Constant(v64i, list(range(64))))
                high = builder.shl(builder.and_(high, ir.Constant(_v64b, [3] * 64)), ir.Constant(_v64b, [4] * 64))
                w = builder.or_(lows[h], high)
                t = builder.add(chained_limbs(builder, w, limbs[h], mask), corrs[h])
                d_lanes = lanes_of(builder, scales, [4 * (2 * n + h) + lane // 4 for lane in range(16)])
                builder.store(simd._fmuladd(builder, builder.sitofp(t, _v16f), builder.fmul(d_lanes, s_lanes[h]),
                                            builder.load(acc[0])), acc[0])


def _super_blocks(builder, c, nb):
    return builder.lshr(nb, c(3))


# --- one kernel for steps of ROWS_PER_STEP rows and one for a last single row, each switching on the kind ------

LAYOUTS = (LAYOUT_Q4, LAYOUT_Q4, LAYOUT_Q8, LAYOUT_K, LAYOUT_K, LAYOUT_Q4)   # by kernel id
STEPS = {Q4_0: _block_pair_step("q4_0"), Q4_1: _block_pair_step("q4_1"), Q8_0: _block_pair_step("q8_0"),
         Q5_0: _block_pair_step("q5_0"), Q4_K: RowStep(2, _super_blocks, _q4_k_unit, finish=minus_minima),
         Q6_K: RowStep(1, _super_blocks, _q6_k_unit)}
# FMAs into an accumulator lane per block of 32, by kernel id (the error bound counts a rounding for each)
LANE_FMAS_PER_BLOCK = (0.5,) * 6


def _load_mask(builder, c, records, nb):
    """The step's constants: TIMES_256_MASK, stored after the records."""
    n_pairs = builder.lshr(builder.add(nb, c(1)), c(1))
    return {"mask": load_at(builder, records, builder.mul(n_pairs, c(PAIR_BYTES)), _v64b, 64)}


rows_dot = make_rows_dot(ROWS_PER_STEP, [STEPS[kind] for kind in range(len(STEPS))], 16, PREFETCH_BYTES,
                         _load_mask)
row_dot = rows_dot if ROWS_PER_STEP == 1 else make_rows_dot(1, [STEPS[kind] for kind in range(len(STEPS))], 16,
                                                            PREFETCH_BYTES, _load_mask)


def rows_columns_dot(n_rows, n_columns):
    """The kernel of n_rows rows × n_columns activations (int_rows.make_rows_columns_dot, this set's steps): each
    column's sums are rows_dot's."""
    return make_rows_columns_dot(n_rows, n_columns, [STEPS[kind] for kind in range(len(STEPS))], 16,
                                 PREFETCH_BYTES, _load_mask)
