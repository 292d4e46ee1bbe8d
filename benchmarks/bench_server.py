"""`llamalora server` under load: the throughput table beside llama.cpp's server, and the soak test.

    python benchmarks/bench_server.py --table [-m smollm2:q4_1 -m 1b:q4_0] [-np 4 -c 4096 -t 2] [--tokens 64]
                                      [--rounds 2] [--llama-server PATH]
    python benchmarks/bench_server.py [-m MODEL.gguf] [--clients 32] [--seconds 60] [-np 4] [-c 4096] [--lora DIR]

Both start the servers themselves on free 127.0.0.1 ports and stop them at the end; they send traffic nowhere else.

The table (--table): for each model, our server (python -m llamalora.server) and llama.cpp's llama-server on the
same file with the same -np, -c and -t, one after the other in this run: --rounds rounds of N clients at once (1, 4
and 8), each streaming a /completion of --tokens tokens (greedy, ignore_eos; its own prompt); then, with the model
family's all-linear r=16 adapter (benchmarks/bench_lora.py; ours as the PEFT folder at run time, llama.cpp's as GGUF
through --lora), 4 clients all at scale 1 and 4 clients at four different scales (per-request "lora"). Each row:
aggregate tokens/s (tokens streamed / the rounds' wall time) and the time to first token (p50 over the requests).
Models as benchmarks/models.py names them (smollm2:q4_1 is the shipped file, 1b:q4_0 the random 1B-shaped llama) or
paths. The table goes to stdout and benchmarks/results/server_table.md.

llama.cpp's server: --llama-server PATH, else $LLAMA_SERVER, else benchmarks/peers/native/bin/llama-server (the
folder is git-ignored). Build it from the source inside llama-cpp-python 0.3.36 on PyPI:

    pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36 -d benchmarks/peers
    tar xzf benchmarks/peers/llama_cpp_python-0.3.36.tar.gz -C benchmarks/peers
    cmake -S benchmarks/peers/llama_cpp_python-0.3.36/vendor/llama.cpp -B benchmarks/peers/native \
          -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF
    cmake --build benchmarks/peers/native --target llama-server -j 2

(on Intel Xeons with AMX add -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF to the first cmake, as
the other benchmarks' llama.cpp is built).

The soak (default): every client loops: a streamed /completion (n_predict 8..32, its own seed, with or without a
per-request adapter scale when --lora is given); every fourth request hangs up after its third token. Checks: no
request fails, every stream that runs to the end has one event per token and a final object whose token list equals
them, and the server's memory (VmRSS) ends where it stood after the first requests. Reports requests/s and the time
to first token (p50, p99); exit status 1 if a check fails.
"""

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import httpx

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
DEFAULT_LLAMA_SERVER = os.path.join(HERE, "peers", "native", "bin", "llama-server")
TABLE_SCALES = (0.25, 0.5, 0.75, 1.0)  # the mixed rows: one scale per client
PROMPTS = [
    "Once upon a time",
    "The three most important things about the ocean are",
    "Write a short poem about autumn leaves:",
    "My fortune for today:",
    "def fibonacci(n):",
    "The capital of France is",
    "Here is a recipe for pancakes. Ingredients:",
    "In the year 2050, cities will",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def percentile(values, q):
    values = sorted(values)
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


async def one_request(http, n, stats, adapters):
    body = {"prompt": PROMPTS[n % len(PROMPTS)], "n_predict": 8 + n % 25, "temperature": 0.8, "seed": n,
            "stream": True, "cache_prompt": True}
    if adapters:
        body["lora"] = [{"id": 0, "scale": (n % 3) / 2}]
    hang_up = n % 4 == 3
    start = time.perf_counter()
    first = None
    tokens, final = [], None
    try:
        async with http.stream("POST", "/completion", json=body) as r:
            if r.status_code != 200:
                stats["failed"].append(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
                return
            async for line in sse_lines(r):
                if not line.startswith("data: "):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    stats["failed"].append(event["error"]["message"])
                    return
                if first is None:
                    first = time.perf_counter() - start
                if event["stop"]:
                    final = event
                    break
                tokens += event["tokens"]
                if hang_up and len(tokens) >= 3:
                    break
    except httpx.HTTPError as e:
        stats["failed"].append(f"{type(e).__name__}: {e}")
        return
    if first is not None:
        stats["ttft"].append(first)
    if hang_up and final is None:
        stats["hung_up"] += 1
        return
    if final is None or final["tokens"] != tokens or final["tokens_predicted"] != len(tokens):
        stats["lost"] += 1
        return
    stats["done"] += 1
    stats["tokens"] += len(tokens)


async def client_loop(url, index, deadline, stats, adapters, counter):
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        while time.monotonic() < deadline:
            counter[0] += 1
            await one_request(http, counter[0] * 97 + index, stats, adapters)


async def load(url, n_clients, seconds, adapters, pid):
    stats = {"failed": [], "ttft": [], "done": 0, "hung_up": 0, "lost": 0, "tokens": 0}
    counter = [0]
    # Warm-up: the first requests compile or load the kernels; memory is measured from after them.
    async with httpx.AsyncClient(base_url=url, timeout=None) as http:
        await http.post("/completion", json={"prompt": PROMPTS[0], "n_predict": 4, "temperature": 0.8})
    await asyncio.gather(*(client_loop(url, i, time.monotonic() + 5, {**stats, "failed": [], "ttft": []},
                                       adapters, [0]) for i in range(4)))
    rss = [rss_mib(pid)]
    start = time.monotonic()
    deadline = start + seconds

    async def sample_memory():
        while time.monotonic() < deadline:
            await asyncio.sleep(5)
            rss.append(rss_mib(pid))

    await asyncio.gather(sample_memory(), *(client_loop(url, i, deadline, stats, adapters, counter)
                                            for i in range(n_clients)))
    elapsed = time.monotonic() - start
    async with httpx.AsyncClient(base_url=url) as http:
        health = (await http.get("/health")).json()
    rss.append(rss_mib(pid))
    return stats, elapsed, rss, health


# --- the table: aggregate tokens/s and time to first token, ours beside llama.cpp's server ---------------------


def wait_ready(server, url, timeout=300):
    """Until /health answers 200 (llama.cpp's answers 503 while it loads); exits if the server died."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"bench_server: the server did not start ({' '.join(server.args)})")
        time.sleep(0.2)


def server_command(engine, model, adapter, args, port):
    """The command line of our server or llama.cpp's, on model with the same -np, -c and -t (and the adapter)."""
    common = ["--port", str(port), "-np", str(args.parallel), "-c", str(args.ctx_size), "-t", str(args.threads)]
    if engine == "llamalora":
        return [sys.executable, "-m", "llamalora.server", "-m", model, *common, "-to", "600",
                *(["--lora", adapter] if adapter else [])]
    return [args.llama_server, "-m", model, "--host", "127.0.0.1", *common, "--no-webui",
            *(["--lora", adapter] if adapter else [])]


async def sse_lines(response):
    """The lines of an event stream, split where SSE splits them (LF, CR LF): httpx's aiter_lines also splits at
    U+2028, U+0085 ..., which JSON leaves unescaped inside strings (a random model's text has them)."""
    pending = b""
    async for chunk in response.aiter_bytes():
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield line.rstrip(b"\r").decode("utf-8")
    if pending:
        yield pending.rstrip(b"\r").decode("utf-8")


async def stream_completion(http, body):
    """(time to first token, tokens generated) of one streamed /completion."""
    start = time.perf_counter()
    first = None
    async with http.stream("POST", "/completion", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in sse_lines(r):
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"].get("message", str(event["error"])))
            if first is None and (event.get("content") or event.get("tokens")):
                first = time.perf_counter() - start
            if event.get("stop"):
                return (first if first is not None else time.perf_counter() - start), event["tokens_predicted"]
    raise RuntimeError("the stream ended without a final event")


async def clients_at_once(url, n_clients, rounds, n_tokens, scales):
    """(aggregate tokens/s, time to first token p50 in ms) of `rounds` rounds of n_clients concurrent requests."""
    elapsed, total, ttft = 0.0, 0, []
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        for round_ in range(rounds):
            bodies = []
            for i in range(n_clients):
                body = {"prompt": f"{PROMPTS[i % len(PROMPTS)]} ({round_}.{i})", "n_predict": n_tokens,
                        "temperature": 0, "ignore_eos": True, "stream": True, "cache_prompt": True}
                if scales is not None:
                    body["lora"] = [{"id": 0, "scale": scales[i % len(scales)]}]
                bodies.append(body)
            start = time.perf_counter()
            results = await asyncio.gather(*(stream_completion(http, body) for body in bodies))
            elapsed += time.perf_counter() - start
            total += sum(n for _, n in results)
            ttft += [t for t, _ in results]
    return total / elapsed, 1000 * statistics.median(ttft)


def table_rows(engine, model, adapter, args):
    """[(clients, adapter setting, tokens/s, ttft p50 ms)] of one server: base at each --clients count, or with
    the adapter: 4 clients at scale 1, 4 clients at four scales."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_"))}
    server = subprocess.Popen(server_command(engine, model, adapter, args, port), cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(server, url)
        one = [1.0] if adapter else None
        asyncio.run(clients_at_once(url, 1, 1, 8, one))  # warm-up: first requests load or compile the kernels
        asyncio.run(clients_at_once(url, args.parallel, 1, 8, one))
        if not adapter:
            cases = [(n, "-", None) for n in args.clients_list]
        else:
            n = args.parallel
            cases = [(n, "scale 1", [1.0]), (n, f"{len(TABLE_SCALES)} scales", list(TABLE_SCALES))]
        rows = []
        for n_clients, setting, scales in cases:
            rate, ttft = asyncio.run(clients_at_once(url, n_clients, args.rounds, args.tokens, scales))
            rows.append((n_clients, setting, rate, ttft))
            print(f"  {engine:9s} {os.path.basename(model)} {n_clients} clients, adapter {setting}: "
                  f"{rate:.1f} tokens/s, first token p50 {ttft:.0f} ms (load {os.getloadavg()[0]:.2f})", flush=True)
        return rows
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


def cpu_name() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


def table_main(args):
    from bench_generate import adapter_paths, model_path

    have_peer = os.path.exists(args.llama_server)
    if not have_peer:
        print(f"bench_server: no llama-server at {args.llama_server} (see --help to build it); ours only",
              file=sys.stderr)
    engines = ["llamalora"] + (["llama.cpp"] if have_peer else [])
    lines = [f"# Server throughput (`python benchmarks/bench_server.py --table`)", "",
             f"{cpu_name()}, {os.cpu_count()} CPUs; -np {args.parallel} -c {args.ctx_size} -t {args.threads}; "
             f"{args.rounds} rounds of N clients each streaming {args.tokens} tokens (greedy, ignore_eos); "
             f"load average at the start {os.getloadavg()[0]:.2f}", "",
             "| model | adapter | clients | ours t/s | ours first token p50 ms | llama.cpp t/s | "
             "llama.cpp first token p50 ms | ratio |", "|---|---|---|---|---|---|---|---|"]
    summary = []
    for name in args.model or ["smollm2:q4_1", "1b:q4_0"]:
        model = model_path(name)
        folder, gguf = adapter_paths(name)
        results = {}
        for adapter_kind in ("none", "lora"):
            for engine in engines:
                adapter = None if adapter_kind == "none" else (folder if engine == "llamalora" else gguf)
                results[engine, adapter_kind] = table_rows(engine, model, adapter, args)
        for adapter_kind in ("none", "lora"):
            ours = results["llamalora", adapter_kind]
            theirs = results.get(("llama.cpp", adapter_kind), [None] * len(ours))
            for mine, peer in zip(ours, theirs):
                n_clients, setting, rate, ttft = mine
                peer_cells = f"{peer[2]:.1f} | {peer[3]:.0f} | {rate / peer[2]:.2f}" if peer else "- | - | -"
                lines.append(f"| {name} | {setting if adapter_kind == 'lora' else '-'} | {n_clients} | {rate:.1f} | "
                             f"{ttft:.0f} | {peer_cells} |")
        base = {row[0]: row[2] for row in results["llamalora", "none"]}
        lora = results["llamalora", "lora"]
        notes = [f"{name}: ours {n} clients / 1 client {base[n] / base[1]:.2f}" for n in base if n != 1 and 1 in base]
        if args.parallel in base and 2 * args.parallel in base:
            notes.append(f"{2 * args.parallel} clients / {args.parallel} {base[2 * args.parallel] / base[args.parallel]:.2f}")
        notes.append(f"{len(TABLE_SCALES)} scales / one scale {lora[1][2] / lora[0][2]:.2f}")
        if ("llama.cpp", "lora") in results:
            peer = results["llama.cpp", "lora"]
            notes.append(f"llama.cpp's {len(TABLE_SCALES)} scales / one scale {peer[1][2] / peer[0][2]:.2f}")
        summary.append(", ".join(notes))
    lines += ["", f"load average at the end {os.getloadavg()[0]:.2f}", ""] + [f"- {line}" for line in summary]
    text = "\n".join(lines) + "\n"
    print(text)
    with open(args.output, "w") as f:
        f.write(text)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--table", action="store_true", help="the throughput table beside llama.cpp's server")
    ap.add_argument("-m", "--model", default=None, action="append",
                    help="model file or benchmarks/models.py name (--table: repeatable)")
    ap.add_argument("--lora", default=None, help="soak: adapter to load; requests then carry per-request scales")
    ap.add_argument("--clients", type=int, default=None,
                    help="soak: streaming clients (32); --table: the largest client count (2 × -np)")
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("-np", "--parallel", type=int, default=4)
    ap.add_argument("-c", "--ctx-size", type=int, default=4096)
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("--tokens", type=int, default=64, help="--table: tokens each request streams")
    ap.add_argument("--rounds", type=int, default=2, help="--table: rounds of each client count")
    ap.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER", DEFAULT_LLAMA_SERVER),
                    help="llama.cpp's llama-server (default: $LLAMA_SERVER, else benchmarks/peers/native/bin)")
    ap.add_argument("--output", default=os.path.join(HERE, "results", "server_table.md"))
    args = ap.parse_args()
    if args.table:
        args.threads = args.threads or 2
        args.clients_list = [1, args.parallel, args.clients or 2 * args.parallel]
        return table_main(args)
    args.clients = args.clients or 32
    args.model = args.model[-1] if args.model else None

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "llamalora.server", "--port", str(port), "-np", str(args.parallel),
           "-c", str(args.ctx_size), "-to", "300"]
    for flag, value in (("-m", args.model), ("--lora", args.lora), ("-t", args.threads)):
        if value is not None:
            cmd += [flag, str(value)]
    server = subprocess.Popen(cmd, cwd=os.path.dirname(HERE))
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                sys.exit("bench_server: the server did not start")
            time.sleep(0.2)
        stats, elapsed, rss, health = asyncio.run(load(url, args.clients, args.seconds, bool(args.lora), server.pid))
    finally:
        server.terminate()
        server.wait(timeout=30)

    n_requests = stats["done"] + stats["hung_up"]
    ttft = stats["ttft"]
    growth = rss[-1] - rss[0]
    lines = [
        f"bench_server: {args.clients} streaming clients, {elapsed:.0f} s, -np {args.parallel}, -c {args.ctx_size}, "
        f"adapter {'on (per-request scales)' if args.lora else 'off'}",
        f"  requests: {n_requests} ({stats['done']} complete, {stats['hung_up']} hung up early), "
        f"{n_requests / elapsed:.2f} requests/s, {stats['tokens'] / elapsed:.1f} streamed tokens/s",
        f"  time to first token: p50 {1000 * statistics.median(ttft) if ttft else float('nan'):.0f} ms, "
        f"p99 {1000 * percentile(ttft, 99):.0f} ms",
        f"  failed: {len(stats['failed'])}, lost streams: {stats['lost']}, slots busy after: "
        f"{health['slots_processing']}",
        f"  server memory (VmRSS MiB): after warm-up {rss[0]:.0f}, max {max(rss):.0f}, end {rss[-1]:.0f} "
        f"(growth {growth:+.0f})",
    ]
    print("\n".join(lines))
    for message in stats["failed"][:5]:
        print("  failure:", message)
    ok = not stats["failed"] and not stats["lost"] and n_requests > 0 and growth < 64
    print("bench_server:", "OK" if ok else "FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
