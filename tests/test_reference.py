"""SmolLM2 against transformers in float32 on the same (dequantized) weights: tests/data/logits_base.npz."""

import numpy as np
import pytest
from conftest import data_path

from llamalora.generate import Context

REF = np.load(data_path("logits_base.npz"))
PROMPTS = list(REF["prompts"])


def greedy(ctx: Context, ids, n: int, eos: int) -> list[int]:
    logits = ctx.eval(ids)
    out = []
    for _ in range(n):
        token = int(np.argmax(logits))
        out.append(token)
        if token == eos:
            break
        logits = ctx.eval([token], generating=True)
    return out


@pytest.mark.parametrize("k", range(len(PROMPTS)))
def test_prompt_tokens_match_reference(smollm2, k):
    ids = smollm2.vocab.tokenize(str(PROMPTS[k]), add_bos=False, parse_special=True)
    assert ids == REF[f"p{k}_ids"].tolist()


@pytest.mark.parametrize("k", range(len(PROMPTS)))
def test_logits_match_reference(smollm2, k):
    ids = REF[f"p{k}_ids"].tolist()
    ctx = Context(smollm2.model, n_ctx=64)
    logits = ctx.eval(ids, all_logits=True)
    # top-1 agrees at every prompt position
    assert np.argmax(logits, axis=1).tolist() == REF[f"p{k}_top10_ids"][:, 0].tolist()
    # every vocabulary entry at the last position within 0.05
    diff = np.abs(logits[-1] - REF[f"p{k}_logits_last"])
    assert diff.max() < 0.05, f"max |logit difference| {diff.max():.4f}"
    # the ten best logits at every position agree too
    top = np.take_along_axis(logits, REF[f"p{k}_top10_ids"].astype(np.int64), axis=1)
    assert np.abs(top - REF[f"p{k}_top10_logits"]).max() < 0.05


@pytest.mark.parametrize("k", range(len(PROMPTS)))
def test_greedy_continuation_matches_reference(smollm2, k):
    want = REF[f"p{k}_greedy_ids"].tolist()[:16]
    ctx = Context(smollm2.model, n_ctx=64)
    got = greedy(ctx, REF[f"p{k}_ids"].tolist(), len(want), eos=smollm2.vocab.eos_id)
    assert got == want


def test_batched_prompt_equals_token_by_token(smollm2):
    """Prompt batches (matmul) and single tokens (matvec) give the same logits."""
    ids = REF["p3_ids"].tolist()
    batched = Context(smollm2.model, n_ctx=64, n_batch=512).eval(ids)
    single = Context(smollm2.model, n_ctx=64, n_batch=1).eval(ids)
    mixed = Context(smollm2.model, n_ctx=64, n_batch=5).eval(ids)
    assert np.abs(batched - single).max() < 1e-3
    assert np.abs(mixed - single).max() < 1e-3
