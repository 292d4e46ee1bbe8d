"""The server as OpenAI clients and llama.cpp users reach for it: token probabilities (n_probs, logprobs) and
tool calls, through plain HTTP and through the `openai` client's own parsing."""

import json

import numpy as np
import pytest


from server_helpers import client, running_server, sse_events  # noqa: E402

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def url(smollm2):
    with running_server(smollm2, [], n_ctx=1024, n_parallel=2, alias="smol") as base:
        yield base


@pytest.fixture(scope="module")
def http(url):
    with client(url) as c:
        yield c


@pytest.fixture(scope="module")
def ai(url):
    import openai
    return openai.OpenAI(base_url=url + "/v1", api_key="unused")


def post(http, path, **body):
    r = http.post(path, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def log_softmax_rows(loaded, ids: list, n_prompt: int) -> np.ndarray:
    """numpy's log-softmax of the model's logits at every generated position: one forward pass over the
    prompt and the generated tokens (the batch path, not the server's token-by-token decode)."""
    model = loaded.model
    logits = model.forward(ids, model.new_cache(len(ids) + 1), all_logits=True).astype(np.float64)
    rows = logits[n_prompt - 1 : len(ids) - 1]
    rows -= rows.max(axis=1, keepdims=True)
    return rows - np.log(np.exp(rows).sum(axis=1, keepdims=True))


# token probabilities


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_n_probs_are_the_log_softmax_of_the_logits(http, smollm2, temperature):
    out = post(http, "/completion", prompt=PROMPT, n_predict=6, temperature=temperature, seed=7, n_probs=3,
               repeat_penalty=1.3)
    probs = out["completion_probabilities"]
    assert [p["id"] for p in probs] == out["tokens"] and len(probs) == 6
    prompt_ids = smollm2.vocab.tokenize(PROMPT, add_bos=None, parse_special=True)
    expected = log_softmax_rows(smollm2, prompt_ids + out["tokens"], len(prompt_ids))
    for row, p in zip(expected, probs):
        # Before the sampler chain: the repeat penalty and the temperature change nothing here.
        assert p["logprob"] == pytest.approx(row[p["id"]], abs=2e-4)
        best = np.argsort(-row, kind="stable")[:3]
        assert [a["id"] for a in p["top_logprobs"]] == best.tolist()
        assert [a["logprob"] for a in p["top_logprobs"]] == pytest.approx(row[best].tolist(), abs=2e-4)
        assert p["token"] == smollm2.vocab.token_bytes(p["id"]).decode() and bytes(p["bytes"]).decode() == p["token"]
    if temperature == 0:
        assert all(p["id"] == p["top_logprobs"][0]["id"] for p in probs)


def test_post_sampling_probs_are_the_chains_survivors(http, smollm2):
    body = {"prompt": PROMPT, "n_predict": 5, "temperature": 0.7, "top_k": 3, "top_p": 1.0, "min_p": 0.0,
            "seed": 11, "n_probs": 5, "post_sampling_probs": True}
    out = post(http, "/completion", **body)
    prompt_ids = smollm2.vocab.tokenize(PROMPT, add_bos=None, parse_special=True)
    expected = log_softmax_rows(smollm2, prompt_ids + out["tokens"], len(prompt_ids))
    for row, p in zip(expected, out["completion_probabilities"]):
        best = np.argsort(-row, kind="stable")[:3]
        kept = np.exp((row[best] - row[best].max()) / 0.7)
        kept /= kept.sum()
        assert "logprob" not in p and [a["id"] for a in p["top_probs"]] == best.tolist()  # top_k 3: three left
        assert [a["prob"] for a in p["top_probs"]] == pytest.approx(kept.tolist(), abs=1e-4)
        assert p["prob"] == pytest.approx(kept[best.tolist().index(p["id"])], abs=1e-4)
    greedy = post(http, "/completion", **{**body, "temperature": 0})["completion_probabilities"]
    assert all(p["prob"] == 1.0 and len(p["top_probs"]) == 1 for p in greedy)


def test_n_probs_stream_one_entry_per_token(http):
    body = {"prompt": PROMPT, "n_predict": 5, "temperature": 0, "n_probs": 2}
    whole = post(http, "/completion", **body)
    with http.stream("POST", "/completion", json={**body, "stream": True}) as r:
        events = sse_events(r)
    streamed = [e["completion_probabilities"][0] for e in events if not e["stop"]]
    assert streamed == whole["completion_probabilities"]
    assert "completion_probabilities" not in post(http, "/completion", prompt=PROMPT, n_predict=2)


def test_chat_logprobs_through_the_openai_client(ai, http, smollm2):
    from llamalora.chat import render_chat

    messages = [{"role": "user", "content": "Name a colour."}]
    chat = ai.chat.completions.create(model="smol", messages=messages, max_tokens=6, temperature=0, logprobs=True,
                                      top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert "".join(t.token for t in content) == chat.choices[0].message.content and len(content) == 6
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].token == t.token for t in content)
    assert all(bytes(t.bytes).decode() == t.token for t in content)
    # The same figures as llama.cpp's n_probs on the rendered prompt.
    prompt = render_chat(smollm2.vocab.chat_template, messages)
    direct = post(http, "/completion", prompt=prompt, n_predict=6, temperature=0, n_probs=2)
    assert [t.logprob for t in content] == [p["logprob"] for p in direct["completion_probabilities"]]
    streamed = []
    for chunk in ai.chat.completions.create(model="smol", messages=messages, max_tokens=6, temperature=0,
                                            logprobs=True, top_logprobs=2, stream=True):
        if chunk.choices and chunk.choices[0].logprobs is not None:
            streamed += chunk.choices[0].logprobs.content
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content]
    plain = ai.chat.completions.create(model="smol", messages=messages, max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None
    only_chosen = ai.chat.completions.create(model="smol", messages=messages, max_tokens=2, temperature=0,
                                             logprobs=True)
    assert [t.top_logprobs for t in only_chosen.choices[0].logprobs.content] == [[], []]


def test_completions_logprobs_through_the_openai_client(ai):
    done = ai.completions.create(model="smol", prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3)
    lp = done.choices[0].logprobs
    assert "".join(lp.tokens) == done.choices[0].text and len(lp.token_logprobs) == 5
    assert all(len(top) == 3 and max(top.values()) == pytest.approx(own) for top, own in
               zip(lp.top_logprobs, lp.token_logprobs))
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    streamed = ai.completions.create(model="smol", prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3,
                                     stream=True)
    tokens, offsets = [], []
    for chunk in streamed:
        if chunk.choices[0].logprobs is not None:
            tokens += chunk.choices[0].logprobs.tokens
            offsets += chunk.choices[0].logprobs.text_offset
    assert tokens == lp.tokens and offsets == lp.text_offset


@pytest.mark.parametrize("path,body,fragment", [
    ("/v1/chat/completions", {"top_logprobs": 2}, "needs 'logprobs'"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "at most 20"),
    ("/v1/completions", {"logprobs": 6}, "at most 5"),
    ("/completion", {"n_probs": -1}, "'n_probs'"),
])
def test_probability_fields_checked(http, path, body, fragment):
    base = {"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "x"}
    r = http.post(path, json={**base, **body, "max_tokens": 1})
    assert r.status_code == 400 and fragment in r.json()["error"]["message"], r.text


# tool calls

WEATHER_PARAMETERS = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 24},
    "unit": {"enum": ["celsius", "fahrenheit"]},
    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "unit"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The forecast for a city",
                                            "parameters": WEATHER_PARAMETERS}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The time in a city",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                        "required": ["city"]}}}
