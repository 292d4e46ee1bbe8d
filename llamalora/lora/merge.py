"""Merging adapters into weights: W' = W + Σ s·(B·A), computed in float32, written back in W's own type.
A DoRA tensor becomes diag(m / ‖W + s·B·A‖) · (W + s·B·A) (lora/dora.py).

With a lora-base model the patched tensors are read from it (typically f16, so the sum is formed on
weights that were never quantized) and quantized once, to the type of the model being run.
Untouched tensors stay views on the mapped file.
"""

import sys
import time

import numpy as np

from .. import kernels
from ..errors import AdapterError
from ..tensor import Tensor
from . import dora


def patched_names(adapters) -> list[str]:
    names = []
    for adapter in adapters:
        names += [n for n in adapter.tensors if n not in names]
    return names


def check_base(base_tensors: dict, tensors: dict, names: list[str], base_path: str) -> None:
    """The lora-base model must hold every patched tensor with the same shape as the model being run."""
    for name in names:
        if name not in base_tensors:
            raise AdapterError(f"{base_path}: --lora-base model has no tensor {name}")
        if tuple(base_tensors[name].shape) != tuple(tensors[name].shape):
            raise AdapterError(f"{base_path}: tensor {name} has shape {tuple(base_tensors[name].shape)} in --lora-base "
                               f"but {tuple(tensors[name].shape)} in the model")


def lora_delta(adapters, name: str) -> np.ndarray | None:
    """Σ s·(B·A) over the adapters that patch `name`, float32[n_out, n_in]; None if none does."""
    delta = None
    for adapter in adapters:
        lt = adapter.tensors.get(name)
        if lt is None or lt.scale == 0:
            continue
        product = np.float32(lt.scale) * (lt.b @ lt.a)
        delta = product if delta is None else delta + product
    return delta


def dora_tensor(adapters, name: str):
    """The DoRA LoraTensor that patches `name` (dora.check_combination leaves it alone there), or None."""
    for adapter in adapters:
        t = adapter.tensors.get(name)
        if t is not None and t.scale != 0 and t.magnitude is not None:
            return t
    return None


def weight_patch(adapters, name: str):
    """f(w) -> the patched weight for w, the float32 rows of W (changed in place), or None if no adapter patches
    `name`: w + Σ s·B·A, or DoRA's diag(g)·(w + s·B·A)."""
    t = dora_tensor(adapters, name)
    if t is not None:
        return lambda w: dora.merge_in_place(w, t, t.scale)
    delta = lora_delta(adapters, name)
    if delta is None:
        return None
    return lambda w: np.add(w, delta, out=w)


def stacked_factors(adapters, name: str) -> tuple:
    """A and s·B of every adapter that patches `name`, stacked along the rank: Σ s·(B·A) is then one product
    (None, None) if none does."""
    parts = [(t.a, np.float32(t.scale) * t.b) for t in (adapter.tensors.get(name) for adapter in adapters)
             if t is not None and t.scale != 0]
    if not parts:
        return None, None
    if len(parts) == 1:
        return parts[0]
    return np.concatenate([a for a, _ in parts], axis=0), np.concatenate([b for _, b in parts], axis=1)


def merge_adapters(tensors: dict, adapters: list, base_tensors: dict | None = None, base_path: str = "",
                   progress: bool = True) -> dict[str, Tensor]:
    """New Tensors for every weight an adapter patches, each in the type of tensors[name]."""
    from tqdm import tqdm

    start = time.perf_counter()
    dora.check_combination(adapters)
    names = patched_names(adapters)
    if base_tensors is not None:
        check_base(base_tensors, tensors, names, base_path)
    merged = {}
    # one float32 buffer for every tensor whose W must be widened first (fresh memory costs page faults)
    needs_scratch = [n for n in names if (base_tensors or tensors)[n].type not in kernels.MERGE_SOURCES
                     or tensors[n].type not in kernels.MERGE_TARGETS or dora_tensor(adapters, n) is not None]
    largest = max((tensors[n].n_rows * tensors[n].n_cols for n in needs_scratch), default=0)
    scratch = np.empty(largest, dtype=np.float32)
    for name in tqdm(names, desc="merging adapters", unit="tensor", disable=not progress, file=sys.stderr):
        target = tensors[name]
        source = base_tensors[name] if base_tensors is not None else target
        a, scaled_b = stacked_factors(adapters, name)
        dora_t = dora_tensor(adapters, name)
        if dora_t is not None:
            data = kernels.quantize(target.type, dora.merged_weight(source, dora_t, dora_t.scale, scratch))
        elif a is None:
            data = kernels.quantize(target.type, kernels.dequantize(source.type, source.data, source.n_cols))
        else:
            data = kernels.merge_low_rank(source.type, source.data, target.type, a, scaled_b, 1.0, scratch=scratch)
        merged[name] = Tensor(name, target.type, target.shape, data)
    if progress:
        for adapter in adapters:
            print(f"lora: {adapter.path}: r = {adapter.r}, alpha = {adapter.alpha:g}, "
                  f"scaling = {adapter_scale(adapter):g}, {len(adapter.tensors)} tensors", file=sys.stderr)
        print(f"lora: merged {len(merged)} tensors in {time.perf_counter() - start:.2f} s", file=sys.stderr)
    return merged


def adapter_scale(adapter) -> float:
    scales = {round(t.scale, 9) for t in adapter.tensors.values()}
    return scales.pop() if len(scales) == 1 else float("nan")
