"""PEFT adapter folders (adapter_config.json + adapter_model.safetensors or .bin) → LoraAdapter.

Names map from Hugging Face's modules to GGUF tensors; lora_B of q_proj and k_proj gets its rows permuted
the way llama.cpp's converter permutes q and k for its RoPE layout (llama; qwen2's NEOX RoPE keeps them as they are). Everything PEFT can express
that a merge of B·A cannot honour is refused with the reason.

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


def read_peft(folder: str, metadata: dict) -> LoraAdapter:
    config = read_config(folder)
    tensors = read_tensors(folder)
    pairs: dict[str, dict] = {}
    for key, value in tensors.items():
        m = NAME.match(key)
        if not m or m.group(2) not in MODULES:
            raise AdapterError(f"{folder}: tensor {key} does not map to a llama weight")
        layer, module, which = int(m.group(1)), m.group(2), m.group(3)
        module_name = key.split(f".lora_{which}")[0]
        entry = pairs.setdefault(f"blk.{layer}.{MODULES[module]}.weight", {"module": module_name})
        entry[which] = np.asarray(value, dtype=np.float32)
    adapter = LoraAdapter(folder, alpha=float(config["lora_alpha"]), r=int(config["r"]))
    for name, entry in sorted(pairs.items(), key=lambda item: model_order(item[0])):
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
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        heads = qk_heads(name, metadata, f"{folder}: {entry['module']}")
        if heads:
            b = permute_rows(b, heads)
        adapter.tensors[name] = LoraTensor(np.ascontiguousarray(a), np.ascontiguousarray(b), scale)
    return adapter


def model_order(weight: str) -> tuple:
    """Sort key of 'blk.N.attn_q.weight': by layer, then in the order the Hugging Face model holds the modules
    (PEFT's state dict order, which llama.cpp's converter wrote to its files)."""
    _, layer, part, _ = weight.split(".")
    return int(layer), list(MODULES.values()).index(part)


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
    if config.get("use_dora"):
        raise AdapterError(f"{path}: DoRA adapters (use_dora) cannot be merged as B·A")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"{path}: bias '{config.get('bias')}' is not supported (only 'none')")
    if config.get("lora_bias"):
        raise AdapterError(f"{path}: lora_bias (a bias on lora_B) is not supported")
    if config.get("modules_to_save"):
        raise AdapterError(f"{path}: modules_to_save {config['modules_to_save']} is not supported "
                           "(it replaces whole modules, not a low-rank delta)")
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
