"""Vector kernels: W·x and X·Wᵀ equal float64 products of the reference-dequantized weights (4- and 8-bit blocks
in simd, 2-byte floats in halfdot)."""

import gguf
import numba
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import quants

from llamalora import kernels
from llamalora.kernels import halfdot, simd
from llamalora.tensor import Tensor

LAYOUT = {T.Q4_0: (18, 2), T.Q4_1: (20, 4), T.Q8_0: (34, 2)}  # block bytes, offset of q in a block
TOLERANCE = 1e-5


def scales(data: np.ndarray, qtype) -> tuple:
    """float32 d and m [n_rows, n_blocks] of raw rows (Q4_0: m = -8·d; Q8_0: no m)."""
    block_bytes, _ = LAYOUT[qtype]
    blocks = np.ascontiguousarray(data).reshape(data.shape[0], -1, block_bytes)
    d = np.ascontiguousarray(blocks[:, :, 0:2]).view(np.float16)[..., 0].astype(np.float32)
    if qtype == T.Q4_1:
        m = np.ascontiguousarray(blocks[:, :, 2:4]).view(np.float16)[..., 0].astype(np.float32)
    else:
        m = np.float32(-8.0) * d
    return d, m


def run_matvec(kernel_q4, kernel_q8, qtype, data, d, m, x):
    out = np.full(data.shape[0], np.nan, dtype=np.float32)
    block_bytes, qs_offset = LAYOUT[qtype]
    if qtype == T.Q8_0:
        kernel_q8(data, d, x, out)
    else:
        kernel_q4(data, d, m, qs_offset, block_bytes, x, out)
    return out


def run_matmul(qtype, data, d, m, X):
    out = np.full((X.shape[0], data.shape[0]), np.nan, dtype=np.float32)
    block_bytes, qs_offset = LAYOUT[qtype]
    if qtype == T.Q8_0:
        simd.q8_matmul(data, d, X, out)
    else:
        simd.q4_matmul(data, d, m, qs_offset, block_bytes, X, out)
    return out


def assert_close_to_reference(out, W64, x):
    """Each output within TOLERANCE of float64 W·x, relative to Σ|w||x| (the scale of its rounding)."""
    x64 = x.astype(np.float64)
    ref = W64 @ x64
    bound = np.abs(W64) @ np.abs(x64)
    assert np.all(np.isfinite(out))
    err = np.abs(out.astype(np.float64) - ref)
    assert np.max(err / bound) < TOLERANCE, np.max(err / bound)
    assert np.max(err) < TOLERANCE * np.max(np.abs(ref))


@pytest.fixture(scope="module")
def smollm2_tensors(smollm2_path):
    reader = gguf.GGUFReader(smollm2_path)
    return {t.name: t for t in reader.tensors}


def real_matrix(tensors, name, n_rows=None):
    tensor = tensors[name]
    data = np.asarray(tensor.data)[:n_rows]
    W64 = quants.dequantize(data, tensor.tensor_type).astype(np.float64)
    return T(tensor.tensor_type), data, W64


def random_q4_0(rng, n_rows=203, n_cols=320):
    w = rng.standard_normal((n_rows, n_cols)).astype(np.float32)
    w[::3] *= 50
    data = quants.quantize(w, T.Q4_0)
    return data, quants.dequantize(data, T.Q4_0).astype(np.float64)


def activations(rng, n_cols, batch=None):
    shape = (n_cols,) if batch is None else (batch, n_cols)
    x = rng.standard_normal(shape).astype(np.float32)
    x[..., ::37] *= 30  # a few outliers, as the residual stream has
    return x


def matrices(tensors):
    rng = np.random.default_rng(7)
    yield real_matrix(tensors, "blk.0.ffn_up.weight")          # Q4_1 1536 × 576
    yield real_matrix(tensors, "blk.0.ffn_down.weight")        # Q4_1 576 × 1536
    yield real_matrix(tensors, "blk.0.attn_k.weight")          # Q4_1 192 × 576
    yield real_matrix(tensors, "token_embd.weight", 4099)      # Q8_0, a row count that is not a multiple of 4
    yield (T.Q4_0,) + random_q4_0(rng)


