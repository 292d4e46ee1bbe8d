"""Adapters by name: --lora NAME=PATH, /v1/models with each adapter's parent, `model: "NAME"` choosing it,
and loading / unloading while the server runs, with requests already running keeping theirs."""

import concurrent.futures
import time

import pytest


from server_helpers import ADAPTER, client, running_server, sse_events  # noqa: E402

PROMPT = "My fortune for today:"


@pytest.fixture(scope="module")
def url(smollm2):
    from llamalora.loader import load_adapters

    adapters = load_adapters(smollm2.file, [(ADAPTER, 1.0)])
    with running_server(smollm2, adapters, n_ctx=1024, n_parallel=2, alias="smol", adapter_paths=[ADAPTER],
                        adapter_names=["fortunes"], scales=[0.5], lora_admin=True) as base:
        yield base


@pytest.fixture(scope="module")
def http(url):
    with client(url) as c:
        yield c


def tokens(http, path="/v1/completions", **body):
    body = {"prompt": PROMPT, "temperature": 0, "max_tokens": 8, "n_predict": 8, **body}
    r = http.post(path, json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    return out["tokens"] if path == "/completion" else out["choices"][0]["text"]


def test_models_list_the_adapters_with_their_parent(url):
    import openai
    ai = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    listed = ai.models.list().data
    assert [m.id for m in listed] == ["smol", "fortunes"]
    assert listed[0].parent is None and listed[1].parent == "smol" and listed[1].root == ADAPTER


def test_model_name_picks_the_adapter(http):
    at = {s: tokens(http, lora=[{"id": 0, "scale": s}]) for s in (0.0, 0.5)}
    assert at[0.0] != at[0.5]
    assert tokens(http, model="fortunes") == at[0.5]  # the adapter at its own scale (--lora-scaled 0.5)
    assert tokens(http, model="smol") == at[0.0]  # the base's name: no adapter
    assert tokens(http, model="gpt-4o") == at[0.5] == tokens(http)  # other names: the global scales, as llama.cpp
    assert tokens(http, model="fortunes", lora=[{"id": 0, "scale": 0.0}]) == at[0.0]  # lora still overrides
    assert tokens(http, "/completion", model="fortunes") == tokens(http, "/completion", lora=[{"id": 0, "scale": 0.5}])


def test_load_and_unload_while_a_request_streams(http, url):
    alone = http.post("/completion", json={"prompt": PROMPT, "n_predict": 120, "temperature": 0, "ignore_eos": True,
                                           "model": "fortunes"}).json()["tokens"]
    with client(url) as other, concurrent.futures.ThreadPoolExecutor(1) as pool:
        def stream_long():
            body = {"prompt": PROMPT, "n_predict": 120, "temperature": 0, "ignore_eos": True, "stream": True,
                    "model": "fortunes"}
            with other.stream("POST", "/completion", json=body) as r:
                return [e["tokens"][0] for e in sse_events(r) if not e["stop"]]

        running = pool.submit(stream_long)
        deadline = time.monotonic() + 30
        while http.get("/health").json()["slots_processing"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        loaded = http.post("/lora-adapters/load", json={"name": "fortunes-2", "path": ADAPTER, "scale": 1.0})
        assert loaded.status_code == 200, loaded.text
        new_id = loaded.json()["adapter"]["id"]
        assert new_id == 1 and [a["name"] for a in http.get("/lora-adapters").json()] == ["fortunes", "fortunes-2"]
        assert tokens(http, model="fortunes-2") == tokens(http, lora=[{"id": new_id, "scale": 1.0}])
        # The run-time adapter starts at global scale 0: requests that name nothing do not get it.
        assert tokens(http) == tokens(http, lora=[{"id": 0, "scale": 0.5}])
        gone = http.post("/lora-adapters/unload", json={"name": "fortunes"})
        assert gone.status_code == 200, gone.text
        still_running = not running.done()
        streamed = running.result()
    assert still_running and streamed == alone  # the running request kept its adapter to the end
    assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["smol", "fortunes-2"]
    r = http.post("/completion", json={"prompt": PROMPT, "n_predict": 1, "lora": [{"id": 0, "scale": 1}]})
    assert r.status_code == 400 and "adapter 0 does not exist" in r.json()["error"]["message"]
    # Put the start-up adapter back under its name (a new id) for what follows.
    assert http.post("/lora-adapters/unload", json={"name": "fortunes-2"}).status_code == 200
    assert http.post("/v1/load_lora_adapter", json={"lora_name": "fortunes", "lora_path": ADAPTER}).text == \
        "Success: LoRA adapter 'fortunes' added successfully."
    assert tokens(http, model="fortunes") == tokens(http, lora=[{"id": 2, "scale": 1.0}])


@pytest.mark.parametrize("path,body,status,fragment", [
    ("/lora-adapters/load", {"name": "x", "path": "/no/such/adapter"}, 400, "/no/such/adapter"),
    ("/lora-adapters/load", {"name": "smol", "path": ADAPTER}, 400, "base model's name"),
    ("/lora-adapters/load", {"name": "a b", "path": ADAPTER}, 400, "'name'"),
    ("/lora-adapters/load", {"name": "x"}, 400, "'path'"),
    ("/lora-adapters/unload", {"name": "nobody"}, 404, "no adapter named 'nobody'"),
])
def test_load_errors(http, path, body, status, fragment):
    r = http.post(path, json=body)
    assert r.status_code == status and fragment in r.json()["error"]["message"], r.text
    assert http.get("/health").json()["status"] == "ok"


def test_loading_needs_lora_admin_or_the_api_key(smollm2):
    body = {"name": "x", "path": ADAPTER}
    with running_server(smollm2, [], n_ctx=256) as base, client(base) as c:
        r = c.post("/lora-adapters/load", json=body)
        assert r.status_code == 403 and "--lora-admin" in r.json()["error"]["message"]
        assert c.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": ADAPTER}).status_code == 403
    with running_server(smollm2, [], n_ctx=256, api_key="k") as base, client(base) as c:
        assert c.post("/lora-adapters/load", json=body).status_code == 401
        r = c.post("/lora-adapters/load", json=body, headers={"Authorization": "Bearer k"})
        assert r.status_code == 200 and r.json()["adapter"]["name"] == "x"


def test_adapter_names_on_the_command_line(tmp_path):
    from click.testing import CliRunner

    from llamalora.cli import cli
    from llamalora.server.adapters import default_name, split_named

    assert split_named("fortunes=" + ADAPTER) == ("fortunes", ADAPTER)
    assert split_named(ADAPTER) == ("lora-fortunes", ADAPTER)
    assert default_name("/x/ggml-adapter-model.bin") == "ggml-adapter-model" and default_name("/x/a.gguf") == "a"
    odd = tmp_path / "a=b"
    odd.mkdir()
    assert split_named(str(odd)) == ("a=b", str(odd))  # a path that exists is never split
    result = CliRunner().invoke(cli, ["server", "--lora", ADAPTER, "--lora", "lora-fortunes=" + ADAPTER])
    assert result.exit_code == 1 and "two adapters are named 'lora-fortunes'" in result.output
