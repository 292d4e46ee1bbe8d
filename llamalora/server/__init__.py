"""`llamalora server`: llama.cpp's HTTP API and web page, OpenAI-compatible routes, LoRA scales per request.

app.py builds the Starlette application, slots.py runs generations in worker threads on the -np slots,
schemas.py checks request bodies, openai.py holds the /v1 routes, extra_sampling.py the samplers only the
server offers (tail-free, mirostat, logit bias, penalize_nl), logprobs.py shapes token probabilities,
tools.py handles tool calls, adapters.py the adapters by name, monitoring.py /metrics and /slots
(docs/server.md describes them).
"""
