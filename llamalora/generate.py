"""The generation loop: a context (model + KV cache + the tokens in it), prompt batches, context shift, stops.

This is the layer between the model (logits) and the front ends (`main`, perplexity, the server). It holds no
I/O: callers print what it yields.
"""

import time
from dataclasses import dataclass, field

import numpy as np

from .errors import GrammarError, InputError
from .grammar import mask_logits
from .llama import LlamaModel
from .sampling import Sampler
from .vocab import StreamDecoder, Vocab


@dataclass
class Timings:
    load_ms: float = 0.0
    prompt_ms: float = 0.0
    prompt_tokens: int = 0
    gen_ms: float = 0.0
    gen_tokens: int = 0

    def lines(self) -> list[str]:
        def rate(ms, n):
            per_token = ms / n if n else 0.0
            per_second = 1000.0 * n / ms if ms > 0 else 0.0
            return f"{ms:10.2f} ms / {n:5d} tokens ({per_token:8.2f} ms per token, {per_second:8.2f} tokens per second)"

        return [
            f"llama_print_timings:        load time = {self.load_ms:10.2f} ms",
            f"llama_print_timings: prompt eval time = {rate(self.prompt_ms, self.prompt_tokens)}",
            f"llama_print_timings:        eval time = {rate(self.gen_ms, self.gen_tokens)}",
        ]


class ContextFull(Exception):
    """The context is full and shifting is off (not a user error: generation simply ends)."""


@dataclass
class Context:
    """A model with its KV cache and the token ids the cache holds, in order."""

    model: LlamaModel
    n_ctx: int
    n_batch: int = 512
    n_keep: int = 0
    context_shift: bool = True
    tokens: list = field(default_factory=list)
    timings: Timings = field(default_factory=Timings)
    # Run-time adapter deltas for this context alone (LlamaModel.lora_deltas); None: the model's own.
    lora: dict | None = None

    def __post_init__(self):
        self.cache = self.model.new_cache(self.n_ctx)

    def reset(self) -> None:
        self.tokens = []
        self.cache.clear(0)

    def truncate(self, n: int) -> None:
        """Keep only the first n tokens (a shared prefix that the next evaluation extends)."""
        self.tokens = self.tokens[:n]
        self.cache.clear(n)

    def _make_room(self, n_new: int) -> None:
        if len(self.tokens) + n_new <= self.n_ctx:
            return
        if not self.context_shift:
            raise ContextFull(f"context is full ({self.n_ctx} tokens) and context shift is off")
        # llama.cpp's context shift: keep the first n_keep tokens, drop half of the rest.
        n_keep = min(self.n_keep, len(self.tokens))
        n_discard = max((len(self.tokens) - n_keep) // 2, 1)
        if len(self.tokens) - n_discard + n_new > self.n_ctx:
            raise ContextFull(f"{n_new} tokens do not fit in a context of {self.n_ctx} even after a shift")
        self.cache.shift(n_keep, n_discard)
        del self.tokens[n_keep : n_keep + n_discard]

    def eval(self, ids, generating: bool = False, all_logits: bool = False) -> np.ndarray:
        """Feed ids in batches of n_batch; returns the logits of the last one (or of all, float32[len(ids), n_vocab])."""
        ids = [int(i) for i in ids]
        if not ids:
            raise ValueError("nothing to evaluate")
        start = time.perf_counter()
        outputs = []
        for begin in range(0, len(ids), self.n_batch):
            outputs.append(self.eval_chunk(ids[begin : begin + self.n_batch], all_logits))
        elapsed = 1000.0 * (time.perf_counter() - start)
        if generating:
            self.timings.gen_ms += elapsed
            self.timings.gen_tokens += len(ids)
        else:
            self.timings.prompt_ms += elapsed
            self.timings.prompt_tokens += len(ids)
        return np.concatenate(outputs) if all_logits else outputs[-1][-1]


    def eval_chunk(self, ids: list, all_logits: bool = False) -> np.ndarray:
        """Evaluate ids in one forward pass, making room first (no timings: eval times its calls, a batched step
        its sequences); logits float32[1 or len(ids), n_vocab]."""
        self._make_room(len(ids))
        out = self.model.forward(ids, self.cache, all_logits=all_logits, lora=self.lora)
        self.tokens.extend(ids)
        return out

    def deltas(self) -> dict:
        """The run-time adapter deltas this context evaluates with."""
        return self.model.lora if self.lora is None else self.lora


def check_prompt_fits(n_prompt: int, n_ctx: int) -> None:
    if n_prompt > n_ctx - 4:
        raise InputError(f"prompt is too long ({n_prompt} tokens, max {n_ctx - 4}); raise -c or shorten the prompt")


def generate(
    ctx: Context,
    vocab: Vocab,
    sampler: Sampler,
    prompt_ids,
    n_predict: int = -1,
    stop: tuple = (),
    ignore_eos: bool = False,
    should_stop=lambda: False,
    grammar=None,
):
    """Evaluate the prompt, then yield (token_id, text_piece) until EOS, a stop string, n_predict or a full context.

    Text pieces are whole UTF-8 characters. When generation ends inside a character (its first bytes generated,
    the rest not), one last (None, text) carries those bytes, decoded with U+FFFD for what is missing, so that no
    generated byte is dropped. On a stop string the generator returns after yielding the token that completed it;
    the caller decides whether to show the stop string (the server strips it, `main` shows it).
    The generator's return value (StopIteration.value) says why it stopped: "eos", "stop", "limit", "context", "abort".
    grammar: a GrammarState; only tokens that keep the output inside the grammar are sampled, and generation ends
    when the grammar is complete and an end-of-generation token is chosen.
    """
    logits = ctx.eval(prompt_ids) if len(prompt_ids) else None
    if logits is None:
        raise ValueError("generation needs at least one prompt token")
    decoder = StreamDecoder(vocab)
    reason = yield from _sample_tokens(ctx, vocab, sampler, logits, decoder, n_predict, stop, ignore_eos,
                                       should_stop, grammar)
    rest = decoder.flush()
    if rest:
        yield None, rest
    return reason


def _sample_tokens(ctx, vocab, sampler, logits, decoder, n_predict, stop, ignore_eos, should_stop, grammar):
    """generate()'s loop: yields (token id, text piece) and returns why it stopped."""
    tail = ""
    n_done = 0
    history = list(ctx.tokens)
    while n_predict < 0 or n_done < n_predict:
        if should_stop():
            return "abort"
        if grammar is not None:
            mask = grammar.allowed_mask(vocab)
            if not mask.any():
                raise GrammarError("the grammar allows no token of this vocabulary here")
            token = sampler.sample(mask_logits(logits, mask), history)
        else:
            token = sampler.sample(logits, history)
        sampler.accept(token)
        history.append(token)
        n_done += 1
        if vocab.is_eog(token) and (not ignore_eos or grammar is not None):
            return "eos"
        if grammar is not None:
            grammar.accept(token, vocab)
        piece = decoder.push(token)
        yield token, piece
        tail = (tail + piece)[-256:]
        if any(s and s in tail for s in stop):
            return "stop"
        if n_predict >= 0 and n_done >= n_predict:
            return "limit"
        try:
            logits = ctx.eval([token], generating=True)
        except ContextFull:
            return "context"
    return "limit"
