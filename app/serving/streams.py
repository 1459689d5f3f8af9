"""Async helpers for a request's several sequences: interleave their streams as items arrive, or
await them all. Either way, when one fails or the caller goes away, the others are stopped and
closed before control returns, so no sequence goes on decoding for nobody."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Sequence
from typing import Any, Generic, TypeVar

T = TypeVar("T")
S = TypeVar("S", bound=AsyncIterator[Any])
_DONE = object()


async def merge_streams(
    streams: Sequence[AsyncIterator[T]],
) -> AsyncGenerator[tuple[int, T], None]:
    """Yield (stream index, item) in arrival order; an error in any stream ends the merge.

    Closing the merge (aclose, or cancelling the task that iterates it) closes every stream.
    """
    if len(streams) == 1:  # the common case (n=1) needs no tasks or queue
        async with closing(streams[0]) as only:
            async for item in only:
                yield 0, item
        return
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[T]) -> None:
        try:
            async with closing(stream):
                async for item in stream:
                    await queue.put((index, item))
        except Exception as exc:
            await queue.put((index, exc))
            return
        await queue.put((index, _DONE))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is _DONE:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        await _stop(tasks)


async def gather_all(awaitables: Sequence[Awaitable[T]]) -> list[T]:
    """Every result in order. The first failure cancels the others and is raised once they have
    stopped; cancelling the caller cancels them all (asyncio.gather would leave them running)."""
    if len(awaitables) == 1:  # the common case (n=1): awaited here, cancelled with the caller
        return [await awaitables[0]]
    tasks = [asyncio.ensure_future(awaitable) for awaitable in awaitables]
    if not tasks:
        return []
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in tasks:
            error = task.exception() if task.done() and not task.cancelled() else None
            if error is not None:
                raise error
        return [task.result() for task in tasks]
    finally:
        await _stop(tasks)


async def _stop(tasks: Sequence[asyncio.Future[Any]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class closing(Generic[S]):
    """Close an async generator on the way out, whether it was exhausted or not: its cleanup
    (a sequence's cancellation, its admission slots) runs now, not when it is collected.
    Unlike contextlib.aclosing, any async iterator is accepted (one without aclose is left as
    it is)."""

    __slots__ = ("_stream",)

    def __init__(self, stream: S) -> None:
        self._stream = stream

    async def __aenter__(self) -> S:
        return self._stream

    async def __aexit__(self, *exc_info: object) -> None:
        aclose = getattr(self._stream, "aclose", None)
        if aclose is not None:
            await aclose()
