"""`superopt serve`: the batched decode step, the paged KV cache, continuous batching and the HTTP server, on the
tiny models on the CPU (the server on a free loopback port, driven by an async HTTP client)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn
from click.testing import CliRunner
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from superopt.cli.main import main
from superopt.model import Decoder, Model, load_model
from superopt.serve.app import create_app
from superopt.serve.kv import PagedKVCache
from superopt.serve.sampling import Sampling
from superopt.serve.scheduler import QueueFull, Request, Scheduler
from superopt.serve.text import TextTokenizer

MODELS = Path(__file__).resolve().parent.parent / "examples" / "models"


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """One torch thread: the tiny models' ops are too small to split, and on a busy 2-core machine two threads
    contend (several times slower)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def llama() -> Model:
    return load_model(MODELS / "tiny-llama.yaml")


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE tokenizer.json of 300 tokens (within tiny-llama's 512), trained here in milliseconds."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog " * 20, "hello world"], trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def random_requests(rng: random.Random, n: int, vocab: int, context: int) -> list[tuple[list[int], int]]:
    """(prompt, max_tokens) pairs of random lengths within the context."""
    out = []
    for _ in range(n):
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(1, 10))]
        out.append((prompt, rng.randint(1, min(8, context - len(prompt)))))
    return out


def alone(model: Model, precision: str, requests: list[tuple[list[int], int]]) -> list[list[int]]:
    """Each request decoded by itself with the reference decoder: its generated tokens."""
    ref = Decoder(model, precision)
    return [ref.generate(prompt, n)[0][len(prompt) :] for prompt, n in requests]


def run_all(sched: Scheduler, requests: list[tuple[list[int], int]]) -> list[list[int]]:
    """Submits every request, steps until all are done; each one's generated tokens."""
    outs: list[list[int]] = [[] for _ in requests]
    for i, (prompt, n) in enumerate(requests):
        sched.submit(
            Request(prompt, n), lambda token, reason, i=i: outs[i].append(token) if token is not None else None
        )
    waited_for_blocks = False
    while sched.step():
        waited_for_blocks |= bool(sched.waiting) and len(sched.running) < sched.max_batch
    # a pool smaller than max_batch whole contexts is there to make requests wait for blocks: check they did
    assert waited_for_blocks or sched.cache.blocks >= sched.max_batch * sched.cache.blocks_for(sched.context)
    return outs


# --- the batched step and the scheduler ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3", "tiny-qwen2", "tiny-gemma", "tiny-mistral"])
def test_batched_step_equals_decoding_each_sequence_alone(name: str) -> None:
    """12 sequences through 4 slots, prompts prefilled 3 tokens a step beside the decoding ones, the pool short
    of blocks so some wait: in float32 each gets exactly the tokens the reference decoder gives it alone (every
    architecture: q/k norms, biases, Gemma's norms and embedding scale, Mistral's window shorter than a prompt)."""
    model = load_model(MODELS / f"{name}.yaml")
    requests = random_requests(random.Random(name), 12, model.config.vocab, model.max_seq)
    sched = Scheduler.for_model(model, precision="float32", block_size=4, kv_blocks=12, max_batch=4, prefill_chunk=3)
    assert run_all(sched, requests) == alone(model, "float32", requests)
    assert sched.cache.free_blocks == sched.cache.blocks and not sched.running and not sched.waiting


def test_batched_bf16_agrees_with_the_reference_up_to_near_ties(llama: Model) -> None:
    """bf16: where a token differs from the reference's, the reference (fed the batched tokens) had the two
    within a bf16 rounding of each other."""
    requests = random_requests(random.Random(1), 8, llama.config.vocab, llama.max_seq)
    sched = Scheduler.for_model(llama, precision="bfloat16", block_size=4, max_batch=4, prefill_chunk=5)
    ref = Decoder(llama, "bfloat16")
    for (prompt, n), got in zip(requests, run_all(sched, requests)):
        _, logits = ref.generate(prompt, n, forced=got)
        chosen = logits[torch.arange(n), torch.tensor(got)]
        top = logits.max(-1).values
        assert bool(((top - chosen) <= 0.02 * top.abs().clamp(min=1)).all()), (prompt, got)


