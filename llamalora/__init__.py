"""llamalora: LLaMA-family GGUF models on the CPU, with LoRA adapters applied on the fly."""

import os
import sys

__version__ = "0.1.0"


def cache_dir() -> str:
    """Where numba keeps the compiled kernels: NUMBA_CACHE_DIR if the user set it, else a per-user folder
    ($XDG_CACHE_HOME/llamalora, or ~/.cache/llamalora)."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return os.environ["NUMBA_CACHE_DIR"]
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return os.path.join(xdg if os.path.isabs(xdg) else os.path.expanduser("~/.cache"), "llamalora")


# numba's default cache is a __pycache__ folder beside each source file, inside the installed package: an
# uninstall leaves those files behind, and the package folder that remains (without __init__.py) then shadows a
# later editable install as a namespace package. So the cache lives in one per-user folder, set before the
# first kernel is decorated (numba reads the variable then; numba.config too, in case numba is already imported).
os.environ["NUMBA_CACHE_DIR"] = cache_dir()
if "numba" in sys.modules:
    sys.modules["numba"].config.CACHE_DIR = os.environ["NUMBA_CACHE_DIR"]

# The kernels run on OpenMP (libgomp) thread teams, a few hundred short parallel loops per token. Idle team threads
# spin for a bounded time, then sleep, and threads.Governor uses fewer threads where another program holds a core.
# SmolLM2 Q4_1 decode at -t 2 on a 2-core EPYC VM (benchmarks/bench_threads.py, with the governor), quiet / beside a
# busy core, tokens/s: GOMP_SPINCOUNT 1000: 150.7 / 105.0, 10000: 143.3 / 113.9, 100000: 155.9 / 98.6; sleeping at
# once (OMP_WAIT_POLICY=passive) 113.3 / 114.4. 10000 is as fast as passive beside a busy core and within the
# noise of the longer spins on a quiet machine.
# Set before libgomp is loaded, which reads it once; the user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT win.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = "10000"
