"""Sampling: logits → the next token id, with llama.cpp's default sampler chain and defaults.

The chain, in llama.cpp's default order:
    penalties (repeat, frequency, presence over the last `repeat_last_n` tokens) → top-k → typical →
    top-p → min-p → temperature → a draw from the softmax with a seeded generator.
Top-p, min-p and typical read the probabilities of the logits *before* temperature, as llama.cpp does, so the
temperature only reshapes the distribution over the tokens the truncations kept. A temperature of 0 or below
is greedy: the argmax after the penalties (the truncations cannot change the argmax).

Recent tokens for the penalties: `sample(logits, history)` takes the full token history (prompt included, as
llama.cpp's main feeds the prompt into its penalty window) and uses its last `repeat_last_n` tokens. When the
caller passes no history, the window the sampler keeps itself from `accept()` is used instead; `accept()`
must then be called with every prompt token and every chosen token.

Token probabilities (`token_probs`, asked for with a `ProbsReport`): by default the log-softmax of the logits
the chain received, i.e. the model's own distribution before penalties, logit bias, a grammar's mask and
temperature (what llama.cpp's `n_probs` and vLLM's default logprobs report); with `post_sampling` the
probabilities of the candidates the chain kept, renormalised after temperature, as the draw used them
(llama.cpp's `post_sampling_probs`).
"""

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from .errors import InputError


@dataclass
class SamplerParams:
    temp: float = 0.8
    top_k: int = 40  # <= 0: the whole vocabulary
    top_p: float = 0.95  # >= 1: off
    min_p: float = 0.05  # <= 0: off
    typical_p: float = 1.0  # >= 1: off
    repeat_penalty: float = 1.0  # 1: off (llama.cpp's default since the penalties became opt-in)
    repeat_last_n: int = 64  # 0: penalties off; -1: the whole history
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None  # None or negative (llama.cpp's -1): a fresh random seed


def check_params(p: SamplerParams) -> None:
    """One-line InputErrors for settings the chain cannot use."""
    if not p.repeat_penalty > 0:
        raise InputError(f"sampler: repeat_penalty must be positive, got {p.repeat_penalty}")
    if p.repeat_last_n < -1:
        raise InputError(f"sampler: repeat_last_n must be -1, 0 or positive, got {p.repeat_last_n}")
    for name in ("temp", "top_p", "min_p", "typical_p", "frequency_penalty", "presence_penalty"):
        if not np.isfinite(getattr(p, name)):
            raise InputError(f"sampler: {name} must be a finite number, got {getattr(p, name)}")


@dataclass
class TokenProbs:
    """One generated token's probabilities: its own log-probability and the `n` most probable tokens'
    (id, log-probability), best first."""

    token: int
    logprob: float
    top: list
    post_sampling: bool = False


@dataclass
class ProbsReport:
    """A request for probabilities: generate() appends one TokenProbs per generated token to `tokens`."""

    n: int  # how many alternatives per token (0: the chosen token's own figure only)
    post_sampling: bool = False
    tokens: list = field(default_factory=list)


def token_probs(logits: np.ndarray, token: int, n: int, candidates=None) -> TokenProbs:
    """The chosen token's log-probability and the n best: from the log-softmax (in float64) of `logits`, or,
    when `candidates` (ids, probabilities) is given, from the chain's final candidates (a token the chain
    dropped has probability 0: log -inf, and is never among the best)."""
    if candidates is not None:
        ids, probs = candidates
        probs = np.asarray(probs, dtype=np.float64)
        order = np.argsort(-probs, kind="stable")
        order = order[probs[order] > 0][:n]
        where = np.flatnonzero(np.asarray(ids) == token)
        own = float(probs[where[0]]) if len(where) else 0.0
        return TokenProbs(int(token), math.log(own) if own > 0 else -math.inf,
                          [(int(ids[i]), math.log(float(probs[i]))) for i in order], post_sampling=True)
    values = np.asarray(logits, dtype=np.float64)
    top = values.max()
    log_total = top + math.log(float(np.exp(values - top).sum()))
    best = top_k(values, n)[0][:n] if n > 0 else []
    return TokenProbs(int(token), float(values[token] - log_total),
                      [(int(i), float(values[i] - log_total)) for i in best])


