"""llamalora: LLaMA-family GGUF models on the CPU, with LoRA adapters applied on the fly."""

import os

__version__ = "0.1.0"

# The kernels run on OpenMP (libgomp) thread teams, a few hundred short parallel loops per token. By default
# idle team threads spin for a long while before sleeping; when the cores are shared with other processes the
# spinning threads take the time slices the working ones need, and decoding on 2 busy cores measured 0.9
# tokens/s instead of 16. Waiting passively costs little when the machine is idle (see benchmarks/), so it is
# the default unless the user chose a policy. Set before libgomp is loaded, which reads it once.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "passive"
