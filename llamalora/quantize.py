"""Rewriting a model in another tensor type: `llamalora quantize` and the last step of `export-lora`.

Every weight matrix is widened to float32 (optionally patched there, e.g. W + Σ s·B·A) and quantized once
to its type with our bit-exact quantizers. A target is one of llama.cpp's file types ("mixes"): a default
tensor type plus llama.cpp's per-tensor rules (llama_tensor_get_type in src/llama-quant.cpp), ported here
for llama-family models (no MoE, no Falcon):
- 1-D tensors, norms and anything not named *weight keep their type;
- the output projection (or the tied token embedding) goes to Q6_K, or Q8_0 where its rows are not whole
  blocks of the default type;
- the K mixes give attn_v and ffn_down more bits in the layers use_more_bits picks (first and last eighth,
  every third layer between), Q2_K/Q3_K_M/Q3_K_L and Q4_K_S raise attn_v, ffn_down and attn_output;
- a K-quant whose rows are not whole 256-value blocks falls back: Q4_K→Q5_0, Q5_K→Q5_1, Q6_K→Q8_0,
  Q2_K/Q3_K→Q4_0 (F16 if even that does not fit). SmolLM2's 576 columns take these fallbacks.
"""

import os
import sys
import time
from collections import Counter

import numpy as np
from gguf import GGMLQuantizationType as GGMLType
from gguf import GGUFValueType

from . import kernels
from .errors import InputError
from .model_file import ModelFile
from .model_writer import write_gguf
from .tensor import Tensor

# mix name -> (llama_ftype number written as general.file_type, the mix's default tensor type)
MIXES = {
    "f32": (0, GGMLType.F32), "f16": (1, GGMLType.F16),
    "q4_0": (2, GGMLType.Q4_0), "q4_1": (3, GGMLType.Q4_1), "q8_0": (7, GGMLType.Q8_0),
    "q5_0": (8, GGMLType.Q5_0), "q5_1": (9, GGMLType.Q5_1), "q2_k": (10, GGMLType.Q2_K),
    "q3_k_s": (11, GGMLType.Q3_K), "q3_k_m": (12, GGMLType.Q3_K), "q3_k_l": (13, GGMLType.Q3_K),
    "q4_k_s": (14, GGMLType.Q4_K), "q4_k_m": (15, GGMLType.Q4_K),
    "q5_k_s": (16, GGMLType.Q5_K), "q5_k_m": (17, GGMLType.Q5_K), "q6_k": (18, GGMLType.Q6_K),
}
# Plain tensor types name the mix of the same name (rewrite_model(…, GGMLType.Q4_0) is the q4_0 mix).
MIX_OF_TYPE = {default: name for name, (_, default) in MIXES.items()}
K_TYPES = (GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K)
K_FALLBACK = {GGMLType.Q2_K: GGMLType.Q4_0, GGMLType.Q3_K: GGMLType.Q4_0, GGMLType.Q4_K: GGMLType.Q5_0,
              GGMLType.Q5_K: GGMLType.Q5_1, GGMLType.Q6_K: GGMLType.Q8_0}
GGML_QNT_VERSION = 2
FLOAT_TYPES = (GGMLType.F32, GGMLType.F16, GGMLType.BF16)


def target_type(name: str) -> str:
    """The mix a command-line TYPE names (case-insensitive), e.g. 'Q4_K_M' -> 'q4_k_m'."""
    if name.lower() in MIXES:
        return name.lower()
    raise InputError(f"unknown type '{name}' (choose from {', '.join(MIXES)})")


def mix_name(target) -> str:
    if isinstance(target, str):
        return target_type(target)
    return MIX_OF_TYPE[GGMLType(target)]