class Sampler:
    def __init__(self, params: SamplerParams, n_vocab: int):
        check_params(params)
        self.params = params
        self.n_vocab = n_vocab
        if params.seed is None or params.seed < 0:
            # Drawn here rather than left to numpy so the seed in use can be reported and replayed.
            self.seed = int(np.random.SeedSequence().entropy % 2**32)
        else:
            self.seed = int(params.seed)
        self.rng = np.random.default_rng(self.seed)
        n = params.repeat_last_n
        self.recent = deque(maxlen=n if n > 0 else None)
        # The last draw's final candidates (ids, probabilities after the whole chain), for post-sampling figures.
        self.candidates = None

    def accept(self, token: int) -> None:
        """Record a token (prompt or generated) in the sampler's own penalty window."""
        if self.params.repeat_last_n != 0:
            self.recent.append(int(token))

    def penalty_window(self, history) -> np.ndarray:
        n = self.params.repeat_last_n
        if n == 0:
            return np.empty(0, dtype=np.int64)
        tokens = self.recent if history is None else history
        tokens = list(tokens)
        if n > 0:
            tokens = tokens[-n:]
        return np.asarray(tokens, dtype=np.int64)

    def sample(self, logits: np.ndarray, history=None) -> int:
        """The next token for logits float32[n_vocab]. The caller's array is never written to."""
        p = self.params
        logits = np.asarray(logits, dtype=np.float32)[: self.n_vocab]
        if p.repeat_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0:
            recent = self.penalty_window(history)
            if len(recent):
                logits = apply_penalties(logits, recent, p.repeat_penalty, p.frequency_penalty,
                                         p.presence_penalty)
        if p.temp <= 0:
            token = int(np.argmax(logits))
            self.candidates = (np.array([token]), np.array([1.0]))
            return token
        log_total = None  # log of the softmax denominator top-p normalises by; None: over `values` themselves
        if 0 < p.top_k < len(logits) or p.typical_p < 1.0:
            ids, values = top_k(logits, p.top_k)
        else:
            ids, values, log_total = full_vocab_candidates(logits, p.top_p, p.min_p)
        if p.typical_p < 1.0:
            ids, values = typical(ids, values, p.typical_p)
        if p.top_p < 1.0:
            probs = softmax(values) if log_total is None else np.exp(values.astype(np.float64) - log_total)
            keep = top_p_count(probs, p.top_p)
            ids, values = ids[:keep], values[:keep]
        if p.min_p > 0.0:
            ids, values = min_p(ids, values, p.min_p)
        probs = softmax(values / np.float32(p.temp))
        self.candidates = (ids, probs)
        return int(ids[draw(self.rng, probs)])


def apply_penalties(logits: np.ndarray, recent: np.ndarray, repeat: float, frequency: float,
                    presence: float) -> np.ndarray:
    """llama.cpp's penalties on a copy: each token seen in the window has its logit divided by `repeat` if
    positive, multiplied by it if not (once, however often it was seen), then lowered by
    count * frequency + presence."""
    out = logits.copy()
    recent = recent[(recent >= 0) & (recent < len(logits))]
    seen, counts = np.unique(recent, return_counts=True)
    values = out[seen]
    values = np.where(values > 0, values / np.float32(repeat), values * np.float32(repeat))
    values = values - counts.astype(np.float32) * np.float32(frequency) - np.float32(presence)
    out[seen] = values
    return out


