"""What a fine-tuning run writes: the GGUF adapter, the PEFT folder and its checkpoints.

Checkpoints are .npz files (numpy arrays and one JSON header): the adapter's A and B, AdamW's moments and
step, the generator states and position of the data order, and the settings that must not change on resume.
Every file is written to a temporary name first and moved into place, so an interrupted save leaves the
previous file intact.
"""

import json
import os

import numpy as np

from ..errors import InputError
from ..lora.adapter import LoraAdapter, LoraTensor
from ..lora.gguf_adapter import write_gguf_adapter
from ..lora.peft import MODULES, unpermute_rows
from .data import DataOrder
from .optim import AdamW

CHECKPOINT_FORMAT = "llamalora-finetune-checkpoint"
CHECKPOINT_VERSION = 1
HF_MODULES = {part: module for module, part in MODULES.items()}


def replace_iteration(pattern: str, label) -> str:
    return pattern.replace("ITERATION", str(label))


def output_paths(pattern: str, step: int) -> list[str]:
    """llama.cpp's rule: a name holding ITERATION is written twice, with the step number and with LATEST."""
    if "ITERATION" in pattern:
        return [replace_iteration(pattern, step), replace_iteration(pattern, "LATEST")]
    return [pattern]


def adapter_of(params: dict, alpha: float, r: int, path: str = "") -> LoraAdapter:
    adapter = LoraAdapter(path, alpha=alpha, r=r)
    for name, a in params.items():
        if name.endswith(".lora_a"):
            weight = name[: -len(".lora_a")]
            b = params[f"{weight}.lora_b"]
            m = params.get(f"{weight}.lora_m")
            adapter.tensors[weight] = LoraTensor(a.astype(np.float32), b.astype(np.float32), alpha / a.shape[0],
                                                 None if m is None else m.astype(np.float32))
    return adapter


def write_adapter_gguf(path: str, params: dict, alpha: float, r: int, architecture: str = "llama") -> None:
    """A GGUF LoRA adapter (general.type adapter, adapter.type lora, adapter.lora.alpha; f32 lora_a/lora_b, and
    DoRA's lora_m)."""
    tmp = path + ".tmp"
    write_gguf_adapter(tmp, adapter_of(params, alpha, r, path), architecture)
    os.replace(tmp, path)


def write_peft(folder: str, params: dict, alpha: float, r: int, config, base_name: str | None = None) -> None:
    """adapter_config.json + adapter_model.safetensors that PEFT's PeftModel.from_pretrained loads onto the
    Hugging Face model: q_proj/k_proj lora_B rows (and DoRA magnitudes) back in Hugging Face's order, per-module
    ranks in rank_pattern; DoRA magnitudes as lora_magnitude_vector with use_dora set."""
    from safetensors.numpy import save_file

    os.makedirs(folder, exist_ok=True)
    tensors = {}
    ranks = {}
    for name, a in params.items():
        if not name.endswith(".lora_a"):
            continue
        weight = name[: -len(".lora_a")]
        _, layer, part, _ = weight.split(".")
        module = HF_MODULES[part]
        b = params[f"{weight}.lora_b"].astype(np.float32)
        m = params.get(f"{weight}.lora_m")
        m = None if m is None else m.astype(np.float32)
        heads = {"q_proj": config.n_head, "k_proj": config.n_head_kv}.get(module)
        if heads:
            b = unpermute_rows(b, heads)
            m = None if m is None else unpermute_rows(m, heads)
        group = "self_attn" if part.startswith("attn") else "mlp"
        prefix = f"base_model.model.model.layers.{layer}.{group}.{module}"
        tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a, dtype=np.float32)
        tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b)
        if m is not None:
            tensors[f"{prefix}.lora_magnitude_vector"] = np.ascontiguousarray(m)
        ranks[module] = a.shape[0]
    rank_pattern = {module: rank for module, rank in ranks.items() if rank != r}
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
        "r": int(r), "lora_alpha": float(alpha), "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "target_modules": sorted(ranks), "rank_pattern": rank_pattern, "alpha_pattern": {}, "use_rslora": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None, "layers_to_transform": None,
        "use_dora": any(name.endswith(".lora_m") for name in params),
    }
    tmp = os.path.join(folder, "adapter_model.safetensors.tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(folder, "adapter_model.safetensors"))
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(adapter_config, f, indent=2)


# ---- checkpoints ----

def state_arrays(prefix: str, state: dict) -> dict:
    return {f"{prefix}/key": np.asarray(state["state"]["key"], dtype=np.uint32),
            f"{prefix}/pos": np.asarray(state["state"]["pos"], dtype=np.int64)}


def state_from(arrays, prefix: str) -> dict:
    return {"bit_generator": "MT19937",
            "state": {"key": np.asarray(arrays[f"{prefix}/key"], dtype=np.uint32), "pos": int(arrays[f"{prefix}/pos"])}}


def save_checkpoint(path: str, params: dict, adam: AdamW, order: DataOrder, header: dict) -> None:
    arrays = {}
    for name, p in params.items():
        arrays[f"param/{name}"] = p
        if name in adam.m:
            arrays[f"m/{name}"] = adam.m[name]
            arrays[f"v/{name}"] = adam.v[name]
    arrays.update(state_arrays("order/current", order.state_current))
    arrays.update(state_arrays("order/next", order.state_next))
    header = dict(header, format=CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION, step=adam.step,
                  next_sample=order.next_sample, epochs=order.epochs, samples_used=order.samples_used)
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def load_checkpoint(path: str) -> tuple[dict, dict, dict, dict, DataOrder]:
    """params, m, v, header, data order of a checkpoint (AdamW's step is header['step'])."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read the checkpoint: {e}") from None
    if "header" not in arrays:
        raise InputError(f"{path}: not a llamalora finetune checkpoint (no header)")
    header = json.loads(arrays["header"].tobytes().decode())
    if header.get("format") != CHECKPOINT_FORMAT or header.get("version") != CHECKPOINT_VERSION:
        raise InputError(f"{path}: checkpoint format {header.get('format')!r} version {header.get('version')!r} "
                         f"is not {CHECKPOINT_FORMAT!r} version {CHECKPOINT_VERSION}")
    params = {k[len("param/"):]: v for k, v in arrays.items() if k.startswith("param/")}
    m = {k[len("m/"):]: v for k, v in arrays.items() if k.startswith("m/")}
    v = {k[len("v/"):]: v for k, v in arrays.items() if k.startswith("v/")}
    order = DataOrder(state_from(arrays, "order/current"), state_from(arrays, "order/next"),
                      int(header["next_sample"]), int(header["epochs"]), int(header["samples_used"]))
    return params, m, v, header, order
