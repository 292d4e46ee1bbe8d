"""The fine-tuning loop: batches, gradient accumulation, clipping, AdamW, schedule, progress, saves and resume.

A run is a pure function of its options and, when resuming, its checkpoint: the adapter's initial A comes
from --seed, the batches from the seeded sample order, and a checkpoint holds everything that changes from
step to step. So a run stopped after step k and resumed with the same options produces, step for step, the
same numbers as a run that never stopped.
"""

import ctypes
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError
from .blas import openblas_function
from .data import BatchOptions, make_samples, next_batch, start_order
from .model import LORA_TARGETS, forward_backward, init_lora, lora_shapes, load_base, zeros_like_params
from .optim import AdamW, clip_grad_norm, scheduled_lr
from .team import set_team_threads
from .output import load_checkpoint, output_paths, save_checkpoint, write_adapter_gguf, write_peft


@dataclass
class FinetuneOptions:
    model: str | None = None
    train_data: str = ""
    lora_out: str | None = "ggml-lora-ITERATION-f32.gguf"
    peft_out: str | None = None
    checkpoint_in: str | None = None
    checkpoint_out: str | None = "checkpoint-ITERATION.npz"
    lora_r: int = 4
    lora_alpha: float = 4.0
    ranks: dict = field(default_factory=dict)  # llama.cpp names (wq, wk, ..., w3) -> rank, overriding lora_r
    n_ctx: int = 64
    n_batch: int = 4
    grad_acc: int = 1
    adam_iter: int = 256
    epochs: int = -1
    adam_alpha: float = 1e-3
    adam_min_alpha: float = 0.0
    adam_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_gclip: float = 1.0
    warmup: int = 100
    cos_decay_steps: int = 1000
    cos_decay_restart: float = 1.1
    cos_decay_min: float = 0.1
    enable_restart: bool = False
    sample_start: str = ""
    include_sample_start: bool = False
    fill_with_next_samples: bool = False
    sample_random_offsets: bool = False
    separate_with_eos: bool = True
    separate_with_bos: bool = True
    save_every: int = 10
    use_checkpointing: bool = False
    dora: bool = False  # train DoRA: a magnitude per output row beside each pair (PEFT's use_dora)
    seed: int = -1
    threads: int | None = None


# Options a checkpoint records and a resume must repeat: they decide the shapes or the sample order.
RESUME_MUST_MATCH = ("n_ctx", "n_batch", "grad_acc", "lora_alpha", "sample_start", "include_sample_start",
                     "fill_with_next_samples", "sample_random_offsets", "separate_with_eos", "separate_with_bos")


def set_blas_threads(n: int) -> bool:
    """Tell numpy's OpenBLAS to use n threads (numpy offers no call for it); False when no OpenBLAS is found."""
    setter = openblas_function("set_num_threads")
    if setter is None:
        return False
    setter(ctypes.c_int(n))
    return True


def blas_threads() -> int | None:
    getter = openblas_function("get_num_threads")
    return int(getter()) if getter is not None else None


def use_threads(n: int | None) -> int:
    """Compute on n threads (default: every core) and return n. A step's work is split into tasks for a team of
    n threads (team.py), each calling BLAS on one thread: one team instead of ours beside an OpenBLAS pool sized
    to the machine. Where BLAS's thread count cannot be set, BLAS keeps its own threads and the team has one."""
    from ..loader import set_threads

    threads = set_threads(n)
    set_team_threads(threads if set_blas_threads(1) else 1)
    return threads


def effective_ranks(opts: FinetuneOptions) -> dict:
    """{GGUF part (attn_q, ...): rank} from --lora-r and the per-weight --rank-w* overrides."""
    ranks = {part: opts.lora_r for part in LORA_TARGETS.values()}
    for short, r in opts.ranks.items():
        if r is not None:
            ranks[LORA_TARGETS[short]] = int(r)
    return ranks


