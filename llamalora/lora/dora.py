"""DoRA (PEFT's use_dora): a LoRA pair plus a magnitude vector m, one value per output row of W.

PEFT's DoRA layer computes, for base weight W, factors A, B and scale s:

    W' = diag(g) · (W + s·B·A),   g = m / ‖W + s·B·A‖   (the norm of each output row, over its inputs)

so merging writes W' itself, and at run time, with W left quantized, y = g ⊙ (W·x + s·B·(A·x)): the run-time
delta as for LoRA, then one multiply per output. g is computed once per adapter and scale (at load, or when a
server request brings a new scale set) from W's dequantized rows: one pass over each patched W.

A user scale multiplies s, as PEFT's set_scale does, so it enters the norm too; a scale of 0 switches the adapter
off (llama.cpp's meaning of --lora-scaled F 0 and of a server request's scale 0), magnitude included.

Several adapters: PEFT applies each DoRA layer to the base weight alone and adds what each adapter's layer adds,
while its merge folds them in one after another (each later norm taken over the earlier merges), so two adapters
on one weight, one of them DoRA, have no single meaning. We run such a pair only where they patch different
weights and refuse it where one weight has both.
"""

import numpy as np

from .. import kernels
from ..errors import AdapterError


def is_dora(adapter) -> bool:
    return any(t.magnitude is not None for t in adapter.tensors.values())


def check_combination(adapters, scales=None) -> None:
    """Refuse a weight patched by a DoRA adapter and by another active adapter (scale not 0)."""
    scales = [1.0] * len(adapters) if scales is None else list(scales)
    active = [adapter for adapter, user in zip(adapters, scales) if user != 0]
    if len(active) < 2 or not any(is_dora(adapter) for adapter in active):
        return
    owner = {}
    for adapter in active:
        for name, t in adapter.tensors.items():
            if t.scale == 0:
                continue
            if name in owner:
                other, other_t = owner[name]
                if t.magnitude is not None or other_t.magnitude is not None:
                    dora, plain = (other, adapter) if other_t.magnitude is not None else (adapter, other)
                    raise AdapterError(
                        f"{dora.path}: this DoRA adapter and {plain.path} both patch {name}: PEFT applies each "
                        "DoRA layer to the base weight alone, so the two have no single merged weight; use them "
                        "one at a time (or on different weights)")
            owner[name] = (adapter, t)


def magnitude_scale(w_plus_delta: np.ndarray, magnitude: np.ndarray) -> np.ndarray:
    """g = m / ‖W + s·B·A‖ per row, float32[n_rows], from the float32 rows of W + s·B·A. A row whose norm is 0 (W
    and the delta both zero there) gets g = 0: its output is 0 whatever g is."""
    norms = kernels.row_norms(w_plus_delta)
    g = np.zeros_like(norms)
    np.divide(magnitude.astype(np.float32), norms, out=g, where=norms > 0)
    return g


def add_delta(w: np.ndarray, t, scale: float) -> np.ndarray:
    """w float32[n_rows, n_cols] += s·B·A in place for the DoRA LoraTensor t at total scale s; returns g."""
    kernels.add_low_rank(w, t.a, np.float32(scale) * t.b)
    return magnitude_scale(w, t.magnitude)


def merge_in_place(w: np.ndarray, t, scale: float) -> np.ndarray:
    """w ← diag(g) · (w + s·B·A): the merged DoRA weight, in place on the float32 rows of W; returns w."""
    w *= add_delta(w, t, scale)[:, None]
    return w


def merged_weight(tensor, t, scale: float, scratch: np.ndarray | None = None) -> np.ndarray:
    """W' = diag(g) · (W + s·B·A), float32[n_rows, n_cols], W the model's tensor (its raw rows dequantized exactly,
    into scratch when it is large enough: the result is then a view on it)."""
    return merge_in_place(widened(tensor, scratch), t, scale)


def row_scale(tensor, t, scale: float, scratch: np.ndarray | None = None) -> np.ndarray:
    """g of the run-time form y = g ⊙ (W·x + s·B·(A·x)) for the model's tensor W."""
    return add_delta(widened(tensor, scratch), t, scale)


def widened(tensor, scratch: np.ndarray | None) -> np.ndarray:
    n = tensor.n_rows * tensor.n_cols
    if scratch is None or scratch.size < n:
        scratch = np.empty(n, dtype=np.float32)
    return kernels.dequantize(tensor.type, tensor.data, tensor.n_cols,
                              out=scratch[:n].reshape(tensor.n_rows, tensor.n_cols))
