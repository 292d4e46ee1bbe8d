"""One token at a time: every layer of the model in one compiled call.

A prompt batch runs op by op through LlamaModel.forward, where each op's Python call is small next to its work.
For a single token the ops are tiny: a dozen Python-level calls per layer (norm, seven matvecs, RoPE, cache
writes, attention, SwiGLU, residual adds, LoRA deltas) cost as much as the weights' arithmetic. Here the layers'
weights are rows of a table (kernels.dispatch: each type's own kernel, called from compiled code) and
`forward_layers` runs all layers, with run-time LoRA deltas and optional biases, in one call.

The arithmetic is ops.py's, in the batch path's order, so a token's hidden state is the batch path's bit for bit
(run-time LoRA deltas aside: their dot products are summed in another order).
"""

import os

import numba
import numpy as np
from numba import njit

from .kernels import cache, dispatch
from .ops import attention, rms_norm, rope_inplace, swiglu

SLOTS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
Q, K, V, O, GATE, UP, DOWN = range(len(SLOTS))
N_SLOTS = len(SLOTS)
LORA_TABLES_KEPT = 16  # run-time adapter sets whose tables stay built (a server keeps one per scale set)


class LayerPlan:
    """The layers' weights, norms and biases as forward_layers reads them (built once per model), and the tables
    of the run-time LoRA delta sets it has been given."""

    def __init__(self, layers):
        weights = [getattr(layer, slot) for layer in layers for slot in SLOTS]
        self.names = [w.name for w in weights]
        self.shapes = [(w.n_rows, w.n_cols) for w in weights]
        self.weights, self.keep = dispatch.weight_table(weights)
        self.norms = np.ascontiguousarray(np.stack([np.stack([layer.attn_norm, layer.ffn_norm]) for layer in layers]),
                                          dtype=np.float32)
        biases = [np.ascontiguousarray(layer.bias[slot], dtype=np.float32) if slot in layer.bias else None
                  for layer in layers for slot in SLOTS]
        for b, (n_rows, _), name in zip(biases, self.shapes, self.names):
            if b is not None and b.shape != (n_rows,):
                raise ValueError(f"bias of {name} has shape {b.shape}, expected ({n_rows},)")
        self.biases = float_table([[b] for b in biases])
        self.keep += [b for b in biases if b is not None]
        self.no_lora = np.zeros((len(weights), 6), dtype=np.int64)
        self.lora_tables = {}  # id(deltas) -> (deltas, table): the dict is kept so that its id stays its own

    def lora_table(self, deltas: dict | None) -> np.ndarray:
        """int64[n_slots, 6]: (address, rows, cols) of A and of packed s·B per layer weight, zeros where no delta.
        The arrays are those of `deltas` (checked here: the step reads them by address, without bounds), which the
        caller keeps alive and unchanged while it uses them."""
        if not deltas:
            return self.no_lora
        found = self.lora_tables.get(id(deltas))
        if found is not None and found[0] is deltas:
            return found[1]
        for name, (n_rows, n_cols) in zip(self.names, self.shapes):
            if name in deltas:
                a, packed_b = deltas[name]
                if a.ndim != 2 or a.shape[1] != n_cols or packed_b.shape != (-(-n_rows // 16) * a.shape[0], 16):
                    raise ValueError(f"LoRA delta of {name}: A {a.shape} and packed s·B {packed_b.shape} do not "
                                     f"fit a {n_rows} × {n_cols} weight")
        table = float_table([list(deltas[name]) if name in deltas else [None, None] for name in self.names])
        while len(self.lora_tables) >= LORA_TABLES_KEPT:
            self.lora_tables.pop(next(iter(self.lora_tables)))
        self.lora_tables[id(deltas)] = (deltas, table)
        return table


def float_table(rows: list) -> np.ndarray:
    """int64[len(rows), 3·k]: (address, rows, cols) of each row's k float32 arrays; zeros for None."""
    table = np.zeros((len(rows), 3 * max(len(r) for r in rows)), dtype=np.int64)
    for i, arrays in enumerate(rows):
        for j, a in enumerate(arrays):
            if a is not None:
                if a.dtype != np.float32:
                    raise ValueError("table arrays must be float32")
                table[i, 3 * j:3 * j + 3] = dispatch.matrix_entry(a)
    return table


def run_layers(plan: LayerPlan, x: np.ndarray, cache, cos: np.ndarray, sin: np.ndarray, config, deltas) -> None:
    """x float32[dim] (C-contiguous) ← the hidden state after every layer, for the token at position cache.n,
    whose keys and values are written to the cache (cache.n is left to the caller)."""
    forward_layers(x, plan.weights, plan.norms, plan.biases, plan.lora_table(deltas), cache.k, cache.v, cache.n,
                   cos, sin, config.n_head, config.n_head_kv, config.n_ff, config.rms_eps, config.rope_neox,
                   numba.get_num_threads() == 1)


@njit(nogil=True, cache=True)
def linear(weights, biases, lora, s, x, out, one_thread):
    """out = W_s · x (+ s·B_s·(A_s·x)) (+ bias_s): weight s of the tables (the delta inside the weight's kernel,
    which also prefetches the next weight's A)."""
    following = min(s + 1, lora.shape[0] - 1)  # whose A the kernel prefetches (the last weight's own: no rows)
    dispatch.matvec_entry(weights, s, x, out, dispatch.float_matrix(lora[s, 0], lora[s, 1], lora[s, 2]),
                          dispatch.float_matrix(lora[s, 3], lora[s, 4], lora[s, 5]),
                          dispatch.float_matrix(lora[following, 0], lora[following, 1] if following > s else 0,
                                                lora[following, 2]), one_thread)
    if biases[s, 2]:
        out += dispatch.float_matrix(biases[s, 0], 1, biases[s, 2])[0]


@njit(nogil=True, cache=True)
def forward_layers(x, weights, norms, biases, lora, k_all, v_all, n_past, cos, sin, n_head, n_head_kv, n_ff, eps,
                   neox, one_thread):
    n_layer, dim = norms.shape[0], x.shape[0]
    head_dim = dim // n_head
    q = np.empty((1, n_head, head_dim), dtype=np.float32)
    k = np.empty((1, n_head_kv, head_dim), dtype=np.float32)
    v = np.empty((1, n_head_kv, head_dim), dtype=np.float32)
    attn = np.empty((1, n_head, head_dim), dtype=np.float32)
    proj = np.empty(dim, dtype=np.float32)
    gate = np.empty((1, n_ff), dtype=np.float32)
    up = np.empty((1, n_ff), dtype=np.float32)
    x_row = x.reshape((1, dim))
    for i in range(n_layer):
        s = i * N_SLOTS
        h = rms_norm(x_row, norms[i, 0], eps)[0]
        linear(weights, biases, lora, s + Q, h, q.reshape(dim), one_thread)
        linear(weights, biases, lora, s + K, h, k.reshape(k.size), one_thread)
        linear(weights, biases, lora, s + V, h, v.reshape(v.size), one_thread)
        rope_inplace(q, cos, sin, neox)
        rope_inplace(k, cos, sin, neox)
        k_all[i, n_past] = k[0]
        v_all[i, n_past] = v[0]
        attention(q, k_all[i], v_all[i], n_past, attn)
        linear(weights, biases, lora, s + O, attn.reshape(dim), proj, one_thread)
        x += proj
        h = rms_norm(x_row, norms[i, 1], eps)[0]
        linear(weights, biases, lora, s + GATE, h, gate[0], one_thread)
        linear(weights, biases, lora, s + UP, h, up[0], one_thread)
        linear(weights, biases, lora, s + DOWN, swiglu(gate, up)[0], proj, one_thread)
        x += proj


for _function in (linear, forward_layers):
    cache.follows(_function, cache.KERNEL_SOURCES + [__file__, os.path.join(os.path.dirname(__file__), "ops.py")])
