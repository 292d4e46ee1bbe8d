"""The integer matvec kernels for Q4_K and Q6_K (intmatvec.py: AVX-512 VNNI or AVX2; tests/test_avx2_target.py
runs this file for an AVX2 target too): W·x within float32 rounding of float64 products of the dequantized
weights, on quantized, random and adversarial super-blocks; extreme activations fall back to the portable kernels.

The bound (llamalora/kernels/vnni.py, avx2.py), as for the 32-value types: a weight is D·q'_j + m_j with D the
sub-block's exact float32 scale (Q4_K: d·sc, q' = q, m = −dmin·m_code; Q6_K: d·sc, q' = q − 32, m = 0). The
activation's blocks of 32 (one per Q4_K sub-block, two per Q6_K pair of sub-blocks of 16: a sub-block never
straddles one) are used as s_b·X_j with |x_j − s_b·X_j| ≤ 1.01·2^-24·max_b|x|, so with A = Σ_b max_b|x|·Σ_j
|D q'_j| and M = Σ_b Σ_j (|D q'_j| + |m_j|)·|x_j|: |error| ≤ 2^-24·((f·nb + 10)·M + 1.02·A), nb the number of
32-blocks, f·nb the FMAs into an accumulator lane (f = intmatvec.LANE_FMAS_PER_BLOCK: VNNI 1/2; AVX2 1, Q6_K 2).
The other roundings per lane: t → float, D·s, Q4_K's block sums of x (1, from float64) with their own FMA chain
(one per super-block) and the final subtraction, the lane reduction (at most 4). K-quant rows are whole
super-blocks of 256, so nb is always even (no odd last block here).
"""

from functools import partial

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from llamalora import kernels
from llamalora.kernels import dispatch, intmatvec, low_rank, q4_k, q6_k
from test_int_kernels import extreme_activations, raw_blocks as block_rows, strided_view

pytestmark = pytest.mark.skipif(not intmatvec.ENABLED, reason="no integer kernels for the compile target")

DRIVERS = {T.Q4_K: intmatvec.Q4_K, T.Q6_K: intmatvec.Q6_K}
KERNELS = {qtype: partial(intmatvec.matvec_without_delta, driver) for qtype, driver in DRIVERS.items()}
MODULES = {T.Q4_K: q4_k, T.Q6_K: q6_k}
NO_DELTA = (intmatvec.NO_FACTORS, intmatvec.NO_PACKED_B)
BLOCK_BYTES = {T.Q4_K: 144, T.Q6_K: 210}


