"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions (the model's own chat template)
and /v1/embeddings, streamed as OpenAI streams them (chunks, then `data: [DONE]`), so that the `openai` client
works unchanged with base_url pointing here. llama.cpp's own sampling fields (top_k, min_p, mirostat, lora…)
are accepted in the same bodies."""

import time
import uuid

from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from ..chat import render_chat, template_takes_tools
from . import schemas
from .app import embed_text, health, job_events, read_body, run_to_end, sse, state_of
from .logprobs import chat_logprobs, completions_logprobs, openai_chat_fields, openai_completions_fields
from .schemas import ApiError
from .tools import (ToolCallParser, ToolSetup, call_grammar, check_tool_calls, parse_reply, parse_tools,
                    template_messages)


def finish_reason(reason: str, called: bool = False) -> str:
    if reason in ("limit", "context"):
        return "length"
    return "tool_calls" if called else "stop"


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


def chat_messages(body: dict) -> list:
    """The messages checked, in the shape chat templates take: content as text, an assistant turn's
    tool_calls with their arguments as objects, a tool result's tool_call_id and name kept."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty array of {\"role\", \"content\"}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"'messages'[{i}] must be an object with a string role and a content")
        message = {"role": m["role"], "content": message_text(m.get("content"), i)}
        if m["role"] == "assistant" and m.get("tool_calls"):
            message["tool_calls"] = check_tool_calls(m["tool_calls"], i)
        if m["role"] == "tool":
            for key in ("tool_call_id", "name"):
                if isinstance(m.get(key), str):
                    message[key] = m[key]
        out.append(message)
    return out


def chat_prompt(state, body: dict, setup: ToolSetup | None = None) -> str:
    vocab = state.vocab
    template = vocab.chat_template
    takes_tools = template_takes_tools(template)
    messages = template_messages(chat_messages(body), setup, takes_tools)

    def text(i):
        return vocab.tokens[i] if i is not None and 0 <= i < vocab.n_vocab else ""

    return render_chat(template, messages, add_generation_prompt=True, bos_token=text(vocab.bos_id),
                       eos_token=text(vocab.eos_id), tools=setup.tools if setup and takes_tools else None)


def chat_request(state, body: dict):
    """The chat body as a completion request (the prompt rendered, the tools' grammar set) and its tools."""
    setup = parse_tools(body, state.vocab.chat_template)
    if setup is not None and setup.constrained:
        if body.get("grammar") or body.get("json_schema") is not None:
            raise ApiError(400, "tool_choice 'required' or a named function constrains the reply to tool calls: "
                                "give no 'grammar', 'json_schema' or 'response_format' with it")
        body = {**body, "grammar": call_grammar(setup)}
    prompt = chat_prompt(state, body, setup)
    req = state.parse_completion({**body, "prompt": prompt}, n_predict_name="max_tokens", n_predict_default=-1)
    if "max_completion_tokens" in body:
        req.n_predict = schemas.get_int(body, "max_completion_tokens", -1, low=-1)
    req.logprobs, req.n_probs = openai_chat_fields(body)
    return req, setup


class ChoiceWriter:
    """The chunks of one streamed choice: text goes through the tool-call parser (when the request has tools)
    into content and tool_calls deltas; token figures wait for the next chunk that is sent."""

    def __init__(self, state, base: dict, chat: bool, setup: ToolSetup | None):
        self.vocab = state.vocab
        self.base = base
        self.chat = chat
        self.parser = ToolCallParser(setup) if setup is not None else None
        self.pending = []  # TokenProbs not sent yet
        self.offset = 0  # characters of the tokens already reported (the completions API's text_offset)

    def logprobs(self):
        if not self.pending:
            return None
        tps, self.pending = self.pending, []
        if self.chat:
            return chat_logprobs(self.vocab, tps)
        out = completions_logprobs(self.vocab, tps, self.offset)
        self.offset = out["text_offset"][-1] + len(out["tokens"][-1])
        return out

    def chunk(self, delta: dict | None = None, text: str = "", reason=None) -> str:
        if self.chat:
            choice = {"index": 0, "delta": delta or {}, "logprobs": self.logprobs(), "finish_reason": reason}
            kind = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text, "logprobs": self.logprobs(), "finish_reason": reason}
            kind = "text_completion"
        return sse({**self.base, "object": kind, "choices": [choice]})

    def text(self, text: str) -> list:
        if not self.chat:
            return [self.chunk(text=text)] if text else []
        if self.parser is None:
            return [self.chunk({"content": text})] if text else []
        return self.parsed(self.parser.feed(text))

    def parsed(self, events: list) -> list:
        out = []
        for event in events:
            if event[0] == "content":
                out.append(self.chunk({"content": event[1]}))
            elif event[0] == "call":
                _, index, ident, name = event
                out.append(self.chunk({"tool_calls": [{"index": index, "id": ident, "type": "function",
                                                       "function": {"name": name, "arguments": ""}}]}))
            else:
                out.append(self.chunk({"tool_calls": [{"index": event[1], "function": {"arguments": event[2]}}]}))
        return out

    def end(self, tail: str, reason: str) -> list:
        out = self.text(tail)
        called = False
        if self.parser is not None:
            out += self.parsed(self.parser.finish())
            called = bool(self.parser.calls)
        return out + [self.chunk(reason=finish_reason(reason, called))]


