"""A stand-in OpenAI-compatible server with a fixed capacity, for testing and calibrating
`app loadtest` without Ray: chat, completions (both streamed or not), embeddings, models.

`python -m app.loadtest.stub --port 0 --capacity 2 --token-ms 5` prints `listening on PORT`
once it accepts connections. A request holds one of `capacity` slots while it "generates";
up to `queue` more wait for a slot, and any beyond are refused with 503, so a small stub
shows the queueing and admission behaviour a deliberately tiny deployment would.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

CHAT_MODEL = "stub-chat"
EMBEDDING_MODEL = "stub-embed"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class StubServer:
    """The stub's request handlers and its capacity (slots plus a bounded queue)."""

    def __init__(self, capacity: int = 64, queue: int = 1024, token_s: float = 0.0) -> None:
        self.token_s = token_s
        self.queue = queue
        self._slots = asyncio.Semaphore(capacity)
        self._waiting = 0
        self.created = int(time.time())

    def app(self) -> web.Application:
        application = web.Application()
        application.router.add_get("/v1/models", self.models)
        application.router.add_post("/v1/chat/completions", self._admitted(self.generate))
        application.router.add_post("/v1/completions", self._admitted(self.generate))
        application.router.add_post("/v1/embeddings", self._admitted(self.embeddings))
        return application

    async def models(self, request: web.Request) -> web.Response:
        data = [
            {
                "id": model,
                "object": "model",
                "created": self.created,
                "owned_by": "stub",
                "task": task,
            }
            for model, task in ((CHAT_MODEL, "text-generation"), (EMBEDDING_MODEL, "embedding"))
        ]
        return web.json_response({"object": "list", "data": data})

    def _admitted(self, handler: Handler) -> Handler:
        async def admitted(request: web.Request) -> web.StreamResponse:
            if self._slots.locked() and self._waiting >= self.queue:
                return _error(503, "the stub is at capacity")
            self._waiting += 1
            try:
                await self._slots.acquire()
            finally:
                self._waiting -= 1
            try:
                return await handler(request)
            finally:
                self._slots.release()

        return admitted

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        tokens = max(1, int(body.get("max_tokens") or 16))
        chat = request.path.endswith("/chat/completions")
        if not body.get("stream"):
            await asyncio.sleep(self.token_s * tokens)
            text = " ".join("tok" for _ in range(tokens))
            choice: dict[str, Any] = (
                {"index": 0, "message": {"role": "assistant", "content": text}}
                if chat
                else {"index": 0, "text": text}
            )
            choice["finish_reason"] = "length"
            return web.json_response({"id": "stub", "choices": [choice], "usage": _usage(tokens)})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for _ in range(tokens):
            await asyncio.sleep(self.token_s)
            piece = {"delta": {"content": "tok "}} if chat else {"text": "tok "}
            event = {"id": "stub", "choices": [{"index": 0, **piece}]}
            await response.write(b"data: " + json.dumps(event).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        return response

    async def embeddings(self, request: web.Request) -> web.Response:
        body = await request.json()
        inputs = body.get("input")
        count = len(inputs) if isinstance(inputs, list) else 1
        await asyncio.sleep(self.token_s)
        data = [{"index": i, "object": "embedding", "embedding": [0.0] * 8} for i in range(count)]
        return web.json_response({"object": "list", "data": data, "usage": _usage(0)})


def _usage(completion: int) -> dict[str, int]:
    return {"prompt_tokens": 1, "completion_tokens": completion, "total_tokens": 1 + completion}


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "stub"}}, status=status)


async def serve(args: argparse.Namespace) -> None:
    stub = StubServer(args.capacity, args.queue, args.token_ms / 1000)
    runner = web.AppRunner(stub.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port)
    await site.start()
    server = site._server
    sockets = getattr(server, "sockets", None) or []
    port = sockets[0].getsockname()[1] if sockets else args.port
    print(f"listening on {port}", flush=True)
    await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    parser.add_argument("--capacity", type=int, default=64, help="requests served at once")
    parser.add_argument("--queue", type=int, default=1024, help="requests waiting; more get 503")
    parser.add_argument("--token-ms", type=float, default=0.0, help="milliseconds per token")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
