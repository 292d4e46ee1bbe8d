"""Operations routes: /metrics in Prometheus text (read back with prometheus_client's parser) and /slots as
llama.cpp's, each behind its flag."""

import concurrent.futures
import time

import pytest


from server_helpers import ADAPTER, client, running_server  # noqa: E402


@pytest.fixture(scope="module")
def url(smollm2):
    from llamalora.loader import load_adapters

    adapters = load_adapters(smollm2.file, [(ADAPTER, 1.0)])
    with running_server(smollm2, adapters, n_ctx=1024, n_parallel=2, alias="smol", adapter_paths=[ADAPTER],
                        adapter_names=["fortunes"], scales=[0.0], metrics=True) as base:
        yield base


def samples(text: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_metrics_count_requests_tokens_and_adapters(url):
    with client(url) as http:
        before = samples(http.get("/metrics").text)
        for body in ({"n_predict": 5}, {"n_predict": 3, "model": "fortunes"}, {"n_predict": 4, "model": "fortunes"}):
            r = http.post("/completion", json={"prompt": "Hello there", "temperature": 0, "ignore_eos": True, **body})
            assert r.status_code == 200
        deadline = time.monotonic() + 10  # a slot goes back to the pool just after its answer is sent
        while http.get("/health").json()["slots_idle"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        response = http.get("/metrics")
        after = samples(response.text)
    assert response.headers["content-type"].startswith("text/plain")

    def grew(name, labels=()):
        return after[(name, labels)] - before.get((name, labels), 0)

    assert grew("llamacpp:tokens_predicted_total") == 12
    assert grew("llamacpp:prompt_tokens_total") > 0 and after[("llamacpp:prompt_seconds_total", ())] > 0
    assert after[("llamacpp:predicted_tokens_seconds", ())] > 0
    assert after[("llamacpp:requests_processing", ())] == 0 and after[("llamacpp:requests_deferred", ())] == 0
    assert grew("llamalora:requests_total", (("adapter", "base"),)) == 1
    assert grew("llamalora:requests_total", (("adapter", "fortunes@1"),)) == 2
    assert grew("llamalora:tokens_predicted_total", (("adapter", "fortunes@1"),)) == 7
    assert after[("llamalora:slots", ())] == 2


def test_slots_show_the_running_request(url):
    with client(url) as http, client(url) as other, concurrent.futures.ThreadPoolExecutor(1) as pool:
        idle = http.get("/slots").json()
        assert [s["id"] for s in idle] == [0, 1] and not any(s["is_processing"] for s in idle)
        body = {"prompt": "Count:", "n_predict": 300, "ignore_eos": True, "temperature": 0, "seed": 4,
                "model": "fortunes"}
        job = pool.submit(other.post, "/completion", json=body)
        deadline = time.monotonic() + 30
        while True:
            busy = [s for s in http.get("/slots").json() if s["is_processing"]]
            if busy and busy[0]["next_token"]["n_decoded"] > 0:
                break
            assert time.monotonic() < deadline
            time.sleep(0.02)
        slot = busy[0]
        assert slot["params"]["n_predict"] == 300 and slot["params"]["seed"] == 4 and slot["id_task"] >= 0
        assert slot["params"]["lora"] == [{"id": 0, "scale": 1.0}] and slot["adapters"] == "fortunes@1"
        assert slot["next_token"]["n_remain"] == 300 - slot["next_token"]["n_decoded"]
        assert http.get("/slots?fail_on_no_slot=1").status_code == 200  # one of two is free
        assert job.result().status_code == 200
    with client(url) as http:
        deadline = time.monotonic() + 10
        while any(s["is_processing"] for s in http.get("/slots").json()):
            assert time.monotonic() < deadline, "a slot still shows a finished request"
            time.sleep(0.01)


def test_flags_turn_the_routes_off_and_the_key_guards_them(smollm2):
    with running_server(smollm2, [], n_ctx=256, slots=False) as base, client(base) as c:
        for path, flag in (("/metrics", "--metrics"), ("/slots", "--no-slots")):
            r = c.get(path)
            assert r.status_code == 501 and flag in r.json()["error"]["message"]
    with running_server(smollm2, [], n_ctx=256, metrics=True, api_key="k") as base, client(base) as c:
        assert c.get("/metrics").status_code == 401 and c.get("/slots").status_code == 401
        assert c.get("/slots", headers={"Authorization": "Bearer k"}).status_code == 200


def test_server_command_line_flags(smollm2_path):
    """--metrics, --no-slots and --lora-admin reach the options."""
    from click.testing import CliRunner

    from llamalora.server import cli as server_cli

    import uvicorn

    seen = {}

    def fake_run(app, **kw):  # the app is built; it need not listen
        seen["options"] = app.state.server.options

    run, uvicorn.run = uvicorn.run, fake_run
    try:
        result = CliRunner().invoke(server_cli.server_command, ["-m", smollm2_path, "--metrics", "--no-slots",
                                                                "--lora-admin", "--lora", "f=" + ADAPTER])
    finally:
        uvicorn.run = run
    assert result.exit_code == 0, result.output
    options = seen["options"]
    assert options.metrics and not options.slots and options.lora_admin and options.adapter_names == ["f"]
