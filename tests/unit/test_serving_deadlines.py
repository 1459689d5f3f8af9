"""Request time limits: the card's `timeouts` (defaults per task), the helpers in
app.serving.deadlines, and a model replica's own HTTP path, where a request past its limit gets
a 504 with an OpenAI error body of type "timeout" and its generation stops. The replica is the
real ModelServer class with its service and routes, minus Serve's replica context."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import httpx
import orjson
import pytest
from pydantic import ValidationError
from starlette.requests import Request

from app.api.errors import RequestTimeoutError
from app.api.http import OpenAIRoutes
from app.api.sse import SSE_DONE
from app.catalog.cards import ModelCard
from app.serving.batching import LocalBatcher
from app.serving.deadlines import (
    bounded_relay,
    bounded_sse,
    bounded_stream,
    request_deadline,
    time_limit,
    timeout_error,
)
from app.serving.model_server import ModelServer
from app.serving.runners.base import GenerationRequest, StepEntry
from app.serving.runners.echo import EchoRunner
from app.serving.service import ModelService

WORDS = " ".join(f"w{i}" for i in range(400))


def card(task: str = "text-generation", **fields: Any) -> ModelCard:
    loader = {
        "text-generation": "echo",
        "embedding": "sentence-transformers",
        "text-to-image": "diffusers-stable-diffusion",
    }[task]
    base = {"id": "m", "task": task, "loader": loader, "generation": {"max_tokens": 400}}
    return ModelCard.model_validate(base | fields)


# ---- the card -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("task", "seconds"), [("text-generation", 300), ("text-to-image", 300), ("embedding", 60)]
)
def test_request_timeout_defaults_by_task(task: str, seconds: float) -> None:
    assert card(task).request_timeout_s == seconds
    assert card(task).timeouts.chunk_s == 30


def test_a_card_sets_its_own_timeouts() -> None:
    custom = card(timeouts={"request_s": 2.5, "chunk_s": 0.5})
    assert (custom.request_timeout_s, custom.timeouts.chunk_s) == (2.5, 0.5)


@pytest.mark.parametrize("field", ["request_s", "chunk_s"])
def test_timeouts_must_be_positive(field: str) -> None:
    with pytest.raises(ValidationError, match=f"timeouts.{field}"):
        card(timeouts={field: 0})


def test_the_timeout_error_names_the_limit_and_its_field() -> None:
    slow = card(timeouts={"request_s": 2.5, "chunk_s": 0.5})
    whole, chunk = timeout_error(slow, True), timeout_error(slow, False)
    assert (whole.status, whole.type, whole.code) == (504, "timeout", "request_timeout")
    assert "2.5 s" in whole.message and "timeouts.request_s" in whole.message
    assert "0.5 s" in chunk.message and "timeouts.chunk_s" in chunk.message


# ---- the helpers ----------------------------------------------------------------------------


def error(first: bool) -> RequestTimeoutError:
    return RequestTimeoutError("first" if first else "later")


async def test_time_limit_cancels_the_block_and_raises_the_error() -> None:
    cancelled = False

    async def work() -> None:
        nonlocal cancelled
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            cancelled = True
            raise

    with pytest.raises(RequestTimeoutError, match="first"):
        async with time_limit(0.02, error):
            await work()
    assert cancelled


async def test_time_limit_lets_other_timeouts_through_and_none_means_no_limit() -> None:
    with pytest.raises(TimeoutError):
        async with time_limit(5, error):
            raise TimeoutError("from inside")
    async with time_limit(None, error):
        await asyncio.sleep(0.01)


async def ticks(delays: list[float], closed: list[bool]) -> AsyncIterator[int]:
    try:
        for i, delay in enumerate(delays):
            await asyncio.sleep(delay)
            yield i
    finally:
        closed.append(True)


@pytest.mark.parametrize(
    ("delays", "got", "raised"),
    [
        ([0, 0, 0], [0, 1, 2], None),
        ([1.0, 0], [], "first"),  # the first item is late
        ([0, 0, 1.0], [0, 1], "later"),  # a later one is
        ([0.2, 0], [0, 1], None),  # the first has longer than the others
        ([0, 0.3], [0], "later"),  # ...and a later one's shorter limit still holds
    ],
)
async def test_bounded_stream(delays: list[float], got: list[int], raised: str | None) -> None:
    closed: list[bool] = []
    items: list[int] = []
    stream = bounded_stream(ticks(delays, closed), first_s=0.5, next_s=0.1, error=error)
    if raised is None:
        items = [i async for i in stream]
    else:
        with pytest.raises(RequestTimeoutError, match=raised):
            async for i in stream:
                items.append(i)
    assert items == got and closed == [True]


async def test_only_the_wait_for_the_source_is_bounded_not_the_consumer() -> None:
    closed: list[bool] = []
    got = []
    async for i in bounded_stream(ticks([0, 0, 0], closed), first_s=0.1, next_s=0.1, error=error):
        got.append(i)
        await asyncio.sleep(0.3)  # a slow reader (a slow client socket) is not the model's fault
    assert got == [0, 1, 2]


async def test_the_limit_follows_the_task_that_waits() -> None:
    """SSEStream reads a stream's first chunk in the request's task and the rest in its pump
    task: the limit must cancel whichever task is waiting."""
    closed: list[bool] = []
    stream = bounded_stream(ticks([0, 1.0], closed), first_s=0.5, next_s=0.1, error=error)
    assert await anext(stream) == 0
    with pytest.raises(RequestTimeoutError, match="later"):
        await asyncio.create_task(anext(stream))  # type: ignore[arg-type]
    assert closed == [True]


async def test_bounded_sse_raises_before_the_first_write_and_ends_in_band_after() -> None:
    async def writes(delays: list[float]) -> AsyncIterator[bytes]:
        for delay in delays:
            await asyncio.sleep(delay)
            yield b"data: {}\n\n"

    with pytest.raises(RequestTimeoutError):
        await anext(bounded_sse(writes([1.0]), first_s=0.1, next_s=0.1, error=error))
    out = [w async for w in bounded_sse(writes([0, 1.0]), first_s=None, next_s=0.1, error=error)]
    assert out[0] == b"data: {}\n\n"
    event = orjson.loads(out[1].removeprefix(b"data: ").split(b"\n\n")[0])
    assert event["error"]["type"] == "timeout" and out[1].endswith(SSE_DONE)


async def test_request_deadline_spans_every_attempt_and_maps_the_timeout() -> None:
    """What the gateway does: one deadline for all attempts; the TimeoutError an attempt
    raises at it becomes the card's 504."""
    slow = card(timeouts={"request_s": 0.05})
    loop = asyncio.get_running_loop()
    with pytest.raises(RequestTimeoutError, match=r"0\.05 s"), request_deadline(slow) as deadline:
        assert deadline is not None and 0 < deadline - loop.time() <= 0.05
        for _ in range(3):  # three attempts, one budget
            async with asyncio.timeout_at(deadline):
                await asyncio.sleep(0.03)
    with request_deadline(None) as none:
        assert none is None


