"""The -np slots: each holds a Context (its own KV cache) and runs one generation at a time in a worker thread.

Requests beyond the free slots wait in arrival order. The event loop never touches a model: a worker thread runs
`generate()` and hands each token to the request's asyncio queue; the numba kernels release the GIL, so the loop
keeps answering (/health) while tokens are computed. The slots' forward passes go through one
scheduler.Scheduler (continuous batching): every step evaluates each generating slot's next token, reading the
weights once for all of them, beside a chunk of any prompt that is being read (--ubatch-size tokens a step). A
request joins the running batch at the next step and leaves it when it ends or its client hangs up. A request may
carry its own adapter scales: they become run-time deltas of its Context alone, applied to its own column of the
step, so concurrent requests with different adapters share the step and never see each other's.
"""

import asyncio
import collections
import itertools
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from gguf import GGMLQuantizationType as GGMLType

from .. import kernels
from ..errors import LlamaLoraError
from ..generate import Timings, generate
from ..sampling import ProbsReport
from ..scheduler import Aborted, ScheduledContext, Scheduler
from ..tensor import Tensor
from .extra_sampling import RequestSampler
from .schemas import ApiError

MODEL_LOCK = threading.Lock()  # held by each batched step, and by anything else that runs the model (embeddings)
DEFAULT_UBATCH = 128  # prompt tokens a step evaluates beside the others' next tokens
TASK_IDS = itertools.count()


SlotContext = ScheduledContext  # a slot's Context: its forward passes are its part of the slots' batched steps


@dataclass
class Slot:
    id: int
    ctx: SlotContext | None = None
    job: "Job | None" = None  # the request it runs (for /slots)
    lora_key: tuple = ()  # the adapter scales the cached tokens were computed with
    busy: bool = False
    last_used: float = 0.0
    n_served: int = 0


@dataclass
class Job:
    ids: list  # prompt token ids
    req: object  # schemas.CompletionRequest
    scales: tuple  # this request's adapters as ((adapter id, scale), ...), the ones not at 0 (LoraChoice.key)
    adapters: tuple = ()  # their LoraAdapter objects, in the same order (LoraChoice.adapters)
    probs: ProbsReport | None = None  # token probabilities to report with each token, when asked for
    cancel: threading.Event = field(default_factory=threading.Event)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    slot: Slot | None = None
    label: str = ""  # what /metrics counts it under (the adapters it runs)
    id_task: int = field(default_factory=lambda: next(TASK_IDS))
    n_decoded: int = 0  # tokens generated so far (for /slots)


