"""Block types: our (de)quantizers equal the gguf package's reference ones byte for byte; kernels agree with them."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import quants

from llamalora import kernels
from llamalora.errors import ModelFileError
from llamalora.tensor import Tensor

QUANTIZED = [T.Q4_0, T.Q4_1, T.Q8_0]
ALL = [T.F32, T.F16] + QUANTIZED


def adversarial_rows(rng) -> np.ndarray:
    """Rows of 64 values (two blocks) that stress the quantizers' edge cases."""
    rows = [
        np.zeros(64),                                   # all zero: scale 0, inverse scale 0
        np.full(64, 3.25),                              # constant: max == min
        np.full(64, -1e-30),                            # tiny (subnormal scale in f16)
        np.full(64, 6.0e4),                             # near the f16 maximum
        np.concatenate([np.full(32, 1e4), -np.full(32, 1e-4)]),
        np.linspace(-1, 1, 64),                         # exact halves hit the rounding rules
        np.arange(64) - 31.5,
        np.where(np.arange(64) % 2 == 0, 8.0, -8.0),    # max == -min: the q4_0 sign choice
        np.array([127.0, 0.49999997, 1.4999999, 2.5, -2.5, -0.49999997, 126.5, -126.5] * 8),  # roundf's edges
        rng.standard_normal(64) * 1e-3,
        rng.standard_normal(64) * 1e3,
    ]
    return np.array(rows, dtype=np.float32)


def random_rows(rng, n_rows=37, n_cols=256) -> np.ndarray:
    x = rng.standard_normal((n_rows, n_cols)).astype(np.float32)
    x[::5] *= 100
    x[1::7] = np.round(x[1::7] * 4) / 4  # exact quarter values
    return x


@pytest.mark.parametrize("qtype", ALL)
def test_quantize_equals_reference(qtype):
    rng = np.random.default_rng(int(qtype))
    for x in (random_rows(rng), adversarial_rows(rng)):
        ours = kernels.quantize(qtype, x)
        ref = quants.quantize(x, qtype)
        assert ours.tobytes() == np.ascontiguousarray(ref).tobytes()
        assert ours.shape == (x.shape[0], kernels.row_nbytes(qtype, x.shape[1]))


@pytest.mark.parametrize("qtype", ALL)
def test_dequantize_equals_reference(qtype):
    rng = np.random.default_rng(100 + int(qtype))
    for x in (random_rows(rng), adversarial_rows(rng)):
        data = kernels.quantize(qtype, x)
        ours = kernels.dequantize(qtype, data, x.shape[1])
        ref = quants.dequantize(data, qtype)
        assert ours.dtype == np.float32
        np.testing.assert_array_equal(ours, ref.reshape(ours.shape))


@pytest.mark.parametrize("qtype", ALL)
def test_dequantize_random_bytes(qtype):
    """Arbitrary bit patterns (not just our quantizer's output) decode as the reference decodes them."""
    rng = np.random.default_rng(7)
    n_cols = 128
    data = rng.integers(0, 256, (9, kernels.row_nbytes(qtype, n_cols)), dtype=np.uint8)
    if qtype in (T.F32, T.F16):  # keep the floats finite so that equality is meaningful
        data = kernels.quantize(qtype, rng.standard_normal((9, n_cols)).astype(np.float32))
    else:  # finite half-float scales: clear the top exponent bit of each scale's high byte
        size = kernels.type_module(qtype).TYPE_SIZE
        blocks = data.reshape(-1, size)
        blocks[:, 1] &= 0x3F
        if qtype == T.Q4_1:
            blocks[:, 3] &= 0x3F
    np.testing.assert_array_equal(kernels.dequantize(qtype, data, n_cols), quants.dequantize(data, qtype).reshape(9, n_cols))


@pytest.mark.parametrize("qtype", ALL)
@pytest.mark.parametrize("batch", [1, 3, 40])
def test_matvec_and_matmul_match_dequantized_product(qtype, batch):
    rng = np.random.default_rng(11)
    w = rng.standard_normal((300, 192)).astype(np.float32)
    data = kernels.quantize(qtype, w)
    weight = kernels.prepare(Tensor("w", qtype, (300, 192), data))
    x = rng.standard_normal((batch, 192)).astype(np.float32)
    want = x.astype(np.float64) @ quants.dequantize(data, qtype).reshape(300, 192).astype(np.float64).T
    out = np.empty((batch, 300), dtype=np.float32)
    if batch == 1:
        kernels.matvec(weight, x[0], out[0])
    else:
        kernels.matmul(weight, x, out)
    np.testing.assert_allclose(out, want, rtol=0, atol=2e-5 * np.abs(want).max())


def test_dequantize_rows_reads_only_chosen_rows():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((50, 64)).astype(np.float32)
    data = kernels.quantize(T.Q8_0, w)
    rows = np.array([4, 0, 49, 4])
    np.testing.assert_array_equal(kernels.dequantize_rows(T.Q8_0, data, 64, rows), kernels.dequantize(T.Q8_0, data, 64)[rows])


def test_unsupported_type_and_partial_block_are_errors():
    with pytest.raises(ModelFileError, match="IQ2_XXS is not supported"):
        kernels.row_nbytes(T.IQ2_XXS, 256)
    with pytest.raises(ModelFileError, match="not a whole number of Q4_0 blocks"):
        kernels.row_nbytes(T.Q4_0, 48)


