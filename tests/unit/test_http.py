"""The OpenAI HTTP routes over the echo model's service, in process (no Ray): status codes, error
bodies, SSE framing, and the 429/413/404/405 paths."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest

import app.api.http
from app.api import sse
from app.api.http import OpenAIRoutes
from app.api.schemas import ChatCompletionRequest, CompletionRequest
from app.api.sse import SSEStream
from app.catalog.cards import ModelCard
from app.serving.runners.echo import EchoRunner
from app.serving.service import ModelService


class EchoBackend:
    """The Backend protocol over a real ModelService, as a model replica implements it."""

    def __init__(self, max_ongoing: int = 8) -> None:
        card = ModelCard(
            id="echo", task="text-generation", loader="echo", max_ongoing_requests=max_ongoing
        )
        runner = EchoRunner(card, None)
        runner.load()
        self.service = ModelService(card, runner)

    async def list_models(self) -> list[dict[str, Any]]:
        return [self.service.model_info()]

    async def health(self) -> dict[str, Any]:
        return {"status": "ok"}

    async def chat(self, req: ChatCompletionRequest) -> dict[str, Any]:
        with self.service.admit():
            return await self.service.chat(req)

    async def chat_stream(self, req: ChatCompletionRequest) -> AsyncIterator[dict[str, Any]]:
        with self.service.admit():
            async for chunk in self.service.chat_stream(req):
                yield chunk

    def chat_sse(self, req: ChatCompletionRequest) -> SSEStream:
        return SSEStream(self.chat_stream(req))

    async def completions(self, req: CompletionRequest) -> dict[str, Any]:
        return await self.service.completions(req)

    def completions_sse(self, req: CompletionRequest) -> SSEStream:
        return SSEStream(self.service.completions_stream(req))

    async def embeddings(self, req: Any) -> dict[str, Any]:
        return await self.service.embeddings(req)

    async def images(self, req: Any) -> dict[str, Any]:
        return await self.service.images(req)


@pytest.fixture
def backend() -> EchoBackend:
    return EchoBackend()


@pytest.fixture
async def client(backend: EchoBackend) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=OpenAIRoutes(backend).asgi)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c


def chat(content: str = "one two three", **extra: Any) -> dict[str, Any]:
    return {"model": "echo", "messages": [{"role": "user", "content": content}]} | extra


def sse_events(body: str) -> list[Any]:
    events = [line.removeprefix("data: ") for line in body.split("\n\n") if line]
    assert events[-1] == "[DONE]", "an SSE stream must end with data: [DONE]"
    return [orjson.loads(e) for e in events[:-1]]


async def test_chat_completion_shape_and_usage(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", json=chat(max_tokens=2))
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "echo"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "one two "}
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


async def test_chat_stream_chunks(client: httpx.AsyncClient) -> None:
    body = chat("a b c", stream=True, n=2, stream_options={"include_usage": True})
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert {e["object"] for e in events} == {"chat.completion.chunk"}
    for index in (0, 1):
        deltas = [c["delta"] for e in events for c in e["choices"] if c["index"] == index]
        assert deltas[0] == {"role": "assistant", "content": ""}
        assert "".join(d.get("content", "") for d in deltas) == "a b c"
        finishes = [c["finish_reason"] for e in events for c in e["choices"] if c["index"] == index]
        assert finishes[-1] == "stop"
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 6


async def test_completions_echo_and_stop(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/completions", json={"model": "echo", "prompt": ["x y z", "p q"], "stop": " y"}
    )
    texts = [c["text"] for c in r.json()["choices"]]
    assert texts == ["x", "p q"]
    r = await client.post("/v1/completions", json={"model": "echo", "prompt": "a b", "echo": True})
    assert r.json()["choices"][0]["text"] == "a ba b"
    r = await client.post(
        "/v1/completions", json={"model": "echo", "prompt": "a b", "stream": True}
    )
    assert "".join(e["choices"][0]["text"] for e in sse_events(r.text)) == "a b"


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code"),
    [
        ("POST", "/v1/chat/completions", b"{not json", 400, "invalid_json"),
        ("POST", "/v1/chat/completions", orjson.dumps(chat(max_tokens=-3)), 400, None),
        ("POST", "/v1/chat/completions", orjson.dumps(chat(model="gpt-9")), 404, "model_not_found"),
        (
            "POST",
            "/v1/chat/completions",
            orjson.dumps(chat(model="gpt-9", stream=True)),
            404,
            "model_not_found",
        ),
        ("POST", "/v1/embeddings", b'{"model": "echo", "input": "x"}', 400, "model_not_supported"),
        ("POST", "/v1/nothing", b"{}", 404, "not_found"),
        ("GET", "/v1/chat/completions", b"", 405, "method_not_allowed"),
        ("GET", "/v1/models/gpt-9", b"", 404, "model_not_found"),
        (
            "POST",
            "/v1/chat/completions",
            orjson.dumps(chat("w " * 9000)),
            400,
            "context_length_exceeded",
        ),
    ],
)
async def test_errors_are_openai_bodies(
    client: httpx.AsyncClient, method: str, path: str, body: bytes, status: int, code: str | None
) -> None:
    r = await client.request(method, path, content=body)
    assert r.status_code == status
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    assert error["message"]


async def test_oversized_body_is_413(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app.api.http, "MAX_REQUEST_BYTES", 1000)
    r = await client.post("/v1/chat/completions", json=chat("x" * 2000))
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large"


async def test_over_capacity_is_429_with_retry_after() -> None:
    backend = EchoBackend(max_ongoing=1)
    routes = OpenAIRoutes(backend)
    held = backend.chat_stream(ChatCompletionRequest.model_validate(chat(stream=True)))
    await anext(held)  # one stream in flight holds the only slot
    transport = httpx.ASGITransport(app=routes.asgi)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        r = await c.post("/v1/chat/completions", json=chat())
    assert r.status_code == 429
    assert r.headers["retry-after"] == "1"
    assert r.json()["error"]["type"] == "rate_limit_error"
    await held.aclose()
    assert backend.service.inflight == 0


async def test_models_and_health(client: httpx.AsyncClient) -> None:
    models = (await client.get("/v1/models")).json()
    assert models["object"] == "list" and models["data"][0]["id"] == "echo"
    assert (await client.get("/v1/models/echo")).json()["id"] == "echo"
    assert (await client.get("/healthz")).json() == {"status": "ok"}


async def test_slow_stream_goes_out_in_several_writes() -> None:
    async def slow() -> AsyncIterator[dict[str, Any]]:
        for i in range(3):
            yield {"i": i}
            await asyncio.sleep(0.01)

    response = await sse.streaming_response(SSEStream(slow()))
    writes = [piece async for piece in response.body_iterator]  # type: ignore[attr-defined]
    assert len(writes) >= 3
    assert b"".join(writes).endswith(sse.SSE_DONE)


async def test_instant_stream_is_one_plain_response() -> None:
    async def instant() -> AsyncIterator[dict[str, Any]]:
        for i in range(3):
            yield {"i": i}

    response = await sse.streaming_response(SSEStream(instant()))
    assert not hasattr(response, "body_iterator")
    assert response.body.count(b"data: ") == 4 and response.body.endswith(sse.SSE_DONE)


async def test_error_mid_stream_becomes_error_event() -> None:
    async def broken() -> AsyncIterator[dict[str, Any]]:
        yield {"ok": 1}
        await asyncio.sleep(0.01)
        raise RuntimeError("boom")

    response = await sse.streaming_response(SSEStream(broken()))
    body = b"".join([p async for p in response.body_iterator])  # type: ignore[attr-defined]
    events = body.decode().strip().split("\n\n")
    assert orjson.loads(events[-2].removeprefix("data: "))["error"]["code"] == "internal_error"
    assert events[-1] == "data: [DONE]"


async def test_a_client_that_disconnects_cancels_its_unary_request() -> None:
    from starlette.requests import Request

    started, cancelled = asyncio.Event(), asyncio.Event()

    class Slow(EchoBackend):
        async def chat(self, req: ChatCompletionRequest) -> dict[str, Any]:
            started.set()
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                cancelled.set()
                raise
            return {}

    body = orjson.dumps(chat())
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        await started.wait()
        return {"type": "http.disconnect"}  # the client goes while the model works

    scope = post_scope("/v1/chat/completions", body)
    response = await asyncio.wait_for(OpenAIRoutes(Slow())(Request(scope, receive)), 5)
    assert cancelled.is_set() and response.status_code == 499


async def test_a_client_that_disconnects_before_the_first_chunk_cancels_its_stream() -> None:
    from starlette.requests import Request

    started, closed = asyncio.Event(), asyncio.Event()

    class Queued(EchoBackend):
        def chat_sse(self, req: ChatCompletionRequest) -> SSEStream:
            async def chunks() -> AsyncIterator[dict[str, Any]]:
                started.set()
                try:
                    await asyncio.sleep(60)  # waiting for a place in the running batch
                    yield {"never": True}
                finally:
                    closed.set()

            return SSEStream(chunks())

    body = orjson.dumps(chat(stream=True))
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        await started.wait()
        return {"type": "http.disconnect"}

    scope = post_scope("/v1/chat/completions", body)
    response = await asyncio.wait_for(OpenAIRoutes(Queued())(Request(scope, receive)), 5)
    assert closed.is_set() and response.status_code == 499


def post_scope(path: str, body: bytes) -> dict[str, Any]:
    """The ASGI scope of a POST with this body, for calling routes without a server."""
    return {
        "type": "http",
        "method": "POST",
        "path": path,
        "headers": [(b"content-length", str(len(body)).encode())],
        "query_string": b"",
    }