def test_paged_kv_reuses_blocks_and_never_leaks(llama: Model) -> None:
    cache = PagedKVCache(llama.config, 6, 4, torch.float32)
    assert cache.allocate(1, 9) and cache.table(1) == [0, 1, 2]  # 9 positions: 3 blocks of 4
    assert cache.allocate(2, 8) and cache.table(2) == [3, 4]
    assert not cache.allocate(3, 5) and cache.free_blocks == 1  # out of blocks: nothing reserved
    cache.release(1)
    assert cache.allocate(3, 12) and cache.table(3) == [0, 1, 2]  # the released blocks, reused
    assert cache.slots(3, 6).tolist() == [0, 1, 2, 3, 4, 5] and cache.slots(2, 6).tolist() == [12, 13, 14, 15, 16, 17]
    for seq in (2, 3, 3):  # a second release of the same sequence gives back nothing
        cache.release(seq)
    assert cache.free_blocks == 6

    sched = Scheduler.for_model(llama, precision="float32", block_size=4, kv_blocks=8, max_batch=3, max_queue=50)
    requests = random_requests(random.Random(2), 40, llama.config.vocab, llama.max_seq)
    run_all(sched, requests)
    assert sched.cache.free_blocks == 8
    assert sched.metrics.finished["length"] == 40


def test_queue_bound_cancellation_and_seeded_sampling(llama: Model) -> None:
    """A full queue refuses; a cancelled request leaves at once (waiting) or before the next step (running); an
    unseeded sampled request draws from the server's seed, so a run repeats exactly for the same seed."""
    sched = Scheduler.for_model(llama, precision="float32", max_batch=1, max_queue=2)
    ends: list[str | None] = []
    sink = lambda token, reason: ends.append(reason) if reason else None  # noqa: E731
    a, b = sched.submit(Request([1, 2], 20), sink), sched.submit(Request([3], 20), sink)
    with pytest.raises(QueueFull):
        sched.submit(Request([4], 5), sink)
    sched.step()  # a runs, b waits
    sched.abort(b)  # a waiting request leaves at once
    assert ends == ["cancelled"] and not sched.waiting
    sched.abort(a)  # a running one before the next step
    assert not sched.step() and ends == ["cancelled"] * 2 and sched.cache.free_blocks == sched.cache.blocks

    def sampled(seed: int) -> list[list[int]]:
        sched = Scheduler.for_model(llama, precision="float32", max_batch=2, seed=seed)
        requests = [Request([5, 6, 7], 12, Sampling(temperature=1.0, top_p=0.95)) for _ in range(3)]
        outs: list[list[int]] = [[] for _ in requests]
        for out, r in zip(outs, requests):
            sched.submit(r, lambda token, reason, out=out: out.append(token) if token is not None else None)
        while sched.step():
            pass
        return outs

    first = sampled(3)
    assert sampled(3) == first != sampled(4) and first[0] != first[1]  # each request its own seed


# --- the HTTP server ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def serving(sched: Scheduler, tokenizer: TextTokenizer | None = None) -> Iterator[str]:
    """The app on uvicorn in a thread, on a free loopback port; its base URL."""
    sock = socket.create_server(("127.0.0.1", 0))
    config = uvicorn.Config(
        create_app(sched, "tiny-llama", tokenizer),
        log_level="warning",
        timeout_graceful_shutdown=2,
        timeout_keep_alive=120,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)


def client() -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=400, max_keepalive_connections=400)
    return httpx.AsyncClient(limits=limits, timeout=60)


def metric(text: str, name: str) -> float:
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))  # type: ignore[union-attr]


async def stream(c: httpx.AsyncClient, url: str, body: dict, cancel_after: int | None = None) -> dict:
    """A streamed completion: its token ids, text, finish reason and whether [DONE] came; cancel_after: leave
    after that many chunks."""
    out: dict = {"ids": [], "text": "", "finish": None, "done": False}
    async with c.stream("POST", url, json=body | {"stream": True}) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                out["done"] = True
                continue
            (ch,) = json.loads(line[6:])["choices"]
            out["ids"] += ch["token_ids"]
            out["text"] += ch.get("text", ch.get("delta", {}).get("content", ""))
            out["finish"] = ch["finish_reason"]
            if cancel_after is not None and len(out["ids"]) >= cancel_after:
                break  # closing the unread response drops the connection: the server sees the client leave
    return out


async def settled(c: httpx.AsyncClient, base: str) -> str:
    """/metrics once no slot is active and the queue is empty (cancellations end between steps)."""
    deadline = time.monotonic() + 20
    while True:
        text = (await c.get(f"{base}/metrics")).text
        if metric(text, "superopt_active_slots") == 0 and metric(text, "superopt_queue_length") == 0:
            return text
        assert time.monotonic() < deadline, text
        await asyncio.sleep(0.05)


