"""llama.cpp's perplexity protocol: by hand on a stub model, and against transformers on SmolLM2."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from conftest import data_path

from llamalora.errors import InputError
from llamalora.generate import Context
from llamalora.lora.adapter import load_adapter
from llamalora.perplexity import chunk_count, perplexity

V = 10


class RuleModel:
    """Predicts next = (current + 1) % V with probability 1/2, every other token 1/(2(V-1)); records what it sees."""

    def __init__(self):
        self.seen = []

    def new_cache(self, n_ctx):
        class Cache:
            n = 0

            def clear(self, n=0):
                self.n = min(self.n, n)

        return Cache()

    def forward(self, tokens, cache, all_logits=False, lora=None):
        self.seen.append(list(tokens))
        cache.n += len(tokens)
        probs = np.full((len(tokens), V), 0.5 / (V - 1))
        probs[np.arange(len(tokens)), (np.asarray(tokens) + 1) % V] = 0.5
        logits = np.log(probs).astype(np.float32)
        return logits if all_logits else logits[-1:]


def test_protocol_by_hand():
    # two chunks of 8: positions 4..6 of each chunk predict tokens 5..7, the first half is context only
    chunk1 = [9, 9, 9, 9, 3, 4, 5, 0]  # scored targets 4, 5, 0: follow, follow, miss
    chunk2 = [7, 7, 7, 7, 1, 2, 8, 9]  # scored targets 2, 8, 9: follow, miss, follow
    tokens = chunk1 + chunk2 + [1, 2, 3]  # a partial third chunk is never used
    model = RuleModel()
    ctx = Context(model, n_ctx=8, n_batch=8)
    running = []
    result = perplexity(ctx, tokens, chunk_count(len(tokens), 8, -1), bos_id=None,
                        on_chunk=lambda i, p: running.append(p))
    # the stub's logits are float32: take the exact log-probabilities of those float32 values
    row = np.log(np.array([0.5] + [0.5 / (V - 1)] * (V - 1))).astype(np.float32).astype(np.float64)
    log_z = np.log(np.exp(row).sum())
    hit, miss = log_z - row[0], log_z - row[1]
    nll = np.array([hit, hit, miss, hit, miss, hit])
    assert result.n_scored == 6
    assert result.ppl == pytest.approx(math.exp(nll.mean()), rel=1e-9)
    assert running[0] == pytest.approx(math.exp(nll[:3].mean()), rel=1e-9)
    # llama.cpp's error: sqrt((mean(nll^2) - mean(nll)^2) / (n - 1)) * ppl
    err = math.sqrt(((nll**2).mean() - nll.mean() ** 2) / (len(nll) - 1)) * result.ppl
    assert result.ppl_err == pytest.approx(err, rel=1e-9)
    assert model.seen == [chunk1, chunk2]


def test_bos_replaces_the_first_token_of_each_chunk():
    tokens = list(range(1, 9)) * 2
    model = RuleModel()
    perplexity(Context(model, n_ctx=8, n_batch=3), tokens, 2, bos_id=0)
    batches = model.seen
    assert batches[0] == [0, 2, 3] and batches[3] == [0, 2, 3]  # batches of 3: chunk starts carry BOS
    assert sum(len(b) for b in batches) == 16


def test_too_little_text_is_refused():
    with pytest.raises(InputError, match="needs at least 256"):
        chunk_count(200, 128, -1)
    assert chunk_count(1000, 128, 3) == 3
    assert chunk_count(1000, 128, -1) == 7


@pytest.mark.parametrize("adapter", [None, "lora-fortunes", "ggla-lora-fortunes.bin"])
def test_smollm2_reproduces_transformers_perplexity(smollm2, adapter):
    """Q4_1 weights evaluated exactly are the float32 model transformers ran (its reference dequantized them); the
    adapter as its PEFT folder or as the ggla file llama.cpp's original converter made of it."""
    ref = json.load(open(data_path("perplexity.json")))["lora-fortunes:lora" if adapter else "lora-fortunes:base"]
    text = open(data_path("fortunes_heldout.txt"), encoding="utf-8").read()
    tokens = smollm2.vocab.tokenize(text, add_bos=None, parse_special=False)
    lora = smollm2.model.lora_deltas([load_adapter(data_path(adapter), smollm2.file.metadata)]) if adapter else None
    ctx = Context(smollm2.model, n_ctx=128, n_batch=128, lora=lora)
    result = perplexity(ctx, tokens, 16, bos_id=None)
    assert result.ppl == pytest.approx(ref["ppl"], rel=0.005)
    assert result.ppl_err == pytest.approx(ref["ppl_err"], rel=0.01)
    assert np.allclose(result.running, ref["running"], rtol=0.005)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "llamalora.cli", *args], capture_output=True, text=True)


