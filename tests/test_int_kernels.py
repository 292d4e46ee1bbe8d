"""The integer matvec kernels (intmatvec.py: AVX-512 VNNI or AVX2, whichever the compile target has; tests/
test_avx2_target.py runs this file for an AVX2 target too): W·x within float32 rounding of float64 products of
the dequantized weights, on real, random and adversarial blocks; extreme activations fall back to the portable
kernels.

The bound (llamalora/kernels/vnni.py, avx2.py): a block b of the kernel multiplies integers q'_j (Q4_0: q - 8,
Q4_1: q, Q8_0: q, Q5_0: q - 16) by X_j = round(x_j / s_b), s_b = max_b|x| / 8355000, so each x_j is used with an error
|δ_j| ≤ s_b/2 ≤ 1.01·2^-24·max_b|x|, contributing at most 1.01·2^-24·A, A = Σ_b max_b|x|·Σ_j |d_b q'_j|.
The rest is float32 rounding: per lane, t → float (1), d·s (1), the FMAs into the accumulator (f·nb of them: f =
intmatvec.LANE_FMAS_PER_BLOCK, VNNI's 1/2 (one per block pair), AVX2's 1), Q8_0's last limb (2) or Q4_1's lane
sums of x (3), the lane reduction (at most 4) and the last add (1): k = f·nb + 10 roundings of at most 2^-24
relative to M = Σ_b Σ_j (|d_b q'_j| + |m_b|)·|x_j| (M = Σ|w||x| for Q4_0 and Q8_0). So |error| ≤ 2^-24·((f·nb +
10)·M + 1.01·A) (plus 2^-24·(f·nb + 10)·A for the δ's own rounding, which the factor 1.01 → 1.02 covers amply; we
use 1.02).
"""

from functools import partial

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import quants

from llamalora.kernels import intmatvec, q4_0, q4_1, q5_0, q8_0, simd

pytestmark = pytest.mark.skipif(not intmatvec.ENABLED, reason="no integer kernels for the compile target")

DRIVERS = {T.Q4_0: intmatvec.Q4_0, T.Q4_1: intmatvec.Q4_1, T.Q8_0: intmatvec.Q8_0, T.Q5_0: intmatvec.Q5_0}
KERNELS = {qtype: partial(intmatvec.matvec_without_delta, driver) for qtype, driver in DRIVERS.items()}
MODULES = {T.Q4_0: q4_0, T.Q4_1: q4_1, T.Q8_0: q8_0, T.Q5_0: q5_0}
BLOCK_BYTES = {T.Q4_0: 18, T.Q4_1: 20, T.Q8_0: 34, T.Q5_0: 22}
ALL_TYPES = [T.Q4_0, T.Q4_1, T.Q8_0, T.Q5_0]


def decompose(data, qtype):
    """float64 d, m [rows, nb] and integer q' [rows, nb, 32] with weight = d·q' + m (the kernel's split)."""
    n_rows = data.shape[0]
    blocks = np.ascontiguousarray(data).reshape(n_rows, -1, BLOCK_BYTES[qtype])
    d = np.ascontiguousarray(blocks[:, :, 0:2]).view(np.float16)[..., 0].astype(np.float64)
    m = np.zeros_like(d)
    if qtype == T.Q8_0:
        q = np.ascontiguousarray(blocks[:, :, 2:]).view(np.int8).astype(np.int64)
    elif qtype == T.Q5_0:
        qs = blocks[:, :, 6:].astype(np.int64)
        qh = np.ascontiguousarray(blocks[:, :, 2:6]).view(np.uint32).astype(np.int64)  # [rows, nb, 1]
        fifth = (qh >> np.arange(32)) & 1
        q = np.concatenate([qs & 15, qs >> 4], axis=2) + 16 * fifth - 16
    else:
        offset = 4 if qtype == T.Q4_1 else 2
        qs = blocks[:, :, offset:].astype(np.int64)
        q = np.concatenate([qs & 15, qs >> 4], axis=2)
        if qtype == T.Q4_0:
            q = q - 8
        else:
            m = np.ascontiguousarray(blocks[:, :, 2:4]).view(np.float16)[..., 0].astype(np.float64)
    return d, m, q


def error_bound(data, qtype, x):
    d, m, q = decompose(data, qtype)
    nb = d.shape[1]
    ax = np.abs(x.astype(np.float64)).reshape(nb, 32)
    dq = np.abs(d[:, :, None] * q)                                  # |d q'| [rows, nb, 32]
    M = np.einsum("rbj,bj->r", dq + np.abs(m)[:, :, None], ax)
    A = np.einsum("rbj,b->r", dq, ax.max(axis=1))
    k = intmatvec.LANE_FMAS_PER_BLOCK[DRIVERS[qtype]] * nb + 10
    return 2.0 ** -24 * (k * M + 1.02 * A), M


