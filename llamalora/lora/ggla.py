"""llama.cpp's original LoRA file (`ggml-adapter-model.bin`, magic 'ggla'), written and read.

Layout, as llama.cpp's convert-lora-to-ggml.py wrote it (all little-endian):
  uint32 magic 0x67676c61 ('ggla'), int32 version 1, int32 r, int32 alpha (an integer);
  per tensor: int32 n_dims, int32 name length, int32 type (0 f32, 1 f16), n_dims int32 dims in ggml order
  (numpy shape reversed), the name, zero padding up to a 32-byte file offset, then the data.
Names are `blk.N.attn_q.weight.loraA` / `.loraB`. That script wrote lora_A transposed (numpy [n_in, r],
so ggml ne = [r, n_in]) and lora_B as PEFT holds it (numpy [n_out, r]); the reader undoes the transpose.

Row order: that script never permuted q and k the way llama.cpp's model converters permute them for GGUF's
RoPE layout, so lora_B of attn_q / attn_k is in Hugging Face's row order in every such file. That is the
format's convention here too: the reader permutes q/k lora_B into GGUF's order (peft.qk_heads: by the base
model's head counts; nothing for NEOX-RoPE models), the writer writes them back in Hugging Face's order, so
our files and the original script's are interchangeable.

One r and one alpha cover the whole file and the reader scales every tensor by alpha/r. Where a tensor's
scale differs (rank_pattern, alpha_pattern, rsLoRA, a non-integer alpha) the writer folds the ratio into
B, so B·A times the file's alpha/r is the adapter's delta.
"""

import os
import re
import struct

import numpy as np

from ..errors import AdapterError
from .adapter import LoraAdapter, LoraTensor, b_for_file_scale
from .peft import permute_rows, qk_heads, unpermute_rows

MAGIC = 0x67676C61
VERSION = 1
ALIGN = 32
FTYPES = {0: np.float32, 1: np.float16}
# names the very first version of the format used, before GGUF names
OLD_NAMES = {"attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v",
             "attention.wo": "attn_output", "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down",
             "feed_forward.w3": "ffn_up"}
OLD_NAME = re.compile(r"^layers\.(\d+)\.(\w+\.\w+)\.weight$")


def write_ggla(path: str, adapter: LoraAdapter, metadata: dict, dtype=np.float32) -> None:
    """adapter: B's rows in GGUF's order; metadata: the base model's (its head counts order q and k back)."""
    if adapter.invocation is not None:
        raise AdapterError(f"{path}: a ggla file has no place for an activated LoRA's invocation tokens; "
                           "write a GGUF adapter (--gguf)")
    if adapter.replaced or "token_embd.weight" in adapter.tensors:
        raise AdapterError(f"{path}: a ggla file holds LoRA pairs of the linear layers only, not "
                           + ("whole tensors (modules_to_save)" if adapter.replaced else "a LoRA on embed_tokens")
                           + "; write a GGUF adapter (--gguf) or keep the PEFT folder")
    if any(t.magnitude is not None for t in adapter.tensors.values()):
        raise AdapterError(f"{path}: a ggla file holds lora_A and lora_B only, not DoRA's magnitude vectors; "
                           "write a GGUF adapter (--gguf) instead")
    ftype = {np.dtype(np.float32): 0, np.dtype(np.float16): 1}[np.dtype(dtype)]
    r = int(adapter.r) or next(iter(adapter.tensors.values())).a.shape[0]
    # the header's alpha is an int32: an integral alpha is kept; otherwise alpha = r and B carries the scale
    alpha = int(adapter.alpha) if adapter.alpha > 0 and float(adapter.alpha).is_integer() else r
    file_scale = alpha / r
    with open(path, "wb") as f:
        f.write(struct.pack("<Iiii", MAGIC, VERSION, r, alpha))
        for name, t in adapter.tensors.items():
            write_tensor(f, f"{name}.loraA", t.a.T, dtype, ftype)
            b = b_for_file_scale(t, file_scale)
            heads = qk_heads(name, metadata, f"{path}: {name}")
            write_tensor(f, f"{name}.loraB", unpermute_rows(b, heads) if heads else b, dtype, ftype)