ASK = [{"role": "user", "content": "What will the weather be in Paris for the next two days?"}]


def setup_for(tools, choice="auto", parallel=True, template=None):
    from llamalora.server.tools import parse_tools

    return parse_tools({"tools": tools, "tool_choice": choice, "parallel_tool_calls": parallel}, template)


def parse_events(setup, pieces):
    from llamalora.server.tools import ToolCallParser

    parser = ToolCallParser(setup)
    events = [e for p in pieces for e in parser.feed(p)] + parser.finish()
    content = "".join(e[1] for e in events if e[0] == "content")
    calls = [{"name": e[3], "arguments": "".join(a[2] for a in events if a[0] == "arguments" and a[1] == e[1])}
             for e in events if e[0] == "call"]
    return content, calls, events


def test_tool_call_parser_streams_what_it_reads_whole():
    setup = setup_for([WEATHER, TIME])
    text = ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
            '</tool_call>\n<tool_call>\n{"arguments": {"city": "Paris"}, "name": "get_time"}\n</tool_call>')
    whole = parse_events(setup, [text])
    by_char = parse_events(setup, list(text))
    assert whole[:2] == by_char[:2]
    content, calls, events = by_char
    assert content == "Let me look."
    assert [c["name"] for c in calls] == ["get_weather", "get_time"]
    assert [json.loads(c["arguments"]) for c in calls] == [{"city": "Paris", "unit": "celsius"}, {"city": "Paris"}]
    # Name first: the arguments came in pieces, as they were generated; arguments first: whole at the end.
    assert sum(1 for e in events if e[0] == "arguments" and e[1] == 0) > 10
    assert sum(1 for e in events if e[0] == "arguments" and e[1] == 1) == 1
    # Text that only looks like the start of a call for a while is content after all.
    assert parse_events(setup, list("a <tool x> b"))[:2] == ("a <tool x> b", [])
    assert parse_events(setup, ["<tool_call>\nnot json\n</tool_call> ok"])[:2] == (
        "<tool_call>\nnot json\n</tool_call> ok", [])
    # parallel_tool_calls false: the first call only.
    assert len(parse_events(setup_for([WEATHER, TIME], parallel=False), [text])[1]) == 1


