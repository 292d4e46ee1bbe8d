"""Whole tensors an adapter brings (PEFT's modules_to_save, mergekit-extract-lora's norms), and the tied output.

A PEFT adapter trained with modules_to_save=["lm_head"] (or embed_tokens, a norm, a projection) saves that module
whole; while the adapter is on, its tensor stands in for the base's. We take it as F32 (the adapter's own values),
in run-time and in merge mode alike: a replacement is not a delta, so there is nothing to keep W quantized for.
An embed_tokens or lm_head with more rows than the model's vocabulary comes from a tokenizer grown by new tokens,
which the GGUF file does not have: refused.

Tied embeddings: the model's output projection is token_embd itself. PEFT keeps the base weight there when the
adapter changes embed_tokens (its LoRA on the embedding layer, or a modules_to_save copy, adds to the looked-up
rows only; lm_head still holds the base matrix), so a merge that changes token_embd adds output.weight = the base
token_embd; an lm_head replacement on a tied model becomes output.weight and leaves token_embd alone.
"""

import numpy as np
from gguf import GGMLQuantizationType as GGMLType

from ..errors import AdapterError
from ..tensor import Tensor

VOCABULARY_TENSORS = ("token_embd.weight", "output.weight")


def check_replaced(adapter, tensors: dict) -> None:
    """Every whole tensor has the shape of the base tensor it replaces (output.weight of a tied model: token_embd's)."""
    for name, value in adapter.replaced.items():
        base = tensors.get(name)
        if base is None and name == "output.weight" and "token_embd.weight" in tensors:
            base = tensors["token_embd.weight"]  # tied: lm_head stands beside the embeddings
        if base is None:
            raise AdapterError(f"{adapter.path}: adapter replaces {name}, which the model does not have")
        want = tuple(base.shape)
        if name in VOCABULARY_TENSORS and value.ndim == 2 and value.shape[1:] == want[1:] and value.shape[0] > want[0]:
            raise AdapterError(f"{adapter.path}: {name} has {value.shape[0]} rows but the model's vocabulary has "
                               f"{want[0]} tokens: the adapter was trained with added tokens, whose tokenizer the GGUF "
                               "model does not have")
        if tuple(value.shape) != want:
            raise AdapterError(f"{adapter.path}: {name} has shape {tuple(value.shape)} in the adapter but "
                               f"{want} in the model")
        if name in adapter.tensors:
            raise AdapterError(f"{adapter.path}: {name} is replaced whole and patched by a LoRA pair at once")


def as_tensor(name: str, value: np.ndarray) -> Tensor:
    """An F32 Tensor holding value (numpy-order shape; 1-D values are one row)."""
    rows = np.ascontiguousarray(value, dtype=np.float32).reshape(value.shape[0] if value.ndim == 2 else 1, -1)
    return Tensor(name, GGMLType.F32, tuple(value.shape), rows.view(np.uint8))


def replacements(adapters, tensors: dict) -> dict[str, Tensor]:
    """The whole tensors of the active adapters (loaded at a scale other than 0), as F32 Tensors; the last
    adapter wins where two replace one tensor. A tied model whose lm_head is replaced gets it as output.weight."""
    out = {}
    for adapter in adapters:
        for name, value in adapter.replaced.items():
            out[name] = as_tensor(name, value)
    return out


def keep_tied_output(tensors: dict, changed: dict) -> dict:
    """changed (name -> new Tensor) plus output.weight = the base token_embd where the model's output is tied to
    token_embd and changed alters token_embd (PEFT's tied lm_head keeps the base matrix)."""
    if "token_embd.weight" in changed and "output.weight" not in tensors and "output.weight" not in changed:
        base = tensors["token_embd.weight"]
        changed = dict(changed, **{"output.weight": Tensor("output.weight", base.type, base.shape, base.data)})
    return changed


def check_scales(adapters, scales) -> None:
    """A request's scales cannot switch off an adapter whose whole tensors the model holds (they were put in at load)."""
    for adapter, scale in zip(adapters, scales):
        if adapter.replaced and scale == 0:
            raise AdapterError(f"{adapter.path}: the adapter replaces whole tensors ({', '.join(sorted(adapter.replaced))}),"
                               " which stay in place once loaded; it cannot be switched off by a scale of 0")
