"""Compile targets other than the host's, for running the kernels another CPU would run.

numba compiles for NUMBA_CPU_NAME with the features NUMBA_CPU_FEATURES lists; without the list it passes the
host's features, which override the name (llamalora/kernels/target.py). `environment(name)` gives both for a
CPU family, every feature the host's LLVM knows listed as present or absent, so that a child process compiles
exactly that family's instruction set on any x86-64 host that has it.
"""

import os

import llvmlite.binding as llvm

# LLVM's features of Intel Haswell (AVX2, FMA, F16C; no AVX-512, no AVX-VNNI): what the AVX2 kernels target
HASWELL = frozenset({
    "64bit", "aes", "avx", "avx2", "bmi", "bmi2", "cmov", "crc32", "cx16", "cx8", "f16c", "fma", "fsgsbase", "fxsr",
    "invpcid", "lzcnt", "mmx", "movbe", "pclmul", "popcnt", "rdrnd", "sahf", "sse", "sse2", "sse3", "sse4.1",
    "sse4.2", "ssse3", "xsave", "xsaveopt"})
FAMILIES = {"haswell": ("haswell", HASWELL)}


def host_can_run(name: str) -> bool:
    """Whether this host has every feature of the family (so code compiled for it runs here)."""
    try:
        host = llvm.get_host_cpu_features()
    except RuntimeError:
        return False
    return all(host.get(feature, False) for feature in FAMILIES[name][1])


def environment(name: str) -> dict:
    """os.environ for a child process whose numba compiles for the CPU family `name` (a key of FAMILIES)."""
    cpu, present = FAMILIES[name]
    known = llvm.get_host_cpu_features()
    features = ",".join(("+" if feature in present else "-") + feature for feature in sorted(known))
    return {**os.environ, "NUMBA_CPU_NAME": cpu, "NUMBA_CPU_FEATURES": features}
