"""Perplexity throughput: llamalora's perplexity beside llama.cpp's on the same file, context and threads.

    python benchmarks/bench_perplexity.py [-m MODEL] [-f TEXT] [-c 512] [-t 2] [--chunks 8]

llama.cpp runs through llama-cpp-python with logits for every position (what its perplexity tool computes):
each chunk of -c tokens is evaluated from an empty context, as the protocol does. Prints tokens/s of both,
their ratio, and both perplexities (which must agree: same file, same protocol).
"""

import argparse
import math
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def llama_cpp_perplexity(path, tokens, n_ctx, n_chunks, threads):
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
                n_threads_batch=threads, logits_all=True, verbose=False)
    nll, count = 0.0, 0
    start = time.perf_counter()
    for c in range(n_chunks):
        chunk = tokens[c * n_ctx : (c + 1) * n_ctx]
        llm.reset()
        llm.eval(chunk)
        logits = np.asarray(llm.scores[:n_ctx], dtype=np.float64)
        for i in range(n_ctx // 2, n_ctx - 1):
            row = logits[i] - logits[i].max()
            nll += math.log(np.exp(row).sum()) - row[chunk[i + 1]]
            count += 1
    seconds = time.perf_counter() - start
    return math.exp(nll / count), n_chunks * n_ctx / seconds


def ours(path, tokens, n_ctx, n_chunks, threads):
    from llamalora.generate import Context
    from llamalora.loader import load_model, set_threads
    from llamalora.perplexity import perplexity

    set_threads(threads)
    loaded = load_model(path, progress=False)
    ctx = Context(loaded.model, n_ctx=n_ctx, n_batch=n_ctx)
    perplexity(ctx, tokens, 1, bos_id=None)  # compile / warm up
    start = time.perf_counter()
    result = perplexity(ctx, tokens, n_chunks, bos_id=None)
    return result.ppl, n_chunks * n_ctx / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--model", default=None)
    parser.add_argument("-f", "--file", default=os.path.join(HERE, "..", "tests", "data", "fortunes_heldout.txt"))
    parser.add_argument("-c", "--ctx-size", type=int, default=512)
    parser.add_argument("-t", "--threads", type=int, default=2)
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--output", default=os.path.join(HERE, "results", "perplexity.md"))
    args = parser.parse_args()
    from llamalora.loader import default_model_path, load_model

    path = args.model or default_model_path()
    text = open(args.file, encoding="utf-8").read()
    tokens = load_model(path, progress=False).vocab.tokenize(text, add_bos=None, parse_special=False)
    n_chunks = min(args.chunks, len(tokens) // args.ctx_size)
    ppl_ours, tps_ours = ours(path, tokens, args.ctx_size, n_chunks, args.threads)
    ppl_theirs, tps_theirs = llama_cpp_perplexity(path, tokens, args.ctx_size, n_chunks, args.threads)
    rows = [f"{os.path.basename(path)}, -c {args.ctx_size}, {n_chunks} chunks, -t {args.threads}", "",
            "| | llamalora | llama.cpp | ratio |", "|---|---|---|---|",
            f"| tokens/s | {tps_ours:.1f} | {tps_theirs:.1f} | {tps_ours / tps_theirs:.2f} |",
            f"| perplexity | {ppl_ours:.4f} | {ppl_theirs:.4f} | {ppl_ours / ppl_theirs:.4f} |"]
    text = "\n".join(rows) + "\n"
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
