"""Write tests/data/qwen2-tiny.gguf and tests/data/qwen2_reference.npz: a tiny random Qwen2 model and its logits.

    PYTHONPATH=$PWD:/tmp/torchenv python scripts/make_qwen2_reference.py

transformers builds a seeded, randomly initialised Qwen2ForCausalLM (2 layers, hidden 64, 4 heads, 2 kv heads,
intermediate 128, untied output). Its weights are written as llama.cpp's convert_hf_to_gguf.py writes a Qwen2
model: float32 tensors under GGUF names with q/k rows left in Hugging Face's order (Qwen2 runs NEOX RoPE, so the
converter does not permute them), the q/k/v biases as blk.N.attn_{q,k,v}.bias, and qwen2.* hyperparameters.
The vocabulary is a small byte-level BPE made here (256 byte tokens, merges for a few words, three control
tokens) with tokenizer.ggml.pre = qwen2.

The npz holds, computed in float32 by transformers (eager attention):
  seq{k}          token ids of sequence k
  seq{k}_logits   logits at every position of sequence k [len, n_vocab]
  seq{k}_greedy   the greedy continuation (8 tokens) after sequence k, each from a full recomputation
  text{k}, text{k}_ids   texts and the ids transformers' Qwen2Tokenizer gives them over the same vocabulary
"""

import os
import sys

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter, TokenType
from tokenizers import AddedToken
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from llamalora.vocab import byte_to_unicode  # noqa: E402

DATA = os.path.join(ROOT, "tests", "data")
GGUF_PATH = os.path.join(DATA, "qwen2-tiny.gguf")
NPZ_PATH = os.path.join(DATA, "qwen2_reference.npz")

SEED = 1234
WORDS = (" the", " hello", " world", " model", " tiny", " qwen", " test", "ing", " and", " of", " to", " is",
         "the", "Hello", " cat", " dog", "123", "\n\n", "'s", "'m", " sure", " ca", "fé")
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
TEXTS = ("Hello world, the tiny qwen model is testing!",
         "the cat and the dog\n\nof 12345 and 3.14159",
         "I'm sure it's THE test'S end... ok?  \n  spaces\tand tabs",
         "naïve café — 日本語 and emoji 🦙 <|im_start|>user",
         "<|im_start|>user\nhello<|im_end|>\n")
N_GREEDY = 8


def tiny_bpe() -> tuple[list[str], list[str]]:
    """tokens (bytes, then merged pieces, then the control tokens) and merges "a b", each merge making a token."""
    table = byte_to_unicode()
    tokens = [table[b] for b in range(256)]
    merges = []
    for word in WORDS:
        symbols = [table[b] for b in word.encode("utf-8")]
        piece = symbols[0]
        for sym in symbols[1:]:
            merged = piece + sym
            if merged not in tokens:
                merges.append(f"{piece} {sym}")
                tokens.append(merged)
            piece = merged
    return tokens + list(SPECIALS), merges


def make_model(n_vocab: int) -> Qwen2ForCausalLM:
    config = Qwen2Config(vocab_size=n_vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                         tie_word_embeddings=False, attn_implementation="eager", torch_dtype=torch.float32)
    torch.manual_seed(SEED)
    model = Qwen2ForCausalLM(config).eval()
    # transformers initialises biases to zero, norms to one and weights small: spread every parameter so that
    # the biases, the norms and the attention pattern all matter to the logits.
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))
    return model


def gguf_name(hf_name: str) -> str:
    """convert_hf_to_gguf's tensor map for the Qwen2 tensors."""
    parts = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf_name in top:
        return top[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{parts[module]}.{kind}"


def start_gguf(path: str, arch: str, name: str, c, rope_theta: float, tokens: list[str], merges: list[str],
               pre: str) -> GGUFWriter:
    """A GGUFWriter at path with the hyperparameters of the transformers config c (all tensors F32) and the
    byte-level BPE vocabulary, as convert_hf_to_gguf.py writes them; the caller adds tensors and writes."""
    writer = GGUFWriter(path, arch)
    writer.add_name(name)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(float(rope_theta))
    writer.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    writer.add_file_type(0)  # all F32
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([int(TokenType.CONTROL if t in SPECIALS else TokenType.NORMAL) for t in tokens])
    writer.add_token_merges(merges)
    endoftext = tokens.index("<|endoftext|>")
    writer.add_bos_token_id(endoftext)
    writer.add_eos_token_id(endoftext)
    writer.add_add_bos_token(False)
    return writer


def save_reference(npz_path: str, arrays: dict, gguf_path: str) -> None:
    np.savez_compressed(npz_path, **arrays)
    for path in (gguf_path, npz_path):
        print(f"wrote {path} ({os.path.getsize(path)} bytes)", file=sys.stderr)


def finish_gguf(writer: GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_gguf(model: Qwen2ForCausalLM, tokens: list[str], merges: list[str]) -> None:
    c = model.config
    writer = start_gguf(GGUF_PATH, "qwen2", "qwen2-tiny", c, c.rope_parameters["rope_theta"], tokens, merges, "qwen2")
    writer.add_pad_token_id(tokens.index("<|endoftext|>"))
    for name, p in model.state_dict().items():
        data = p.detach().to(torch.float32).numpy()
        writer.add_tensor(gguf_name(name), np.ascontiguousarray(data), raw_dtype=GGMLQuantizationType.F32)
    finish_gguf(writer)


def main() -> int:
    tokens, merges = tiny_bpe()
    model = make_model(len(tokens))
    os.makedirs(DATA, exist_ok=True)
    write_gguf(model, tokens, merges)

    tokenizer = Qwen2Tokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split(" ")) for m in merges])
    tokenizer.add_tokens([AddedToken(t, special=True) for t in SPECIALS])  # as Qwen2's tokenizer.json has them
    out = {}
    for k, text in enumerate(TEXTS):
        out[f"text{k}"] = np.array(text)
        out[f"text{k}_ids"] = np.array(tokenizer.encode(text, add_special_tokens=False), dtype=np.int64)
    rng = np.random.default_rng(SEED)
    sequences = [out["text0_ids"], out["text1_ids"], rng.integers(0, len(tokens), 40)]
    with torch.no_grad():
        for k, ids in enumerate(sequences):
            ids = np.asarray(ids, dtype=np.int64)
            logits = model(torch.from_numpy(ids)[None]).logits[0].numpy().astype(np.float32)
            context = ids.tolist()
            greedy = []
            for _ in range(N_GREEDY):
                nxt = int(model(torch.tensor([context])).logits[0, -1].argmax())
                greedy.append(nxt)
                context.append(nxt)
            out[f"seq{k}"] = ids
            out[f"seq{k}_logits"] = logits
            out[f"seq{k}_greedy"] = np.array(greedy, dtype=np.int64)
            print(f"seq{k}: {len(ids)} tokens, logits std {logits.std():.3f}, greedy {greedy}", file=sys.stderr)
    save_reference(NPZ_PATH, out, GGUF_PATH)
    return 0


if __name__ == "__main__":
    sys.exit(main())