def reference(data, qtype, x):
    W = quants.dequantize(np.ascontiguousarray(data), qtype).astype(np.float64)
    return W @ x.astype(np.float64)


def check(data, qtype, x):
    out = np.full(data.shape[0], np.nan, dtype=np.float32)
    assert KERNELS[qtype](data, x, out)
    err = np.abs(out.astype(np.float64) - reference(data, qtype, x))
    bound, M = error_bound(data, qtype, x)
    assert np.all(np.isfinite(out))
    assert np.all(err <= bound), np.max(err / bound)
    return out, err, M


def raw_blocks(rng, qtype, n_rows, nb, d_scale=0.01):
    """Random valid rows: random q bytes, half scales (and Q4_1 minima) of both signs."""
    bb = BLOCK_BYTES[qtype]
    data = rng.integers(0, 256, (n_rows, nb, bb), dtype=np.uint8)
    n_halves = 2 if qtype == T.Q4_1 else 1
    halves = (rng.standard_normal((n_rows, nb, n_halves)) * d_scale).astype(np.float16)
    data[:, :, :2 * n_halves] = halves.view(np.uint8).reshape(n_rows, nb, 2 * n_halves)
    return data.reshape(n_rows, nb * bb)


def portable(qtype, data, x):
    """The portable kernel's W·x (the block scales widened from the rows)."""
    out = np.empty(data.shape[0], np.float32)
    module = MODULES[qtype]
    scales = module.scales(data)
    if qtype == T.Q8_0:
        simd.q8_matvec(data, scales[0], x, out)
    elif qtype == T.Q5_0:
        module._matvec(data, *scales, x, out)
    else:
        simd.q4_matvec(data, scales[0], scales[1], module.QS_OFFSET, module.TYPE_SIZE, x, out)
    return out


@pytest.fixture(scope="module")
def smollm2_tensors(smollm2_path):
    reader = gguf.GGUFReader(smollm2_path)
    return {t.name: t for t in reader.tensors}


