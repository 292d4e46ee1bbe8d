"""Tensor types of downloaded models: BF16, Q5_0, Q5_1, the K-quants Q2_K-Q6_K and IQ4_NL.

Dequantizers equal the gguf package's on arbitrary blocks. Quantizers equal gguf.quants where it has one
(BF16, Q5_0, Q5_1) and llama.cpp's own C code where it has none: tests/data/kquants_llamacpp.npz holds
rows and the bytes ggml-quants.c (llama.cpp 0c1e570, gcc -O2) wrote for them with quantize_row_q{2..6}_K_ref
and quantize_iq4_nl without importance weights, i.e. what llama-quantize writes without an imatrix.
The kernels agree with float64 products of the dequantized weights.
"""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import quants
from tiny_model import make_tiny_llama

from conftest import data_path
from llamalora import kernels
from llamalora.errors import ModelFileError
from llamalora.loader import load_model
from llamalora.model_file import load_model_file
from llamalora.model_writer import write_gguf
from llamalora.tensor import Tensor

NEW_TYPES = [T.BF16, T.Q5_0, T.Q5_1, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_NL]
GGUF_QUANTIZERS = [T.BF16, T.Q5_0, T.Q5_1]
LLAMACPP_QUANTIZERS = {T.Q2_K: "q2_K", T.Q3_K: "q3_K", T.Q4_K: "q4_K", T.Q5_K: "q5_K", T.Q6_K: "q6_K",
                       T.IQ4_NL: "iq4_nl"}
# byte offsets of each block's half-float scales
HALF_SCALES = {T.Q5_0: [0], T.Q5_1: [0, 2], T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2],
               T.Q6_K: [208], T.IQ4_NL: [0]}


def random_blocks(qtype, rng, n_rows: int, n_cols: int) -> np.ndarray:
    """Arbitrary bytes with finite scales: every half-float scale gets its top exponent bit cleared."""
    if qtype == T.BF16:
        bits = rng.integers(0, 1 << 16, (n_rows, n_cols), dtype=np.uint16)
        bits &= np.uint16(0xBFFF)  # exponent below 0x80: finite
        return bits.view(np.uint8)
    data = rng.integers(0, 256, (n_rows, kernels.row_nbytes(qtype, n_cols)), dtype=np.uint8)
    blocks = data.reshape(-1, kernels.type_module(qtype).TYPE_SIZE)
    for pos in HALF_SCALES[qtype]:
        blocks[:, pos + 1] &= 0x3F
    return data


@pytest.mark.parametrize("qtype", NEW_TYPES, ids=lambda t: t.name)
def test_dequantize_random_blocks_equals_gguf(qtype):
    rng = np.random.default_rng(int(qtype))
    n_cols = 768
    data = random_blocks(qtype, rng, 9, n_cols)
    ours = kernels.dequantize(qtype, data, n_cols)
    assert ours.dtype == np.float32 and ours.shape == (9, n_cols)
    np.testing.assert_array_equal(ours, quants.dequantize(data, qtype).reshape(9, n_cols))
    rows = np.array([7, 0, 3])
    np.testing.assert_array_equal(kernels.dequantize_rows(qtype, data, n_cols, rows), ours[rows])


def adversarial_rows(rng) -> np.ndarray:
    rows = [np.zeros(64), np.full(64, 3.25), np.full(64, -1e-30), np.full(64, 6.0e4),
            np.concatenate([np.full(32, 1e4), -np.full(32, 1e-4)]), np.linspace(-1, 1, 64), np.arange(64) - 31.5,
            np.where(np.arange(64) % 2 == 0, 8.0, -8.0), rng.standard_normal(64) * 1e-3, rng.standard_normal(64) * 1e3]
    return np.array(rows, dtype=np.float32)


@pytest.mark.parametrize("qtype", GGUF_QUANTIZERS, ids=lambda t: t.name)
def test_quantize_equals_gguf(qtype):
    rng = np.random.default_rng(50 + int(qtype))
    random = rng.standard_normal((23, 512)).astype(np.float32)
    random[::4] *= 100
    for x in (random, adversarial_rows(rng)):
        ours = kernels.quantize(qtype, x)
        assert ours.shape == (x.shape[0], kernels.row_nbytes(qtype, x.shape[1]))
        assert ours.tobytes() == np.ascontiguousarray(quants.quantize(x, qtype)).tobytes()


@pytest.mark.parametrize("qtype", list(LLAMACPP_QUANTIZERS), ids=lambda t: t.name)
def test_quantize_equals_llamacpp(qtype):
    ref = np.load(data_path("kquants_llamacpp.npz"))
    x, expected = ref["x"], ref[LLAMACPP_QUANTIZERS[qtype]]
    ours = kernels.quantize(qtype, x)
    assert ours.shape == expected.shape
    for r in range(x.shape[0]):  # row by row, so that a failure names the kind of row
        assert ours[r].tobytes() == expected[r].tobytes(), f"row {r}"


