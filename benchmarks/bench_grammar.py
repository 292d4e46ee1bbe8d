"""Cost of grammar-constrained sampling: mask time per token on realistic JSON, and generation tokens/s on SmolLM2
with and without the JSON grammar.

    python benchmarks/bench_grammar.py [-m MODEL.gguf] [--docs 6] [--generate] [--tg 96] [-t THREADS]

Masking: JSON documents shaped like model output (records with names, numbers, booleans, nested arrays and
objects, non-ASCII text; pretty-printed and compact) are tokenized with the model's vocabulary and fed token by
token; each step times allowed_mask + accept. "cold" is a freshly parsed grammar on its first document (every state
new to it), "warm" the same grammar object on further documents of the same kind (states seen before come from the
cache). The first use of a vocabulary (its sorted index, the numba walk) is timed apart.

Generation (--generate): the same prompt, the default sampler chain, --tg tokens; unconstrained and under
json.gbnf with a fresh grammar, twice each, interleaved, the faster of the two counting (when the grammar's output is complete and EOS is sampled, a new document starts so
the run keeps --tg tokens). Results go to stdout and benchmarks/results/grammar.md.
"""

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from llamalora.grammar import load_grammar_file, mask_logits  # noqa: E402

JSON_GRAMMAR = os.path.join(os.path.dirname(HERE), "tests", "data", "grammars", "json.gbnf")
WORDS = ["Ada", "Lovelace", "engine", "Paris", "café", "naïve", "東京", "data", "alpha", "beta", "report", "ok",
         "Zürich", "release", "notes", "über", "ścieżka", "blue", "green", "north", "42nd street"]


def document(rng: np.random.Generator, depth: int = 0):
    """A JSON value of the kind a model asked for structured output writes."""
    def text():
        return " ".join(rng.choice(WORDS, rng.integers(1, 4)))

    record = {
        "id": int(rng.integers(1, 10 ** rng.integers(1, 7))),
        "name": text(),
        "score": round(float(rng.normal(50, 20)), int(rng.integers(0, 4))),
        "active": bool(rng.integers(0, 2)),
        "tags": [text() for _ in range(rng.integers(0, 4))],
        "owner": None if rng.integers(0, 3) == 0 else {"first": text(), "last": text(), "age": int(rng.integers(18, 90))},
    }
    if depth < 2 and rng.integers(0, 2):
        record["children"] = [document(rng, depth + 1) for _ in range(rng.integers(1, 3))]
    return record


def render(value, rng) -> str:
    style = rng.integers(0, 3)
    if style == 0:
        return json.dumps(value, ensure_ascii=False)
    if style == 1:
        return json.dumps(value, ensure_ascii=False, indent=2)
    return json.dumps(value, ensure_ascii=False, indent="\t", separators=(",", ": "))


def time_document(grammar, vocab, ids) -> np.ndarray:
    state = grammar.start()
    times = np.empty(len(ids))
    for k, token in enumerate(ids):
        t = time.perf_counter()
        mask = state.allowed_mask(vocab)
        if not mask[token]:
            raise AssertionError(f"the grammar refuses token {token} {vocab.token_bytes(token)!r}")
        state.accept(token, vocab)
        times[k] = time.perf_counter() - t
    assert state.can_end()
    return times * 1e3


def summary(ms: np.ndarray) -> str:
    return (f"{ms.mean():.3f} | {np.median(ms):.3f} | {np.percentile(ms, 95):.3f} | {ms.max():.2f}")


def bench_masks(vocab, n_docs: int) -> list[str]:
    rng = np.random.default_rng(0)
    docs = [render({"items": [document(rng) for _ in range(rng.integers(1, 3))]}, rng) for _ in range(n_docs)]
    token_docs = [vocab.tokenize(d, add_bos=False) for d in docs]
    t = time.perf_counter()
    load_grammar_file(JSON_GRAMMAR).start().allowed_mask(vocab)
    first_use = time.perf_counter() - t

    cold, warm = [], []
    for ids in token_docs:  # each document on a fresh grammar: every one of them cold
        cold.append(time_document(load_grammar_file(JSON_GRAMMAR), vocab, ids))
    shared = load_grammar_file(JSON_GRAMMAR)
    time_document(shared, vocab, token_docs[0])
    for ids in token_docs[1:]:
        warm.append(time_document(shared, vocab, ids))
    cold_ms, warm_ms = np.concatenate(cold), np.concatenate(warm)
    lines = [f"JSON grammar masks, vocabulary of {vocab.n_vocab} tokens, {len(docs)} documents "
             f"({sum(map(len, token_docs))} tokens, {np.mean([len(d) for d in docs]):.0f} characters on average)",
             "", f"first use of the vocabulary (index + compiled walk): {first_use * 1e3:.0f} ms", "",
             "| grammar tables | mean ms/token | median | p95 | max |", "|---|---|---|---|---|",
             f"| cold (fresh grammar per document) | {summary(cold_ms)} |",
             f"| warm (grammar reused) | {summary(warm_ms)} |"]
    return lines


