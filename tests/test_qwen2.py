"""Qwen2 against transformers: a tiny random Qwen2ForCausalLM written as llama.cpp's converter writes it
(tests/data/qwen2-tiny.gguf) and its float32 logits (tests/data/qwen2_reference.npz), both made by
scripts/make_qwen2_reference.py. Qwen2 differs from llama by q/k/v biases and NEOX RoPE (halves rotate together)."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import data_path, rewritten
from gguf import GGMLQuantizationType as T
from safetensors.numpy import save_file

from llamalora.errors import ModelFileError
from llamalora.generate import Context
from llamalora.llama import KVCache
from llamalora.loader import load_model
from llamalora.model_file import load_model_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = data_path("qwen2-tiny.gguf")
REF = np.load(data_path("qwen2_reference.npz"))
N_SEQ = sum(1 for key in REF.files if key.startswith("seq") and key[3:].isdigit())
N_TEXT = sum(1 for key in REF.files if key.startswith("text") and key[4:].isdigit())


@pytest.fixture(scope="module")
def qwen2():
    return load_model(MODEL, progress=False)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "llamalora", *args], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)


def test_config_reads_the_qwen2_keys(qwen2):
    c = qwen2.model.config
    assert (c.architecture, c.rope_neox) == ("qwen2", True)
    assert (c.n_layer, c.dim, c.n_head, c.n_head_kv, c.n_ff) == (2, 64, 4, 2, 128)
    assert c.rope_base == 1e6 and abs(c.rms_eps - 1e-6) < 1e-12
    assert qwen2.model.layers[1].bias["attn_k"].shape == (32,)


@pytest.mark.parametrize("k", range(N_TEXT))
def test_tokens_match_transformers_qwen2_tokenizer(qwen2, k):
    text = str(REF[f"text{k}"])
    assert qwen2.vocab.tokenize(text, add_bos=None, parse_special=True) == REF[f"text{k}_ids"].tolist()


@pytest.mark.parametrize("k", range(N_SEQ))
def test_batch_logits_match_transformers(qwen2, k):
    ids = REF[f"seq{k}"]
    logits = qwen2.model.forward(ids, qwen2.model.new_cache(64), all_logits=True)
    diff = np.abs(logits - REF[f"seq{k}_logits"]).max()
    assert diff < 1e-3, f"max |logit difference| {diff:.2e}"


@pytest.mark.parametrize("k", range(N_SEQ))
def test_token_by_token_logits_match_transformers(qwen2, k):
    ids = REF[f"seq{k}"]
    cache = qwen2.model.new_cache(64)
    logits = np.concatenate([qwen2.model.forward([t], cache) for t in ids])
    diff = np.abs(logits - REF[f"seq{k}_logits"]).max()
    assert diff < 1e-3, f"max |logit difference| {diff:.2e}"


@pytest.mark.parametrize("k", range(N_SEQ))
def test_greedy_continuation_matches_transformers(qwen2, k):
    want = REF[f"seq{k}_greedy"].tolist()
    ctx = Context(qwen2.model, n_ctx=64)
    logits = ctx.eval(REF[f"seq{k}"].tolist())
    got = []
    for _ in want:
        got.append(int(np.argmax(logits)))
        logits = ctx.eval([got[-1]], generating=True)
    assert got == want


def test_adjacent_pair_rope_would_not_match(qwen2):
    """The reference tells the two RoPE styles apart, so the tests above do check the NEOX pairing."""
    model = qwen2.model
    llama_style = dataclasses.replace(model.config, rope_neox=False)
    ids = REF["seq2"]
    try:
        model.config = llama_style
        logits = model.forward(ids, KVCache(llama_style, 64), all_logits=True)
    finally:
        model.config = dataclasses.replace(llama_style, rope_neox=True)
    assert np.abs(logits - REF["seq2_logits"]).max() > 0.05


def shifted_then_next(model, cache, ids, n_keep, n_discard, nxt):
    model.forward(ids, cache)
    cache.shift(n_keep, n_discard)
    return model.forward([nxt], cache)[0]


def test_context_shift_equals_recomputing_on_one_layer(tmp_path):
    """With one layer the cached keys and values depend on their token and position alone, so a context shift
    (keys re-rotated by -n_discard) must give what evaluating the kept tokens afresh gives."""
    f = load_model_file(MODEL)
    path = rewritten(MODEL, tmp_path / "one-layer.gguf", {"qwen2.block_count": 1},
                     drop=[name for name in f.tensors if name.startswith("blk.1.")])
    model = load_model(path, progress=False).model
    c = model.config
    ids = REF["seq2"].tolist()[:30]
    nxt, n_keep, n_discard = int(REF["seq2"][30]), 4, 11
    fresh = model.new_cache(64)
    recomputed = model.forward(ids[:n_keep] + ids[n_keep + n_discard:] + [nxt], fresh)[0]
    cache = model.new_cache(64)
    shifted = shifted_then_next(model, cache, ids, n_keep, n_discard, nxt)
    assert cache.n == fresh.n == 30 - n_discard + 1
    assert np.abs(cache.k[:, :cache.n] - fresh.k[:, :fresh.n]).max() < 1e-4
    assert np.abs(shifted - recomputed).max() < 1e-4
    # Re-rotating the cached keys by adjacent pairs instead would move them to wrong positions.
    wrong = shifted_then_next(model, KVCache(dataclasses.replace(c, rope_neox=False), 64), ids, n_keep, n_discard, nxt)
    assert np.abs(wrong - recomputed).max() > 1e-2


def test_context_shift_keeps_generating_close_to_recomputing(qwen2):
    """On the two-layer model the second layer's cache still saw the dropped tokens, so only closeness holds."""
    model = qwen2.model
    ids = REF["seq2"].tolist()[:30]
    nxt, n_keep, n_discard = int(REF["seq2"][30]), 4, 11
    recomputed = model.forward(ids[:n_keep] + ids[n_keep + n_discard:] + [nxt], model.new_cache(64))[0]
    shifted = shifted_then_next(model, model.new_cache(64), ids, n_keep, n_discard, nxt)
    wrong = shifted_then_next(model, KVCache(dataclasses.replace(model.config, rope_neox=False), 64), ids, n_keep,
                              n_discard, nxt)
    assert np.abs(shifted - recomputed).max() < np.abs(wrong - recomputed).max()


