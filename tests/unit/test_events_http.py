"""app.events.http over ASGI on a bus in a fake KV store: SSE framing with `id:` = seq, type
filters (repeated and comma-separated), resuming with ?after= or Last-Event-ID, events that
arrive while streaming, and every stream ending by its timeout or limit."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import httpx
import orjson
import pytest

from app.events.bus import EventBus
from app.events.http import EventRoutes
from tests.unit.kv_fakes import FakeKV


@pytest.fixture
def bus() -> EventBus:
    kv = FakeKV()
    return EventBus(kv, clock=kv.clock)


def client(routes: EventRoutes) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=routes.asgi)
    return httpx.AsyncClient(transport=transport, base_url="http://t")


def routes_for(bus: EventBus, **options: Any) -> EventRoutes:
    return EventRoutes(lambda: bus, poll_s=0.01, **options)


def parse(text: str) -> list[dict[str, str]]:
    """SSE blocks as {field: value} (comments dropped)."""
    blocks = []
    for raw in text.split("\n\n"):
        fields = {}
        for line in raw.splitlines():
            if line and not line.startswith(":"):
                name, _, value = line.partition(": ")
                fields[name] = value
        if fields:
            blocks.append(fields)
    return blocks


def events_of(text: str) -> list[tuple[int, dict[str, Any]]]:
    return [(int(b["id"]), orjson.loads(b["data"])) for b in parse(text) if "data" in b]


def publish(bus: EventBus, *types: str) -> None:
    bus.publish_batch([(t, {"n": i}, "test") for i, t in enumerate(types)])


async def get(routes: EventRoutes, query: str, **headers: str) -> httpx.Response:
    async with client(routes) as c:
        return await c.get(f"/v1/events?{query}", headers=headers)


async def test_events_stream_as_sse_with_their_sequence_as_id(bus: EventBus) -> None:
    publish(bus, "job.started", "job.completed")
    r = await get(routes_for(bus), "after=0&timeout_s=0.2")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["cache-control"] == "no-cache"
    first, *_ = parse(r.text)
    assert first == {"retry": "1000", "id": "0"}  # resumes from the start if nothing came
    got = events_of(r.text)
    assert [seq for seq, _ in got] == [1, 2]
    assert got[1][1]["type"] == "job.completed" and got[1][1]["data"] == {"n": 1}
    assert set(got[0][1]) == {"seq", "type", "time", "source", "data", "id"}


@pytest.mark.parametrize("query", ["type=job.failed&type=node.left", "type=job.failed,node.left"])
async def test_type_filter(bus: EventBus, query: str) -> None:
    publish(bus, "job.started", "job.failed", "node.joined", "node.left")
    r = await get(routes_for(bus), f"after=0&timeout_s=0.2&{query}")
    assert [(seq, e["type"]) for seq, e in events_of(r.text)] == [
        (2, "job.failed"),
        (4, "node.left"),
    ]


async def test_resume_after_a_position_and_last_event_id_wins(bus: EventBus) -> None:
    publish(bus, "a", "b", "c")
    r = await get(routes_for(bus), "after=1&timeout_s=0.2")
    assert [seq for seq, _ in events_of(r.text)] == [2, 3]
    r = await get(routes_for(bus), "after=0&timeout_s=0.2", **{"Last-Event-ID": "2"})
    assert [seq for seq, _ in events_of(r.text)] == [3]


async def test_without_a_position_only_new_events_come(bus: EventBus) -> None:
    publish(bus, "old")

    def later() -> None:
        time.sleep(0.15)
        publish(bus, "new")

    threading.Thread(target=later, daemon=True).start()
    r = await get(routes_for(bus), "timeout_s=5&limit=1")
    assert parse(r.text)[0]["id"] == "1"  # the start: what the log held when it connected
    assert [(seq, e["type"]) for seq, e in events_of(r.text)] == [(2, "new")]


async def test_a_quiet_stream_ends_at_its_timeout_with_keepalives(bus: EventBus) -> None:
    started = time.monotonic()
    r = await get(routes_for(bus, heartbeat_s=0.05), "timeout_s=0.3")
    took = time.monotonic() - started
    assert 0.25 <= took < 3
    assert events_of(r.text) == []
    assert ": keep-alive" in r.text


async def test_the_timeout_is_capped(bus: EventBus) -> None:
    r = await get(routes_for(bus, max_timeout_s=0.2), "timeout_s=0.5")
    assert r.status_code == 400 and r.json()["error"]["param"] == "timeout_s"
    started = time.monotonic()
    await get(routes_for(bus, max_timeout_s=0.2), "")  # the default is capped too
    assert time.monotonic() - started < 3


async def test_limit_ends_the_stream(bus: EventBus) -> None:
    publish(bus, "a", "b", "c")
    r = await get(routes_for(bus), "after=0&limit=2&timeout_s=30")
    assert [seq for seq, _ in events_of(r.text)] == [1, 2]


@pytest.mark.parametrize(
    ("query", "headers", "param"),
    [
        ("after=-1", {}, "after"),
        ("after=x", {}, "after"),
        ("timeout_s=0", {}, "timeout_s"),
        ("timeout_s=nan", {}, "timeout_s"),
        ("limit=0", {}, "limit"),
        ("", {"Last-Event-ID": "abc"}, "Last-Event-ID"),
    ],
)
async def test_bad_parameters_are_400(
    bus: EventBus, query: str, headers: dict[str, str], param: str
) -> None:
    r = await get(routes_for(bus), query, **headers)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == param


async def test_an_unreachable_store_is_503_and_tried_again(bus: EventBus) -> None:
    tries: list[int] = []

    def make() -> EventBus:
        tries.append(1)
        if len(tries) == 1:
            raise ConnectionError("no KV cluster")
        return bus

    routes = EventRoutes(make, poll_s=0.01)
    r = await get(routes, "timeout_s=0.1")
    assert r.status_code == 503 and "Retry-After" in r.headers
    assert (await get(routes, "timeout_s=0.1")).status_code == 200


async def test_a_failing_read_ends_the_stream(bus: EventBus) -> None:
    publish(bus, "a")
    routes = routes_for(bus)
    calls = 0
    real = bus.read_page

    def flaky(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls > 1:
            raise ConnectionError("store gone")
        return real(*args, **kwargs)

    bus.read_page = flaky  # type: ignore[method-assign]
    r = await asyncio.wait_for(get(routes, "after=0&timeout_s=30"), 5)
    assert [seq for seq, _ in events_of(r.text)] == [1]
