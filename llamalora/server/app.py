"""The Starlette application: llama.cpp's server routes (/completion, /tokenize, /detokenize, /embedding,
/health, /props, /lora-adapters), the OpenAI-compatible /v1 routes and the web page."""

import asyncio
import copy
import json
import os
import time
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..errors import LlamaLoraError
from . import schemas
from .adapters import AdapterEntry, AdapterRegistry, check_new_name, default_name
from .logprobs import llama_item, probs_report
from .monitoring import Metrics, job_label, metrics_route, slots_route
from .schemas import ApiError, CompletionRequest
from .slots import Job, SlotPool, embedding

STATIC_DIR = os.path.join(os.path.dirname(__file__), "static")
PUBLIC_PATHS = {"/health", "/v1/health", "/v1/models", "/models"}
# Paths (and what lies below them) that need the API key; the web page's files (/completion.js) do not.
API_PATHS = ("/completion", "/completions", "/tokenize", "/detokenize", "/embedding", "/embeddings", "/props",
             "/lora-adapters", "/slots", "/v1", "/infill", "/chat", "/models", "/apply-template", "/metrics")


def is_api_path(path: str) -> bool:
    return any(path == p or path.startswith(p + "/") for p in API_PATHS)


@dataclass
class ServerOptions:
    n_ctx: int = 2048  # for all slots together, as llama.cpp's -c
    n_batch: int = 512
    n_ubatch: int = 128  # prompt tokens a batched step evaluates beside the other slots' next tokens
    n_parallel: int = 1
    embedding: bool = False
    alias: str | None = None
    api_key: str | None = None
    static_dir: str | None = None
    timeout: float = 600.0
    adapter_paths: list = field(default_factory=list)
    scales: list = field(default_factory=list)
    adapters_merged: bool = False  # merged into the weights (--lora-base, --lora-mode merge): scales are fixed
    max_body: int = 4 * 2**20  # request bodies beyond this many bytes are refused (413)
    adapter_names: list | None = None  # default: each named after its folder or file
    lora_admin: bool = False  # /lora-adapters/load and /unload without an API key
    metrics: bool = False  # GET /metrics (llama.cpp's --metrics)
    slots: bool = True  # GET /slots (llama.cpp's --slots / --no-slots)


@dataclass
class ServerState:
    loaded: object
    options: ServerOptions
    pool: SlotPool
    alias: str
    plain_vocab: object  # the vocabulary without the leading-space rule (/tokenize adds none)
    registry: AdapterRegistry
    metrics: Metrics = field(default_factory=Metrics)
    started: float = field(default_factory=time.time)

    @property
    def vocab(self):
        return self.loaded.vocab

    def tokenize_text(self, text: str) -> list[int]:
        return self.vocab.tokenize(text, add_bos=False, parse_special=True)

    def parse_completion(self, body: dict, **kw) -> CompletionRequest:
        return schemas.parse_completion(body, self.vocab.n_vocab, self.pool.n_ctx, self.registry.ids(),
                                        self.tokenize_text, **kw)

    def prompt_ids(self, parts: list) -> list[int]:
        """BOS (when the model adds one), then each string tokenized (special tokens parsed) and each id as is."""
        vocab = self.vocab
        ids = [vocab.bos_id] if vocab.add_bos and vocab.bos_id is not None else []
        for part in parts:
            ids += [part] if isinstance(part, int) else self.tokenize_text(part)
        return ids

    def make_job(self, req: CompletionRequest, ids: list) -> Job:
        n_ctx = self.pool.n_ctx
        if not ids:
            raise ApiError(400, "the prompt is empty")
        if len(ids) > n_ctx - 4:
            raise ApiError(400, f"the prompt is {len(ids)} tokens, beyond the context of {n_ctx} tokens per slot "
                                f"(at most {n_ctx - 4}); shorten it or start the server with a larger -c")
        choice = self.registry.choose(req.model, req.lora, self.alias)
        return Job(ids=ids, req=req, scales=choice.key, adapters=choice.adapters, probs=probs_report(req),
                   label=job_label(self.registry, choice.key))


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


async def read_body(request: Request, allow_array: bool = False):
    """The JSON body, refused with 413 beyond --max-body bytes before it is read whole (a declared length is
    checked first; a chunked body is counted as it arrives)."""
    limit = state_of(request).options.max_body
    declared = request.headers.get("content-length", "")
    too_large = ApiError(413, f"request body is larger than {limit} bytes (--max-body)", "request_too_large")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return schemas.parse_json(b"".join(chunks), allow_array=allow_array)


