"""What PEFT writes besides linear LoRA pairs: LoRA on embed_tokens (lora_embedding_A/B, the tied output keeping the
base matrix, as PEFT computes it) and whole tensors (modules_to_save: lm_head, embed_tokens, norms, projections),
each at run time, merged, through export-lora and the GGUF form, against the model built by hand."""

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGMLQuantizationType as T
from safetensors.numpy import save_file
from tiny_model import make_tiny_llama

from llamalora import kernels
from llamalora.cli import cli
from llamalora.errors import AdapterError
from llamalora.llama import LlamaConfig, LlamaModel
from llamalora.loader import load_model
from llamalora.model_file import load_model_file

IDS = [1, 50, 60, 70, 80, 90, 61]
PREFIX = "base_model.model.model"


def write_folder(folder, tensors, **config):
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))
    base = {"peft_type": "LORA", "r": 4, "lora_alpha": 8.0, "target_modules": ["embed_tokens"], "bias": "none"}
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump({**base, **config}, f)
    return str(folder)


def hand_built(path, changes: dict):
    """The model file's model with some tensors replaced by float32 arrays (as F32 tensors)."""
    mf = load_model_file(path)
    tensors = dict(mf.tensors)
    for name, value in changes.items():
        value = np.ascontiguousarray(value, dtype=np.float32)
        rows = value.reshape(value.shape[0] if value.ndim == 2 else 1, -1)
        tensors[name] = type(mf.tensors["token_embd.weight"])(name, T.F32, value.shape, rows.view(np.uint8))
    config = LlamaConfig.from_metadata(mf.metadata, path, n_vocab=len(mf.metadata["tokenizer.ggml.tokens"]))
    return LlamaModel(config, tensors)


def logits(model):
    return model.forward(IDS, model.new_cache(16), all_logits=True)


def widened(path, name):
    t = load_model_file(path).tensors[name]
    return kernels.dequantize(t.type, t.data, t.n_cols).astype(np.float64)


@pytest.fixture
def embedding_lora(tmp_path):
    """A tied tiny model (Q8_0 embeddings) and a PEFT LoRA on embed_tokens: (model, folder, E + s·(B_e·A_e)ᵀ)."""
    path = make_tiny_llama(tmp_path / "tied.gguf", qtype=T.Q8_0, tied=True)
    e = widened(path, "token_embd.weight")
    rng = np.random.default_rng(0)
    a_e = rng.standard_normal((4, e.shape[0])).astype(np.float32)  # PEFT: [r, num_embeddings]
    b_e = rng.standard_normal((e.shape[1], 4)).astype(np.float32) * 0.05  # [embedding_dim, r]
    folder = write_folder(tmp_path / "emb", {f"{PREFIX}.embed_tokens.lora_embedding_A": a_e,
                                             f"{PREFIX}.embed_tokens.lora_embedding_B": b_e})
    return path, folder, e + 2.0 * (b_e.astype(np.float64) @ a_e).T


def test_embedding_lora_with_a_tied_output_keeps_the_base_projection(tmp_path, embedding_lora):
    """PEFT adds the embedding LoRA to the looked-up rows; the tied lm_head goes on projecting with the base E.
    At run time, merged (output.weight = the base token_embd added beside the merged one) and exported alike."""
    path, folder, patched = embedding_lora
    base_e = widened(path, "token_embd.weight")
    want = logits(hand_built(path, {"token_embd.weight": patched, "output.weight": base_e}))
    wrong = logits(hand_built(path, {"token_embd.weight": patched}))  # the output following the embeddings
    assert np.abs(want - wrong).max() > 1e-2
    runtime = load_model(path, adapters=[(folder, 1.0)], lora_mode="runtime", progress=False)
    assert "token_embd.weight" in runtime.model.lora
    np.testing.assert_allclose(logits(runtime.model), want, atol=1e-4)
    merged = load_model(path, adapters=[(folder, 1.0)], lora_mode="merge", progress=False)
    assert not merged.model.lora and "output.weight" in merged.model.tensors
    np.testing.assert_allclose(logits(merged.model), want, atol=2e-2)  # token_embd requantized to Q8_0
    out = str(tmp_path / "merged.gguf")
    r = CliRunner().invoke(cli, ["export-lora", "-m", path, "--lora", folder, "-o", out, "--outtype", "f32"])
    assert r.exit_code == 0, r.output
    exported = load_model_file(out)
    assert "output.weight" in exported.tensors
    np.testing.assert_allclose(logits(load_model(out, progress=False).model), want, atol=1e-4)


