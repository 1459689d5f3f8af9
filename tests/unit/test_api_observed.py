"""What the HTTP routes record per inference request (app.api.observed), through a recorder whose
metrics keep what they were given, and the token counts a ModelService reports."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from app.api.http import OpenAIRoutes
from app.api.observed import RequestObserver, RouteLabels
from app.api.schemas import ChatCompletionRequest
from app.observability import metrics as catalogue
from app.observability.metrics import Base
from app.observability.recorder import Recorder, Sampler
from tests.unit.test_http import EchoBackend, chat

Records = dict[str, list[tuple[str, float, dict[str, str]]]]


class KeptMetric:
    """A metric that keeps each call (the part of ray.util.metrics the recorder uses)."""

    def __init__(self, name: str, records: Records) -> None:
        self.name, self.records = name, records

    def inc(self, value: float, tags: dict[str, str]) -> None:
        self.records[self.name].append(("inc", value, tags))

    def set(self, value: float, tags: dict[str, str]) -> None:
        self.records[self.name].append(("set", value, tags))

    def observe(self, value: float, tags: dict[str, str]) -> None:
        self.records[self.name].append(("observe", value, tags))


@pytest.fixture
def records() -> Records:
    return defaultdict(list)


@pytest.fixture
def recorder(records: Records) -> Recorder:
    return Recorder(
        enabled=lambda: True,
        factory=lambda d: KeptMetric(d.name, records),
        sampler=Sampler(autostart=False),
    )


def routes_for(backend: EchoBackend, recorder: Recorder) -> OpenAIRoutes:
    routes = OpenAIRoutes(backend)
    routes.observer = RequestObserver(RouteLabels.of(Base.MODEL, "eu", ["echo"]), recorder)
    return routes


@pytest.fixture
async def client(recorder: Recorder) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=routes_for(EchoBackend(), recorder).asgi)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c


def statuses(records: Records) -> list[tuple[str, str]]:
    return [(t["model"], t["status"]) for _, _, t in records[catalogue.HTTP_REQUESTS.name]]


async def test_a_unary_request_is_counted_with_its_status_and_latency(
    client: httpx.AsyncClient, records: Records
) -> None:
    assert (await client.post("/v1/chat/completions", json=chat())).status_code == 200
    [(_, _, tags)] = records[catalogue.HTTP_REQUESTS.name]
    assert tags == {"model": "echo", "region": "eu", "base": "model", "status": "200"}
    [(_, seconds, duration_tags)] = records[catalogue.HTTP_REQUEST_DURATION.name]
    assert seconds > 0 and duration_tags["stream"] == "false"
    assert not records[catalogue.STREAM_FIRST_TOKEN.name]


async def test_unknown_ids_and_unparsed_bodies_are_labelled_other(
    client: httpx.AsyncClient, records: Records
) -> None:
    assert (await client.post("/v1/chat/completions", json=chat(model="x" * 40))).status_code
    assert (await client.post("/v1/chat/completions", content=b"{not json")).status_code == 400
    assert ("other", "400") in statuses(records)
    assert all(model in {"echo", "other"} for model, _ in statuses(records))
    assert len(statuses(records)) == 2


async def test_a_stream_records_its_first_token_and_its_end(
    client: httpx.AsyncClient, records: Records
) -> None:
    reply = await client.post("/v1/chat/completions", json=chat(stream=True))
    assert reply.status_code == 200 and reply.text.endswith("data: [DONE]\n\n")
    assert len(records[catalogue.STREAM_FIRST_TOKEN.name]) == 1
    assert statuses(records) == [("echo", "200")]
    [(_, _, tags)] = records[catalogue.HTTP_REQUEST_DURATION.name]
    assert tags["stream"] == "true"


async def test_a_refusal_for_load_is_counted_as_one(recorder: Recorder, records: Records) -> None:
    backend = EchoBackend(max_ongoing=1)
    held = backend.chat_stream(ChatCompletionRequest.model_validate(chat(stream=True)))
    await anext(held)  # holds the only slot
    transport = httpx.ASGITransport(app=routes_for(backend, recorder).asgi)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        assert (await c.post("/v1/chat/completions", json=chat())).status_code == 429
    await held.aclose()
    [(_, _, tags)] = records[catalogue.REJECTIONS.name]
    assert tags["reason"] == "overloaded" and tags["model"] == "echo"
    assert statuses(records) == [("echo", "429")]


async def test_get_routes_record_nothing(client: httpx.AsyncClient, records: Records) -> None:
    assert (await client.get("/v1/models")).status_code == 200
    assert (await client.get("/healthz")).status_code == 200
    assert not records


async def test_the_service_reports_the_tokens_of_computed_answers_only() -> None:
    used: list[tuple[int, int]] = []
    backend = EchoBackend()
    backend.service._on_usage = lambda p, c: used.append((p, c))
    reply: dict[str, Any] = await backend.service.chat(ChatCompletionRequest.model_validate(chat()))
    usage = reply["usage"]
    assert used == [(usage["prompt_tokens"], usage["completion_tokens"])]
    stream = backend.service.chat_stream(ChatCompletionRequest.model_validate(chat(stream=True)))
    chunks = [chunk async for chunk in stream]
    assert len(used) == 2 and used[1][1] > 0 and chunks


async def test_a_refusal_for_load_is_told_to_the_overload_notice(
    recorder: Recorder, records: Records
) -> None:
    told: list[bool] = []
    backend = EchoBackend(max_ongoing=1)
    routes = OpenAIRoutes(backend)
    labels = RouteLabels.of(Base.MODEL, "eu", ["echo"])
    routes.observer = RequestObserver(labels, recorder, on_overload=lambda: told.append(True))
    held = backend.chat_stream(ChatCompletionRequest.model_validate(chat(stream=True)))
    await anext(held)
    transport = httpx.ASGITransport(app=routes.asgi)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        assert (await c.post("/v1/chat/completions", json=chat())).status_code == 429
        assert (await c.post("/v1/chat/completions", content=b"{")).status_code == 400
    await held.aclose()
    assert told == [True]  # the 429 only, not the bad request
