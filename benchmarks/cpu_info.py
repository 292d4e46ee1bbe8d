"""The machine a benchmark ran on, for its table's header: the CPU's name, its SIMD flags, the core count and
the compile target numba was told to use (NUMBA_CPU_NAME), so that a figure is never read against another CPU."""

import os

FLAGS = ("sse4_2", "avx", "f16c", "fma", "avx2", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
         "avx512_bf16", "avx512_fp16", "amx_tile", "asimd", "asimddp")


def cpu_name() -> str:
    return _read()[0]


def _read() -> tuple[str, set]:
    name, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "Model") and name == "unknown CPU":
                    name = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return name, flags


def cpu_line() -> str:
    name, flags = _read()
    shown = " ".join(f for f in FLAGS if f in flags) or "no SIMD flags read"
    target = os.environ.get("NUMBA_CPU_NAME")
    return (f"CPU: {name}, {os.cpu_count()} cores; flags: {shown}"
            + (f"; kernels compiled for NUMBA_CPU_NAME={target}" if target else ""))


if __name__ == "__main__":
    print(cpu_line())
