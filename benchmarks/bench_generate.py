"""Prompt processing (pp) and generation (tg) tokens/s: llamalora beside llama.cpp on the same file, same threads.

    python benchmarks/bench_generate.py                     # the whole table: every benchmark model, ± adapter, -t 1 and 2
    python benchmarks/bench_generate.py -m smollm2:q4_1 -t 2 --no-adapter --pp 128 --tg 32   # one row, quickly

Models are named as benchmarks/models.py makes them (`smollm2:q4_1` is the shipped file; `smollm2:q4_0`, `:q8_0`,
`:f16`, `:q4_k_m`, `:q6_k`, `1b:q4_0`, `1b:q4_k_m`, `1b:f16`) or given as paths. With the adapter, each model also runs with
a random all-linear r=16 adapter (benchmarks/bench_lora.py makes it): run-time mode for us (W stays quantized),
the same adapter as GGUF through `lora_path` for llama.cpp, which also applies it unmerged.

Both sides are timed the same way: pp = one batch of --pp prompt tokens into an empty context, tg = --tg
single-token evaluations after it (fixed token ids, no sampler), best of --repeat runs. llama.cpp runs through
llama-cpp-python (built from source) in its own process, so that neither engine's thread pool or OpenMP settings
touch the other's. tg / limit is our tg as a fraction of file bytes per token at this run's copy bandwidth.

Each engine runs in a child process of its own. With --avx2 both run what an AVX2 CPU runs, on any x86-64 host
that has AVX2: our kernels compiled for a Haswell-class target (tests/cpu_targets.py: NUMBA_CPU_NAME and the
feature list, so kernel choice follows it), llama.cpp from a build with AVX-512 off, loaded by llama-cpp-python
through LLAMA_CPP_LIB_PATH (--peer-lib; by default benchmarks/peers/avx2/bin, built from the source inside
llama-cpp-python's sdist:
    cmake -S vendor/llama.cpp -B build-avx2 -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON \
        -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF \
        -DBUILD_SHARED_LIBS=ON -DCMAKE_RUNTIME_OUTPUT_DIRECTORY=$PWD/benchmarks/peers/avx2/bin \
        -DCMAKE_LIBRARY_OUTPUT_DIRECTORY=$PWD/benchmarks/peers/avx2/bin
    cmake --build build-avx2 -j 2 --target llama llama-bench llama-server
).

The table goes to stdout and into benchmarks/results/generate.md, which keeps one section per CPU and kernel
kind (its heading: the CPU's name and the instruction sets both engines ran): a run replaces its own kind's
section and leaves the others.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the checkout's llamalora, not an installed one
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))  # cpu_targets: the environment of an AVX2 target
AVX2_PEER_LIB = os.path.join(HERE, "peers", "avx2", "bin")
MODEL_NAMES = ("smollm2:q4_1", "smollm2:q4_0", "smollm2:q8_0", "smollm2:f16", "smollm2:q4_k_m", "smollm2:q6_k",
               "1b:q4_0", "1b:q4_k_m", "1b:f16")


def bandwidth_gbs() -> float:
    """Copy bandwidth of this machine (read + write of a buffer far larger than the caches), in GB/s."""
    src = np.ones(256 * 1024 * 1024 // 8)
    dst = np.empty_like(src)
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = max(best, 2 * src.nbytes / (time.perf_counter() - t) / 1e9)
    return best


def prompt_tokens(n_vocab: int, n: int, seed: int = 0) -> list[int]:
    """The same pseudo-random token ids for both engines (which token is fed does not change the work)."""
    rng = np.random.default_rng(seed)
    return rng.integers(100, min(n_vocab, 30000), size=n).tolist()


def model_path(name: str) -> str:
    if os.path.exists(name):
        return name
    import models

    family, kind = name.split(":")
    return {"smollm2": models.smollm2, "1b": models.one_b}[family](kind)


def adapter_paths(name: str, dora: bool = False) -> tuple[str, str]:
    """(PEFT folder, GGUF adapter) of the all-linear r=16 adapter (dora: its DoRA form, with magnitudes) for the
    model family of name."""
    import models
    from bench_lora import all_linear_adapter

    from llamalora.model_file import load_model_file

    family = "1b" if name.startswith("1b") or "1b" in os.path.basename(name) else "smollm2"
    f16 = model_path(f"{family}:f16")
    folder = all_linear_adapter(os.path.join(models.MODELS, f"{'dora' if dora else 'lora'}-all-linear-{family}"),
                                load_model_file(f16).metadata, dora=dora)
    gguf = os.path.join(folder, "adapter.gguf")
    if not os.path.exists(gguf):
        subprocess.run([sys.executable, os.path.join(HERE, "..", "scripts", "convert_lora_to_ggml.py"), folder,
                        "--gguf", "--base", f16, "--outfile", gguf], check=True, capture_output=True)
    return folder, gguf


def bench_llamalora(path, threads, n_pp, n_tg, repeat, adapter=None, env=None):
    """Our (pp, tg, the integer kernels' instruction set), measured in a child process with env (the compile
    target's NUMBA_CPU_NAME / NUMBA_CPU_FEATURES for --avx2)."""
    args = json.dumps([path, threads, n_pp, n_tg, repeat, adapter])
    run = subprocess.run([sys.executable, __file__, "--ours", args], capture_output=True, text=True,
                         env=env or dict(os.environ))
    if run.returncode != 0:
        raise SystemExit(f"llamalora on {os.path.basename(path)}: {run.stderr.strip()[-2000:]}")
    return tuple(json.loads(run.stdout.strip().splitlines()[-1]))


def ours_main(args_json: str) -> None:
    path, threads, n_pp, n_tg, repeat, adapter = json.loads(args_json)
    from llamalora.generate import Context
    from llamalora.kernels import intmatvec
    from llamalora.loader import load_model, set_threads

    set_threads(threads)
    adapters = [(adapter, 1.0)] if adapter else []
    loaded = load_model(path, adapters=adapters, lora_mode="runtime", progress=False)
    ids = prompt_tokens(loaded.vocab.n_vocab, n_pp)
    gen_ids = prompt_tokens(loaded.vocab.n_vocab, n_tg, seed=1)
    warm = Context(loaded.model, n_ctx=64)
    warm.eval(ids[:16])  # compile / warm up both paths
    warm.eval(ids[16:17], generating=True)
    pp = tg = 0.0
    for _ in range(repeat):
        ctx = Context(loaded.model, n_ctx=n_pp + n_tg + 8, n_batch=n_pp)
        t = time.perf_counter()
        ctx.eval(ids)
        pp = max(pp, n_pp / (time.perf_counter() - t))
        t = time.perf_counter()
        for token in gen_ids:
            ctx.eval([token], generating=True)
        tg = max(tg, n_tg / (time.perf_counter() - t))
    print(json.dumps([pp, tg, intmatvec.ISA]))


def bench_llama_cpp(path, threads, n_pp, n_tg, repeat, adapter=None, lib=None):
    """The peer's (pp, tg), measured in a child process (llama.cpp's libraries from lib when given); None when
    llama-cpp-python is not installed."""
    args = json.dumps([path, threads, n_pp, n_tg, repeat, adapter])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_", "LLAMALORA_", "NUMBA_"))}
    if lib:
        env["LLAMA_CPP_LIB_PATH"] = lib
    run = subprocess.run([sys.executable, __file__, "--peer", args], capture_output=True, text=True, env=env)
    if run.returncode != 0:
        message = (run.stderr.strip().splitlines() or [f"exit {run.returncode}"])[-1]
        print(f"llama.cpp on {os.path.basename(path)}: {message}", file=sys.stderr)
        return None
    return tuple(json.loads(run.stdout.strip().splitlines()[-1]))


def peer_main(args_json: str) -> None:
    path, threads, n_pp, n_tg, repeat, adapter = json.loads(args_json)
    from llama_cpp import Llama

    kwargs = {"lora_path": adapter, "lora_scale": 1.0} if adapter else {}
    llm = Llama(model_path=path, n_ctx=n_pp + n_tg + 8, n_batch=n_pp, n_ubatch=n_pp, n_threads=threads,
                n_threads_batch=threads, verbose=False, **kwargs)
    ids = prompt_tokens(llm.n_vocab(), n_pp)
    gen_ids = prompt_tokens(llm.n_vocab(), n_tg, seed=1)
    llm.eval(ids[:16])
    pp = tg = 0.0
    for _ in range(repeat):
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids)
        pp = max(pp, n_pp / (time.perf_counter() - t))
        t = time.perf_counter()
        for token in gen_ids:
            llm.eval([token])
        tg = max(tg, n_tg / (time.perf_counter() - t))
    print(json.dumps([pp, tg]))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--model", action="append", help=f"model name or path (repeatable); default: all of "
                                                                f"{', '.join(MODEL_NAMES)}")
    parser.add_argument("-t", "--threads", action="append", type=int, help="thread count (repeatable); default 1 and 2")
    parser.add_argument("--pp", type=int, default=512)
    parser.add_argument("--tg", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-adapter", action="store_true", help="skip the rows with the all-linear adapter")
    parser.add_argument("--avx2", action="store_true", help="both engines as an AVX2 CPU runs them (see above)")
    parser.add_argument("--peer-lib", help="folder of the llama.cpp libraries llama-cpp-python loads "
                                           "(default: its own; with --avx2, benchmarks/peers/avx2/bin)")
    parser.add_argument("--peer", help=argparse.SUPPRESS)
    parser.add_argument("--ours", help=argparse.SUPPRESS)
    parser.add_argument("--output", default=os.path.join(HERE, "results", "generate.md"))
    args = parser.parse_args()
    if args.peer:
        return peer_main(args.peer)
    if args.ours:
        return ours_main(args.ours)
    from cpu_info import cpu_line, cpu_name

    ours_env, peer_lib = dict(os.environ), args.peer_lib
    if args.avx2:
        import cpu_targets

        if not cpu_targets.host_can_run("haswell"):
            raise SystemExit("--avx2: this host cannot run code built for Haswell")
        ours_env, peer_lib = cpu_targets.environment("haswell"), peer_lib or AVX2_PEER_LIB
        if not os.path.exists(os.path.join(peer_lib, "libllama.so")):
            raise SystemExit(f"--avx2: no libllama.so in {peer_lib} (build it as this file's docstring says)")

    names = args.model or list(MODEL_NAMES)
    threads = args.threads or [1, 2]
    bw = bandwidth_gbs()
    load = os.getloadavg()[0]
    isa = None
    rows = [cpu_line(), "", f"copy bandwidth {bw:.1f} GB/s; load average at the start {load:.2f}; pp{args.pp} / tg{args.tg}, "
            f"best of {args.repeat}", "",
            "| model | adapter | t | pp llamalora | pp llama.cpp | pp ratio | tg llamalora | tg llama.cpp | tg ratio "
            "| tg / limit |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(rows), flush=True)
    for name in names:
        path = model_path(name)
        limit = bw * 1e9 / os.path.getsize(path)  # tokens/s if every file byte is read once per token
        for with_adapter in ([False] if args.no_adapter else [False, True]):
            folder, gguf = adapter_paths(name) if with_adapter else (None, None)
            for t in threads:
                *ours, isa = bench_llamalora(path, t, args.pp, args.tg, args.repeat, folder, ours_env)
                theirs = bench_llama_cpp(path, t, args.pp, args.tg, args.repeat, gguf, peer_lib)
                peer = (f"{theirs[0]:.1f} | {ours[0] / theirs[0]:.2f}" if theirs else "n/a | n/a",
                        f"{theirs[1]:.1f} | {ours[1] / theirs[1]:.2f}" if theirs else "n/a | n/a")
                row = (f"| {name if not os.path.exists(name) else os.path.basename(name)} "
                       f"| {'all-linear r16' if with_adapter else '-'} | {t} | {ours[0]:.1f} | {peer[0]} "
                       f"| {ours[1]:.1f} | {peer[1]} | {ours[1] / limit:.2f} |")
                rows.append(row)
                print(row, flush=True)
    rows.append(f"\nload average at the end {os.getloadavg()[0]:.2f}")
    peer = "llama.cpp built for AVX2 (AVX-512 off)" if args.avx2 else (
        f"llama.cpp from {peer_lib}" if peer_lib else "llama.cpp as llama-cpp-python built it (native)")
    heading = f"## {cpu_name()}: our kernels for {isa}, {peer}"
    write_section(args.output, heading, rows)


TITLE = "# pp and tg tokens/s: llamalora vs llama.cpp (`python benchmarks/bench_generate.py`)"


def write_section(path: str, heading: str, rows: list[str], title: str = TITLE) -> None:
    """Put the run's rows under heading in the results file (title its first line), replacing that heading's old
    section only: a file keeps a section per CPU kind."""
    sections, current = {}, None
    if os.path.exists(path):
        with open(path) as f:
            for line in f.read().splitlines():
                if line.startswith("## "):
                    current = line
                    sections[current] = []
                elif current is not None:
                    sections[current].append(line)
    sections[heading] = [""] + rows + [""]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(title + "\n\n" + "\n".join(f"{h}\n\n" + "\n".join(body).strip("\n") + "\n"
                                           for h, body in sections.items()))


if __name__ == "__main__":
    sys.exit(main())
