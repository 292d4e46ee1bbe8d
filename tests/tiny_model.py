"""A tiny random LLaMA model written as a GGUF file, for tests that need a whole model file but not a real one.

    from tiny_model import make_tiny_llama
    path = make_tiny_llama(tmp_path / "tiny.gguf")                    # Q4_1 weights, synthetic vocab
    path = make_tiny_llama(tmp_path / "f32.gguf", qtype=GGMLType.F32)  # float weights (merge targets)

What it writes (all shapes in numpy order, as llamalora.tensor.Tensor has them):
  - n_layer 2, dim 64, n_head 4, n_head_kv 2 (head size 16), n_ff 128, context 2048, rms eps 5e-6,
    rope base 10000 (each a keyword argument); tied=True leaves out output.weight.
  - 2-D weights (token_embd, output, attn_q/k/v/output, ffn_gate/up/down): normal(0, 0.05), stored as
    `qtype` through llamalora.kernels.quantize; norms are F32 1 + normal(0, 0.1).
  - vocab='spm': a synthetic SentencePiece vocabulary of about 350 tokens laid out like LLaMA's:
    0 <unk> (UNKNOWN), 1 <s>, 2 </s> (CONTROL), 3..258 <0x00>..<0xFF> (BYTE), then "▁", letters,
    digits, punctuation and every prefix of a few "▁word" pieces (NORMAL), so any text tokenizes.
    vocab='llama-spm' uses LLaMA's own 32000-token vocabulary from tests/data/ggml-vocab-llama-spm.gguf.
    vocab='bpe': a byte-level BPE vocabulary as SmolLM2's (`gpt2`, pre-tokenizer `smollm`): the 256 byte
    characters, then "Ġword" pieces built one character at a time, each by a merge of the merge list.
The same seed gives the same file, byte for byte.
"""

import os
import string

import numpy as np
from gguf import GGMLQuantizationType as GGMLType

from llamalora import kernels
from llamalora.model_writer import write_gguf
from llamalora.tensor import Tensor

NORMAL, UNKNOWN, CONTROL, BYTE = 1, 2, 3, 6
WORDS = ("the", "and", "hello", "world", "llama", "model", "tiny", "test", "is", "of", "to", "in", "it", "a",
         "cat", "dog", "once", "upon", "time", "there", "was", "story", "lora", "adapter", "weight")
FILE_TYPES = {GGMLType.F32: 0, GGMLType.F16: 1, GGMLType.Q4_0: 2, GGMLType.Q4_1: 3, GGMLType.Q8_0: 7}
LLAMA_SPM_VOCAB = os.path.join(os.path.dirname(__file__), "data", "ggml-vocab-llama-spm.gguf")


