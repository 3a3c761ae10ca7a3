"""`superopt serve`: an OpenAI-compatible server over the reference decoder, batched in torch (docs/serving.md).

decoder.py: the batched decode step; kv.py: the paged KV cache; scheduler.py: continuous batching; sampling.py:
the next token; text.py: the tokenizer and stop strings; protocol.py: the API's requests and responses;
metrics.py: Prometheus metrics; app.py: the Starlette app. It needs the `serve` extra (starlette, uvicorn,
tokenizers); nothing in the core imports it.
"""
