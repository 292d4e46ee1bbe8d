"""Prompt processing (pp) and generation (tg) tokens/s: llamalora beside llama.cpp on the same file, same threads.

    python benchmarks/bench_generate.py [-m MODEL.gguf]... [-t 2]... [--pp 512] [--tg 128] [--lora ADAPTER]

llama.cpp runs through llama-cpp-python (`pip install llama-cpp-python`, built from source); both sides are timed
the same way: pp = one batch of --pp prompt tokens into an empty context, tg = --tg single-token evaluations after
it (fixed token ids, no sampler), best of --repeat runs. The table goes to stdout and benchmarks/results/generate.md.
"""

import argparse
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def bandwidth_gbs() -> float:
    """Copy bandwidth of this machine (read + write of a buffer far larger than the caches), in GB/s."""
    src = np.ones(256 * 1024 * 1024 // 8)
    dst = np.empty_like(src)
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = max(best, 2 * src.nbytes / (time.perf_counter() - t) / 1e9)
    return best


def prompt_tokens(n_vocab: int, n: int, seed: int = 0) -> list[int]:
    """The same pseudo-random token ids for both engines (which token is fed does not change the work)."""
    rng = np.random.default_rng(seed)
    return rng.integers(100, min(n_vocab, 30000), size=n).tolist()


def bench_llamalora(path, threads, n_pp, n_tg, repeat, adapters=(), lora_mode="auto"):
    from llamalora.generate import Context
    from llamalora.loader import load_model, set_threads

    set_threads(threads)
    loaded = load_model(path, adapters=adapters, lora_mode=lora_mode, progress=False)
    ids = prompt_tokens(loaded.vocab.n_vocab, n_pp)
    gen_ids = prompt_tokens(loaded.vocab.n_vocab, n_tg, seed=1)
    Context(loaded.model, n_ctx=n_pp + n_tg + 8).eval(ids[:16])  # compile / warm up
    pp = tg = 0.0
    for _ in range(repeat):
        ctx = Context(loaded.model, n_ctx=n_pp + n_tg + 8, n_batch=n_pp)
        t = time.perf_counter()
        logits = ctx.eval(ids)
        pp = max(pp, n_pp / (time.perf_counter() - t))
        t = time.perf_counter()
        for token in gen_ids:
            ctx.eval([token], generating=True)
        tg = max(tg, n_tg / (time.perf_counter() - t))
    return pp, tg


def bench_llama_cpp(path, threads, n_pp, n_tg, repeat, adapters=()):
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    kwargs = {}
    if adapters:
        kwargs["lora_path"] = adapters[0][0]
        kwargs["lora_scale"] = adapters[0][1]
    llm = Llama(model_path=path, n_ctx=n_pp + n_tg + 8, n_batch=n_pp, n_ubatch=n_pp, n_threads=threads,
                n_threads_batch=threads, verbose=False, logits_all=False, **kwargs)
    ids = prompt_tokens(llm.n_vocab(), n_pp)
    gen_ids = prompt_tokens(llm.n_vocab(), n_tg, seed=1)
    llm.eval(ids[:16])
    pp = tg = 0.0
    for _ in range(repeat):
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids)
        pp = max(pp, n_pp / (time.perf_counter() - t))
        t = time.perf_counter()
        for token in gen_ids:
            llm.eval([token])
        tg = max(tg, n_tg / (time.perf_counter() - t))
    return pp, tg


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--model", action="append", help="model file (repeatable); default: SmolLM2 Q4_1")
    parser.add_argument("-t", "--threads", action="append", type=int, help="thread count (repeatable); default 2")
    parser.add_argument("--pp", type=int, default=512)
    parser.add_argument("--tg", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--lora", default=None, help="also run each model with this adapter")
    parser.add_argument("--output", default=os.path.join(HERE, "results", "generate.md"))
    args = parser.parse_args()
    from llamalora.loader import default_model_path

    models = args.model or [default_model_path()]
    threads = args.threads or [2]
    bw = bandwidth_gbs()
    rows = [f"copy bandwidth: {bw:.1f} GB/s", "",
            "| model | adapter | t | pp llamalora | pp llama.cpp | pp ratio | tg llamalora | tg llama.cpp | tg ratio "
            "| tg / bandwidth limit |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for path in models:
        size = os.path.getsize(path)
        for adapters in ([()] + ([[(args.lora, 1.0)]] if args.lora else [])):
            for t in threads:
                ours = bench_llamalora(path, t, args.pp, args.tg, args.repeat, adapters)
                theirs = bench_llama_cpp(path, t, args.pp, args.tg, args.repeat, adapters)
                limit = bw * 1e9 / size  # tokens/s if every weight byte is read once per token at copy bandwidth

                def ratio(a, b):
                    return f"{a / b:.2f}" if b else "n/a"

                row = (f"| {os.path.basename(path)} | {os.path.basename(adapters[0][0]) if adapters else '-'} | {t} "
                       f"| {ours[0]:.1f} | {theirs[0] if theirs else float('nan'):.1f} "
                       f"| {ratio(ours[0], theirs[0]) if theirs else 'n/a'} "
                       f"| {ours[1]:.1f} | {theirs[1] if theirs else float('nan'):.1f} "
                       f"| {ratio(ours[1], theirs[1]) if theirs else 'n/a'} | {ours[1] / limit:.2f} |")
                rows.append(row)
                print(row, flush=True)
    text = "\n".join(rows) + "\n"
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
