"""PEFT adapter folders (adapter_config.json + adapter_model.safetensors or .bin) → LoraAdapter.

Names map from Hugging Face's modules to GGUF tensors; lora_B of q_proj and k_proj gets its rows permuted
the way llama.cpp's converter permutes q and k for its RoPE layout (llama; qwen2's NEOX RoPE keeps them as they are). Everything PEFT can express
that a merge of B·A cannot honour is refused with the reason. DoRA adapters (use_dora) bring one
lora_magnitude_vector per module, kept beside A and B (lora/dora.py applies it). LoRA on embed_tokens
(lora_embedding_A [r, vocab], lora_embedding_B [dim, r]) becomes a pair on token_embd.weight whose delta
s·A_eᵀ·B_eᵀ adds to the looked-up rows. Whole tensors (modules_to_save: lm_head, embed_tokens, norms, projections;
mergekit-extract-lora's norms) are kept in LoraAdapter.replaced, to stand in for the base's while the adapter is on.

fan_in_fan_out needs no work here: PEFT builds lora_A and lora_B as nn.Linear layers whatever the base
layer is (A [r, in_features], B [out_features, r]) and transposes B·A only to fit a Conv1D weight stored
[in, out]. GGUF stores every linear weight [out, in], so the delta is B·A in both cases.
"""

import json
import math
import os
import re

import numpy as np

from ..errors import AdapterError
from ..llama import NEOX_ROPE_ARCHITECTURES
from .adapter import LoraAdapter, LoraTensor

MODULES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
           "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
NAME = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight$")
# DoRA's magnitude vector: PEFT saves `….lora_magnitude_vector` (older versions `….lora_magnitude_vector.weight`)
MAGNITUDE = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_(magnitude)_vector(?:\.[\w-]+)?$")
# LoRA on the token embeddings: PEFT's Embedding layer keeps lora_embedding_A [r, vocab] and _B [dim, r]
EMBEDDING = re.compile(r"^(?:.*\.)?(embed_tokens)\.lora_embedding_([AB])(?:\.[\w-]+)?$")
# modules_to_save and mergekit-extract-lora's norms: whole tensors of the base's own shape, by their module
WHOLE = re.compile(r"^(?:base_model\.model\.)?(?:model\.)?(?:layers\.(\d+)\.(?:(?:self_attn|mlp)\.)?)?"
                   r"(\w+)(?:\.modules_to_save(?:\.[\w-]+)?)?\.weight$")
WHOLE_TOP = {"embed_tokens": "token_embd.weight", "lm_head": "output.weight", "norm": "output_norm.weight"}
WHOLE_LAYER = {**{module: f"{part}.weight" for module, part in MODULES.items()},
               "input_layernorm": "attn_norm.weight", "post_attention_layernorm": "ffn_norm.weight"}