async def test_bounded_relay_uses_the_cards_chunk_limit() -> None:
    async def writes() -> AsyncIterator[bytes]:
        yield b"data: {}\n\n"
        await asyncio.sleep(1.0)
        yield b"data: late\n\n"

    stalled = writes()
    assert bounded_relay(None, stalled) is stalled
    out = [w async for w in bounded_relay(card(timeouts={"chunk_s": 0.1}), writes())]
    assert b"timeouts.chunk_s" in out[1] and out[1].endswith(SSE_DONE)


# ---- a replica's own HTTP path --------------------------------------------------------------


class SteppedEcho(EchoRunner):
    """The echo runner as a blocking runner whose steps take `step_s` (it stops a request's
    row when the request is cancelled, as every runner does)."""

    blocking = True

    def __init__(self, model_card: ModelCard, step_s: float) -> None:
        super().__init__(model_card, None)
        self.step_s = step_s
        self.steps = 0

    def generate(self, batch: Sequence[GenerationRequest]) -> Iterator[list[StepEntry]]:
        for step in super().generate(batch):
            time.sleep(self.step_s)
            self.steps += 1
            yield step


class FakeAgent:
    """The replica's fleet agent, minus heartbeats."""

    fingerprint = "local/zone/replica"

    def deregister(self) -> None:
        pass

    @asynccontextmanager
    async def observe(self) -> AsyncIterator[None]:
        yield


def replica(model_card: ModelCard, runner: SteppedEcho) -> ModelServer:
    server = ModelServer.__new__(ModelServer)  # __init__ needs Serve's replica context
    server.service = ModelService(model_card, runner, batcher=LocalBatcher(8, 0.0))
    server.fleet = FakeAgent()  # type: ignore[assignment]
    server._routes = OpenAIRoutes(server)
    server._peer_secret = None
    return server


def client(server: ModelServer) -> httpx.AsyncClient:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        response = await server(Request(scope, receive))
        await response(scope, receive, send)

    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://replica")


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.01)


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": WORDS}]} | fields


async def test_a_request_past_its_limit_gets_504_and_stops_generating() -> None:
    slow = card(timeouts={"request_s": 0.3})
    runner = SteppedEcho(slow, step_s=0.02)  # 400 tokens would take 8 s
    server = replica(slow, runner)
    async with client(server) as http:
        started = time.monotonic()
        reply = await http.post("/v1/chat/completions", json=chat(max_tokens=400))
    assert time.monotonic() - started < 3
    assert reply.status_code == 504
    assert reply.json() == {
        "error": {
            "message": "model 'm' did not answer within 0.3 s (the model card's "
            "timeouts.request_s); the request was cancelled",
            "type": "timeout",
            "param": None,
            "code": "request_timeout",
        }
    }
    await until(lambda: server.service.inflight == 0)
    steps = runner.steps
    await asyncio.sleep(10 * runner.step_s)
    assert runner.steps <= steps + 1 < 400  # the runner stopped with the request


async def test_a_stream_that_stalls_ends_with_a_timeout_event_then_done() -> None:
    slow = card(timeouts={"request_s": 5, "chunk_s": 0.1})
    runner = SteppedEcho(slow, step_s=0.3)  # every token later than chunk_s
    server = replica(slow, runner)
    async with client(server) as http:
        reply = await http.post("/v1/chat/completions", json=chat(max_tokens=400, stream=True))
    assert reply.status_code == 200
    events = [e for e in reply.content.split(b"\n\n") if e]
    assert events[-1] == SSE_DONE.strip()
    last = orjson.loads(events[-2].removeprefix(b"data: "))
    assert last["error"]["type"] == "timeout" and "timeouts.chunk_s" in last["error"]["message"]
    await until(lambda: server.service.inflight == 0)
    assert runner.steps < 10


async def test_requests_within_the_limit_are_untouched() -> None:
    quick = card(timeouts={"request_s": 5, "chunk_s": 1})
    server = replica(quick, SteppedEcho(quick, step_s=0.001))
    async with client(server) as http:
        reply = await http.post("/v1/chat/completions", json=chat(max_tokens=8))
        stream = await http.post("/v1/chat/completions", json=chat(max_tokens=8, stream=True))
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 8
    assert stream.status_code == 200 and stream.content.endswith(SSE_DONE)
    assert b'"error"' not in stream.content