def check_options(opts: FinetuneOptions) -> None:
    positive = {"--ctx": opts.n_ctx, "--batch": opts.n_batch, "--grad-acc": opts.grad_acc, "--lora-r": opts.lora_r}
    for flag, value in positive.items():
        if value < 1:
            raise InputError(f"{flag} must be at least 1, not {value}")
    if opts.lora_alpha <= 0:
        raise InputError(f"--lora-alpha must be positive, not {opts.lora_alpha}")
    if any(r is not None and r < 0 for r in opts.ranks.values()):
        raise InputError("--rank-w* values must be 0 (no adapter on that weight) or more")
    if not 0 <= opts.adam_beta1 < 1 or not 0 <= opts.adam_beta2 < 1:
        raise InputError("--adam-beta1 and --adam-beta2 must lie in [0, 1)")
    if not opts.train_data:
        raise InputError("--train-data is required")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class StopFlag:
    """Set by the first Ctrl-C: the step under way finishes, a checkpoint is saved and the run ends.
    A second Ctrl-C interrupts at once."""

    def __init__(self):
        self.set = False
        self.previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self.handle)
        return self

    def handle(self, signum, frame):
        if self.set:
            raise KeyboardInterrupt
        self.set = True
        log("finetune: interrupted: finishing this step, then saving a checkpoint (Ctrl-C again to abort)")

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def run_finetune(opts: FinetuneOptions, stop_after: int | None = None, quiet: bool = False) -> dict:
    """Train and write the outputs; returns a summary (losses per step, final step, paths written).

    stop_after ends the run after that many steps as a Ctrl-C would (checkpoint saved): for tests."""
    from ..loader import default_model_path, load_vocab
    from ..llama import LlamaConfig
    from ..model_file import load_model_file

    check_options(opts)
    say = (lambda message: None) if quiet else log
    threads = use_threads(opts.threads)
    path = opts.model or default_model_path()
    model_file = load_model_file(path)
    vocab = load_vocab(model_file)
    config = LlamaConfig.from_metadata(model_file.metadata, path, n_vocab=vocab.n_vocab,
                                       rope_freqs=model_file.tensors.get("rope_freqs.weight"))
    if config.architecture != "llama":
        # The training forward has no q/k/v biases and rotates adjacent pairs only.
        raise InputError(f"{path}: finetune trains llama models; this one is {config.architecture}")
    base = load_base(config, model_file.tensors)
    try:
        with open(opts.train_data, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError as e:
        raise InputError(f"{opts.train_data}: cannot read the training data: {e.strerror or e}") from None
    samples = make_samples(text, lambda s: vocab.tokenize(s, add_bos=False, parse_special=False), opts.n_ctx,
                           opts.sample_start, opts.include_sample_start, opts.train_data)
    ranks = effective_ranks(opts)
    if not lora_shapes(config, ranks):
        raise InputError("every --rank-w* is 0 and --lora-r gives no other: there is nothing to train")
    settings = {k: getattr(opts, k) for k in RESUME_MUST_MATCH}
    adam = AdamW(lr=opts.adam_alpha, beta1=opts.adam_beta1, beta2=opts.adam_beta2, weight_decay=opts.adam_decay)
    if opts.checkpoint_in:
        params, order, seed = resume(opts, adam, config, ranks, settings)
    else:
        seed = opts.seed if opts.seed >= 0 else int(time.time())
        params = init_lora(config, ranks, np.random.default_rng(seed), base=base if opts.dora else None)
        order = start_order(seed, samples)
    header = {"seed": seed, "settings": settings, "ranks": ranks, "lora_r": opts.lora_r,
              "model": {"n_layer": config.n_layer, "dim": config.dim, "n_vocab": config.n_vocab}}
    batch_options = BatchOptions(vocab.bos_id if vocab.bos_id is not None else 0,
                                 vocab.eos_id if vocab.eos_id is not None else 0, config.n_vocab,
                                 opts.separate_with_eos, opts.separate_with_bos, opts.fill_with_next_samples,
                                 opts.sample_random_offsets)
    schedule = dict(warmup=opts.warmup, cos_decay_steps=opts.cos_decay_steps, cos_decay_min=opts.cos_decay_min,
                    cos_decay_restart=opts.cos_decay_restart, enable_restart=opts.enable_restart)
    n_params = sum(p.size for p in params.values())
    say(f"finetune: {path}: {config.n_layer} layers, {len(samples.begins)} samples of {len(samples.tokens)} tokens, "
        f"{n_params} {'DoRA' if opts.dora else 'adapter'} parameters, ctx {opts.n_ctx} × batch {opts.n_batch} × grad-acc {opts.grad_acc}, "
        f"{threads} threads, seed {seed}" + (f", resuming at step {adam.step}" if opts.checkpoint_in else ""))

    def save(step):
        written = []
        if opts.checkpoint_out:
            for out in output_paths(opts.checkpoint_out, step):
                save_checkpoint(out, params, adam, order, header)
                written.append(out)
        written += write_adapters(opts, params, config, model_file, step)
        say(f"finetune: saved {', '.join(written)}")
        return written

    losses = []
    tokens_per_step = opts.n_ctx * opts.n_batch * opts.grad_acc
    shuffled = None
    grads = zeros_like_params(params)
    start_step = adam.step
    started = time.perf_counter()
    written = []
    stopped = False
    with StopFlag() as stop:
        while adam.step < opts.adam_iter and not (opts.epochs > 0 and order.epochs >= opts.epochs):
            step_started = time.perf_counter()
            for g in grads.values():
                g.fill(0)
            loss = 0.0
            for _ in range(opts.grad_acc):
                tokens, targets, shuffled = next_batch(samples, order, opts.n_batch, opts.n_ctx, batch_options, shuffled)
                loss += forward_backward(base, params, opts.lora_alpha, tokens, targets, grads,
                                         grad_scale=1.0 / opts.grad_acc, checkpointing=opts.use_checkpointing)
            loss /= opts.grad_acc
            norm = clip_grad_norm(grads, opts.adam_gclip)
            lr = scheduled_lr(adam.step + 1, opts.adam_alpha, opts.adam_min_alpha, **schedule)
            adam.update(params, grads, lr)
            losses.append(loss)
            now = time.perf_counter()
            done = adam.step - start_step
            rate = tokens_per_step * done / (now - started)
            eta = (now - started) / done * (opts.adam_iter - adam.step)
            say(f"iter {adam.step:5d}/{opts.adam_iter}  loss {loss:8.4f}  lr {lr:.3e}  |g| {norm:8.4f}  "
                f"{tokens_per_step / (now - step_started):7.1f} tok/s (avg {rate:.1f})  epoch {order.epochs}  "
                f"eta {format_eta(eta)}")
            if stop_after is not None and done >= stop_after:
                stop.set = True
            if stop.set:
                stopped = True
                break
            if opts.save_every > 0 and adam.step % opts.save_every == 0 and adam.step < opts.adam_iter:
                save(adam.step)
        written = save(adam.step)
    return {"losses": losses, "step": adam.step, "written": written, "stopped": stopped, "params": params,
            "epochs": order.epochs, "seed": seed}


def write_adapters(opts: FinetuneOptions, params: dict, config, model_file, step: int) -> list[str]:
    written = []
    if opts.lora_out:
        for out in output_paths(opts.lora_out, step):
            write_adapter_gguf(out, params, opts.lora_alpha, opts.lora_r, model_file.architecture or "llama")
            written.append(out)
    if opts.peft_out:
        for out in output_paths(opts.peft_out, step):
            write_peft(out, params, opts.lora_alpha, opts.lora_r, config, model_file.metadata.get("general.name"))
            written.append(out)
    return written


def resume(opts: FinetuneOptions, adam: AdamW, config, ranks: dict, settings: dict):
    """Parameters, data order and seed from --checkpoint-in, after checking it fits this run."""
    path = opts.checkpoint_in
    params, m, v, header, order = load_checkpoint(path)
    shapes = lora_shapes(config, ranks)
    want = {}
    for name, (r, n_out, n_in) in shapes.items():
        want[f"{name}.lora_a"] = (r, n_in)
        want[f"{name}.lora_b"] = (n_out, r)
        if opts.dora:
            want[f"{name}.lora_m"] = (n_out,)
    got = {name: tuple(p.shape) for name, p in params.items()}
    if got != want:
        diff = sorted(set(got.items()) ^ set(want.items()))[:1]
        raise InputError(f"{path}: the checkpoint's adapter does not fit this model, these ranks and "
                         f"{'--dora' if opts.dora else 'no --dora'} (first difference: {diff[0][0]} {diff[0][1]})")
    for key, value in settings.items():
        if header["settings"].get(key) != value:
            raise InputError(f"{path}: the checkpoint was made with {key} = {header['settings'].get(key)!r}, "
                             f"this run has {value!r}; resume with the same value")
    adam.step = int(header["step"])
    adam.m = {name: m[name] for name in params if name in m}
    adam.v = {name: v[name] for name in params if name in v}
    return params, order, int(header["seed"])
