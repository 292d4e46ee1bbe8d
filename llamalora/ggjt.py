"""The legacy ggjt model files (`.bin`) llama.cpp wrote before GGUF, read as if they were GGUF.

Layout (little-endian; llama.cpp's loader of mid-2023 and its convert-llama-ggml-to-gguf.py):

    uint32 magic 0x67676a74 ("ggjt"), uint32 version (1..3)
    uint32 n_vocab, n_embd, n_mult, n_head, n_layer, n_rot, ftype
    n_vocab × (uint32 length, the token's bytes, float32 score)
    until the end of the file, one record per tensor:
        uint32 n_dims, uint32 name length, uint32 ggml type, uint32 ne[n_dims] (ggml order),
        the name, zero padding up to a 32-byte file offset, the data

The file stores no context length, rms epsilon, rope base or kv head count: they take the values
llama.cpp's converter gives them (2048, 5e-6, 10000, n_head). Quantized blocks changed layout in
ggjt v2 (Q4/Q8 bits) and v3 (f16 scales), so only v3 files may hold quantized tensors.
"""

import os
import re
import struct

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType

from .errors import ModelFileError
from .model_file import Cursor, ModelFile, tensor_view
from .tensor import Tensor

GGJT_MAGIC = 0x67676A74
GGJT_ALIGNMENT = 32
MAX_NAME_LENGTH = 4096
CONTEXT_LENGTH = 2048
RMS_EPS = float(np.float32(5e-6))  # as a GGUF file stores it: a float32
ROPE_BASE = 10000.0

# tokenizer.ggml.token_type values
NORMAL, UNKNOWN, CONTROL, BYTE = 1, 2, 3, 6

GLOBAL_NAMES = {"tok_embeddings": "token_embd", "norm": "output_norm", "output": "output"}
LAYER_NAMES = {
    "attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v", "attention.wo": "attn_output",
    "attention_norm": "attn_norm", "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down",
    "feed_forward.w3": "ffn_up", "ffn_norm": "ffn_norm",
}
LAYER_NAME = re.compile(r"layers\.(\d+)\.(.+)\.weight")
GGUF_LAYER_NAME = re.compile(r"blk\.(\d+)\.(.+)\.weight")


def gguf_tensor_name(name: str) -> str | None:
    """The GGUF name of a ggjt tensor (tok_embeddings.weight → token_embd.weight), None if it is not LLaMA's."""
    if name.endswith(".weight") and name[: -len(".weight")] in GLOBAL_NAMES:
        return GLOBAL_NAMES[name[: -len(".weight")]] + ".weight"
    m = LAYER_NAME.fullmatch(name)
    if m and m.group(2) in LAYER_NAMES:
        return f"blk.{int(m.group(1))}.{LAYER_NAMES[m.group(2)]}.weight"
    return None


def ggjt_tensor_name(name: str) -> str | None:
    """The inverse of gguf_tensor_name."""
    for ggjt, gguf in GLOBAL_NAMES.items():
        if name == gguf + ".weight":
            return ggjt + ".weight"
    m = GGUF_LAYER_NAME.fullmatch(name)
    inverse = {v: k for k, v in LAYER_NAMES.items()}
    if m and m.group(2) in inverse:
        return f"layers.{int(m.group(1))}.{inverse[m.group(2)]}.weight"
    return None