def synthetic_spm_vocab() -> tuple[list[str], list[float], list[int]]:
    """tokens, scores, token types of a small LLaMA-like SentencePiece vocabulary."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [UNKNOWN, CONTROL, CONTROL] + [BYTE] * 256
    pieces = ["▁"] + list(string.ascii_lowercase) + list(string.ascii_uppercase) + list(string.digits) + list(".,!?'")
    for word in WORDS:
        piece = "▁" + word
        for end in range(2, len(piece) + 1):
            if piece[:end] not in pieces:
                pieces.append(piece[:end])
    tokens += pieces
    types += [NORMAL] * len(pieces)
    # Longer pieces score higher, so the tokenizer merges into whole words.
    scores = [0.0] * 259 + [float(len(p)) - i / 1000.0 for i, p in enumerate(pieces)]
    return tokens, scores, types


def synthetic_bpe_vocab() -> tuple[list[str], list[str]]:
    """tokens and merges of a small byte-level BPE vocabulary (an end-of-text token first, as SmolLM2's)."""
    from llamalora.vocab import byte_to_unicode

    tokens = ["<|endoftext|>"] + list(byte_to_unicode().values())
    merges = []
    for word in WORDS:
        piece = "Ġ" + word
        for end in range(2, len(piece) + 1):
            if piece[:end] not in tokens:
                merges.append(f"{piece[:end - 1]} {piece[end - 1]}")
                tokens.append(piece[:end])
    return tokens, merges


def llama_spm_vocab() -> tuple[list[str], list[float], list[int]]:
    from llamalora.model_file import load_model_file

    meta = load_model_file(LLAMA_SPM_VOCAB).metadata
    return meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"], meta["tokenizer.ggml.token_type"]


def make_tiny_llama(path, qtype=GGMLType.Q4_1, seed: int = 0, vocab: str = "spm", n_layer: int = 2, dim: int = 64,
                    n_head: int = 4, n_head_kv: int = 2, n_ff: int = 128, tied: bool = False, n_ctx: int = 2048,
                    rms_eps: float = 5e-6, rope_base: float = 10000.0) -> str:
    """Write a small random LLaMA GGUF to `path` (see the module docstring) and return the path as a str."""
    path = os.fspath(path)
    qtype = GGMLType(qtype)
    if vocab == "spm":
        tokens, scores, types = synthetic_spm_vocab()
    elif vocab == "llama-spm":
        tokens, scores, types = llama_spm_vocab()
    elif vocab == "bpe":
        tokens, merges = synthetic_bpe_vocab()
        scores, types = [0.0] * len(tokens), [CONTROL] + [NORMAL] * (len(tokens) - 1)
    else:
        raise ValueError(f"unknown vocab {vocab!r} (spm, llama-spm or bpe)")
    rng = np.random.default_rng(seed)
    head_dim = dim // n_head

    def weight(name, shape):
        x = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        return Tensor(name, qtype, tuple(shape), kernels.quantize(qtype, x))

    def norm(name):
        x = (1.0 + rng.standard_normal((1, dim)) * 0.1).astype(np.float32)
        return Tensor(name, GGMLType.F32, (dim,), x.view(np.uint8))

    tensors = [weight("token_embd.weight", (len(tokens), dim)), norm("output_norm.weight")]
    if not tied:
        tensors.append(weight("output.weight", (len(tokens), dim)))
    for i in range(n_layer):
        tensors += [
            norm(f"blk.{i}.attn_norm.weight"),
            weight(f"blk.{i}.attn_q.weight", (dim, dim)),
            weight(f"blk.{i}.attn_k.weight", (n_head_kv * head_dim, dim)),
            weight(f"blk.{i}.attn_v.weight", (n_head_kv * head_dim, dim)),
            weight(f"blk.{i}.attn_output.weight", (dim, dim)),
            norm(f"blk.{i}.ffn_norm.weight"),
            weight(f"blk.{i}.ffn_gate.weight", (n_ff, dim)),
            weight(f"blk.{i}.ffn_down.weight", (dim, n_ff)),
            weight(f"blk.{i}.ffn_up.weight", (n_ff, dim)),
        ]
    metadata = {
        "general.architecture": "llama",
        "general.name": "tiny-llama",
        "general.file_type": FILE_TYPES.get(qtype, 0),
        "general.quantization_version": 2,
        "llama.context_length": n_ctx,
        "llama.embedding_length": dim,
        "llama.block_count": n_layer,
        "llama.feed_forward_length": n_ff,
        "llama.rope.dimension_count": head_dim,
        "llama.attention.head_count": n_head,
        "llama.attention.head_count_kv": n_head_kv,
        "llama.attention.layer_norm_rms_epsilon": float(rms_eps),
        "llama.rope.freq_base": float(rope_base),
        "llama.vocab_size": len(tokens),
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": list(tokens),
        "tokenizer.ggml.scores": [float(s) for s in scores],
        "tokenizer.ggml.token_type": [int(t) for t in types],
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.add_bos_token": True,
    }
    if vocab == "bpe":
        metadata.update({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm", "tokenizer.ggml.merges": merges,
                         "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 0,
                         "tokenizer.ggml.add_bos_token": False})
        del metadata["tokenizer.ggml.unknown_token_id"]
    return write_gguf(path, metadata, tensors)
