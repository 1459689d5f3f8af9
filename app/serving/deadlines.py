"""Per-request time limits (a card's `timeouts`): a unary call is cut off at its limit, a stream
waits at most so long for its first chunk and for each later one. Expiry cancels the awaiting
task, which stops the work below it (the service stops generating when its task is
cancelled), and surfaces as the caller's error (a 504 RequestTimeoutError)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from contextlib import aclosing, asynccontextmanager, contextmanager
from typing import Any, TypeVar

from app.api.errors import APIError, RequestTimeoutError, error_json
from app.api.sse import SSE_DONE
from app.catalog.cards import ModelCard

T = TypeVar("T")
# Builds the error for an expired limit: first=True for the whole request (or a stream's first
# chunk), False for a stream's later chunk.
TimeoutErrorFactory = Callable[[bool], APIError]


def timeout_error(card: ModelCard, first: bool) -> RequestTimeoutError:
    """The 504 for a request of `card`'s model that ran past a limit; it names the limit and
    the card field that sets it."""
    if first:
        return RequestTimeoutError(
            f"model {card.id!r} did not answer within {card.request_timeout_s:g} s (the model "
            "card's timeouts.request_s); the request was cancelled"
        )
    return RequestTimeoutError(
        f"model {card.id!r} sent nothing for {card.timeouts.chunk_s:g} s in the middle of the "
        "stream (the model card's timeouts.chunk_s); the stream was cancelled"
    )


@asynccontextmanager
async def time_limit(seconds: float | None, error: TimeoutErrorFactory) -> AsyncIterator[None]:
    """Run the block for at most `seconds` (None: no limit); past it, raise `error(True)`."""
    scope = asyncio.timeout(seconds)
    try:
        async with scope:
            yield
    except TimeoutError:
        if not scope.expired():
            raise  # not ours: some TimeoutError from inside the block
        raise error(True) from None


@contextmanager
def request_deadline(card: ModelCard | None) -> Iterator[float | None]:
    """A request's deadline (event loop time) from its card's timeouts.request_s, for a caller
    that makes several attempts (the gateway: failover, regions); a TimeoutError out of the
    block (the deadline passed, the call in flight cancelled) becomes the 504. No card (an
    unknown model, whose 404 comes next): no deadline."""
    if card is None:
        yield None
        return
    try:
        yield asyncio.get_running_loop().time() + card.request_timeout_s
    except TimeoutError as exc:
        raise timeout_error(card, first=True) from exc


def bounded_relay(card: ModelCard | None, writes: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Relayed SSE writes under `card`'s timeouts.chunk_s between writes (the first write is
    due by the request's deadline)."""
    if card is None:
        return writes
    return bounded_sse(
        writes, first_s=None, next_s=card.timeouts.chunk_s, error=lambda f: timeout_error(card, f)
    )


class _Watchdog:
    """Cancels the task that waits when a wait outlasts its limit. One timer per stream, moved
    lazily: arming a wait is a clock read, and the timer wakes at most about once per limit
    (earlier only when a wait has a shorter limit than the timer's).
    (An asyncio.timeout per chunk cost about 5 us a chunk, a sizeable share of an echo
    stream's whole cost.)"""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task: asyncio.Task[Any] | None = None
        self._due: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.expired = False

    def arm(self, limit: float | None) -> None:
        """The current task starts a wait of at most `limit` seconds (None: no limit)."""
        if limit is None:
            return
        # The task can change between waits (SSEStream reads the first chunk in the request's
        # task and the rest in its pump task).
        self._task = asyncio.current_task()
        self._due = self._loop.time() + limit
        if self._timer is not None and self._timer.when() > self._due:
            self._timer.cancel()  # a shorter limit than the last (a stream's later chunks)
            self._timer = None
        if self._timer is None:
            self._timer = self._loop.call_at(self._due, self._check)

    def disarm(self) -> None:
        self._due = None

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def uncancel(self) -> None:
        """Take back the cancellation this watchdog caused, once it has been handled."""
        if self._task is not None:
            self._task.uncancel()

    def _check(self) -> None:
        self._timer = None
        if self._due is None or self._task is None:
            return  # not waiting now; the next wait sets a timer again
        if self._loop.time() < self._due:
            self._timer = self._loop.call_at(self._due, self._check)
            return
        self.expired = True
        self._task.cancel()


async def bounded_stream(
    items: AsyncIterator[T],
    *,
    first_s: float | None,
    next_s: float | None,
    error: TimeoutErrorFactory,
) -> AsyncGenerator[T, None]:
    """`items`, waiting at most `first_s` for the first and `next_s` for each later one; past
    a limit, raise `error(first)`. The source is closed when this generator ends, however it
    ends, so its work stops."""
    watchdog = _Watchdog()
    limit, first = first_s, True
    try:
        while True:
            watchdog.arm(limit)
            try:
                item = await anext(items)
            except StopAsyncIteration:
                return
            except asyncio.CancelledError:
                if not watchdog.expired:
                    raise
                watchdog.uncancel()
                raise error(first) from None
            finally:
                watchdog.disarm()
            yield item
            limit, first = next_s, False
    finally:
        watchdog.close()
        close = getattr(items, "aclose", None)
        if close is not None:
            await close()


async def bounded_sse(
    writes: AsyncIterator[bytes],
    *,
    first_s: float | None,
    next_s: float | None,
    error: TimeoutErrorFactory,
) -> AsyncIterator[bytes]:
    """SSE writes bounded like bounded_stream. Before the first write an error raises (the
    client still gets an HTTP status); after it, the stream ends with the error as an event
    and [DONE], as a replica's own stream does, so the client never hangs."""
    started = False
    async with aclosing(
        bounded_stream(writes, first_s=first_s, next_s=next_s, error=error)
    ) as bounded:
        try:
            async for piece in bounded:
                started = True
                yield piece
        except APIError as exc:
            if not started:
                raise
            yield b"data: " + error_json(exc) + b"\n\n" + SSE_DONE
