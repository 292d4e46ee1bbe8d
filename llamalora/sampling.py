"""Sampling: logits → the next token id, with llama.cpp's default chain and defaults.

The chain: repeat penalty over the last `repeat_last_n` tokens → top-k → top-p → min-p → temperature →
a draw from the softmax with a seeded generator. Temperature 0 (or below) takes the argmax after the
penalty, as llama.cpp's greedy sampling does.
"""

from dataclasses import dataclass

import numpy as np


@dataclass
class SamplerParams:
    temp: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None  # None or -1: a fresh random seed


class Sampler:
    def __init__(self, params: SamplerParams, n_vocab: int):
        self.params = params
        self.n_vocab = n_vocab
        seed = params.seed if params.seed is not None and params.seed >= 0 else None
        self.rng = np.random.default_rng(seed)

    def sample(self, logits: np.ndarray, history=()) -> int:
        """The next token for logits float32[n_vocab]; history is every token so far (prompt included)."""
        p = self.params
        logits = np.asarray(logits, dtype=np.float32)[: self.n_vocab]
        if p.repeat_penalty != 1.0 and p.repeat_last_n != 0 and len(history):
            recent = history if p.repeat_last_n < 0 else history[-p.repeat_last_n:]
            logits = apply_repeat_penalty(logits, np.asarray(recent, dtype=np.int64), p.repeat_penalty)
        if p.temp <= 0:
            return int(np.argmax(logits))
        ids, values = top_k(logits, p.top_k)
        probs = softmax(values)
        keep = top_p_count(probs, p.top_p)
        ids, values, probs = ids[:keep], values[:keep], probs[:keep]
        if p.min_p > 0 and len(ids) > 1:
            kept = probs >= p.min_p * probs[0]
            ids, values = ids[kept], values[kept]
        probs = softmax(values / np.float32(p.temp))
        return int(ids[self.rng.choice(len(ids), p=probs)])

    def accept(self, token: int) -> None:
        """Called with each chosen token; the penalty reads the history the caller passes to sample()."""


def apply_repeat_penalty(logits: np.ndarray, recent: np.ndarray, penalty: float) -> np.ndarray:
    """llama.cpp's repeat penalty: each recently seen token's logit is divided by the penalty if positive,
    multiplied by it if negative (once per token, however often it was seen)."""
    out = logits.copy()
    seen = np.unique(recent[(recent >= 0) & (recent < len(logits))])
    values = out[seen]
    out[seen] = np.where(values > 0, values / np.float32(penalty), values * np.float32(penalty))
    return out


def top_k(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest logits, sorted in descending order, and their ids (k <= 0: all of them)."""
    n = len(logits)
    if 0 < k < n:
        ids = np.argpartition(-logits, k - 1)[:k]
    else:
        ids = np.arange(n)
    ids = ids[np.argsort(-logits[ids], kind="stable")]
    return ids, logits[ids]


def softmax(values: np.ndarray) -> np.ndarray:
    e = np.exp((values - values.max()).astype(np.float64))
    return e / e.sum()


def top_p_count(sorted_probs: np.ndarray, top_p: float) -> int:
    """How many of the (descending) probabilities to keep: the fewest whose sum reaches top_p (at least one)."""
    if top_p >= 1.0:
        return len(sorted_probs)
    cumulative = np.cumsum(sorted_probs)
    return int(min(np.searchsorted(cumulative, top_p) + 1, len(sorted_probs)))
