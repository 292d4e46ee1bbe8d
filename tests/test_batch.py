"""A batch of sequences (batch.py, kernels/columns.py): each sequence's logits in a step are its logits alone, bit
for bit, whatever the other sequences are (their adapters, scales, positions, prompt chunks beside them)."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from tiny_model import make_tiny_llama

from conftest import data_path
from llamalora import batch, decode, kernels
from llamalora.generate import Context, ContextFull
from llamalora.kernels import columns, dispatch
from llamalora.llama import LoraDelta
from llamalora.loader import load_adapters, load_model

NO_FLOATS = np.zeros((0, 0), dtype=np.float32)


def factors(rng, n_rows, n_cols, rank, scale):
    a = (rng.standard_normal((rank, n_cols)) * 0.1).astype(np.float32)
    b = (rng.standard_normal((n_rows, rank)) * 0.1).astype(np.float32)
    return a, b, kernels.pack_scaled_b(scale * b)


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q8_0, T.Q5_0, T.Q4_K, T.Q6_K, T.F16, T.BF16, T.Q5_1, T.Q3_K])
def test_columns_equal_each_column_alone(qtype):
    """W·X[j] + column j's delta, for columns of one adapter at two scales, another adapter and none, equals
    dispatch.matvec of that column alone; a column of extreme values (the integer path declines it) too."""
    rng = np.random.default_rng(int(qtype))
    n_rows, n_cols = 71, 512  # an odd last row too
    weight = kernels.prepare(type("T", (), {"type": qtype, "data": kernels.quantize(qtype, rng.standard_normal(
        (n_rows, n_cols)).astype(np.float32)), "n_rows": n_rows, "n_cols": n_cols, "name": "w"})())
    kind, *arrays = dispatch.uniform_arrays(weight)
    a1, b1, low = factors(rng, n_rows, n_cols, 16, 0.5)
    high = kernels.pack_scaled_b(2.0 * b1)
    a2, _, other = factors(rng, n_rows, n_cols, 5, 1.0)
    choices = [(a1, low), None, (a1, high), (a2, other), (a1, low)]
    for b in (1, 2, 5, 9, 10, 11):  # (10, 11: two groups of four columns, then two)
        X = rng.standard_normal((b, n_cols)).astype(np.float32)
        if b == 9:
            X[4, 3] = 1e35  # beyond what the integer path takes
        lora = np.zeros((b, 6), dtype=np.int64)
        for j in range(b):
            if choices[j % 5] is not None:
                lora[j] = np.concatenate([dispatch.matrix_entry(m) for m in choices[j % 5]])
        got = np.full((b, n_rows), np.nan, dtype=np.float32)
        columns.matvec_columns(dispatch.ALL_KINDS, kind, *arrays, X, got, lora, NO_FLOATS, False)
        for j in range(b):
            a, packed = choices[j % 5] if choices[j % 5] is not None else (NO_FLOATS, columns.NO_FLOATS)
            want = np.empty(n_rows, dtype=np.float32)
            dispatch.matvec(dispatch.ALL_KINDS, kind, *arrays, X[j], want, a.reshape(-1, n_cols),
                            packed.reshape(-1, 16), NO_FLOATS, False)
            np.testing.assert_array_equal(got[j], want, err_msg=f"{qtype.name}, {b} columns, column {j}")


def random_deltas(model, rank, scale, seed):
    rng = np.random.default_rng(seed)
    deltas = {}
    for layer in model.layers:
        for w in (layer.attn_q, layer.attn_k, layer.attn_v, layer.attn_output, layer.ffn_gate, layer.ffn_up,
                  layer.ffn_down):
            a, _, packed = factors(rng, w.n_rows, w.n_cols, rank, scale)
            deltas[w.name] = LoraDelta(a, packed)
    return deltas


def pairs(model, prompts, deltas, n_ctx=64):
    """Two identical contexts per prompt (one to run alone, one in the batch), prompts evaluated."""
    made = []
    for prompt, d in zip(prompts, deltas):
        twins = [Context(model, n_ctx=n_ctx, lora=d) for _ in range(2)]
        for ctx in twins:
            ctx.eval(prompt)
        made.append(twins)
    return made


def test_a_short_chunk_equals_its_tokens_one_by_one(tmp_path):
    """A chunk of up to COLUMN_TOKENS tokens runs as columns of the one-token step: the same logits and cache as
    feeding its tokens one at a time."""
    model = load_model(make_tiny_llama(tmp_path / "m.gguf"), progress=False).model
    deltas = random_deltas(model, 4, 1.0, 3)
    chunked, single = Context(model, n_ctx=64, lora=deltas), Context(model, n_ctx=64, lora=deltas)
    chunk = list(range(3, 3 + decode.COLUMN_TOKENS))
    got = chunked.eval(chunk, all_logits=True)
    want = np.stack([single.eval([t]) for t in chunk])
    np.testing.assert_array_equal(got, want)
    assert_same_state(chunked, single)


def assert_same_state(a, b):
    assert a.tokens == b.tokens and a.cache.n == b.cache.n
    np.testing.assert_array_equal(a.cache.k[:, :a.cache.n], b.cache.k[:, :b.cache.n])
    np.testing.assert_array_equal(a.cache.v[:, :a.cache.n], b.cache.v[:, :b.cache.n])


@pytest.mark.parametrize("qtype", [T.Q4_1, T.Q4_0, T.Q8_0, T.F16, T.Q6_K])
def test_step_gives_each_sequence_its_logits_alone(tmp_path, qtype):
    """Five sequences at different positions, with different deltas (none, one set at two scales, another), decode
    together for some steps while three more read their prompts chunk by chunk in the same steps (short chunks as
    columns beside the decoding tokens, longer ones sharing the matmul tiles): every logit and cache entry equals
    what the same context gets evaluating alone."""
    model = load_model(make_tiny_llama(tmp_path / "m.gguf", qtype=qtype, dim=256, n_ff=512), progress=False).model
    assert batch.matmul_sums_per_token(model)
    first, other = random_deltas(model, 8, 1.0, 1), random_deltas(model, 3, 0.7, 2)
    second = {name: LoraDelta(d.a, np.float32(-1.5) * d.packed_b) for name, d in first.items()}  # first's A
    deltas = [{}, first, second, other, first]
    prompts = [[1, 2, 3], [5, 6, 7, 8, 9, 10], [11], [12, 13, 14, 15], [16, 17]]
    sequences = pairs(model, prompts, deltas)
    late = pairs(model, [[20, 21], [22, 23, 24], [25]], [second, other, {}])  # prompts read chunk by chunk meanwhile
    run = lambda start, n: list(range(start, start + n))  # noqa: E731
    chunks = [(run(30, 5), run(50, 20), run(100, 18)), (run(35, 1), run(70, 19), run(120, 17)),
              (run(36, 4), run(90, 2), run(140, 3))]  # (up to 16 tokens: columns; more: the tiles, shared)
    rng = np.random.default_rng(0)
    for n in range(5):
        tokens = rng.integers(1, 200, len(sequences)).tolist()
        items = [(batched, [t]) for (_, batched), t in zip(sequences, tokens)]
        if n < len(chunks):
            items += [(batched, chunk) for (_, batched), chunk in zip(late, chunks[n])]
        got = batch.step(model, items)
        want = [alone.eval([t], generating=True) for (alone, _), t in zip(sequences, tokens)]
        if n < len(chunks):
            want += [alone.eval(chunk) for (alone, _), chunk in zip(late, chunks[n])]
        for j, (g, w) in enumerate(zip(got, want)):
            np.testing.assert_array_equal(g, w, err_msg=f"step {n}, sequence {j}")
    for alone, batched in sequences + late:
        assert_same_state(alone, batched)


def test_step_with_biases_qwen2():
    model = load_model(data_path("qwen2-tiny.gguf"), progress=False).model
    sequences = pairs(model, [[1, 2], [3, 4, 5], [6]], [{}, {}, {}])
    for n in range(3):
        got = batch.step(model, [(b, [40 + n + j]) for j, (_, b) in enumerate(sequences)])
        for j, ((alone, _), g) in enumerate(zip(sequences, got)):
            np.testing.assert_array_equal(g, alone.eval([40 + n + j], generating=True))


def test_a_full_context_stops_alone(tmp_path):
    """A context that is full with shifting off gets ContextFull in its place; the others are evaluated."""
    model = load_model(make_tiny_llama(tmp_path / "m.gguf"), progress=False).model
    full = Context(model, n_ctx=8, context_shift=False)
    full.eval([1, 2, 3, 4, 5, 6, 7, 8])
    (a, b), (c, d) = pairs(model, [[1, 2], [3]], [{}, {}])
    got = batch.step(model, [(b, [9]), (full, [9]), (d, [10])])
    assert isinstance(got[1], ContextFull) and full.tokens == [1, 2, 3, 4, 5, 6, 7, 8]
    np.testing.assert_array_equal(got[0], a.eval([9], generating=True))
    np.testing.assert_array_equal(got[2], c.eval([10], generating=True))


def test_smollm2_four_scales_decode_as_alone(smollm2):
    """SmolLM2 with the real adapter at four scales (0 among them) in one batch: the greedy continuations and every
    step's logits are those of each sequence decoded alone."""
    model, vocab = smollm2.model, smollm2.vocab
    adapters = load_adapters(smollm2.file, [(data_path("lora-fortunes"), 1.0)])
    scales = [0.0, 0.5, 1.0, 2.0]
    prompt = vocab.tokenize("My fortune for today:", add_bos=None, parse_special=True)
    sequences = pairs(model, [prompt[:-1]] * 4, [model.lora_deltas(adapters, [s]) for s in scales], n_ctx=64)
    alone_next = [int(np.argmax(alone.eval(prompt[-1:]))) for alone, _ in sequences]
    batched_next = [int(np.argmax(g)) for g in batch.step(model, [(b, prompt[-1:]) for _, b in sequences])]
    for _ in range(10):
        want = [alone.eval([t], generating=True) for (alone, _), t in zip(sequences, alone_next)]
        got = batch.step(model, [(b, [t]) for (_, b), t in zip(sequences, batched_next)])
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)
        alone_next = [int(np.argmax(w)) for w in want]
        batched_next = [int(np.argmax(g)) for g in got]
    texts = {vocab.detokenize(alone.tokens[len(prompt):]) for alone, _ in sequences}
    assert len(texts) > 1  # the scales give different answers, so the comparison means something