def read_peft(folder: str, metadata: dict) -> LoraAdapter:
    config = read_config(folder)
    tensors = read_tensors(folder)
    pairs: dict[str, dict] = {}
    replaced: dict[str, tuple] = {}  # GGUF name -> (PEFT key, whole tensor)
    for key, value in tensors.items():
        m = EMBEDDING.match(key)
        if m:
            if config.get("use_dora"):
                raise AdapterError(f"{folder}: {key}: DoRA on embed_tokens (a magnitude per embedding feature) is "
                                   "not supported")
            entry = pairs.setdefault("token_embd.weight", {"module": key.split(".lora_embedding")[0],
                                                           "kind": "embed_tokens"})
            entry["E" + m.group(2)] = np.asarray(value, dtype=np.float32)
            continue
        m = NAME.match(key) or MAGNITUDE.match(key)
        if not m and ".lora_" not in key:
            whole = whole_tensor_name(key)
            if whole is not None:
                replaced[whole] = (key, np.asarray(value, dtype=np.float32))
                continue
        if not m or m.group(2) not in MODULES:
            raise AdapterError(f"{folder}: tensor {key} does not map to a llama weight")
        layer, module, which = int(m.group(1)), m.group(2), m.group(3)
        if which == "magnitude" and not config.get("use_dora"):
            raise AdapterError(f"{folder}: tensor {key} is a DoRA magnitude but adapter_config.json does not "
                               "set use_dora")
        module_name = key.split(f".lora_{which}")[0]
        entry = pairs.setdefault(f"blk.{layer}.{MODULES[module]}.weight", {"module": module_name})
        entry[which] = np.asarray(value, dtype=np.float32)
    adapter = LoraAdapter(folder, alpha=float(config["lora_alpha"]), r=int(config["r"]),
                          invocation=invocation_tokens(folder, config))
    if config.get("modules_to_save") and not replaced:
        raise AdapterError(f"{folder}: adapter_config.json lists modules_to_save {config['modules_to_save']} but "
                           "the adapter holds none of their tensors")
    for name, (key, value) in replaced.items():
        if name in pairs:
            raise AdapterError(f"{folder}: {key} replaces {name}, which the adapter's LoRA pair patches too")
        heads = qk_heads(name, metadata, f"{folder}: {key}")
        adapter.replaced[name] = np.ascontiguousarray(permute_rows(value, heads) if heads else value)
    for name, entry in sorted(pairs.items(), key=lambda item: model_order(item[0])):
        if entry.get("kind") == "embed_tokens":  # ΔE = s·(B_e·A_e)ᵀ = s·A_eᵀ·B_eᵀ: b = A_eᵀ [vocab, r], a = B_eᵀ
            if "EA" not in entry or "EB" not in entry:
                raise AdapterError(f"{folder}: {entry['module']} has no lora_embedding_{'B' if 'EB' not in entry else 'A'}")
            entry["A"], entry["B"] = entry.pop("EB").T, entry.pop("EA").T
        if "A" not in entry or "B" not in entry:
            missing = "lora_B" if "B" not in entry else "lora_A"
            raise AdapterError(f"{folder}: {entry['module']} has no {missing}")
        a, b = entry["A"], entry["B"]
        r = a.shape[0]
        module = entry["module"].removeprefix("base_model.model.")  # the name PEFT matched patterns against
        alpha = float(pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"]))
        r_config = int(pattern_value(config.get("rank_pattern") or {}, module, config["r"]))
        if r != r_config or b.shape[1] != r:
            raise AdapterError(f"{folder}: {entry['module']}: lora_A {a.shape} and lora_B {b.shape} do not have "
                               f"the rank {r_config} that adapter_config.json gives")
        magnitude = entry.get("magnitude")
        if config.get("use_dora") and magnitude is None:
            raise AdapterError(f"{folder}: {entry['module']} has no lora_magnitude_vector (adapter_config.json "
                               "sets use_dora)")
        if magnitude is not None and magnitude.shape != (b.shape[0],):
            raise AdapterError(f"{folder}: {entry['module']}: lora_magnitude_vector has shape {magnitude.shape}, "
                               f"lora_B has {b.shape[0]} rows")
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        heads = qk_heads(name, metadata, f"{folder}: {entry['module']}")
        if heads:
            b = permute_rows(b, heads)
            if magnitude is not None:  # one value per output row: it moves with the rows
                magnitude = permute_rows(magnitude, heads)
        adapter.tensors[name] = LoraTensor(np.ascontiguousarray(a), np.ascontiguousarray(b), scale,
                                           None if magnitude is None else np.ascontiguousarray(magnitude))
    return adapter


def model_order(weight: str) -> tuple:
    """Sort key of 'blk.N.attn_q.weight': by layer, then in the order the Hugging Face model holds the modules
    (PEFT's state dict order, which llama.cpp's converter wrote to its files); token_embd first."""
    parts = weight.split(".")
    if len(parts) != 4:
        return -1, 0
    return int(parts[1]), list(MODULES.values()).index(parts[2])


def invocation_tokens(folder: str, config: dict) -> tuple | None:
    """alora_invocation_tokens: a non-empty list of token ids, or None."""
    tokens = config.get("alora_invocation_tokens")
    if tokens is None:
        return None
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, int) and t >= 0 for t in tokens):
        raise AdapterError(f"{folder}: alora_invocation_tokens must be a non-empty list of token ids, got {tokens!r}")
    if config.get("use_dora"):
        raise AdapterError(f"{folder}: activated LoRA (alora_invocation_tokens) with use_dora is not supported")
    return tuple(tokens)


