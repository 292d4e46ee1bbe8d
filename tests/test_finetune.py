"""llamalora finetune: gradients, optimizer, data, resume and a short real run."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as GGMLType

from tiny_model import make_tiny_llama

from llamalora import kernels
from llamalora.finetune.model import PROJECTIONS, forward_backward, init_lora, load_base, zeros_like_params
from llamalora.finetune.tiles import base_weight, dequantize_tile
from llamalora.llama import LlamaConfig
from llamalora.model_file import load_model_file


@pytest.fixture(autouse=True)
def one_thread():
    """Every test here computes on one thread (a busy machine makes thread teams wait on each other) and leaves
    the thread counts as it found them."""
    import numba

    from llamalora.finetune.team import set_team_threads, team_threads
    from llamalora.finetune.train import blas_threads, set_blas_threads

    numba_before, blas_before, team_before = numba.get_num_threads(), blas_threads(), team_threads()
    numba.set_num_threads(1)
    set_blas_threads(1)
    set_team_threads(1)
    yield
    numba.set_num_threads(numba_before)
    set_team_threads(team_before)
    if blas_before is not None:
        set_blas_threads(blas_before)


def tiny(tmp_path, qtype=GGMLType.Q4_1, **kwargs):
    path = make_tiny_llama(tmp_path / f"tiny-{qtype.name}.gguf", qtype=qtype, **kwargs)
    mf = load_model_file(path)
    config = LlamaConfig.from_metadata(mf.metadata, path, len(mf.metadata["tokenizer.ggml.tokens"]))
    return path, mf, config


@pytest.mark.parametrize("qtype", [GGMLType.F32, GGMLType.F16, GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q8_0])
def test_tiles_equal_kernel_dequantize(tmp_path, qtype):
    _, mf, _ = tiny(tmp_path, qtype=qtype)
    for name in ("blk.0.ffn_up.weight", "blk.1.ffn_down.weight", "token_embd.weight"):
        t = mf.tensors[name]
        want = kernels.dequantize(t.type, t.data, t.n_cols)
        w = base_weight(t)
        buf = np.empty((w.n_rows, w.n_cols), dtype=np.float32)
        for r0, r1 in ((0, w.n_rows), (3, 17)):
            assert np.array_equal(dequantize_tile(w, r0, r1, buf), want[r0:r1]), (name, r0, r1)


def test_gradients_equal_central_differences_in_float64(tmp_path):
    """Every element of every LoRA gradient of a tiny random model (q4_1 base, grouped-query heads, two layers,
    rank 2 on all seven projections, dim 32) against central finite differences of the same float64 loss."""
    _, mf, config = tiny(tmp_path, dim=32, n_ff=64)
    base = load_base(config, mf.tensors, np.float64)
    rng = np.random.default_rng(1)
    params = init_lora(config, {p: 2 for p in PROJECTIONS}, rng, np.float64)
    for name in params:  # B nonzero, so that A has a gradient too
        if name.endswith(".lora_b"):
            params[name] = rng.normal(0.0, 0.1, params[name].shape)
    tokens = rng.integers(0, config.n_vocab, (2, 6))
    targets = rng.integers(0, config.n_vocab, (2, 6))
    alpha = 3.0
    grads = zeros_like_params(params)
    forward_backward(base, params, alpha, tokens, targets, grads)
    h = 1e-5
    for name, p in params.items():
        numeric = np.zeros_like(p)
        for idx in np.ndindex(p.shape):
            old = p[idx]
            p[idx] = old + h
            plus = forward_backward(base, params, alpha, tokens, targets)
            p[idx] = old - h
            minus = forward_backward(base, params, alpha, tokens, targets)
            p[idx] = old
            numeric[idx] = (plus - minus) / (2 * h)
        assert np.abs(numeric).max() > 1e-6, name
        rel = np.abs(grads[name] - numeric).max() / np.abs(numeric).max()
        assert rel <= 1e-4, (name, rel)


def test_dora_gradients_equal_central_differences_in_float64(tmp_path, monkeypatch):
    """DoRA's gradients (magnitudes, A and B) against central differences of the float64 loss with the weight norms
    held at their values (PEFT detaches ‖W + s·B·A‖: it is a constant in the backward, so the differences must hold
    it constant too); the magnitudes' gradient does not depend on that choice."""
    from llamalora.finetune import model as ft

    _, mf, config = tiny(tmp_path, dim=32, n_ff=64)
    base = load_base(config, mf.tensors, np.float64)
    rng = np.random.default_rng(3)
    params = init_lora(config, {"attn_q": 2, "attn_k": 2, "ffn_down": 2}, rng, np.float64, base=base)
    for name in params:
        if name.endswith(".lora_b"):
            params[name] = rng.normal(0.0, 0.1, params[name].shape)
        elif name.endswith(".lora_m"):  # away from ‖W + s·B·A‖, so that g is not 1
            params[name] = params[name] * rng.uniform(0.5, 1.5, params[name].shape)
    tokens = rng.integers(0, config.n_vocab, (2, 6))
    targets = rng.integers(0, config.n_vocab, (2, 6))
    alpha = 3.0
    grads = zeros_like_params(params)
    forward_backward(base, params, alpha, tokens, targets, grads)
    fixed_norms = {name: norms for name, (_, norms) in ft.dora_scales(base, params, ft.lora_scales(params, alpha))
                   .items()}
    monkeypatch.setattr(ft, "dora_scales", lambda base, p, scales: {
        name: (p[f"{name}.lora_m"] / norms, norms) for name, norms in fixed_norms.items()})
    h = 1e-5
    for name, p in params.items():
        numeric = np.zeros_like(p)
        for idx in np.ndindex(p.shape):
            old = p[idx]
            p[idx] = old + h
            plus = forward_backward(base, params, alpha, tokens, targets)
            p[idx] = old - h
            minus = forward_backward(base, params, alpha, tokens, targets)
            p[idx] = old
            numeric[idx] = (plus - minus) / (2 * h)
        assert np.abs(numeric).max() > 1e-6, name
        rel = np.abs(grads[name] - numeric).max() / np.abs(numeric).max()
        assert rel <= 1e-4, (name, rel)


