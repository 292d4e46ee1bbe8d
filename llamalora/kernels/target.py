"""The instruction set numba compiles for, which every kernel choice follows; and how the host's memory system
likes rows streamed, which only tunes them.

numba's JIT hands LLVM a CPU name and a feature list: NUMBA_CPU_NAME / NUMBA_CPU_FEATURES when set, otherwise
the host's. The explicit features override whatever the CPU name implies, and without NUMBA_CPU_FEATURES the
host's features are passed, so `NUMBA_CPU_NAME=haswell` alone still compiles for the host's instruction set:
to build what an AVX2 CPU runs, set both (tests/cpu_targets.py writes the feature list of a Haswell-class CPU
for this host). A kernel that uses an instruction the target lacks makes LLVM abort the process, so only
features named with a "+" in that list count as present.
"""

import llvmlite.binding as llvm
from numba.core import config
from numba.core.codegen import get_host_cpu_features


def features() -> frozenset:
    """The CPU features (LLVM's names: "avx2", "avx512vnni", ...) of the target numba compiles for."""
    listed = config.CPU_FEATURES if config.CPU_FEATURES is not None else get_host_cpu_features()
    return frozenset(name[1:] for name in listed.split(",") if name.startswith("+"))


def has(*names: str) -> bool:
    """Whether the compile target has every one of the named features."""
    present = features()
    return all(name in present for name in names)


AMD_CPU_NAMES = ("znver", "bdver", "btver", "amdfam", "barcelona", "opteron", "athlon", "k8")


def host_spreads_rows() -> bool:
    """Whether the host's hardware prefetchers follow a matrix best in sequential streams of their own (AMD's,
    measured on an EPYC Zen 4 for the integer and F16 decode kernels, AVX2 and AVX-512 code alike: rows spread over
    the matrix, or one at a time), against adjacent rows a step with a software prefetch far ahead (Intel's,
    measured on an AVX-512 Xeon). A property of the host, not of the compile target: it decides how the kernels
    walk the rows, never which instructions they use."""
    return llvm.get_host_cpu_name().startswith(AMD_CPU_NAMES)
