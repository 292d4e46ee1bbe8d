"""The one-token step (decode.py) against the op-by-op forward pass it replaces for single tokens."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from numba import njit
from tiny_model import make_tiny_llama

from llamalora import kernels
from llamalora.kernels import cache, dispatch
from llamalora.loader import load_model
from llamalora.llama import LoraDelta, rms_norm, rope_tables

TOKENS = [5, 17, 42, 99, 7, 130]


def op_by_op(model, token, cache, deltas):
    """Logits of one token through LlamaModel.forward_batch (the path prompt batches take)."""
    c = model.config
    x = np.ascontiguousarray(model.embed(np.array([token])), dtype=np.float32)
    cos, sin = rope_tables(np.arange(cache.n, cache.n + 1), c.rope_dim, c.rope_base)
    model.forward_batch(x, cache, cos, sin, deltas)
    cache.n += 1
    return model.linear(model.output, rms_norm(x, model.output_norm, c.rms_eps), deltas)


def both_paths(model, deltas):
    """(decode logits, op-by-op logits, decode cache, op-by-op cache) over TOKENS after a 3-token prompt."""
    fused, plain = model.new_cache(32), model.new_cache(32)
    model.forward([1, 2, 3], fused, lora=deltas)
    model.forward([1, 2, 3], plain, lora=deltas)
    got = np.concatenate([model.forward([t], fused, lora=deltas) for t in TOKENS])
    want = np.concatenate([op_by_op(model, t, plain, deltas) for t in TOKENS])
    return got, want, fused, plain


def random_deltas(model, rank, seed=0):
    """Run-time deltas in lora_deltas' form on every layer weight: LoraDelta(A [r, n_cols], packed s·B [n_rows, r])."""
    rng = np.random.default_rng(seed)
    deltas = {}
    for layer in model.layers:
        for w in (layer.attn_q, layer.attn_k, layer.attn_v, layer.attn_output, layer.ffn_gate, layer.ffn_up,
                  layer.ffn_down):
            deltas[w.name] = LoraDelta((rng.standard_normal((rank, w.n_cols)) * 0.1).astype(np.float32),
                                       kernels.pack_scaled_b(rng.standard_normal((w.n_rows, rank)) * 0.1))
    return deltas


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q8_0, T.F16, T.Q4_K, T.Q6_K, T.Q5_0, T.BF16])
def test_one_token_step_equals_op_by_op(tmp_path, qtype):
    model = load_model(make_tiny_llama(tmp_path / "m.gguf", qtype=qtype, dim=256, n_ff=512), progress=False).model
    got, want, fused, plain = both_paths(model, {})
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(fused.k[:, :fused.n], plain.k[:, :plain.n])
    np.testing.assert_array_equal(fused.v[:, :fused.n], plain.v[:, :plain.n])


@pytest.mark.parametrize("rank", [16, 5])
def test_runtime_lora_in_the_step(tmp_path, rank):
    model = load_model(make_tiny_llama(tmp_path / "m.gguf"), progress=False).model
    deltas = random_deltas(model, rank)
    got, want, _, _ = both_paths(model, deltas)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    without, _, _, _ = both_paths(model, {})
    assert np.abs(got - without).max() > 0.01  # the deltas did change the logits