def whole_tensor_name(key: str) -> str | None:
    """The GGUF name of a whole tensor an adapter file carries (modules_to_save, mergekit's norms), or None."""
    m = WHOLE.match(key)
    if not m:
        return None
    layer, module = m.group(1), m.group(2)
    if layer is None:
        return WHOLE_TOP.get(module)
    return f"blk.{layer}.{WHOLE_LAYER[module]}" if module in WHOLE_LAYER else None


def read_config(folder: str) -> dict:
    path = os.path.join(folder, "adapter_config.json")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except FileNotFoundError:
        raise AdapterError(f"{folder}: no adapter_config.json (not a PEFT adapter folder)") from None
    except (OSError, ValueError) as e:
        raise AdapterError(f"{path}: cannot read it: {e}") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{path}: peft_type {config.get('peft_type')} is not LORA")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"{path}: bias '{config.get('bias')}' is not supported (only 'none')")
    if config.get("lora_bias"):
        raise AdapterError(f"{path}: lora_bias (a bias on lora_B) is not supported")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or config[key] <= 0:
            raise AdapterError(f"{path}: {key} must be a positive number, got {config.get(key)!r}")
    return config


def read_tensors(folder: str) -> dict:
    st = os.path.join(folder, "adapter_model.safetensors")
    bin_path = os.path.join(folder, "adapter_model.bin")
    if os.path.exists(st):
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            return load_file(st)
        except (SafetensorError, OSError, ValueError) as e:
            raise AdapterError(f"{st}: cannot read it: {e}") from None
        except TypeError as e:  # bfloat16 and other dtypes numpy lacks
            return read_safetensors_raw(st, e)
    if os.path.exists(bin_path):
        from .torch_pickle import load_torch_file

        return load_torch_file(bin_path)
    raise AdapterError(f"{folder}: neither adapter_model.safetensors nor adapter_model.bin")


def read_safetensors_raw(path: str, error) -> dict:
    """safetensors with bfloat16 tensors: widen bf16 bits to float32 ourselves."""
    import struct

    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        body = f.read()
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        start, end = info["data_offsets"]
        raw = np.frombuffer(body[start:end], dtype=np.uint8)
        if info["dtype"] == "BF16":
            out[key] = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(info["shape"])
        elif info["dtype"] in ("F32", "F16", "F64"):
            out[key] = raw.view({"F32": np.float32, "F16": np.float16, "F64": np.float64}[info["dtype"]]) \
                .astype(np.float32).reshape(info["shape"])
        else:
            raise AdapterError(f"{path}: tensor {key} has dtype {info['dtype']}, not a float type ({error})")
    return out


def pattern_value(patterns: dict, module_name: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key equal to the module's name, else the first key that
    matches the end of it as a regex (after a dot)."""
    if module_name in patterns:
        return patterns[module_name]
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def qk_heads(weight: str, metadata: dict, what: str) -> int | None:
    """The heads by which GGUF's row order of this weight differs from Hugging Face's: llama.cpp's model converter
    permutes the rows of q (by n_head) and k (by n_head_kv) for its RoPE layout; None for every other weight and
    for NEOX-RoPE models (qwen2), which keep Hugging Face's order. what: the adapter and tensor, for the error."""
    part = weight.split(".")[-2] if weight.count(".") >= 2 else ""
    if part not in ("attn_q", "attn_k") or metadata.get("general.architecture") in NEOX_ROPE_ARCHITECTURES:
        return None
    n_head = metadata.get("llama.attention.head_count")
    if not n_head:
        raise AdapterError(f"{what}: reordering q/k rows into GGUF's order needs the base model's "
                           "llama.attention.head_count (and head_count_kv), which is not known")
    return int(metadata.get("llama.attention.head_count_kv", n_head)) if part == "attn_k" else int(n_head)


def permute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Hugging Face's row order of q (heads = n_head) or k (heads = n_head_kv) → GGUF's, as llama.cpp's
    converter permutes the weights (convert_hf_to_gguf's LlamaModel.permute), applied to any row-indexed array."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of permute_rows: GGUF's row order back to Hugging Face's."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
