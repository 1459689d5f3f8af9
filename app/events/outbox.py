"""An outbox for components that publish to the event bus from a hot loop (the fleet router's
health checks): events are queued in memory at once and sent in one batch later, off the loop;
if the store is away they wait for the next flush, and the oldest go first when the buffer is
full, so publishing never blocks or fails the component."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from app.events.bus import EventBus, EventType

logger = logging.getLogger(__name__)

Connect = Callable[[], Any]  # gives a KV client (app.kv.KVClient or a fake)


class Outbox:
    """Events waiting for the bus. `add` is cheap and never raises; `flush` (blocking: call it
    from a thread) publishes everything queued in one batch and keeps it on failure."""

    def __init__(
        self,
        connect: Connect,
        source: str,
        *,
        stream: str = "events",
        capacity: int = 1000,
        retry_s: float = 10.0,
    ) -> None:
        self._connect = connect
        # After a failed flush the store is not tried again for this long: a component that
        # flushes every health round must not spend its rounds reconnecting to a store that
        # is not running.
        self._retry_s = retry_s
        self._retry_at = 0.0
        self._source, self._stream = source, stream
        self._queued: deque[tuple[str, dict[str, Any]]] = deque(maxlen=capacity)
        self._bus: EventBus | None = None
        self._lock = threading.Lock()
        self.dropped = 0

    def add(self, type: EventType | str, data: dict[str, Any]) -> None:
        with self._lock:
            if len(self._queued) == self._queued.maxlen:
                self.dropped += 1  # the oldest goes: the store has been away a long time
            self._queued.append((str(type), data))

    def __len__(self) -> int:
        return len(self._queued)

    def flush(self) -> int:
        """Publish what is queued; returns how many went (0 when the store is unreachable, and
        then they are queued again, ahead of anything added meanwhile)."""
        if time.monotonic() < self._retry_at:
            return 0
        with self._lock:
            batch = list(self._queued)
            self._queued.clear()
        if not batch:
            return 0
        try:
            if self._bus is None:
                self._bus = EventBus(self._connect(), self._stream)
            self._bus.publish_batch([(t, data, self._source) for t, data in batch])
        except Exception as exc:  # the bus is optional to the publisher: retry later
            self._bus = None
            self._retry_at = time.monotonic() + self._retry_s
            with self._lock:
                newer = list(self._queued)
                self._queued.clear()
                for item in (*batch, *newer)[-(self._queued.maxlen or len(batch)) :]:
                    self._queued.append(item)
                self.dropped += max(0, len(batch) + len(newer) - len(self._queued))
            logger.debug("events not published yet (%d queued): %s", len(self._queued), exc)
            return 0
        return len(batch)


class Notice:
    """One event published at most every `every_s` however often it is noticed (a replica
    shedding load notices on every refused request; the bus hears of it once a minute), sent
    on a thread of its own so the noticer never waits on the store."""

    def __init__(
        self,
        outbox: Outbox,
        type: EventType | str,
        data: dict[str, Any],
        *,
        every_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        send: Callable[[Callable[[], int]], None] | None = None,
    ) -> None:
        self._outbox, self._type, self._data = outbox, type, data
        # How a flush is started: on a daemon thread (tests run it themselves).
        self._send = send or (lambda flush: threading.Thread(target=flush, daemon=True).start())
        self._every_s, self._clock = every_s, clock
        self._last: float | None = None
        self.count = 0  # noticed since the last event

    def notice(self) -> bool:
        """Count one occurrence; True when this one published the event."""
        self.count += 1
        now = self._clock()
        if self._last is not None and now - self._last < self._every_s:
            return False
        self._last = now
        self._outbox.add(self._type, self._data | {"count": self.count})
        self.count = 0
        self._send(self._outbox.flush)
        return True
