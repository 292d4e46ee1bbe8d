"""Decode speed under each way idle kernel threads can wait, on a quiet machine and beside a busy process.

    python benchmarks/bench_threads.py [-m smollm2:q4_1] [-t 2] [--tokens 128] [--rounds 3]
                                       [--policy default --policy passive --policy spin:10000 ...]

Between a token's few hundred parallel loops the team's idle threads either spin (fast wake-up, but a spinning
thread holds its core) or sleep (a futex wake-up per loop). Each policy runs in a process of its own (libgomp
reads its settings once, when it loads): `default` is what llamalora does when the user sets nothing,
`passive` / `active` are OMP_WAIT_POLICY, `spin:N` is GOMP_SPINCOUNT=N (spin N rounds, then sleep), and
`workqueue` / `tbb` are numba's other threading layers. Every policy decodes --tokens tokens from an empty
context, best of --rounds, once on the quiet machine and once with a busy loop pinned to the last core (another
program holding a core, as on a shared machine). llama.cpp (llama-cpp-python) runs the same two ways.
The table goes to stdout and benchmarks/results/threads.md.
"""

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

POLICIES = ("default", "passive", "active", "spin:1000", "spin:10000", "spin:100000", "workqueue")
WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "NUMBA_THREADING_LAYER")


def policy_env(policy: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in WAIT_VARIABLES}
    if policy in ("passive", "active"):
        env["OMP_WAIT_POLICY"] = policy
    elif policy.startswith("spin:"):
        env["GOMP_SPINCOUNT"] = policy.split(":", 1)[1]
    elif policy in ("workqueue", "tbb"):
        env["NUMBA_THREADING_LAYER"] = policy
    elif policy != "default":
        raise SystemExit(f"unknown policy {policy!r}")
    return env


def child_ours(path: str, threads: int, n_tokens: int, rounds: int) -> float:
    from llamalora.generate import Context
    from llamalora.loader import load_model, set_threads

    set_threads(threads)
    model = load_model(path, progress=False).model
    warm = Context(model, n_ctx=32)
    warm.eval([1, 2, 3])
    warm.eval([4], generating=True)
    best = 0.0
    for _ in range(rounds):
        ctx = Context(model, n_ctx=n_tokens + 8)
        ctx.eval([1])
        start = time.perf_counter()
        for i in range(n_tokens):
            ctx.eval([100 + i], generating=True)
        best = max(best, n_tokens / (time.perf_counter() - start))
    return best


def child_llama_cpp(path: str, threads: int, n_tokens: int, rounds: int) -> float:
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=n_tokens + 8, n_threads=threads, n_threads_batch=threads, verbose=False)
    llm.eval([1, 2, 3])
    best = 0.0
    for _ in range(rounds):
        llm.reset()
        llm.eval([1])
        start = time.perf_counter()
        for i in range(n_tokens):
            llm.eval([100 + i])
        best = max(best, n_tokens / (time.perf_counter() - start))
    return best


def run_child(engine: str, policy: str, path: str, threads: int, n_tokens: int, rounds: int) -> float | None:
    args = json.dumps([engine, path, threads, n_tokens, rounds])
    env = policy_env(policy) if engine == "ours" else {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_"))}
    r = subprocess.run([sys.executable, __file__, "--child", args], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        print(f"{engine} {policy}: {(r.stderr.strip().splitlines() or ['failed'])[-1]}", file=sys.stderr)
        return None
    return float(r.stdout.strip().splitlines()[-1])


class BusyCore:
    """A process spinning on the last core while the block runs."""

    def __enter__(self):
        core = str((os.cpu_count() or 1) - 1)
        self.p = subprocess.Popen(["taskset", "-c", core, sys.executable, "-c", "while True: pass"])
        time.sleep(0.5)
        return self

    def __exit__(self, *exc):
        self.p.kill()
        self.p.wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-m", "--model", default="smollm2:q4_1")
    parser.add_argument("-t", "--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--policy", action="append", help=f"default: {', '.join(POLICIES)}")
    parser.add_argument("--no-peer", action="store_true", help="skip llama.cpp")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--output", default=os.path.join(HERE, "results", "threads.md"))
    args = parser.parse_args()
    if args.child:
        engine, path, threads, n_tokens, rounds = json.loads(args.child)
        print((child_ours if engine == "ours" else child_llama_cpp)(path, threads, n_tokens, rounds))
        return
    from bench_generate import model_path
    from cpu_info import cpu_line

    path = model_path(args.model)
    runs = [("ours", p) for p in args.policy or POLICIES] + ([] if args.no_peer else [("llama.cpp", "its own")])
    rows = [cpu_line(), f"{args.model}, -t {args.threads}, tg{args.tokens} from an empty context, best of {args.rounds}; "
            f"load average at the start {os.getloadavg()[0]:.2f}", "",
            "| engine | wait policy | quiet tokens/s | beside a busy core tokens/s |", "|---|---|---|---|"]
    print("\n".join(rows), flush=True)
    for engine, policy in runs:
        quiet = run_child(engine, policy, path, args.threads, args.tokens, args.rounds)
        with BusyCore():
            busy = run_child(engine, policy, path, args.threads, args.tokens, args.rounds)
        row = f"| {engine} | {policy} | {quiet or 0:.1f} | {busy or 0:.1f} |"
        rows.append(row)
        print(row, flush=True)
    rows.append(f"\nload average at the end {os.getloadavg()[0]:.2f}")
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        f.write("# Decode under each thread wait policy (`python benchmarks/bench_threads.py`)\n\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
    sys.exit(main())
