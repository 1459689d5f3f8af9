"""GET /v1/events: the event bus as server-sent events, filtered by type, resumable from the
last event seen, each connection ended after a bounded time."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from app.api.errors import APIError, InvalidRequestError, ServiceUnavailableError
from app.api.http import error_response
from app.api.sse import SSE_HEADERS
from app.events.bus import BusKV, Event, EventBus
from app.events.follow import follow

logger = logging.getLogger(__name__)

PATH = "/v1/events"
DEFAULT_TIMEOUT_S = 60.0
MAX_TIMEOUT_S = 600.0  # keep below Serve's request timeout when one is set
HEARTBEAT_S = 15.0  # a comment line this often keeps proxies from closing a quiet stream
RETRY_MS = 1000  # how soon an EventSource reconnects after the stream ends
MAX_LIMIT = 100_000


@dataclass(frozen=True)
class EventQuery:
    """What a client asked for: types (None: all), the position to read after (None: from
    now on), how long to stream and how many events at most (None: no bound)."""

    types: frozenset[str] | None
    after: int | None
    timeout_s: float
    limit: int | None


def parse_query(request: Request, max_timeout_s: float = MAX_TIMEOUT_S) -> EventQuery:
    """`?type=` (repeatable, or comma-separated), `?after=N` or the `Last-Event-ID` header
    (a reconnecting EventSource sends it; it wins over `after`), `?timeout_s=` and `?limit=`;
    400 naming the parameter when one is malformed."""
    params = request.query_params
    types = {t.strip() for raw in params.getlist("type") for t in raw.split(",") if t.strip()}
    resume = request.headers.get("last-event-id")
    after = _number(resume, "Last-Event-ID", int, 0, None) if resume else None
    if after is None and params.get("after") is not None:
        after = _number(params["after"], "after", int, 0, None)
    timeout_s = DEFAULT_TIMEOUT_S
    if params.get("timeout_s") is not None:
        timeout_s = _number(params["timeout_s"], "timeout_s", float, 0.0, max_timeout_s)
    limit = None
    if params.get("limit") is not None:
        limit = _number(params["limit"], "limit", int, 1, MAX_LIMIT)
    return EventQuery(frozenset(types) or None, after, min(timeout_s, max_timeout_s), limit)


def _number(
    raw: str, name: str, kind: type[int] | type[float], low: float, high: float | None
) -> Any:
    """`raw` as an int or float in low..high (a float must be above `low`); else a 400."""
    try:
        value: float | None = kind(raw)
    except ValueError:
        value = None
    fits = value is not None and (value > low if kind is float else value >= low)
    if not fits or (high is not None and value is not None and value > high):
        bounds = f"in {low}..{high}" if high is not None else f">= {low}"
        raise InvalidRequestError(f"{name} must be a number {bounds}", param=name)
    return value


def encode(event: Event) -> bytes:
    """One SSE event: `id:` its sequence number, `data:` the event as JSON."""
    return b"id: %d\ndata: %s\n\n" % (event.seq, orjson.dumps(event.to_dict()))


def preamble(start: int) -> bytes:
    """The reconnection delay, and the start position as the last event id (an `id:` with no
    data sets it in an EventSource), so a client that reconnects before any event arrives
    resumes here rather than from 'now'."""
    return b"retry: %d\nid: %d\n\n" % (RETRY_MS, start)


class EventRoutes:
    """`await routes(request)` answers GET /v1/events; the caller authenticates (admin).
    `bus()` gives the EventBus (called in a thread, once it succeeds: it may connect)."""

    def __init__(
        self,
        bus: Callable[[], EventBus],
        *,
        poll_s: float = 1.0,
        heartbeat_s: float = HEARTBEAT_S,
        max_timeout_s: float = MAX_TIMEOUT_S,
    ) -> None:
        self._make_bus = bus
        self._bus: EventBus | None = None
        self._lock = threading.Lock()
        self.poll_s = poll_s
        self.heartbeat_s = heartbeat_s
        self.max_timeout_s = max_timeout_s

    async def __call__(self, request: Request) -> Response:
        query = parse_query(request, self.max_timeout_s)
        bus = await asyncio.to_thread(self.bus)
        start = query.after
        if start is None:
            start = await asyncio.to_thread(bus.last_seq)
        writes = self.writes(bus, start, query)
        return StreamingResponse(writes, media_type="text/event-stream", headers=SSE_HEADERS)

    async def asgi(self, scope: Any, receive: Any, send: Any) -> None:
        """The route as a plain ASGI app (tests; hosting without the gateway), no auth."""
        try:
            response = await self(Request(scope, receive))
        except APIError as exc:
            response = error_response(exc)
        await response(scope, receive, send)

    def bus(self) -> EventBus:
        with self._lock:
            if self._bus is None:
                try:
                    self._bus = self._make_bus()
                    self._bus.last_seq()  # reachable now, or a 503 before the stream starts
                except APIError:
                    self._bus = None
                    raise
                except Exception as exc:
                    self._bus = None
                    raise ServiceUnavailableError(
                        f"the event store is not reachable: {exc}", retry_after_s=5
                    ) from exc
            return self._bus

    async def writes(self, bus: EventBus, start: int, query: EventQuery) -> AsyncIterator[bytes]:
        """The stream's writes until `timeout_s` passes, `limit` events are sent, or reading
        fails (logged; the client resumes from its last event id)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + query.timeout_s
        events = follow(bus, start, query.types, self.poll_s)
        pending: asyncio.Future[Event] | None = None
        sent = 0
        yield preamble(start)
        try:
            while (left := deadline - loop.time()) > 0:
                if pending is None:
                    pending = asyncio.ensure_future(anext(events))
                done, _ = await asyncio.wait({pending}, timeout=min(left, self.heartbeat_s))
                if not done:
                    if deadline - loop.time() > 0:
                        yield b": keep-alive\n\n"
                    continue
                event, pending = pending.result(), None
                yield encode(event)
                sent += 1
                if query.limit is not None and sent >= query.limit:
                    return
        except Exception:
            logger.warning("event stream after %d ended early", start, exc_info=True)
        finally:
            await _close(pending, events)


async def _close(pending: asyncio.Future[Event] | None, events: AsyncIterator[Event]) -> None:
    """Stop the read in flight, then the follower (a generator cannot close mid-step)."""
    if pending is not None and not pending.done():
        pending.cancel()
    if pending is not None:
        with contextlib.suppress(BaseException):
            await pending
    closer = getattr(events, "aclose", None)
    if closer is not None:
        with contextlib.suppress(Exception):
            await closer()


def event_routes(connect: Callable[[], BusKV], stream: str = "events") -> EventRoutes:
    """EventRoutes over the region's KV store (`connect` gives a KV client)."""
    return EventRoutes(lambda: EventBus(connect(), stream))
