"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions (the model's own chat template)
and /v1/embeddings, streamed as OpenAI streams them (chunks, then `data: [DONE]`), so that the `openai` client
works unchanged with base_url pointing here. llama.cpp's own sampling fields (top_k, min_p, mirostat, lora…)
are accepted in the same bodies."""

import time
import uuid

from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from ..chat import render_chat
from . import schemas
from .app import embed_text, health, job_events, read_body, run_to_end, sse, state_of
from .schemas import ApiError


def finish_reason(reason: str) -> str:
    return "length" if reason in ("limit", "context") else "stop"


def usage(info: dict) -> dict:
    return {"prompt_tokens": info["tokens_evaluated"], "completion_tokens": info["tokens_predicted"],
            "total_tokens": info["tokens_evaluated"] + info["tokens_predicted"]}


def check_n(body: dict) -> None:
    if schemas.get_int(body, "n", 1) != 1:
        raise ApiError(400, "'n': only one choice per request is supported (n = 1)")


def message_text(content, i: int) -> str:
    """A message's content: a string, or OpenAI's array of parts of which the text ones are joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"'messages'[{i}].content: only text parts are supported")
            texts.append(part["text"])
        return "".join(texts)
    if content is None:
        return ""
    raise ApiError(400, f"'messages'[{i}].content must be a string or an array of text parts")


def chat_prompt(state, body: dict) -> str:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty array of {\"role\", \"content\"}")
    plain = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"'messages'[{i}] must be an object with a string role and a content")
        plain.append({"role": m["role"], "content": message_text(m.get("content"), i)})
    vocab = state.vocab

    def text(i):
        return vocab.tokens[i] if i is not None and 0 <= i < vocab.n_vocab else ""

    return render_chat(vocab.chat_template, plain, add_generation_prompt=True, bos_token=text(vocab.bos_id),
                       eos_token=text(vocab.eos_id))


async def openai_generation(request: Request, chat: bool):
    state = state_of(request)
    body = await read_body(request)
    check_n(body)
    schema = schemas.schema_of_response_format(body)
    if schema is not None:
        if body.get("grammar") or body.get("json_schema") is not None:
            raise ApiError(400, "give either 'response_format' or 'grammar' / 'json_schema', not both")
        body = {**body, "json_schema": schema}
    if chat:
        prompt = chat_prompt(state, body)
        req = state.parse_completion({**body, "prompt": prompt}, n_predict_name="max_tokens", n_predict_default=-1)
        if "max_completion_tokens" in body:
            req.n_predict = schemas.get_int(body, "max_completion_tokens", -1, low=-1)
    else:
        req = state.parse_completion(body, n_predict_name="max_tokens", n_predict_default=16)
    job = state.make_job(req, state.prompt_ids(req.parts))
    created = int(time.time())
    ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    kind = "chat.completion" if chat else "text_completion"
    base = {"id": ident, "created": created, "model": state.alias, "system_fingerprint": "llamalora"}

    if not req.stream:
        _, info = await run_to_end(state, job, request)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": info["content"]},
                      "logprobs": None, "finish_reason": finish_reason(info["reason"])}
        else:
            choice = {"index": 0, "text": info["content"], "logprobs": None,
                      "finish_reason": finish_reason(info["reason"])}
        return JSONResponse({**base, "object": kind, "choices": [choice], "usage": usage(info)})

    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    chunk_kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str | None, reason=None, role=False):
        if chat:
            delta = {} if text is None else {"content": text}
            if role:
                delta = {"role": "assistant", "content": ""}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
        return sse({**base, "object": chunk_kind, "choices": [choice]})

    async def stream():
        if chat:
            yield chunk(None, role=True)
        async for event in job_events(state, job):
            if event[0] == "token":
                if event[2]:
                    yield chunk(event[2])
            elif event[0] == "error":
                yield sse(event[1].body())
                return
            else:
                info = event[1]
                if info["tail"]:
                    yield chunk(info["tail"])
                yield chunk(None, reason=finish_reason(info["reason"]))
                if include_usage:
                    yield sse({**base, "object": chunk_kind, "choices": [], "usage": usage(info)})
        yield "data: [DONE]\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def completions(request: Request):
    return await openai_generation(request, chat=False)


async def chat_completions(request: Request):
    return await openai_generation(request, chat=True)


async def models(request: Request):
    state = state_of(request)
    return JSONResponse({"object": "list", "data": [{
        "id": state.alias, "object": "model", "created": int(state.started), "owned_by": "llamalora",
        "meta": {"n_vocab": state.vocab.n_vocab, "n_ctx_train": state.loaded.model.config.n_ctx_train,
                 "n_embd": state.loaded.model.config.dim},
    }]})


async def embeddings(request: Request):
    state = state_of(request)
    if not state.options.embedding:
        raise ApiError(501, "this server does not compute embeddings: start it with --embedding", "not_supported_error")
    body = await read_body(request)
    inputs = body.get("input")
    if isinstance(inputs, str):
        inputs = [inputs]
    if not isinstance(inputs, list) or not inputs or not all(isinstance(s, str) for s in inputs):
        raise ApiError(400, "'input' must be a string or a non-empty array of strings")
    data, n_tokens = [], 0
    for i, text in enumerate(inputs):
        data.append({"object": "embedding", "index": i, "embedding": await embed_text(state, text)})
        n_tokens += len(state.prompt_ids([text]))
    return JSONResponse({"object": "list", "data": data, "model": state.alias,
                         "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}})


def openai_routes() -> list:
    return [
        Route("/v1/models", models, methods=["GET"]),
        Route("/models", models, methods=["GET"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/embeddings", embeddings, methods=["POST"]),
        Route("/v1/health", health, methods=["GET"]),
    ]