def use_more_bits(i_layer: int, n_layer: int) -> bool:
    """llama.cpp's layers that get more bits in the _M mixes: the first and last eighth and every third between."""
    return i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8 or (i_layer - n_layer // 8) % 3 == 2


def quantizable(tensor: Tensor) -> bool:
    """llama.cpp's tensor_allows_quantization for llama-family names."""
    name = tensor.name
    return (len(tensor.shape) >= 2 and name.endswith("weight") and "_norm.weight" not in name
            and "ffn_gate_inp.weight" not in name)


def layer_of(name: str) -> int:
    """blk.N.… -> N; other tensors sort first (-1), as in llama.cpp's weights map."""
    if name.startswith("blk."):
        number = name.split(".")[1]
        if number.isdigit():
            return int(number)
    return -1


def model_shape(metadata: dict, names) -> dict:
    """What the rules read from the model: layer count, grouped-query factor, whether 70B-shaped, tied output."""
    arch = metadata.get("general.architecture", "llama")
    n_layer = int(metadata.get(f"{arch}.block_count", 0))
    n_head = int(metadata.get(f"{arch}.attention.head_count", 1) or 1)
    n_head_kv = int(metadata.get(f"{arch}.attention.head_count_kv", n_head) or n_head)
    return {"n_layer": n_layer, "n_gqa": n_head // n_head_kv,
            "is_70b": arch == "llama" and n_layer == 80 and n_head != n_head_kv,
            "tied": "output.weight" not in names}


def mix_rule(name: str, n_cols: int, new: GGMLType, mix: str, model: dict, i_attn_v: int, n_attn_v: int,
             i_ffn_down: int) -> GGMLType:
    """llama_tensor_get_type_impl for one quantizable tensor of a quantized mix (before the fallback)."""
    n_layer, n_gqa = model["n_layer"], model["n_gqa"]
    if name == "output.weight" or (model["tied"] and name == "token_embd.weight"):
        if n_cols % kernels.block_size(new):
            return GGMLType.Q8_0
        return new if new == GGMLType.Q8_0 else GGMLType.Q6_K
    if name == "token_embd.weight":
        return new
    if "attn_v.weight" in name or "attn_qkv.weight" in name:
        if mix == "q2_k":
            new = GGMLType.Q4_K if n_gqa >= 4 else GGMLType.Q3_K
        elif mix == "q3_k_m":
            new = GGMLType.Q5_K if i_attn_v < 2 else GGMLType.Q4_K
        elif mix == "q3_k_l":
            new = GGMLType.Q5_K
        elif mix in ("q4_k_m", "q5_k_m") and use_more_bits(i_attn_v, n_attn_v):
            new = GGMLType.Q6_K
        elif mix == "q4_k_s" and i_attn_v < 4:
            new = GGMLType.Q5_K
        if model["is_70b"] and new in (GGMLType.Q3_K, GGMLType.Q4_K):
            new = GGMLType.Q5_K  # 8 heads share each attn_v row: more bits there cost little
        return new
    if "ffn_down" in name:
        if mix == "q2_k":
            new = GGMLType.Q3_K
        elif mix == "q3_k_m":
            new = GGMLType.Q5_K if i_ffn_down < n_layer // 16 else GGMLType.Q4_K
        elif mix == "q3_k_l":
            new = GGMLType.Q5_K
        elif mix in ("q4_k_m", "q5_k_m") and use_more_bits(i_ffn_down, n_layer):
            new = GGMLType.Q6_K
        elif mix == "q4_k_s" and i_ffn_down < n_layer // 8:
            new = GGMLType.Q5_K
        return new
    if "attn_output.weight" in name:
        return {"q2_k": GGMLType.Q3_K, "q3_k_m": GGMLType.Q4_K, "q3_k_l": GGMLType.Q5_K}.get(mix, new)
    return new


def fallback(n_cols: int, new: GGMLType) -> GGMLType:
    """tensor_type_fallback: a type whose blocks do not tile the row is replaced by one whose blocks do."""
    if n_cols % kernels.block_size(new) == 0:
        return new
    new = K_FALLBACK.get(new, GGMLType.F16)  # plain types (llama.cpp refuses these) fall back to F16
    return new if n_cols % kernels.block_size(new) == 0 else GGMLType.F16


def tensor_types(tensors: dict, metadata: dict, target) -> dict:
    """name -> the type llama.cpp gives each tensor when the model is quantized to `target` (mix or type)."""
    mix = mix_name(target)
    default = MIXES[mix][1]
    model = model_shape(metadata, tensors)
    # llama.cpp walks the weights by (layer, name) and counts attn_v and ffn_down tensors as it goes.
    order = sorted(tensors, key=lambda name: (layer_of(name), name))
    n_attn_v = sum("attn_v.weight" in n or "attn_qkv.weight" in n for n in order)
    i_attn_v = i_ffn_down = 0
    types = {}
    for name in order:
        tensor = tensors[name]
        if not quantizable(tensor):
            types[name] = tensor.type
            continue
        new = default
        if default not in FLOAT_TYPES:
            new = fallback(tensor.n_cols, mix_rule(name, tensor.n_cols, default, mix, model,
                                                   i_attn_v, n_attn_v, i_ffn_down))
        i_attn_v += "attn_v.weight" in name or "attn_qkv.weight" in name
        i_ffn_down += "ffn_down" in name
        types[name] = new
    return types


def tensor_line(index: int, count: int, tensor: Tensor, new_type: GGMLType, new_nbytes: int) -> str:
    """One progress line in llama-quantize's form."""
    ne = list(reversed(tensor.shape)) + [1] * (4 - len(tensor.shape))
    dims = ", ".join(f"{n:5d}" for n in ne)
    old_mib = tensor.data.nbytes / 2**20
    if new_type == tensor.type:
        what = f"type = {tensor.type.name.lower():>6}, size = {old_mib:8.3f} MiB"
    else:
        what = (f"type = {tensor.type.name.lower():>6}, converting to {new_type.name.lower():>6} .. "
                f"size = {old_mib:8.3f} MiB -> {new_nbytes / 2**20:8.3f} MiB")
    return f"[{index:4d}/{count:4d}] {tensor.name:>36} - [{dims}], {what}"


def rewrite_model(model_file: ModelFile, out_path: str, target, patch_for=None,
                  sources: dict | None = None, name_note: str | None = None, progress: bool = True,
                  added: dict | None = None) -> dict:
    """Write model_file's model to out_path quantized to `target` (a mix name, a GGMLType, or None: each tensor
    keeps its own type).

    patch_for(name) -> None or f(w): f takes the weight's float32 rows (it may change them in place) and returns the
    patched weight to quantize (W + Σ s·B·A, or a DoRA weight: lora.merge.weight_patch).
    sources: tensors to read the patched weights from instead (--lora-base). added: tensors the file does not have
    to write as well (export-lora's output.weight beside a patched, tied token_embd). Returns sizes, timings and
    the count of tensors per written type.
    """
    start = time.perf_counter()
    all_tensors = {**model_file.tensors, **(added or {})}
    new_types = None if target is None else tensor_types(all_tensors, model_file.metadata, target)
    out_tensors = []
    count = len(all_tensors)
    for index, tensor in enumerate(all_tensors.values(), 1):
        new_type = tensor.type if new_types is None else new_types[tensor.name]
        patch = patch_for(tensor.name) if patch_for is not None else None
        if patch is None and new_type == tensor.type:
            out_tensors.append(tensor)  # untouched: the bytes as they are
        else:
            source = sources.get(tensor.name, tensor) if patch is not None and sources is not None else tensor
            w = kernels.dequantize(source.type, source.data, source.n_cols)
            if patch is not None:
                w = patch(np.array(w, dtype=np.float32).reshape(tensor.n_rows, tensor.n_cols))
            data = kernels.quantize(new_type, np.asarray(w, dtype=np.float32).reshape(tensor.n_rows, tensor.n_cols))
            out_tensors.append(Tensor(tensor.name, new_type, tensor.shape, data))
        if progress:
            print(tensor_line(index, count, tensor, new_type, out_tensors[-1].data.nbytes), file=sys.stderr, flush=True)
    metadata = dict(model_file.metadata)
    types = dict(model_file.metadata_types)
    if target is not None:
        ftype, default = MIXES[mix_name(target)]
        metadata["general.file_type"] = ftype
        types["general.file_type"] = (GGUFValueType.UINT32, None)
        if default not in FLOAT_TYPES:
            metadata["general.quantization_version"] = GGML_QNT_VERSION
            types["general.quantization_version"] = (GGUFValueType.UINT32, None)
    if name_note:
        metadata["general.name"] = f"{metadata.get('general.name', 'model')} ({name_note})"
        types["general.name"] = (GGUFValueType.STRING, None)
    write_gguf(out_path, metadata, out_tensors, types)
    type_counts = Counter(t.type.name.lower() for t in out_tensors)
    return {"in_bytes": os.path.getsize(model_file.path), "out_bytes": os.path.getsize(out_path),
            "seconds": time.perf_counter() - start, "n_tensors": len(out_tensors),
            "type_counts": dict(sorted(type_counts.items()))}
