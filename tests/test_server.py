"""`llamalora server` over real HTTP: uvicorn on a free loopback port, SmolLM2 with the lora-fortunes adapter."""

import asyncio
import concurrent.futures
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time

import numpy as np
import pytest

import httpx

from server_helpers import ADAPTER, client, running_server, sse_events  # noqa: E402

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def adapters(smollm2):
    from llamalora.loader import load_adapters

    return load_adapters(smollm2.file, [(ADAPTER, 1.0)])


@pytest.fixture(scope="module")
def url(smollm2, adapters):
    with running_server(smollm2, adapters, n_ctx=1024, n_parallel=2, embedding=True, alias="smol",
                        adapter_paths=[ADAPTER], scales=[1.0]) as base:
        yield base


@pytest.fixture(scope="module")
def http(url):
    with client(url) as c:
        yield c


@pytest.fixture(scope="module")
def keyed_url(smollm2):
    """A second server: API key, no embeddings, no adapters, one slot of 40 tokens."""
    with running_server(smollm2, [], n_ctx=40, n_parallel=1, api_key="sesame") as base:
        yield base


def complete(http, **body):
    body.setdefault("prompt", PROMPT)
    body.setdefault("temperature", 0)
    r = http.post("/completion", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def reference_tokens(loaded, adapters, scale, prompt, n):
    """Greedy tokens from generate() in this process: what the server must reproduce."""
    from llamalora.generate import Context, generate
    from llamalora.sampling import Sampler, SamplerParams

    model, vocab = loaded.model, loaded.vocab
    ctx = Context(model, n_ctx=256, lora=model.lora_deltas(adapters, [scale]) if scale else {})
    ids = vocab.tokenize(prompt, add_bos=None, parse_special=True)
    gen = generate(ctx, vocab, Sampler(SamplerParams(temp=0), vocab.n_vocab), ids, n_predict=n)
    return [t for t, _ in gen if t is not None]


# llama.cpp's endpoints


def test_health_props_models(http):
    health = http.get("/health").json()
    assert health["status"] == "ok" and health["slots_idle"] == 2
    props = http.get("/props").json()
    assert props["total_slots"] == 2
    assert props["default_generation_settings"]["n_ctx"] == 512
    assert "im_start" in props["chat_template"]
    models = http.get("/v1/models").json()
    assert models["data"][0]["id"] == "smol"


def test_completion_greedy_equals_generate(http, smollm2, adapters):
    out = complete(http, n_predict=8, lora=[{"id": 0, "scale": 0.0}])
    assert out["tokens"] == reference_tokens(smollm2, adapters, 0.0, PROMPT, 8)
    assert out["content"] == smollm2.vocab.detokenize(out["tokens"])
    assert out["tokens_predicted"] == 8 and out["stop_type"] == "limit" and out["stopped_limit"]
    assert out["timings"]["predicted_n"] >= 7 and out["generation_settings"]["n_predict"] == 8


def test_stream_one_event_per_token_then_final(http):
    plain = complete(http, n_predict=8)
    with http.stream("POST", "/completion", json={"prompt": PROMPT, "n_predict": 8, "temperature": 0,
                                                  "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    tokens, final = events[:-1], events[-1]
    assert len(tokens) == 8 and all(e["stop"] is False and len(e["tokens"]) == 1 for e in tokens)
    assert final["stop"] is True and final["stop_type"] == "limit" and "predicted_ms" in final["timings"]
    assert "".join(e["content"] for e in events) == plain["content"]
    assert [e["tokens"][0] for e in tokens] == plain["tokens"]


def test_stop_strings_are_cut(http):
    full = complete(http, n_predict=12)["content"]
    word = full.split()[3]  # a word in the middle of the greedy answer
    for stream in (False, True):
        body = {"prompt": PROMPT, "n_predict": 12, "temperature": 0, "stop": ["zzz", word], "stream": stream}
        if stream:
            with http.stream("POST", "/completion", json=body) as r:
                events = sse_events(r)
            text, final = "".join(e["content"] for e in events), events[-1]
        else:
            final = http.post("/completion", json=body).json()
            text = final["content"]
        assert text == full[: full.index(word)]
        assert final["stopped_word"] and final["stopping_word"] == word and final["stop_type"] == "word"


def test_prompt_as_strings_and_token_ids(http, smollm2):
    ids = smollm2.vocab.tokenize(" a time", add_bos=False)
    mixed = complete(http, prompt=["Once upon", *ids], n_predict=6)
    plain = complete(http, n_predict=6)
    assert mixed["tokens_evaluated"] == plain["tokens_evaluated"]
    assert mixed["tokens"] == plain["tokens"]


def test_tokenize_detokenize(http, smollm2):
    vocab = smollm2.vocab
    tokens = http.post("/tokenize", json={"content": "Hello world"}).json()["tokens"]
    assert tokens == vocab.tokenize("Hello world", add_bos=False)
    pieces = http.post("/tokenize", json={"content": "Hello world", "with_pieces": True}).json()["tokens"]
    assert [p["id"] for p in pieces] == tokens and "".join(p["piece"] for p in pieces) == "Hello world"
    assert http.post("/detokenize", json={"tokens": tokens}).json()["content"] == "Hello world"


def test_embedding(http, smollm2):
    def embed(text):
        r = http.post("/embedding", json={"content": text})
        assert r.status_code == 200, r.text
        return np.array(r.json()["embedding"])

    a, b, c = embed("a cat sat on the mat"), embed("a cat sat on the mat"), embed("stock prices fell sharply")
    assert a.shape == (smollm2.model.config.dim,) and math.isclose(float(a @ a), 1.0, rel_tol=1e-5)
    assert np.array_equal(a, b) and not np.allclose(a, c)


# LoRA at run time


def test_per_request_lora_equals_main(http, smollm2_path):
    """The server with {"id": 0, "scale": 0.5} gives what `main --lora-scaled ADAPTER 0.5` prints (greedy)."""
    from click.testing import CliRunner

    from llamalora.cli import cli

    prompt = "My fortune for today:"
    main = CliRunner().invoke(cli, ["main", "-m", smollm2_path, "--lora-scaled", ADAPTER, "0.5", "--temp", "0",
                                    "-n", "10", "-p", prompt])
    assert main.exit_code == 0, main.output
    served = complete(http, prompt=prompt, n_predict=10, lora=[{"id": 0, "scale": 0.5}])["content"]
    base = complete(http, prompt=prompt, n_predict=10, lora=[{"id": 0, "scale": 0.0}])["content"]
    assert main.stdout == prompt + served + "\n"
    assert served != base  # the adapter changes the answer, so the comparison above means something


def test_concurrent_requests_keep_their_own_adapters(http):
    prompt = "My fortune for today:"
    alone = {s: complete(http, prompt=prompt, n_predict=8, lora=[{"id": 0, "scale": s}])["tokens"] for s in (0.0, 1.0)}
    assert alone[0.0] != alone[1.0]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        jobs = [(s, pool.submit(complete, http, prompt=prompt, n_predict=8, lora=[{"id": 0, "scale": s}]))
                for s in (0.0, 1.0, 0.0, 1.0)]
        for scale, job in jobs:
            assert job.result()["tokens"] == alone[scale]


def test_lora_adapters_route_sets_scales_for_what_follows(http):
    listing = http.get("/lora-adapters").json()
    assert listing == [{"id": 0, "name": "lora-fortunes", "path": ADAPTER, "scale": 1.0}]
    prompt = "My fortune for today:"
    with_scale = {s: complete(http, prompt=prompt, n_predict=8, lora=[{"id": 0, "scale": s}])["tokens"]
                  for s in (0.0, 1.0)}
    try:
        r = http.post("/lora-adapters", json=[{"id": 0, "scale": 0.0}])
        assert r.status_code == 200 and r.json()["success"]
        assert http.get("/lora-adapters").json()[0]["scale"] == 0.0
        assert complete(http, prompt=prompt, n_predict=8)["tokens"] == with_scale[0.0]
    finally:
        http.post("/lora-adapters", json=[{"id": 0, "scale": 1.0}])
    assert complete(http, prompt=prompt, n_predict=8)["tokens"] == with_scale[1.0]


# prompt cache, samplers


def test_cache_prompt_reuses_the_prefix(http):
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 6
    first = complete(http, prompt=long_prompt, n_predict=4, cache_prompt=True, id_slot=1)
    second = complete(http, prompt=long_prompt + "Then", n_predict=4, cache_prompt=True, id_slot=1)
    uncached = complete(http, prompt=long_prompt + "Then", n_predict=4, cache_prompt=False, id_slot=1)
    assert first["tokens_cached"] == 0
    assert second["tokens_cached"] >= first["tokens_evaluated"] - 1
    assert second["timings"]["prompt_n"] == second["tokens_evaluated"] - second["tokens_cached"]
    assert second["tokens"] == uncached["tokens"]


def test_logit_bias_and_seeds(http):
    greedy = complete(http, n_predict=3)["tokens"]
    banned = complete(http, n_predict=3, logit_bias=[[greedy[0], False]])["tokens"]
    assert banned[0] != greedy[0]
    boosted = complete(http, n_predict=1, logit_bias=[[42, 100.0]])["tokens"]
    assert boosted == [42]
    body = {"n_predict": 4, "temperature": 1.0, "seed": 1234}
    assert complete(http, **body)["tokens"] == complete(http, **body)["tokens"]
    for extra in ({"mirostat": 1}, {"mirostat": 2, "mirostat_tau": 3.0}, {"tfs_z": 0.9}, {"typical_p": 0.8},
                  {"presence_penalty": 0.5, "frequency_penalty": 0.5, "repeat_penalty": 1.2}):
        a, b = complete(http, **body, **extra), complete(http, **body, **extra)
        assert a["tokens"] == b["tokens"] and a["tokens_predicted"] >= 1


def test_extra_samplers_unit():
    from llamalora.server.extra_sampling import RequestSampler, mirostat_v2, tail_free
    from llamalora.server.schemas import CompletionRequest

    # llama.cpp's test-sampling cases for tail-free sampling.
    values = np.log(np.array([0.3, 0.25, 0.2, 0.15, 0.1], dtype=np.float32))
    ids = np.arange(5)
    for z, n_kept in ((0.25, 1), (0.75, 2), (0.99, 2), (1.0, 5)):
        assert list(tail_free(ids, values, z)[0]) == list(range(n_kept))
    rng = np.random.default_rng(0)
    token, mu, _ = mirostat_v2(rng, values, tau=0.5, eta=0.1, mu=0.1)  # mu below every surprise: only the top
    assert token == 0 and mu != 0.1
    logits = np.array([1.0, 3.0, 2.9], dtype=np.float32)  # token 1 is the newline here
    for penalize_nl, expected in ((False, 1), (True, 2)):
        req = CompletionRequest(parts=[], temperature=0, repeat_penalty=10.0, penalize_nl=penalize_nl)
        assert RequestSampler(req, 3, nl_id=1).sample(logits, [1]) == expected


def test_queue_serves_in_arrival_order(smollm2):
    from llamalora.server.schemas import CompletionRequest
    from llamalora.server.slots import Job, SlotPool

    async def scenario():
        pool = SlotPool(smollm2, 1, 64, 16, [], [])
        jobs = [Job(ids=[1], req=CompletionRequest(parts=[]), scales=()) for _ in range(4)]
        order = []

        async def take(i):
            slot = await pool.acquire(jobs[i])
            order.append(i)
            await asyncio.sleep(0.01)
            pool.release(slot)

        tasks = []
        for i in range(4):
            tasks.append(asyncio.ensure_future(take(i)))
            await asyncio.sleep(0)
        tasks[2].cancel()  # a client that gives up while waiting loses its place, nobody else's
        await asyncio.gather(*tasks, return_exceptions=True)
        return order, pool.n_busy()

    order, busy = asyncio.run(scenario())
    assert order == [0, 1, 3] and busy == 0


# concurrency


def test_health_answers_fast_during_a_long_completion(http, url):
    with client(url) as other, concurrent.futures.ThreadPoolExecutor(1) as pool:
        # long enough to outlast the samples on a fast machine (SmolLM2 decodes 100+ tokens/s here)
        job = pool.submit(complete, other, n_predict=400, ignore_eos=True)
        deadline = time.monotonic() + 30
        while http.get("/health").json()["slots_processing"] == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        times = []
        for _ in range(8):
            start = time.perf_counter()
            assert http.get("/health").status_code == 200
            times.append(time.perf_counter() - start)
            time.sleep(0.05)
        still_running = not job.done()
        assert job.result()["tokens_predicted"] == 400
    assert still_running  # the samples were taken while the completion ran
    assert statistics.median(times) < 0.1 and max(times) < 0.25, times


def test_disconnect_frees_the_slot(http, url):
    body = {"prompt": PROMPT, "n_predict": 400, "ignore_eos": True, "stream": True, "temperature": 0}
    for _ in range(2):
        with client(url) as c, c.stream("POST", "/completion", json=body) as r:
            next(r.iter_lines())  # one token arrived: hang up mid-stream
    deadline = time.monotonic() + 5
    while http.get("/health").json()["slots_idle"] < 2:
        assert time.monotonic() < deadline, "slots stayed busy after their clients left"
        time.sleep(0.05)
    assert complete(http, n_predict=2)["tokens_predicted"] == 2


# errors


ERROR_CASES = [
    ("/completion", b"{bad json", 400, "not valid JSON"),
    ("/completion", b"[" * 100000 + b"]" * 100000, 400, "nested too deeply"),
    ("/v1/chat/completions", b'{"messages": ' + b"[" * 100000 + b"]" * 100000 + b"}", 400, "nested too deeply"),
    ("/completion", b"[1, 2]", 400, "JSON object"),
    ("/completion", {"n_predict": 4}, 400, "'prompt' is required"),
    ("/completion", {"prompt": 5}, 400, "'prompt' must be"),
    ("/completion", {"prompt": "x", "n_predict": "many"}, 400, "'n_predict' must be an integer"),
    ("/completion", {"prompt": "x", "temperature": "hot"}, 400, "'temperature'"),
    ("/completion", {"prompt": "x", "stream": "yes"}, 400, "'stream'"),
    ("/completion", {"prompt": "x", "stop": 3}, 400, "'stop'"),
    ("/completion", {"prompt": "x", "n_predict": 100000}, 400, "beyond the context"),
    ("/completion", {"prompt": "word " * 600}, 400, "beyond the context"),
    ("/completion", {"prompt": [1, 99999999]}, 400, "outside the vocabulary"),
    ("/completion", {"prompt": "x", "logit_bias": [[99999999, 1.0]]}, 400, "outside the vocabulary"),
    ("/completion", {"prompt": "x", "logit_bias": [[1, "big"]]}, 400, "bias must be"),
    ("/completion", {"prompt": "x", "mirostat": 3}, 400, "'mirostat'"),
    ("/completion", {"prompt": "x", "lora": [{"id": 7, "scale": 1.0}]}, 400, "adapter 7 does not exist"),
    ("/lora-adapters", [{"id": 1, "scale": 0.5}], 400, "adapter 1 does not exist"),
    ("/detokenize", {"tokens": [-1]}, 400, "outside the vocabulary"),
    ("/tokenize", {"content": 12}, 400, "'content'"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "'messages'"),
    ("/v1/completions", {"prompt": "x", "n": 2}, 400, "'n'"),
    ("/completion", {"prompt": "x", "grammar": "root ::= answer"}, 400, "'grammar': grammar:1:"),
    ("/completion", {"prompt": "x", "grammar": 'root ::= "a'}, 400, "'grammar'"),
    ("/completion", {"prompt": "x", "json_schema": {"type": "string", "pattern": "^a+$"}}, 400,
     "'pattern' is not supported"),
    ("/completion", {"prompt": "x", "json_schema": "object"}, 400, "'json_schema' must be"),
    ("/completion", {"prompt": "x", "json_schema": {}, "grammar": 'root ::= "a"'}, 400, "not both"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "response_format": {"type": "yaml"}}, 400, "'response_format'.type"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, 400,
     "needs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "response_format": {
        "type": "json_schema", "json_schema": {"schema": {"type": "object", "patternProperties": {}}}}}, 400,
     "'patternProperties' is not supported"),
    ("/v1/completions", {"prompt": "x", "response_format": {"type": "json_object", "schema": {"not": {}}}}, 400,
     "'not' is not supported"),
]


