"""The sampler chain: greedy, seeds, top-k / top-p / min-p supports, repeat penalty, temperature-1 frequencies."""

import numpy as np

from llamalora.sampling import Sampler, SamplerParams


def draws(params, logits, n=2000, history=()):
    sampler = Sampler(params, len(logits))
    return np.array([sampler.sample(logits, history) for _ in range(n)])


def test_greedy_is_argmax_and_leaves_logits_alone():
    logits = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    before = logits.copy()
    assert Sampler(SamplerParams(temp=0), 1000).sample(logits) == int(np.argmax(logits))
    assert Sampler(SamplerParams(temp=1.0, top_k=1), 1000).sample(logits) == int(np.argmax(logits))
    np.testing.assert_array_equal(logits, before)


def test_seed_reproducible():
    logits = np.zeros(50, dtype=np.float32)
    params = SamplerParams(temp=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=42)
    a, b = draws(params, logits, 200), draws(params, logits, 200)
    c = draws(SamplerParams(temp=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=43), logits, 200)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


def test_truncations_keep_the_expected_sets():
    probs = np.array([0.4, 0.3, 0.15, 0.1, 0.05])
    logits = np.log(probs).astype(np.float32)
    base = dict(temp=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=1)
    assert set(draws(SamplerParams(**{**base, "top_k": 2}), logits)) == {0, 1}
    assert set(draws(SamplerParams(**{**base, "top_p": 0.8}), logits)) == {0, 1, 2}  # 0.4+0.3 < 0.8 <= 0.85
    assert set(draws(SamplerParams(**{**base, "min_p": 0.3}), logits)) == {0, 1, 2}  # >= 0.3 * 0.4
    assert set(draws(SamplerParams(**base), logits)) == {0, 1, 2, 3, 4}


def test_repeat_penalty_flips_the_choice():
    logits = np.array([2.0, 1.9, -1.0], dtype=np.float32)
    greedy = SamplerParams(temp=0, repeat_penalty=1.1, repeat_last_n=4)
    assert Sampler(greedy, 3).sample(logits, history=[0]) == 1   # 2.0 / 1.1 < 1.9
    assert Sampler(greedy, 3).sample(logits, history=[0, 5, 5, 5, 5]) == 0  # token 0 is out of the window
    assert Sampler(SamplerParams(temp=0), 3).sample(logits, history=[0]) == 0  # default penalty 1.0: off


def test_temperature_one_follows_softmax():
    probs = np.array([0.5, 0.25, 0.15, 0.1])
    n = 20000
    counts = np.bincount(draws(SamplerParams(temp=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=7),
                               np.log(probs).astype(np.float32), n), minlength=4)
    expected = probs * n
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 16.3  # chi-square, 3 degrees of freedom, p = 0.001