async def openai_generation(request: Request, chat: bool):
    state = state_of(request)
    body = await read_body(request)
    check_n(body)
    schema = schemas.schema_of_response_format(body)
    if schema is not None:
        if body.get("grammar") or body.get("json_schema") is not None:
            raise ApiError(400, "give either 'response_format' or 'grammar' / 'json_schema', not both")
        body = {**body, "json_schema": schema}
    setup = None
    if chat:
        req, setup = chat_request(state, body)
    else:
        req = state.parse_completion(body, n_predict_name="max_tokens", n_predict_default=16)
        req.logprobs, req.n_probs = openai_completions_fields(body)
    job = state.make_job(req, state.prompt_ids(req.parts))
    created = int(time.time())
    ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    kind = "chat.completion" if chat else "text_completion"
    base = {"id": ident, "created": created, "model": state.alias, "system_fingerprint": "llamalora"}

    if not req.stream:
        _, info = await run_to_end(state, job, request)
        tps = job.probs.tokens if job.probs is not None else None
        if chat:
            message = {"role": "assistant", "content": info["content"]}
            calls = []
            if setup is not None:
                message["content"], calls = parse_reply(setup, info["content"])
                if calls:
                    message["tool_calls"] = calls
            choice = {"index": 0, "message": message,
                      "logprobs": chat_logprobs(state.vocab, tps) if tps is not None else None,
                      "finish_reason": finish_reason(info["reason"], bool(calls))}
        else:
            choice = {"index": 0, "text": info["content"],
                      "logprobs": completions_logprobs(state.vocab, tps) if tps is not None else None,
                      "finish_reason": finish_reason(info["reason"])}
        return JSONResponse({**base, "object": kind, "choices": [choice], "usage": usage(info)})

    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    writer = ChoiceWriter(state, base, chat, setup)

    async def stream():
        if chat:
            yield writer.chunk({"role": "assistant", "content": ""})
        async for event in job_events(state, job):
            if event[0] == "token":
                if event[3] is not None:
                    writer.pending.append(event[3])
                for chunk in writer.text(event[2]):
                    yield chunk
            elif event[0] == "error":
                yield sse(event[1].body())
                return
            else:
                info = event[1]
                for chunk in writer.end(info["tail"], info["reason"]):
                    yield chunk
                if include_usage:
                    chunk_kind = "chat.completion.chunk" if chat else "text_completion"
                    yield sse({**base, "object": chunk_kind, "choices": [], "usage": usage(info)})
        yield "data: [DONE]\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def apply_template(request: Request):
    """llama.cpp's /apply-template: the prompt a chat body renders to (tools included), without generating."""
    state = state_of(request)
    body = await read_body(request)
    return JSONResponse({"prompt": chat_prompt(state, body, parse_tools(body, state.vocab.chat_template))})


async def completions(request: Request):
    return await openai_generation(request, chat=False)


async def chat_completions(request: Request):
    return await openai_generation(request, chat=True)


async def models(request: Request):
    """The base model and each adapter, the adapters with the base as `parent` and their path as `root`, as
    vLLM lists LoRA modules; `model: "<adapter name>"` in a request runs that adapter."""
    state = state_of(request)
    config = state.loaded.model.config
    created = int(state.started)
    data = [{"id": state.alias, "object": "model", "created": created, "owned_by": "llamalora",
             "root": state.loaded.file.path, "parent": None,
             "meta": {"n_vocab": state.vocab.n_vocab, "n_ctx_train": config.n_ctx_train, "n_embd": config.dim}}]
    if not state.registry.merged:
        data += [{"id": e.name, "object": "model", "created": created, "owned_by": "llamalora", "root": e.path,
                  "parent": state.alias, "meta": {"lora_id": e.id, "scale": e.scale}}
                 for e in state.registry.entries]
    return JSONResponse({"object": "list", "data": data})


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
        Route("/apply-template", apply_template, methods=["POST"]),
    ]