def test_dora_scale_in_the_step(tmp_path):
    """DoRA's per-output g (LoraDelta.g) multiplies W·x + s·B·(A·x) in the one-token step as in the batch path; a g
    of ones is the LoRA delta alone."""
    model = load_model(make_tiny_llama(tmp_path / "m.gguf"), progress=False).model
    lora = random_deltas(model, 4)
    rng = np.random.default_rng(5)
    dora = {name: LoraDelta(d.a, d.packed_b, rng.uniform(0.5, 1.5, d.packed_b.shape[0] // d.a.shape[0] * 16)
                            [:model.tensors[name].n_rows].astype(np.float32)) for name, d in lora.items()}
    got, want, _, _ = both_paths(model, dora)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    plain, _, _, _ = both_paths(model, lora)
    assert np.abs(got - plain).max() > 0.01
    ones = {name: LoraDelta(d.a, d.packed_b, np.ones(model.tensors[name].n_rows, np.float32))
            for name, d in lora.items()}
    np.testing.assert_array_equal(both_paths(model, ones)[0], plain)


def test_step_deltas_are_per_call(tmp_path):
    """Two contexts with different deltas, interleaved token by token, each get what they get alone."""
    model = load_model(make_tiny_llama(tmp_path / "m.gguf"), progress=False).model
    sets = [random_deltas(model, 4, seed=1), {}, random_deltas(model, 8, seed=2)]
    alone = [both_paths(model, d)[0] for d in sets]
    caches = [model.new_cache(32) for _ in sets]
    for cache, d in zip(caches, sets):
        model.forward([1, 2, 3], cache, lora=d)
    mixed = [[] for _ in sets]
    for t in TOKENS:
        for i, (cache, d) in enumerate(zip(caches, sets)):
            mixed[i].append(model.forward([t], cache, lora=d))
    for i in range(len(sets)):
        np.testing.assert_array_equal(np.concatenate(mixed[i]), alone[i])


def test_biases_are_added_in_the_step(tmp_path):
    model = load_model(make_tiny_llama(tmp_path / "m.gguf"), progress=False).model
    rng = np.random.default_rng(3)
    for layer in model.layers:
        layer.bias = {part: rng.standard_normal(getattr(layer, part).n_rows).astype(np.float32)
                      for part in ("attn_q", "attn_k", "attn_v")}
    model.layers = list(model.layers)  # a new plan is built for the changed layers
    got, want, _, _ = both_paths(model, {})
    np.testing.assert_array_equal(got, want)
    for layer in model.layers:
        layer.bias = {}
    model.layers = list(model.layers)
    assert np.abs(both_paths(model, {})[0] - got).max() > 0.01


@njit(cache=True)
def _cached_twice(x):
    return 2 * x


def test_cache_follows_the_files_it_is_told(tmp_path):
    """A compiled caller's cache stamp changes when a file it depends on changes (else it would keep old code)."""
    source = tmp_path / "kernel.py"
    source.write_text("a = 1\n")
    cache.follows(_cached_twice, [str(source)])
    before = _cached_twice._cache._cache_file._source_stamp
    source.write_text("a = 1  # changed\n")
    _cached_twice.enable_caching()
    cache.follows(_cached_twice, [str(source)])
    assert _cached_twice._cache._cache_file._source_stamp != before
    assert _cached_twice(3) == 6


def test_deltas_of_the_wrong_shape_are_refused(tmp_path):
    """The step reads deltas by address: a misfit must be an error, not a read past an array."""
    model = load_model(make_tiny_llama(tmp_path / "m.gguf"), progress=False).model
    deltas = random_deltas(model, 4)
    a, packed_b, _ = deltas["blk.1.ffn_down.weight"]
    deltas["blk.1.ffn_down.weight"] = LoraDelta(a, np.ascontiguousarray(packed_b[:-1]))  # the last chunk a rank short
    with pytest.raises(ValueError, match="ffn_down"):
        model.forward([3], model.new_cache(8), lora=deltas)


@pytest.mark.parametrize("rank", [0, 8])
def test_one_thread_step_equals_the_parallel_one(tmp_path, rank):
    """On one thread the step's kernels take plain loops instead of OpenMP ones (with and without run-time
    deltas): the same logits and cache, bit for bit."""
    import numba

    model = load_model(make_tiny_llama(tmp_path / "m.gguf", qtype=T.Q4_0, dim=256, n_ff=512), progress=False).model
    deltas = random_deltas(model, rank) if rank else {}
    before = numba.get_num_threads()
    runs = []
    try:
        for threads in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
            numba.set_num_threads(threads)
            runs.append(both_paths(model, deltas))
    finally:
        numba.set_num_threads(before)
    (one, want_one, cache_one, _), (many, _, cache_many, _) = runs
    np.testing.assert_array_equal(one, many)
    np.testing.assert_array_equal(cache_one.k[:, :cache_one.n], cache_many.k[:, :cache_many.n])
    np.testing.assert_allclose(one, want_one, rtol=1e-4, atol=1e-4)


GREEDY_DIGESTS = r"""
import hashlib, sys
import numpy as np
from llamalora.generate import Context
from llamalora.loader import load_model
model = load_model(sys.argv[1], progress=False).model
ctx = Context(model, 64)
logits = ctx.eval([1, 504, 3575, 282, 4649, 314])  # a short prompt: the columns step (or its tokens one by one)
digests = []
for _ in range(6):
    digests.append(hashlib.sha256(np.ascontiguousarray(logits, dtype=np.float32).tobytes()).hexdigest()[:16])
    logits = ctx.eval([int(np.argmax(logits[-1]))], generating=True)
print(" ".join(digests))
"""


def test_the_steps_compiled_for_a_models_types_equal_the_all_types_step(smollm2_path):
    """SmolLM2's steps compiled for its own types (as a user runs them: no LLAMALORA_KERNEL_TYPES) give the same
    logits, bit for bit, prompt and greedy tokens, as the one step for every type the suite runs (conftest.py)."""
    import os
    import subprocess
    import sys

    def digests(kernel_types):
        env = dict(os.environ, LLAMALORA_KERNEL_TYPES=kernel_types)
        run = subprocess.run([sys.executable, "-c", GREEDY_DIGESTS, smollm2_path], env=env, capture_output=True,
                             text=True, timeout=900)
        assert run.returncode == 0, run.stderr[-2000:]
        return run.stdout.split()

    per_model, all_types = digests("model"), digests("all")
    assert len(per_model) == 6 and per_model == all_types
