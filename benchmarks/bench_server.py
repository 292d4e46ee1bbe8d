"""Load test of `llamalora server`: 32 concurrent streaming clients for 60 s on the loopback, some hanging up early.

    python benchmarks/bench_server.py [-m MODEL.gguf] [--clients 32] [--seconds 60] [-np 4] [-c 4096] [--lora DIR]

Starts the server itself (python -m llamalora.server) on a free 127.0.0.1 port and stops it at the end; sends
traffic nowhere else. Every client loops: a streamed /completion (n_predict 8..32, its own seed, with or
without a per-request adapter scale when --lora is given); every fourth request hangs up after its third token.
Checks: no request fails, every stream that runs to the end has one event per token and a final object whose
token list equals them, and the server's memory (VmRSS) ends where it stood after the first requests.
Reports requests/s and the time to first token (p50, p99); exit status 1 if a check fails.
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
            async for line in r.aiter_lines():
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default=None)
    ap.add_argument("--lora", default=None, help="adapter to load; requests then carry per-request scales")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("-np", "--parallel", type=int, default=4)
    ap.add_argument("-c", "--ctx-size", type=int, default=4096)
    ap.add_argument("-t", "--threads", type=int, default=None)
    args = ap.parse_args()

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
