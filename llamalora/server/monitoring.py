"""Operations: GET /metrics (Prometheus text, llama.cpp's `llamacpp:` names plus `llamalora:` counts per
adapter) with --metrics, and GET /slots (llama.cpp's per-slot state) unless --no-slots.

The counters are kept on the event loop thread: a request is counted when its "done" event arrives there
(app.job_events), so the worker threads share nothing with them.
"""

from dataclasses import dataclass, field

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse

from .schemas import ApiError


@dataclass
class Counts:
    requests: int = 0
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    predicted_tokens: int = 0
    predicted_seconds: float = 0.0


@dataclass
class Metrics:
    total: Counts = field(default_factory=Counts)
    by_adapter: dict = field(default_factory=dict)  # label → Counts
    n_tokens_max: int = 0  # the most tokens a slot's context has held

    def record(self, label: str, info: dict) -> None:
        """One finished request ("done" info: its timings and token counts)."""
        t = info["timings"]
        for counts in (self.total, self.by_adapter.setdefault(label, Counts())):
            counts.requests += 1
            counts.prompt_tokens += t["prompt_n"]
            counts.prompt_seconds += t["prompt_ms"] / 1000.0
            counts.predicted_tokens += info["tokens_predicted"]
            counts.predicted_seconds += t["predicted_ms"] / 1000.0
        self.n_tokens_max = max(self.n_tokens_max, info["tokens_evaluated"] + info["tokens_predicted"])


def job_label(registry, key: tuple) -> str:
    """What a request runs: "base", or its adapters' names (with their scales) joined by '+'."""
    names = {e.id: e.name for e in registry.entries}
    return "+".join(f"{names.get(i, f'#{i}')}@{scale:g}" for i, scale in key) or "base"


def rate(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else 0.0


def escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def prometheus_text(metrics: Metrics, pool) -> str:
    t = metrics.total
    busy = pool.n_busy()
    lines = []

    def metric(name, kind, help_text, samples):
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            label_text = "{" + ",".join(f'{k}="{escape(v)}"' for k, v in labels.items()) + "}" if labels else ""
            lines.append(f"{name}{label_text} {value:g}" if isinstance(value, float) else f"{name}{label_text} {value}")

    metric("llamacpp:prompt_tokens_total", "counter", "Number of prompt tokens processed.", [({}, t.prompt_tokens)])
    metric("llamacpp:prompt_seconds_total", "counter", "Prompt process time.", [({}, t.prompt_seconds)])
    metric("llamacpp:tokens_predicted_total", "counter", "Number of generation tokens processed.",
           [({}, t.predicted_tokens)])
    metric("llamacpp:tokens_predicted_seconds_total", "counter", "Predict process time.", [({}, t.predicted_seconds)])
    metric("llamacpp:prompt_tokens_seconds", "gauge", "Average prompt throughput in tokens/s.",
           [({}, rate(t.prompt_tokens, t.prompt_seconds))])
    metric("llamacpp:predicted_tokens_seconds", "gauge", "Average generation throughput in tokens/s.",
           [({}, rate(t.predicted_tokens, t.predicted_seconds))])
    metric("llamacpp:requests_processing", "gauge", "Number of requests processing.", [({}, busy)])
    metric("llamacpp:requests_deferred", "gauge", "Number of requests deferred.", [({}, len(pool.waiters))])
    metric("llamacpp:n_tokens_max", "counter", "High watermark of the context size observed.",
           [({}, metrics.n_tokens_max)])
    metric("llamalora:requests_total", "counter", "Requests finished, by the adapters they ran with.",
           [({"adapter": k}, c.requests) for k, c in sorted(metrics.by_adapter.items())])
    metric("llamalora:prompt_tokens_total", "counter", "Prompt tokens processed, by adapters.",
           [({"adapter": k}, c.prompt_tokens) for k, c in sorted(metrics.by_adapter.items())])
    metric("llamalora:tokens_predicted_total", "counter", "Tokens generated, by adapters.",
           [({"adapter": k}, c.predicted_tokens) for k, c in sorted(metrics.by_adapter.items())])
    metric("llamalora:predicted_tokens_seconds", "gauge", "Average generation throughput in tokens/s, by adapters.",
           [({"adapter": k}, rate(c.predicted_tokens, c.predicted_seconds))
            for k, c in sorted(metrics.by_adapter.items())])
    metric("llamalora:slots", "gauge", "Slots (-np).", [({}, len(pool.slots))])
    metric("llamalora:slots_busy", "gauge", "Slots running a request.", [({}, busy)])
    return "\n".join(lines) + "\n"


async def metrics_route(request: Request):
    state = request.app.state.server
    if not state.options.metrics:
        raise ApiError(501, "this server does not serve metrics: start it with --metrics", "not_supported_error")
    return PlainTextResponse(prometheus_text(state.metrics, state.pool),
                             media_type="text/plain; version=0.0.4; charset=utf-8")


def slot_state(state, slot) -> dict:
    """One slot as llama.cpp's /slots shows it."""
    job = slot.job
    req = job.req if job is not None else None
    settings = req.settings() if req is not None else {}
    params = {k: settings[k] for k in (
        "n_predict", "seed", "temperature", "top_k", "top_p", "min_p", "typical_p", "repeat_last_n",
        "repeat_penalty", "presence_penalty", "frequency_penalty", "mirostat", "mirostat_tau", "mirostat_eta",
        "stop", "n_keep", "ignore_eos", "stream", "n_probs", "post_sampling_probs", "grammar") if k in settings}
    if job is not None:
        params["lora"] = [{"id": i, "scale": scale} for i, scale in job.scales]
    n_decoded = job.n_decoded if job is not None else 0
    n_predict = req.n_predict if req is not None else -1
    return {
        "id": slot.id, "id_task": job.id_task if job is not None else -1, "n_ctx": state.pool.n_ctx,
        "speculative": False, "is_processing": job is not None, "params": params,
        "next_token": {"has_next_token": job is not None, "n_remain": n_predict - n_decoded if n_predict >= 0 else -1,
                       "n_decoded": n_decoded},
        "n_cached": len(slot.ctx.tokens) if slot.ctx is not None else 0, "n_served": slot.n_served,
        "adapters": job.label if job is not None else "",
        **state.pool.slot_state(slot),  # its place in the batched steps: phase, prompt progress
    }


async def slots_route(request: Request):
    state = request.app.state.server
    if not state.options.slots:
        raise ApiError(501, "this server does not show its slots: it was started with --no-slots",
                       "not_supported_error")
    pool = state.pool
    if request.query_params.get("fail_on_no_slot") in ("1", "true") and pool.n_busy() == len(pool.slots):
        raise ApiError(503, "no slot available", "unavailable_error")
    return JSONResponse([slot_state(state, s) for s in pool.slots])
