"""llamalora: LLaMA-family GGUF models on the CPU, with LoRA adapters applied on the fly."""

import os

__version__ = "0.1.0"

# The kernels run on OpenMP (libgomp) thread teams, a few hundred short parallel loops per token, and idle team
# threads either spin or sleep between them. Measured on 2 cores (SmolLM2 Q4_1, -t 2, 128 tokens): on an idle machine
# spinning decodes 211-218 tokens/s (GOMP_SPINCOUNT 3000 to 300000) and passive waiting 142-146; with the other core
# busy, passive waiting keeps 110 tokens/s while spinning falls to 17-39. Passive is the default because it never
# collapses; on a machine of its own, OMP_WAIT_POLICY=active or a GOMP_SPINCOUNT is a third faster. Set before
# libgomp is loaded, which reads it once.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "passive"
