#!/usr/bin/env python3
"""The outside oracle for `llamalora finetune --dora`: one and five AdamW steps of transformers + PEFT (use_dora)
+ torch on SmolLM2, and a check that the PEFT folder llamalora writes loads in PEFT.

    PYTHONPATH=/path/to/torch-transformers-peft python scripts/make_finetune_dora_reference.py
        [--model SmolLM2-135M-Instruct.Q4_1.gguf] [--out tests/data/finetune_dora_reference.npz]

The same run as scripts/make_finetune_reference.py (its model, settings, initial A and B, batches and learning
rates, in float64), with use_dora=True. PEFT starts each magnitude at ‖W + s·B·A‖ of its initial B (zero), that
is ‖W‖; the nonzero B copied in afterwards makes g = m / ‖W + s·B·A‖ differ from 1 from the first step. The
magnitudes are trained with A and B (one AdamW, weight decay on all, clipping over all). Stored (float32, GGUF
order and names, `.lora_m` for the magnitudes): the initial magnitudes, the gradients of step 1 and the
parameters after steps 1 and 5; A, B, batches and learning rates are those of finetune_reference.npz (checked
equal here), which the test reads beside this file.

Then the step-5 parameters are written by llamalora.finetune.output.write_peft (what `finetune --peft-out`
writes), loaded by PeftModel.from_pretrained onto a fresh model, and compared: every lora_A, lora_B and
lora_magnitude_vector equal to the trained ones and the logits of a batch equal to the trained model's.
"""

import argparse
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import make_finetune_reference as plain  # noqa: E402

