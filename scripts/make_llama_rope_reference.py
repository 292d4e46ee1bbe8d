"""Write tests/data/llama3-rope-tiny.gguf and tests/data/llama_rope_reference.npz: RoPE scaling against transformers.

    PYTHONPATH=$PWD:/tmp/torchenv python scripts/make_llama_rope_reference.py

transformers builds a seeded, randomly initialised LlamaForCausalLM (2 layers, hidden 64, 4 heads of 16, 2 kv
heads) with llama 3's RoPE scaling (factor 8, low/high frequency factors 1 and 4, original context 32: so short,
that the 8 frequencies of a 16-wide head fall in all three of its bands within 48 positions). The GGUF is written
as llama.cpp's convert_hf_to_gguf.py writes a Llama 3.x model: q/k rows permuted to GGUF's adjacent-pair order,
llama.* hyperparameters, and the scaling as a rope_freqs.weight tensor of per-frequency factors computed as the
converter computes them. The vocabulary is make_qwen2_reference's small byte-level BPE (pre-tokenizer llama-bpe).

The npz holds float32 logits at every position of one random 48-token sequence (`ids`), from the same weights
with three RoPE settings: `llama3` (the file as written), `linear` (linear scaling, factor 2.5: the test
rewrites the file's metadata to match) and `plain` (no scaling).
"""

import math
import os
import sys

import numpy as np
import torch
from gguf import GGMLQuantizationType
from transformers import LlamaConfig, LlamaForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from make_qwen2_reference import finish_gguf, save_reference, start_gguf, tiny_bpe  # noqa: E402

DATA = os.path.join(ROOT, "tests", "data")
GGUF_PATH = os.path.join(DATA, "llama3-rope-tiny.gguf")
NPZ_PATH = os.path.join(DATA, "llama_rope_reference.npz")

SEED = 4321
N_HEAD, N_HEAD_KV, HEAD_DIM = 4, 2, 16
THETA = 10000.0
LLAMA3 = {"rope_type": "llama3", "rope_theta": THETA, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
LINEAR = {"rope_type": "linear", "rope_theta": THETA, "factor": 2.5}
PLAIN = {"rope_type": "default", "rope_theta": THETA}
N_TOKENS = 48


def make_model(n_vocab: int, rope: dict) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=n_vocab, hidden_size=N_HEAD * HEAD_DIM, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=N_HEAD, num_key_value_heads=N_HEAD_KV,
                         max_position_embeddings=256, rms_norm_eps=1e-5, rope_parameters=dict(rope),
                         tie_word_embeddings=False, attn_implementation="eager", torch_dtype=torch.float32)
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():  # weights large enough that attention patterns, hence positions, move the logits
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return model


def llama3_rope_factors() -> np.ndarray:
    """convert_hf_to_gguf.py's rope_freqs for rope_type llama3."""
    freqs = 1.0 / (THETA ** (np.arange(0, HEAD_DIM, 2, dtype=np.float32) / HEAD_DIM))
    low_wavelen = LLAMA3["original_max_position_embeddings"] / LLAMA3["low_freq_factor"]
    high_wavelen = LLAMA3["original_max_position_embeddings"] / LLAMA3["high_freq_factor"]
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(LLAMA3["factor"])
        else:
            smooth = ((LLAMA3["original_max_position_embeddings"] / wavelen - LLAMA3["low_freq_factor"])
                      / (LLAMA3["high_freq_factor"] - LLAMA3["low_freq_factor"]))
            factors.append(1 / ((1 - smooth) / LLAMA3["factor"] + smooth))
    return np.array(factors, dtype=np.float32)


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute: Hugging Face's half-split q/k rows to adjacent pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(model: LlamaForCausalLM):
    parts = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    for name, p in model.state_dict().items():
        data = p.detach().to(torch.float32).numpy()
        if name in top:
            yield top[name], data
            continue
        _, _, layer, rest = name.split(".", 3)
        module = rest.rsplit(".", 1)[0]
        if module == "self_attn.q_proj":
            data = permute(data, N_HEAD)
        elif module == "self_attn.k_proj":
            data = permute(data, N_HEAD_KV)
        yield f"blk.{layer}.{parts[module]}.weight", data


def write_gguf(model: LlamaForCausalLM, tokens: list[str], merges: list[str]) -> None:
    writer = start_gguf(GGUF_PATH, "llama", "llama3-rope-tiny", model.config, THETA, tokens, merges, "llama-bpe")
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_tensor("rope_freqs.weight", llama3_rope_factors(), raw_dtype=GGMLQuantizationType.F32)
    for name, data in gguf_tensors(model):
        writer.add_tensor(name, np.ascontiguousarray(data), raw_dtype=GGMLQuantizationType.F32)
    finish_gguf(writer)


def main() -> int:
    tokens, merges = tiny_bpe()
    os.makedirs(DATA, exist_ok=True)
    ids = np.random.default_rng(SEED).integers(0, len(tokens), N_TOKENS).astype(np.int64)
    out = {"ids": ids}
    for key, rope in (("llama3", LLAMA3), ("linear", LINEAR), ("plain", PLAIN)):
        model = make_model(len(tokens), rope)
        if key == "llama3":
            write_gguf(model, tokens, merges)
        with torch.no_grad():
            out[key] = model(torch.from_numpy(ids)[None]).logits[0].numpy().astype(np.float32)
    for key in ("llama3", "linear"):
        print(f"{key}: max |logits - plain| {np.abs(out[key] - out['plain']).max():.3f}", file=sys.stderr)
    save_reference(NPZ_PATH, out, GGUF_PATH)
    return 0


if __name__ == "__main__":
    sys.exit(main())
