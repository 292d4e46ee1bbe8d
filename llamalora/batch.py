"""A batch of sequences: one step evaluates every sequence's next token, or a chunk of its prompt, at once.

Each sequence is a generate.Context: its own KV cache, position, tokens and run-time adapter deltas (any mix: other
adapters, other scales, none). `step(model, [(ctx, ids), ...])` evaluates each context's ids and returns each one's
logits; its sampler and grammar stay with whoever drives that sequence (generate(), the server's scheduler).

- Sequences given one token (decoding) go through one compiled call for all layers and all of them,
  `forward_columns`: the base W·X runs once for the step (kernels/columns.py: each weight row read once for every
  column), each column's run-time delta s·B·(A·x) on its own outputs (columns of one adapter share each pass over A;
  each scale its own s·B), attention over each sequence's own cache. Every column's arithmetic is decode.py's for
  that token alone, so a sequence's logits in a batch are bit for bit those it gets alone.
- Sequences given MIN_CHUNK tokens or more (prompt chunks) share the layers' products too
  (LlamaModel.forward_segments: the matmul tiles sum token by token, so each token's sums are those of its chunk
  alone), each chunk's deltas on its own rows, its attention over its own cache. A shorter chunk, a lone chunk and
  a lone decoding sequence go through LlamaModel.forward, as alone.

A context that cannot take its tokens (full, shift off) gets its error in place of its logits; the others go on.
"""

import os

import numba
import numpy as np
from numba import njit

from . import decode
from .kernels import columns, dispatch
from .ops import attention, rms_norm, rope_inplace, rope_tables, swiglu

MIN_CHUNK = 4  # prompt chunks shorter than this take other kernels (the one-token step, per-token matvecs)
Q, K, V, O, GATE, UP, DOWN = decode.Q, decode.K, decode.V, decode.O, decode.GATE, decode.UP, decode.DOWN
N_SLOTS = decode.N_SLOTS


def step(model, items: list) -> list:
    """Evaluate items [(ctx, ids), ...] (each context at most once; ids a non-empty list) and return, per item, the
    logits float32[n_vocab] of its last token, or the exception its context raised (ContextFull, ValueError). Each
    context's tokens and cache move on as Context.eval_chunk moves them (timings are the caller's)."""
    results: list = [None] * len(items)
    decoding, prefilling = [], []
    alone = sum(len(ids) == 1 for _, ids in items) == 1  # one token alone: decode.py's step, the same sums
    grouped = sum(len(ids) >= MIN_CHUNK for _, ids in items) > 1 and matmul_sums_per_token(model)
    for index, (ctx, ids) in enumerate(items):
        try:
            if len(ids) == 1 and not alone:
                ctx._make_room(1)
                decoding.append(index)
            elif len(ids) >= MIN_CHUNK and grouped:
                ctx._make_room(len(ids))
                prefilling.append(index)
            else:
                results[index] = ctx.eval_chunk(ids)[-1]
        except Exception as e:  # noqa: BLE001 (ContextFull: that sequence alone stops)
            results[index] = e
    for indices, evaluate in ((prefilling, prefill), (decoding, decode_tokens)):
        if not indices:
            continue
        try:
            logits = evaluate(model, [items[i][0] for i in indices], [[int(t) for t in items[i][1]] for i in indices])
        except Exception as e:  # noqa: BLE001 (a bug: these sequences get it, the others their logits)
            logits = [e] * len(indices)
        for row, index in zip(logits, indices):
            if not isinstance(row, BaseException):
                items[index][0].tokens.extend(int(t) for t in items[index][1])
            results[index] = row
    return results


def matmul_sums_per_token(model) -> bool:
    """Whether every layer weight's matmul sums token by token from MIN_CHUNK tokens on (the kernels' tiles do;
    F32 weights go through BLAS, whose blocking depends on the batch): then prompt chunks of several sequences can
    share one product and each token keep its sums."""
    return bool(np.all(model.decode_plan().weights[:, 0] != dispatch.F32))


def prefill(model, contexts: list, chunks: list) -> np.ndarray:
    """logits float32[len(contexts), n_vocab] of each chunk's last token, chunk j (MIN_CHUNK tokens or more)
    evaluated at positions contexts[j].cache.n … of its context: every weight's product once for all the chunks'
    tokens (LlamaModel.forward_segments), each token's sums those of its chunk alone."""
    c = model.config
    segments, start = [], 0
    for ctx, ids in zip(contexts, chunks):
        if ctx.cache.n + len(ids) > ctx.cache.n_ctx:
            raise ValueError(f"{len(ids)} tokens at position {ctx.cache.n} overflow the context of {ctx.cache.n_ctx}")
        segments.append((ctx.cache, start, start + len(ids), ctx.deltas()))
        start += len(ids)
    positions = np.concatenate([np.arange(ctx.cache.n, ctx.cache.n + len(ids), dtype=np.int64)
                                for ctx, ids in zip(contexts, chunks)])
    cos, sin = rope_tables(positions, c.rope_dim, c.rope_base, c.rope_factors)
    x = np.ascontiguousarray(model.embed(np.concatenate([np.asarray(ids, dtype=np.int64) for ids in chunks])),
                             dtype=np.float32)
    model.forward_segments(x, segments, cos, sin)
    for ctx, ids in zip(contexts, chunks):
        ctx.cache.n += len(ids)
    h = rms_norm(np.ascontiguousarray(x[[end - 1 for _, _, end, _ in segments]]), model.output_norm, c.rms_eps)
    out = np.empty((len(contexts), model.output.n_rows), dtype=np.float32)
    output_columns(model, h, out, [d for _, _, _, d in segments])
    return out


