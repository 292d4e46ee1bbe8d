"""The generation loop: a context (model + KV cache + the tokens in it), prompt batches, context shift, stops.

This is the layer between the model (logits) and the front ends (`main`, perplexity, the server). It holds no
I/O: callers print what it yields.
"""

import time
from dataclasses import dataclass, field

import numpy as np

from .compile_clock import compile_ms
from .errors import GrammarError, InputError
from .grammar import mask_logits
from .llama import LlamaModel
from .sampling import ProbsReport, Sampler, token_probs
from .threads import governor
from .vocab import StreamDecoder, Vocab


@dataclass
class Timings:
    """llama.cpp's timing lines; compilation (a first run's kernels) is counted apart from load and evaluation."""

    load_ms: float = 0.0
    prompt_ms: float = 0.0
    prompt_tokens: int = 0
    gen_ms: float = 0.0
    gen_tokens: int = 0
    compile_ms: float = 0.0

    def count(self, n_tokens: int, elapsed_ms: float, compiled_ms: float, generating: bool) -> None:
        """An evaluation of n_tokens that took elapsed_ms, compiled_ms of it compiling kernels (their own line)."""
        self.compile_ms += compiled_ms
        if generating:
            self.gen_ms += elapsed_ms - compiled_ms
            self.gen_tokens += n_tokens
        else:
            self.prompt_ms += elapsed_ms - compiled_ms
            self.prompt_tokens += n_tokens

    def lines(self) -> list[str]:
        def rate(ms, n):
            per_token = ms / n if n else 0.0
            per_second = 1000.0 * n / ms if ms > 0 else 0.0
            return f"{ms:10.2f} ms / {n:5d} tokens ({per_token:8.2f} ms per token, {per_second:8.2f} tokens per second)"

        lines = [
            f"llama_print_timings:        load time = {self.load_ms:10.2f} ms",
            f"llama_print_timings: prompt eval time = {rate(self.prompt_ms, self.prompt_tokens)}",
            f"llama_print_timings:        eval time = {rate(self.gen_ms, self.gen_tokens)}",
        ]
        if self.compile_ms > 0:
            lines.insert(1, f"llama_print_timings:     compile time = {self.compile_ms:10.2f} ms")
        return lines


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
        # An activated LoRA's start: positions before it were evaluated without its deltas (the base model's KV)
        self.active_from: int | None = None

    def reset(self) -> None:
        self.tokens = []
        self.cache.clear(0)
        self.active_from = None

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
        if self.active_from is not None and self.active_from > n_keep:  # the positions moved down with the cache
            self.active_from = max(n_keep, self.active_from - n_discard)

    def eval(self, ids, generating: bool = False, all_logits: bool = False) -> np.ndarray:
        """Feed ids in batches of n_batch; returns the logits of the last one (or of all, float32[len(ids), n_vocab])."""
        ids = [int(i) for i in ids]
        if not ids:
            raise ValueError("nothing to evaluate")
        threads = governor()
        n_threads = threads.token_threads() if len(ids) == 1 else threads.batch_threads()
        n_asked = len(ids)
        start, compiled = time.perf_counter(), compile_ms()
        outputs = []
        invocation = getattr(self.own_deltas(), "invocation", None)
        if invocation is not None and not generating:
            ids = self._activate(invocation, ids)
        for begin in range(0, len(ids), self.n_batch):
            outputs.append(self.eval_chunk(ids[begin : begin + self.n_batch], all_logits))
        compiled = compile_ms() - compiled
        elapsed = 1000.0 * (time.perf_counter() - start)
        if n_asked == 1:
            threads.token_done(n_threads, (elapsed - compiled) / 1000.0)
        self.timings.count(len(ids), elapsed, compiled, generating)
        return np.concatenate(outputs)[-n_asked:] if all_logits else outputs[-1][-1]


    def _activate(self, invocation: tuple, ids: list) -> list:
        """Find where an activated LoRA starts (PEFT: the last occurrence of its invocation tokens in the input,
        None when absent: the base model throughout) and, where that moves the start below what the cache already
        holds, drop the cached positions from there and return them with ids, to be evaluated again. Generated tokens
        never move it."""
        sequence, n = self.tokens + ids, len(invocation)
        found = None
        for start in range(len(sequence) - n, -1, -1):
            if tuple(sequence[start:start + n]) == invocation:
                found = start
                break
        old, self.active_from = self.active_from, found
        first_change = min(p for p in (old, found, len(self.tokens)) if p is not None)
        if old != found and first_change < len(self.tokens):
            redo = self.tokens[first_change:]
            self.truncate(first_change)
            return redo + ids
        return ids

    def _forward_activated(self, chunk: list, all_logits: bool, deltas) -> np.ndarray:
        """chunk evaluated without the deltas before active_from and with them from there on."""
        split = len(chunk) if self.active_from is None else min(max(self.active_from - len(self.tokens), 0), len(chunk))
        parts = []
        if split:
            parts.append(self.model.forward(chunk[:split], self.cache, all_logits=all_logits, lora={}))
        if split < len(chunk):
            parts.append(self.model.forward(chunk[split:], self.cache, all_logits=all_logits, lora=deltas))
        return np.concatenate(parts) if all_logits else parts[-1]


    def eval_chunk(self, ids: list, all_logits: bool = False) -> np.ndarray:
        """Evaluate ids in one forward pass (an activated LoRA's in two, split at its start), making room first (no
        timings: eval times its calls, a batched step its sequences); logits float32[1 or len(ids), n_vocab]."""
        self._make_room(len(ids))
        deltas = self.own_deltas()
        if getattr(deltas, "invocation", None) is not None:
            out = self._forward_activated(ids, all_logits, deltas)
        else:
            out = self.model.forward(ids, self.cache, all_logits=all_logits, lora=self.lora)
        self.tokens.extend(ids)
        return out

    def own_deltas(self):
        """The run-time adapter deltas this context evaluates with (the model's own unless it has its own)."""
        return getattr(self.model, "lora", None) if self.lora is None else self.lora  # (a stand-in model may have none)

    def deltas(self) -> dict:
        """The deltas the next position is evaluated with: own_deltas, but none before an activated LoRA's start
        (or anywhere, where its invocation was not found)."""
        deltas = self.own_deltas()
        if getattr(deltas, "invocation", None) is not None and (self.active_from is None
                                                                 or self.active_from > len(self.tokens)):
            return {}
        return deltas


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
    probs: ProbsReport | None = None,
):
    """Evaluate the prompt, then yield (token_id, text_piece) until EOS, a stop string, n_predict or a full context.

    Text pieces are whole UTF-8 characters. When generation ends inside a character (its first bytes generated,
    the rest not), one last (None, text) carries those bytes, decoded with U+FFFD for what is missing, so that no
    generated byte is dropped. On a stop string the generator returns after yielding the token that completed it;
    the caller decides whether to show the stop string (the server strips it, `main` shows it).
    The generator's return value (StopIteration.value) says why it stopped: "eos", "stop", "limit", "context", "abort".
    grammar: a GrammarState; only tokens that keep the output inside the grammar are sampled, and generation ends
    when the grammar is complete and an end-of-generation token is chosen.
    probs: when given, one TokenProbs per yielded token is appended to probs.tokens before the token is
    yielded (sampling.token_probs: the logits the sampler was handed, or its final candidates).
    """
    logits = ctx.eval(prompt_ids) if len(prompt_ids) else None
    if logits is None:
        raise ValueError("generation needs at least one prompt token")
    decoder = StreamDecoder(vocab)
    reason = yield from _sample_tokens(ctx, vocab, sampler, logits, decoder, n_predict, stop, ignore_eos,
                                       should_stop, grammar, probs)
    rest = decoder.flush()
    if rest:
        yield None, rest
    return reason


def _sample_tokens(ctx, vocab, sampler, logits, decoder, n_predict, stop, ignore_eos, should_stop, grammar, probs):
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
        if probs is not None:
            candidates = getattr(sampler, "candidates", None) if probs.post_sampling else None
            if probs.post_sampling and candidates is None:
                candidates = (np.array([token]), np.array([1.0]))  # a sampler that keeps no candidates chose it
            probs.tokens.append(token_probs(logits[: vocab.n_vocab], token, probs.n, candidates))
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
