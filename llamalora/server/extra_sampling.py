"""The samplers llama.cpp's server offers beyond the shared chain: logit bias, penalize_nl, tail-free sampling
(tfs_z) and mirostat 1 and 2, wrapped around llamalora.sampling.Sampler.

The order is the server's: logit bias → penalties (with the newline logit put back unless penalize_nl) →
greedy at temperature <= 0 → mirostat (after temperature) or top-k → tail-free → typical → top-p → min-p →
temperature → draw. Tail-free runs here and hands the survivors on by setting every other logit to -inf, so
the shared Sampler does the rest of the chain unchanged.
"""

import math

import numpy as np

from ..sampling import Sampler, SamplerParams, apply_penalties, draw, softmax, top_k

MIROSTAT_M = 100  # tokens mirostat 1 estimates the Zipf exponent from (llama.cpp's m)


def add_logit_bias(logits: np.ndarray, bias: dict) -> np.ndarray:
    """A copy of logits with bias[id] added (-inf: never sampled)."""
    if not bias:
        return logits
    out = logits.copy()
    ids = np.fromiter(bias.keys(), dtype=np.int64)
    out[ids] += np.fromiter(bias.values(), dtype=np.float32)
    return out


def tail_free(ids: np.ndarray, values: np.ndarray, z: float, min_keep: int = 1):
    """llama.cpp's tail-free sampling over candidates sorted by descending logit: cut where the normalised
    absolute second derivative of the sorted probabilities has summed past z."""
    if z >= 1.0 or len(ids) <= 2:
        return ids, values
    probs = softmax(values)
    second = np.abs(np.diff(probs, n=2))  # |first[i] - first[i+1]| with first[i] = p[i] - p[i+1]
    total = second.sum()
    second = second / total if total > 1e-6 else np.full(len(second), 1.0 / len(second))
    cumulative = np.cumsum(second)
    keep = len(ids)
    for i, c in enumerate(cumulative):
        if c > z and i >= min_keep:
            keep = i
            break
    return ids[:keep], values[:keep]


def mirostat_v1(rng, logits: np.ndarray, tau: float, eta: float, mu: float, m: int = MIROSTAT_M):
    """One mirostat (version 1) draw: returns (token id, new mu, the candidates drawn from (ids, probabilities))."""
    n_vocab = len(logits)
    ids, values = top_k(logits, 0)
    probs = softmax(values)
    n = min(m - 1, len(probs) - 1)
    t = np.log(np.arange(2, n + 2, dtype=np.float64) / np.arange(1, n + 1, dtype=np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        b = np.log(probs[:n] / probs[1 : n + 1])
    b = np.where(np.isfinite(b), b, 0.0)
    s_hat = float((t * b).sum() / (t * t).sum()) if n > 0 else 1.0
    epsilon_hat = s_hat - 1.0
    try:
        k = (epsilon_hat * 2.0 ** mu / (1.0 - n_vocab ** -epsilon_hat)) ** (1.0 / s_hat)
    except (OverflowError, ZeroDivisionError):
        k = float(n_vocab)
    k = int(min(max(k, 1.0), n_vocab)) if math.isfinite(k) else n_vocab
    kept = softmax(values[:k])
    index = draw(rng, kept)
    surprise = -math.log2(kept[index])
    return int(ids[index]), mu - eta * (surprise - tau), (ids[:k], kept)


def mirostat_v2(rng, logits: np.ndarray, tau: float, eta: float, mu: float):
    """One mirostat 2 draw: drop tokens whose surprise -log2(p) exceeds mu, draw; returns (token id, new mu,
    the candidates drawn from)."""
    ids, values = top_k(logits, 0)
    probs = softmax(values)
    with np.errstate(divide="ignore"):
        surprise = -np.log2(probs)
    keep = max(int(np.argmax(surprise > mu)) if (surprise > mu).any() else len(probs), 1)
    kept = softmax(values[:keep])
    index = draw(rng, kept)
    return int(ids[index]), mu - eta * (-math.log2(kept[index]) - tau), (ids[:keep], kept)


class RequestSampler:
    """A request's sampler: same interface as Sampler (sample(logits, history), accept(token), seed, and
    `candidates`, the last draw's final candidates)."""

    def __init__(self, req, n_vocab: int, nl_id: int | None):
        self.req = req
        self.nl_id = nl_id
        self.inner = Sampler(SamplerParams(temp=req.temperature, top_k=req.top_k, top_p=req.top_p, min_p=req.min_p,
                                           typical_p=req.typical_p, seed=req.seed), n_vocab)
        self.seed = self.inner.seed
        self.n_vocab = n_vocab
        self.mu = 2.0 * req.mirostat_tau
        self.candidates = None

    def accept(self, token: int) -> None:
        pass  # the penalty window is read from the history generate() passes in

    def penalty_window(self, history) -> np.ndarray:
        n = self.req.repeat_last_n
        if n == 0 or not history:
            return np.empty(0, dtype=np.int64)
        tokens = list(history)
        return np.asarray(tokens[-n:] if n > 0 else tokens, dtype=np.int64)

    def sample(self, logits: np.ndarray, history=None) -> int:
        r = self.req
        logits = add_logit_bias(np.asarray(logits, dtype=np.float32)[: self.n_vocab], r.logit_bias)
        if r.repeat_penalty != 1.0 or r.frequency_penalty != 0.0 or r.presence_penalty != 0.0:
            recent = self.penalty_window(history)
            if len(recent):
                nl_logit = logits[self.nl_id] if self.nl_id is not None else None
                logits = apply_penalties(logits, recent, r.repeat_penalty, r.frequency_penalty, r.presence_penalty)
                if not r.penalize_nl and nl_logit is not None:
                    logits[self.nl_id] = nl_logit
        if r.temperature <= 0:
            token = int(np.argmax(logits))
            self.candidates = (np.array([token]), np.array([1.0]))
            return token
        if r.mirostat:
            scaled = logits / np.float32(r.temperature)
            step = mirostat_v1 if r.mirostat == 1 else mirostat_v2
            token, self.mu, self.candidates = step(self.inner.rng, scaled, r.mirostat_tau, r.mirostat_eta, self.mu)
            return token
        if r.tfs_z < 1.0:
            ids, values = top_k(logits, r.top_k)
            kept, _ = tail_free(ids, values, r.tfs_z)
            masked = np.full_like(logits, -np.inf)
            masked[kept] = logits[kept]
            logits = masked
        token = self.inner.sample(logits, history)
        self.candidates = self.inner.candidates
        return token
