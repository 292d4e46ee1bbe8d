"""llama.cpp's perplexity protocol, and KL divergence against a saved base run.

The text is tokenized whole (BOS first if the vocabulary adds one) and cut into chunks of n_ctx tokens; each
chunk is evaluated from an empty cache with its first token replaced by BOS where the vocabulary adds BOS, and
only the second half is scored: the logits at positions n_ctx/2 .. n_ctx-2 predict tokens n_ctx/2+1 .. n_ctx-1.
The error estimate is llama.cpp's: the standard error of the mean negative log-likelihood, times the perplexity.
"""

import math
from dataclasses import dataclass, field

import numpy as np

from .errors import InputError
from .generate import Context

KLD_MAGIC = b"LLKLD001"


@dataclass
class PerplexityResult:
    ppl: float
    ppl_err: float
    running: list = field(default_factory=list)
    n_scored: int = 0


def chunk_count(n_tokens: int, n_ctx: int, n_chunks: int) -> int:
    if n_ctx < 8:
        raise InputError(f"-c {n_ctx} is too small for perplexity (at least 8)")
    if n_tokens < 2 * n_ctx:
        raise InputError(
            f"the text has {n_tokens} tokens; perplexity with a context of {n_ctx} needs at least {2 * n_ctx}"
        )
    available = n_tokens // n_ctx
    return available if n_chunks is None or n_chunks < 0 else min(n_chunks, available)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def chunk_log_probs(ctx: Context, tokens: list, start: int, n_ctx: int, bos_id) -> tuple[np.ndarray, np.ndarray]:
    """Log-probabilities float64[n_scored, n_vocab] of one chunk's scored positions, and the tokens they predict."""
    chunk = list(tokens[start : start + n_ctx])
    if bos_id is not None:
        chunk[0] = bos_id
    ctx.reset()
    logits = ctx.eval(chunk, all_logits=True)
    first = n_ctx // 2
    targets = np.asarray(tokens[start + first + 1 : start + n_ctx], dtype=np.int64)
    return log_softmax(logits[first : n_ctx - 1]), targets


def summarize(nll: float, nll2: float, count: int) -> tuple[float, float]:
    """(perplexity, its error) from the sums of nll and nll² over count tokens, as llama.cpp computes them."""
    mean = nll / count
    var = nll2 / count - mean * mean
    err = math.sqrt(var / (count - 1)) if var > 0 and count > 1 else 0.0
    ppl = math.exp(mean)
    return ppl, err * ppl


def perplexity(ctx: Context, tokens: list, n_chunks: int, bos_id, on_chunk=None, save=None, compare=None):
    """Run the protocol over ctx (whose n_ctx is the chunk size). on_chunk(i, running_ppl) after each chunk.

    save: a KLDivergenceWriter to store this run's log-probabilities; compare: a KLDivergenceReader of a base run.
    """
    n_ctx = ctx.n_ctx
    nll = nll2 = 0.0
    count = 0
    result = PerplexityResult(0.0, 0.0)
    for i in range(n_chunks):
        log_probs, targets = chunk_log_probs(ctx, tokens, i * n_ctx, n_ctx, bos_id)
        token_nll = -log_probs[np.arange(len(targets)), targets]
        nll += float(token_nll.sum())
        nll2 += float((token_nll**2).sum())
        count += len(targets)
        running = math.exp(nll / count)
        result.running.append(running)
        if save is not None:
            save.write_chunk(log_probs, targets)
        if compare is not None:
            compare.add_chunk(log_probs, targets)
        if on_chunk:
            on_chunk(i, running)
    result.ppl, result.ppl_err = summarize(nll, nll2, count)
    result.n_scored = count
    return result


class KLDivergenceWriter:
    """Saves a base run: header (magic, n_ctx, n_vocab, n_chunks, n_tokens), the token ids, then per chunk the
    scored positions' log-probabilities as float16."""

    def __init__(self, path: str, n_ctx: int, n_vocab: int, n_chunks: int, tokens: list):
        self.f = open(path, "wb")
        self.f.write(KLD_MAGIC)
        np.asarray([n_ctx, n_vocab, n_chunks, len(tokens)], dtype=np.int64).tofile(self.f)
        np.asarray(tokens, dtype=np.int32).tofile(self.f)

    def write_chunk(self, log_probs: np.ndarray, targets: np.ndarray) -> None:
        log_probs.astype(np.float16).tofile(self.f)

    def close(self):
        self.f.close()


