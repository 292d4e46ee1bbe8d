"""Continuous batching: sequences driven from their own threads share one batched step at a time.

Each sequence is a generate.Context whose owner (a thread running generate(), a server slot) calls
`scheduler.eval(ctx, ids)` where it would call ctx.eval (a ScheduledContext does so itself): the call blocks until the ids are evaluated and returns the
logits of the last one. Each step is one batch.step over what the sequences have asked for, as llama.cpp's server
does with -cb:

- The steps run in the sequences' own threads (whichever asks while no step is running leads), so a lone sequence
  is evaluated as directly as by Context.eval.
- A sequence that has joined (`join`, for as long as it generates) is waited for before a step starts, up to
  `gather_s` (its owner samples its next token meanwhile); a new one joins the running batch at the next step, one
  that finishes or is cancelled leaves at once (`leave`).
- Prompts are cut into chunks of `ubatch` tokens (prompt_chunks) and a step takes at most `ubatch` prompt tokens
  beside every sequence's next token: a long prompt advances a chunk a step instead of stalling the others. Where
  a prompt is cut depends on the prompt alone, never on the other sequences, so its logits do too.
- A sequence whose `should_stop` (given at join) turns true while it waits gets Aborted instead of its logits;
  a sequence that cannot take its tokens (ContextFull) gets that error; the others go on.
- Each step runs with threads.Governor's thread count (set on the leading thread); a step of one lone token is
  what the governor measures, as Context.eval's. An activated LoRA's prompt (where its adapter starts may move)
  and all_logits evaluations run apart, under the lock.

Timings: each request's wall time, from its eval call to its logits, goes to its context's timings (prompt or
generation), which is what its client waits.
"""

import threading
import time
from dataclasses import dataclass, field

import numpy as np

from . import batch, decode
from .compile_clock import compile_ms
from .generate import Context
from .threads import governor



class ScheduledContext(Context):
    """A Context whose evaluations are its part of a Scheduler's batched steps (set `scheduler` before use)."""

    scheduler: "Scheduler | None" = None

    def eval(self, ids, generating: bool = False, all_logits: bool = False):
        return self.scheduler.eval(self, ids, generating=generating, all_logits=all_logits)


class Aborted(Exception):
    """The sequence's should_stop became true while its tokens waited for a step."""


@dataclass
class Request:
    ctx: object
    ids: list
    generating: bool
    chunks: list  # the sizes the ids are evaluated in, in order
    arrived: float = field(default_factory=time.perf_counter)
    done: bool = False
    position: int = 0  # ids evaluated so far
    result: object = None  # logits, or the exception to raise in the caller


def prompt_chunks(n: int, ubatch: int) -> list:
    """Sizes of the chunks n prompt tokens are evaluated in: ubatch each, a last one of decode.COLUMN_TOKENS or
    fewer merged into the one before (which takes the matmul tiles, as the whole prompt would in one Context.eval,
    where the short chunk alone would take the one-token step's kernels)."""
    sizes = [min(ubatch, n - begin) for begin in range(0, n, ubatch)]
    if len(sizes) > 1 and sizes[-1] <= decode.COLUMN_TOKENS < sizes[-2]:
        tail = sizes.pop()
        sizes[-1] += tail
    return sizes