def common_prefix(a: list, b: list) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class SlotPool:
    def __init__(self, loaded, n_parallel: int, n_ctx: int, n_batch: int, adapters: list, scales: list,
                 queue_timeout: float = 600.0, n_ubatch: int = DEFAULT_UBATCH):
        self.loaded = loaded
        self.model, self.vocab = loaded.model, loaded.vocab
        self.slots = [Slot(i) for i in range(n_parallel)]
        self.n_ctx = n_ctx  # per slot
        self.n_batch = n_batch
        self.adapters = adapters  # loaded at user scale 1: a scale s here is s times the adapter's own alpha/r
        self.scales = list(scales)  # the scales every request without its own "lora" uses
        self.queue_timeout = queue_timeout
        self.waiters: collections.deque = collections.deque()
        self.executor = ThreadPoolExecutor(max_workers=n_parallel + 1, thread_name_prefix="slot")
        self.nl_id = newline_id(self.vocab)
        self.deltas: dict = {}  # run-time deltas by scales: requests mostly repeat a few settings
        self.deltas_lock = threading.Lock()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.scheduler = Scheduler(self.model, ubatch=n_ubatch, lock=MODEL_LOCK)

    # scheduling (event loop thread only)

    def n_busy(self) -> int:
        return sum(s.busy for s in self.slots)

    def pick_free(self, job: Job) -> Slot | None:
        """A free slot for the job: the one asked for, else the longest cached prefix computed with the job's
        adapter scales, else the least recently used."""
        free = [s for s in self.slots if not s.busy and job.req.id_slot in (-1, s.id)]
        if not free:
            return None
        return max(free, key=lambda s: (common_prefix(s.ctx.tokens, job.ids) if s.ctx and s.lora_key == job.scales
                                        else 0, -s.last_used))

    async def acquire(self, job: Job) -> Slot:
        if job.req.id_slot >= len(self.slots):
            raise ApiError(400, f"'id_slot' {job.req.id_slot} does not exist ({len(self.slots)} slots)")
        if not self.waiters:
            slot = self.pick_free(job)
            if slot is not None:
                slot.busy = True
                return slot
        future = asyncio.get_running_loop().create_future()
        entry = (future, job)
        self.waiters.append(entry)
        try:
            return await asyncio.wait_for(future, self.queue_timeout)
        except BaseException as e:
            if entry in self.waiters:
                self.waiters.remove(entry)
            # A slot handed over just as the waiter gave up (timeout, client gone) goes back to the pool.
            if future.done() and not future.cancelled():
                self.release(future.result())
            if isinstance(e, asyncio.TimeoutError):
                raise ApiError(503, f"no slot became free within {self.queue_timeout:g} s",
                               "unavailable_error") from None
            raise

    def release(self, slot: Slot) -> None:
        slot.busy = False
        slot.job = None
        slot.last_used = time.monotonic()
        for entry in list(self.waiters):
            future, job = entry
            if future.done():
                self.waiters.remove(entry)
                continue
            if job.req.id_slot in (-1, slot.id):
                self.waiters.remove(entry)
                slot.busy = True
                future.set_result(slot)
                return

    async def submit(self, job: Job) -> None:
        """Wait for a slot (in arrival order), then start the job's worker; its events arrive in job.events."""
        self.loop = asyncio.get_running_loop()
        job.slot = await self.acquire(job)
        job.slot.job = job
        self.executor.submit(self.run_job, job)

    # generation (worker threads)

    def emit(self, job: Job, *event) -> None:
        self.loop.call_soon_threadsafe(job.events.put_nowait, event)

    def context_for(self, slot: Slot) -> SlotContext:
        if slot.ctx is None:
            slot.ctx = SlotContext(self.model, n_ctx=self.n_ctx, n_batch=self.n_batch)
            slot.ctx.scheduler = self.scheduler
        return slot.ctx

    def slot_state(self, slot: Slot) -> dict:
        """A slot's place in the batched steps, for /slots: its phase ("idle", "prompt": its prompt is being read,
        "decoding": its next token waits for a step, "sampling": its worker has the logits), its prompt's progress
        (n_prompt_tokens, n_prompt_tokens_processed) and the tokens its cache holds (n_past)."""
        phase = self.scheduler.state(slot.ctx) if slot.ctx is not None else self.scheduler.state(None)
        return {**phase, "n_past": len(slot.ctx.tokens) if slot.ctx is not None else 0}

    def deltas_for(self, key: tuple, adapters: tuple = ()) -> dict:
        """Run-time deltas for adapters at the scales in key ((id, scale), ...); ids are never reused, so a
        cached entry stays right for as long as it lives."""
        if not key:
            return {}
        with self.deltas_lock:
            if key not in self.deltas:
                if len(self.deltas) >= 8:
                    self.deltas.pop(next(iter(self.deltas)))
                self.deltas[key] = self.model.lora_deltas(list(adapters), [scale for _, scale in key])
            return self.deltas[key]

    def forget_adapter(self, adapter_id: int) -> None:
        """Drop the cached deltas of an unloaded adapter (requests running with it keep their own)."""
        with self.deltas_lock:
            for key in [k for k in self.deltas if any(i == adapter_id for i, _ in k)]:
                del self.deltas[key]

    def run_job(self, job: Job) -> None:
        slot = job.slot
        try:
            self.generate_into(job, slot)
        except Aborted:  # the client hung up while its tokens waited for a step: nobody to tell
            pass
        except ApiError as e:
            self.emit(job, "error", e)
        except LlamaLoraError as e:  # e.g. a grammar that allows no token of this vocabulary at some point
            self.emit(job, "error", ApiError(400, str(e)))
        except Exception as e:  # a bug must not kill the slot: the request gets a 500, the server goes on
            self.emit(job, "error", ApiError(500, f"generation failed: {type(e).__name__}: {e}", "server_error"))
            if slot.ctx is not None:
                slot.ctx.reset()
        finally:
            slot.n_served += 1
            self.loop.call_soon_threadsafe(self.release, slot)

    def generate_into(self, job: Job, slot: Slot) -> None:
        req, ids = job.req, job.ids
        ctx = self.context_for(slot)
        n_cached = 0
        if req.cache_prompt and slot.lora_key == job.scales:
            n_cached = min(common_prefix(ctx.tokens, ids), len(ids) - 1)
        ctx.truncate(n_cached)
        slot.lora_key = job.scales
        ctx.lora = self.deltas_for(job.scales, job.adapters)
        ctx.timings = Timings()
        # n_predict -1 runs until the context is full; a bounded request shifts the context (keeping n_keep).
        ctx.context_shift = req.n_predict >= 0
        ctx.n_keep = len(ids) if req.n_keep < 0 else min(req.n_keep, len(ids))
        sampler = RequestSampler(req, self.vocab.n_vocab, self.nl_id)
        stops = tuple(req.stop)
        grammar = req.parsed_grammar.start() if req.parsed_grammar is not None else None
        gen = generate(ctx, self.vocab, sampler, ids[n_cached:], n_predict=req.n_predict, stop=stops,
                       ignore_eos=req.ignore_eos, should_stop=job.cancel.is_set, grammar=grammar, probs=job.probs)
        text, sent, n_tokens = "", 0, 0
        started = time.perf_counter()
        reason = "limit"
        self.scheduler.join(ctx, job.cancel.is_set)
        try:
            while True:
                token, piece = next(gen)
                text += piece
                if token is None:  # the end of an incomplete character, flushed after the last token
                    continue
                n_tokens += 1
                job.n_decoded = n_tokens
                ready = held_back_start(text, sent, stops)
                self.emit(job, "token", token, text[sent:ready], job.probs.tokens[-1] if job.probs else None)
                sent = ready
        except StopIteration as stop:
            reason = stop.value or "limit"
        finally:
            self.scheduler.leave(ctx)
        stopping_word = ""
        if reason == "stop":
            cut, stopping_word = first_stop(text, stops)
            text = text[:cut]
        tail = text[sent:] if len(text) > sent else ""
        t = ctx.timings
        self.emit(job, "done", {
            "content": text, "tail": tail, "reason": reason, "stopping_word": stopping_word,
            "tokens_predicted": n_tokens, "tokens_evaluated": len(ids), "tokens_cached": n_cached,
            "seed": sampler.seed, "id_slot": slot.id, "timings": timings_dict(t, started),
        })