@pytest.mark.parametrize("mix,weight_type,tolerance", [("f16", T.F16, 0.02), ("q8_0", T.Q8_0, 0.2)])
def test_quantized_copy_loads_and_runs(tmp_path, mix, weight_type, tolerance):
    out = str(tmp_path / f"qwen2-{mix}.gguf")
    r = cli("quantize", MODEL, out, mix)
    assert r.returncode == 0, r.stderr
    f = load_model_file(out)
    assert f.tensors["blk.0.attn_q.weight"].type == weight_type
    assert f.tensors["blk.0.attn_q.bias"].type == T.F32  # 1-D tensors keep their type
    model = load_model(out, progress=False).model
    logits = model.forward(REF["seq1"], model.new_cache(64), all_logits=True)
    ref = REF["seq1_logits"]
    assert np.abs(logits - ref).max() < tolerance
    assert np.mean(np.argmax(logits, 1) == np.argmax(ref, 1)) >= 0.9


def test_cli_generates_from_qwen2():
    r = cli("main", "-m", MODEL, "-p", "Hello world", "-n", "6", "--temp", "0", "--ignore-eos")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Hello world") and "Traceback" not in r.stderr


def test_an_architecture_we_do_not_run_is_one_clear_line(tmp_path):
    path = rewritten(MODEL, tmp_path / "qwen3.gguf", {"general.architecture": "qwen3"})
    r = cli("main", "-m", path, "-p", "Hello", "-n", "1")
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "architecture 'qwen3' is not supported" in lines[0], r.stderr


def test_a_missing_qwen2_bias_is_named(tmp_path):
    path = rewritten(MODEL, tmp_path / "nobias.gguf", drop=("blk.1.attn_k.bias",))
    with pytest.raises(ModelFileError, match="tensor blk.1.attn_k.bias is missing"):
        load_model(path, progress=False)


def test_peft_q_and_k_rows_keep_their_order_for_qwen2(tmp_path):
    """llama.cpp's converter does not permute Qwen2's q/k rows, so neither may a PEFT adapter's lora_B be."""
    from llamalora.lora.peft import read_peft

    rng = np.random.default_rng(0)
    prefix = "base_model.model.model.layers.0.self_attn"
    tensors = {f"{prefix}.{m}.lora_A.weight": rng.standard_normal((4, 64)).astype(np.float32) for m in ("q_proj", "k_proj")}
    tensors[f"{prefix}.q_proj.lora_B.weight"] = rng.standard_normal((64, 4)).astype(np.float32)
    tensors[f"{prefix}.k_proj.lora_B.weight"] = rng.standard_normal((32, 4)).astype(np.float32)
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    with open(tmp_path / "adapter_config.json", "w") as f:
        json.dump({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj"]}, f)
    metadata = load_model_file(MODEL).metadata
    adapter = read_peft(str(tmp_path), metadata)
    np.testing.assert_array_equal(adapter.tensors["blk.0.attn_q.weight"].b, tensors[f"{prefix}.q_proj.lora_B.weight"])
    np.testing.assert_array_equal(adapter.tensors["blk.0.attn_k.weight"].b, tensors[f"{prefix}.k_proj.lora_B.weight"])
    # and the adapter applies to the model's own tensors
    model = load_model(MODEL, progress=False).model
    model.set_lora([adapter])
    with_lora = model.forward(REF["seq0"], model.new_cache(64))
    model.set_lora([])
    assert np.abs(with_lora - model.forward(REF["seq0"], model.new_cache(64))).max() > 1e-3


def test_finetune_refuses_qwen2_in_one_line(tmp_path):
    """Training has no q/k/v biases and no NEOX RoPE: it says so rather than train a different network."""
    text = tmp_path / "train.txt"
    text.write_text("hello world " * 50)
    r = cli("finetune", "-m", MODEL, "--train-data", str(text), "--lora-out", str(tmp_path / "a.gguf"))
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "finetune trains llama models; this one is qwen2" in lines[0], r.stderr