def bench_generate(loaded, n_tg: int) -> list[str]:
    from llamalora.generate import Context
    from llamalora.sampling import Sampler, SamplerParams

    vocab = loaded.vocab
    prompt = ("<|im_start|>user\nDescribe three books as a JSON object with a list of items, each with title, "
              "author, year and tags.<|im_end|>\n<|im_start|>assistant\n")
    prompt_ids = vocab.tokenize(prompt)
    warm = Context(loaded.model, n_ctx=64)  # compile / warm up the kernels before anything is timed
    warm.eval(prompt_ids[:16])
    for token in prompt_ids[16:20]:
        warm.eval([token], generating=True)
    results = {}
    for constrained in (False, True, False, True):  # twice each, interleaved; the better run of each counts
        ctx = Context(loaded.model, n_ctx=len(prompt_ids) + n_tg + 8)
        sampler = Sampler(SamplerParams(seed=1), vocab.n_vocab)
        logits = ctx.eval(prompt_ids)
        history = list(prompt_ids)
        grammar = load_grammar_file(JSON_GRAMMAR) if constrained else None
        state = grammar.start() if grammar else None
        mask_ms, n_docs, text = 0.0, 0, bytearray()
        start = time.perf_counter()
        for _ in range(n_tg):
            if state is not None:
                t = time.perf_counter()
                logits = mask_logits(logits, state.allowed_mask(vocab))
                mask_ms += time.perf_counter() - t
            token = sampler.sample(logits, history)
            if state is not None:
                t = time.perf_counter()
                if vocab.is_eog(token):  # a document is complete: start another one
                    state, n_docs = grammar.start(), n_docs + 1
                    token = vocab.tokenize("{", add_bos=False)[0]
                state.accept(token, vocab)
                mask_ms += time.perf_counter() - t
            history.append(token)
            text += vocab.token_bytes(token)
            logits = ctx.eval([token], generating=True)
        elapsed = time.perf_counter() - start
        if constrained not in results or n_tg / elapsed > results[constrained][0]:
            results[constrained] = (n_tg / elapsed, mask_ms / n_tg * 1e3, n_docs, bytes(text[:160]))
    free, bound = results[False], results[True]
    return ["", f"generation, {n_tg} tokens, default sampler chain, seed 1:", "",
            "| run | tokens/s | grammar ms/token |", "|---|---|---|",
            f"| unconstrained | {free[0]:.1f} | - |",
            f"| json.gbnf | {bound[0]:.1f} | {bound[1]:.2f} |",
            "", f"constrained / unconstrained: {bound[0] / free[0]:.2f} ({bound[2]} complete documents); "
                f"constrained output starts: {bound[3].decode('utf-8', 'replace')!r}"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default=None)
    ap.add_argument("--docs", type=int, default=6)
    ap.add_argument("--generate", action="store_true")
    ap.add_argument("--tg", type=int, default=96)
    ap.add_argument("-t", "--threads", type=int, default=None)
    args = ap.parse_args()

    from llamalora.loader import default_model_path, load_model, set_threads
    from llamalora.model_file import load_model_file
    from llamalora.vocab import Vocab

    path = args.model or default_model_path()
    lines = [f"# bench_grammar: {os.path.basename(path)}", ""]
    if args.generate:
        set_threads(args.threads)
        loaded = load_model(path, progress=False)
        vocab = loaded.vocab
    else:
        vocab = Vocab.from_metadata(load_model_file(path).metadata)
    lines += bench_masks(vocab, args.docs)
    if args.generate:
        lines += bench_generate(loaded, args.tg)
    print("\n".join(lines))
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "grammar.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