def decompose(data, qtype):
    """float64 D and m [rows, n_cols] (per weight) and integer q' [rows, n_cols] with weight = D·q' + m."""
    n_rows = data.shape[0]
    blocks = np.ascontiguousarray(data).reshape(n_rows, -1, BLOCK_BYTES[qtype]).astype(np.int64)
    scale, minimum = (a.astype(np.float64) for a in MODULES[qtype].scales(np.ascontiguousarray(data)))
    if qtype == T.Q4_K:
        qs = blocks[:, :, 16:144].reshape(n_rows, -1, 4, 32)           # [rows, sb, pair, byte]
        q = np.stack([qs & 15, qs >> 4], axis=3).reshape(n_rows, -1)   # sub-block 2i low, 2i+1 high nibbles
        per = 32
    else:
        ql, qh = blocks[:, :, 0:128].reshape(n_rows, -1, 2, 64), blocks[:, :, 128:192].reshape(n_rows, -1, 2, 32)
        parts = []
        for i in range(4):  # weight 32i + l of a half: nibble i // 2 of ql[32·(i % 2) + l], qh bits 2i, 2i+1
            low = (ql[..., 32 * (i % 2):32 * (i % 2) + 32] >> (4 * (i // 2))) & 15
            parts.append(low | (((qh >> (2 * i)) & 3) << 4))
        q = np.stack(parts, axis=3).reshape(n_rows, -1) - 32
        minimum = np.zeros_like(scale)
        per = 16
    return np.repeat(scale, per, axis=1), np.repeat(minimum, per, axis=1), q


def reference_and_bound(data, qtype, x):
    D, m, q = decompose(data, qtype)
    x64 = x.astype(np.float64)
    ref = (D * q + m) @ x64
    nb = x.shape[0] // 32
    ax = np.abs(x64)
    top = np.repeat(ax.reshape(nb, 32).max(axis=1), 32)
    dq = np.abs(D * q)
    M = (dq + np.abs(m)) @ ax
    A = dq @ top
    k = intmatvec.LANE_FMAS_PER_BLOCK[DRIVERS[qtype]] * nb + 10
    return ref, 2.0 ** -24 * (k * M + 1.02 * A), M


def check(data, qtype, x):
    out = np.full(data.shape[0], np.nan, dtype=np.float32)
    assert KERNELS[qtype](data, x, out)
    ref, bound, M = reference_and_bound(data, qtype, x)
    err = np.abs(out.astype(np.float64) - ref)
    assert np.all(np.isfinite(out))
    assert np.all(err <= bound), np.max(err / bound)
    return out, err, M


def raw_blocks(rng, qtype, n_rows, n_sb, d_scale=0.01):
    """Random valid rows: random bytes (any 6-bit codes, int8 sub-block scales, q bits) with finite halves of both
    signs for d (and Q4_K's dmin)."""
    bb = BLOCK_BYTES[qtype]
    data = rng.integers(0, 256, (n_rows, n_sb, bb), dtype=np.uint8)
    if qtype == T.Q4_K:
        halves = (rng.standard_normal((n_rows, n_sb, 2)) * d_scale).astype(np.float16)
        data[:, :, 0:4] = halves.view(np.uint8).reshape(n_rows, n_sb, 4)
    else:
        halves = (rng.standard_normal((n_rows, n_sb, 1)) * d_scale).astype(np.float16)
        data[:, :, 208:210] = halves.view(np.uint8).reshape(n_rows, n_sb, 2)
    return data.reshape(n_rows, n_sb * bb)


def test_decompose_agrees_with_the_dequantizer():
    rng = np.random.default_rng(1)
    for qtype, module in MODULES.items():
        data = raw_blocks(rng, qtype, 5, 2)
        D, m, q = decompose(data, qtype)
        assert np.allclose(D * q + m, module.dequantize(data, 512), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K])
def test_quantized_matrices_within_float32_rounding(qtype):
    rng = np.random.default_rng(11)
    W = rng.standard_normal((300, 1536)).astype(np.float32)
    data = MODULES[qtype].quantize(W)
    x = rng.standard_normal(1536).astype(np.float32)
    x[::37] *= 30  # outliers, as the residual stream has
    out, err, M = check(data, qtype, x)
    assert np.max(err / M) < 1e-5  # and in practice far inside the bound


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K])
@pytest.mark.parametrize("n_sb", [1, 2, 3, 5])
def test_random_blocks_any_super_block_count(qtype, n_sb):
    rng = np.random.default_rng(n_sb)
    data = raw_blocks(rng, qtype, 37, n_sb)
    n_cols = 256 * n_sb
    x = (rng.standard_normal(n_cols) * np.exp(rng.uniform(-8, 8, n_cols))).astype(np.float32)
    check(data, qtype, x)


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K])
def test_adversarial_activations(qtype):
    rng = np.random.default_rng(3)
    n_cols = 3 * 256
    data = raw_blocks(rng, qtype, 64, 3)
    cases = []
    x = rng.standard_normal(n_cols).astype(np.float32) * np.float32(1e-3)
    x[::32] = 1e4                       # one huge value per block beside small ones
    cases.append(x)
    x = np.zeros(n_cols, np.float32)
    x[40:72] = rng.standard_normal(32)  # zero blocks beside a non-zero one (straddling two blocks)
    cases.append(x)
    cases.append(np.full(n_cols, -3.0e5, np.float32))   # every X at -X_MAX: the limbs' extremes
    cases.append(np.full(n_cols, 7.0e-20, np.float32))
    x = rng.standard_normal(n_cols).astype(np.float32)
    x[::2] = -x[::2]
    x[5] = np.nextafter(np.float32(2.0) ** 100, np.float32(0))  # just inside the range the kernel takes
    cases.append(x)
    cases.append(np.zeros(n_cols, np.float32))
    for x in cases:
        out, _, _ = check(data, qtype, x)
        if not np.any(x):
            assert np.all(out == 0)


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K])
def test_extreme_weights(qtype):
    """Every q byte at its extreme, the largest sub-block codes (Q4_K 63, Q6_K −128 or 127) and halves, activations
    at ±max: Q6_K's Σ q·X reaches 4·63·X_MAX, within 1% of the int32 range, before its correction."""
    n_sb, bb = 2, BLOCK_BYTES[qtype]
    rng = np.random.default_rng(5)
    for byte in (0x00, 0xFF, 0x80, 0x7F):
        data = np.full((8, n_sb, bb), byte, dtype=np.uint8)
        halves = np.full((8, n_sb, 2), 60000.0, np.float16)
        halves[::2] *= -1
        if qtype == T.Q4_K:
            data[:, :, 0:4] = halves.view(np.uint8).reshape(8, n_sb, 4)
        else:
            data[:, :, 208:210] = halves[:, :, :1].view(np.uint8).reshape(8, n_sb, 2)
        data = data.reshape(8, n_sb * bb)
        for x in (np.full(n_sb * 256, 1.0e6, np.float32), np.full(n_sb * 256, -1.0e6, np.float32),
                  np.where(rng.random(n_sb * 256) < 0.5, -1.0, 1.0).astype(np.float32)):
            check(data, qtype, x)