def top_k(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest logits in descending order and their ids (k <= 0 or k >= n_vocab: all of them).
    argpartition first, so only the k survivors are sorted."""
    n = len(logits)
    if 0 < k < n:
        ids = np.argpartition(-logits, k - 1)[:k]
    else:
        ids = np.arange(n)
    ids = ids[np.argsort(-logits[ids], kind="stable")]
    return ids, logits[ids]


def full_vocab_candidates(logits: np.ndarray, top_p: float, min_p: float):
    """Without top-k, sorting the whole vocabulary would cost more than the rest of the chain. Top-p and
    min-p both keep a prefix of the sorted order, so only a superset of that prefix is found and sorted:
    min-p's cut itself, or else the top tokens (argpartition, growing) whose mass reaches top_p.
    Returns ids and logits (sorted in descending order unless nothing truncates) and the log of the
    full-vocabulary softmax denominator, which top-p must normalise by."""
    n = len(logits)
    top = logits.max()
    shifted = np.exp(logits.astype(np.float64) - np.float64(top))
    total = shifted.sum()
    log_total = float(top) + float(np.log(total))
    if min_p > 0.0:
        threshold = min(top + np.float32(np.log(min_p)), top)  # the same float32 cut as min_p() makes
        ids = np.flatnonzero(logits >= threshold)
    elif top_p < 1.0:
        ids = np.arange(n)
        k = 64
        while k < n:
            part = np.argpartition(-logits, k - 1)[:k]
            if shifted[part].sum() / total >= top_p + 1e-9:  # margin: top_p_count sums in another order
                ids = part
                break
            k *= 4
    else:
        return np.arange(n), logits, log_total
    ids = ids[np.argsort(-logits[ids], kind="stable")]
    return ids, logits[ids], log_total


def softmax(values: np.ndarray) -> np.ndarray:
    """Probabilities in float64 (a -inf logit gets exactly 0)."""
    values = values.astype(np.float64)
    e = np.exp(values - values.max())
    return e / e.sum()


def top_p_count(sorted_probs: np.ndarray, top_p: float) -> int:
    """How many of the descending probabilities to keep: the fewest whose running sum reaches top_p
    (llama.cpp compares with >=), and at least one."""
    cumulative = np.cumsum(sorted_probs)
    return int(min(np.searchsorted(cumulative, top_p, side="left") + 1, len(sorted_probs)))


def min_p(ids: np.ndarray, values: np.ndarray, p: float) -> tuple[np.ndarray, np.ndarray]:
    """Keep the tokens whose probability is at least p times the largest one; as llama.cpp, compared in
    logits: logit >= max_logit + log(p). `values` are in descending order, so the first always stays."""
    threshold = values[0] + np.float32(np.log(p))
    kept = values >= threshold
    kept[0] = True
    return ids[kept], values[kept]


def typical(ids: np.ndarray, values: np.ndarray, p: float) -> tuple[np.ndarray, np.ndarray]:
    """Locally typical sampling (llama.cpp's typical_p): order tokens by how far their surprise -log(prob)
    is from the entropy, keep the closest until their probability passes p (strictly), and return them in
    descending logit order again so the later steps see a sorted list."""
    probs = softmax(values)
    with np.errstate(divide="ignore"):
        log_probs = np.log(probs)
    entropy = -np.sum(np.where(probs > 0, probs * log_probs, 0.0))
    shifted = np.abs(-log_probs - entropy)  # zero-probability tokens get +inf and come last
    order = np.argsort(shifted, kind="stable")
    cumulative = np.cumsum(probs[order])
    keep = int(min(np.searchsorted(cumulative, p, side="right") + 1, len(order)))
    chosen = np.sort(order[:keep])  # positions in the descending list, so sorting them restores that order
    return ids[chosen], values[chosen]


def draw(rng: np.random.Generator, probs: np.ndarray) -> int:
    """An index drawn with the given probabilities; a zero-probability entry is never chosen."""
    cumulative = np.cumsum(probs)
    u = rng.random() * cumulative[-1]
    index = int(np.searchsorted(cumulative, u, side="right"))
    if index >= len(probs):  # u rounded up to the total: take the last token that has any probability
        index = int(np.flatnonzero(probs)[-1])
    return index