class Scheduler:
    """The steps run in the sequences' own threads, one at a time: a thread whose request waits while no step is
    being run leads (gathers the requests, runs steps until its own request is done, hands over); the others wait
    for their results. So a lone sequence runs its steps itself, with no thread in between."""

    def __init__(self, model, ubatch: int = 128, lock=None, gather_s: float = 0.02):
        self.model = model
        self.ubatch = max(int(ubatch), 1)
        self.lock = lock or threading.Lock()  # held around each step (other users of the model take it too)
        self.gather_s = gather_s
        self.cond = threading.Condition()
        self.pending: dict = {}  # id(ctx) -> its Request
        self.joined: dict = {}  # id(ctx) -> its should_stop (contexts are compared by identity)
        self.leading = False  # a thread is gathering or running steps
        self.n_steps = 0

    def join(self, ctx, should_stop=lambda: False) -> None:
        """ctx generates from now on: steps wait for its requests (up to gather_s)."""
        with self.cond:
            self.joined[id(ctx)] = should_stop
            self.cond.notify_all()

    def leave(self, ctx) -> None:
        with self.cond:
            self.joined.pop(id(ctx), None)
            self.cond.notify_all()

    def eval(self, ctx, ids, generating: bool = False, all_logits: bool = False) -> np.ndarray:
        """Context.eval through the batch: the logits of the last of ids (all_logits is evaluated apart, under the
        lock)."""
        ids = [int(i) for i in ids]
        if not ids:
            raise ValueError("nothing to evaluate")
        if all_logits or (not generating and getattr(ctx.own_deltas(), "invocation", None) is not None):
            with self.lock:  # (apart: all logits; an activated LoRA's prompt, which may move where it starts)
                return Context.eval(ctx, ids, generating=generating, all_logits=all_logits)
        request = Request(ctx, ids, generating, [1] if len(ids) == 1 else prompt_chunks(len(ids), self.ubatch))
        compiled = compile_ms()
        with self.cond:
            if id(ctx) in self.pending:
                raise RuntimeError("a context evaluates one request at a time")
            self.pending[id(ctx)] = request
            self.cond.notify_all()
            while not request.done:
                if self.leading:
                    self.cond.wait()
                    continue
                self.leading = True
                try:
                    while not request.done:
                        self._step()
                finally:
                    self.leading = False
                    self.cond.notify_all()
        if isinstance(request.result, BaseException):
            raise request.result
        ctx.timings.count(len(ids), 1000.0 * (time.perf_counter() - request.arrived), compile_ms() - compiled,
                          generating)
        return request.result

    def state(self, ctx) -> dict:
        """Where a sequence is: "idle" (not joined), "prompt" (its prompt waits or runs chunk by chunk), "decoding"
        (its next token waits for a step) or "sampling" (its owner has the logits), with its prompt's progress."""
        with self.cond:
            request = self.pending.get(id(ctx))
            joined = id(ctx) in self.joined
        if request is None:
            return {"phase": "sampling" if joined else "idle", "n_prompt_tokens": 0, "n_prompt_tokens_processed": 0}
        return {"phase": "decoding" if request.generating else "prompt",
                "n_prompt_tokens": 0 if request.generating else len(request.ids),
                "n_prompt_tokens_processed": 0 if request.generating else request.position}

    def _step(self) -> None:
        """One step (under self.cond, released while the model runs): wait until every joined sequence has asked
        (or gather_s has passed), evaluate what is asked within the prompt budget, hand the results over."""
        deadline = time.monotonic() + self.gather_s
        while any(key not in self.pending for key in self.joined):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self.cond.wait(left)
        work, budget = [], 0
        for key, request in list(self.pending.items()):
            should_stop = self.joined.get(key)
            if should_stop is not None and should_stop():
                self._finish(request, Aborted())
                continue
            size = request.chunks[0]
            if len(request.ids) > 1:  # a prompt chunk: within the step's budget (the first one always)
                if budget and budget + size > self.ubatch:
                    continue
                budget += size
            work.append((request, request.ids[request.position:request.position + size]))
        if not work:
            return
        self.cond.release()
        # threads.Governor's count, set on this thread; a lone token's step is what it measures and probes with
        threads = governor()
        lone_token = len(work) == 1 and len(work[0][1]) == 1
        n_threads = threads.token_threads() if lone_token else threads.batch_threads()
        try:
            with self.lock:
                started, compiled = time.perf_counter(), compile_ms()
                results = batch.step(self.model, [(request.ctx, ids) for request, ids in work])
                if lone_token and compile_ms() == compiled:
                    threads.token_done(n_threads, time.perf_counter() - started)
        except Exception as e:  # noqa: BLE001 (a bug: every request of the step gets it, the server goes on)
            results = [e] * len(work)
        finally:
            self.cond.acquire()
        self.n_steps += 1
        for (request, ids), result in zip(work, results):
            request.position += len(ids)
            request.chunks.pop(0)
            if isinstance(result, BaseException) or not request.chunks:
                self._finish(request, result)
        self.cond.notify_all()

    def _finish(self, request: Request, result) -> None:
        request.result = result
        request.done = True
        self.pending.pop(id(request.ctx), None)