def test_dora_starts_at_the_base_model(tmp_path):
    """m = ‖W‖ and B = 0: g is 1 and the first loss is the base model's."""
    _, mf, config = tiny(tmp_path)
    base = load_base(config, mf.tensors)
    params = init_lora(config, {p: 2 for p in PROJECTIONS}, np.random.default_rng(0), base=base)
    w = kernels.dequantize(mf.tensors["blk.1.ffn_down.weight"].type, mf.tensors["blk.1.ffn_down.weight"].data, 128)
    np.testing.assert_allclose(params["blk.1.ffn_down.weight.lora_m"], np.linalg.norm(w.astype(np.float64), axis=1),
                               rtol=1e-6)
    tokens = np.random.default_rng(1).integers(0, config.n_vocab, (2, 8))
    assert forward_backward(base, params, 4.0, tokens, tokens) == pytest.approx(
        forward_backward(base, {}, 4.0, tokens, tokens), rel=1e-6)


def random_step(config, rng, rank, shape):
    """(LoRA parameters of every projection at rank, with B non-zero so that every gradient flows, tokens,
    targets), the token arrays of shape (batch, ctx)."""
    params = init_lora(config, {p: rank for p in PROJECTIONS}, rng)
    for name in params:
        if name.endswith(".lora_b"):
            params[name] = rng.normal(0.0, 0.05, params[name].shape).astype(np.float32)
    return params, rng.integers(0, config.n_vocab, shape), rng.integers(0, config.n_vocab, shape)


def test_checkpointing_and_float32_agree(tmp_path):
    """Recomputing blocks changes nothing (bitwise); float32 follows float64 closely."""
    _, mf, config = tiny(tmp_path)
    params, tokens, targets = random_step(config, np.random.default_rng(2), 4, (3, 16))
    base32 = load_base(config, mf.tensors, np.float32)
    plain, ckpt = zeros_like_params(params), zeros_like_params(params)
    loss_plain = forward_backward(base32, params, 8.0, tokens, targets, plain)
    loss_ckpt = forward_backward(base32, params, 8.0, tokens, targets, ckpt, checkpointing=True)
    assert loss_plain == loss_ckpt
    for name in params:
        assert np.array_equal(plain[name], ckpt[name]), name
    base64 = load_base(config, mf.tensors, np.float64)
    params64 = {k: v.astype(np.float64) for k, v in params.items()}
    exact = zeros_like_params(params64)
    loss64 = forward_backward(base64, params64, 8.0, tokens, targets, exact)
    assert abs(loss64 - loss_plain) < 1e-5 * abs(loss64)
    for name in params:
        assert np.linalg.norm(plain[name] - exact[name]) <= 1e-4 * np.linalg.norm(exact[name]), name