def test_200_concurrent_streams_with_cancellations_and_bad_requests(llama: Model) -> None:
    """200 streamed requests at once (10% leave after their first token) beside bad requests: each bad one is a
    4xx with a one-line message; every other stream ends with [DONE] and exactly the tokens the reference gives
    it alone; after all, no slot is active and every KV block is free."""
    rng = random.Random(0)
    requests = random_requests(rng, 200, llama.config.vocab, llama.max_seq)
    cancelled = set(rng.sample(range(200), 20))
    for i in cancelled:  # long ones (seconds), so that they end because their client leaves, not by running out
        requests[i] = (requests[i][0], 400)
    sched = Scheduler.for_model(
        llama,
        precision="float32",
        context=512,
        block_size=8,
        kv_blocks=256,
        max_batch=16,
        max_queue=256,
        prefill_chunk=16,
    )
    bad = [
        (b'{"prompt": [1, 2', 400, "malformed JSON"),
        (b'{"prompt": [1, 2], "frequency_penalty": 1}', 400, "unknown field 'frequency_penalty'"),
        (b'{"prompt": [1, 2], "max_tokens": -3}', 400, "max_tokens must be at least 1"),
        (json.dumps({"prompt": [1] * 520}).encode(), 400, "exceed the context limit of 512"),
        (b'{"prompt": [1, 2], "max_tokens": "8"}', 400, "max_tokens must be an integer"),
        (b'{"prompt": [1, 2], "temperature": true}', 400, "temperature must be a number"),
        (b'{"prompt": [1, 99999]}', 400, "token id 99999 is out of the vocabulary"),
        (b'{"prompt": "some text"}', 400, "has no tokenizer"),
        (b"[1, 2]", 400, "must be a JSON object"),
        (b'{"prompt": [1], "model": "gpt-4"}', 404, "is not served here"),
        (b'{"prompt": [' + b"1, " * 400_000 + b"1]}", 413, "exceeds 1048576 bytes"),
    ]

    async def drive(base: str) -> tuple[list[dict], list[httpx.Response], str]:
        async with client() as c:
            url = f"{base}/v1/completions"
            streams = [
                stream(c, url, {"prompt": p, "max_tokens": n, "temperature": 0}, 1 if i in cancelled else None)
                for i, (p, n) in enumerate(requests)
            ]
            errors = [c.post(url, content=body, headers={"content-type": "application/json"}) for body, _, _ in bad]
            results = await asyncio.gather(*streams, *errors)
            return results[:200], results[200:], await settled(c, base)

    t0 = time.monotonic()
    with serving(sched) as base:
        outs, answers, final = asyncio.run(drive(base))
    served = time.monotonic() - t0
    for (_, status, message), r in zip(bad, answers):
        assert r.status_code == status and message in r.json()["error"]["message"], r.text
        assert "\n" not in r.json()["error"]["message"]
    want = alone(llama, "float32", [(p, 1 if i in cancelled else n) for i, (p, n) in enumerate(requests)])
    for i, (out, ref) in enumerate(zip(outs, want)):
        if i in cancelled:
            assert out["ids"] == ref
        else:
            assert out == {"ids": ref, "text": "", "finish": "length", "done": True}, i
    assert metric(final, "superopt_kv_blocks_free") == metric(final, "superopt_kv_blocks_total") == 256
    assert metric(final, 'superopt_requests_rejected_total{reason="bad_request"}') == len(bad)
    assert metric(final, 'superopt_requests_finished_total{reason="cancelled"}') == len(cancelled)
    assert metric(final, 'superopt_requests_finished_total{reason="length"}') == 200 - len(cancelled)
    assert metric(final, "superopt_time_to_first_token_seconds_count") == 200
    assert served < 60


def test_429_when_the_queue_is_full_and_a_client_that_leaves_frees_its_slot(llama: Model) -> None:
    sched = Scheduler.for_model(llama, precision="float32", max_batch=1, max_queue=2)
    body = {"prompt": [1, 2, 3], "max_tokens": 29, "temperature": 0}

    async def drive(base: str) -> tuple[list[int], str]:
        async with client() as c:
            url = f"{base}/v1/completions"
            # one runs, two wait, the rest find the queue full
            codes = [r.status_code for r in await asyncio.gather(*[c.post(url, json=body) for _ in range(8)])]
            await settled(c, base)
            with pytest.raises(httpx.TimeoutException):  # 29 steps take longer: the client leaves mid-decode
                await c.post(url, json=body, timeout=0.01)
            return codes, await settled(c, base)

    with serving(sched) as base:
        codes, final = asyncio.run(drive(base))
    assert codes.count(429) >= 5 and codes.count(200) == 8 - codes.count(429), codes
    assert metric(final, 'superopt_requests_finished_total{reason="cancelled"}') == 1
    assert metric(final, "superopt_kv_blocks_free") == metric(final, "superopt_kv_blocks_total")


