"""RoPE scaling against transformers: a tiny random Llama with llama 3's scaling, written as llama.cpp's converter
writes it (tests/data/llama3-rope-tiny.gguf: a rope_freqs tensor of per-frequency factors), and float32 logits of
the same weights under llama 3, linear (factor 2.5) and no scaling (tests/data/llama_rope_reference.npz), both
made by scripts/make_llama_rope_reference.py."""

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import data_path, rewritten

from llamalora.errors import ModelFileError
from llamalora.loader import load_model
from llamalora.model_file import load_model_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = data_path("llama3-rope-tiny.gguf")
REF = np.load(data_path("llama_rope_reference.npz"))


def batch_logits(path):
    model = load_model(path, progress=False).model
    return model.forward(REF["ids"], model.new_cache(64), all_logits=True)


def token_logits(path):
    model = load_model(path, progress=False).model
    cache = model.new_cache(64)
    return np.concatenate([model.forward([t], cache) for t in REF["ids"]])


@pytest.fixture(scope="module")
def linear_file(tmp_path_factory):
    return rewritten(MODEL, tmp_path_factory.mktemp("rope") / "linear.gguf",
                     {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 2.5}, drop=("rope_freqs.weight",))


@pytest.fixture(scope="module")
def plain_file(tmp_path_factory):
    return rewritten(MODEL, tmp_path_factory.mktemp("rope") / "plain.gguf", drop=("rope_freqs.weight",))


def test_the_scalings_change_the_reference_logits():
    """Otherwise the tests below could not tell a scaled model from an unscaled one."""
    assert np.abs(REF["llama3"] - REF["plain"]).max() > 1.0
    assert np.abs(REF["linear"] - REF["plain"]).max() > 1.0


def test_rope_freqs_become_the_config_factors():
    f = load_model_file(MODEL)
    config = load_model(MODEL, progress=False).model.config
    factors = f.tensors["rope_freqs.weight"].data.view(np.float32).reshape(-1)
    assert config.rope_factors == tuple(float(v) for v in factors)
    assert min(factors) == 1.0 and max(factors) == 8.0 and len(set(factors.tolist())) > 2  # all three bands


@pytest.mark.parametrize("logits_of", [batch_logits, token_logits], ids=["batch", "token by token"])
@pytest.mark.parametrize("scaling", ["llama3", "linear", "plain"])
def test_logits_match_transformers(scaling, logits_of, linear_file, plain_file):
    path = {"llama3": MODEL, "linear": linear_file, "plain": plain_file}[scaling]
    diff = np.abs(logits_of(path) - REF[scaling]).max()
    assert diff < 1e-3, f"max |logit difference| {diff:.2e}"


def test_context_shift_re_rotates_with_the_factors(tmp_path):
    """One layer: the cached keys depend on their token and position alone, so a shift (keys rotated back by
    n_discard positions, at the scaled frequencies) must equal evaluating the kept tokens afresh."""
    f = load_model_file(MODEL)
    path = rewritten(MODEL, tmp_path / "one-layer.gguf", {"llama.block_count": 1},
                     drop=[name for name in f.tensors if name.startswith("blk.1.")])
    model = load_model(path, progress=False).model
    ids = REF["ids"].tolist()[:30]
    n_keep, n_discard, nxt = 3, 12, int(REF["ids"][30])
    fresh = model.forward(ids[:n_keep] + ids[n_keep + n_discard:] + [nxt], model.new_cache(64))[0]
    cache = model.new_cache(64)
    model.forward(ids, cache)
    cache.shift(n_keep, n_discard)
    assert np.abs(model.forward([nxt], cache)[0] - fresh).max() < 1e-4


def test_quantize_keeps_the_rope_factors(tmp_path):
    out = str(tmp_path / "q8.gguf")
    r = subprocess.run([sys.executable, "-m", "llamalora", "quantize", MODEL, out, "q8_0"], capture_output=True,
                       text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert load_model(out, progress=False).model.config.rope_factors == \
        load_model(MODEL, progress=False).model.config.rope_factors


@pytest.mark.parametrize("update, drop, problem", [
    ({"llama.rope.scaling.type": "yarn"}, (), "llama.rope.scaling.type 'yarn' is not supported"),
    ({"llama.attention.key_length": 32}, (), "llama.attention.key_length is 32"),
    ({"llama.rope.dimension_count": 8}, (), "tensor rope_freqs.weight must hold 4 positive numbers"),
])
def test_scalings_we_do_not_run_are_named(tmp_path, update, drop, problem):
    path = rewritten(MODEL, tmp_path / "bad.gguf", update, drop)
    with pytest.raises(ModelFileError, match=problem):
        load_model(path, progress=False)
    r = subprocess.run([sys.executable, "-m", "llamalora", "main", "-m", path, "-p", "hi", "-n", "1"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and problem in lines[0], r.stderr