# ---- optimizer and schedule ----

def torch_adamw_reference(p, grads, lrs, beta1, beta2, eps, weight_decay):
    """PyTorch's documented AdamW, in float64: θ ← θ(1 − γλ); m ← β1·m + (1 − β1)·g; v ← β2·v + (1 − β2)·g²;
    θ ← θ − γ·(m / (1 − β1^t)) / (sqrt(v / (1 − β2^t)) + ε)."""
    p = p.astype(np.float64)
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        g = g.astype(np.float64)
        p = p * (1 - lr * weight_decay)
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        p = p - lr * (m / (1 - beta1 ** t)) / (np.sqrt(v / (1 - beta2 ** t)) + eps)
    return p


def test_adamw_follows_pytorchs_algorithm():
    from llamalora.finetune.optim import AdamW

    rng = np.random.default_rng(0)
    start = rng.normal(0, 1, (7, 5)).astype(np.float32)
    grads = [rng.normal(0, 10.0 ** rng.integers(-4, 1), (7, 5)).astype(np.float32) for _ in range(30)]
    lrs = [1e-2 * (1 + np.cos(i / 5)) for i in range(30)]
    for beta1, beta2, decay in ((0.9, 0.999, 0.1), (0.5, 0.9, 0.0), (0.0, 0.99, 1.0)):
        adam = AdamW(beta1=beta1, beta2=beta2, weight_decay=decay)
        params = {"w": start.copy()}
        for g, lr in zip(grads, lrs):
            adam.update(params, {"w": g.copy()}, lr)
        want = torch_adamw_reference(start, grads, lrs, beta1, beta2, 1e-8, decay)
        assert adam.step == 30
        assert np.abs(params["w"] - want).max() <= 1e-5 * np.abs(want).max(), (beta1, beta2, decay)
        assert not np.allclose(params["w"], start)


def test_clip_grad_norm_as_torch():
    from llamalora.finetune.optim import clip_grad_norm

    grads = {"a": np.full((2, 2), 3.0, np.float32), "b": np.full(3, 4.0, np.float32)}
    norm = clip_grad_norm(grads, 1.0)
    assert norm == pytest.approx(np.sqrt(4 * 9 + 3 * 16))
    coef = 1.0 / (norm + 1e-6)
    assert np.allclose(grads["a"], 3.0 * coef) and np.allclose(grads["b"], 4.0 * coef)
    small = {"a": np.full(2, 0.1, np.float32)}
    clip_grad_norm(small, 1.0)
    assert np.array_equal(small["a"], np.full(2, 0.1, np.float32))


def test_learning_schedule_warmup_cosine_and_restarts():
    from llamalora.finetune.optim import learning_schedule, scheduled_lr

    s = dict(warmup=10, cos_decay_steps=100, cos_decay_min=0.1, cos_decay_restart=2.0, enable_restart=False)
    assert learning_schedule(5, **s) == pytest.approx(0.5)
    assert learning_schedule(10, **s) == pytest.approx(0.55 + 0.45 * np.cos(np.pi * 0.1))
    assert learning_schedule(100, **s) == pytest.approx(0.1)
    assert learning_schedule(500, **s) == pytest.approx(0.1)
    r = dict(s, enable_restart=True)
    assert learning_schedule(10 + 100, **r) == pytest.approx(0.1)          # end of the first period
    assert learning_schedule(10 + 101, **r) == pytest.approx(0.55 + 0.45 * np.cos(np.pi / 200))  # restarted
    assert learning_schedule(10 + 300, **r) == pytest.approx(0.1)          # end of the second, twice as long
    assert scheduled_lr(5, 1e-3, 1e-4, **s) == pytest.approx(1e-4 + 0.5 * 9e-4)


# ---- samples and batches ----

def test_std_mt19937_stream():
    from llamalora.finetune.data import seed_state

    generator = np.random.MT19937()
    generator.state = seed_state(5489)
    assert list(generator.random_raw(2)) == [3499211612, 581869302]  # std::mt19937's first outputs


