"""Token probabilities as the APIs write them: llama.cpp's `completion_probabilities` (/completion with
`n_probs`), OpenAI's chat `logprobs.content` and the completions API's `logprobs` object.

The figures come from the generation loop (sampling.token_probs via a ProbsReport): by default the
log-softmax of the model's logits before the sampler chain, with `post_sampling_probs` the chain's final
candidates. This module only names and shapes them.
"""

import math

from ..sampling import ProbsReport
from .schemas import ApiError, get_bool, get_int

OPENAI_CHAT_MAX = 20  # OpenAI's bound on top_logprobs
OPENAI_COMPLETIONS_MAX = 5  # and on the completions API's logprobs


def probs_report(req) -> ProbsReport | None:
    """What the request asked to be reported with each token (None: nothing)."""
    if not req.logprobs and req.n_probs <= 0:
        return None
    return ProbsReport(n=req.n_probs, post_sampling=req.post_sampling_probs)


def openai_chat_fields(body: dict) -> tuple[bool, int]:
    """OpenAI's chat `logprobs` (true/false) and `top_logprobs` (0..20, only with logprobs)."""
    wanted = get_bool(body, "logprobs", False)
    top = get_int(body, "top_logprobs", 0, low=0, high=OPENAI_CHAT_MAX)
    if top and not wanted:
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true")
    return wanted, top


def openai_completions_fields(body: dict) -> tuple[bool, int]:
    """The completions API's `logprobs`: the number of alternatives per token (0..5), or null for none."""
    if body.get("logprobs") is None:
        return False, 0
    return True, get_int(body, "logprobs", 0, low=0, high=OPENAI_COMPLETIONS_MAX)


def piece(vocab, token: int) -> tuple[str, list]:
    """A token's text (invalid UTF-8 replaced) and its bytes."""
    data = vocab.token_bytes(token)
    return data.decode("utf-8", "replace"), list(data)


def finite(logprob: float) -> float:
    # JSON has no -inf; llama.cpp writes the lowest float for a token of probability 0.
    return logprob if math.isfinite(logprob) else -3.4028234663852886e38


def llama_item(vocab, tp) -> dict:
    """One entry of llama.cpp's completion_probabilities: logprob / top_logprobs, or with post_sampling_probs
    prob / top_probs."""
    text, data = piece(vocab, tp.token)
    out = {"id": tp.token, "token": text, "bytes": data}
    alternatives = []
    for token, logprob in tp.top:
        alt_text, alt_bytes = piece(vocab, token)
        alternatives.append({"id": token, "token": alt_text, "bytes": alt_bytes,
                             **({"prob": math.exp(logprob)} if tp.post_sampling else {"logprob": finite(logprob)})})
    if tp.post_sampling:
        out.update(prob=math.exp(tp.logprob), top_probs=alternatives)
    else:
        out.update(logprob=finite(tp.logprob), top_logprobs=alternatives)
    return out


def chat_item(vocab, tp) -> dict:
    text, data = piece(vocab, tp.token)
    return {"token": text, "logprob": finite(tp.logprob), "bytes": data,
            "top_logprobs": [{"token": t, "logprob": finite(lp), "bytes": b}
                             for t, b, lp in ((*piece(vocab, token), lp) for token, lp in tp.top)]}


def chat_logprobs(vocab, tps: list) -> dict:
    return {"content": [chat_item(vocab, tp) for tp in tps], "refusal": None}


def completions_logprobs(vocab, tps: list, offset: int = 0) -> dict:
    """The completions API's object; text_offset counts characters of the generated text from `offset`."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    for tp in tps:
        text, _ = piece(vocab, tp.token)
        tokens.append(text)
        token_logprobs.append(finite(tp.logprob))
        top.append({piece(vocab, token)[0]: finite(lp) for token, lp in tp.top})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}