def test_cli_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 ".encode("latin-1") * 100)
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    cases = ((empty, f"{empty}: text file is empty"), (latin, f"{latin}: text file is not UTF-8"),
             (short, "perplexity with a context of 128 needs at least 256"))
    for path, message in cases:
        r = run_cli("perplexity", "-f", str(path), "-c", "128")
        assert r.returncode == 1, r.stderr
        assert message in r.stderr
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) <= 3


class ShiftedModel(RuleModel):
    """RuleModel whose favourite next token has probability 0.7 instead of 0.5."""

    def forward(self, tokens, cache, all_logits=False, lora=None):
        cache.n += len(tokens)
        probs = np.full((len(tokens), V), 0.3 / (V - 1))
        probs[np.arange(len(tokens)), (np.asarray(tokens) + 1) % V] = 0.7
        logits = np.log(probs).astype(np.float32)
        return logits if all_logits else logits[-1:]


def test_kl_divergence_by_hand(tmp_path):
    from llamalora.perplexity import KLDivergenceReader, KLDivergenceWriter

    tokens = [9, 9, 9, 9, 3, 4, 5, 0] * 2
    base_file = str(tmp_path / "base.kld")
    writer = KLDivergenceWriter(base_file, 8, V, 2, tokens)
    perplexity(Context(RuleModel(), n_ctx=8, n_batch=8), tokens, 2, bos_id=None, save=writer)
    writer.close()
    reader = KLDivergenceReader(base_file)
    assert reader.tokens == tokens and reader.n_chunks == 2
    perplexity(Context(ShiftedModel(), n_ctx=8, n_batch=8), tokens, 2, bos_id=None, compare=reader)
    log_p = np.log(np.array([0.5] + [0.5 / (V - 1)] * (V - 1)))
    log_q = np.log(np.array([0.7] + [0.3 / (V - 1)] * (V - 1)))
    stored = log_p.astype(np.float16).astype(np.float64)  # the base file keeps log-probabilities as float16
    want = (np.exp(stored) * (stored - log_q)).sum()  # the same at every scored position
    report = "\n".join(reader.report())
    kld = float(report.split("Mean    KLD:")[1].split()[0])
    assert kld == pytest.approx(want, abs=2e-6)  # the report prints 6 decimals
    assert abs(kld - (np.exp(log_p) * (log_p - log_q)).sum()) < 1e-3
    assert "Same top p: 100.000" in report


def test_kl_divergence_cli_against_itself(tmp_path, smollm2_path):
    text = data_path("fortunes_heldout.txt")
    base = str(tmp_path / "base.kld")
    r = run_cli("perplexity", "-m", smollm2_path, "-f", text, "-c", "128", "--chunks", "2",
                "--kl-divergence-base", base)
    assert r.returncode == 0, r.stderr
    r = run_cli("perplexity", "-m", smollm2_path, "--kl-divergence-base", base, "--kl-divergence",
                "-c", "128", "--chunks", "2")
    assert r.returncode == 0, r.stderr
    kld = float(r.stdout.split("Mean    KLD:")[1].split()[0])
    assert abs(kld) < 1e-4  # only the base's float16 rounding separates the runs (it can dip below 0)
    assert "Same top p: 100.000" in r.stdout