@pytest.mark.parametrize("kernels", ["vector", "loop"])
def test_matvec_matches_float64_reference(smollm2_tensors, kernels):
    q4, q8 = (simd.q4_matvec, simd.q8_matvec) if kernels == "vector" else (simd.q4_matvec_loop, simd.q8_matvec_loop)
    rng = np.random.default_rng(1)
    seen = set()
    for qtype, data, W64 in matrices(smollm2_tensors):
        seen.add(qtype)
        d, m = scales(data, qtype)
        x = activations(rng, W64.shape[1])
        out = run_matvec(q4, q8, qtype, data, d, m, x)
        assert_close_to_reference(out, W64, x)
    assert seen == set(LAYOUT)


def test_vector_and_loop_kernels_agree(smollm2_tensors):
    rng = np.random.default_rng(2)
    for qtype, data, W64 in matrices(smollm2_tensors):
        d, m = scales(data, qtype)
        x = activations(rng, W64.shape[1])
        fast = run_matvec(simd.q4_matvec, simd.q8_matvec, qtype, data, d, m, x)
        plain = run_matvec(simd.q4_matvec_loop, simd.q8_matvec_loop, qtype, data, d, m, x)
        bound = np.abs(W64) @ np.abs(x.astype(np.float64))
        assert np.max(np.abs(fast - plain) / bound) < 1e-6
        X = activations(rng, W64.shape[1], 5)
        tiled = run_matmul(qtype, data, d, m, X)
        looped = np.empty_like(tiled)
        block_bytes, qs_offset = LAYOUT[qtype]
        if qtype == T.Q8_0:
            simd.q8_matmul_loop(data, d, X, looped)
        else:
            simd.q4_matmul_loop(data, d, m, qs_offset, block_bytes, X, looped)
        bound = np.abs(X.astype(np.float64)) @ np.abs(W64.T)
        assert np.max(np.abs(tiled - looped) / bound) < 1e-6


@pytest.mark.parametrize("batch", [1, 3, 8, 37, 70])
def test_matmul_matches_float64_reference(smollm2_tensors, batch):
    rng = np.random.default_rng(batch)
    for qtype, data, W64 in matrices(smollm2_tensors):
        d, m = scales(data, qtype)
        X = activations(rng, W64.shape[1], batch)
        out = run_matmul(qtype, data, d, m, X)
        for t in range(batch):
            assert_close_to_reference(out[t], W64, X[t])


def test_rows_may_be_a_strided_view(smollm2_tensors):
    """Rows are views into a larger buffer (the memory-mapped file): the row stride exceeds the row length."""
    qtype, data, W64 = real_matrix(smollm2_tensors, "blk.0.attn_q.weight")
    padded = np.zeros((data.shape[0], data.shape[1] + 13), dtype=np.uint8)
    padded[:, 5:5 + data.shape[1]] = data
    view = padded[:, 5:5 + data.shape[1]]
    assert not view.flags.c_contiguous
    d, m = scales(data, qtype)
    x = activations(np.random.default_rng(3), W64.shape[1])
    out = run_matvec(simd.q4_matvec, simd.q8_matvec, qtype, view, d, m, x)
    assert_close_to_reference(out, W64, x)
    assert np.array_equal(out, run_matvec(simd.q4_matvec, simd.q8_matvec, qtype, data, d, m, x))


def test_zero_activation_gives_zero_and_unit_vectors_pick_columns():
    rng = np.random.default_rng(4)
    data, W64 = random_q4_0(rng, n_rows=9, n_cols=64)
    d, m = scales(data, T.Q4_0)
    zero = run_matvec(simd.q4_matvec, simd.q8_matvec, T.Q4_0, data, d, m, np.zeros(64, np.float32))
    assert np.all(zero == 0)
    for col in (0, 15, 16, 31, 32, 63):  # low and high nibbles of both blocks
        e = np.zeros(64, np.float32)
        e[col] = 1
        out = run_matvec(simd.q4_matvec, simd.q8_matvec, T.Q4_0, data, d, m, e)
        assert np.array_equal(out, W64[:, col].astype(np.float32))