def test_tool_styles_follow_the_template():
    from llamalora.server.tools import parse_reply

    assert setup_for([WEATHER]).style == "tags" and not setup_for([WEATHER]).in_template
    qwen_like = "{% for tool in tools %}{{ tool | tojson }}{% endfor %}<tool_call>{{ messages }}"
    assert setup_for([WEATHER], template=qwen_like).in_template and setup_for([WEATHER], template=qwen_like).style == "tags"
    llama_like = LLAMA_TOOLS_TEMPLATE
    setup = setup_for([WEATHER], template=llama_like)
    assert setup.style == "json" and setup.arguments_key == "parameters"
    content, calls = parse_reply(setup, '{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "celsius"}}')
    assert content is None and json.loads(calls[0]["function"]["arguments"])["city"] == "Oslo"
    assert parse_reply(setup, "Plain words.") == ("Plain words.", [])
    assert setup_for([WEATHER], choice="none") is None


def test_call_grammar_admits_valid_calls_only():
    from llamalora.errors import GrammarError
    from llamalora.grammar import parse_grammar
    from llamalora.server.tools import call_grammar

    grammar = parse_grammar(call_grammar(setup_for([WEATHER, TIME], choice="required", parallel=False)))
    good = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "unit": "fahrenheit", "days": 3}}\n</tool_call>'
    state = grammar.start()
    state.accept_bytes(good.encode())
    assert state.can_end() and state.must_end()
    for bad in ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "unit": "kelvin"}}',
                '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "unit": "celsius", "days": 9}}',
                '<tool_call>\n{"name": "get_news", "arguments": {}}'):
        with pytest.raises(GrammarError):
            grammar.start().accept_bytes(bad.encode())
    named = parse_grammar(call_grammar(setup_for([WEATHER, TIME], choice={"type": "function",
                                                                           "function": {"name": "get_time"}})))
    with pytest.raises(GrammarError):
        named.start().accept_bytes(good.encode())


def weather_model():
    from typing import Literal

    import pydantic

    class GetWeather(pydantic.BaseModel):
        """The forecast for a city"""

        city: str = pydantic.Field(max_length=24)
        unit: Literal["celsius", "fahrenheit"]
        days: int = pydantic.Field(ge=1, le=7)

    return GetWeather