def state_of(request: Request) -> ServerState:
    return request.app.state.server


# running a job


async def job_events(state: ServerState, job: Job):
    """The job's events, from waiting for a slot to "done" or "error"; leaving early cancels the generation,
    which frees the slot at the next token."""
    try:
        await state.pool.submit(job)
        while True:
            event = await job.events.get()
            if event[0] == "done":
                state.metrics.record(job.label, event[1])
            yield event
            if event[0] in ("done", "error"):
                return
    finally:
        job.cancel.set()


async def run_to_end(state: ServerState, job: Job, request: Request):
    """Every event of a non-streamed job; returns (token ids, the "done" info). A client that hangs up cancels it."""

    async def collect():
        tokens = []
        async for event in job_events(state, job):
            if event[0] == "token":
                tokens.append(event[1])
            elif event[0] == "error":
                raise event[1]
            else:
                return tokens, event[1]

    async def hung_up():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work, watch = asyncio.ensure_future(collect()), asyncio.ensure_future(hung_up())
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
    if work.cancelled() or not work.done():
        raise ApiError(499, "client closed the request")
    return work.result()


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def final_object(state: ServerState, req: CompletionRequest, info: dict, tokens: list, prompt) -> dict:
    reason = info["reason"]
    stop_type = {"eos": "eos", "stop": "word", "limit": "limit", "context": "limit"}.get(reason, "none")
    return {
        "content": info["content"], "tokens": tokens, "id_slot": info["id_slot"], "stop": True,
        "model": state.alias, "tokens_predicted": info["tokens_predicted"],
        "tokens_evaluated": info["tokens_evaluated"], "tokens_cached": info["tokens_cached"],
        "generation_settings": {**req.settings(), "seed": info["seed"], "n_ctx": state.pool.n_ctx,
                                "model": state.alias},
        "prompt": prompt, "truncated": False,
        "stopped_eos": reason == "eos", "stopped_word": reason == "stop", "stopped_limit": reason in ("limit", "context"),
        "stopping_word": info["stopping_word"], "stop_type": stop_type, "timings": info["timings"],
    }


def prompt_text(parts: list):
    return parts[0] if len(parts) == 1 and isinstance(parts[0], str) else parts


# routes


async def completion(request: Request):
    state = state_of(request)
    body = await read_body(request)
    req = state.parse_completion(body)
    job = state.make_job(req, state.prompt_ids(req.parts))
    prompt = prompt_text(req.parts)
    if not req.stream:
        tokens, info = await run_to_end(state, job, request)
        final = final_object(state, req, info, tokens, prompt)
        if job.probs is not None:
            final["completion_probabilities"] = [llama_item(state.vocab, tp) for tp in job.probs.tokens]
        return JSONResponse(final)

    async def stream():
        tokens = []
        async for event in job_events(state, job):
            if event[0] == "token":
                tokens.append(event[1])
                out = {"content": event[2], "tokens": [event[1]], "stop": False, "id_slot": job.slot.id}
                if event[3] is not None:
                    out["completion_probabilities"] = [llama_item(state.vocab, event[3])]
                yield sse(out)
            elif event[0] == "error":
                yield sse(event[1].body())
            else:
                final = final_object(state, req, event[1], tokens, prompt)
                final["content"] = event[1]["tail"]
                yield sse(final)

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def tokenize(request: Request):
    state = state_of(request)
    body = await read_body(request)
    content = schemas.get_str(body, "content", required=True)
    add_special = schemas.get_bool(body, "add_special", False)
    with_pieces = schemas.get_bool(body, "with_pieces", False)
    ids = state.plain_vocab.tokenize(content, add_bos=add_special, parse_special=True)
    if with_pieces:
        return JSONResponse({"tokens": [{"id": i, "piece": state.vocab.token_bytes(i).decode("utf-8", "replace")}
                                        for i in ids]})
    return JSONResponse({"tokens": ids})


async def detokenize(request: Request):
    state = state_of(request)
    body = await read_body(request)
    tokens = body.get("tokens", [])
    if not isinstance(tokens, list):
        raise ApiError(400, "'tokens' must be an array of token ids")
    ids = [schemas.check_token_id(t, state.vocab.n_vocab, f"'tokens'[{i}]") for i, t in enumerate(tokens)]
    return JSONResponse({"content": state.vocab.detokenize(ids)})


