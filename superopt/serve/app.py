"""The HTTP server: a Starlette app (run on uvicorn) over the scheduler, speaking the OpenAI API subset of
protocol.py: POST /v1/completions and /v1/chat/completions (streamed as server-sent events ending with
`data: [DONE]`, or one JSON response), GET /v1/models, /health and /metrics (Prometheus' text format).

A request is checked whole before it is queued, so a bad one is a 4xx with a one-line message that costs the
running ones nothing; a full queue is a 429. A client that disconnects, streaming or not, ends its sequence:
its slot and KV blocks go back before the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from superopt.serve.protocol import DEFAULT_MAX_TOKENS, Parsed, RequestError, choice, envelope, error_body, parse, usage
from superopt.serve.scheduler import BadRequest, QueueFull, Request, Scheduler, Sequence
from superopt.serve.text import TextStream, TextTokenizer

MAX_BODY = 1 << 20  # bytes of a request body
Piece = tuple[list[int], str, str | None]  # token ids, text, finish reason (None until the last piece)


class EventStream(StreamingResponse):
    """Server-sent events; `on_close` runs however the stream ends, a client's disconnect included (Starlette
    cancels the stream when the client leaves)."""

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except ClientDisconnect:
            pass  # a server of ASGI spec 2.4 reports the disconnect this way, from a send
        finally:
            self.on_close()


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


async def disconnected(receive: Receive) -> None:
    """Returns when the client has gone (the request body is read already, so only that message is left)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def read_body(request: HTTPRequest) -> bytes:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise RequestError(f"the request body exceeds {MAX_BODY} bytes", 413)
    return bytes(body)


class Server:
    def __init__(self, scheduler: Scheduler, model: str, tokenizer: TextTokenizer | None) -> None:
        self.scheduler, self.model, self.tokenizer = scheduler, model, tokenizer
        self.engine: asyncio.Task[None] | None = None

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self.engine = asyncio.create_task(self.scheduler.run())
        try:
            yield
        finally:
            self.engine.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.engine

    def error(self, message: str, status: int) -> JSONResponse:
        if status != 429:  # the scheduler counts those
            self.scheduler.metrics.rejected["bad_request"] += 1
        return JSONResponse(error_body(message, status), status)

    async def health(self, request: HTTPRequest) -> Response:
        if self.engine is None or self.engine.done():
            return JSONResponse({"status": "the decode loop is not running"}, 503)
        return JSONResponse({"status": "ok"})

    async def metrics(self, request: HTTPRequest) -> Response:
        s = self.scheduler
        gauges = {
            "superopt_queue_length": ("Requests waiting for a slot.", len(s.waiting)),
            "superopt_active_slots": ("Sequences being prefilled or decoded.", len(s.running)),
            "superopt_max_batch": ("Slots.", s.max_batch),
            "superopt_kv_blocks_free": ("KV cache blocks free.", s.cache.free_blocks),
            "superopt_kv_blocks_total": ("KV cache blocks in the pool.", s.cache.blocks),
        }
        return PlainTextResponse(s.metrics.render(gauges), media_type="text/plain; version=0.0.4")

    async def models(self, request: HTTPRequest) -> Response:
        card = {"id": self.model, "object": "model", "created": 0, "owned_by": "superopt"}
        return JSONResponse({"object": "list", "data": [card]})

    async def completions(self, request: HTTPRequest) -> Response:
        return await self.generate(request, chat=False)

    async def chat(self, request: HTTPRequest) -> Response:
        return await self.generate(request, chat=True)

    async def generate(self, request: HTTPRequest, chat: bool) -> Response:
        events: asyncio.Queue[tuple[int | None, str | None]] = asyncio.Queue()
        try:
            parsed = parse(await read_body(request), chat, self.model, self.tokenizer)
            # the default: OpenAI's 16 tokens for a completion, the rest of the context for a chat (at least one,
            # so that a prompt that fills the context is refused for its length)
            room = max(self.scheduler.context - len(parsed.prompt), 1)
            max_tokens = parsed.max_tokens or (room if chat else min(DEFAULT_MAX_TOKENS, room))
            req = Request(parsed.prompt, max_tokens, parsed.sampling, parsed.seed, parsed.stop_ids)
            seq = self.scheduler.submit(req, lambda token, reason: events.put_nowait((token, reason)))
        except RequestError as e:
            return self.error(str(e), e.status)
        except BadRequest as e:
            return self.error(str(e), 400)
        except QueueFull as e:
            return self.error(str(e), 429)
        pieces = self.pieces(seq, events, TextStream(self.tokenizer, parsed.stop_strings))
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{seq.id}"
        if parsed.stream:
            return EventStream(self.stream(chat, rid, parsed, pieces), lambda: self.scheduler.abort(seq))
        try:
            return await self.respond(request, chat, rid, parsed, pieces)
        finally:
            self.scheduler.abort(seq)  # nothing if it has ended; else its client left

    async def pieces(self, seq: Sequence, events: asyncio.Queue, text: TextStream) -> AsyncIterator[Piece]:
        """The sequence's output as it is generated, one piece a token, the last with its finish reason."""
        while True:
            token, reason = await events.get()
            if token is None:
                yield [], text.rest(), reason
                return
            piece, stopped = text.add(token)
            if stopped:
                self.scheduler.abort(seq, "stop")
                yield [token], piece, "stop"
                return
            yield [token], piece, None

    async def stream(self, chat: bool, rid: str, parsed: Parsed, pieces: AsyncIterator[Piece]) -> AsyncIterator[str]:
        first, generated = True, 0
        async for ids, text, finish in pieces:
            generated += len(ids)
            yield sse(envelope(chat, True, rid, self.model, [choice(chat, True, text, ids, finish, first)]))
            first = False
        if parsed.include_usage:
            yield sse(envelope(chat, True, rid, self.model, []) | {"usage": usage(len(parsed.prompt), generated)})
        yield "data: [DONE]\n\n"

    async def respond(
        self, request: HTTPRequest, chat: bool, rid: str, parsed: Parsed, pieces: AsyncIterator[Piece]
    ) -> Response:
        """The whole output as one response, or, if the client leaves first, an empty one nobody reads."""

        async def collect() -> Piece:
            ids: list[int] = []
            texts: list[str] = []
            finish = None
            async for more, text, end in pieces:
                ids += more
                texts.append(text)
                finish = end
            return ids, "".join(texts), finish

        work, gone = asyncio.ensure_future(collect()), asyncio.ensure_future(disconnected(request.receive))
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        gone.cancel()
        if not work.done():
            work.cancel()
            return Response(status_code=499)
        ids, text, finish = work.result()
        body = envelope(chat, False, rid, self.model, [choice(chat, False, text, ids, finish)])
        return JSONResponse(body | {"usage": usage(len(parsed.prompt), len(ids))})


def create_app(scheduler: Scheduler, model: str, tokenizer: TextTokenizer | None = None) -> Starlette:
    """The app; its lifespan runs the scheduler's decode loop."""
    server = Server(scheduler, model, tokenizer)
    routes = [
        Route("/health", server.health),
        Route("/metrics", server.metrics),
        Route("/v1/models", server.models),
        Route("/v1/completions", server.completions, methods=["POST"]),
        Route("/v1/chat/completions", server.chat, methods=["POST"]),
    ]
    return Starlette(routes=routes, lifespan=server.lifespan)
