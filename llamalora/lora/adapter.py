"""A LoRA adapter as the model uses it: per patched weight, A float32[r, n_in], B float32[n_out, r] and a scale.

Keys are the base model's GGUF tensor names (`blk.0.attn_q.weight`); B's rows are already in the GGUF
file's row order (q and k permuted as llama.cpp's converter permutes them). `load_adapter` reads any of
the three forms a user may hold: a PEFT folder, a ggla `.bin` (llama.cpp's original format) or a GGUF
adapter (llama.cpp's current one).
"""

import os
from dataclasses import dataclass, field

import numpy as np

from ..errors import AdapterError


@dataclass
class LoraTensor:
    a: np.ndarray  # float32[r, n_in]
    b: np.ndarray  # float32[n_out, r]
    scale: float   # alpha / r (or alpha / sqrt(r) with rsLoRA), times the user's scale
    # DoRA (PEFT's use_dora): the trained magnitude m, float32[n_out] in the file's row order. The patched weight is
    # then diag(m / ‖W + s·B·A‖) · (W + s·B·A), the norm over each output row (lora/dora.py); None: plain LoRA.
    magnitude: np.ndarray | None = None


@dataclass
class LoraAdapter:
    """alpha and r as the file or adapter_config.json states them (r is 0 when ranks differ and no single r
    is stated); each LoraTensor's scale is what the merge uses."""
    path: str
    tensors: dict[str, LoraTensor] = field(default_factory=dict)
    alpha: float = 0.0
    r: int = 0
    # Whole tensors (PEFT's modules_to_save, mergekit-extract-lora's norms) by GGUF name, float32 in the GGUF
    # tensor's shape and row order: they replace the base's tensors while the adapter is on (lora/replace.py).
    replaced: dict[str, np.ndarray] = field(default_factory=dict)
    # Activated LoRA (PEFT's alora_invocation_tokens): the adapter applies from the last occurrence of these token
    # ids in the prompt on (generate.Context); before it the model is the base model. None: everywhere.
    invocation: tuple | None = None


def load_adapter(path: str, metadata: dict, user_scale: float = 1.0) -> LoraAdapter:
    """Read an adapter in whichever form it comes; metadata is the base model's (for head counts)."""
    if os.path.isdir(path):
        from .peft import read_peft

        adapter = read_peft(path, metadata)
    else:
        try:
            with open(path, "rb") as f:
                magic = f.read(4)
        except OSError as e:
            raise AdapterError(f"{path}: cannot read the adapter: {e.strerror or e}") from None
        if magic == b"GGUF":
            from .gguf_adapter import read_gguf_adapter

            adapter = read_gguf_adapter(path, metadata.get("general.architecture"))
        elif magic == b"algg":  # 'ggla' as a little-endian uint32
            from .ggla import read_ggla

            adapter = read_ggla(path, metadata)
        else:
            raise AdapterError(f"{path}: not a LoRA adapter (a PEFT folder, a ggla .bin or a GGUF adapter)")
    for t in adapter.tensors.values():
        t.scale *= user_scale
    if user_scale == 0:  # the adapter is off: its whole tensors too
        adapter.replaced = {}
    return adapter


def check_adapter(adapter: LoraAdapter, tensors: dict) -> None:
    """Every patched tensor exists in the model and A, B fit its shape; nothing is changed before this passes."""
    if not adapter.tensors and not adapter.replaced:
        raise AdapterError(f"{adapter.path}: the adapter patches no tensor")
    from .replace import check_replaced

    check_replaced(adapter, tensors)
    for name, t in adapter.tensors.items():
        if name not in tensors:
            raise AdapterError(f"{adapter.path}: adapter patches {name}, which the model does not have")
        n_out, n_in = tensors[name].n_rows, tensors[name].n_cols
        if t.a.ndim != 2 or t.b.ndim != 2 or t.a.shape[0] != t.b.shape[1]:
            raise AdapterError(f"{adapter.path}: {name}: lora A {t.a.shape} and B {t.b.shape} disagree on the rank")
        if t.a.shape[1] != n_in or t.b.shape[0] != n_out:
            raise AdapterError(f"{adapter.path}: {name}: adapter delta is {(t.b.shape[0], t.a.shape[1])} "
                               f"(B {t.b.shape} · A {t.a.shape}) but the model's tensor is {(n_out, n_in)}")
        if t.magnitude is not None and t.magnitude.shape != (n_out,):
            raise AdapterError(f"{adapter.path}: {name}: DoRA magnitude has shape {t.magnitude.shape}, "
                               f"the model's tensor has {n_out} rows")


def b_for_file_scale(t: LoraTensor, file_scale: float) -> np.ndarray:
    """B for a file whose reader will scale B·A by file_scale: the ratio to this tensor's scale folded in."""
    if t.scale == file_scale:
        return t.b
    return (t.b.astype(np.float64) * (t.scale / file_scale)).astype(np.float32)
