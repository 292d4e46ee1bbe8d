"""Checks against transformers + PEFT's reference figures (tests/data/logits_*.npz) that several test files share."""

import numpy as np


def greedy(model, ids, n: int, eos: int = 2) -> list[int]:
    """Up to n argmax tokens after ids (stopping after eos), token by token through the model's KV cache."""
    cache = model.new_cache(len(ids) + n + 1)
    logits = model.forward(ids, cache)[-1]
    out = []
    for _ in range(n):
        out.append(int(np.argmax(logits)))
        if out[-1] == eos:
            break
        logits = model.forward([out[-1]], cache)[-1]
    return out


def check_against_reference(model, ref, bound: float = 0.05) -> None:
    """On every prompt of ref: last-position logits within bound, the argmax at every position and 16 greedy
    tokens equal to the reference's."""
    for k in range(len(ref["prompts"])):
        ids = ref[f"p{k}_ids"].tolist()
        logits = model.forward(ids, model.new_cache(len(ids)), all_logits=True)
        assert np.abs(logits[-1] - ref[f"p{k}_logits_last"]).max() < bound, k
        assert (logits.argmax(axis=1) == ref[f"p{k}_top10_ids"][:, 0]).all(), k
        want = ref[f"p{k}_greedy_ids"].tolist()[:16]
        assert greedy(model, ids, len(want)) == want, k
