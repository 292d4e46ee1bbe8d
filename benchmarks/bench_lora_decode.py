"""Decode speed with a run-time adapter against the same model without it: the cost of keeping W quantized.

    python benchmarks/bench_lora_decode.py [-m smollm2:q4_1 -m 1b:q4_0] [-t 1 -t 2] [--tokens 128] [--rounds 3]
                                           [--dora]

One process per model and thread count holds two contexts on one loaded model, one with the all-linear r=16
adapter of benchmarks/bench_lora.py applied at run time, one without. They decode the same tokens, alternating
token by token (which one goes first alternates too), so that load from other jobs falls on both alike; the
figure is the ratio of their total times, per round, from an empty context (as llama-bench's tg) and after a
512-token prompt. bench_generate.py measures the two as separate runs, each beside llama.cpp. --dora runs the same
adapter in its DoRA form (a magnitude per output: y = g ⊙ (W·x + s·B·(A·x))), written to results/dora_decode.md.
"""

import argparse
import os
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench_generate import adapter_paths, model_path, write_section  # noqa: E402
from cpu_info import cpu_line, cpu_name  # noqa: E402


def interleaved(model, n_prompt: int, n_tokens: int) -> tuple[float, float]:
    """(tokens/s without the adapter, with it), decoding n_tokens after an n_prompt-token prompt."""
    from llamalora.generate import Context

    rng = np.random.default_rng(n_prompt)
    prompt = rng.integers(0, model.config.n_vocab, max(n_prompt, 1)).tolist()
    tokens = rng.integers(0, model.config.n_vocab, n_tokens).tolist()
    plain = Context(model, n_ctx=n_prompt + n_tokens + 8, lora={})
    adapted = Context(model, n_ctx=n_prompt + n_tokens + 8, lora=model.lora)
    elapsed = {id(plain): 0.0, id(adapted): 0.0}
    for ctx in (plain, adapted):
        ctx.eval(prompt)
    for i, token in enumerate(tokens):
        for ctx in ((plain, adapted) if i % 2 == 0 else (adapted, plain)):
            start = time.perf_counter()
            ctx.eval([token], generating=True)
            elapsed[id(ctx)] += time.perf_counter() - start
    return n_tokens / elapsed[id(plain)], n_tokens / elapsed[id(adapted)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-m", "--model", action="append", help="smollm2:q4_1, 1b:q4_0, ... (default: those two)")
    parser.add_argument("-t", "--threads", type=int, action="append", help="default: 1 and 2")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dora", action="store_true", help="the adapter in its DoRA form")
    parser.add_argument("--output", default=None, help="default: results/lora_decode.md (--dora: dora_decode.md)")
    args = parser.parse_args()
    output = args.output or os.path.join(HERE, "results", "dora_decode.md" if args.dora else "lora_decode.md")
    kind = "DoRA" if args.dora else "adapter"
    from llamalora.kernels import intmatvec
    from llamalora.loader import load_model, set_threads

    rows = ["| model | t | context | tg without (median) | tg with adapter (median) | ratio per round | median ratio | load |",
            "|---|---|---|---|---|---|---|---|"]
    for name in args.model or ["smollm2:q4_1", "1b:q4_0"]:
        folder, _ = adapter_paths(name, dora=args.dora)
        for threads in args.threads or [1, 2]:
            set_threads(threads)
            model = load_model(model_path(name), adapters=[(folder, 1.0)], lora_mode="runtime", progress=False).model
            interleaved(model, 8, 8)  # compile both paths
            for n_prompt in (0, 512):
                results = [interleaved(model, n_prompt, args.tokens) for _ in range(args.rounds)]
                ratios = [with_ / without for without, with_ in results]
                without = statistics.median(r[0] for r in results)
                with_ = statistics.median(r[1] for r in results)
                rows.append(f"| {name} | {threads} | {max(n_prompt, 1)} | {without:.1f} | {with_:.1f} | "
                            f"{' '.join(f'{r:.3f}' for r in ratios)} | {statistics.median(ratios):.3f} | "
                            f"{os.getloadavg()[0]:.2f} |")
                print(rows[-1], flush=True)
    title = (f"# Decode with a run-time all-linear r=16 {kind} / without "
             f"(`python benchmarks/bench_lora_decode.py{' --dora' if args.dora else ''}`)")
    write_section(output, f"## {cpu_name()}: our kernels for {intmatvec.ISA}", [cpu_line(), ""] + rows, title)


if __name__ == "__main__":
    main()