def char_tokenize(text):
    return [ord(ch) for ch in text]


def test_samples_split_at_sample_start():
    from llamalora.finetune.data import make_samples

    text = "xx<s>abc<s><s>de"
    s = make_samples(text, char_tokenize, 8, "<s>")
    assert [bytes(s.tokens[b:b + n].tolist()).decode() for b, n in zip(s.begins, s.sizes)] == ["abc", "de"]
    s = make_samples(text, char_tokenize, 8, "<s>", include_sample_start=True)
    assert [bytes(s.tokens[b:b + n].tolist()).decode() for b, n in zip(s.begins, s.sizes)] == ["<s>abc", "<s>", "<s>de"]
    s = make_samples("abcdefghij", char_tokenize, 4)
    assert list(s.begins) == [0, 1, 2, 3, 4, 5] and set(s.sizes) == {4}


def test_batches_pad_with_eos_or_fill_with_next_samples():
    from llamalora.finetune.data import BatchOptions, batch_from

    data = np.array([10, 11, 12, 20, 21, 30], dtype=np.int64)
    begins, sizes, offsets = np.array([0, 3, 5]), np.array([3, 2, 1]), np.array([2, 1, 0])
    bos, eos = 1, 2
    o = BatchOptions(bos, eos, 100)
    tokens, targets, used = batch_from(data, offsets, begins, sizes, 0, 1, 6, o)
    assert targets.tolist() == [[10, 11, 12, eos, eos, eos]] and tokens.tolist() == [[bos, 10, 11, 12, eos, eos]]
    assert used == 1
    o = BatchOptions(bos, eos, 100, fill_with_next_samples=True)
    tokens, targets, used = batch_from(data, offsets, begins, sizes, 0, 1, 8, o)
    assert targets.tolist() == [[10, 11, 12, eos, bos, 20, 21, eos]] and used == 2
    o = BatchOptions(bos, eos, 100, separate_with_eos=False, separate_with_bos=False, fill_with_next_samples=True,
                     sample_random_offsets=True)
    tokens, targets, used = batch_from(data, offsets, begins, sizes, 1, 2, 4, o)
    # row 1 starts where row 0 left the sample count (example_id + used), with its own random offset
    assert targets.tolist() == [[21, 30, 10, 11], [21, 30, 10, 11]] and used == 6


# ---- whole runs on the tiny model ----

TINY_TEXT = "once upon a time there was a tiny llama. the cat and the dog is a model of the world. " * 3


def tiny_run_options(tmp_path, model, **kwargs):
    from llamalora.finetune.train import FinetuneOptions

    text = tmp_path / "train.txt"
    text.write_text(TINY_TEXT)
    base = dict(model=model, train_data=str(text), lora_out=None, checkpoint_out=None, n_ctx=16, n_batch=3,
                grad_acc=2, adam_iter=6, warmup=2, cos_decay_steps=6, adam_alpha=3e-2, save_every=0, seed=7,
                threads=1, lora_r=3, lora_alpha=6.0, fill_with_next_samples=True, sample_random_offsets=True,
                ranks={"wv": 1, "w2": 0})
    base.update(kwargs)
    return FinetuneOptions(**base)


@pytest.mark.parametrize("threads", [1, 2])
def test_resumed_run_equals_uninterrupted_run(tmp_path, threads):
    """Step for step, on one thread and on a team of two (whose sums are fixed by the tasks, not by timing)."""
    from llamalora.finetune.train import run_finetune

    path, _, _ = tiny(tmp_path)
    whole = run_finetune(tiny_run_options(tmp_path, path, sample_start=". ", threads=threads), quiet=True)
    assert whole["step"] == 6 and whole["epochs"] >= 2  # the sample order was reshuffled along the way
    ckpt = str(tmp_path / "ckpt.npz")
    first = run_finetune(tiny_run_options(tmp_path, path, sample_start=". ", checkpoint_out=ckpt, threads=threads),
                         stop_after=2, quiet=True)
    assert first["stopped"] and first["step"] == 2
    rest = run_finetune(tiny_run_options(tmp_path, path, sample_start=". ", checkpoint_in=ckpt, seed=99,
                                         threads=threads), quiet=True)
    assert rest["step"] == 6
    assert first["losses"] + rest["losses"] == whole["losses"]
    assert whole["params"].keys() == rest["params"].keys()
    for name, p in whole["params"].items():
        assert np.array_equal(p, rest["params"][name]), name
    assert "blk.0.ffn_down.weight.lora_a" not in whole["params"]
    assert whole["params"]["blk.1.attn_v.weight.lora_a"].shape == (1, 64)


