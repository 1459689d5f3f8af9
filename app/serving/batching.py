"""Batchers: turn a function over a list of items into a function of one item, batching the calls
that arrive together. Replicas use Serve's (`serve.batch`); `LocalBatcher` runs a service outside
a replica, where serve.batch cannot start (it reads the replica's context)."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, cast

from ray import serve

from app.serving.streams import closing

T = TypeVar("T")
R = TypeVar("R")

BatchFunc = Callable[[list[T]], Awaitable[list[R]]]
StreamBatchFunc = Callable[[list[T]], AsyncIterator[list[Any]]]

# What a streaming batch function puts in an item's place once that item has no more values
# (serve.batch's convention).
END_OF_STREAM: Any = StopIteration


class Batcher(ABC):
    """Makes per-item callables from batch functions; each call of wrap* is its own queue.

    A streaming batch function yields, per step, one entry per item: a value for that item, or
    END_OF_STREAM once the item is done. Items whose callers went away before their batch began
    are left out of it; items in a running batch are the batch function's business.
    """

    def __init__(self, max_batch_size: int, wait_timeout_s: float) -> None:
        self.max_batch_size = max_batch_size
        self.wait_timeout_s = wait_timeout_s

    @abstractmethod
    def wrap(self, func: BatchFunc[T, R]) -> Callable[[T], Coroutine[Any, Any, R]]: ...

    @abstractmethod
    def wrap_stream(self, func: StreamBatchFunc[T]) -> Callable[[T], AsyncGenerator[Any, None]]: ...


class ServeBatcher(Batcher):
    """serve.batch: its queue, batch metrics and settings, inside a Serve replica."""

    def _decorator(self) -> Callable[[Callable[..., Any]], Any]:
        return serve.batch(
            max_batch_size=self.max_batch_size, batch_wait_timeout_s=self.wait_timeout_s
        )

    def wrap(self, func: BatchFunc[T, R]) -> Callable[[T], Coroutine[Any, Any, R]]:
        return cast(Callable[[T], Coroutine[Any, Any, R]], self._decorator()(func))

    def wrap_stream(self, func: StreamBatchFunc[T]) -> Callable[[T], AsyncGenerator[Any, None]]:
        return cast(Callable[[T], AsyncGenerator[Any, None]], self._decorator()(func))


@dataclass
class _Item(Generic[T]):
    value: T
    outbox: asyncio.Queue[tuple[bool, Any]] = field(default_factory=asyncio.Queue)
    abandoned: bool = False


class LocalBatcher(Batcher):
    """An asyncio batch queue with serve.batch's behaviour: one batch runs at a time, a batch
    waits up to wait_timeout_s to fill, an error in the batch function fails the whole batch."""

    def wrap(self, func: BatchFunc[T, R]) -> Callable[[T], Coroutine[Any, Any, R]]:
        async def stream_one(items: list[T]) -> AsyncIterator[list[Any]]:
            yield list(await func(items))

        per_item = self.wrap_stream(stream_one)

        async def call(value: T) -> R:
            async with closing(per_item(value)) as results:
                async for result in results:
                    return cast(R, result)
            raise RuntimeError("the batch function returned no result")

        return call

    def wrap_stream(self, func: StreamBatchFunc[T]) -> Callable[[T], AsyncGenerator[Any, None]]:
        pending: asyncio.Queue[_Item[T]] = asyncio.Queue()
        worker: list[asyncio.Task[None]] = []

        async def call(value: T) -> AsyncGenerator[Any, None]:
            item = _Item(value)
            pending.put_nowait(item)
            # The worker runs while items are waiting and ends when none are, so no task
            # outlives the calls (or the event loop).
            if not worker or worker[0].done():
                worker[:] = [asyncio.create_task(self._serve(func, pending))]
            try:
                while True:
                    is_error, result = await item.outbox.get()
                    if is_error:
                        raise result
                    if result is END_OF_STREAM:
                        return
                    yield result
            finally:
                item.abandoned = True

        return call

    async def _serve(self, func: StreamBatchFunc[T], pending: asyncio.Queue[_Item[T]]) -> None:
        loop = asyncio.get_running_loop()
        while not pending.empty():
            batch = [pending.get_nowait()]
            deadline = loop.time() + self.wait_timeout_s
            while len(batch) < self.max_batch_size:
                if not pending.empty():
                    batch.append(pending.get_nowait())
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(pending.get(), remaining))
                except TimeoutError:
                    break
            batch = [item for item in batch if not item.abandoned]
            if batch:
                await self._run(func, batch)

    @staticmethod
    async def _run(func: StreamBatchFunc[T], batch: list[_Item[T]]) -> None:
        done = [False] * len(batch)
        try:
            async for results in func([item.value for item in batch]):
                if len(results) != len(batch):
                    raise RuntimeError("the batch function changed the batch size")
                for i, (item, result) in enumerate(zip(batch, results, strict=True)):
                    if not done[i]:
                        done[i] = result is END_OF_STREAM
                        item.outbox.put_nowait((False, result))
        except Exception as exc:
            for i, item in enumerate(batch):
                if not done[i]:
                    done[i] = True
                    item.outbox.put_nowait((True, exc))
        for i, item in enumerate(batch):
            if not done[i]:
                item.outbox.put_nowait((False, END_OF_STREAM))