@pytest.mark.parametrize("qtype", NEW_TYPES, ids=lambda t: t.name)
def test_round_trip_error_within_llamacpp_bounds(qtype):
    """llama.cpp's test-quantize-fns: 0.1 + 2 cos(i) over 4096 values, sqrt(Σ error²) / n under its bound."""
    x = (0.1 + 2 * np.cos(np.arange(4096, dtype=np.float32))).astype(np.float32).reshape(4, 1024)
    back = kernels.dequantize(qtype, kernels.quantize(qtype, x), 1024)
    error = np.sqrt(np.sum((back.astype(np.float64) - x) ** 2)) / x.size
    bound = {T.Q2_K: 0.0075, T.Q3_K: 0.0040}.get(qtype, 0.002)
    assert error < bound


def test_more_bits_give_smaller_errors():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((16, 1024)).astype(np.float32)

    def rms(qtype):
        back = kernels.dequantize(qtype, kernels.quantize(qtype, x), x.shape[1])
        return float(np.sqrt(np.mean((back - x) ** 2)))

    errors = [rms(t) for t in (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.BF16)]
    assert errors == sorted(errors, reverse=True), errors
    assert errors[2] < 0.08 and errors[4] < 0.02  # Q4_K and Q6_K on unit Gaussians


def strided_copy(data: np.ndarray) -> np.ndarray:
    """The same rows with a row stride wider than a row (as a tensor inside a bigger buffer)."""
    wide = np.zeros((data.shape[0], data.shape[1] + 6), dtype=np.uint8)
    wide[:, 2:2 + data.shape[1]] = data
    return wide[:, 2:2 + data.shape[1]]


@pytest.mark.parametrize("qtype", NEW_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("batch", [1, 3, 40])
def test_kernels_equal_float64_products(qtype, batch):
    rng = np.random.default_rng(1000 + int(qtype) + batch)
    n_rows, n_cols = 50, 1024
    data = random_blocks(qtype, rng, n_rows, n_cols)
    w = kernels.dequantize(qtype, data, n_cols).astype(np.float64)
    tensor = Tensor("w", qtype, (n_rows, n_cols), strided_copy(data))
    weight = kernels.prepare(tensor)
    assert np.shares_memory(weight.prepared[0], tensor.data)  # the rows stay the file's bytes
    x = rng.standard_normal((batch, n_cols)).astype(np.float32)
    expected = x.astype(np.float64) @ w.T
    bound = 1e-5 * (np.abs(x).astype(np.float64) @ np.abs(w).T) + 1e-30
    out = np.full((batch, n_rows), np.nan, dtype=np.float32)
    kernels.matmul(weight, x, out)
    assert np.all(np.abs(out - expected) <= bound)
    vec = np.full(n_rows, np.nan, dtype=np.float32)
    kernels.matvec(weight, x[0], vec)
    assert np.all(np.abs(vec - expected[0]) <= bound[0])


def test_k_quant_rows_must_be_whole_super_blocks():
    assert kernels.row_nbytes(T.Q4_K, 512) == 288
    with pytest.raises(ModelFileError, match="Q4_K"):
        kernels.row_nbytes(T.Q4_K, 576)
    with pytest.raises(ModelFileError):
        kernels.quantize(T.Q6_K, np.zeros((2, 96), dtype=np.float32))


def test_supported_types_include_the_new_ones():
    assert set(NEW_TYPES) <= set(kernels.supported_types())


@pytest.mark.parametrize("qtype,n_cols", [(T.IQ2_XXS, 256), (T.IQ3_S, 256), (T.TQ1_0, 256), (T.IQ4_XS, 256)])
def test_unsupported_type_is_named_with_the_supported_ones(tmp_path, qtype, n_cols):
    block, size = quants.GGML_QUANT_SIZES[qtype]
    tensor = Tensor("blk.0.ffn_up.weight", qtype, (2, n_cols), np.zeros((2, n_cols // block * size), dtype=np.uint8))
    path = write_gguf(str(tmp_path / "m.gguf"), {"general.architecture": "llama"}, [tensor])
    with pytest.raises(ModelFileError) as error:
        load_model_file(path)
    message = str(error.value)
    assert "\n" not in message and "blk.0.ffn_up.weight" in message and qtype.name in message
    assert all(t.name in message for t in NEW_TYPES)
    with pytest.raises(ModelFileError, match=qtype.name):
        kernels.type_module(qtype)


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K, T.BF16], ids=lambda t: t.name)
def test_tiny_llama_runs_in_the_new_types(tmp_path, qtype):
    """A model stored in the type gives the logits of the same weights dequantized to F32."""
    path = make_tiny_llama(tmp_path / "q.gguf", qtype=qtype, dim=256, n_ff=512, n_head=4, n_head_kv=2)
    source = load_model_file(path)
    widened = [Tensor(t.name, T.F32, t.shape, kernels.dequantize(t.type, t.data, t.n_cols).view(np.uint8))
               for t in source.tensors.values()]
    twin = write_gguf(str(tmp_path / "f32.gguf"), source.metadata, widened, source.metadata_types)
    a, b = load_model(path, progress=False), load_model(twin, progress=False)
    tokens = np.array(a.vocab.tokenize("hello world, the tiny llama was a story"))
    la = a.model.forward(tokens, a.model.new_cache(64), all_logits=True)
    lb = b.model.forward(tokens, b.model.new_cache(64), all_logits=True)
    assert la.std() > 0.05
    np.testing.assert_allclose(la, lb, rtol=0, atol=1e-4 * np.abs(lb).max())
