"""llamalora finetune: gradients, optimizer, data, resume and a short real run."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as GGMLType

from tiny_model import make_tiny_llama

from llamalora import kernels
from llamalora.finetune.model import PROJECTIONS, forward_backward, init_lora, load_base, zeros_like_params
from llamalora.finetune.tiles import base_weight, dequantize_tile
from llamalora.llama import LlamaConfig
from llamalora.model_file import load_model_file


def tiny(tmp_path, qtype=GGMLType.Q4_1, **kwargs):
    path = make_tiny_llama(tmp_path / f"tiny-{qtype.name}.gguf", qtype=qtype, **kwargs)
    mf = load_model_file(path)
    config = LlamaConfig.from_metadata(mf.metadata, path, len(mf.metadata["tokenizer.ggml.tokens"]))
    return path, mf, config


@pytest.mark.parametrize("qtype", [GGMLType.F32, GGMLType.F16, GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q8_0])
def test_tiles_equal_kernel_dequantize(tmp_path, qtype):
    _, mf, _ = tiny(tmp_path, qtype=qtype)
    for name in ("blk.0.ffn_up.weight", "blk.1.ffn_down.weight", "token_embd.weight"):
        t = mf.tensors[name]
        want = kernels.dequantize(t.type, t.data, t.n_cols)
        w = base_weight(t)
        buf = np.empty((w.n_rows, w.n_cols), dtype=np.float32)
        for r0, r1 in ((0, w.n_rows), (3, 17)):
            assert np.array_equal(dequantize_tile(w, r0, r1, buf), want[r0:r1]), (name, r0, r1)


def test_gradients_equal_central_differences_in_float64(tmp_path):
    """Every element of every LoRA gradient of a tiny random model (q4_1 base, grouped-query heads, two layers,
    rank 2 on all seven projections, dim 32) against central finite differences of the same float64 loss."""
    _, mf, config = tiny(tmp_path, dim=32, n_ff=64)
    base = load_base(config, mf.tensors, np.float64)
    rng = np.random.default_rng(1)
    params = init_lora(config, {p: 2 for p in PROJECTIONS}, rng, np.float64)
    for name in params:  # B nonzero, so that A has a gradient too
        if name.endswith(".lora_b"):
            params[name] = rng.normal(0.0, 0.1, params[name].shape)
    tokens = rng.integers(0, config.n_vocab, (2, 6))
    targets = rng.integers(0, config.n_vocab, (2, 6))
    alpha = 3.0
    grads = zeros_like_params(params)
    forward_backward(base, params, alpha, tokens, targets, grads)
    h = 1e-5
    for name, p in params.items():
        numeric = np.zeros_like(p)
        for idx in np.ndindex(p.shape):
            old = p[idx]
            p[idx] = old + h
            plus = forward_backward(base, params, alpha, tokens, targets)
            p[idx] = old - h
            minus = forward_backward(base, params, alpha, tokens, targets)
            p[idx] = old
            numeric[idx] = (plus - minus) / (2 * h)
        assert np.abs(numeric).max() > 1e-6, name
        rel = np.abs(grads[name] - numeric).max() / np.abs(numeric).max()
        assert rel <= 1e-4, (name, rel)


def test_checkpointing_and_float32_agree(tmp_path):
    """Recomputing blocks changes nothing (bitwise); float32 follows float64 closely."""
    _, mf, config = tiny(tmp_path)
    rng = np.random.default_rng(2)
    params = init_lora(config, {p: 4 for p in PROJECTIONS}, rng)
    for name in params:
        if name.endswith(".lora_b"):
            params[name] = rng.normal(0.0, 0.05, params[name].shape).astype(np.float32)
    tokens = rng.integers(0, config.n_vocab, (3, 16))
    targets = rng.integers(0, config.n_vocab, (3, 16))
    base32 = load_base(config, mf.tensors, np.float32)
    plain, ckpt = zeros_like_params(params), zeros_like_params(params)
    loss_plain = forward_backward(base32, params, 8.0, tokens, targets, plain)
    loss_ckpt = forward_backward(base32, params, 8.0, tokens, targets, ckpt, checkpointing=True)
    assert loss_plain == loss_ckpt
    for name in params:
        assert np.array_equal(plain[name], ckpt[name]), name
    base64 = load_base(config, mf.tensors, np.float64)
    params64 = {k: v.astype(np.float64) for k, v in params.items()}
    exact = zeros_like_params(params64)
    loss64 = forward_backward(base64, params64, 8.0, tokens, targets, exact)
    assert abs(loss64 - loss_plain) < 1e-5 * abs(loss64)
    for name in params:
        assert np.linalg.norm(plain[name] - exact[name]) <= 1e-4 * np.linalg.norm(exact[name]), name
