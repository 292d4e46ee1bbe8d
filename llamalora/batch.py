"""A batch of sequences: one step evaluates every sequence's next token, or a chunk of its prompt, at once.

Each sequence is a generate.Context: its own KV cache, position, tokens and run-time adapter deltas (any mix: other
adapters, other scales, none). `step(model, [(ctx, ids), ...])` evaluates each context's ids and returns each one's
logits; its sampler and grammar stay with whoever drives that sequence (generate(), the server's scheduler).

- Decoding sequences, and prompt chunks of up to decode.COLUMN_TOKENS tokens (one column per token), go through one
  compiled call for all layers and all of them (decode.forward_columns): the base W·X runs once for the step
  (kernels/columns.py: each weight row read once for every column), each column's run-time delta s·B·(A·x) on its
  own outputs (columns of one adapter share each pass over A; each scale its own s·B), attention over each
  sequence's own cache. Every column's arithmetic is decode.py's for that token alone.
- Longer prompt chunks of several sequences share each weight's product too (LlamaModel.forward_segments: the
  matmul tiles sum token by token, so each token's sums are those of its chunk alone), each chunk's deltas on its
  own rows, its attention over its own cache.
- A lone sequence goes through LlamaModel.forward, which takes the same paths by the same rule.

So a sequence's logits in a batch are bit for bit those it gets alone. A context that cannot take its tokens
(full, shift off) gets its error in place of its logits; the others go on.
"""

import numpy as np

from . import decode
from .kernels import dispatch
from .ops import rms_norm, rope_tables


def step(model, items: list) -> list:
    """Evaluate items [(ctx, ids), ...] (each context at most once; ids a non-empty list) and return, per item, the
    logits float32[n_vocab] of its last token, or the exception its context raised (ContextFull, ValueError). Each
    context's tokens and cache move on as Context.eval_chunk moves them (timings are the caller's)."""
    results: list = [None] * len(items)
    # (an activated LoRA's prompt goes alone: Context.eval_chunk splits it where the adapter starts)
    apart = [len(ids) > 1 and getattr(ctx.own_deltas(), "invocation", None) is not None for ctx, ids in items]
    as_columns = [len(ids) <= decode.COLUMN_TOKENS and not away for (_, ids), away in zip(items, apart)]
    together = sum(as_columns) > 1  # else the one goes alone (decode.run_layers for one token: the same sums)
    tiled = len(items) - sum(as_columns) - sum(apart) > 1 and matmul_sums_per_token(model)
    columned, prefilling = [], []
    for index, (ctx, ids) in enumerate(items):
        try:
            if as_columns[index] and together:
                ctx._make_room(len(ids))
                columned.append(index)
            elif not as_columns[index] and not apart[index] and tiled:
                ctx._make_room(len(ids))
                prefilling.append(index)
            else:
                results[index] = ctx.eval_chunk(ids)[-1]
        except Exception as e:  # noqa: BLE001 (ContextFull: that sequence alone stops)
            results[index] = e
    for indices, evaluate in ((prefilling, prefill), (columned, columns_logits)):
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
    """Whether every layer weight's matmul sums token by token (the kernels' tiles do; F32 weights go through BLAS,
    whose blocking depends on the batch): then prompt chunks of several sequences can share one product and each
    token keep its sums."""
    return bool(np.all(model.decode_plan().weights[:, 0] != dispatch.F32))


def columns_logits(model, contexts: list, chunks: list) -> np.ndarray:
    """logits float32[len(contexts), n_vocab] of each chunk's last token, chunk j (up to decode.COLUMN_TOKENS tokens)
    evaluated at positions contexts[j].cache.n … of its context, every token a column of one decode.run_columns."""
    c = model.config
    caches, positions, deltas, tokens, last = [], [], [], [], []
    for ctx, ids in zip(contexts, chunks):
        d = ctx.deltas()
        for offset, token in enumerate(ids):
            caches.append(ctx.cache)
            positions.append(ctx.cache.n + offset)
            deltas.append(d)
            tokens.append(token)
        last.append(len(tokens) - 1)
    rows = [model.rope_row(int(p)) for p in positions]
    cos = np.ascontiguousarray(np.concatenate([r[0] for r in rows]))
    sin = np.ascontiguousarray(np.concatenate([r[1] for r in rows]))
    # (each chunk's rows looked up with its own deltas, as alone: an embedding delta's product depends on the rows)
    x = np.ascontiguousarray(np.concatenate([model.embed(np.asarray(ids, dtype=np.int64), ctx.deltas())
                                             for ctx, ids in zip(contexts, chunks)]), dtype=np.float32)
    decode.run_columns(model.decode_plan(), x, caches, np.asarray(positions, dtype=np.int64), cos, sin, c, deltas)
    for ctx, ids in zip(contexts, chunks):
        ctx.cache.n += len(ids)
    h = rms_norm(np.ascontiguousarray(x[last]), model.output_norm, c.rms_eps)
    out = np.empty((len(contexts), model.output.n_rows), dtype=np.float32)
    decode.linear_rows(model.output, h, out, [ctx.deltas() for ctx in contexts])
    return out


def prefill(model, contexts: list, chunks: list) -> np.ndarray:
    """logits float32[len(contexts), n_vocab] of each chunk's last token, chunk j (more than decode.COLUMN_TOKENS
    tokens) evaluated at positions contexts[j].cache.n … of its context: every weight's product once for all the
    chunks' tokens (LlamaModel.forward_segments), each token's sums those of its chunk alone."""
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
    x = np.ascontiguousarray(np.concatenate([model.embed(np.asarray(ids, dtype=np.int64), d)
                                             for ids, (_, _, _, d) in zip(chunks, segments)]), dtype=np.float32)
    model.forward_segments(x, segments, cos, sin)
    for ctx, ids in zip(contexts, chunks):
        ctx.cache.n += len(ids)
    h = rms_norm(np.ascontiguousarray(x[[end - 1 for _, _, end, _ in segments]]), model.output_norm, c.rms_eps)
    out = np.empty((len(contexts), model.output.n_rows), dtype=np.float32)
    decode.linear_rows(model.output, h, out, [d for _, _, _, d in segments])
    return out
