"""Rewriting a model in another tensor type: `llamalora quantize` and the last step of `export-lora`.

Every weight matrix is widened to float32 (optionally patched there, e.g. W + Σ s·B·A) and quantized once
to its target type with our bit-exact quantizers. Which tensor gets which type follows llama.cpp's
llama_tensor_get_type for these types: 1-D tensors (norms) stay F32; the output projection (or the tied
token embedding) is kept at Q6_K for a 4-bit target, or Q8_0 where a row is not whole 256-value blocks.
"""

import os
import sys
import time

import numpy as np
from gguf import GGMLQuantizationType as GGMLType
from gguf import GGUFValueType

from . import kernels
from .errors import InputError
from .model_file import ModelFile
from .model_writer import write_gguf
from .tensor import Tensor

TARGETS = {"f32": GGMLType.F32, "f16": GGMLType.F16, "q8_0": GGMLType.Q8_0, "q4_0": GGMLType.Q4_0,
           "q4_1": GGMLType.Q4_1}
# llama.cpp's llama_ftype numbers, written as general.file_type
FILE_TYPES = {GGMLType.F32: 0, GGMLType.F16: 1, GGMLType.Q4_0: 2, GGMLType.Q4_1: 3, GGMLType.Q8_0: 7}


def target_type(name: str) -> GGMLType:
    try:
        return TARGETS[name.lower()]
    except KeyError:
        raise InputError(f"unknown type '{name}' (choose from {', '.join(TARGETS)})") from None


def tensor_type(tensor: Tensor, target: GGMLType, has_output: bool) -> GGMLType:
    """The type llama.cpp gives this tensor when the model is quantized to `target`."""
    if len(tensor.shape) < 2:
        return GGMLType.F32
    is_output = tensor.name == "output.weight" or (not has_output and tensor.name == "token_embd.weight")
    if is_output and target in (GGMLType.Q4_0, GGMLType.Q4_1):
        if tensor.n_cols % 256 == 0 and GGMLType.Q6_K in kernels.TYPES:
            return GGMLType.Q6_K
        return GGMLType.Q8_0
    if tensor.n_cols % kernels.block_size(target):
        return GGMLType.F16 if target != GGMLType.F32 else GGMLType.F32
    return target


def rewrite_model(model_file: ModelFile, out_path: str, target: GGMLType | None, delta_for=None,
                  sources: dict | None = None, name_note: str | None = None, progress: bool = True) -> dict:
    """Write model_file's model to out_path with its matrices in `target` (None: each keeps its own type).

    delta_for(name) -> float32[n_rows, n_cols] or None: added to the weight in float32 before it is quantized.
    sources: tensors to read the patched weights from instead (--lora-base). Returns sizes and timings.
    """
    from tqdm import tqdm

    start = time.perf_counter()
    has_output = "output.weight" in model_file.tensors
    out_tensors = []
    for tensor in tqdm(list(model_file.tensors.values()), desc="writing tensors", unit="tensor",
                       disable=not progress, file=sys.stderr):
        new_type = tensor.type if target is None else tensor_type(tensor, target, has_output)
        delta = delta_for(tensor.name) if delta_for is not None else None
        if delta is None and new_type == tensor.type:
            out_tensors.append(tensor)  # untouched: the bytes as they are
            continue
        source = sources[tensor.name] if delta is not None and sources is not None else tensor
        w = kernels.dequantize(source.type, source.data, source.n_cols)
        if delta is not None:
            w = w + delta
        data = kernels.quantize(new_type, np.asarray(w, dtype=np.float32).reshape(tensor.n_rows, tensor.n_cols))
        out_tensors.append(Tensor(tensor.name, new_type, tensor.shape, data))
    metadata = dict(model_file.metadata)
    types = dict(model_file.metadata_types)
    if target is not None and target in FILE_TYPES:
        metadata["general.file_type"] = FILE_TYPES[target]
        types["general.file_type"] = (GGUFValueType.UINT32, None)
    if name_note:
        metadata["general.name"] = f"{metadata.get('general.name', 'model')} ({name_note})"
        types["general.name"] = (GGUFValueType.STRING, None)
    write_gguf(out_path, metadata, out_tensors, types)
    return {"in_bytes": os.path.getsize(model_file.path), "out_bytes": os.path.getsize(out_path),
            "seconds": time.perf_counter() - start, "n_tensors": len(out_tensors)}