def test_real_matrices_within_float32_rounding(smollm2_tensors):
    rng = np.random.default_rng(11)
    for name, n_rows in (("blk.0.ffn_up.weight", None), ("blk.0.ffn_down.weight", None),
                         ("blk.0.attn_k.weight", None), ("token_embd.weight", 3001)):
        tensor = smollm2_tensors[name]
        data = np.asarray(tensor.data)[:n_rows]
        qtype = T(tensor.tensor_type)
        x = rng.standard_normal(data.shape[1] // BLOCK_BYTES[qtype] * 32).astype(np.float32)
        x[::37] *= 30  # outliers, as the residual stream has
        out, err, M = check(data, qtype, x)
        # and in practice far inside the bound: the portable kernels' test tolerance
        assert np.max(err / M) < 1e-5


@pytest.mark.parametrize("qtype", ALL_TYPES)
@pytest.mark.parametrize("nb", [1, 2, 3, 5, 18, 49])
def test_random_blocks_any_block_count(qtype, nb):
    rng = np.random.default_rng(nb)
    data = raw_blocks(rng, qtype, 37, nb)
    x = (rng.standard_normal(nb * 32) * np.exp(rng.uniform(-8, 8, nb * 32))).astype(np.float32)
    check(data, qtype, x)


@pytest.mark.parametrize("qtype", ALL_TYPES)
def test_adversarial_activations(qtype):
    rng = np.random.default_rng(3)
    nb = 7
    data = raw_blocks(rng, qtype, 64, nb)
    cases = []
    x = rng.standard_normal(nb * 32).astype(np.float32) * np.float32(1e-3)
    x[::32] = 1e4                     # one huge value per block beside small ones
    cases.append(x)
    x = np.zeros(nb * 32, np.float32)
    x[40:72] = rng.standard_normal(32)  # zero blocks beside a non-zero one (straddling two blocks)
    cases.append(x)
    cases.append(np.full(nb * 32, -3.0e5, np.float32))   # every X at -X_MAX: the limbs' extremes
    cases.append(np.full(nb * 32, 7.0e-20, np.float32))
    x = rng.standard_normal(nb * 32).astype(np.float32)
    x[::2] = -x[::2]
    x[5] = np.nextafter(np.float32(2.0) ** 100, np.float32(0))  # just inside the range the kernel takes
    cases.append(x)
    cases.append(np.zeros(nb * 32, np.float32))
    for x in cases:
        out, _, _ = check(data, qtype, x)
        if not np.any(x):
            assert np.all(out == 0)


@pytest.mark.parametrize("qtype", ALL_TYPES)
def test_extreme_weights(qtype):
    """Every byte at its extreme (Q8_0: all -128 or all 127; 4-bit: all nibbles 0 or 15) with the largest
    scales a half holds and activations at ±max: the int32 lanes must not overflow."""
    nb, bb = 4, BLOCK_BYTES[qtype]
    rng = np.random.default_rng(5)
    for byte in (0x80, 0x7F, 0x00, 0xFF):
        data = np.full((8, nb * bb), byte, dtype=np.uint8).reshape(8, nb, bb)
        n_halves = 2 if qtype == T.Q4_1 else 1
        halves = np.full((8, nb, n_halves), 60000.0, np.float16)
        halves[::2] *= -1
        data[:, :, :2 * n_halves] = halves.view(np.uint8).reshape(8, nb, 2 * n_halves)
        data = data.reshape(8, nb * bb)
        for x in (np.full(nb * 32, 1.0e6, np.float32), np.full(nb * 32, -1.0e6, np.float32),
                  np.where(rng.random(nb * 32) < 0.5, -1.0, 1.0).astype(np.float32)):
            check(data, qtype, x)


def strided_view(data):
    """The same rows as a view whose row stride is 11 bytes longer than a row (each row 3 bytes in)."""
    padded = np.zeros((data.shape[0], data.shape[1] + 11), dtype=np.uint8)
    padded[:, 3:3 + data.shape[1]] = data
    return padded[:, 3:3 + data.shape[1]]


def test_rows_may_be_a_strided_view():
    rng = np.random.default_rng(6)
    for qtype in KERNELS:
        data = raw_blocks(rng, qtype, 33, 9)
        x = rng.standard_normal(9 * 32).astype(np.float32)
        out, _, _ = check(strided_view(data), qtype, x)
        out_contiguous, _, _ = check(data, qtype, x)
        assert np.array_equal(out, out_contiguous)


def extreme_activations(rng, n_cols):
    """Activations the integer kernels decline: a NaN, ±inf, a block whose largest |x| is below TINY, one above HUGE."""
    for value in (np.nan, np.inf, -np.inf, 1e-31, 3e30):
        x = rng.standard_normal(n_cols).astype(np.float32)
        if value == 1e-31:
            x[64:96] = value
        else:
            x[70] = value
        yield x


@pytest.mark.parametrize("qtype", ALL_TYPES)
def test_extreme_activations_fall_back_to_the_portable_kernel(qtype):
    rng = np.random.default_rng(7)
    nb = 5
    data = raw_blocks(rng, qtype, 16, nb)
    n_cols = nb * 32
    prepared = MODULES[qtype].prepare(data, n_cols)
    for x in extreme_activations(rng, n_cols):
        out = np.full(16, 7.0, np.float32)
        assert not KERNELS[qtype](data, x, out)
        assert np.all(out == 7.0)  # untouched
        MODULES[qtype].matvec(prepared, x, out)
        assert np.array_equal(out, portable(qtype, data, x), equal_nan=True)


def test_type_modules_use_the_integer_kernel_when_enabled():
    rng = np.random.default_rng(8)
    for qtype, kernel in KERNELS.items():
        data = raw_blocks(rng, qtype, 20, 6)
        x = rng.standard_normal(6 * 32).astype(np.float32)
        direct, via_module = (np.empty(20, np.float32) for _ in range(2))
        kernel(data, x, direct)
        prepared = MODULES[qtype].prepare(data, 6 * 32)
        MODULES[qtype].matvec(prepared, x, via_module)
        assert np.array_equal(via_module, direct if intmatvec.ENABLED else portable(qtype, data, x))


def test_bad_layout_is_refused():
    data = raw_blocks(np.random.default_rng(9), T.Q4_0, 8, 2)
    out = np.empty(8, np.float32)
    with pytest.raises(ValueError):
        KERNELS[T.Q4_0](data, np.zeros(96, np.float32), out)  # x longer than a row
    with pytest.raises(ValueError):
        KERNELS[T.Q4_0](data, np.zeros(128, np.float32)[::2], out)  # x not contiguous
    with pytest.raises(ValueError):
        KERNELS[T.Q4_0](data, np.zeros(64, np.float32), np.empty(7, np.float32))


def test_prepared_rows_keep_no_widened_scales_with_the_integer_kernels():
    """With the integer kernels a weight is its file bytes alone (no float32 scale arrays beside them); prompt batches
    widen the scales per call and give what the scales widened at load give."""
    rng = np.random.default_rng(9)
    for qtype in KERNELS:
        data = raw_blocks(rng, qtype, 37, 5)
        prepared = MODULES[qtype].prepare(data, 5 * 32)
        assert (len(prepared) == 1) == intmatvec.ENABLED
        assert np.shares_memory(prepared[0], data)
        X = rng.standard_normal((9, 5 * 32)).astype(np.float32)
        batch, widened = np.empty((9, 37), np.float32), np.empty((9, 37), np.float32)
        MODULES[qtype].matmul(prepared, X, batch)
        MODULES[qtype].matmul((data, *MODULES[qtype].scales(data)), X, widened)
        assert np.array_equal(batch, widened)