async def embedding_route(request: Request):
    state = state_of(request)
    if not state.options.embedding:
        raise ApiError(501, "this server does not compute embeddings: start it with --embedding", "not_supported_error")
    body = await read_body(request)
    content = schemas.get_str(body, "content", None)
    if content is None:
        content = schemas.get_str(body, "input", required=True)
    return JSONResponse({"embedding": await embed_text(state, content)})


async def embed_text(state: ServerState, content: str) -> list[float]:
    ids = state.prompt_ids([content])
    if not ids:
        raise ApiError(400, "'content' is empty")
    if len(ids) > state.pool.n_ctx:
        raise ApiError(400, f"'content' is {len(ids)} tokens, beyond the context of {state.pool.n_ctx} tokens per slot")
    model = state.loaded.model
    choice = state.registry.choose(None, None, state.alias)
    deltas = state.pool.deltas_for(choice.key, choice.adapters)
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(state.pool.executor, embedding, model, ids, deltas)


async def health(request: Request):
    pool = state_of(request).pool
    busy = pool.n_busy()
    return JSONResponse({"status": "ok", "slots_idle": len(pool.slots) - busy, "slots_processing": busy,
                         "queued": len(pool.waiters)})


async def props(request: Request):
    state = state_of(request)
    defaults = CompletionRequest(parts=[]).settings()
    return JSONResponse({
        "default_generation_settings": {**defaults, "n_ctx": state.pool.n_ctx, "model": state.alias},
        "total_slots": len(state.pool.slots), "chat_template": state.vocab.chat_template or "",
        "model_path": state.loaded.file.path, "n_ctx": state.options.n_ctx, "embedding": state.options.embedding,
    })


async def lora_adapters(request: Request):
    state = state_of(request)
    registry = state.registry
    if request.method == "GET":
        return JSONResponse(registry.listing())
    scales = schemas.parse_adapter_scales(await read_body(request, allow_array=True), registry.ids())
    if registry.merged:
        raise ApiError(400, "the adapters are merged into the weights (--lora-base or --lora-mode merge): "
                            "their scales cannot change")
    registry.set_global_scales(scales)
    return JSONResponse({"success": True, "adapters": registry.listing()})


def check_lora_admin(state: ServerState) -> None:
    if not (state.options.lora_admin or state.options.api_key):
        raise ApiError(403, "loading and unloading adapters is off: start the server with --lora-admin "
                            "(or with --api-key, which then guards it)", "permission_error")
    if state.registry.merged:
        raise ApiError(400, "the adapters are merged into the weights (--lora-base or --lora-mode merge): "
                            "none can be loaded or unloaded while the server runs")


async def load_adapter_into(state: ServerState, name, path, scale) -> dict:
    """Read and check an adapter as at start-up (in a worker thread), then serve it under name."""
    from ..loader import load_adapters

    check_lora_admin(state)
    name = check_new_name(name, state.alias)
    if not isinstance(path, str) or not path:
        raise ApiError(400, "'path' must be the adapter's folder or file")
    if state.registry.by_name(name) is not None:
        raise ApiError(400, f"an adapter named '{name}' is already loaded")
    scale = schemas.get_float({"scale": scale}, "scale", 1.0)
    adapter, = await asyncio.get_running_loop().run_in_executor(None, load_adapters, state.loaded.file,
                                                                 [(path, 1.0)])
    entry = state.registry.add(name, path, adapter, scale)
    return {"id": entry.id, "name": entry.name, "path": entry.path, "scale": entry.scale}


async def unload_adapter(state: ServerState, name) -> dict:
    check_lora_admin(state)
    if not isinstance(name, str):
        raise ApiError(400, "'name' must be the name of a loaded adapter")
    entry = state.registry.remove(name)
    state.pool.forget_adapter(entry.id)
    return {"id": entry.id, "name": entry.name, "path": entry.path}


async def lora_load(request: Request):
    """POST /lora-adapters/load {"name", "path", "scale"?}."""
    state = state_of(request)
    body = await read_body(request)
    adapter = await load_adapter_into(state, body.get("name"), body.get("path"), body.get("scale"))
    return JSONResponse({"success": True, "adapter": adapter, "adapters": state.registry.listing()})


async def lora_unload(request: Request):
    """POST /lora-adapters/unload {"name"}: requests already accepted keep running with it."""
    state = state_of(request)
    body = await read_body(request)
    adapter = await unload_adapter(state, body.get("name"))
    return JSONResponse({"success": True, "adapter": adapter, "adapters": state.registry.listing()})


