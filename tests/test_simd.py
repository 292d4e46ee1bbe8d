"""Vector block kernels: W·x and X·Wᵀ equal float64 products of the reference-dequantized weights."""

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import quants

from llamalora.kernels import simd

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
