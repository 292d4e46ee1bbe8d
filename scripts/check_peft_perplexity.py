#!/usr/bin/env python3
"""Perplexity of a text with a fine-tuned adapter: `llamalora perplexity --lora ADAPTER.gguf` against
transformers with the `--peft-out` folder loaded by PEFT's PeftModel.from_pretrained, and both without it.

    python scripts/check_peft_perplexity.py --text held-out.txt --lora adapter.gguf --peft DIR
                                            [--model M.gguf] [--ctx 128] [--threads 1]

Both use llama.cpp's protocol (llamalora/perplexity.py): the text tokenized whole, cut into chunks of ctx
tokens, the first token of each replaced by BOS, the second half of each chunk scored. The Hugging Face model
is built from the GGUF's weights (scripts/make_finetune_reference.py). Needs torch, transformers and peft.
"""

import argparse
import math
import os
import re
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)


def ours(model, text, ctx, threads, lora=None) -> float:
    cmd = [sys.executable, "-m", "llamalora.cli", "perplexity", "-f", text, "-c", str(ctx), "-t", str(threads)]
    cmd += (["-m", model] if model else []) + (["--lora", lora] if lora else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return float(re.search(r"PPL = ([0-9.]+)", out).group(1))


def theirs(model, tokens, ctx, bos, peft_dir=None) -> float:
    import torch

    hf = model
    if peft_dir:
        from peft import PeftModel

        hf = PeftModel.from_pretrained(model, peft_dir)
    nll, count = 0.0, 0
    first = ctx // 2
    with torch.no_grad():
        for start in range(0, len(tokens) // ctx * ctx, ctx):
            chunk = list(tokens[start: start + ctx])
            if bos is not None:
                chunk[0] = bos
            logits = hf(input_ids=torch.tensor([chunk])).logits[0].double()
            log_probs = torch.log_softmax(logits[first: ctx - 1], dim=-1).numpy()
            targets = np.asarray(tokens[start + first + 1: start + ctx])
            nll -= float(log_probs[np.arange(len(targets)), targets].sum())
            count += len(targets)
    return math.exp(nll / count)


def main(argv=None):
    p = argparse.ArgumentParser(description="our perplexity with the GGUF adapter vs transformers with the PEFT one")
    p.add_argument("--model", default=None)
    p.add_argument("--text", required=True)
    p.add_argument("--lora", required=True, help="the GGUF adapter from --lora-out")
    p.add_argument("--peft", required=True, help="the folder from --peft-out")
    p.add_argument("--ctx", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    import torch

    from llamalora.llama import LlamaConfig
    from llamalora.loader import default_model_path
    from llamalora.model_file import load_model_file
    from llamalora.vocab import Vocab
    from make_finetune_reference import hf_model

    torch.set_num_threads(args.threads)
    path = args.model or default_model_path()
    model_file = load_model_file(path)
    vocab = Vocab.from_metadata(model_file.metadata)
    config = LlamaConfig.from_metadata(model_file.metadata, path, n_vocab=vocab.n_vocab)
    with open(args.text, encoding="utf-8") as f:
        tokens = vocab.tokenize(f.read())
    bos = vocab.bos_id if vocab.add_bos else None
    rows = [("base", ours(args.model, args.text, args.ctx, args.threads),
             theirs(hf_model(model_file, config), tokens, args.ctx, bos)),
            ("adapter", ours(args.model, args.text, args.ctx, args.threads, args.lora),
             theirs(hf_model(model_file, config), tokens, args.ctx, bos, args.peft))]
    for name, mine, hf in rows:
        print(f"{name:8s} llamalora {mine:.4f}  transformers+PEFT {hf:.4f}  difference {100 * (mine / hf - 1):+.3f}%")


if __name__ == "__main__":
    main()