def feed_forward_length(n_embd: int, n_mult: int) -> int:
    """llama.cpp's n_ff for ggjt files: 2/3 of 4·n_embd, rounded up to a multiple of n_mult."""
    return ((2 * (4 * n_embd) // 3 + n_mult - 1) // n_mult) * n_mult


def read_bytes(cur: Cursor, n: int, what: str) -> bytes:
    if cur.offset + n > cur.size:
        raise cur.truncated(what)
    raw = bytes(cur.view[cur.offset : cur.offset + n])
    cur.offset += n
    return raw


def read_ggjt(path: str, buf: np.ndarray) -> ModelFile:
    cur = Cursor(path, buf, 4)
    version = cur.scalar("<I", "the ggjt version")
    if version not in (1, 2, 3):
        raise ModelFileError(f"{path}: ggjt version {version} is not supported (1 to 3 are)")
    names = ("n_vocab", "n_embd", "n_mult", "n_head", "n_layer", "n_rot", "ftype")
    hp = {name: cur.scalar("<I", f"hyperparameter {name}") for name in names}
    for name in ("n_vocab", "n_embd", "n_mult", "n_head", "n_layer"):
        if hp[name] == 0:
            raise ModelFileError(f"{path}: ggjt hyperparameter {name} is 0")
    if hp["n_vocab"] < 3:
        raise ModelFileError(f"{path}: ggjt vocabulary has {hp['n_vocab']} tokens (at least <unk>, <s>, </s> needed)")

    tokens, scores, types = [], [], []
    for i in range(hp["n_vocab"]):
        length = cur.scalar("<I", f"vocabulary token {i}")
        text = read_bytes(cur, length, f"vocabulary token {i}")
        scores.append(cur.scalar("<f", f"the score of vocabulary token {i}"))
        token, kind = vocab_token(i, text)
        tokens.append(token)
        types.append(kind)

    tensors: dict[str, Tensor] = {}
    while cur.offset < cur.size:
        n_dims = cur.scalar("<I", "a tensor header")
        name_len = cur.scalar("<I", "a tensor header")
        raw_type = cur.scalar("<I", "a tensor header")
        if not 1 <= n_dims <= 4:
            raise ModelFileError(f"{path}: tensor header at byte {cur.offset - 12} has {n_dims} dimensions (1 to 4)")
        if not 0 < name_len <= MAX_NAME_LENGTH:
            raise ModelFileError(f"{path}: tensor header at byte {cur.offset - 12} has a name of {name_len} bytes")
        ne = [cur.scalar("<I", "a tensor header") for _ in range(n_dims)]
        raw_name = read_bytes(cur, name_len, "a tensor name")
        try:
            ggjt_name = raw_name.decode("utf-8")
        except UnicodeDecodeError:
            raise ModelFileError(f"{path}: tensor name {raw_name!r} is not valid UTF-8") from None
        name = gguf_tensor_name(ggjt_name)
        if name is None:
            raise ModelFileError(f"{path}: tensor {ggjt_name} is not a LLaMA tensor")
        if name in tensors:
            raise ModelFileError(f"{path}: tensor {ggjt_name} appears twice")
        start = -(-cur.offset // GGJT_ALIGNMENT) * GGJT_ALIGNMENT
        tensor = tensor_view(path, buf, name, list(reversed(ne)), raw_type, start)
        if version < 3 and tensor.type not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            raise ModelFileError(f"{path}: tensor {ggjt_name} is {tensor.type.name} in a ggjt v{version} file, whose "
                                 f"quantized blocks predate the current layout (requantize from f16, or use a v3 file)")
        tensors[name] = tensor
        cur.offset = start + tensor.nbytes

    gate = tensors.get("blk.0.ffn_gate.weight")
    n_ff = gate.shape[0] if gate is not None else feed_forward_length(hp["n_embd"], hp["n_mult"])
    metadata, metadata_types = ggjt_metadata(version, hp, n_ff, tokens, scores, types)
    return ModelFile(path, "ggjt", version, metadata, tensors, metadata_types)


def vocab_token(token_id: int, text: bytes) -> tuple[str, int]:
    """A ggjt vocabulary entry as a GGUF SentencePiece token and its type, as llama.cpp's converter maps them."""
    if token_id <= 2:
        return ("<unk>", UNKNOWN) if token_id == 0 else ("<s>" if token_id == 1 else "</s>", CONTROL)
    if not text:
        return "", CONTROL
    # ggjt stores byte-fallback pieces as the raw byte and writes "▁" as a space.
    if token_id <= 258 and len(text) == 1:
        return f"<0x{text[0]:02X}>", BYTE
    return text.replace(b" ", "▁".encode()).decode("utf-8", errors="replace"), NORMAL


def ggjt_metadata(version: int, hp: dict, n_ff: int, tokens: list, scores: list, types: list) -> tuple[dict, dict]:
    """GGUF metadata for a ggjt file, with the value types llama.cpp's converter writes."""
    u32, f32, string = GGUFValueType.UINT32, GGUFValueType.FLOAT32, GGUFValueType.STRING
    array = GGUFValueType.ARRAY
    entries = [
        ("general.architecture", "llama", string, None),
        ("general.description", f"converted from legacy ggjt v{version}", string, None),
        ("general.file_type", hp["ftype"], u32, None),
        ("llama.context_length", CONTEXT_LENGTH, u32, None),
        ("llama.embedding_length", hp["n_embd"], u32, None),
        ("llama.block_count", hp["n_layer"], u32, None),
        ("llama.feed_forward_length", n_ff, u32, None),
        ("llama.rope.dimension_count", hp["n_embd"] // hp["n_head"], u32, None),
        ("llama.attention.head_count", hp["n_head"], u32, None),
        ("llama.attention.head_count_kv", hp["n_head"], u32, None),
        ("llama.attention.layer_norm_rms_epsilon", RMS_EPS, f32, None),
        ("llama.rope.freq_base", ROPE_BASE, f32, None),
        ("tokenizer.ggml.model", "llama", string, None),
        ("tokenizer.ggml.pre", "default", string, None),
        ("tokenizer.ggml.tokens", tokens, array, string),
        ("tokenizer.ggml.scores", scores, array, f32),
        ("tokenizer.ggml.token_type", types, array, GGUFValueType.INT32),
        ("tokenizer.ggml.unknown_token_id", 0, u32, None),
        ("tokenizer.ggml.bos_token_id", 1, u32, None),
        ("tokenizer.ggml.eos_token_id", 2, u32, None),
    ]
    metadata = {key: value for key, value, _, _ in entries}
    metadata_types = {key: (vtype, element) for key, _, vtype, element in entries}
    return metadata, metadata_types


def ggjt_token_bytes(token_id: int, token: str, kind: int) -> bytes:
    """How a GGUF SentencePiece token is stored in a ggjt vocabulary (the inverse of vocab_token)."""
    if token_id == 0:
        return " \u2047 ".encode()  # what llama.cpp's old converter wrote for <unk>
    if token_id <= 2 or kind == CONTROL:
        return b""
    m = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", token)
    if kind == BYTE and m:
        return bytes([int(m.group(1), 16)])
    return token.replace("▁", " ").encode("utf-8")


def write_ggjt(path: str, metadata: dict, tensors) -> str:
    """Write a ggjt v3 file from GGUF-style LLaMA metadata and tensors (GGUF names); for tests and conversions.

    What ggjt cannot hold (kv head count, rms epsilon, rope base, context length) is dropped: a reader
    gets llama.cpp's defaults for them back.
    """
    tensor_list = list(tensors.values()) if isinstance(tensors, dict) else list(tensors)
    tokens = metadata["tokenizer.ggml.tokens"]
    scores = metadata.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = metadata.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    n_embd = int(metadata["llama.embedding_length"])
    n_head = int(metadata["llama.attention.head_count"])
    n_ff = int(metadata["llama.feed_forward_length"])
    # The largest n_mult that gives back n_ff (readers take n_ff from the tensors anyway).
    n_mult = next((m for m in range(n_ff, 0, -1) if feed_forward_length(n_embd, m) == n_ff), 256)
    hparams = (len(tokens), n_embd, n_mult, n_head, int(metadata["llama.block_count"]), n_embd // n_head,
               int(metadata.get("general.file_type", 0)))
    out = bytearray(struct.pack("<II", GGJT_MAGIC, 3))
    out += struct.pack("<7I", *hparams)
    for i, (token, score, kind) in enumerate(zip(tokens, scores, types)):
        text = ggjt_token_bytes(i, token, kind)
        out += struct.pack("<I", len(text)) + text + struct.pack("<f", score)
    for tensor in tensor_list:
        name = ggjt_tensor_name(tensor.name)
        if name is None:
            raise ModelFileError(f"{path}: tensor {tensor.name} has no ggjt name")
        raw_name = name.encode()
        ne = list(reversed(tensor.shape))
        out += struct.pack(f"<3I{len(ne)}I", len(ne), len(raw_name), int(tensor.type), *ne) + raw_name
        out += bytes(-len(out) % GGJT_ALIGNMENT)
        out += np.ascontiguousarray(tensor.data).tobytes()
    tmp_path = path + ".tmp"
    try:
        with open(tmp_path, "wb") as f:
            f.write(out)
        os.replace(tmp_path, path)
    except OSError as e:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise ModelFileError(f"{path}: cannot write the model file: {e.strerror or e}") from None
    return path
