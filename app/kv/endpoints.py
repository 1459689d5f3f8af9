"""Client-side bookkeeping of the direct transport: which members take direct calls, and
where (EndpointBook), and the idle connections kept for reuse (Pool)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from app.kv.direct_server import Endpoint
from app.kv.tls import TransportTLS

log = logging.getLogger(__name__)

# An idle connection older than this is closed rather than reused: a NAT or firewall between
# nodes may have dropped it silently, and a call sent on it would wait out the call timeout.
MAX_IDLE_S = 60.0
MAX_IDLE_PER_ENDPOINT = 32
MAX_HOLD_S = 300.0

C = TypeVar("C")


class Pool(Generic[C]):
    """Idle connections per endpoint, newest reused first; thread-safe."""

    def __init__(self, close: Callable[[C], None], clock: Callable[[], float] = time.monotonic):
        self._close = close
        self._clock = clock
        self._lock = threading.Lock()
        self._idle: dict[Endpoint, list[tuple[C, float]]] = {}

    def take(self, endpoint: Endpoint) -> C | None:
        stale: list[C] = []
        found: C | None = None
        with self._lock:
            idle = self._idle.get(endpoint)
            oldest = self._clock() - MAX_IDLE_S
            while idle:
                conn, released = idle.pop()
                if released >= oldest:
                    found = conn
                    break
                stale.append(conn)
            if idle:  # whatever is older than the one found is stale as well
                stale.extend(c for c, released in idle if released < oldest)
                idle[:] = [(c, released) for c, released in idle if released >= oldest]
        for conn in stale:
            self._safe_close(conn)
        return found

    def _safe_close(self, conn: C) -> None:
        try:
            self._close(conn)
        except Exception:  # one connection that will not close must not keep the rest open
            log.debug("closing a kv direct connection failed", exc_info=True)

    def give(self, endpoint: Endpoint, conn: C) -> None:
        with self._lock:
            idle = self._idle.setdefault(endpoint, [])
            pooled = len(idle) < MAX_IDLE_PER_ENDPOINT
            if pooled:
                idle.append((conn, self._clock()))
        if not pooled:
            self._safe_close(conn)

    def drop(self, endpoint: Endpoint | None = None) -> None:
        """Close the idle connections of `endpoint` (of every endpoint when None)."""
        with self._lock:
            if endpoint is None:
                dropped = [c for idle in self._idle.values() for c, _ in idle]
                self._idle = {}
            else:
                dropped = [c for c, _ in self._idle.pop(endpoint, [])]
        for conn in dropped:
            self._safe_close(conn)

    def __len__(self) -> int:
        with self._lock:
            return sum(len(idle) for idle in self._idle.values())


class EndpointBook:
    """Which members take direct calls, and where: each endpoint is asked of its member once
    (a Ray call). A member without one, or whose connection just failed, is left to Ray calls
    for a while before it is tried again (it may have been replaced at a new port): 2 s after a
    first failure, doubling with each failure in a row up to 5 min, so a member the network
    does not let us reach (a firewall) costs a stalled connect rarely, not every 2 s."""

    def __init__(self, retry_after_s: float, tls: TransportTLS) -> None:
        self._retry_after = retry_after_s
        self.tls = tls
        self._endpoints: dict[Any, tuple[Endpoint | None, float]] = {}
        self._strikes: dict[Any, int] = {}
        self.calls = 0
        self.fallbacks = 0

    def known(self, handle: Any) -> tuple[bool, Endpoint | None]:
        """(True, endpoint or None) when the book has an answer, (False, None) to ask."""
        cached = self._endpoints.get(handle)
        if cached is not None and (cached[0] is not None or time.monotonic() < cached[1]):
            return True, cached[0]
        return False, None

    def learned(self, handle: Any, endpoint: Endpoint | None) -> Endpoint | None:
        """Record what `handle` answered; returns the endpoint to use (None: use Ray)."""
        if endpoint is not None and not self.speaks(endpoint):
            endpoint = None
        self._endpoints[handle] = (endpoint, time.monotonic() + self._retry_after)
        return endpoint

    def speaks(self, endpoint: Endpoint) -> bool:
        """Whether this client may connect to `endpoint`: with TLS exactly when its own
        settings require TLS (and it could load them), so neither side downgrades the other."""
        return self.tls.usable and endpoint.tls == (self.tls.client is not None)

    def failed(self, handle: Any) -> None:
        self.fallbacks += 1
        strikes = self._strikes.get(handle, 0) + 1
        self._strikes[handle] = strikes
        hold = min(self._retry_after * 2 ** (strikes - 1), MAX_HOLD_S)
        self._endpoints[handle] = (None, time.monotonic() + hold)

    def answered(self, handle: Any) -> None:
        if self._strikes:
            self._strikes.pop(handle, None)