def test_resume_refuses_other_settings(tmp_path):
    from llamalora.errors import InputError
    from llamalora.finetune.train import run_finetune

    path, _, _ = tiny(tmp_path)
    ckpt = str(tmp_path / "ckpt.npz")
    run_finetune(tiny_run_options(tmp_path, path, checkpoint_out=ckpt, adam_iter=1), quiet=True)
    with pytest.raises(InputError, match="n_ctx"):
        run_finetune(tiny_run_options(tmp_path, path, checkpoint_in=ckpt, n_ctx=8), quiet=True)
    with pytest.raises(InputError, match="ranks"):
        run_finetune(tiny_run_options(tmp_path, path, checkpoint_in=ckpt, lora_r=2), quiet=True)
    (tmp_path / "junk.npz").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="junk.npz"):
        run_finetune(tiny_run_options(tmp_path, path, checkpoint_in=str(tmp_path / "junk.npz")), quiet=True)


def test_written_adapters_run_as_trained(tmp_path):
    """The GGUF adapter and the PEFT folder load through llamalora's adapter readers (PEFT's q/k rows
    permuted back) and the inference model with the adapter gives the training model's loss."""
    from llamalora.finetune.model import forward_backward
    from llamalora.finetune.train import run_finetune
    from llamalora.loader import load_model
    from llamalora.lora.adapter import load_adapter

    path, mf, config = tiny(tmp_path, qtype=GGMLType.Q8_0)
    out = str(tmp_path / "lora-ITERATION.gguf")
    peft = str(tmp_path / "peft")
    result = run_finetune(tiny_run_options(tmp_path, path, lora_out=out, peft_out=peft, adam_iter=3), quiet=True)
    assert sorted(p.name for p in tmp_path.glob("lora-*.gguf")) == ["lora-3.gguf", "lora-LATEST.gguf"]
    params = result["params"]
    gguf_adapter = load_adapter(str(tmp_path / "lora-3.gguf"), mf.metadata)
    peft_adapter = load_adapter(peft, mf.metadata)
    for adapter in (gguf_adapter, peft_adapter):
        for name, t in adapter.tensors.items():
            assert np.array_equal(t.a, params[f"{name}.lora_a"]), name
            assert np.array_equal(t.b, params[f"{name}.lora_b"]), name
            assert t.scale == pytest.approx(6.0 / t.a.shape[0])
    loaded = load_model(path, adapters=[(str(tmp_path / "lora-LATEST.gguf"), 1.0)], lora_mode="runtime",
                        progress=False)
    tokens = np.array([[1, 300, 301, 302, 303, 304, 305, 306]])
    logits = loaded.model.forward(tokens[0], loaded.model.new_cache(16), all_logits=True).astype(np.float64)
    targets = np.array([[300, 301, 302, 303, 304, 305, 306, 307]])
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    want = float(np.mean(logz - logits[np.arange(8), targets[0]]))
    base = load_base(config, mf.tensors)
    assert forward_backward(base, params, 6.0, tokens, targets) == pytest.approx(want, rel=1e-5)
    assert forward_backward(base, {}, 6.0, tokens, targets) != pytest.approx(want, rel=1e-3)