def test_bad_layout_is_refused():
    rng = np.random.default_rng(5)
    data, _ = random_q4_0(rng, n_rows=8, n_cols=64)
    d, m = scales(data, T.Q4_0)
    out = np.empty(8, np.float32)
    with pytest.raises(ValueError):
        simd.q4_matvec(data, d, m, 2, 18, np.zeros(96, np.float32), out)  # x longer than a row
    with pytest.raises(ValueError):
        simd.q4_matvec(data, d, m, 2, 18, np.zeros(128, np.float32)[::2], out)  # x not contiguous


# --- 2-byte floats (F16, BF16): halfdot ---------------------------------------------------------------------

def half_kernels(kind):
    """(matvec, matmul, widen_rows) compiled for one widening: the kernels need kind as a compile-time
    constant, and numba takes a closure's integer as one."""

    @numba.njit
    def matvec(bits, x, out):
        halfdot.matvec(kind, bits, x, out)

    @numba.njit
    def matmul(bits, x, out):
        halfdot.matmul(kind, bits, x, out)

    @numba.njit
    def widen(bits, out):
        halfdot.widen_rows(kind, bits, out)

    return matvec, matmul, widen


HALF_KERNELS = {  # kind: (matvec, matmul, widen, ggml type of the bits)
    "f16": (*half_kernels(halfdot.F16), T.F16),
    "f16-portable": (*half_kernels(halfdot.F16_PORTABLE), T.F16),
    "bf16": (*half_kernels(halfdot.BF16), T.BF16),
}


def half_rows(rng, ggml_type, n_rows, n_cols, row_pad=0):
    """uint16 bits [n_rows, n_cols] of random weights in ggml_type (a view with a wider row stride when row_pad)
    and their exact float64 values."""
    w = rng.standard_normal((n_rows, n_cols)).astype(np.float32)
    w[::3] *= 50
    w[1::7] *= 1e-6
    data = kernels.quantize(ggml_type, w)
    W64 = quants.dequantize(data, ggml_type).reshape(n_rows, n_cols).astype(np.float64)
    bits = data.view(np.uint16)
    if row_pad:
        padded = np.zeros((n_rows, n_cols + row_pad), dtype=np.uint16)
        padded[:, 1:1 + n_cols] = bits
        bits = padded[:, 1:1 + n_cols]
        assert not bits.flags.c_contiguous
    return bits, W64


@pytest.mark.parametrize("kind", HALF_KERNELS)
@pytest.mark.parametrize("n_rows,n_cols,row_pad", [(37, 576, 0), (203, 200, 5), (5, 7, 0), (1, 16, 0), (3, 16, 2), (6, 1043, 9)])
def test_half_matvec_matches_float64_reference(kind, n_rows, n_cols, row_pad):
    matvec, _, _, ggml_type = HALF_KERNELS[kind]
    rng = np.random.default_rng(n_rows * n_cols)
    bits, W64 = half_rows(rng, ggml_type, n_rows, n_cols, row_pad)
    x = activations(rng, n_cols)
    out = np.full(n_rows, np.nan, dtype=np.float32)
    matvec(bits, x, out)
    assert_close_to_reference(out, W64, x)


@pytest.mark.parametrize("kind", HALF_KERNELS)
@pytest.mark.parametrize("batch", [2, 3, 4, 9, 70])
@pytest.mark.parametrize("n_rows,n_cols,row_pad", [(203, 576, 0), (50, 200, 5), (29, 1043, 9)])
def test_half_matmul_matches_float64_reference(kind, batch, n_rows, n_cols, row_pad):
    _, matmul, _, ggml_type = HALF_KERNELS[kind]
    rng = np.random.default_rng(batch + n_cols)
    bits, W64 = half_rows(rng, ggml_type, n_rows, n_cols, row_pad)
    X = activations(rng, n_cols, batch)
    out = np.full((batch, n_rows), np.nan, dtype=np.float32)
    matmul(bits, X, out)
    for t in range(batch):
        assert_close_to_reference(out[t], W64, X[t])