def test_rows_may_be_a_strided_view():
    rng = np.random.default_rng(6)
    for qtype in KERNELS:
        data = raw_blocks(rng, qtype, 33, 2)
        x = rng.standard_normal(512).astype(np.float32)
        out, _, _ = check(strided_view(data), qtype, x)
        out_contiguous, _, _ = check(data, qtype, x)
        assert np.array_equal(out, out_contiguous)


def portable(qtype, data, x):
    out = np.empty(data.shape[0], np.float32)
    MODULES[qtype]._matvec(data, *MODULES[qtype].scales(data), x, out)
    return out


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K])
def test_extreme_activations_fall_back_to_the_portable_kernel(qtype):
    rng = np.random.default_rng(7)
    data = raw_blocks(rng, qtype, 16, 2)
    prepared = MODULES[qtype].prepare(data, 512)
    kind = int(qtype)
    arrays = dispatch.uniform_arrays(kernels.Weight(qtype, 16, 512, prepared))
    for x in extreme_activations(rng, 512):
        out = np.full(16, 7.0, np.float32)
        assert not KERNELS[qtype](data, x, out)
        assert np.all(out == 7.0)  # untouched
        expected = portable(qtype, data, x)
        MODULES[qtype].matvec(prepared, x, out)
        assert np.array_equal(out, expected, equal_nan=True)
        compiled = np.full(16, 7.0, np.float32)
        dispatch.matvec(dispatch.ALL_KINDS, kind, *arrays[1:], x, compiled, *NO_DELTA, intmatvec.NO_FACTORS, False)
        assert np.array_equal(compiled, expected, equal_nan=True)


