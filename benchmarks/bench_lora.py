"""Merge time of an all-linear r=16 adapter: SmolLM2 and the random 1B-shaped llama, f16 and q4_0, with and
without --lora-base, and how long a run-time (hot) swap takes on each, for LoRA and for DoRA (whose swap computes
the per-output scale g from every patched weight).

    python benchmarks/bench_lora.py [-t 2] [--repeat 5]

"merge alone" times merge_adapters by itself (files mapped and the adapter read beforehand), --repeat times,
best and median, with the 1-minute load average beside it (the machine may be shared).

The adapters are random PEFT folders (every q/k/v/o/gate/up/down projection, r=16, alpha=32) written to
benchmarks/models/. The table goes to stdout and benchmarks/results/lora.md.
"""

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
from safetensors.numpy import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import models  # noqa: E402

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def all_linear_adapter(folder: str, metadata: dict, r: int = 16, alpha: float = 32.0, dora: bool = False) -> str:
    """A random PEFT adapter on every linear projection of the model whose metadata is given; dora adds a
    lora_magnitude_vector per module (use_dora; random values near 1: the cost does not depend on them)."""
    if os.path.exists(os.path.join(folder, "adapter_config.json")):
        return folder
    dim, ff = metadata["llama.embedding_length"], metadata["llama.feed_forward_length"]
    kv = dim // metadata["llama.attention.head_count"] * metadata["llama.attention.head_count_kv"]
    shapes = {"q_proj": (dim, dim), "k_proj": (kv, dim), "v_proj": (kv, dim), "o_proj": (dim, dim),
              "gate_proj": (ff, dim), "up_proj": (ff, dim), "down_proj": (dim, ff)}
    rng = np.random.default_rng(0)
    tensors = {}
    for layer in range(metadata["llama.block_count"]):
        for module in MODULES:
            n_out, n_in = shapes[module]
            part = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            prefix = f"base_model.model.model.layers.{layer}.{part}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = (rng.standard_normal((r, n_in)) * 0.02).astype(np.float32)
            tensors[f"{prefix}.lora_B.weight"] = (rng.standard_normal((n_out, r)) * 0.02).astype(np.float32)
            if dora:
                tensors[f"{prefix}.lora_magnitude_vector"] = rng.uniform(0.9, 1.1, n_out).astype(np.float32)
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": list(MODULES),
                   "bias": "none", "use_dora": dora}, f)
    return folder


def time_load(path, adapter, **kwargs) -> tuple[float, float]:
    """Seconds to load the model without and with the adapter (the difference is the adapter's cost)."""
    from llamalora.loader import load_model

    t = time.perf_counter()
    load_model(path, progress=False)
    plain = time.perf_counter() - t
    t = time.perf_counter()
    load_model(path, adapters=[(adapter, 1.0)], progress=False, **kwargs)
    return plain, time.perf_counter() - t


def time_merge(path, adapter, lora_base=None, repeat=3) -> list[float]:
    """Seconds of merge_adapters alone, `repeat` times (time_load has already compiled the kernels)."""
    from llamalora.loader import load_adapters
    from llamalora.lora.merge import merge_adapters
    from llamalora.model_file import load_model_file

    model_file = load_model_file(path)
    adapters = load_adapters(model_file, [(adapter, 1.0)])
    base = load_model_file(lora_base).tensors if lora_base else None
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        merge_adapters(model_file.tensors, adapters, base_tensors=base, base_path=lora_base or "", progress=False)
        times.append(time.perf_counter() - t)
    return times


def time_swap(path, adapter) -> float:
    """Seconds to switch a loaded model to the adapter at run time (read the adapter, build its deltas; for DoRA
    also g = m / ‖W + s·B·A‖, one pass over every patched W)."""
    from llamalora.loader import load_adapters, load_model

    loaded = load_model(path, progress=False)
    t = time.perf_counter()
    loaded.model.set_lora(load_adapters(loaded.file, [(adapter, 1.0)]))
    return time.perf_counter() - t


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-t", "--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3, help="runs of the merge alone (best and median are kept)")
    parser.add_argument("--output", default=os.path.join(HERE, "results", "lora.md"))
    args = parser.parse_args()
    from llamalora.loader import set_threads
    from llamalora.model_file import load_model_file

    set_threads(args.threads)
    rows = [f"threads: {args.threads}", "",
            "| model | merge | load without adapter (s) | load with adapter (s) | adapter cost (s) "
            "| merge alone best / median (s) | load average |", "|---|---|---|---|---|---|---|"]
    for name, make in (("SmolLM2", models.smollm2), ("1B-shaped", models.one_b)):
        f16, q4_0 = make("f16"), make("q4_0")
        adapter = all_linear_adapter(os.path.join(models.MODELS, f"lora-all-linear-{name}"), load_model_file(f16).metadata)
        cases = (("f16", f16, {}), ("q4_0", q4_0, {"lora_mode": "merge"}),
                 ("q4_0 --lora-base f16", q4_0, {"lora_base": f16}), ("q4_0 run time", q4_0, {"lora_mode": "runtime"}))
        for label, path, kwargs in cases:
            time_load(path, adapter, **kwargs)  # warm the page cache and the compiled kernels
            plain, with_adapter = time_load(path, adapter, **kwargs)
            merge = "-"
            if kwargs.get("lora_mode") != "runtime":
                times = time_merge(path, adapter, kwargs.get("lora_base"), args.repeat)
                merge = f"{min(times):.2f} / {statistics.median(times):.2f}"
            row = (f"| {name} {label} | {kwargs} | {plain:.2f} | {with_adapter:.2f} | {with_adapter - plain:.2f} "
                   f"| {merge} | {os.getloadavg()[0]:.2f} |")
            rows.append(row)
            print(row, flush=True)
        dora = all_linear_adapter(os.path.join(models.MODELS, f"dora-all-linear-{name}"), load_model_file(f16).metadata,
                                  dora=True)
        for label, folder in (("LoRA", adapter), ("DoRA", dora)):
            time_swap(q4_0, folder)  # compiled kernels and page cache warm
            swap = time_swap(q4_0, folder)
            rows.append(f"| {name} q4_0 hot swap to {label} (set_lora) | - | - | - | {swap:.2f} | - | "
                        f"{os.getloadavg()[0]:.2f} |")
            print(rows[-1], flush=True)
    text = "\n".join(rows) + "\n"
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