def held_back_start(text: str, sent: int, stops: tuple) -> int:
    """Where the text that may still become a stop string begins: text before it can be sent now."""
    ready = len(text)
    for stop in stops:
        index = text.find(stop, sent)
        if index >= 0:
            ready = min(ready, index)
            continue
        for k in range(min(len(stop) - 1, len(text) - sent), 0, -1):
            if text.endswith(stop[:k]):
                ready = min(ready, len(text) - k)
                break
    return max(ready, sent)


def first_stop(text: str, stops: tuple) -> tuple[int, str]:
    best = (len(text), "")
    for stop in stops:
        index = text.find(stop)
        if 0 <= index < best[0]:
            best = (index, stop)
    return best


def timings_dict(t: Timings, started: float) -> dict:
    def per(ms, n):
        return (ms / n if n else 0.0), (1000.0 * n / ms if ms > 0 else 0.0)

    p_token, p_second = per(t.prompt_ms, t.prompt_tokens)
    g_token, g_second = per(t.gen_ms, t.gen_tokens)
    return {"prompt_n": t.prompt_tokens, "prompt_ms": t.prompt_ms, "prompt_per_token_ms": p_token,
            "prompt_per_second": p_second, "predicted_n": t.gen_tokens, "predicted_ms": t.gen_ms,
            "predicted_per_token_ms": g_token, "predicted_per_second": g_second,
            "total_ms": 1000.0 * (time.perf_counter() - started)}


def newline_id(vocab) -> int | None:
    """The token of a lone newline (penalize_nl false leaves its logit alone)."""
    for text in ("\n", "<0x0A>", "Ċ"):
        if text in vocab.token_to_id:
            return vocab.token_to_id[text]
    return None


def embedding(model, ids: list, deltas: dict) -> list[float]:
    """Mean of the final (normed) hidden states over the tokens, L2-normalised, as llama.cpp's embedding example
    pools by default. The hidden states come out of the unchanged forward pass by projecting with an identity
    matrix instead of the vocabulary head."""
    import copy

    dim = model.config.dim
    eye = np.eye(dim, dtype=np.float32)
    head = kernels.prepare(Tensor("embedding.identity", GGMLType.F32, (dim, dim), eye.view(np.uint8).reshape(dim, -1)))
    hidden_model = copy.copy(model)
    hidden_model.output = head
    cache = model.new_cache(len(ids))
    with MODEL_LOCK:
        hidden = hidden_model.forward(ids, cache, all_logits=True, lora=deltas)
    pooled = hidden.astype(np.float64).mean(axis=0)
    norm = math.sqrt(float(pooled @ pooled))
    return (pooled / norm if norm > 0 else pooled).astype(np.float32).tolist()