def write_tensor(f, name: str, array: np.ndarray, dtype, ftype: int) -> None:
    encoded = name.encode("utf-8")
    f.write(struct.pack("<iii", array.ndim, len(encoded), ftype))
    f.write(struct.pack(f"<{array.ndim}i", *array.shape[::-1]))
    f.write(encoded)
    f.write(b"\0" * (-f.tell() % ALIGN))
    f.write(np.ascontiguousarray(array, dtype=np.dtype(dtype).newbyteorder("<")).tobytes())


def read_ggla(path: str, metadata: dict) -> LoraAdapter:
    """metadata: the base model's (its head counts put q and k's rows into GGUF's order)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise AdapterError(f"{path}: cannot read it: {e.strerror or e}") from None
    if len(data) < 16:
        raise AdapterError(f"{path}: too short for a ggla header ({len(data)} bytes)")
    magic, version, r, alpha = struct.unpack_from("<Iiii", data, 0)
    if magic != MAGIC:
        raise AdapterError(f"{path}: bad magic {magic:#010x}, not a ggla LoRA file")
    if version != VERSION:
        raise AdapterError(f"{path}: ggla version {version} is not supported (only 1)")
    if r <= 0 or alpha <= 0:
        raise AdapterError(f"{path}: header has r = {r}, alpha = {alpha}; both must be positive")
    halves: dict[str, dict[str, np.ndarray]] = {}
    pos = 16
    while pos < len(data):
        if pos + 12 > len(data):
            raise AdapterError(f"{path}: truncated tensor header at offset {pos}")
        n_dims, name_len, ftype = struct.unpack_from("<iii", data, pos)
        pos += 12
        if not 1 <= n_dims <= 2 or not 0 < name_len <= 512 or ftype not in FTYPES:
            raise AdapterError(f"{path}: bad tensor header at offset {pos - 12}: n_dims {n_dims}, "
                               f"name length {name_len}, type {ftype}")
        if pos + 4 * n_dims + name_len > len(data):
            raise AdapterError(f"{path}: truncated tensor header at offset {pos - 12}")
        dims = struct.unpack_from(f"<{n_dims}i", data, pos)
        pos += 4 * n_dims
        name = data[pos:pos + name_len].decode("utf-8", "replace")
        pos += name_len
        pos += -pos % ALIGN
        shape = tuple(reversed(dims))
        if any(d <= 0 for d in shape):
            raise AdapterError(f"{path}: tensor {name} has dims {list(dims)}")
        dtype = np.dtype(FTYPES[ftype]).newbyteorder("<")
        nbytes = int(np.prod(shape)) * dtype.itemsize
        if pos + nbytes > len(data):
            raise AdapterError(f"{path}: tensor {name} is truncated ({len(data) - pos} of {nbytes} bytes)")
        array = np.frombuffer(data, dtype=dtype, count=nbytes // dtype.itemsize, offset=pos).reshape(shape)
        pos += nbytes
        base, which = split_name(path, name)
        if n_dims != 2:
            raise AdapterError(f"{path}: tensor {name} has {n_dims} dims, a LoRA matrix has 2")
        part = halves.setdefault(base, {})
        if which in part:
            raise AdapterError(f"{path}: tensor {name} appears twice")
        part[which] = array.astype(np.float32)
    adapter = LoraAdapter(path, alpha=float(alpha), r=r)
    for base, part in halves.items():
        if "A" not in part or "B" not in part:
            raise AdapterError(f"{path}: {base} has no lora{'B' if 'B' not in part else 'A'}")
        a = np.ascontiguousarray(part["A"].T)  # stored transposed: [n_in, r]
        heads = qk_heads(base, metadata, f"{path}: {base}")
        b = permute_rows(part["B"], heads) if heads else part["B"]
        adapter.tensors[base] = LoraTensor(a, np.ascontiguousarray(b), alpha / r)
    return adapter


def split_name(path: str, name: str) -> tuple[str, str]:
    """'blk.0.attn_q.weight.loraA' -> ('blk.0.attn_q.weight', 'A'); old 'layers.0.attention.wq...' names too."""
    if not (name.endswith(".loraA") or name.endswith(".loraB")):
        raise AdapterError(f"{path}: tensor {name} is neither a .loraA nor a .loraB")
    base, which = name[: -len(".loraA")], name[-1]
    m = OLD_NAME.match(base)
    if m and m.group(2) in OLD_NAMES:
        base = f"blk.{m.group(1)}.{OLD_NAMES[m.group(2)]}.weight"
    return base, which


def is_ggla(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return len(head) == 4 and struct.unpack("<I", head)[0] == MAGIC and not os.path.isdir(path)