def test_embedding_lora_as_gguf_adapter(tmp_path, embedding_lora):
    """The GGUF form lays token_embd's pair out as llama.cpp's converter does (lora_a [n_vocab, r] for the row
    lookup, lora_b [n_embd, r]) and reads back to the same delta."""
    import gguf

    from llamalora.lora.adapter import load_adapter
    from test_lora_formats import load_script

    path, folder, _ = embedding_lora
    out = str(tmp_path / "emb.gguf")
    assert load_script().main([folder, "--gguf", "--base", path, "--outfile", out]) == 0
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in gguf.GGUFReader(out).tensors}
    meta = load_model_file(path).metadata
    assert shapes == {"token_embd.weight.lora_a": (len(meta["tokenizer.ggml.tokens"]), 4),
                      "token_embd.weight.lora_b": (64, 4)}
    a, b = load_adapter(folder, meta).tensors["token_embd.weight"], load_adapter(out, meta).tensors["token_embd.weight"]
    np.testing.assert_allclose(b.scale * (b.b @ b.a), a.scale * (a.b @ a.a), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("qtype,mode", [(T.Q4_1, "runtime"), (T.F32, "merge")])
def test_whole_tensors_replace_the_base_while_the_adapter_is_on(tmp_path, qtype, mode):
    """modules_to_save: lm_head on a tied model (it becomes output.weight; token_embd stays), a norm and q_proj
    (rows in Hugging Face's order, put in GGUF's) stand in for the base's, beside a LoRA pair; at run time on Q4_1,
    merged into F32, and written by export-lora. Scale 0 leaves the model as it was."""
    from safetensors.numpy import load_file

    from test_lora import write_peft

    path = make_tiny_llama(tmp_path / "tied.gguf", qtype=qtype, tied=True)
    n_vocab = load_model_file(path).tensors["token_embd.weight"].n_rows
    rng = np.random.default_rng(1)
    lm_head = rng.standard_normal((n_vocab, 64)).astype(np.float32) * 0.05
    norm = 1 + rng.standard_normal(64).astype(np.float32) * 0.1
    q_hf = rng.standard_normal((64, 64)).astype(np.float32) * 0.05
    folder = write_peft(tmp_path / "mts", rng, ["v_proj"], r=2, alpha=4.0,
                        config_extra={"modules_to_save": ["lm_head", "norm", "q_proj"]},
                        names={"base_model.model.lm_head.weight": lm_head, f"{PREFIX}.norm.weight": norm,
                               f"{PREFIX}.layers.1.self_attn.q_proj.weight": q_hf})
    index = np.arange(64).reshape(4, 2, 8).swapaxes(1, 2).reshape(-1)  # GGUF row i is Hugging Face's row index[i]
    changes = {"output.weight": lm_head, "output_norm.weight": norm, "blk.1.attn_q.weight": q_hf[index]}
    st = load_file(f"{folder}/adapter_model.safetensors")
    for layer in range(2):
        a = st[f"{PREFIX}.layers.{layer}.self_attn.v_proj.lora_A.weight"].astype(np.float64)
        b = st[f"{PREFIX}.layers.{layer}.self_attn.v_proj.lora_B.weight"].astype(np.float64)
        changes[f"blk.{layer}.attn_v.weight"] = widened(path, f"blk.{layer}.attn_v.weight") + 2.0 * (b @ a)
    want = logits(hand_built(path, changes))
    loaded = load_model(path, adapters=[(folder, 1.0)], lora_mode=mode, progress=False)
    assert loaded.model.tensors["output.weight"].type == T.F32 and bool(loaded.model.lora) == (mode == "runtime")
    np.testing.assert_allclose(logits(loaded.model), want, atol=1e-4)
    out = str(tmp_path / "merged.gguf")
    r = CliRunner().invoke(cli, ["export-lora", "-m", path, "--lora", folder, "-o", out, "--outtype", "f32"])
    assert r.exit_code == 0, r.output
    np.testing.assert_allclose(logits(load_model(out, progress=False).model), want, atol=1e-4)
    off = load_model(path, adapters=[(folder, 0.0)], lora_mode=mode, progress=False)
    np.testing.assert_array_equal(logits(off.model), logits(load_model(path, progress=False).model))
    if mode == "runtime":
        with pytest.raises(AdapterError, match="replaces whole tensors .* cannot be switched off by a scale of 0"):
            loaded.model.lora_deltas(loaded.adapters, [0.0])


@pytest.mark.parametrize("key,shape,message", [  # make_tiny_llama's vocabulary: 404 tokens
    ("base_model.model.lm_head.weight", (412, 64), "output.weight has 412 rows but the model's vocabulary has 404 "
                                                   "tokens: the adapter was trained with added tokens"),
    (f"{PREFIX}.embed_tokens.weight", (412, 64), "token_embd.weight has 412 rows"),
    (f"{PREFIX}.norm.weight", (32,), "output_norm.weight has shape (32,) in the adapter but (64,) in the model"),
], ids=["lm_head", "embed_tokens", "norm"])
def test_whole_tensors_of_another_shape_are_refused_in_one_line(tmp_path, key, shape, message):
    path = make_tiny_llama(tmp_path / "m.gguf", qtype=T.Q4_1)
    folder = write_folder(tmp_path / "bad", {key: np.zeros(shape, np.float32)}, modules_to_save=["x"],
                          target_modules=["q_proj"])
    r = CliRunner().invoke(cli, ["main", "-m", path, "--lora", folder, "-p", "hi", "-n", "1"])
    lines = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert r.exit_code == 1 and len(lines) == 1 and message in lines[0] and "Traceback" not in r.output, r.output


def test_gguf_adapters_refuse_whole_tensors(tmp_path, capsys):
    from test_lora import write_peft
    from test_lora_formats import load_script

    path = make_tiny_llama(tmp_path / "m.gguf", qtype=T.Q4_1)
    folder = write_peft(tmp_path / "mts", np.random.default_rng(2), ["v_proj"], config_extra={"modules_to_save": ["norm"]},
                        names={f"{PREFIX}.norm.weight": np.ones(64, np.float32)})
    assert load_script().main([folder, "--gguf", "--base", path, "--outfile", str(tmp_path / "a.gguf")]) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "not the whole tensors this adapter replaces (output_norm.weight)" in err
    assert not (tmp_path / "a.gguf").exists()