from llamalora.finetune.output import unpermute_rows, write_peft  # noqa: E402
from llamalora.lora.peft import permute_rows  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "..", "tests", "data", "finetune_dora_reference.npz")
PLAIN = os.path.join(HERE, "..", "tests", "data", "finetune_reference.npz")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--model", default=None)
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    from llamalora.llama import LlamaConfig
    from llamalora.loader import default_model_path
    from llamalora.model_file import load_model_file
    from llamalora.vocab import Vocab

    torch.manual_seed(0)
    path = args.model or default_model_path()
    model_file = load_model_file(path)
    vocab = Vocab.from_metadata(model_file.metadata)
    config = LlamaConfig.from_metadata(model_file.metadata, path, n_vocab=vocab.n_vocab)
    ref = np.load(PLAIN)
    rank, alpha, n_ctx, n_batch, grad_acc, steps, lr, beta1, beta2, decay, gclip, eps = ref["settings"]
    assert (int(rank), float(alpha), int(grad_acc), int(steps)) == (plain.RANK, plain.ALPHA, plain.GRAD_ACC,
                                                                    plain.STEPS)
    initial = {k[len("initial/"):]: ref[k] for k in ref.files if k.startswith("initial/")}
    rng = np.random.default_rng(plain.SEED)  # the plain oracle's draws, to check they are the stored ones
    from llamalora.finetune.model import PROJECTIONS, init_lora

    drawn = init_lora(config, {p: plain.RANK for p in PROJECTIONS}, rng)
    for name in drawn:
        if name.endswith(".lora_b"):
            drawn[name] = rng.normal(0.0, 0.02, drawn[name].shape).astype(np.float32)
        assert np.array_equal(drawn[name], initial[name]), name
    batches = list(zip(ref["tokens"], ref["targets"]))
    lrs = [float(x) for x in ref["lrs"]]

    def fresh_model():
        return plain.hf_model(model_file, config).double()

    targets_hf = sorted(set(plain.HF_MODULES.values()))
    lora_config = LoraConfig(r=plain.RANK, lora_alpha=plain.ALPHA, lora_dropout=0.0, bias="none",
                             target_modules=targets_hf, use_dora=True)
    peft_model = get_peft_model(fresh_model(), lora_config).double()
    modules = dict(peft_model.named_modules())
    trained = {}
    with torch.no_grad():
        for name, value in initial.items():
            module, half, heads = plain.hf_key(name, config)
            layer = modules[f"base_model.model.{module}"]
            p = (layer.lora_A if half == "A" else layer.lora_B)["default"].weight
            if half == "B" and heads:
                value = unpermute_rows(value, heads)
            p.copy_(torch.from_numpy(np.ascontiguousarray(value, dtype=np.float64)))
            trained[name] = (p, heads if half == "B" else 0)
            if half == "A":
                m = layer.lora_magnitude_vector["default"].weight
                weight = name[: -len(".lora_a")]
                _, _, part, _ = weight.split(".")
                m_heads = {"attn_q": config.n_head, "attn_k": config.n_head_kv}.get(part, 0)
                trained[f"{weight}.lora_m"] = (m, m_heads)
    snapshots = {}
    for name, (p, heads) in trained.items():
        if name.endswith(".lora_m"):
            value = p.detach().numpy().astype(np.float32)
            snapshots[f"initial/{name}"] = permute_rows(value, heads, heads) if heads else value
    params = [p for p, _ in trained.values()]
    optimizer = torch.optim.AdamW(params, lr=float(lr), betas=(float(beta1), float(beta2)), eps=float(eps),
                                  weight_decay=float(decay))
    losses = []
    peft_model.train()
    for step in range(plain.STEPS):
        optimizer.zero_grad()
        total = 0.0
        for micro in range(plain.GRAD_ACC):
            tokens, targets = batches[step * plain.GRAD_ACC + micro]
            logits = peft_model(input_ids=torch.from_numpy(tokens)).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                     torch.from_numpy(targets).reshape(-1))
            (loss / plain.GRAD_ACC).backward()
            total += float(loss.detach()) / plain.GRAD_ACC
        if step == 0:
            for name, (p, heads) in trained.items():
                value = p.grad.detach().numpy().astype(np.float32)
                snapshots[f"grad1/{name}"] = permute_rows(value, heads, heads) if heads else value
        norm = torch.nn.utils.clip_grad_norm_(params, float(gclip))
        for group in optimizer.param_groups:
            group["lr"] = lrs[step]
        optimizer.step()
        losses.append(total)
        print(f"step {step + 1}: loss {total:.6f} grad norm {float(norm):.6f} lr {lrs[step]:.3e}", flush=True)
        if step + 1 in (1, plain.STEPS):
            for name, (p, heads) in trained.items():
                value = p.detach().numpy().astype(np.float32)
                snapshots[f"step{step + 1}/{name}"] = permute_rows(value, heads, heads) if heads else value

    # The folder llamalora writes, loaded by PEFT: the same parameters and the same logits.
    final = {name[len(f"step{plain.STEPS}/"):]: v for name, v in snapshots.items()
             if name.startswith(f"step{plain.STEPS}/")}
    peft_model.eval()
    tokens = torch.from_numpy(batches[0][0])
    with torch.no_grad():
        want = peft_model(input_ids=tokens).logits.float()
    with tempfile.TemporaryDirectory() as folder:
        write_peft(folder, {k: v.astype(np.float32) for k, v in final.items()}, plain.ALPHA, plain.RANK, config)
        loaded = PeftModel.from_pretrained(fresh_model(), folder).double().eval()
        assert loaded.peft_config["default"].use_dora
        loaded_modules = dict(loaded.named_modules())
        for name, (p, _) in trained.items():
            module, half, _ = plain.hf_key(name, config) if not name.endswith(".lora_m") else (None, "M", 0)
            if half == "M":
                module = plain.hf_key(name.replace(".lora_m", ".lora_a"), config)[0]
                q = loaded_modules[f"base_model.model.{module}"].lora_magnitude_vector["default"].weight
            else:
                layer = loaded_modules[f"base_model.model.{module}"]
                q = (layer.lora_A if half == "A" else layer.lora_B)["default"].weight
            # write_peft stores float32: the loaded values are the trained float64 ones rounded to float32
            assert torch.equal(q.detach().float(), p.detach().float()), name
        with torch.no_grad():
            got = loaded(input_ids=tokens).logits.float()
        print(f"PEFT loads the written folder: logits differ by {float((got - want).abs().max()):.2e} "
              "(float32 rounding of the stored parameters)", flush=True)
        assert float((got - want).abs().max()) < 1e-3

    np.savez_compressed(args.out, **snapshots, losses=np.asarray(losses),
                        versions=np.asarray([torch.__version__, __import__("transformers").__version__,
                                             __import__("peft").__version__]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
