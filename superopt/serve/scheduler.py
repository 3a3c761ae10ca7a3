"""Continuous batching over the batched decoder: requests wait in a bounded queue, up to max_batch run at once,
and between two steps a finished, stopped or cancelled sequence's slot (and its KV blocks) goes to the request at
the head of the queue.

The policy, "decode-first with chunked prefill": every step feeds each decoding sequence its last token, then
spends a budget of at most `prefill_chunk` prompt tokens on the sequences still prefilling, oldest admission
first (a prompt longer than the budget is fed over several steps, beside the decoding ones). Decoding sequences
are never held back by a long prompt, and a step's work is bounded by max_batch + prefill_chunk tokens.

Admission is first come, first served: the head of the queue is admitted when a slot is free and the KV pool
holds the blocks for its prompt and max_tokens (kv.py); while it does not fit, the requests behind it wait too,
so a long request is never starved by short ones. Everything is decided by the order of arrivals and the
tokens: a run is deterministic for a seed (a request without a seed gets the next one of the server's seeded
sequence of seeds, in arrival order).

The scheduler's state is changed only on the event loop's thread (submit, abort, and between steps); the step
itself runs in a worker thread (asyncio.to_thread), so the server answers requests while the model computes.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from superopt.model import Model
from superopt.serve.decoder import BatchedDecoder, Chunk
from superopt.serve.kv import PagedKVCache, default_blocks
from superopt.serve.metrics import Metrics
from superopt.serve.sampling import Sampling, sample

log = logging.getLogger("superopt.serve")

# A sequence's output, as the scheduler reports it: (token, None) for each generated token, then once
# (None, finish reason): "length" (max_tokens), "stop" (a stop token or string), "cancelled", or "error".
Sink = Callable[[int | None, str | None], None]


class QueueFull(Exception):
    """The queue holds max_queue requests already (HTTP 429)."""


class BadRequest(ValueError):
    """A request the server can never run (HTTP 400); the message is one line."""


@dataclass(frozen=True)
class Request:
    prompt: list[int]
    max_tokens: int
    sampling: Sampling = Sampling()
    seed: int | None = None  # of the sampling; None: the server's next seed
    stop_ids: frozenset[int] = frozenset()  # generated, these end the sequence (and are not part of its output)


@dataclass(eq=False)
class Sequence:
    id: int
    request: Request
    sink: Sink
    arrival: float
    generator: torch.Generator
    tokens: list[int]  # the prompt, then each generated token
    generated: int = 0
    fed: int = 0  # tokens whose k and v are in the cache
    slots: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))
    abort_reason: str | None = None  # set while a step runs; the sequence ends when it returns
    finish_reason: str | None = None

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.request.prompt)

    @property
    def reserve(self) -> int:
        """Positions the sequence may write to the cache: its prompt and all but the last token it generates
        (that one is sampled, never fed)."""
        return len(self.request.prompt) + self.request.max_tokens - 1


class Scheduler:
    def __init__(
        self,
        decoder: BatchedDecoder,
        cache: PagedKVCache,
        *,
        max_batch: int,
        max_queue: int,
        prefill_chunk: int,
        seed: int = 0,
    ) -> None:
        if decoder.context > cache.blocks * cache.block_size:
            # else a request within the context limit could wait for blocks forever
            raise ValueError(f"the KV pool holds fewer positions than the context limit {decoder.context}")
        if min(max_batch, max_queue, prefill_chunk) < 1:
            raise ValueError("max_batch, max_queue and prefill_chunk must be at least 1")
        self.decoder, self.cache, self.context = decoder, cache, decoder.context
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.metrics = Metrics()
        self._seeds = random.Random(seed)
        self._ids = 0
        self._wake: asyncio.Event | None = None

    @classmethod
    def for_model(
        cls,
        model: Model,
        *,
        precision: str = "float32",
        context: int | None = None,
        block_size: int = 16,
        kv_blocks: int | None = None,
        max_batch: int = 8,
        max_queue: int = 64,
        prefill_chunk: int = 64,
        seed: int = 0,
    ) -> Scheduler:
        """The decoder, its KV pool and the scheduler of a model. context: positions a sequence may reach (default
        the spec's max_seq); kv_blocks: the pool's blocks (default: max_batch sequences of the whole context)."""
        context = context or model.max_seq
        kv_blocks = kv_blocks or default_blocks(max_batch, context, block_size)
        dtype = torch.float32 if precision == "float32" else torch.bfloat16
        cache = PagedKVCache(model.config, kv_blocks, block_size, dtype)
        decoder = BatchedDecoder(model, cache, context, precision)
        return cls(decoder, cache, max_batch=max_batch, max_queue=max_queue, prefill_chunk=prefill_chunk, seed=seed)

    def check(self, request: Request) -> None:
        """BadRequest if the request can never run here."""
        n, vocab = len(request.prompt), self.decoder.cfg.vocab
        if n < 1:
            raise BadRequest("the prompt is empty")
        if request.max_tokens < 1:
            raise BadRequest(f"max_tokens must be at least 1, got {request.max_tokens}")
        if n + request.max_tokens > self.context:
            raise BadRequest(
                f"the prompt ({n} tokens) and max_tokens ({request.max_tokens}) exceed the context limit "
                f"of {self.context} tokens"
            )
        bad = next((t for t in request.prompt if not 0 <= t < vocab), None)
        if bad is not None:
            raise BadRequest(f"token id {bad} is out of the vocabulary (0..{vocab - 1})")

    def submit(self, request: Request, sink: Sink) -> Sequence:
        """Queues the request; BadRequest if it can never run, QueueFull if max_queue requests wait already."""
        self.check(request)
        if len(self.waiting) >= self.max_queue:
            self.metrics.rejected["queue_full"] += 1
            raise QueueFull(f"the queue is full ({self.max_queue} requests wait); try again later")
        seed = self._seeds.getrandbits(63) if request.seed is None else request.seed
        self._ids += 1
        seq = Sequence(
            self._ids, request, sink, time.monotonic(), torch.Generator().manual_seed(seed), list(request.prompt)
        )
        self.waiting.append(seq)
        self._notify()
        return seq

    def abort(self, seq: Sequence, reason: str = "cancelled") -> None:
        """Ends a sequence (its client left, or a stop string was generated): a waiting one at once, a running
        one before the next step, which gives its slot and blocks to the queue."""
        if seq.finish_reason is not None or seq.abort_reason is not None:
            return
        if seq in self.waiting:
            self.waiting.remove(seq)
            self._finish(seq, reason)
        else:
            seq.abort_reason = reason
            self._notify()

    def plan(self) -> list[tuple[Sequence, Chunk]]:
        """Between steps: ends aborted sequences, admits from the queue, and picks the next step's chunks."""
        for seq in list(self.running):
            if seq.abort_reason is not None:
                self._finish(seq, seq.abort_reason)
        while self.waiting and len(self.running) < self.max_batch:
            seq = self.waiting[0]
            if not self.cache.allocate(seq.id, seq.reserve):
                break  # first come, first served: the head waits for blocks, and the queue behind it
            self.waiting.popleft()
            seq.slots = self.cache.slots(seq.id, seq.reserve)
            self.running.append(seq)
        batch, budget = [], self.prefill_chunk
        for seq in self.running:
            if not seq.prefilling:
                n = 1
            elif budget:
                n = min(len(seq.request.prompt) - seq.fed, budget)
                budget -= n
            else:
                continue
            end = seq.fed + n
            batch.append((seq, Chunk(seq.tokens[seq.fed : end], seq.fed, seq.slots[:end])))
        return batch

    def commit(self, batch: list[tuple[Sequence, Chunk]], logits: torch.Tensor) -> None:
        """After a step: samples the next token of each sequence whose chunk reached its end, reports it, and ends
        the sequences that are done."""
        now, generated = time.monotonic(), 0
        for row, (seq, chunk) in enumerate(batch):
            if seq.prefilling:
                self.metrics.prompt_tokens += len(chunk.tokens)
            seq.fed = chunk.end
            if seq.fed < len(seq.tokens) or seq.abort_reason is not None:
                continue  # the prompt is not all fed yet, or the client left during the step
            token = sample(logits[row], seq.request.sampling, seq.generator)
            generated += 1
            if not seq.generated:
                self.metrics.first_token(now - seq.arrival)
            seq.generated += 1
            if token in seq.request.stop_ids:
                self._finish(seq, "stop")
                continue
            seq.tokens.append(token)
            seq.sink(token, None)
            if seq.generated == seq.request.max_tokens:
                self._finish(seq, "length")
        self.metrics.step(generated, now)

    def step(self) -> bool:
        """One step, run here (tests, and tools without an event loop); False if there was nothing to do."""
        batch = self.plan()
        if batch:
            self.commit(batch, self.decoder.step([chunk for _, chunk in batch]))
        return bool(batch)

    async def run(self) -> None:
        """Steps for as long as the server runs, each in a worker thread; sleeps while there is no work."""
        self._wake = asyncio.Event()
        while True:
            batch = self.plan()
            if not batch:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                logits = await asyncio.to_thread(self.decoder.step, [chunk for _, chunk in batch])
            except Exception:  # a bug: end this batch's requests, say why in the log, keep serving the rest
                log.exception("the decode step failed; its %d sequences end with finish_reason 'error'", len(batch))
                for seq, _ in batch:
                    self._finish(seq, "error")
                continue
            self.commit(batch, logits)

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq in self.running:
            self.running.remove(seq)
            self.cache.release(seq.id)
        seq.finish_reason = reason
        self.metrics.finished[reason] += 1
        seq.sink(None, reason)

    def _notify(self) -> None:
        if self._wake is not None:
            self._wake.set()