class KLDivergenceReader:
    """Reads a base run and accumulates llama.cpp's statistics of this run against it."""

    def __init__(self, path: str):
        try:
            with open(path, "rb") as f:
                magic = f.read(len(KLD_MAGIC))
                header = np.fromfile(f, dtype=np.int64, count=4)
        except OSError as e:
            raise InputError(f"{path}: cannot read KL-divergence base: {e.strerror or e}") from None
        if magic != KLD_MAGIC or len(header) != 4:
            raise InputError(f"{path}: not a KL-divergence base file written by --kl-divergence-base")
        self.path = path
        self.n_ctx, self.n_vocab, self.n_chunks, n_tokens = (int(v) for v in header)
        offset = len(KLD_MAGIC) + 4 * 8
        self.tokens = np.memmap(path, dtype=np.int32, mode="r", offset=offset, shape=(n_tokens,)).tolist()
        offset += 4 * n_tokens
        n_scored = self.n_ctx - 1 - self.n_ctx // 2
        expected = offset + 2 * self.n_chunks * n_scored * self.n_vocab
        import os

        if os.path.getsize(path) < expected:
            raise InputError(f"{path}: KL-divergence base file is truncated")
        self.log_probs = np.memmap(path, dtype=np.float16, mode="r", offset=offset,
                                   shape=(self.n_chunks, n_scored, self.n_vocab))
        self.chunk = 0
        self.kld, self.same_top, self.nll_base, self.nll_new, self.dp = [], [], [], [], []

    def add_chunk(self, log_probs: np.ndarray, targets: np.ndarray) -> None:
        base = self.log_probs[self.chunk].astype(np.float64)
        self.chunk += 1
        p_base = np.exp(base)
        self.kld.append((p_base * (base - log_probs)).sum(axis=1))
        self.same_top.append(np.argmax(base, axis=1) == np.argmax(log_probs, axis=1))
        rows = np.arange(len(targets))
        self.nll_base.append(-base[rows, targets])
        self.nll_new.append(-log_probs[rows, targets])
        self.dp.append(np.exp(log_probs[rows, targets]) - p_base[rows, targets])

    def report(self) -> list[str]:
        kld = np.concatenate(self.kld)
        same = np.concatenate(self.same_top).astype(np.float64)
        nll_b, nll_q = np.concatenate(self.nll_base), np.concatenate(self.nll_new)
        dp = np.concatenate(self.dp)
        n = len(kld)

        def mean_err(x):
            return x.mean(), x.std(ddof=1) / math.sqrt(len(x)) if len(x) > 1 else 0.0

        ppl_q, ppl_b = math.exp(nll_q.mean()), math.exp(nll_b.mean())
        ln_ratio, ln_ratio_err = mean_err(nll_q - nll_b)
        k_mean, k_err = mean_err(kld)
        s_mean, s_err = mean_err(same)
        lines = [
            "====== Perplexity statistics ======",
            f"Mean PPL(Q)                   : {ppl_q:10.6f}",
            f"Mean PPL(base)                : {ppl_b:10.6f}",
            f"Cor(ln(PPL(Q)), ln(PPL(base))): {100 * np.corrcoef(nll_q, nll_b)[0, 1]:6.2f}%",
            f"Mean ln(PPL(Q)/PPL(base))     : {ln_ratio:10.6f} ± {ln_ratio_err:10.6f}",
            f"Mean PPL(Q)/PPL(base)         : {math.exp(ln_ratio):10.6f} ± {math.exp(ln_ratio) * ln_ratio_err:10.6f}",
            f"Mean PPL(Q)-PPL(base)         : {ppl_q - ppl_b:10.6f}",
            "",
            "====== KL divergence statistics ======",
            f"Mean    KLD: {k_mean:10.6f} ± {k_err:10.6f}",
            f"Maximum KLD: {kld.max():10.6f}",
            f"99.9%   KLD: {np.percentile(kld, 99.9):10.6f}",
            f"99.0%   KLD: {np.percentile(kld, 99.0):10.6f}",
            f"Median  KLD: {np.median(kld):10.6f}",
            f"Minimum KLD: {kld.min():10.6f}",
            "",
            "====== Token probability statistics ======",
            f"Mean    Δp: {100 * dp.mean():7.3f} ± {100 * dp.std(ddof=1) / math.sqrt(n):.3f} %",
            f"RMS Δp    : {100 * math.sqrt((dp**2).mean()):7.3f} %",
            f"Same top p: {100 * s_mean:7.3f} ± {100 * s_err:.3f} %",
        ]
        return lines
