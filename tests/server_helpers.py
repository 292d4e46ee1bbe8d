"""Start the real server (uvicorn, a free loopback port) in a background thread for the server tests."""

import contextlib
import json
import threading
import time

import httpx

from conftest import data_path

ADAPTER = data_path("lora-fortunes")


@contextlib.contextmanager
def running_server(loaded, adapters, **options):
    """Yields the base URL of a server for `loaded` on 127.0.0.1, port chosen by the OS; stops it afterwards."""
    with running_app(loaded, adapters, **options) as (url, _):
        yield url


@contextlib.contextmanager
def running_app(loaded, adapters, **options):
    """running_server, yielding (base URL, the Starlette app) (app.state.server.pool: its slots)."""
    import uvicorn

    from llamalora.server.app import ServerOptions, create_app

    opts = ServerOptions(**options)
    app = create_app(loaded, opts, adapters)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def sse_events(response) -> list:
    """The JSON objects of a server-sent event stream (data: lines; [DONE] left out)."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            events.append(json.loads(line[6:]))
    return events


def client(url: str, **kw) -> httpx.Client:
    kw.setdefault("timeout", 60)
    return httpx.Client(base_url=url, **kw)
