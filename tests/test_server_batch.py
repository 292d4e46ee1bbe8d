"""The server's slots decode in one batched step (continuous batching): requests running at once, with different
adapter scales, grammars or none, get exactly what each gets alone."""

import concurrent.futures
import json
import re
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from server_helpers import ADAPTER, client, running_app  # noqa: E402

from llamalora import batch  # noqa: E402

PROMPT = "My fortune for today:"
GRAMMAR = 'root ::= " The answer is " ("yes" | "no") ", because " [a-z ]+ "."'


@pytest.fixture(scope="module")
def server(smollm2):
    from llamalora.loader import load_adapters

    adapters = load_adapters(smollm2.file, [(ADAPTER, 1.0)])
    with running_app(smollm2, adapters, n_ctx=2048, n_parallel=4, adapter_paths=[ADAPTER], scales=[1.0]) as found:
        yield found


@pytest.fixture(scope="module")
def http(server):
    with client(server[0]) as c:
        yield c


@pytest.fixture
def steps(monkeypatch):
    """How many sequences decoded in each step (the server runs in this process)."""
    seen = []

    def recording(model, items):
        seen.append(sum(len(ids) == 1 for _, ids in items))
        return step(model, items)

    step = batch.step
    monkeypatch.setattr(batch, "step", recording)
    return seen


def complete(http, **body):
    body = {"prompt": PROMPT, "temperature": 0, "n_predict": 12, "cache_prompt": False, **body}
    r = http.post("/completion", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def at_once(url, bodies):
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        def one(body):
            with client(url) as c:
                return complete(c, **body)
        return list(pool.map(one, bodies))


def test_four_scales_at_once_equal_each_alone(server, http, steps):
    """Four requests, each with its own scale of the adapter (0 among them), decoded in the same steps: each
    request's greedy tokens are those it gets alone."""
    bodies = [{"lora": [{"id": 0, "scale": s}]} for s in (0.0, 0.5, 1.0, 2.0)]
    alone = [complete(http, **body)["tokens"] for body in bodies]
    assert len({tuple(t) for t in alone}) > 1  # the scales change the answer: the comparison means something
    steps.clear()
    together = [out["tokens"] for out in at_once(server[0], bodies)]
    assert together == alone
    assert max(steps) >= 3  # (the requests did share steps)


def test_grammar_and_free_requests_side_by_side(server, http, steps):
    bodies = [{"grammar": GRAMMAR, "n_predict": 24}, {}, {"lora": [{"id": 0, "scale": 0.5}]},
              {"grammar": GRAMMAR, "n_predict": 24, "lora": [{"id": 0, "scale": 2.0}]}]
    alone = [complete(http, **body) for body in bodies]
    steps.clear()
    together = at_once(server[0], bodies)
    assert [out["tokens"] for out in together] == [out["tokens"] for out in alone]
    assert max(steps) >= 3
    for out in (together[0], together[3]):  # (the grammar's sentence, or its start when n_predict ends it)
        assert re.fullmatch(r" The answer is (yes|no), because [a-z ]*\.?", out["content"]), out["content"]


def test_a_hang_up_leaves_the_batch_and_the_others_go_on(server, http):
    url, app = server
    body = {"prompt": PROMPT, "temperature": 0, "n_predict": 40, "ignore_eos": True, "cache_prompt": False}
    alone = complete(http, **{k: v for k, v in body.items() if k != "prompt"})["tokens"]

    def hang_up():
        with client(url) as c, c.stream("POST", "/completion", json={**body, "stream": True}) as r:
            lines = r.iter_lines()
            for line in lines:
                if line.startswith("data: ") and json.loads(line[6:])["tokens"]:
                    break

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        staying = [pool.submit(at_once, url, [{k: v for k, v in body.items() if k != "prompt"}]) for _ in range(2)]
        pool.submit(hang_up).result()
        assert [f.result()[0]["tokens"] for f in staying] == [alone, alone]
    pool = app.state.server.pool
    deadline = time.monotonic() + 10
    while pool.n_busy() or pool.scheduler.joined:
        assert time.monotonic() < deadline, "a slot stayed in the batch after its client left"
        time.sleep(0.05)


def test_slot_state(server, http):
    """/slots follows a request through its phases in the batch (pool.slot_state)."""
    url, app = server
    seen = set()
    with concurrent.futures.ThreadPoolExecutor(1) as runner:
        job = runner.submit(complete, http, n_predict=200, ignore_eos=True, id_slot=2)
        deadline = time.monotonic() + 60
        with client(url) as watcher:
            while not job.done() and time.monotonic() < deadline:
                state = watcher.get("/slots").json()[2]
                if state["is_processing"]:
                    seen.add(state["phase"])
                    assert state["n_ctx"] == 512
                    if state["phase"] == "prompt":  # nothing in the cache until its first chunk has run
                        assert 0 <= state["n_prompt_tokens_processed"] < state["n_prompt_tokens"]
                    else:
                        assert state["n_past"] > 0
                time.sleep(0.002)
        assert job.result()["tokens_predicted"] == 200
    assert "decoding" in seen or "sampling" in seen
    state = app.state.server.pool.slot_state(app.state.server.pool.slots[2])
    assert state["phase"] == "idle" and state["n_past"] > 200
