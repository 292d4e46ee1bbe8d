"""The `llamalora server` command: llama.cpp's server flags, the model loaded once, uvicorn serving the app."""

import os

import click

from ..options import Option, load_from_options, model_options
from ..errors import InputError


def load_for_server(model_path, threads, no_mmap, loras, loras_scaled, lora_base, lora_mode, verbose):
    """The model and its adapters (each --lora NAME=PATH, a bare PATH named after its folder or file).
    Adapters stay unmerged (run-time deltas at user scale 1, the scales kept apart) so that /lora-adapters, a
    request's "lora" and its "model" change scales without touching the weights; only --lora-base or
    --lora-mode merge merges them, and then their scales are fixed. Returns (loaded, adapter objects, names,
    paths, scales, merged)."""
    from ..loader import load_adapters
    from .adapters import split_named

    named = [split_named(v) for v in loras] + [split_named(v) for v, _ in loras_scaled]
    names, paths = [n for n, _ in named], [p for _, p in named]
    scales = [1.0] * len(loras) + [float(scale) for _, scale in loras_scaled]
    if lora_base or lora_mode == "merge":
        plain, scaled = paths[: len(loras)], list(zip(paths[len(loras):], scales[len(loras):]))
        loaded = load_from_options(model_path, threads, no_mmap, plain, scaled, lora_base, lora_mode, verbose)
        return loaded, [], names, paths, scales, True
    loaded = load_from_options(model_path, threads, no_mmap, (), (), None, "auto", verbose)
    adapters = load_adapters(loaded.file, [(path, 1.0) for path in paths])
    return loaded, adapters, names, paths, scales, False


@click.command("server")
@model_options
@click.option("-c", "--ctx-size", "--ctx_size", cls=Option, type=int, default=2048, help="context size in tokens, shared by the slots (0: the model's)")
@click.option("-b", "--batch-size", "--batch_size", cls=Option, type=int, default=512, help="prompt tokens evaluated per batch")
@click.option("-ub", "--ubatch-size", cls=Option, type=int, default=128, show_default=True,
              help="prompt tokens a batched step evaluates beside the other slots' next tokens (a longer prompt "
                   "is read a chunk a step)")
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on")
@click.option("--port", type=int, default=8080, show_default=True, help="port to listen on")
@click.option("--path", "static_path", type=click.Path(exists=True, file_okay=False), default=None,
              help="serve the web page from this folder instead of the built-in one")
@click.option("--embedding", "--embeddings", "embedding", is_flag=True, help="enable the /embedding route")
@click.option("-to", "--timeout", type=float, default=600.0, show_default=True,
              help="seconds a request may wait for a slot, and the idle keep-alive of a connection")
@click.option("--alias", type=str, default=None, help="model name the API reports (default: the file name)")
@click.option("--api-key", type=str, default=None, help="require `Authorization: Bearer KEY` on the API routes")
@click.option("-np", "--parallel", type=int, default=1, show_default=True, help="slots: requests served at once")
@click.option("--max-body", type=int, default=4 * 2**20, show_default=True,
              help="refuse request bodies larger than this many bytes (413)")
@click.option("--lora-admin", is_flag=True,
              help="allow POST /lora-adapters/load and /unload without an API key (with --api-key they need the key)")
@click.option("--metrics", is_flag=True, help="serve Prometheus metrics at GET /metrics")
@click.option("--slots/--no-slots", default=True, show_default=True, help="show the slots' state at GET /slots")
def server_command(model_path, threads, no_mmap, loras, loras_scaled, lora_base, lora_mode, verbose, ctx_size,
                   batch_size, ubatch_size, host, port, static_path, embedding, timeout, alias, api_key, parallel,
                   max_body,
                   lora_admin, metrics, slots):
    """HTTP server with llama.cpp's API, OpenAI-compatible /v1 routes, a web page and LoRA scales per request.
    Adapters are named with --lora NAME=PATH (a bare PATH is named after its folder or file) and chosen by
    that name in a request's "model"."""
    import uvicorn

    from .app import ServerOptions, create_app

    for name, value, low in (("-c", ctx_size, 0), ("-b", batch_size, 1), ("-ub", ubatch_size, 1), ("-np", parallel, 1),
                             ("--port", port, 0),
                             ("-to", timeout, 0), ("--max-body", max_body, 1)):
        if value < low:
            raise InputError(f"{name} must be at least {low}, got {value}")
    from .adapters import check_names

    loaded, adapters, names, paths, scales, merged = load_for_server(model_path, threads, no_mmap, loras,
                                                                     loras_scaled, lora_base, lora_mode, verbose)
    check_names(names, alias or os.path.basename(loaded.file.path))
    n_ctx = ctx_size or loaded.model.config.n_ctx_train
    if n_ctx // parallel < 16:
        raise InputError(f"-c {n_ctx} leaves {n_ctx // parallel} tokens per slot for -np {parallel}; raise -c")
    options = ServerOptions(n_ctx=n_ctx, n_batch=batch_size, n_ubatch=ubatch_size, n_parallel=parallel,
                            embedding=embedding, alias=alias,
                            api_key=api_key, static_dir=static_path, timeout=timeout, adapter_paths=paths,
                            scales=scales, adapters_merged=merged, adapter_names=names, lora_admin=lora_admin,
                            metrics=metrics, slots=slots, max_body=max_body)
    app = create_app(loaded, options, adapters)
    click.echo(f"llamalora server: {loaded.file.path}, {parallel} slot(s) of {n_ctx // parallel} tokens, "
               f"listening on http://{host}:{port}", err=True)
    uvicorn.run(app, host=host, port=port, timeout_keep_alive=int(max(timeout, 1)), log_level="warning")