@pytest.mark.parametrize("kind", HALF_KERNELS)
def test_half_row_sums_do_not_depend_on_neighbour_rows(kind):
    """A row's sum has one fixed order: the same float32 alone, in a group of rows, in a small batch,
    and whichever widening computes the F16 values."""
    matvec, matmul, _, ggml_type = HALF_KERNELS[kind]
    rng = np.random.default_rng(8)
    bits, _ = half_rows(rng, ggml_type, 11, 333)
    x = activations(rng, 333)
    together = np.empty(11, np.float32)
    matvec(bits, x, together)
    for r in range(11):
        alone = np.empty(1, np.float32)
        matvec(bits[r:r + 1], x, alone)
        assert alone[0] == together[r]
    X = np.stack([x, -x])
    small_batch = np.empty((2, 11), np.float32)
    matmul(bits, X, small_batch)  # fewer tokens than simd.MIN_TILED_BATCH: the matvec kernel per token
    assert np.array_equal(small_batch[0], together) and np.array_equal(small_batch[1], -together)
    if ggml_type == T.F16:
        other = np.empty(11, np.float32)
        HALF_KERNELS["f16-portable" if kind == "f16" else "f16"][0](bits, x, other)
        assert np.array_equal(other, together)


@pytest.mark.parametrize("kind", HALF_KERNELS)
def test_half_widening_is_exact_for_every_bit_pattern(kind):
    _, _, widen, ggml_type = HALF_KERNELS[kind]
    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16).reshape(2048, 32)
    bits = np.concatenate([bits, bits[:, :7]], axis=1)  # 39 per row: a vector, then a tail of 7
    out = np.full(bits.shape, np.nan, dtype=np.float32)
    widen(bits, out)
    if ggml_type == T.F16:
        want = bits.view(np.float16).astype(np.float32)
    else:
        want = (bits.astype(np.uint32) << 16).view(np.float32)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(out), nan)
    assert np.array_equal(out.view(np.uint32)[~nan], want.view(np.uint32)[~nan])  # -0.0 and subnormals included


@pytest.mark.parametrize("ggml_type", [T.F16, T.BF16], ids=lambda t: t.name)
def test_prepared_half_weights_stay_the_file_bytes(ggml_type):
    """kernels.prepare keeps F16 and BF16 rows as views on the tensor's bytes: no float32 copy."""
    rng = np.random.default_rng(9)
    bits, W64 = half_rows(rng, ggml_type, 70, 96, row_pad=4)
    data = bits.view(np.uint8)
    weight = kernels.prepare(Tensor("w", ggml_type, (70, 96), data))
    assert all(np.shares_memory(a, data) for a in weight.prepared)
    assert sum(a.nbytes for a in weight.prepared) == 70 * 96 * 2
    x = activations(rng, 96, 6)
    vec = np.empty(70, np.float32)
    kernels.matvec(weight, x[0], vec)
    assert_close_to_reference(vec, W64, x[0])
    out = np.empty((6, 70), np.float32)
    kernels.matmul(weight, x, out)
    for t in range(6):
        assert_close_to_reference(out[t], W64, x[t])


def test_half_bad_layout_is_refused():
    half_matvec_f16, half_matmul_bf16 = HALF_KERNELS["f16"][0], HALF_KERNELS["bf16"][1]
    bits = np.zeros((8, 64), np.uint16)
    out = np.empty(8, np.float32)
    with pytest.raises(ValueError):
        half_matvec_f16(bits, np.zeros(96, np.float32), out)  # x longer than a row
    with pytest.raises(ValueError):
        half_matvec_f16(bits, np.zeros(128, np.float32)[::2], out)  # x not contiguous
    with pytest.raises(ValueError):
        half_matvec_f16(bits[:, ::2], np.zeros(32, np.float32), out)  # rows not contiguous
    with pytest.raises(ValueError):
        half_matmul_bf16(bits, np.zeros((5, 64), np.float32), np.empty((4, 8), np.float32))  # output rows


def test_f16_widening_is_chosen_by_the_target():
    """F16 kernels use the hardware conversion where the target has one; this machine's choice is one of them."""
    assert halfdot.F16_KIND in (halfdot.F16, halfdot.F16_PORTABLE)
    assert kernels.f16.KIND == halfdot.F16_KIND