async def vllm_load(request: Request):
    """vLLM's POST /v1/load_lora_adapter {"lora_name", "lora_path"}, answered as vLLM answers."""
    state = state_of(request)
    body = await read_body(request)
    adapter = await load_adapter_into(state, body.get("lora_name"), body.get("lora_path"), None)
    return PlainTextResponse(f"Success: LoRA adapter '{adapter['name']}' added successfully.")


async def vllm_unload(request: Request):
    state = state_of(request)
    body = await read_body(request)
    adapter = await unload_adapter(state, body.get("lora_name"))
    return PlainTextResponse(f"Success: LoRA adapter '{adapter['name']}' removed successfully.")


# errors and the API key


async def api_error_handler(request: Request, e: ApiError):
    return error_response(e)


async def input_error_handler(request: Request, e: LlamaLoraError):
    return error_response(ApiError(400, str(e)))


async def http_error_handler(request: Request, e: HTTPException):
    kinds = {404: "not_found_error", 405: "invalid_request_error"}
    message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
    return error_response(ApiError(e.status_code, message.get(e.status_code, str(e.detail)),
                                   kinds.get(e.status_code, "invalid_request_error")))


class ApiKeyMiddleware:
    """With --api-key, every API route but the public ones needs `Authorization: Bearer KEY` (or X-Api-Key);
    the web page itself stays readable and sends the key the user types."""

    def __init__(self, app, api_key: str | None):
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.api_key:
            return await self.app(scope, receive, send)
        path = scope["path"]
        if path in PUBLIC_PATHS or not is_api_path(path) or scope["method"] == "OPTIONS":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        given = headers.get("authorization", "")
        given = given[7:].strip() if given.lower().startswith("bearer ") else headers.get("x-api-key", "")
        if given != self.api_key:
            reason = "missing API key" if not given else "invalid API key"
            response = error_response(ApiError(401, reason, "authentication_error"))
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)


def create_app(loaded, options: ServerOptions, adapters: list) -> Starlette:
    """The application for a loaded model. adapters: loaded at user scale 1 (run-time deltas), or [] when merged."""
    from .openai import openai_routes

    n_slot_ctx = max(options.n_ctx // max(options.n_parallel, 1), 8)
    pool = SlotPool(loaded, options.n_parallel, n_slot_ctx, options.n_batch, adapters, options.scales,
                    queue_timeout=options.timeout, n_ubatch=options.n_ubatch)
    plain_vocab = copy.copy(loaded.vocab)
    plain_vocab.add_space_prefix = False
    alias = options.alias or os.path.basename(loaded.file.path)
    names = options.adapter_names or [default_name(p) for p in options.adapter_paths]
    objects = adapters or [None] * len(options.adapter_paths)  # merged: nothing to apply at run time
    # Named in a request, an adapter runs at its start-up scale, or at 1 when it starts switched off (scale 0).
    registry = AdapterRegistry([AdapterEntry(i, name, path, adapter, scale or 1.0, scale)
                                for i, (name, path, adapter, scale)
                                in enumerate(zip(names, options.adapter_paths, objects, options.scales))],
                               merged=options.adapters_merged)
    state = ServerState(loaded, options, pool, alias, plain_vocab, registry)
    static_dir = options.static_dir or STATIC_DIR
    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/props", props, methods=["GET"]),
        Route("/completion", completion, methods=["POST"]),
        Route("/completions", completion, methods=["POST"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/detokenize", detokenize, methods=["POST"]),
        Route("/embedding", embedding_route, methods=["POST"]),
        Route("/embeddings", embedding_route, methods=["POST"]),
        Route("/lora-adapters", lora_adapters, methods=["GET", "POST"]),
        Route("/metrics", metrics_route, methods=["GET"]),
        Route("/slots", slots_route, methods=["GET"]),
        Route("/lora-adapters/load", lora_load, methods=["POST"]),
        Route("/lora-adapters/unload", lora_unload, methods=["POST"]),
        Route("/v1/load_lora_adapter", vllm_load, methods=["POST"]),
        Route("/v1/unload_lora_adapter", vllm_unload, methods=["POST"]),
        *openai_routes(),
        Mount("/", StaticFiles(directory=static_dir, html=True), name="static"),
    ]
    app = Starlette(
        routes=routes,
        middleware=[Middleware(ApiKeyMiddleware, api_key=options.api_key)],
        exception_handlers={ApiError: api_error_handler, LlamaLoraError: input_error_handler,
                            HTTPException: http_error_handler},
    )
    app.state.server = state
    return app

