"""The OpenAI API subset the server speaks: each request's JSON checked field by field (an unknown field, a
wrong type or a value out of range is a RequestError with a one-line message), and the response objects.

Prompts are token ids, or text through the server's tokenizer. A chat request's prompt is its messages'
contents one after another, text encoded by the tokenizer and lists of token ids taken as they are: the server
applies no chat template (tokenizer.json carries none), so a client that needs the model's template renders it
itself and sends the result, as text or token ids. Each choice carries `token_ids` beside its text (an
extension): without a tokenizer the text is empty and the ids are the output.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any

from superopt.serve.sampling import Sampling
from superopt.serve.text import TextTokenizer

COMMON_FIELDS = ("model", "max_tokens", "temperature", "top_p", "stream", "stream_options", "stop", "seed", "n", "user")
COMPLETION_FIELDS = ("prompt", *COMMON_FIELDS)
CHAT_FIELDS = ("messages", "max_completion_tokens", *COMMON_FIELDS)
MESSAGE_FIELDS = ("role", "content", "name")
ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOPS = 16
MAX_SEED = 2**63 - 1
DEFAULT_MAX_TOKENS = 16  # /v1/completions, as OpenAI's; chat defaults to the rest of the context


class RequestError(Exception):
    """A request answered with `status` and a one-line message, before it reaches the scheduler."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Parsed:
    prompt: list[int]
    max_tokens: int | None  # None: the endpoint's default
    sampling: Sampling
    seed: int | None
    stream: bool
    include_usage: bool
    stop_ids: frozenset[int]
    stop_strings: tuple[str, ...]


