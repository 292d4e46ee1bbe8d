"""One token at a time, or a few token columns: every layer of the model in one compiled call.

A prompt batch runs op by op through LlamaModel.forward, where each op's Python call is small next to its work.
For a single token the ops are tiny: a dozen Python-level calls per layer (norm, seven matvecs, RoPE, cache
writes, attention, SwiGLU, residual adds, LoRA deltas) cost as much as the weights' arithmetic. Here the layers'
weights are rows of a table (kernels.dispatch: each type's own kernel, called from compiled code) and
`forward_layers` runs all layers, with run-time LoRA deltas and optional biases, in one call.

The arithmetic is ops.py's, in the batch path's order, so a token's hidden state is the batch path's bit for bit
(run-time LoRA deltas aside: their dot products are summed in another order).

`forward_columns` runs a few tokens as columns through the same step (kernels/columns.py: every weight row read
once for all of them): the decoding sequences of a batch (batch.py), each with its own cache, position and deltas,
and a short prompt chunk (up to COLUMN_TOKENS tokens, one column per token in order). Each column's sums are
run_layers' for that token alone, so a chunk evaluated this way equals its tokens decoded one by one.
"""

import atexit
import functools
import os
import sys
import threading

import numba
import numpy as np
from numba import njit

from . import compile_clock
from .kernels import cache, columns, dispatch
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
        self.kinds = dispatch.kinds_mask(weights)  # the compiled step is specialised to these types
        self.norms = np.ascontiguousarray(np.stack([np.stack([layer.attn_norm, layer.ffn_norm]) for layer in layers]),
                                          dtype=np.float32)
        biases = [np.ascontiguousarray(layer.bias[slot], dtype=np.float32) if slot in layer.bias else None
                  for layer in layers for slot in SLOTS]
        for b, (n_rows, _), name in zip(biases, self.shapes, self.names):
            if b is not None and b.shape != (n_rows,):
                raise ValueError(f"bias of {name} has shape {b.shape}, expected ({n_rows},)")
        self.biases = float_table([[b] for b in biases])
        self.keep += [b for b in biases if b is not None]
        self.no_lora = np.zeros((len(weights), 9), dtype=np.int64)
        self.lora_tables = {}  # id(deltas) -> (deltas, table): the dict is kept so that its id stays its own

    def lora_table(self, deltas: dict | None) -> np.ndarray:
        """int64[n_slots, 9]: (address, rows, cols) of A, of packed s·B and of DoRA's g (llama.LoraDelta) per layer
        weight, zeros where there is none.
        The arrays are those of `deltas` (checked here: the step reads them by address, without bounds), which the
        caller keeps alive and unchanged while it uses them."""
        if not deltas:
            return self.no_lora
        found = self.lora_tables.get(id(deltas))
        if found is not None and found[0] is deltas:
            return found[1]
        for name, (n_rows, n_cols) in zip(self.names, self.shapes):
            if name in deltas:
                a, packed_b, g = deltas[name]
                if a.ndim != 2 or a.shape[1] != n_cols or packed_b.shape != (-(-n_rows // 16) * a.shape[0], 16):
                    raise ValueError(f"LoRA delta of {name}: A {a.shape} and packed s·B {packed_b.shape} do not "
                                     f"fit a {n_rows} × {n_cols} weight")
                if g is not None and g.shape != (n_rows,):
                    raise ValueError(f"DoRA scale of {name} has shape {g.shape}, expected ({n_rows},)")
        table = float_table([list(deltas[name]) if name in deltas else [None, None, None] for name in self.names])
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
    _layers_step(plan.kinds)(x, plan.weights, plan.norms, plan.biases, plan.lora_table(deltas), cache.k, cache.v,
                             cache.n, cos, sin, config.n_head, config.n_head_kv, config.n_ff, config.rms_eps,
                             config.rope_neox, numba.get_num_threads() == 1)


@njit(nogil=True, cache=True)
def linear(weights, kinds, biases, lora, s, x, out, one_thread):
    """out = W_s · x (+ s·B_s·(A_s·x)) (⊙ g_s) (+ bias_s): weight s of the tables (the delta inside the weight's
    kernel, which also prefetches the next weight's A; DoRA's per-output scale g after it)."""
    following = min(s + 1, lora.shape[0] - 1)  # whose A the kernel prefetches (the last weight's own: no rows)
    dispatch.matvec_entry(weights, kinds, s, x, out, dispatch.float_matrix(lora[s, 0], lora[s, 1], lora[s, 2]),
                          dispatch.float_matrix(lora[s, 3], lora[s, 4], lora[s, 5]),
                          dispatch.float_matrix(lora[following, 0], lora[following, 1] if following > s else 0,
                                                lora[following, 2]), one_thread)
    if lora[s, 8]:
        out *= dispatch.float_matrix(lora[s, 6], 1, lora[s, 8])[0]
    if biases[s, 2]:
        out += dispatch.float_matrix(biases[s, 0], 1, biases[s, 2])[0]


@njit(nogil=True, cache=True)
def forward_layers(x, weights, kinds, norms, biases, lora, k_all, v_all, n_past, cos, sin, n_head, n_head_kv, n_ff,
                   eps, neox, one_thread):
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
        linear(weights, kinds, biases, lora, s + Q, h, q.reshape(dim), one_thread)
        linear(weights, kinds, biases, lora, s + K, h, k.reshape(k.size), one_thread)
        linear(weights, kinds, biases, lora, s + V, h, v.reshape(v.size), one_thread)
        rope_inplace(q, cos, sin, neox)
        rope_inplace(k, cos, sin, neox)
        k_all[i, n_past] = k[0]
        v_all[i, n_past] = v[0]
        attention(q, k_all[i], v_all[i], n_past, attn)
        linear(weights, kinds, biases, lora, s + O, attn.reshape(dim), proj, one_thread)
        x += proj
        h = rms_norm(x_row, norms[i, 1], eps)[0]
        linear(weights, kinds, biases, lora, s + GATE, h, gate[0], one_thread)
        linear(weights, kinds, biases, lora, s + UP, h, up[0], one_thread)
        linear(weights, kinds, biases, lora, s + DOWN, swiglu(gate, up)[0], proj, one_thread)
        x += proj


COLUMN_TOKENS = 16  # token columns a prompt chunk runs as (longer chunks: the matmul tiles, faster from ~24 on)


def run_columns(plan: LayerPlan, x: np.ndarray, caches: list, positions: np.ndarray, cos: np.ndarray,
                sin: np.ndarray, config, deltas: list) -> None:
    """x float32[b, dim] (C order) ← each column's hidden state after every layer: column j is the token at
    positions[j] of the sequence whose KVCache is caches[j], run with deltas[j] (a sequence's columns in order of
    position: each sees the keys of those before it). Each column's arithmetic is run_layers' for that token alone
    (kernels/columns.py reads every weight row once for all the columns). The caches' n are the caller's."""
    _columns_step(plan.kinds)(*_columns_args(plan, x, caches, positions, cos, sin, config, deltas))


def _columns_args(plan: LayerPlan, x, caches, positions, cos, sin, config, deltas) -> tuple:
    for cache in {id(c): c for c in caches}.values():
        check_cache(cache, config)
    table = np.array([[c.k.ctypes.data, c.v.ctypes.data, c.n_ctx] for c in caches], dtype=np.int64)
    for c, p in zip(caches, positions):
        if p >= c.n_ctx:
            raise ValueError(f"a token at position {p} overflows the context of {c.n_ctx}")
    lora = np.stack([plan.lora_table(d) for d in deltas])
    return (x, plan.weights, plan.norms, plan.biases, lora, table, np.asarray(positions, dtype=np.int64), cos, sin,
            config.n_layer, config.n_head, config.n_head_kv, config.n_ff, config.rms_eps, config.rope_neox,
            numba.get_num_threads() == 1)


_columns_compiling: dict[int, threading.Thread] = {}


def columns_ready(plan: LayerPlan, x, caches, positions, cos, sin, config, deltas) -> bool:
    """Whether run_columns is compiled for this plan's weight types; if not, and the one-token step is, it is
    compiled from now on: at once where the one-token step came from numba's cache (so, most likely, does this
    one), else in a background thread, and the caller runs the columns' tokens one by one through run_layers
    meanwhile (the same sums: each column's are run_layers' for that token). The columns step is most of what a
    first run compiles (39 of 49 s for SmolLM2 Q4_1 on an AMD EPYC), and a short prompt does not need it: so the
    first answer waits only for the one-token step, which is compiled first (a compilation holds numba's lock until
    it ends). The arguments are run_columns'; only their types are used."""
    step = _columns_step(plan.kinds)
    if step.signatures:
        return True
    one_token = _layers_step(plan.kinds)
    if plan.kinds in _columns_compiling or not one_token.signatures:
        return False
    signature = tuple(numba.typeof(a) for a in _columns_args(plan, x, caches, positions, cos, sin, config, deltas))
    if sum(one_token.stats.cache_hits.values()):
        step.compile(signature)
        return True
    thread = threading.Thread(target=step.compile, args=(signature,), name=compile_clock.BACKGROUND, daemon=True)
    _columns_compiling[plan.kinds] = thread
    thread.start()
    return False


@atexit.register
def _finish_background_compilation() -> None:
    """A columns step still compiling at exit is waited for, so that it reaches numba's cache (a short first run
    would otherwise end before it, and every run after it would compile it again)."""
    running = [thread for thread in _columns_compiling.values() if thread.is_alive()]
    if running:
        print("llamalora: saving the last compiled kernels to the cache (a first run only)", file=sys.stderr,
              flush=True)
        for thread in running:
            thread.join()


def linear_rows(weight, x: np.ndarray, out: np.ndarray, deltas: list) -> None:
    """out[j] = W·x[j] (+ deltas[j]'s run-time delta of W) for a few rows x float32[b, n_cols], every row of W read
    once for them all and each row's sums those of the one-token path (kernels.matvec, add_low_rank_matvec): the
    output projection of a batch's sequences, or of a short chunk's tokens."""
    table, keep = dispatch.weight_table([weight])
    found = [d.get(weight.name) if d else None for d in deltas]
    lora = float_table([list(delta)[:2] if delta is not None else [None, None] for delta in found])
    columns.entry_for(dispatch.kinds_mask([weight]))(table, 0, np.ascontiguousarray(x, dtype=np.float32), out, lora,
                                                     columns.NO_FLOATS, numba.get_num_threads() == 1)
    del keep  # (the table points into these arrays until here)
    for j, delta in enumerate(found):
        if delta is not None and delta.g is not None:  # DoRA's per-output scale, as LlamaModel.linear applies it
            out[j] *= delta.g


def check_cache(cache, config) -> None:
    """run_columns reads caches by address: each must be float32[n_layer, n_ctx, n_head_kv, head_dim], C order."""
    shape = (config.n_layer, cache.n_ctx, config.n_head_kv, config.head_dim)
    for a in (cache.k, cache.v):
        if a.shape != shape or a.dtype != np.float32 or not a.flags.c_contiguous:
            raise ValueError(f"a KV cache of shape {a.shape} ({a.dtype}) does not fit the model's {shape}")


@njit(nogil=True, cache=True)
def _next_a(lora, s):
    """The first column's A of weight s + 1 (what the kernels prefetch while they run weight s), or no rows."""
    following = min(s + 1, lora.shape[1] - 1)
    for j in range(lora.shape[0]):
        if following > s and lora[j, following, 1]:
            return dispatch.float_matrix(lora[j, following, 0], lora[j, following, 1], lora[j, following, 2])
    return dispatch.float_matrix(lora[0, following, 0], 0, lora[0, following, 2])


@njit(nogil=True, cache=True)
def linear_columns(weights, kinds, biases, lora, s, X, out, one_thread):
    """out[j] = W_s·X[j] (+ column j's delta s·B·(A·X[j]), lora[j, s]) (⊙ its DoRA g) (+ bias_s) for every column:
    the one place a batched step applies each sequence's own adapters (linear's arithmetic, column by column)."""
    # (a C-ordered copy of the weight's LoRA rows: the kernels are compiled for the tables Python passes too)
    columns.matvec_columns_entry(weights, kinds, s, X, out, np.ascontiguousarray(lora[:, s, :]), _next_a(lora, s),
                                 one_thread)
    for j in range(out.shape[0]):
        if lora[j, s, 8]:
            out[j] *= dispatch.float_matrix(lora[j, s, 6], 1, lora[j, s, 8])[0]
    if biases[s, 2]:
        bias = dispatch.float_matrix(biases[s, 0], 1, biases[s, 2])[0]
        for j in range(out.shape[0]):
            out[j] += bias


@njit(nogil=True, cache=True)
def forward_columns(x, weights, kinds, norms, biases, lora, caches, positions, cos, sin, n_layer, n_head, n_head_kv,
                    n_ff, eps, neox, one_thread):
    """x float32[b, dim] ← each column's hidden state after every layer, column j the token at positions[j] of the
    sequence whose KV cache is caches[j] = (address of k, of v, n_ctx), with lora[j] its LoRA tables (decode.py's
    forward_layers, one column at a time where the columns differ: RoPE, cache writes, attention)."""
    b, dim = x.shape
    head_dim = dim // n_head
    kv_dim = n_head_kv * head_dim
    q = np.empty((b, n_head, head_dim), dtype=np.float32)
    k = np.empty((b, n_head_kv, head_dim), dtype=np.float32)
    v = np.empty((b, n_head_kv, head_dim), dtype=np.float32)
    attn = np.empty((b, n_head, head_dim), dtype=np.float32)
    proj = np.empty((b, dim), dtype=np.float32)
    gate = np.empty((b, n_ff), dtype=np.float32)
    up = np.empty((b, n_ff), dtype=np.float32)
    for i in range(n_layer):
        s = i * N_SLOTS
        h = rms_norm(x, norms[i, 0], eps)
        linear_columns(weights, kinds, biases, lora, s + Q, h, q.reshape((b, dim)), one_thread)
        linear_columns(weights, kinds, biases, lora, s + K, h, k.reshape((b, kv_dim)), one_thread)
        linear_columns(weights, kinds, biases, lora, s + V, h, v.reshape((b, kv_dim)), one_thread)
        rope_inplace(q, cos, sin, neox)
        rope_inplace(k, cos, sin, neox)
        for j in range(b):
            n_ctx = caches[j, 2]
            k_all = dispatch.float_matrix(caches[j, 0], n_layer * n_ctx, kv_dim).reshape((n_layer, n_ctx, n_head_kv,
                                                                                            head_dim))
            v_all = dispatch.float_matrix(caches[j, 1], n_layer * n_ctx, kv_dim).reshape((n_layer, n_ctx, n_head_kv,
                                                                                            head_dim))
            n_past = positions[j]
            k_all[i, n_past] = k[j]
            v_all[i, n_past] = v[j]
            # (C-ordered views, as decode.py passes them: the same compiled attention)
            attention(q[j].reshape((1, n_head, head_dim)), k_all[i], v_all[i], n_past,
                      attn[j].reshape((1, n_head, head_dim)))
        linear_columns(weights, kinds, biases, lora, s + O, attn.reshape((b, dim)), proj, one_thread)
        x += proj
        h = rms_norm(x, norms[i, 1], eps)
        linear_columns(weights, kinds, biases, lora, s + GATE, h, gate, one_thread)
        linear_columns(weights, kinds, biases, lora, s + UP, h, up, one_thread)
        linear_columns(weights, kinds, biases, lora, s + DOWN, swiglu(gate, up), proj, one_thread)
        x += proj


# The steps Python calls, one per kinds mask (dispatch.kinds_mask of the plan's weights) with the mask as a closure
# constant: compiled for the model's own weight types, and called without numba's literal dispatch, which types a
# `literally` argument passed from Python anew on every call (4 ms).
@functools.cache
def _layers_step(kinds: int):
    @njit(nogil=True, cache=True)
    def step(x, weights, norms, biases, lora, k_all, v_all, n_past, cos, sin, n_head, n_head_kv, n_ff, eps, neox,
             one_thread):
        forward_layers(x, weights, kinds, norms, biases, lora, k_all, v_all, n_past, cos, sin, n_head, n_head_kv,
                       n_ff, eps, neox, one_thread)

    cache.follows(step, SOURCES)
    return step


@functools.cache
def _columns_step(kinds: int):
    @njit(nogil=True, cache=True)
    def step(x, weights, norms, biases, lora, caches, positions, cos, sin, n_layer, n_head, n_head_kv, n_ff, eps,
             neox, one_thread):
        forward_columns(x, weights, kinds, norms, biases, lora, caches, positions, cos, sin, n_layer, n_head,
                        n_head_kv, n_ff, eps, neox, one_thread)

    cache.follows(step, SOURCES)
    return step


SOURCES = cache.KERNEL_SOURCES + [__file__, os.path.join(os.path.dirname(__file__), "ops.py")]
for _function in (linear, forward_layers, _next_a, linear_columns, forward_columns):
    cache.follows(_function, SOURCES)
