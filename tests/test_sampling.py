"""The sampler chain: greedy, seeds, the supports top-k / typical / top-p / min-p keep, the chain's order,
the penalties, and temperature-1 frequencies against the softmax."""

import time

import numpy as np
import pytest

from llamalora.errors import InputError
from llamalora.sampling import Sampler, SamplerParams, full_vocab_candidates, min_p, softmax, top_p_count

# Every truncation off: a plain draw from softmax(logits / temp).
PLAIN = dict(temp=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=1)

# A hand-built distribution; its logits are the log-probabilities.
PROBS = np.array([0.4, 0.3, 0.15, 0.1, 0.05])
LOGITS = np.log(PROBS).astype(np.float32)


def draws(params, logits, n=3000, history=None):
    sampler = Sampler(params, len(logits))
    return np.array([sampler.sample(logits, history) for _ in range(n)])


def support(**settings):
    return set(draws(SamplerParams(**{**PLAIN, **settings}), LOGITS).tolist())


def test_greedy_is_argmax_and_leaves_logits_alone():
    logits = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    before = logits.copy()
    assert Sampler(SamplerParams(temp=0), 1000).sample(logits) == int(np.argmax(logits))
    assert Sampler(SamplerParams(temp=-1), 1000).sample(logits) == int(np.argmax(logits))
    assert Sampler(SamplerParams(temp=1.0, top_k=1), 1000).sample(logits) == int(np.argmax(logits))
    # every stage, penalties included, works on copies
    busy = SamplerParams(repeat_penalty=1.3, frequency_penalty=0.2, presence_penalty=0.1, typical_p=0.9, seed=3)
    Sampler(busy, 1000).sample(logits, history=list(range(0, 1000, 7)))
    np.testing.assert_array_equal(logits, before)


def test_top_k_one_is_greedy_for_every_draw():
    logits = np.random.default_rng(5).standard_normal(300).astype(np.float32)
    assert set(draws(SamplerParams(temp=1.5, top_k=1, seed=2), logits, 200).tolist()) == {int(np.argmax(logits))}


def test_seed_reproducible():
    logits = np.zeros(50, dtype=np.float32)
    a = draws(SamplerParams(**{**PLAIN, "seed": 42}), logits, 200)
    b = draws(SamplerParams(**{**PLAIN, "seed": 42}), logits, 200)
    c = draws(SamplerParams(**{**PLAIN, "seed": 43}), logits, 200)
    np.testing.assert_array_equal(a, b)
    assert (a != c).sum() > 150  # independent uniform draws over 50 tokens agree about 1 time in 50


def test_random_seed_is_reported_and_replays():
    logits = np.zeros(50, dtype=np.float32)
    first = Sampler(SamplerParams(**{**PLAIN, "seed": -1}), 50)
    a = [first.sample(logits) for _ in range(100)]
    replay = Sampler(SamplerParams(**{**PLAIN, "seed": first.seed}), 50)
    assert [replay.sample(logits) for _ in range(100)] == a
    assert Sampler(SamplerParams(seed=None), 50).seed != Sampler(SamplerParams(seed=None), 50).seed


def test_truncations_keep_the_expected_sets():
    assert support() == {0, 1, 2, 3, 4}
    assert support(top_k=2) == {0, 1}
    assert support(top_k=100) == {0, 1, 2, 3, 4}  # k beyond the vocabulary: everything
    assert support(top_p=0.5) == {0, 1}  # 0.4 < 0.5 <= 0.7
    assert support(top_p=0.8) == {0, 1, 2}  # 0.7 < 0.8 <= 0.85
    assert support(top_p=0.9) == {0, 1, 2, 3}
    assert support(top_p=0.3) == {0}  # the first token alone reaches it
    assert support(min_p=0.3) == {0, 1, 2}  # p >= 0.12
    assert support(min_p=0.2) == {0, 1, 2, 3}  # p >= 0.08
    assert support(min_p=0.9) == {0}


def test_typical_keeps_the_tokens_nearest_the_entropy():
    # entropy 1.392 nats; |surprise - entropy| orders the tokens 1 (0.19), 0 (0.48), 2 (0.50), 3, 4
    assert support(typical_p=0.2) == {1}  # not the most likely token
    assert support(typical_p=0.5) == {0, 1}  # 0.3 <= 0.5 < 0.7
    assert support(typical_p=0.75) == {0, 1, 2}


def test_chain_order():
    # top-k before top-p: after top-k=3 the probabilities are 0.47, 0.35, 0.18, so top-p 0.8 keeps two
    assert support(top_k=3, top_p=0.8) == {0, 1}
    # temperature after the truncations: a hot temperature flattens the draw but not min-p's cut
    assert support(min_p=0.3, temp=10.0) == {0, 1, 2}
    # greedy is the argmax after the penalties
    assert Sampler(SamplerParams(temp=0, repeat_penalty=2.0), 5).sample(LOGITS, history=[0]) == 1


