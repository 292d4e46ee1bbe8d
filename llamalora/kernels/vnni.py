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
for Q4_1 the lane sums of x and their FMA, for Q4_K the block sums and theirs) and the final 16-lane reduction: tests/test_vnni.py and
tests/test_vnni_k.py state the bound, 2^-24·((nb/2 + 10)·Σ_b Σ_j (|d q'_j| + |m_j|)·|x_j| + 1.02·Σ_b max_b|x|·
Σ_j |d q'_j|) over the blocks b of 32 (d the weight's scale: Q4_K's and Q6_K's d·sc of its sub-block).

Streaming: decode reads every weight from memory once per token, and the hardware prefetchers alone left
the loop waiting on loads at half its in-cache speed. Each row's stream is prefetched 8 KB ahead (past a
row's end that is the rows after it) and two rows go through a step together, sharing the record loads.
On the one-token path of a random 1B-shaped Q4_0 llama (560 MB of weights, one core of an AVX-512 Xeon)
that took the matrix × vector from 5.6 to 10.5 GB/s; SmolLM2's Q4_1 from 7 to 14, its Q8_0 from 8.4 to 18.5
(benchmarks/bench_kernels.py --stream). The same machinery (vnni_rows.py: the activation records,
make_rows_dot) serves every type: a step is a block pair for the 32-value types, a super-block for the K-quants.

A block whose largest |x| is not finite or outside [TINY, HUGE] makes the kernels return False without
writing anything; the caller then takes the portable kernel, so NaN, inf and extreme activations behave
exactly as there.

Selection: ENABLED when the compile target (target.py) has AVX-512 F, BW and VNNI, unless
LLAMALORA_KERNELS=portable. The type modules (and dispatch.matvec) call these kernels when ENABLED and fall back to the portable ones
otherwise; the drivers share one compiled `matvec(kind, ...)`, branching per step on the kind.
"""

import os

import numpy as np
from llvmlite import ir
from numba import njit, prange

from . import low_rank, simd, target
from .vnni_rows import (CORRECTIONS_AT, LAYOUT_K, LAYOUT_Q4, LAYOUT_Q8, N_LIMBS, ROWS_PER_STEP, SCALES_AT, SUMS_AT,
                        RowStep, block_heads, chained_limbs, dpbusd, lane_blocks, lanes_of, load_at, make_rows_dot,
                        prefetch_ahead, quantize_activation, record_part, splat_i32, times_256)

# (block bytes, offset of q, weight offset k, layout) per type
GEOMETRY = {"q4_0": (18, 2, 8, LAYOUT_Q4), "q4_1": (20, 4, 0, LAYOUT_Q4), "q8_0": (34, 2, 128, LAYOUT_Q8),
            "q5_0": (22, 6, 16, LAYOUT_Q4)}
Q5_QH_OFFSET = 2  # Q5_0's 32-bit word of fifth bits (bit j: weight j's)

_f32, _i8, _i32 = ir.FloatType(), ir.IntType(8), ir.IntType(32)
_v16f, _v16i, _v64b = ir.VectorType(_f32, 16), ir.VectorType(_i32, 16), ir.VectorType(_i8, 64)


def target_has_vnni() -> bool:
    """Whether the target numba compiles for has AVX-512 F, BW and VNNI (target.py)."""
    return target.has("avx512f", "avx512bw", "avx512vnni")


ENABLED = os.environ.get("LLAMALORA_KERNELS", "auto") != "portable" and target_has_vnni()


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
                prefetch_ahead(builder, c, row, start0, 1)  # a line per pair: 36 to 68 bytes
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


def _q4_k_unit(env, sb, prefetch):
    """One Q4_K super-block: pairs of sub-blocks (2p, 2p+1) are q bytes 32p..32p+31 (low nibbles: sub-block 2p,
    high: 2p+1), in the K layout's register order. acc[0] += Σ q·X · (d·sc·s) per pair, acc[1] += (dmin·m)·(block
    sums of x) once per super-block (from the records' sums parts)."""
    builder, c, records, mask = env["builder"], env["c"], env["records"], env["mask"]
    start = builder.mul(sb, c(144))
    a, shift, low, b, high = (ir.Constant(_v16i, t) for t in _q4_k_code_tables())
    scm = []   # per row: d·sc of the eight sub-blocks in lanes 0-7, dmin·m in lanes 8-15 (exact products)
    for row in env["rows"]:
        if prefetch:
            prefetch_ahead(builder, c, row, start, 144)
        head = builder.zext(load_at(builder, row, start, ir.VectorType(_i8, 16), 1), _v16i)
        code = builder.and_(builder.lshr(builder.shuffle_vector(head, head, a), shift), low)
        top = builder.shl(builder.lshr(builder.shuffle_vector(head, head, b), splat_i32(6)), splat_i32(4))
        code = builder.or_(code, builder.and_(top, high))
        d_dmin = lanes_of(builder, block_heads(builder, row, (start,), 2), [0] * 8 + [1] * 8)
        scm.append(builder.fmul(builder.uitofp(code, _v16f), d_dmin))
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
    v16b, v32b, v64i = ir.VectorType(_i8, 16), ir.VectorType(_i8, 32), ir.VectorType(_i32, 64)
    dsc = []   # per row: d·sc of the 16 sub-blocks (exact products)
    for row in env["rows"]:
        if prefetch:
            prefetch_ahead(builder, c, row, start, 210)
        sc = builder.sitofp(builder.sext(load_at(builder, row, builder.add(start, c(192)), v16b, 1), _v16i), _v16f)
        d = lanes_of(builder, block_heads(builder, row, (builder.add(start, c(208)),), 1), [0] * 16)
        dsc.append(builder.fmul(sc, d))
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


def _minus_minima(builder, accs):
    return builder.fsub(accs[0], accs[1])


# --- matrix × vector ----------------------------------------------------------------------------------

# Kernel ids of the drivers (their order indexes the tables below)
Q4_0, Q4_1, Q8_0, Q4_K, Q6_K, Q5_0 = range(6)
BLOCK_BYTES = (18, 20, 34, 144, 210, 22)
BLOCK_VALUES = (32, 32, 32, 256, 256, 32)
LAYOUTS = (LAYOUT_Q4, LAYOUT_Q4, LAYOUT_Q8, LAYOUT_K, LAYOUT_K, LAYOUT_Q4)

STEPS = {Q4_0: _block_pair_step("q4_0"), Q4_1: _block_pair_step("q4_1"), Q8_0: _block_pair_step("q8_0"),
         Q5_0: _block_pair_step("q5_0"), Q4_K: RowStep(2, _super_blocks, _q4_k_unit, finish=_minus_minima),
         Q6_K: RowStep(1, _super_blocks, _q6_k_unit)}
# One kernel for steps of ROWS_PER_STEP rows and one for a last single row, each switching on the kind
_rows_dot = make_rows_dot(ROWS_PER_STEP, [STEPS[kind] for kind in range(len(STEPS))])
_row_dot = make_rows_dot(1, [STEPS[kind] for kind in range(len(STEPS))])


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
    for rows data uint8[n_rows, ≥ n_blocks·BLOCK_BYTES[kind]] of the driver kind (Q4_0 ... Q6_K above); False
    (out untouched) for an x the integer path does not take.

    With a delta, the parallel loop runs over chunks of 16 rows, and each chunk adds its 16 outputs' s·B·t (t =
    a·x, formed first) right after its rows: s·B streams beside the weight, on every thread, instead of in a pass
    of its own after the loop. The sums are those of low_rank.add_low_rank_matvec after W·x. a_next (the A
    factor the caller multiplies next, or an empty array) is prefetched into L2 a share per chunk, so that its
    serial a·x reads it from cache. one_thread: the caller runs on one thread (numba's get_num_threads() == 1,
    which compiled code cannot read and still be cached); the rows then go through a plain loop (decode on one
    thread: +1.2-1.5% tokens/s against a one-thread OpenMP loop, SmolLM2 Q4_1 and the 1B-shaped q4_0). (SmolLM2 Q4_1 with an all-linear r=16 adapter, decode with / without it,
    one thread: 0.86 with the delta after the loop, 0.88 inside it, 0.89-0.90 with a_next prefetched.)"""
    if data.strides[1] != 1 or x.strides[0] != 4 or out.strides[0] != 4:
        raise ValueError("kernel arrays need contiguous rows (data uint8, x float32)")
    if x.shape[0] % BLOCK_VALUES[kind] != 0 or data.shape[1] < x.shape[0] // BLOCK_VALUES[kind] * BLOCK_BYTES[kind]:
        raise ValueError("kernel arrays disagree in shape (data rows, x length)")
    if out.shape[0] != data.shape[0]:
        raise ValueError("kernel output has the wrong shape")
    nb = x.shape[0] // 32
    buf, records, ok = quantize_activation(x, LAYOUTS[kind])
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