def test_required_tool_call_validates_in_every_seeded_run(ai):
    """tool_choice required at temperature 1: in 20 of 20 runs the openai client parses one call whose
    arguments validate against the function's schema."""
    import openai
    import jsonschema
    GetWeather = weather_model()
    tool = openai.pydantic_function_tool(GetWeather, name="get_weather")
    schema = tool["function"]["parameters"]
    for seed in range(20):
        chat = ai.chat.completions.parse(model="smol", messages=ASK, tools=[tool], tool_choice="required",
                                         parallel_tool_calls=False, temperature=1.0, seed=seed, max_tokens=80)
        choice = chat.choices[0]
        assert choice.finish_reason == "tool_calls", (seed, choice)
        calls = choice.message.tool_calls
        assert len(calls) == 1 and calls[0].function.name == "get_weather" and calls[0].id.startswith("call_")
        assert isinstance(calls[0].function.parsed_arguments, GetWeather)
        jsonschema.validate(json.loads(calls[0].function.arguments), schema)


def test_named_tool_choice_and_parallel_calls(ai):
    named = ai.chat.completions.create(model="smol", messages=ASK, tools=[WEATHER, TIME], temperature=0,
                                       tool_choice={"type": "function", "function": {"name": "get_time"}},
                                       max_tokens=120)
    calls = named.choices[0].message.tool_calls
    assert calls and {c.function.name for c in calls} == {"get_time"}
    assert all(isinstance(json.loads(c.function.arguments)["city"], str) for c in calls)
    several = ai.chat.completions.create(model="smol", messages=ASK, tools=[WEATHER, TIME], temperature=0,
                                         tool_choice="required", max_tokens=200)
    choice = several.choices[0]
    complete = [c for c in choice.message.tool_calls if _parses(c.function.arguments)]
    assert complete and len({c.id for c in choice.message.tool_calls}) == len(choice.message.tool_calls)
    assert choice.finish_reason in ("tool_calls", "length")


def _parses(text):
    try:
        json.loads(text)
        return True
    except json.JSONDecodeError:
        return False


def test_tool_calls_stream_as_openai_streams_them(ai, http):
    import openai
    GetWeather = weather_model()
    tool = openai.pydantic_function_tool(GetWeather, name="get_weather")
    body = dict(model="smol", messages=ASK, tools=[tool], tool_choice="required", parallel_tool_calls=False,
                temperature=1.0, seed=3, max_tokens=80)
    whole = ai.chat.completions.parse(**body)
    with ai.chat.completions.stream(**body) as stream:
        final = stream.get_final_completion()
    call = final.choices[0].message.tool_calls[0]
    assert final.choices[0].finish_reason == "tool_calls"
    assert call.function.parsed_arguments == whole.choices[0].message.tool_calls[0].function.parsed_arguments
    with http.stream("POST", "/v1/chat/completions", json={**body, "tools": [tool], "stream": True}) as r:
        deltas = [e["choices"][0]["delta"] for e in sse_events(r) if e["choices"]]
    pieces = [d["tool_calls"][0] for d in deltas if d.get("tool_calls")]
    assert pieces[0]["id"] == call.id or pieces[0]["id"].startswith("call_")
    assert pieces[0]["function"] == {"name": "get_weather", "arguments": ""} and pieces[0]["type"] == "function"
    assert len(pieces) > 3 and all("id" not in p and set(p["function"]) == {"arguments"} for p in pieces[1:])
    assert "".join(p["function"]["arguments"] for p in pieces) == call.function.arguments
    assert not any(d.get("content") for d in deltas)


def test_auto_mode_parses_content_and_calls(ai):
    """tool_choice auto leaves the model free; a grammar (llama.cpp's extra field) stands in for a model that
    answers with a sentence and then a call, which comes back parsed."""
    grammar = ('root ::= "Let me check. " "<tool_call>\\n{\\"name\\": \\"get_weather\\", \\"arguments\\": '
               '{\\"city\\": \\"Paris\\", \\"unit\\": \\"celsius\\"}}\\n</tool_call>"')
    for stream in (False, True):
        body = dict(model="smol", messages=ASK, tools=[WEATHER, TIME], max_tokens=60, temperature=0,
                    extra_body={"grammar": grammar})
        if stream:
            with ai.chat.completions.stream(**body) as s:
                chat = s.get_final_completion()
        else:
            chat = ai.chat.completions.create(**body)
        message = chat.choices[0].message
        assert message.content == "Let me check." and chat.choices[0].finish_reason == "tool_calls"
        assert json.loads(message.tool_calls[0].function.arguments) == {"city": "Paris", "unit": "celsius"}
    prose = ai.chat.completions.create(model="smol", messages=ASK, tools=[WEATHER], max_tokens=16, temperature=0,
                                       extra_body={"grammar": 'root ::= "It will be sunny."'})
    assert prose.choices[0].message.content == "It will be sunny." and not prose.choices[0].message.tool_calls
    assert prose.choices[0].finish_reason == "stop"


