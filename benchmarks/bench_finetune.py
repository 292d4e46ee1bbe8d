#!/usr/bin/env python3
"""Training tokens/s of `llamalora finetune` against transformers + PEFT on the CPU, as a ratio.

    python benchmarks/bench_finetune.py [--model M.gguf] [--ctx 64] [--batch 4] [--rank 4] [--threads 2]
                                        [--steps 3] [--torch-path DIR] [--memory] [--out results/finetune.md]

Both sides run the same thing: LoRA of rank r on the seven projections of every layer, a batch of
batch × ctx tokens, mean cross-entropy, backward to A and B only, AdamW. Ours trains on the GGUF as it is
(Q4_1 for SmolLM2); transformers trains on the same weights dequantized to float32 (its fastest CPU path).
The transformers side runs in a child process with --torch-path on PYTHONPATH, so torch, transformers and
peft need not be installed where llamalora is. --memory also measures the peak of numpy's allocations
(tracemalloc) in one step of ours with and without gradient checkpointing.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="finetune tokens/s: llamalora vs transformers + PEFT")
    p.add_argument("--model", default=None, help="GGUF model (default: SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--ctx", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step, per round")
    p.add_argument("--rounds", type=int, default=2,
                   help="rounds of (ours, theirs), alternating; each side's median step time is compared")
    p.add_argument("--torch-path", default=None, help="directory holding torch, transformers and peft")
    p.add_argument("--memory", action="store_true", help="peak allocations with and without checkpointing")
    p.add_argument("--out", default=None, help="append the result line to this markdown file")
    p.add_argument("--side", choices=["both", "ours", "torch"], default="both", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def load(model_path):
    from llamalora.llama import LlamaConfig
    from llamalora.loader import default_model_path
    from llamalora.model_file import load_model_file
    from llamalora.vocab import Vocab

    path = model_path or default_model_path()
    model_file = load_model_file(path)
    vocab = Vocab.from_metadata(model_file.metadata)
    return path, model_file, LlamaConfig.from_metadata(model_file.metadata, path, n_vocab=vocab.n_vocab)


def batches(config, args, n):
    rng = np.random.default_rng(0)
    return [rng.integers(0, config.n_vocab, (2, args.batch, args.ctx)) for _ in range(n)]


def timed_steps(step, data) -> list:
    seconds = []
    for tokens, targets in data:
        start = time.perf_counter()
        step(tokens, targets)
        seconds.append(time.perf_counter() - start)
    return seconds


def ours(args) -> dict:
    from llamalora.finetune.model import PROJECTIONS, forward_backward, init_lora, load_base, zeros_like_params
    from llamalora.finetune.optim import AdamW, clip_grad_norm
    from llamalora.finetune.train import use_threads

    use_threads(args.threads)
    _, model_file, config = load(args.model)
    base = load_base(config, model_file.tensors)
    params = init_lora(config, {p: args.rank for p in PROJECTIONS}, np.random.default_rng(0))
    adam = AdamW()
    data = batches(config, args, args.steps + 1)

    def step(tokens, targets, checkpointing=False):
        grads = zeros_like_params(params)
        loss = forward_backward(base, params, 2.0 * args.rank, tokens, targets, grads, checkpointing=checkpointing)
        clip_grad_norm(grads, 1.0)
        adam.update(params, grads, 1e-3)
        return loss

    step(*data[0])
    result = {"step_seconds": timed_steps(step, data[1:])}
    if args.memory:
        import tracemalloc

        for checkpointing in (False, True):
            tracemalloc.start()
            step(*data[0], checkpointing=checkpointing)
            result["peak_mib_checkpointing" if checkpointing else "peak_mib"] = tracemalloc.get_traced_memory()[1] / 2**20
            tracemalloc.stop()
    return result


def transformers_side(args) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model

    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "scripts"))
    from make_finetune_reference import hf_model

    torch.set_num_threads(args.threads)
    _, model_file, config = load(args.model)
    model = hf_model(model_file, config)
    model.train()
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2.0 * args.rank, lora_dropout=0.0,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    data = batches(config, args, args.steps + 1)

    def step(tokens, targets):
        optimizer.zero_grad()
        logits = model(input_ids=torch.from_numpy(tokens)).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 torch.from_numpy(targets).reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()

    step(*data[0])
    return {"step_seconds": timed_steps(step, data[1:]), "torch": torch.__version__}


def main(argv=None):
    args = parse_args(argv)
    if args.side == "ours":
        print(json.dumps(ours(args)))
        return
    if args.side == "torch":
        print(json.dumps(transformers_side(args)))
        return
    common = ["--ctx", str(args.ctx), "--batch", str(args.batch), "--rank", str(args.rank), "--threads",
              str(args.threads), "--steps", str(args.steps)] + (["--model", args.model] if args.model else [])
    env = dict(os.environ)
    if args.torch_path:
        env["PYTHONPATH"] = os.pathsep.join([args.torch_path, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    # Each side in its own process, one after the other so that neither competes with the other for the cores,
    # alternating over rounds so that a busy spell of the machine falls on both.
    def run(side, extra, environment=None):
        out = subprocess.run([sys.executable, __file__, "--side", side] + common + extra, env=environment,
                             check=True, capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    mine, theirs = {"step_seconds": []}, {"step_seconds": []}
    for round_ in range(args.rounds):
        got = run("ours", ["--memory"] if args.memory and round_ == 0 else [])
        mine["step_seconds"] += got.pop("step_seconds")
        mine.update(got)
        got = run("torch", [], env)
        theirs["step_seconds"] += got.pop("step_seconds")
        theirs.update(got)
    tokens = args.batch * args.ctx
    mine["tokens_per_s"] = tokens / float(np.median(mine["step_seconds"]))
    theirs["tokens_per_s"] = tokens / float(np.median(theirs["step_seconds"]))
    ratio = mine["tokens_per_s"] / theirs["tokens_per_s"]
    line = (f"| ctx {args.ctx} × batch {args.batch}, rank {args.rank}, {args.threads} threads | "
            f"{mine['tokens_per_s']:.1f} tok/s | {theirs['tokens_per_s']:.1f} tok/s (torch {theirs['torch']}) | "
            f"{ratio:.2f}× |")
    if args.memory:
        line += f" peak {mine['peak_mib']:.0f} MiB, {mine['peak_mib_checkpointing']:.0f} MiB checkpointed |"
    print(line)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
