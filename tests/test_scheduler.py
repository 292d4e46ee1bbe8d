"""Continuous batching (scheduler.py): sequences generating from their own threads share steps, and each one's
tokens and logits are those it gets alone."""

import threading
import time

import numpy as np
import pytest
from tiny_model import make_tiny_llama

from llamalora import batch, scheduler
from llamalora.generate import Context, ContextFull, generate
from llamalora.llama import LoraDelta
from llamalora.loader import load_model
from llamalora.sampling import Sampler, SamplerParams
from llamalora.scheduler import Aborted, ScheduledContext, Scheduler, prompt_chunks
from test_batch import random_deltas


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = make_tiny_llama(tmp_path_factory.mktemp("m") / "m.gguf", dim=256, n_ff=512)
    return load_model(path, progress=False)


@pytest.fixture
def steps(monkeypatch):
    """Every step's items [(ctx, ids)], as the scheduler hands them to batch.step."""
    seen = []

    def recording(model, items):
        seen.append([(ctx, list(ids)) for ctx, ids in items])
        return step(model, items)

    step = batch.step
    monkeypatch.setattr(batch, "step", recording)
    return seen


def test_prompt_chunks():
    assert prompt_chunks(10, 4) == [4, 4, 2]
    assert prompt_chunks(3, 4) == [3]
    assert prompt_chunks(140, 128) == [140]  # a short last chunk joins a long one (the tiles, as one eval takes)
    assert prompt_chunks(150, 128) == [128, 22]
    assert prompt_chunks(256, 128) == [128, 128]


def greedy(ctx, vocab, prompt, n, sched=None, should_stop=lambda: False):
    if sched is not None:
        sched.join(ctx, should_stop)
    try:
        gen = generate(ctx, vocab, Sampler(SamplerParams(temp=0), vocab.n_vocab), prompt, n_predict=n,
                       ignore_eos=True, should_stop=should_stop)
        return [t for t, _ in gen if t is not None]
    finally:
        if sched is not None:
            sched.leave(ctx)


def run_threads(targets):
    results = [None] * len(targets)

    def run(i):
        try:
            results[i] = targets[i]()
        except BaseException as e:  # noqa: BLE001 (raised below, in the test's thread)
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(targets))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results


def test_threads_generating_together_get_their_tokens_alone(model, steps):
    """Four threads with their own prompts and deltas (two scales of one set, another, none), one prompt longer than a
    chunk: each gets the greedy tokens it gets alone, and the steps held several sequences at once."""
    m, vocab = model.model, model.vocab
    first = random_deltas(m, 8, 1.0, 1)
    deltas = [{}, first, {name: LoraDelta(d.a, np.float32(0.5) * d.packed_b) for name, d in first.items()},
              random_deltas(m, 4, 1.0, 2)]
    prompts = [[1, 5, 9], [1, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17], [1, 20], [1, 30, 31, 32, 33]]
    alone = [greedy(Context(m, n_ctx=64, lora=d), vocab, p, 10) for d, p in zip(deltas, prompts)]
    sched = Scheduler(m, ubatch=4)
    contexts = [ScheduledContext(m, n_ctx=64, lora=d) for d in deltas]
    for ctx in contexts:
        ctx.scheduler = sched
    together = run_threads([lambda c=c, p=p: greedy(c, vocab, p, 10, sched) for c, p in zip(contexts, prompts)])
    assert together == alone
    assert max(sum(len(ids) == 1 for _, ids in items) for items in steps) >= 3  # decoded side by side
    assert all(sum(len(ids) for _, ids in items if len(ids) > 1) <= 4 for items in steps)  # ubatch
    for ctx, prompt, tokens in zip(contexts, prompts, together):
        assert ctx.tokens == prompt + tokens[:-1] and ctx.timings.gen_tokens == 9 and ctx.timings.gen_ms > 0


def test_a_long_prompt_is_read_between_the_others_tokens(model, steps):
    """While one sequence decodes, another's 24-token prompt goes in chunks of 4, a chunk a step beside the
    decoding token: the decoder is never held up for the whole prompt."""
    m, vocab = model.model, model.vocab
    sched = Scheduler(m, ubatch=4)
    decoder, reader = ScheduledContext(m, n_ctx=512), ScheduledContext(m, n_ctx=128)
    decoder.scheduler = reader.scheduler = sched
    started, read_all = threading.Event(), threading.Event()

    def decode():
        sched.join(decoder)
        try:
            logits = decoder.eval([1, 2, 3])
            started.set()
            while not read_all.is_set() and len(decoder.tokens) < 500:
                logits = decoder.eval([int(np.argmax(logits))], generating=True)
        finally:
            sched.leave(decoder)

    def read():
        started.wait(30)
        time.sleep(0.05)
        try:
            return reader.eval(list(range(10, 34)))
        finally:
            read_all.set()

    results = run_threads([decode, read])
    assert not any(isinstance(r, BaseException) for r in results), results
    np.testing.assert_array_equal(results[1], Context(m, n_ctx=128, n_batch=4).eval(list(range(10, 34))))
    with_chunk = [items for items in steps if any(ctx is reader for ctx, _ in items)]
    assert len(with_chunk) == 6 and all(len(items) == 2 for items in with_chunk)  # beside the decoder each time


def test_a_cancelled_sequence_is_aborted_and_the_others_go_on(model):
    m, vocab = model.model, model.vocab
    sched = Scheduler(m)
    stop = threading.Event()
    going, cancelled = ScheduledContext(m, n_ctx=64), ScheduledContext(m, n_ctx=64)
    going.scheduler = cancelled.scheduler = sched

    def cancelling():
        sched.join(cancelled, stop.is_set)
        try:
            cancelled.eval([1, 2, 3])
            stop.set()
            cancelled.eval([4], generating=True)
        finally:
            sched.leave(cancelled)

    results = run_threads([lambda: greedy(going, vocab, [1, 2], 12, sched), cancelling])
    assert isinstance(results[1], Aborted)
    assert results[0] == greedy(Context(m, n_ctx=64), vocab, [1, 2], 12)


def test_a_full_context_raises_in_its_own_thread(model):
    m = model.model
    sched = Scheduler(m)
    full = ScheduledContext(m, n_ctx=8, context_shift=False)
    full.scheduler = sched
    full.eval([1, 2, 3, 4, 5, 6, 7, 8])
    with pytest.raises(ContextFull):
        full.eval([9], generating=True)
    assert full.tokens == [1, 2, 3, 4, 5, 6, 7, 8]
    assert sched.state(full)["phase"] == "idle" and not sched.pending
