"""follow: an async iterator over a stream's new events, for `GET /v1/events` (SSE) and
`app events tail`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Collection

from app.events.bus import Event, EventBus

MAX_SCAN = 10_000  # numbers one read may pass over while filtering by type


async def follow(
    bus: EventBus,
    after_seq: int | None = None,
    types: Collection[str] | None = None,
    poll_s: float = 1.0,
    *,
    limit: int = 100,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> AsyncIterator[Event]:
    """Events after `after_seq` (None: from now on), of `types` when given, in order, forever.

    The bus's calls block, so each runs in a worker thread, off the event loop; after a
    short page it waits `poll_s` before asking again."""
    pos = await asyncio.to_thread(bus.last_seq) if after_seq is None else after_seq
    while True:
        before = pos
        events, pos = await asyncio.to_thread(
            bus.read_page, pos, limit=limit, types=types, max_scan=MAX_SCAN
        )
        for event in events:
            yield event
        if len(events) < limit and pos - before < MAX_SCAN:  # caught up: wait for more
            await sleep(poll_s)
