"""`llamalora quantize` beside llama.cpp's quantizer on SmolLM2: per-tensor types, bytes, perplexity, time.

    python benchmarks/bench_quantize.py [--mixes q4_k_m,q5_k_m,q6_k,q8_0] [--no-ppl] [--keep DIR]

For each mix, SmolLM2 f16 (benchmarks/models/smollm2-f16.gguf, made from the shipped Q4_1 by our quantize) is
quantized by `llamalora quantize` and by llama.cpp (llama-cpp-python's llama_model_quantize, no importance matrix).
The two files must give every tensor the same type (checked: the script exits 1 otherwise); the table also says
how many tensors have identical bytes, each side's time and size, our perplexity of our file
(`llamalora perplexity -f tests/data/fortunes_heldout.txt -c 128 --chunks 16`) and the greedy continuation of
"The capital of France is". llama_cpp is needed here only, never by the tests.
"""

import argparse
import ctypes
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
HELDOUT = os.path.join(HERE, "..", "tests", "data", "fortunes_heldout.txt")
# llama_ftype numbers (llama.h)
LLAMA_FTYPES = {"q8_0": 7, "q4_k_s": 14, "q4_k_m": 15, "q5_k_s": 16, "q5_k_m": 17, "q6_k": 18}


def quiet_llama_cpp():
    """llama.cpp logs every tensor to stderr; keep the table readable."""
    import llama_cpp

    global _LOG_CALLBACK
    _LOG_CALLBACK = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
    llama_cpp.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))


def llama_cpp_quantize(src: str, dst: str, mix: str, threads: int) -> float:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPES[mix]
    params.nthread = threads
    start = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src}, {mix}) returned {rc}")
    return time.perf_counter() - start


def ours_quantize(src: str, dst: str, mix: str, threads: int) -> float:
    start = time.perf_counter()
    subprocess.run(["llamalora", "quantize", src, dst, mix, "-t", str(threads)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def tensors_of(path: str) -> dict:
    from gguf import GGUFReader

    return {t.name: (t.tensor_type.name, np.asarray(t.data).tobytes()) for t in GGUFReader(path).tensors}


def file_type(path: str) -> int:
    from gguf import GGUFReader

    return int(GGUFReader(path).fields["general.file_type"].parts[-1][0])


def perplexity(path: str, threads: int) -> float:
    out = subprocess.run(["llamalora", "perplexity", "-m", path, "-f", HELDOUT, "-c", "128", "--chunks", "16",
                          "-t", str(threads)], check=True, capture_output=True, text=True)
    return float(re.search(r"Final estimate: PPL = ([0-9.]+)", out.stdout + out.stderr).group(1))


def greedy(path: str) -> str:
    out = subprocess.run(["llamalora", "main", "-m", path, "-p", "The capital of France is", "-n", "4", "--temp", "0"],
                         check=True, capture_output=True, text=True)
    return out.stdout.strip().replace("The capital of France is", "", 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mixes", default="q4_k_m,q5_k_m,q6_k,q8_0,q4_k_s,q5_k_s")
    parser.add_argument("-t", "--threads", type=int, default=2)
    parser.add_argument("--no-ppl", action="store_true", help="skip perplexity and generation")
    parser.add_argument("--keep", default=None, help="write the files here (default: a temporary folder)")
    args = parser.parse_args()

    from models import smollm2

    f16 = smollm2("f16")
    quiet_llama_cpp()
    folder = args.keep or tempfile.mkdtemp(prefix="bench_quantize_")
    os.makedirs(folder, exist_ok=True)
    print(f"source: {f16}; load average {os.getloadavg()[0]:.2f}; {args.threads} threads\n")
    rows, mismatched = [], 0
    for mix in args.mixes.split(","):
        ours_path = os.path.join(folder, f"ours-{mix}.gguf")
        theirs_path = os.path.join(folder, f"llama.cpp-{mix}.gguf")
        t_ours = ours_quantize(f16, ours_path, mix, args.threads)
        t_theirs = llama_cpp_quantize(f16, theirs_path, mix, args.threads)
        ours, theirs = tensors_of(ours_path), tensors_of(theirs_path)
        differ = sorted(n for n in theirs if ours.get(n, (None,))[0] != theirs[n][0]) + sorted(set(ours) - set(theirs))
        for name in differ:
            print(f"{mix}: {name}: ours {ours.get(name, ('missing',))[0]}, llama.cpp "
                  f"{theirs.get(name, ('missing',))[0]}")
        mismatched += len(differ)
        same_bytes = sum(ours[n][1] == theirs[n][1] for n in theirs if n in ours)
        counts = Counter(t for t, _ in ours.values())
        row = {"mix": mix, "types": ", ".join(f"{k.lower()} {v}" for k, v in sorted(counts.items())),
               "same_types": f"{len(theirs) - len(differ)}/{len(theirs)}", "same_bytes": f"{same_bytes}/{len(theirs)}",
               "file_type": f"{file_type(ours_path)} / {file_type(theirs_path)}",
               "mib": f"{os.path.getsize(ours_path) / 2**20:.2f} / {os.path.getsize(theirs_path) / 2**20:.2f}",
               "seconds": f"{t_ours:.1f} / {t_theirs:.1f}", "ppl": "", "ppl_theirs": "", "text": ""}
        if not args.no_ppl:
            row["ppl"] = f"{perplexity(ours_path, args.threads):.4f}"
            row["ppl_theirs"] = f"{perplexity(theirs_path, args.threads):.4f}"
            row["text"] = repr(greedy(ours_path))
        rows.append(row)
        print(row, flush=True)
    print("\n| mix | tensors per type (ours) | same type | same bytes | general.file_type ours / llama.cpp "
          "| MiB ours / llama.cpp | quantize s ours / llama.cpp | PPL ours | PPL of llama.cpp's file | greedy |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mix']} | {r['types']} | {r['same_types']} | {r['same_bytes']} | {r['file_type']} | {r['mib']} "
              f"| {r['seconds']} | {r['ppl']} | {r['ppl_theirs']} | {r['text']} |")
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")
    if mismatched:
        print(f"{mismatched} tensors got a different type than llama.cpp gives them", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