def test_text_prompts_stop_strings_chat_and_seeded_sampling(llama: Model, tokenizer_file: Path) -> None:
    """Text prompts through a tokenizer.json; a stop string cuts the text before it, a stop token id the output
    before it; a chat prompt as text or as token ids; one seed samples the same tokens in three requests at once,
    another seed others; /health and /v1/models."""
    tok = TextTokenizer.from_file(tokenizer_file, llama.config.vocab)
    sched = Scheduler.for_model(llama, precision="float32", max_batch=4)
    sampled = {"prompt": "the quick", "max_tokens": 12, "temperature": 0.9, "top_p": 0.9, "seed": 7}

    async def drive(base: str) -> dict:
        async with client() as c:
            url, chat_url = f"{base}/v1/completions", f"{base}/v1/chat/completions"
            greedy = (await c.post(url, json={"prompt": "hello", "max_tokens": 10, "temperature": 0})).json()
            text = greedy["choices"][0]["text"]
            stop = text[3:5]  # a stop string the greedy output contains
            stopped = await stream(c, url, {"prompt": "hello", "max_tokens": 10, "temperature": 0, "stop": stop})
            stop_id = greedy["choices"][0]["token_ids"][2]
            by_id = await c.post(url, json={"prompt": "hello", "max_tokens": 10, "temperature": 0, "stop": [stop_id]})
            runs = await asyncio.gather(
                *[stream(c, url, sampled) for _ in range(3)], stream(c, url, sampled | {"seed": 8})
            )
            chats = [
                (await c.post(chat_url, json={"messages": [m], "max_tokens": 10, "temperature": 0})).json()
                for m in ({"role": "user", "content": "hello"}, {"role": "user", "content": tok.encode("hello")})
            ]
            health, listed = (await c.get(f"{base}/health")).json(), (await c.get(f"{base}/v1/models")).json()
            return {
                "greedy": greedy,
                "stop": stop,
                "stopped": stopped,
                "by_id": by_id.json(),
                "runs": runs,
                "chats": chats,
                "health": health,
                "models": listed,
            }

    with serving(sched, tok) as base:
        got = asyncio.run(drive(base))
    (greedy,) = got["greedy"]["choices"]
    prompt = tok.encode("hello")
    assert greedy["token_ids"] == alone(llama, "float32", [(prompt, 10)])[0]
    assert greedy["text"] == tok.decode(greedy["token_ids"]) and got["greedy"]["usage"]["prompt_tokens"] == len(prompt)
    stopped = got["stopped"]
    assert stopped["text"] == greedy["text"][: greedy["text"].index(got["stop"])] and stopped["finish"] == "stop"
    first, *again, other = got["runs"]
    assert all(run == first for run in again) and first["ids"] and other["ids"] != first["ids"]
    (by_id,) = got["by_id"]["choices"]  # a stop token ends the output, and is not part of it
    ids = greedy["token_ids"]
    assert by_id["token_ids"] == ids[: ids.index(ids[2])] and by_id["finish_reason"] == "stop"
    for chat in got["chats"]:  # text through the tokenizer, or pre-tokenized: the same prompt
        assert chat["choices"][0]["message"] == {"role": "assistant", "content": greedy["text"]}
    assert got["health"] == {"status": "ok"} and got["models"]["data"][0]["id"] == "tiny-llama"


def test_serve_command_refuses_bad_input_in_one_line(tmp_path: Path) -> None:
    spec = str(MODELS / "tiny-llama.yaml")
    (tmp_path / "tokenizer.json").write_text("{not json")
    taken = socket.create_server(("127.0.0.1", 0))
    cases = [
        ([str(tmp_path / "missing.yaml")], "missing.yaml"),
        ([spec, "--max-batch", "0"], "--max-batch"),
        ([spec, "--port", "70000"], "--port"),
        ([spec, "--tokenizer", str(tmp_path / "none.json")], "tokenizer file not found"),
        ([spec, "--tokenizer", str(tmp_path / "tokenizer.json")], "not a tokenizer.json"),
        ([spec, "--kv-blocks", "1", "--block-size", "4"], "fewer than the context limit 32"),
        ([spec, "--port", str(taken.getsockname()[1])], "cannot listen on 127.0.0.1"),
    ]
    for args, message in cases:
        r = CliRunner().invoke(main, ["serve", *args])
        assert r.exit_code == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
    taken.close()