def test_written_dora_adapters_run_as_trained(tmp_path):
    """--dora: the GGUF adapter (with .lora_m) and the PEFT folder (lora_magnitude_vector, use_dora, q/k rows back in
    Hugging Face's order) load through our readers, and the inference model gives the training model's loss."""
    import json

    from llamalora.finetune.model import forward_backward
    from llamalora.finetune.train import run_finetune
    from llamalora.loader import load_model
    from llamalora.lora.adapter import load_adapter

    path, mf, config = tiny(tmp_path, qtype=GGMLType.Q8_0)
    out, peft = str(tmp_path / "dora.gguf"), str(tmp_path / "peft")
    result = run_finetune(tiny_run_options(tmp_path, path, lora_out=out, peft_out=peft, adam_iter=3, dora=True,
                                           ranks={}), quiet=True)
    params = result["params"]
    assert json.load(open(f"{peft}/adapter_config.json"))["use_dora"] is True
    for adapter in (load_adapter(out, mf.metadata), load_adapter(peft, mf.metadata)):
        assert len(adapter.tensors) == 7 * config.n_layer
        for name, t in adapter.tensors.items():
            assert np.array_equal(t.magnitude, params[f"{name}.lora_m"]), name
            assert np.array_equal(t.b, params[f"{name}.lora_b"]), name
    tokens = np.array([[1, 300, 301, 302, 303, 304, 305, 306]])
    targets = np.array([[300, 301, 302, 303, 304, 305, 306, 307]])
    base = load_base(config, mf.tensors)
    trained = forward_backward(base, params, 6.0, tokens, targets)
    for adapter_path in (out, peft):
        loaded = load_model(path, adapters=[(adapter_path, 1.0)], lora_mode="runtime", progress=False)
        logits = loaded.model.forward(tokens[0], loaded.model.new_cache(16), all_logits=True).astype(np.float64)
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        assert trained == pytest.approx(float(np.mean(logz - logits[np.arange(8), targets[0]])), rel=1e-5)
    no_magnitudes = {k: v for k, v in params.items() if not k.endswith(".lora_m")}
    assert forward_backward(base, no_magnitudes, 6.0, tokens, targets) != pytest.approx(trained, rel=1e-4)