def test_type_modules_and_dispatch_use_the_integer_kernel_when_enabled():
    rng = np.random.default_rng(8)
    for qtype, kernel in KERNELS.items():
        data = raw_blocks(rng, qtype, 20, 3)
        x = rng.standard_normal(768).astype(np.float32)
        direct, via_module, compiled = (np.empty(20, np.float32) for _ in range(3))
        kernel(data, x, direct)
        prepared = MODULES[qtype].prepare(data, 768)
        MODULES[qtype].matvec(prepared, x, via_module)
        arrays = dispatch.uniform_arrays(kernels.Weight(qtype, 16, 512, prepared))
        dispatch.matvec(dispatch.ALL_KINDS, *arrays, x, compiled, *NO_DELTA, intmatvec.NO_FACTORS, False)
        expected = direct if intmatvec.ENABLED else portable(qtype, data, x)
        assert np.array_equal(via_module, expected)
        assert np.array_equal(compiled, expected)


def test_prepared_rows_keep_no_widened_scales_with_the_integer_kernels():
    """With the integer kernels a K-quant weight is its file bytes alone; prompt batches widen the scales per call and
    give what the scales widened at load give."""
    rng = np.random.default_rng(9)
    for qtype, module in MODULES.items():
        data = raw_blocks(rng, qtype, 37, 2)
        prepared = module.prepare(data, 512)
        assert (len(prepared) == 1) == intmatvec.ENABLED
        assert np.shares_memory(prepared[0], data)
        X = rng.standard_normal((9, 512)).astype(np.float32)
        batch, widened = np.empty((9, 37), np.float32), np.empty((9, 37), np.float32)
        module.matmul(prepared, X, batch)
        module.matmul((data, *module.scales(data)), X, widened)
        assert np.array_equal(batch, widened)


def test_bad_shapes_are_refused():
    data = raw_blocks(np.random.default_rng(9), T.Q4_K, 8, 1)
    out = np.empty(8, np.float32)
    with pytest.raises(ValueError):
        KERNELS[T.Q4_K](data, np.zeros(512, np.float32), out)  # x longer than a row
    with pytest.raises(ValueError):
        KERNELS[T.Q4_K](data, np.zeros(288, np.float32), out)  # not whole super-blocks
    with pytest.raises(ValueError):
        KERNELS[T.Q4_K](data, np.zeros(256, np.float32), np.empty(7, np.float32))


@pytest.mark.parametrize("rank", [16, 5])
def test_delta_inside_the_row_loop_equals_the_delta_after_it(rank):
    """dispatch.matvec with a run-time LoRA delta (added chunk by chunk inside the integer kernels' row loop) gives
    bit for bit W·x followed by low_rank.add_low_rank_matvec, for every integer-kernel type: 37 rows (a last chunk
    partial and odd) and 149 (with int_rows.SPREAD_ROWS, two groups of four spread chunks and then a whole and a
    partial chunk on their own)."""
    rng = np.random.default_rng(rank)
    for qtype in (T.Q4_0, T.Q4_1, T.Q8_0, T.Q5_0, T.Q4_K, T.Q6_K):
        for n_rows in (37, 149):
            data = raw_blocks(rng, qtype, n_rows, 2) if qtype in MODULES else block_rows(rng, qtype, n_rows, 16)
            prepared = kernels.type_module(qtype).prepare(data, 512)
            arrays = dispatch.uniform_arrays(kernels.Weight(qtype, n_rows, 512, prepared))
            x = rng.standard_normal(512).astype(np.float32)
            a = rng.standard_normal((rank, 512)).astype(np.float32)
            packed_b = kernels.pack_scaled_b(rng.standard_normal((n_rows, rank)))
            after = np.empty(n_rows, np.float32)
            dispatch.matvec(dispatch.ALL_KINDS, *arrays, x, after, *NO_DELTA, intmatvec.NO_FACTORS, False)
            without = after.copy()
            low_rank.add_low_rank_matvec(a, packed_b, x, after)
            for one_thread in (False, True):
                fused = np.empty(n_rows, np.float32)
                dispatch.matvec(dispatch.ALL_KINDS, *arrays, x, fused, a, packed_b, a, one_thread)  # (a as the next weight's A)
                assert np.array_equal(fused, after), (qtype.name, n_rows, one_thread)
            assert np.abs(fused - without).min() > 0  # the delta is there in every row