def parse(body: bytes, chat: bool, model: str, tokenizer: TextTokenizer | None) -> Parsed:
    """A /v1/completions (chat: /v1/chat/completions) request body."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as e:
        raise RequestError(f"malformed JSON: {str(e)[:100]}") from None
    if not isinstance(doc, dict):
        raise RequestError("the request body must be a JSON object")
    fields = CHAT_FIELDS if chat else COMPLETION_FIELDS
    unknown = sorted(set(doc) - set(fields))
    if unknown:
        raise RequestError(f"unknown field {unknown[0][:40]!r} (supported: {', '.join(fields)})")
    if doc.get("model") is not None and string(doc, "model") != model:
        raise RequestError(f"model {doc['model'][:40]!r} is not served here (this server serves {model!r})", 404)
    if doc.get("n") is not None and integer("n", doc["n"], 1) != 1:
        raise RequestError("n must be 1 (one choice a request)")
    if doc.get("user") is not None:
        string(doc, "user")
    prompt = messages_prompt(doc, tokenizer) if chat else completion_prompt(doc, tokenizer)
    key = "max_completion_tokens" if chat and doc.get("max_tokens") is None else "max_tokens"  # chat takes either
    limit = None if doc.get(key) is None else integer(key, doc[key], 1)
    temperature = number(doc, "temperature", 1.0, 0.0, 2.0)
    top_p = number(doc, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise RequestError("top_p must be > 0")
    seed = doc.get("seed")
    if seed is not None:
        seed = integer("seed", seed, 0, MAX_SEED)
    stream = flag(doc, "stream")
    options = doc.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise RequestError("stream_options is an object {'include_usage': bool}, with stream: true")
    stop_ids, stop_strings = stops(doc.get("stop"), tokenizer)
    return Parsed(
        prompt,
        limit,
        Sampling(temperature, top_p),
        seed,
        stream,
        flag(options or {}, "include_usage"),
        stop_ids,
        stop_strings,
    )


def integer(name: str, value: Any, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{name} must be an integer, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        raise RequestError(
            f"{name} must be {f'in {low}..{high}' if high is not None else f'at least {low}'}, got {value}"
        )
    return value


def number(doc: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = doc.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"{name} must be a number, got {type(value).__name__}")
    if not low <= value <= high:
        raise RequestError(f"{name} must be in {low:g}..{high:g}, got {value:g}")
    return float(value)


def flag(doc: dict[str, Any], name: str) -> bool:
    value = doc.get(name, False)
    if not isinstance(value, bool):
        raise RequestError(f"{name} must be true or false, got {type(value).__name__}")
    return value


def string(doc: dict[str, Any], name: str) -> str:
    if not isinstance(doc[name], str):
        raise RequestError(f"{name} must be a string, got {type(doc[name]).__name__}")
    return doc[name]


def token_ids(name: str, value: Any) -> list[int] | None:
    """`value` as a list of token ids, None if it is not a list; RequestError for a list of anything else."""
    if not isinstance(value, list):
        return None
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value):
        raise RequestError(f"{name} must be a string or a list of token ids (integers >= 0)")
    return value


def encode(name: str, text: str, tokenizer: TextTokenizer | None) -> list[int]:
    if tokenizer is None:
        raise RequestError(
            f"{name} is text, and this server has no tokenizer (start it with --tokenizer "
            "tokenizer.json, or send token ids)"
        )
    return tokenizer.encode(text)


def completion_prompt(doc: dict[str, Any], tokenizer: TextTokenizer | None) -> list[int]:
    if "prompt" not in doc:
        raise RequestError("prompt is missing")
    prompt = doc["prompt"]
    if isinstance(prompt, str):
        return encode("prompt", prompt, tokenizer)
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        raise RequestError("one prompt a request: a string or a list of token ids")
    ids = token_ids("prompt", prompt)
    if ids is None:
        raise RequestError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
    return ids


def messages_prompt(doc: dict[str, Any], tokenizer: TextTokenizer | None) -> list[int]:
    messages = doc.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list of {'role', 'content'} objects")
    prompt: list[int] = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or set(m) - set(MESSAGE_FIELDS) or "content" not in m:
            raise RequestError(f"{where} must be an object with role and content (and optionally name)")
        if m.get("role") not in ROLES:
            raise RequestError(f"{where}.role must be one of {', '.join(ROLES)}")
        content = m["content"]
        if isinstance(content, str):
            prompt += encode(f"{where}.content", content, tokenizer)
        else:
            ids = token_ids(f"{where}.content", content)
            if ids is None:
                raise RequestError(f"{where}.content must be a string or a list of token ids")
            prompt += ids
    return prompt


def stops(value: Any, tokenizer: TextTokenizer | None) -> tuple[frozenset[int], tuple[str, ...]]:
    """`stop`: a string, a list of strings (needs a tokenizer) or a list of token ids."""
    if value is None:
        return frozenset(), ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or len(items) > MAX_STOPS:
        raise RequestError(f"stop must be a string, or a list of at most {MAX_STOPS} strings or token ids")
    if all(isinstance(s, str) and s for s in items):
        if items and tokenizer is None:
            raise RequestError(
                "stop strings need a tokenizer (start the server with --tokenizer); give stop token ids instead"
            )
        return frozenset(), tuple(items)
    ids = token_ids("stop", items)
    if ids is None:
        raise RequestError("stop must be non-empty strings or token ids, not a mix")
    return frozenset(ids), ()


def error_body(message: str, status: int) -> dict[str, Any]:
    kind = {404: "not_found_error", 413: "invalid_request_error", 429: "rate_limit_error"}.get(status)
    return {"error": {"message": message, "type": kind or "invalid_request_error", "param": None, "code": None}}


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def choice(
    chat: bool, stream: bool, text: str, ids: list[int], finish: str | None, first: bool = False
) -> dict[str, Any]:
    """One choice of a response (stream: of a chunk, its text the delta since the last chunk)."""
    out: dict[str, Any] = {"index": 0}
    if not chat:
        out |= {"text": text, "logprobs": None}
    elif stream:
        out["delta"] = ({"role": "assistant"} if first else {}) | ({"content": text} if text or first else {})
    else:
        out["message"] = {"role": "assistant", "content": text}
    return out | {"token_ids": ids, "finish_reason": finish}


def envelope(chat: bool, stream: bool, rid: str, model: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
    kind = "chat.completion.chunk" if chat and stream else "chat.completion" if chat else "text_completion"
    return {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": choices}