def test_block_halves_decode_every_half_float():
    """The compiled half decoder behind block scales equals numpy's float16 for all 65536 bit patterns."""
    from llamalora.kernels.f16 import block_halves

    bits = np.arange(65536, dtype=np.uint16)
    rows = np.zeros((256, 256 * 4), dtype=np.uint8)  # blocks of 4 bytes, the half at offset 2
    rows.reshape(256, 256, 4)[:, :, 2:4] = bits.reshape(256, 256, 1).view(np.uint8).reshape(256, 256, 2)
    got = block_halves(rows, 4, 2).reshape(-1)
    want = bits.view(np.float16).astype(np.float32)
    assert np.array_equal(got.view(np.uint32)[~np.isnan(want)], want.view(np.uint32)[~np.isnan(want)])
    assert np.array_equal(np.isnan(got), np.isnan(want))


@pytest.mark.parametrize("r, n_cols, n_rows", [(16, 576, 1536), (8, 1536, 576), (5, 37, 83), (1, 16, 16), (33, 100, 70)])
def test_low_rank_delta_matches_float64(r, n_cols, n_rows):
    """out += s·B·(A·x), one token and a batch, for ranks and widths that leave every tail of the vector loops
    (rows of A past the groups of four, outputs past 16 and 64)."""
    rng = np.random.default_rng(r + n_cols)
    a = rng.standard_normal((r, n_cols)).astype(np.float32)
    scaled_b = rng.standard_normal((n_rows, r)).astype(np.float32)
    packed_b = kernels.pack_scaled_b(scaled_b)
    x = rng.standard_normal((5, n_cols)).astype(np.float32)
    start = rng.standard_normal((5, n_rows)).astype(np.float32)
    expected = start + (x.astype(np.float64) @ a.T.astype(np.float64)) @ scaled_b.T.astype(np.float64)
    bound = 1e-6 * np.abs(expected).max() * np.sqrt(r + n_cols)
    one = start[0].copy()
    kernels.add_low_rank_matvec(a, packed_b, x[0], one)
    assert np.abs(one - expected[0]).max() <= bound
    batch = start.copy()
    kernels.add_low_rank_matmul(a, packed_b, x, batch)
    assert np.abs(batch - expected).max() <= bound
    with pytest.raises(ValueError, match="C-contiguous"):
        kernels.add_low_rank_matvec(a, packed_b, np.repeat(x[0], 2)[::2], one)
    with pytest.raises(ValueError, match="matching shapes"):
        kernels.add_low_rank_matvec(a, packed_b, x[0], np.empty(n_rows + 16, np.float32))
    if r == 1:  # numpy's view of a [1, n] slice of a wider array: C-contiguous, whatever its row stride
        a_view = np.concatenate([a, a], axis=1)[:, :n_cols]
        one_v = start[0].copy()
        kernels.add_low_rank_matvec(a_view, packed_b, x[0], one_v)
        assert np.array_equal(one_v, one)


SPECIALISATION_CHECK = r"""
import numpy as np
from llamalora import kernels
from llamalora.kernels import blockdot, dense, dispatch, halfdot, intmatvec, q4_k, simd
from llamalora.tensor import Tensor
from gguf import GGMLQuantizationType as T

rng = np.random.default_rng(0)
values = rng.standard_normal((32, 64)).astype(np.float32)
weight = kernels.prepare(Tensor("w", T.F32, values.shape, values.view(np.uint8).reshape(32, -1)))
table, keep = dispatch.weight_table([weight])
x = rng.standard_normal(64).astype(np.float32)
out = np.empty(32, np.float32)
kinds = dispatch.kinds_mask([weight])

from numba import njit
@njit
def step(table, x, out):  # a compiled caller passes its mask as a literal, as decode's steps do
    dispatch.matvec_entry(table, KINDS, 0, x, out, intmatvec.NO_FACTORS, intmatvec.NO_PACKED_B,
                          intmatvec.NO_FACTORS, False)

KINDS = kinds
step(table, x, out)
assert np.allclose(out, values @ x, rtol=1e-5, atol=1e-5), "wrong product"
assert dense.matvec.signatures, "the F32 kernel was not compiled"
others = {"simd.q4_matvec": simd.q4_matvec, "simd.q8_matvec": simd.q8_matvec, "q4_k._matvec": q4_k._matvec,
          "blockdot.matvec": blockdot.matvec, "halfdot.matvec": halfdot.matvec, "intmatvec.matvec": intmatvec.matvec}
compiled = [name for name, f in others.items() if f.signatures]
assert not compiled, f"compiled for types the mask leaves out: {compiled}"
print("ok")
"""


def test_a_weight_tables_step_compiles_its_own_types_kernels_only(tmp_path):
    """dispatch.matvec_entry called from compiled code with an F32-only kinds mask compiles the F32 kernel and none
    of the other types' (on an empty cache, where every kernel a call reaches is compiled and so shows a
    signature): what keeps a first run's compile to its model's types."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"), LLAMALORA_KERNEL_TYPES="model")
    run = subprocess.run([sys.executable, "-c", SPECIALISATION_CHECK], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]