@pytest.mark.parametrize("path,body,status,fragment", ERROR_CASES)
def test_errors_are_json_4xx(http, path, body, status, fragment):
    r = http.post(path, content=body) if isinstance(body, bytes) else http.post(path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == status and error["type"] == "invalid_request_error" and fragment in error["message"]


def test_bodies_beyond_max_body_are_refused_before_they_are_read(http):
    """A 10 MB prompt answers 413 (by its declared length, and counted as it arrives when sent in chunks), and
    is never tokenized whole."""
    body = json.dumps({"prompt": "word " * 2_000_000, "n_predict": 1}).encode()
    start = time.monotonic()
    declared = http.post("/completion", content=body, headers={"content-type": "application/json"})
    chunked = http.post("/completion", content=(body[i:i + 65536] for i in range(0, len(body), 65536)))
    for r in (declared, chunked):
        assert r.status_code == 413, r.text
        assert r.json()["error"]["code"] == 413 and "--max-body" in r.json()["error"]["message"]
    assert time.monotonic() - start < 30
    assert complete(http, n_predict=2)["tokens_predicted"] == 2


def test_server_keeps_serving_after_errors(http):
    for path, body, _, _ in ERROR_CASES[:4]:
        http.post(path, content=body) if isinstance(body, bytes) else http.post(path, json=body)
    assert http.get("/health").json()["status"] == "ok"
    assert complete(http, n_predict=2)["tokens_predicted"] == 2
    r = http.get("/no-such-route")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_api_key_and_missing_embedding(keyed_url):
    with client(keyed_url) as c:
        assert c.get("/health").status_code == 200
        missing = c.post("/completion", json={"prompt": "x", "n_predict": 1})
        wrong = c.post("/completion", json={"prompt": "x", "n_predict": 1}, headers={"Authorization": "Bearer no"})
        for r, text in ((missing, "missing"), (wrong, "invalid")):
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
            assert text in r.json()["error"]["message"]
        key = {"Authorization": "Bearer sesame"}
        assert c.post("/completion", json={"prompt": "x", "n_predict": 1}, headers=key).status_code == 200
        r = c.post("/embedding", json={"content": "x"}, headers=key)
        assert r.status_code == 501 and r.json()["error"]["type"] == "not_supported_error"
        assert "--embedding" in r.json()["error"]["message"]
        r = c.post("/completion", json={"prompt": "x", "lora": [{"id": 0, "scale": 1}]}, headers=key)
        assert r.status_code == 400 and "does not exist" in r.json()["error"]["message"]
        r = c.post("/completion", json={"prompt": "x", "n_predict": 200}, headers=key)
        assert r.status_code == 400 and "beyond the context of 40" in r.json()["error"]["message"]


def test_context_shift_and_context_end(keyed_url, smollm2):
    """One 40-token slot: a bounded request longer than the room left shifts the context (keeping n_keep);
    n_predict -1 stops when the context is full."""
    key = {"Authorization": "Bearer sesame"}
    prompt = "The quick brown fox jumps over the lazy dog. " * 3
    n_prompt = len(smollm2.vocab.tokenize(prompt, add_bos=None))
    with client(keyed_url, headers=key) as c:
        body = {"prompt": prompt, "temperature": 0, "ignore_eos": True, "n_keep": 4}
        shifted = c.post("/completion", json={**body, "n_predict": 16}).json()
        assert n_prompt + 16 > 40 and shifted["tokens_predicted"] == 16 and shifted["stop_type"] == "limit"
        until_full = c.post("/completion", json={**body, "n_predict": -1}).json()
        # The context holds the prompt and every generated token but the last, sampled from the last logits.
        assert until_full["stopped_limit"] and n_prompt + until_full["tokens_predicted"] == 40 + 1


def test_tokenize_adds_no_space_on_spm(tmp_path):
    """/tokenize on a SentencePiece vocabulary: no BOS, no leading space (add_special adds the BOS)."""
    from tiny_model import make_tiny_llama

    from llamalora.loader import load_model

    loaded = load_model(make_tiny_llama(tmp_path / "tiny.gguf"), progress=False)
    vocab = loaded.vocab
    assert vocab.add_space_prefix
    with running_server(loaded, [], n_ctx=128) as url, client(url) as c:
        ids = c.post("/tokenize", json={"content": "hello"}).json()["tokens"]
        with_bos = c.post("/tokenize", json={"content": "hello", "add_special": True}).json()["tokens"]
    assert not vocab.tokens[ids[0]].startswith("\u2581") and vocab.detokenize(ids) == "hello"
    assert ids != vocab.tokenize("hello", add_bos=False)  # what the space rule would have given
    assert with_bos == [vocab.bos_id] + ids


# grammars and JSON schemas

TWO_FIELDS = {"type": "object", "properties": {"ok": {"type": "boolean"},
                                               "n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["ok", "n"], "additionalProperties": False}
COLOURS = {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3}
SEEDS = (1, 2, 3)


def check_json(text: str, schema: dict):
    import jsonschema

    value = json.loads(text)
    jsonschema.validate(value, schema)
    return value


# Few-shot prompts keep the JSON compact; the schema grammar's trailing white space (up to 22 bytes, as
# llama.cpp's) still takes tokens, so n_predict leaves room for it.
OBJECT_PROMPT = 'Examples: {"ok": true, "n": 3} {"ok": false, "n": 7}\nOne more:'
ARRAY_PROMPT = 'Examples: ["red"] ["blue", "green"]\nOne more:'
CHAT_JSON = [{"role": "system", "content": 'Reply with one line of compact JSON, such as {"ok": true, "n": 3}.'},
             {"role": "user", "content": "Is the sky blue, and how many colours has a rainbow?"}]


def test_json_schema_outputs_validate(http):
    for schema, prompt in ((TWO_FIELDS, OBJECT_PROMPT), (COLOURS, ARRAY_PROMPT)):
        for seed in SEEDS:
            out = complete(http, prompt=prompt, json_schema=schema, n_predict=40, temperature=1.0, seed=seed)
            check_json(out["content"], schema)
            assert out["generation_settings"]["grammar"].startswith("root ::=")


def test_response_format_outputs_validate(http):
    """OpenAI's json_schema shape on the chat route, llama.cpp's json_object + schema shape on /v1/completions."""
    for seed in SEEDS:
        body = {"messages": CHAT_JSON, "max_tokens": 40, "temperature": 1.0, "seed": seed,
                "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": TWO_FIELDS}}}
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        check_json(r.json()["choices"][0]["message"]["content"], TWO_FIELDS)
        body = {"prompt": ARRAY_PROMPT, "max_tokens": 40, "temperature": 1.0, "seed": seed,
                "response_format": {"type": "json_object", "schema": COLOURS}}
        r = http.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        check_json(r.json()["choices"][0]["text"], COLOURS)


def test_response_format_json_object(http):
    """{"type": "json_object"} alone: any JSON object. A free-form object may outrun max_tokens at temperature 1;
    what was generated is then a prefix the JSON grammar accepts, and every finished output parses to an object."""
    from llamalora.grammar import parse_grammar
    from llamalora.json_schema import schema_to_grammar

    messages = [{"role": "system", "content": 'Answer with a JSON object like {"answer": "yes"}.'},
                {"role": "user", "content": "Is the sky blue?"}]
    object_grammar = parse_grammar(schema_to_grammar({"type": "object"}))
    for seed in (0, *SEEDS):
        body = {"messages": messages, "max_tokens": 32, "temperature": 1.0, "seed": seed,
                "response_format": {"type": "json_object"}}
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        text = choice["message"]["content"]
        assert text.lstrip().startswith("{")
        if choice["finish_reason"] == "stop":
            assert isinstance(json.loads(text), dict)
        else:
            object_grammar.start().accept_bytes(text.encode())  # raises if the text left the grammar
    greedy = http.post("/v1/chat/completions", json={**body, "temperature": 0}).json()["choices"][0]
    assert greedy["finish_reason"] == "stop" and isinstance(json.loads(greedy["message"]["content"]), dict)


def test_grammar_through_the_openai_client(url):
    import openai
    ai = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    yes_no = {"grammar": 'root ::= "yes" | "no"'}
    messages = [{"role": "user", "content": "Is water wet?"}]
    for seed in SEEDS:
        chat = ai.chat.completions.create(model="smol", messages=messages, max_tokens=4, temperature=1.0,
                                          seed=seed, extra_body=yes_no)
        assert chat.choices[0].message.content in ("yes", "no") and chat.choices[0].finish_reason == "stop"
    digits = ai.completions.create(model="smol", prompt="Three digits:", max_tokens=6, temperature=1.0, seed=1,
                                   extra_body={"grammar": "root ::= [0-9]{3}"})
    assert re.fullmatch("[0-9]{3}", digits.choices[0].text)
    streamed = ai.completions.create(model="smol", prompt="Three digits:", max_tokens=6, temperature=1.0, seed=1,
                                     extra_body={"grammar": "root ::= [0-9]{3}"}, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == digits.choices[0].text
    with pytest.raises(openai.BadRequestError) as bad:
        ai.completions.create(model="smol", prompt="x", max_tokens=2, extra_body={"grammar": "root ::= [0-9"})
    assert "'grammar'" in str(bad.value)
    # The bad grammar refused, the server goes on with the next request.
    again = ai.chat.completions.create(model="smol", messages=messages, max_tokens=4, temperature=0,
                                       extra_body=yes_no)
    assert again.choices[0].message.content in ("yes", "no")


def test_grammar_streams_on_completion(http):
    body = {"prompt": "Colour:", "n_predict": 16, "temperature": 1.0, "seed": 5, "stream": True,
            "grammar": 'root ::= ("red" | "green" | "blue") ("," " "? ("red" | "green" | "blue"))?'}
    with http.stream("POST", "/completion", json=body) as r:
        assert r.status_code == 200
        events = sse_events(r)
    text = "".join(e["content"] for e in events)
    assert re.fullmatch(r"(red|green|blue)(, ?(red|green|blue))?", text) and events[-1]["stop_type"] == "eos"


# a character cut off at the end of generation


class ScriptedSampler:
    """Returns the given ids in order, whatever the logits."""

    def __init__(self, ids):
        self.ids = list(ids)

    def sample(self, logits, history):
        return self.ids.pop(0)

    def accept(self, token):
        pass


def byte_token(vocab, data: bytes) -> int:
    return next(t for t in range(vocab.n_vocab) if vocab.token_bytes(t) == data)


def test_generate_flushes_an_incomplete_last_character(smollm2):
    """Generation that ends after the first byte of "€" (E2 82 AC) still hands that byte on, as U+FFFD."""
    from llamalora.generate import Context, generate

    model, vocab = smollm2.model, smollm2.vocab
    a, e2, b82 = vocab.tokenize("a", add_bos=False)[0], byte_token(vocab, b"\xe2"), byte_token(vocab, b"\x82")
    ids = vocab.tokenize(PROMPT, add_bos=None)
    cases = [([a, e2], 2, "a\ufffd", "limit"), ([e2, b82, vocab.eos_id], -1, "\ufffd", "eos"),
             ([a, e2, b82, byte_token(vocab, b"\xac")], 4, "a\u20ac", "limit")]
    for script, n_predict, text, why in cases:
        gen = generate(Context(model, n_ctx=64), vocab, ScriptedSampler(script), ids, n_predict=n_predict)
        pieces = []
        try:
            while True:
                pieces.append(next(gen))
        except StopIteration as stop:
            reason = stop.value
        assert "".join(p for _, p in pieces) == text and reason == why
        assert [t for t, _ in pieces if t is not None] == [t for t in script if not vocab.is_eog(t)]


def test_server_sends_an_incomplete_last_character(http, smollm2):
    e2 = byte_token(smollm2.vocab, b"\xe2")
    body = {"n_predict": 1, "logit_bias": [[e2, 100.0]]}
    out = complete(http, **body)
    assert out["tokens"] == [e2] and out["content"] == "\ufffd"
    with http.stream("POST", "/completion", json={"prompt": PROMPT, "temperature": 0, "stream": True, **body}) as r:
        events = sse_events(r)
    assert "".join(e["content"] for e in events) == "\ufffd" and len(events) == 2


# the web page's files


def test_completion_js_module(url, keyed_url):
    for base in (url, keyed_url):  # the module is part of the page: no API key needed
        r = httpx.get(base + "/completion.js")
        assert r.status_code == 200 and "javascript" in r.headers["content-type"]
        assert "export async function* llama(" in r.text and "export const llamaPromise" in r.text
    page = httpx.get(url + "/").text
    assert 'id="grammar"' in page and "p.grammar = grammar" in page
    with client(keyed_url) as c:  # the API routes under the same prefix still need it
        assert c.post("/completions", json={"prompt": "x", "n_predict": 1}).status_code == 401
        assert c.post("/chat/completions", json={"messages": []}).status_code == 401


# OpenAI-compatible routes


def test_openai_client(url):
    import openai
    ai = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    assert [m.id for m in ai.models.list().data] == ["smol", "lora-fortunes"]

    done = ai.completions.create(model="smol", prompt=PROMPT, max_tokens=6, temperature=0)
    assert done.choices[0].finish_reason == "length" and done.usage.completion_tokens == 6
    streamed = ai.completions.create(model="smol", prompt=PROMPT, max_tokens=6, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == done.choices[0].text

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    chat = ai.chat.completions.create(model="smol", messages=messages, max_tokens=8, temperature=0)
    answer = chat.choices[0].message
    assert answer.role == "assistant" and answer.content and chat.object == "chat.completion"
    pieces, reasons = [], []
    for chunk in ai.chat.completions.create(model="smol", messages=messages, max_tokens=8, temperature=0, stream=True):
        assert chunk.object == "chat.completion.chunk"
        pieces.append(chunk.choices[0].delta.content or "")
        reasons.append(chunk.choices[0].finish_reason)
    assert "".join(pieces) == answer.content and reasons[-1] == chat.choices[0].finish_reason

    emb = ai.embeddings.create(model="smol", input=["hello", "world"])
    assert len(emb.data) == 2 and len(emb.data[0].embedding) == 576


def test_chat_uses_the_models_template(http, smollm2):
    from llamalora.chat import render_chat

    messages = [{"role": "user", "content": "Say hi"}]
    r = http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 5, "temperature": 0})
    assert r.status_code == 200, r.text
    prompt = render_chat(smollm2.vocab.chat_template, messages, add_generation_prompt=True)
    direct = complete(http, prompt=prompt, n_predict=5)
    assert r.json()["choices"][0]["message"]["content"] == direct["content"]


# the command line


def test_server_command_line(smollm2_path, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    page = tmp_path / "index.html"
    page.write_text("<p>own page</p>")
    cmd = [sys.executable, "-m", "llamalora.server", "-m", smollm2_path, "--port", str(port), "-c", "256",
           "-np", "2", "--alias", "tiny", "--api-key", "k", "--path", str(tmp_path), "--lora-scaled", ADAPTER, "0.25"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else ""
            time.sleep(0.2)
        key = {"Authorization": "Bearer k"}
        assert httpx.get(base + "/v1/models").json()["data"][0]["id"] == "tiny"
        assert httpx.get(base + "/").text == "<p>own page</p>"
        props = httpx.get(base + "/props", headers=key).json()
        assert props["total_slots"] == 2 and props["default_generation_settings"]["n_ctx"] == 128
        assert httpx.get(base + "/lora-adapters", headers=key).json()[0]["scale"] == 0.25
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    bad = subprocess.run([sys.executable, "-m", "llamalora.server", "-m", smollm2_path, "-np", "0"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1] == "error: -np must be at least 1, got 0"