def test_finetune_command_line(tmp_path):
    from click.testing import CliRunner

    from llamalora.cli import cli

    path, _, _ = tiny(tmp_path)
    (tmp_path / "t.txt").write_text(TINY_TEXT)
    out = tmp_path / "a.gguf"
    args = ["finetune", "-m", path, "--train-data", str(tmp_path / "t.txt"), "--lora-out", str(out),
            "--checkpoint-out", str(tmp_path / "c.npz"), "--ctx", "8", "--batch", "2", "--adam-iter", "2",
            "--seed", "1", "-t", "1", "--rank-wq", "0"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "iter     2/2" in result.output and "tok/s" in result.output and "eta" in result.output
    assert out.exists() and (tmp_path / "c.npz").exists()
    result = CliRunner().invoke(cli, args[:-2] + ["--lora-r", "0"])
    assert result.exit_code == 1 and "--lora-r must be at least 1" in result.output
    result = CliRunner().invoke(cli, ["finetune", "-m", path, "--train-data", str(tmp_path / "missing.txt")])
    assert result.exit_code == 1 and "missing.txt" in result.output


# ---- SmolLM2 ----

@pytest.fixture(scope="module")
def smollm2_base(smollm2_path):
    from llamalora.finetune.model import load_base
    from llamalora.vocab import Vocab

    mf = load_model_file(smollm2_path)
    vocab = Vocab.from_metadata(mf.metadata)
    config = LlamaConfig.from_metadata(mf.metadata, smollm2_path, vocab.n_vocab)
    return load_base(config, mf.tensors), vocab


def test_smollm2_short_run_lowers_heldout_loss(tmp_path, smollm2_path, smollm2_base):
    """A few steps on the first half of the fortunes lower the loss on a batch of the second half."""
    from conftest import data_path

    from llamalora.finetune.data import BatchOptions, make_samples, next_batch, start_order
    from llamalora.finetune.train import run_finetune, FinetuneOptions

    base, vocab = smollm2_base
    with open(data_path("fortunes_heldout.txt"), encoding="utf-8") as f:
        text = f.read()
    half = len(text) // 2
    (tmp_path / "first.txt").write_text(text[:half], encoding="utf-8")
    samples = make_samples(text[half:], lambda s: vocab.tokenize(s, add_bos=False, parse_special=False), 32)
    tokens, targets, _ = next_batch(samples, start_order(3, samples), 4, 32, BatchOptions(vocab.bos_id, vocab.eos_id,
                                                                                          vocab.n_vocab))
    before = forward_backward(base, {}, 8.0, tokens, targets)
    opts = FinetuneOptions(model=smollm2_path, train_data=str(tmp_path / "first.txt"), lora_out=None,
                           checkpoint_out=None, n_ctx=32, n_batch=2, adam_iter=5, warmup=0, adam_alpha=2e-3,
                           lora_r=4, lora_alpha=8.0, save_every=0, seed=1, threads=1)
    result = run_finetune(opts, quiet=True)
    after = forward_backward(base, result["params"], 8.0, tokens, targets)
    assert after < before - 0.02, (before, after, result["losses"])


def test_smollm2_steps_equal_transformers_peft(smollm2_base):
    """One and five steps (gradient accumulation, clipping, scheduled AdamW) from the same A and B on the same
    batches equal transformers + PEFT + torch.optim.AdamW (scripts/make_finetune_reference.py)."""
    from conftest import data_path

    from llamalora.finetune.optim import AdamW, clip_grad_norm

    base, _ = smollm2_base
    ref = np.load(data_path("finetune_reference.npz"))
    rank, alpha, n_ctx, n_batch, grad_acc, steps, lr, beta1, beta2, decay, gclip, eps = ref["settings"]
    grad_acc, steps = int(grad_acc), int(steps)
    params = {k[len("initial/"):]: ref[k].copy() for k in ref.files if k.startswith("initial/")}
    assert len(params) == 2 * 7 * base.config.n_layer
    adam = AdamW(beta1=float(beta1), beta2=float(beta2), eps=float(eps), weight_decay=float(decay))

    def close(name, got, want, what):
        rel = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert rel <= 1e-4, (what, name, rel)

    for step in range(1, steps + 1):
        grads = zeros_like_params(params)
        loss = 0.0
        for micro in range(grad_acc):
            i = (step - 1) * grad_acc + micro
            loss += forward_backward(base, params, float(alpha), ref["tokens"][i], ref["targets"][i], grads,
                                     grad_scale=1.0 / grad_acc) / grad_acc
        assert loss == pytest.approx(float(ref["losses"][step - 1]), rel=1e-5)
        if step == 1:
            for name in params:
                close(name, grads[name], ref[f"grad1/{name}"], "gradient")
        clip_grad_norm(grads, float(gclip))
        adam.update(params, grads, float(ref["lrs"][step - 1]))
        if step in (1, steps):
            for name, p in params.items():
                close(name, p, ref[f"step{step}/{name}"], f"after step {step}")


def test_smollm2_dora_steps_equal_transformers_peft(smollm2_base):
    """--dora: one and five steps from the same A, B and magnitudes on the same batches equal transformers + PEFT
    (use_dora) + torch.optim.AdamW (scripts/make_finetune_dora_reference.py, which also loads the PEFT folder we
    write into PEFT). Our own start, m = ‖W‖, is PEFT's."""
    from conftest import data_path

    from llamalora.finetune.optim import AdamW, clip_grad_norm

    base, _ = smollm2_base
    plain = np.load(data_path("finetune_reference.npz"))
    ref = np.load(data_path("finetune_dora_reference.npz"))
    rank, alpha, n_ctx, n_batch, grad_acc, steps, lr, beta1, beta2, decay, gclip, eps = plain["settings"]
    grad_acc, steps = int(grad_acc), int(steps)
    params = {k[len("initial/"):]: plain[k].copy() for k in plain.files if k.startswith("initial/")}
    params.update({k[len("initial/"):]: ref[k].copy() for k in ref.files if k.startswith("initial/")})
    assert len(params) == 3 * 7 * base.config.n_layer
    ours = init_lora(base.config, {p: int(rank) for p in PROJECTIONS}, np.random.default_rng(0), base=base)
    for name in params:
        if name.endswith(".lora_m"):
            np.testing.assert_allclose(ours[name], params[name], rtol=2e-6, err_msg=name)
    adam = AdamW(beta1=float(beta1), beta2=float(beta2), eps=float(eps), weight_decay=float(decay))

    def close(name, got, want, what):
        rel = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert rel <= 1e-4, (what, name, rel)

    for step in range(1, steps + 1):
        grads = zeros_like_params(params)
        loss = 0.0
        for micro in range(grad_acc):
            i = (step - 1) * grad_acc + micro
            loss += forward_backward(base, params, float(alpha), plain["tokens"][i], plain["targets"][i], grads,
                                     grad_scale=1.0 / grad_acc) / grad_acc
        assert loss == pytest.approx(float(ref["losses"][step - 1]), rel=1e-5)
        if step == 1:
            for name in params:
                close(name, grads[name], ref[f"grad1/{name}"], "gradient")
        clip_grad_norm(grads, float(gclip))
        adam.update(params, grads, float(plain["lrs"][step - 1]))
        if step in (1, steps):
            for name, p in params.items():
                close(name, p, ref[f"step{step}/{name}"], f"after step {step}")


def test_ctrl_c_finishes_the_step_and_saves_a_checkpoint(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from llamalora.finetune.output import load_checkpoint

    path, _, _ = tiny(tmp_path)
    (tmp_path / "t.txt").write_text(TINY_TEXT)
    ckpt = tmp_path / "c.npz"
    args = [sys.executable, "-m", "llamalora.cli", "finetune", "-m", path, "--train-data", str(tmp_path / "t.txt"),
            "--lora-out", str(tmp_path / "a.gguf"), "--checkpoint-out", str(ckpt), "--ctx", "8", "--batch", "2",
            "--adam-iter", "100000", "--save-every", "0", "--seed", "1", "-t", "1"]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, cwd=str(tmp_path))
    seen = []
    deadline = time.time() + 120
    for line in proc.stderr:
        seen.append(line)
        if line.startswith("iter") and len([s for s in seen if s.startswith("iter")]) >= 2:
            break
        assert time.time() < deadline, "".join(seen)
    os.kill(proc.pid, signal.SIGINT)
    rest = proc.stderr.read()
    assert proc.wait(timeout=60) == 130, "".join(seen) + rest
    assert "saving a checkpoint" in rest and str(ckpt) in rest
    _, _, _, header, _ = load_checkpoint(str(ckpt))
    assert header["step"] >= 2 and (tmp_path / "a.gguf").exists()


def test_tile_threads_give_the_products_and_repeat_exactly(tmp_path):
    """Products whose tiles run on three threads equal the float32 products of the dequantized weight, and
    repeat bit for bit (each column band of dx adds its tiles in order)."""
    from llamalora.finetune.team import set_team_threads as set_tile_threads, team_threads as tile_threads
    from llamalora.finetune.tiles import add_times_w, times_wt

    _, mf, _ = tiny(tmp_path, dim=64, n_ff=640)
    t = mf.tensors["blk.0.ffn_up.weight"]
    w = base_weight(t)
    dense = kernels.dequantize(t.type, t.data, t.n_cols).reshape(w.n_rows, w.n_cols)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((24, w.n_cols)).astype(np.float32)
    dy = rng.standard_normal((24, w.n_rows)).astype(np.float32)
    before = tile_threads()
    set_tile_threads(3)
    try:
        runs = []
        for _ in range(3):
            dx = np.ones((24, w.n_cols), dtype=np.float32)
            add_times_w(w, dy, dx)
            runs.append((times_wt(w, x), dx))
    finally:
        set_tile_threads(before)
    np.testing.assert_allclose(runs[0][0], x @ dense.T, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(runs[0][1], 1.0 + dy @ dense, rtol=1e-5, atol=1e-4)
    for y, dx in runs[1:]:
        assert np.array_equal(y, runs[0][0]) and np.array_equal(dx, runs[0][1])


@pytest.mark.parametrize("qtype", [GGMLType.F32, GGMLType.F16, GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q8_0])
def test_team_threads_agree_with_one_and_repeat_exactly(tmp_path, qtype):
    """A training step whose products, LoRA terms, attention, norms and cross-entropy are tasks for three threads
    gives one thread's loss and gradients within float32 rounding, and repeats bit for bit."""
    from llamalora.finetune.team import set_team_threads, team_threads

    _, mf, config = tiny(tmp_path, qtype, dim=64, n_ff=640)
    base = load_base(config, mf.tensors, np.float32)
    params, tokens, targets = random_step(config, np.random.default_rng(4), 3, (5, 12))
    before = team_threads()
    runs = []
    try:
        for threads in (1, 3, 3):
            set_team_threads(threads)
            grads = zeros_like_params(params)
            runs.append((forward_backward(base, params, 6.0, tokens, targets, grads), grads))
    finally:
        set_team_threads(before)
    (loss1, one), (loss3, three), (again_loss, again) = runs
    assert abs(loss3 - loss1) <= 1e-6 * abs(loss1)
    for name in params:
        assert np.linalg.norm(three[name] - one[name]) <= 1e-5 * np.linalg.norm(one[name]), name
    assert again_loss == loss3
    for name in params:
        assert np.array_equal(again[name], three[name]), name