def test_full_vocabulary_shortcut_keeps_the_sorted_prefix():
    # Without top-k the chain sorts only a superset of what top-p / min-p keep; the kept tokens must be the
    # same prefix a full sort gives.
    rng = np.random.default_rng(11)
    for scale in (0.5, 3.0, 8.0):
        logits = (rng.standard_normal(5000) * scale).astype(np.float32)
        order = np.argsort(-logits, kind="stable")
        full = softmax(logits[order])
        for top_p in (0.3, 0.9, 0.99):
            ids, values, log_total = full_vocab_candidates(logits, top_p, 0.0)
            keep = top_p_count(np.exp(values.astype(np.float64) - log_total), top_p)
            np.testing.assert_array_equal(ids[:keep], order[:top_p_count(full, top_p)])
        for p in (0.01, 0.2):
            ids, values, _ = full_vocab_candidates(logits, 1.0, p)
            np.testing.assert_array_equal(ids, min_p(order, logits[order], p)[0])


def test_masked_tokens_are_never_drawn():
    logits = np.zeros(6, dtype=np.float32)
    logits[[1, 4]] = -np.inf
    assert set(draws(SamplerParams(**PLAIN), logits, 2000).tolist()) == {0, 2, 3, 5}


def test_repeat_penalty_flips_the_choice():
    logits = np.array([2.0, 1.9, -1.0], dtype=np.float32)
    greedy = SamplerParams(temp=0, repeat_penalty=1.1, repeat_last_n=4)
    assert Sampler(greedy, 3).sample(logits, history=[0]) == 1  # 2.0 / 1.1 < 1.9
    assert Sampler(greedy, 3).sample(logits, history=[0, 2, 2, 2, 2]) == 0  # token 0 is out of the window
    assert Sampler(SamplerParams(temp=0), 3).sample(logits, history=[0]) == 0  # default penalty 1.0: off
    assert Sampler(SamplerParams(temp=0, repeat_penalty=1.1, repeat_last_n=0), 3).sample(logits, [0]) == 0
    # negative logits are multiplied: -0.5 * 1.1 = -0.55 < -0.52 (dividing would have kept token 0 ahead)
    negative = np.array([-0.5, -0.52], dtype=np.float32)
    assert Sampler(greedy, 2).sample(negative, history=[0]) == 1
    assert Sampler(SamplerParams(temp=0), 2).sample(negative, history=[0]) == 0


def test_frequency_and_presence_penalties():
    logits = np.array([1.0, 0.8], dtype=np.float32)
    seen_three_times = [0, 0, 0]
    assert Sampler(SamplerParams(temp=0, frequency_penalty=0.1), 2).sample(logits, seen_three_times) == 1
    assert Sampler(SamplerParams(temp=0, frequency_penalty=0.05), 2).sample(logits, seen_three_times) == 0
    assert Sampler(SamplerParams(temp=0, presence_penalty=0.25), 2).sample(logits, seen_three_times) == 1
    assert Sampler(SamplerParams(temp=0, presence_penalty=0.15), 2).sample(logits, seen_three_times) == 0


def test_accepted_tokens_form_the_window_without_history():
    logits = np.array([2.0, 1.9, -1.0], dtype=np.float32)
    sampler = Sampler(SamplerParams(temp=0, repeat_penalty=1.1, repeat_last_n=2), 3)
    assert sampler.sample(logits) == 0
    sampler.accept(0)
    assert sampler.sample(logits) == 1
    sampler.accept(2)
    sampler.accept(2)  # token 0 has left the two-token window
    assert sampler.sample(logits) == 0


def test_temperature_one_follows_softmax():
    n = 20000
    counts = np.bincount(draws(SamplerParams(**{**PLAIN, "seed": 7}), LOGITS, n), minlength=5)
    expected = PROBS * n
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 18.47  # chi-square, 4 degrees of freedom, p = 0.001


def test_temperature_two_follows_the_flattened_softmax():
    n = 20000
    counts = np.bincount(draws(SamplerParams(**{**PLAIN, "temp": 2.0, "seed": 8}), LOGITS, n), minlength=5)
    flat = np.sqrt(PROBS) / np.sqrt(PROBS).sum()
    chi2 = ((counts - flat * n) ** 2 / (flat * n)).sum()
    assert chi2 < 18.47


def test_full_vocabulary_speed():
    logits = np.random.default_rng(9).standard_normal(49152).astype(np.float32) * 3
    history = list(np.random.default_rng(10).integers(0, 49152, 500))
    for params in (SamplerParams(seed=1, repeat_penalty=1.1), SamplerParams(seed=1, top_k=0)):
        sampler = Sampler(params, 49152)
        start = time.perf_counter()
        for _ in range(20):
            sampler.sample(logits, history)
        assert (time.perf_counter() - start) / 20 < 0.05  # a small share of a forward pass


def test_bad_settings_are_input_errors():
    with pytest.raises(InputError, match="repeat_penalty"):
        Sampler(SamplerParams(repeat_penalty=0.0), 10)
    with pytest.raises(InputError, match="repeat_last_n"):
        Sampler(SamplerParams(repeat_last_n=-5), 10)