def test_tool_history_is_rendered_back(http, ai):
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"forecast": "sunny, 24 C"}'}]
    prompt = post(http, "/apply-template", messages=history, tools=[WEATHER])["prompt"]
    assert "<tools>" in prompt and '"name": "get_weather"' in prompt and "maxLength" in prompt
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>' \
        in prompt
    assert '<|im_start|>user\n<tool_response>\n{"forecast": "sunny, 24 C"}\n</tool_response><|im_end|>' in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    # tool_choice none: no tools in the prompt, and the reply is prose.
    assert "<tools>" not in post(http, "/apply-template", messages=ASK, tools=[WEATHER], tool_choice="none")["prompt"]
    answer = ai.chat.completions.create(model="smol", messages=history, tools=[WEATHER], max_tokens=24,
                                        temperature=0, tool_choice="none")
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls


LLAMA_TOOLS_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and tools %}<|im_start|>system\nYou have these functions:\n"
    "{% for t in tools %}{{ t | tojson }}\n{% endfor %}"
    'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.'
    "<|im_end|>\n{% endif %}"
    "{% if message.role == 'tool' %}<|im_start|>ipython\n{{ message.content }}<|im_end|>\n"
    "{% elif message.tool_calls %}<|im_start|>assistant\n{% for c in message.tool_calls %}"
    '{"name": "{{ c.function.name }}", "parameters": {{ c.function.arguments | tojson }}}'
    "{% endfor %}<|im_end|>\n"
    "{% else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_template_that_takes_tools(smollm2_path, tmp_path):
    """A chat template with its own tool support renders the tools and the history; calls come back in the
    style it asks for (bare JSON with "parameters")."""
    import openai
    from conftest import rewritten

    from llamalora.loader import load_model

    path = rewritten(smollm2_path, tmp_path / "tools.gguf", {"tokenizer.chat_template": LLAMA_TOOLS_TEMPLATE})
    loaded = load_model(path, progress=False)
    history = ASK + [
        {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    with running_server(loaded, [], n_ctx=512, alias="smol") as base, client(base) as http:
        prompt = post(http, "/apply-template", messages=history, tools=[WEATHER])["prompt"]
        assert prompt.startswith("<|im_start|>system\nYou have these functions:\n" + json.dumps(WEATHER) + "\n")
        assert '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}' in prompt
        assert "<|im_start|>ipython\nsunny<|im_end|>" in prompt and "<tool_call>" not in prompt
        ai_here = openai.OpenAI(base_url=base + "/v1", api_key="unused")
        chat = ai_here.chat.completions.create(model="smol", messages=ASK, tools=[WEATHER], tool_choice="required",
                                               parallel_tool_calls=False, temperature=1.0, seed=1, max_tokens=80)
        call = chat.choices[0].message.tool_calls[0]
        assert call.function.name == "get_weather" and chat.choices[0].finish_reason == "tool_calls"
        assert set(json.loads(call.function.arguments)) >= {"city", "unit"}


@pytest.mark.parametrize("extra,fragment", [
    ({"tool_choice": "required"}, "'tool_choice' needs 'tools'"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not among 'tools'"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "'tool_choice' must be"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "'tools'[0].function.name"),
    ({"tools": [WEATHER, WEATHER]}, "given twice"),
    ({"tools": "get_weather"}, "'tools' must be an array"),
    ({"tools": [WEATHER], "tool_choice": "required", "grammar": 'root ::= "x"'}, "give no 'grammar'"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"s": {"type": "string", "pattern": "a+"}}}}}], "tool_choice": "required"},
     "'tools'[0].function.parameters: json schema at /properties/s: 'pattern' is not supported"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"function": {}}]}]}, "'messages'[0].tool_calls[0]"),
])
def test_tool_fields_checked(http, extra, fragment):
    r = http.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 1, **extra})
    assert r.status_code == 400 and fragment in r.json()["error"]["message"], r.text