def decode_tokens(model, contexts: list, tokens: list) -> np.ndarray:
    """logits float32[len(contexts), n_vocab]: tokens[j] (a list of one) evaluated at position contexts[j].cache.n
    of its context, whose cache gets its keys and values (cache.n moves on; ctx.tokens is the caller's)."""
    c = model.config
    b = len(contexts)
    plan = model.decode_plan()
    deltas = [ctx.deltas() for ctx in contexts]
    for ctx in contexts:
        if ctx.cache.n >= ctx.cache.n_ctx:
            raise ValueError(f"a token at position {ctx.cache.n} overflows the context of {ctx.cache.n_ctx}")
    lora = np.stack([plan.lora_table(d) for d in deltas])
    caches = np.array([[ctx.cache.k.ctypes.data, ctx.cache.v.ctypes.data, ctx.cache.n_ctx] for ctx in contexts],
                      dtype=np.int64)
    positions = np.array([ctx.cache.n for ctx in contexts], dtype=np.int64)
    rows = [model.rope_row(int(p)) for p in positions]
    cos = np.ascontiguousarray(np.concatenate([r[0] for r in rows]))
    sin = np.ascontiguousarray(np.concatenate([r[1] for r in rows]))
    x = np.ascontiguousarray(np.concatenate([model.embed(t) for t in tokens]), dtype=np.float32)
    for ctx in contexts:
        check_cache(ctx.cache, c)
    forward_columns(x, plan.weights, plan.norms, plan.biases, lora, caches, positions, cos, sin, c.n_layer, c.n_head,
                    c.n_head_kv, c.n_ff, c.rms_eps, c.rope_neox, numba.get_num_threads() == 1)
    for ctx in contexts:
        ctx.cache.n += 1
    h = rms_norm(x, model.output_norm, c.rms_eps)
    out = np.empty((b, model.output.n_rows), dtype=np.float32)
    output_columns(model, h, out, deltas)
    return out


def check_cache(cache, config) -> None:
    """The step reads caches by address: each must be float32[n_layer, n_ctx, n_head_kv, head_dim], C order."""
    shape = (config.n_layer, cache.n_ctx, config.n_head_kv, config.head_dim)
    for a in (cache.k, cache.v):
        if a.shape != shape or a.dtype != np.float32 or not a.flags.c_contiguous:
            raise ValueError(f"a KV cache of shape {a.shape} ({a.dtype}) does not fit the model's {shape}")


def output_columns(model, h: np.ndarray, out: np.ndarray, deltas: list) -> None:
    """out[j] = the output projection of h[j] (+ column j's run-time delta of it), every row of the head read once."""
    weight = model.output
    table, keep = dispatch.weight_table([weight])
    found = [d.get(weight.name) if d else None for d in deltas]
    lora = decode.float_table([list(delta) if delta is not None else [None, None] for delta in found])
    columns.matvec_columns_entry(table, 0, h, out, lora, columns.NO_FLOATS, numba.get_num_threads() == 1)
    del keep  # (the table points into these arrays until here)


@njit(nogil=True, cache=True)
def _next_a(lora, s):
    """The first column's A of weight s + 1 (what the kernels prefetch while they run weight s), or no rows."""
    following = min(s + 1, lora.shape[1] - 1)
    for j in range(lora.shape[0]):
        if following > s and lora[j, following, 1]:
            return dispatch.float_matrix(lora[j, following, 0], lora[j, following, 1], lora[j, following, 2])
    return dispatch.float_matrix(lora[0, following, 0], 0, lora[0, following, 2])


@njit(nogil=True, cache=True)
def linear_columns(weights, biases, lora, s, X, out, one_thread):
    """out[j] = W_s·X[j] (+ column j's delta s·B·(A·X[j]), lora[j, s]) (+ bias_s) for every column: the one place a
    batched step applies each sequence's own adapters."""
    # (a C-ordered copy of the weight's LoRA rows: the kernels are compiled for the tables Python passes too)
    columns.matvec_columns_entry(weights, s, X, out, np.ascontiguousarray(lora[:, s, :]), _next_a(lora, s),
                                 one_thread)
    if biases[s, 2]:
        bias = dispatch.float_matrix(biases[s, 0], 1, biases[s, 2])[0]
        for j in range(out.shape[0]):
            out[j] += bias


@njit(nogil=True, cache=True)
def forward_columns(x, weights, norms, biases, lora, caches, positions, cos, sin, n_layer, n_head, n_head_kv, n_ff,
                    eps, neox, one_thread):
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
        linear_columns(weights, biases, lora, s + Q, h, q.reshape((b, dim)), one_thread)
        linear_columns(weights, biases, lora, s + K, h, k.reshape((b, kv_dim)), one_thread)
        linear_columns(weights, biases, lora, s + V, h, v.reshape((b, kv_dim)), one_thread)
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
        linear_columns(weights, biases, lora, s + O, attn.reshape((b, dim)), proj, one_thread)
        x += proj
        h = rms_norm(x, norms[i, 1], eps)
        linear_columns(weights, biases, lora, s + GATE, h, gate, one_thread)
        linear_columns(weights, biases, lora, s + UP, h, up, one_thread)
        linear_columns(weights, biases, lora, s + DOWN, swiglu(gate, up), proj, one_thread)
        x += proj


for _function in (_next_a, linear_columns, forward_columns):
    dispatch.cache_follows(_function, dispatch.KERNEL_SOURCES + [__file__, decode.__file__,
                                                                 os.path.join(os.path.dirname(__file__), "ops.py")])
