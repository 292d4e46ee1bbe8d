#!/usr/bin/env python3
"""The outside oracle for `llamalora finetune`: one and five AdamW steps of transformers + PEFT + torch on SmolLM2.

    python scripts/make_finetune_reference.py [--model SmolLM2-135M-Instruct.Q4_1.gguf]
                                              [--out tests/data/finetune_reference.npz]

Needs torch, transformers and peft (the test suite does not: it reads the stored result). The Hugging Face
model is built from the GGUF's own weights dequantized to float32, q/k rows put back in Hugging Face's order,
so both sides train exactly the same model. torch computes in float64 here: its float32 gradients of this
model differ from the exact ones by up to 6e-4 (relative, in the first layers, round-off gathered over 30
layers), more than the 1e-4 the comparison asks for, so the reference is the exact result and the test holds
llamalora's float32 training to it. Results are stored as float32. From the same initial A and B (B nonzero, so that every
gradient is alive from the first step), the same batches and hyperparameters, the script runs
torch.optim.AdamW with gradient accumulation, torch.nn.utils.clip_grad_norm_ and a per-step learning rate,
and stores A and B after step 1 and step 5, and the gradients of step 1, in GGUF order (keys as in a GGUF
adapter).
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llamalora import kernels  # noqa: E402
from llamalora.finetune.data import BatchOptions, make_samples, next_batch, start_order  # noqa: E402
from llamalora.finetune.model import PROJECTIONS, init_lora  # noqa: E402
from llamalora.finetune.optim import scheduled_lr  # noqa: E402
from llamalora.finetune.output import HF_MODULES  # noqa: E402
from llamalora.llama import LlamaConfig  # noqa: E402
from llamalora.loader import default_model_path  # noqa: E402
from llamalora.lora.peft import permute_rows, unpermute_rows  # noqa: E402
from llamalora.model_file import load_model_file  # noqa: E402
from llamalora.vocab import Vocab  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "..", "tests", "data", "finetune_reference.npz")
TEXT = os.path.join(HERE, "..", "tests", "data", "fortunes_heldout.txt")

# The oracle's settings: small enough to store, wide enough to exercise every part of a step.
RANK, ALPHA = 2, 4.0
N_CTX, N_BATCH, GRAD_ACC, STEPS = 32, 2, 2, 5
LR, BETA1, BETA2, DECAY, GCLIP = 2e-3, 0.9, 0.999, 0.1, 0.5
# Adam divides each gradient element by its own magnitude plus eps: with PyTorch's 1e-8, elements whose
# gradient is near 1e-8 (the float32 round-off level of the sums that form them) move by ±lr in whichever
# direction round-off decides, in either implementation. 1e-6 keeps the comparison about the algorithm.
EPS = 1e-6
SCHEDULE = dict(warmup=2, cos_decay_steps=5, cos_decay_min=0.1, cos_decay_restart=1.1, enable_restart=False)
SEED = 1234


def hf_model(model_file, config):
    import torch
    from transformers import LlamaConfig as HFConfig, LlamaForCausalLM

    tensors = model_file.tensors

    def f32(name):
        t = tensors[name]
        return kernels.dequantize(t.type, t.data, t.n_cols).reshape(t.shape).astype(np.float32)

    tied = "output.weight" not in tensors
    hf_config = HFConfig(vocab_size=config.n_vocab, hidden_size=config.dim, intermediate_size=config.n_ff,
                         num_hidden_layers=config.n_layer, num_attention_heads=config.n_head,
                         num_key_value_heads=config.n_head_kv, head_dim=config.head_dim,
                         max_position_embeddings=config.n_ctx_train, rms_norm_eps=config.rms_eps,
                         rope_theta=config.rope_base, tie_word_embeddings=tied, attention_bias=False,
                         mlp_bias=False, torch_dtype="float32")
    model = LlamaForCausalLM(hf_config).to(torch.float32)
    state = {"model.embed_tokens.weight": f32("token_embd.weight"), "model.norm.weight": f32("output_norm.weight")}
    if not tied:
        state["lm_head.weight"] = f32("output.weight")
    for i in range(config.n_layer):
        for part in PROJECTIONS:
            w = f32(f"blk.{i}.{part}.weight")
            if part == "attn_q":
                w = unpermute_rows(w, config.n_head)
            elif part == "attn_k":
                w = unpermute_rows(w, config.n_head_kv)
            group = "self_attn" if part.startswith("attn") else "mlp"
            state[f"model.layers.{i}.{group}.{HF_MODULES[part]}.weight"] = w
        state[f"model.layers.{i}.input_layernorm.weight"] = f32(f"blk.{i}.attn_norm.weight")
        state[f"model.layers.{i}.post_attention_layernorm.weight"] = f32(f"blk.{i}.ffn_norm.weight")
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
    missing = [k for k in missing if not (tied and k == "lm_head.weight") and "rotary" not in k]
    if missing or unexpected:
        raise SystemExit(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    if tied:
        model.tie_weights()
    return model.eval()


def hf_key(name, config):
    """GGUF adapter tensor name -> (PEFT module path, 'A' or 'B', permutation heads for B or 0)."""
    weight, half = name.rsplit(".", 1)
    _, layer, part, _ = weight.split(".")
    group = "self_attn" if part.startswith("attn") else "mlp"
    heads = config.n_head if part == "attn_q" else config.n_head_kv if part == "attn_k" else 0
    return f"model.layers.{layer}.{group}.{HF_MODULES[part]}", half[-1].upper(), heads


def check_against_ours(model_file, config, initial, batch):
    """The first micro-batch's loss by llamalora's own float32 code, for the log (the test compares steps)."""
    from llamalora.finetune.model import forward_backward, load_base

    base = load_base(config, model_file.tensors)
    print(f"llamalora loss of micro-batch 1: {forward_backward(base, initial, ALPHA, *batch):.6f}", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--model", default=None)
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    path = args.model or default_model_path()
    model_file = load_model_file(path)
    vocab = Vocab.from_metadata(model_file.metadata)
    config = LlamaConfig.from_metadata(model_file.metadata, path, n_vocab=vocab.n_vocab)

    rng = np.random.default_rng(SEED)
    initial = init_lora(config, {p: RANK for p in PROJECTIONS}, rng)
    for name in initial:
        if name.endswith(".lora_b"):
            initial[name] = rng.normal(0.0, 0.02, initial[name].shape).astype(np.float32)

    with open(TEXT, encoding="utf-8") as f:
        text = f.read()
    samples = make_samples(text[: len(text) // 2], lambda s: vocab.tokenize(s, add_bos=False, parse_special=False),
                           N_CTX)
    order = start_order(SEED, samples)
    options = BatchOptions(vocab.bos_id, vocab.eos_id, config.n_vocab)
    batches, shuffled = [], None
    for _ in range(STEPS * GRAD_ACC):
        tokens, targets, shuffled = next_batch(samples, order, N_BATCH, N_CTX, options, shuffled)
        batches.append((tokens, targets))
    lrs = [scheduled_lr(step, LR, 0.0, **SCHEDULE) for step in range(1, STEPS + 1)]

    model = hf_model(model_file, config).double()
    targets_hf = sorted(set(HF_MODULES.values()))
    peft_model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, bias="none",
                                                  target_modules=targets_hf)).double()
    modules = dict(peft_model.named_modules())
    trained = {}
    with torch.no_grad():
        for name, value in initial.items():
            module, half, heads = hf_key(name, config)
            layer = modules[f"base_model.model.{module}"]
            p = (layer.lora_A if half == "A" else layer.lora_B)["default"].weight
            if half == "B" and heads:
                value = unpermute_rows(value, heads)
            p.copy_(torch.from_numpy(np.ascontiguousarray(value, dtype=np.float64)))
            trained[name] = (p, heads if half == "B" else 0)
    params = [p for p, _ in trained.values()]
    print(f"rope: {getattr(model.config, 'rope_parameters', None) or model.config.rope_theta}", flush=True)
    check_against_ours(model_file, config, initial, batches[0])
    optimizer = torch.optim.AdamW(params, lr=LR, betas=(BETA1, BETA2), eps=EPS, weight_decay=DECAY)
    snapshots, losses = {}, []
    for step in range(STEPS):
        optimizer.zero_grad()
        total = 0.0
        for micro in range(GRAD_ACC):
            tokens, targets = batches[step * GRAD_ACC + micro]
            logits = peft_model(input_ids=torch.from_numpy(tokens)).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                     torch.from_numpy(targets).reshape(-1))
            (loss / GRAD_ACC).backward()
            total += float(loss.detach()) / GRAD_ACC
            if step == 0 and micro == 0:
                print(f"transformers loss of micro-batch 1: {float(loss.detach()):.6f}", flush=True)
        if step == 0:
            for name, (p, heads) in trained.items():
                value = p.grad.detach().numpy().astype(np.float32)
                snapshots[f"grad1/{name}"] = permute_rows(value, heads) if heads else value
        norm = torch.nn.utils.clip_grad_norm_(params, GCLIP)
        for group in optimizer.param_groups:
            group["lr"] = lrs[step]
        optimizer.step()
        losses.append(total)
        print(f"step {step + 1}: loss {total:.6f} grad norm {float(norm):.6f} lr {lrs[step]:.3e}", flush=True)
        if step + 1 in (1, STEPS):
            for name, (p, heads) in trained.items():
                value = p.detach().numpy().astype(np.float32)
                snapshots[f"step{step + 1}/{name}"] = permute_rows(value, heads) if heads else value

    np.savez_compressed(
        args.out, **{f"initial/{k}": v for k, v in initial.items()}, **snapshots,
        tokens=np.stack([t for t, _ in batches]), targets=np.stack([t for _, t in batches]),
        lrs=np.asarray(lrs), losses=np.asarray(losses),
        settings=np.asarray([RANK, ALPHA, N_CTX, N_BATCH, GRAD_ACC, STEPS, LR, BETA1, BETA2, DECAY, GCLIP, EPS]),
        versions=np.asarray([torch.__version__, __import__("transformers").__version__,
                             __import__("peft").__version__]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
