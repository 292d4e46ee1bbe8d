"""How much of an adapter each way of applying it keeps: perplexity on the adapter's held-out text for SmolLM2
in f16, q8_0, q4_1 (as shipped) and q4_0, each with no adapter, merged, merged through an f16 `--lora-base`,
and applied at run time (unmerged).

    python benchmarks/lora_perplexity.py [--lora tests/data/lora-fortunes] [-c 128] [--chunks 16] [-t 2]
                                         [--out benchmarks/results/lora_perplexity.md]

Every figure comes from `llamalora perplexity` (llama.cpp's protocol), one process per cell. The f16 and
4/8-bit files are made from the shipped weights with our own quantizer (benchmarks/models.py).
"""

import argparse
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

MODES = ["no adapter", "merge", "merge, --lora-base f16", "runtime"]


def run_perplexity(model, text, ctx, chunks, threads, extra) -> float:
    cmd = [sys.executable, "-m", "llamalora.cli", "perplexity", "-m", model, "-f", text, "-c", str(ctx),
           "--chunks", str(chunks), "-t", str(threads)] + extra
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return float(re.search(r"PPL = ([0-9.]+)", out).group(1))


def mode_options(mode, lora, f16) -> list:
    return {"no adapter": [],
            "merge": ["--lora", lora, "--lora-mode", "merge"],
            "merge, --lora-base f16": ["--lora", lora, "--lora-base", f16, "--lora-mode", "merge"],
            "runtime": ["--lora", lora, "--lora-mode", "runtime"]}[mode]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lora", default=os.path.join(ROOT, "tests", "data", "lora-fortunes"))
    parser.add_argument("-f", "--file", default=os.path.join(ROOT, "tests", "data", "fortunes_heldout.txt"))
    parser.add_argument("-c", "--ctx-size", type=int, default=128)
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("-t", "--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="write the table as markdown to this file")
    args = parser.parse_args()

    import models

    f16 = models.smollm2("f16")
    files = {"f16": f16, "q8_0": models.smollm2("q8_0"), "q4_1": models.smollm2("q4_1"),
             "q4_0": models.smollm2("q4_0")}
    header = "| model | " + " | ".join(MODES) + " |"
    lines = [header, "|" + "---|" * (len(MODES) + 1)]
    print(header, flush=True)
    start = time.perf_counter()
    for kind, path in files.items():
        cells = [run_perplexity(path, args.file, args.ctx_size, args.chunks, args.threads,
                                mode_options(mode, args.lora, f16)) for mode in MODES]
        line = f"| {kind} | " + " | ".join(f"{v:.4f}" for v in cells) + " |"
        lines.append(line)
        print(line, flush=True)
    print(f"({time.perf_counter() - start:.0f} s)")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write("# Perplexity with the fortunes adapter, by model type and way of applying it\n\n")
            f.write(f"`python benchmarks/lora_perplexity.py -c {args.ctx_size} --chunks {args.chunks}` on "
                    f"`{os.path.relpath(args.file, ROOT)}` with `{os.path.relpath(args.lora, ROOT)}` "
                    "(r 16, alpha 32, q_proj and v_proj). transformers + PEFT in float32: 33.2452 without the "
                    "adapter, 24.6106 with it; llama.cpp on the Q4_1 file with the adapter: 24.6674.\n\n")
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
