"""Activated LoRA (PEFT's alora_invocation_tokens): the adapter applies from the last occurrence of its invocation
tokens in the prompt on; before it the model, and so its KV cache, is the base model's."""

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGMLQuantizationType as T
from tiny_model import make_tiny_llama

from llamalora.cli import cli
from llamalora.generate import Context
from llamalora.loader import load_model
from llamalora.lora.adapter import load_adapter
from llamalora.model_file import load_model_file

INVOCATION = [70, 80]


@pytest.fixture
def alora(tmp_path):
    """(F32 model path, aLoRA folder, base model, the model with the adapter merged by hand, run-time model)."""
    from test_lora import write_peft

    path = make_tiny_llama(tmp_path / "f32.gguf", qtype=T.F32)
    folder = write_peft(tmp_path / "alora", np.random.default_rng(0), ["q_proj", "v_proj", "down_proj"],
                        config_extra={"alora_invocation_tokens": INVOCATION, "task_type": "CAUSAL_LM"})
    base = load_model(path, progress=False).model
    plain = write_peft(tmp_path / "plain", np.random.default_rng(0), ["q_proj", "v_proj", "down_proj"])
    merged = load_model(path, adapters=[(plain, 1.0)], lora_mode="merge", progress=False).model
    runtime = load_model(path, adapters=[(folder, 1.0)], progress=False)  # auto: an activated LoRA runs unmerged
    assert runtime.model.lora and runtime.model.lora.invocation == tuple(INVOCATION)
    return path, folder, base, merged, runtime.model


def two_models(base, merged, ids, start):
    """Logits of ids with positions before `start` through the base model and the rest through the merged one,
    sharing one KV cache."""
    cache = base.new_cache(64)
    parts = []
    if start:
        parts.append(base.forward(ids[:start], cache, all_logits=True))
    if start < len(ids):
        parts.append(merged.forward(ids[start:], cache, all_logits=True))
    return np.concatenate(parts)


@pytest.mark.parametrize("ids,start", [
    ([1, 50, 60, 70, 80, 90, 61], 3),
    ([1, 70, 80, 5, 70, 80, 6, 9], 4),   # the last occurrence counts
    ([1, 50, 60, 70, 61, 80, 90], None),  # not found: the base model throughout
    ([70, 80, 90], 0),
], ids=["middle", "last-occurrence", "absent", "first"])
def test_adapter_applies_from_the_invocation_on(alora, ids, start):
    _, _, base, merged, model = alora
    want = two_models(base, merged, ids, len(ids) if start is None else start)
    got = Context(model, n_ctx=64).eval(ids, all_logits=True)
    np.testing.assert_allclose(got, want, atol=1e-4)
    ctx = Context(model, n_ctx=64, n_batch=2)  # batches cut across the start
    np.testing.assert_allclose(ctx.eval(ids, all_logits=True), want, atol=1e-4)
    # generated tokens go on with the adapter (or without it, when it never started)
    nxt = int(np.argmax(got[-1]))
    after = ctx.eval([nxt], generating=True)
    np.testing.assert_allclose(after, two_models(base, merged, ids + [nxt], len(ids) + 1 if start is None else start)[-1],
                               atol=1e-4)


def test_an_invocation_across_two_evaluations_recomputes_the_cached_part(alora):
    """The first half of the invocation already in the cache (evaluated as the base model) is evaluated again with
    the adapter once the second half arrives; a later invocation moves the start again."""
    _, _, base, merged, model = alora
    ctx = Context(model, n_ctx=64)
    ctx.eval([1, 50, 60, 70])
    got = ctx.eval([80, 90, 61], all_logits=True)
    assert got.shape[0] == 3
    np.testing.assert_allclose(got, two_models(base, merged, [1, 50, 60, 70, 80, 90, 61], 3)[-3:], atol=1e-4)
    got = ctx.eval([5, 70, 80, 7], all_logits=True)
    np.testing.assert_allclose(got, two_models(base, merged, [1, 50, 60, 70, 80, 90, 61, 5, 70, 80, 7], 8)[-4:],
                               atol=1e-4)


def test_activated_lora_refusals_and_gguf_form(tmp_path, alora):
    from test_lora import write_peft
    from test_lora_formats import load_script

    path, folder, _, _, _ = alora
    out = str(tmp_path / "alora.gguf")
    assert load_script().main([folder, "--gguf", "--base", path, "--outfile", out]) == 0
    meta = load_model_file(path).metadata
    assert load_adapter(out, meta).invocation == tuple(INVOCATION)
    assert load_script().main([folder, "--base", path, "--outfile", str(tmp_path / "a.bin")]) == 1
    other = write_peft(tmp_path / "other", np.random.default_rng(1), ["up_proj"])
    for args, message in (
            (["main", "-m", path, "--lora", folder, "--lora-mode", "merge", "-p", "hi", "-n", "1"], "cannot be merged"),
            (["export-lora", "-m", path, "--lora", folder, "-o", str(tmp_path / "m.gguf")], "cannot be merged"),
            (["main", "-m", path, "--lora", folder, "--lora", other, "-p", "hi", "-n", "1"], "runs alone")):
        r = CliRunner().invoke(cli, args)
        lines = [line for line in r.output.splitlines() if line.startswith("error:")]
        assert r.exit_code == 1 and len(lines) == 1 and message in lines[0] and "Traceback" not in r.output, r.output
