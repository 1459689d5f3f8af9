"""The service's async plumbing: LocalBatcher (serve.batch's behaviour outside a replica) and the
stream helpers that stop a request's other sequences when one fails or its caller goes away."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from app.serving.batching import END_OF_STREAM, LocalBatcher
from app.serving.streams import gather_all, merge_streams


async def test_local_batcher_batches_concurrent_calls_in_order() -> None:
    sizes: list[int] = []

    async def double(items: list[int]) -> list[int]:
        sizes.append(len(items))
        return [2 * item for item in items]

    call = LocalBatcher(max_batch_size=4, wait_timeout_s=0.05).wrap(double)
    assert await asyncio.gather(*(call(i) for i in range(6))) == [0, 2, 4, 6, 8, 10]
    assert sizes == [4, 2]
    assert await call(7) == 14  # a later call starts a new worker


async def test_local_batcher_streams_end_per_item_and_errors_fail_the_batch() -> None:
    async def count_to(items: list[int]) -> AsyncIterator[list[Any]]:
        for step in range(max(items) + 1):
            yield [step if step < item else END_OF_STREAM for item in items]
            if step == 5:
                raise RuntimeError("boom")

    call = LocalBatcher(8, 0.01).wrap_stream(count_to)

    async def drain(item: int) -> list[int]:
        return [value async for value in call(item)]

    short, long = await asyncio.gather(drain(3), drain(9), return_exceptions=True)
    assert short == [0, 1, 2]
    assert isinstance(long, RuntimeError)


async def test_local_batcher_leaves_out_callers_that_went_away() -> None:
    seen: list[list[str]] = []
    release = asyncio.Event()

    async def slow(items: list[str]) -> list[str]:
        seen.append(items)
        await release.wait()
        return items

    call = LocalBatcher(max_batch_size=1, wait_timeout_s=0.0).wrap(slow)
    first: asyncio.Task[str] = asyncio.create_task(call("first"))
    gone: asyncio.Task[str] = asyncio.create_task(call("gone"))
    await asyncio.sleep(0.01)
    gone.cancel()
    release.set()
    assert await first == "first"
    await asyncio.sleep(0.01)
    assert seen == [["first"]]


async def test_gather_all_cancels_the_rest_on_failure_and_on_cancellation() -> None:
    stopped: list[str] = []

    async def sleeper(name: str) -> str:
        try:
            await asyncio.sleep(10)
        finally:
            stopped.append(name)
        return name

    async def failing() -> str:
        await asyncio.sleep(0.01)
        raise ValueError("bad row")

    with pytest.raises(ValueError, match="bad row"):
        await gather_all([sleeper("a"), failing(), sleeper("b")])
    assert sorted(stopped) == ["a", "b"]  # stopped before the error reached the caller
    assert await gather_all([asyncio.sleep(0, result=1), asyncio.sleep(0, result=2)]) == [1, 2]
    stopped.clear()
    outer = asyncio.create_task(gather_all([sleeper("c"), sleeper("d")]))
    await asyncio.sleep(0.01)
    outer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await outer
    assert sorted(stopped) == ["c", "d"]


@pytest.mark.parametrize("count", [1, 3])
async def test_closing_a_merge_closes_every_stream(count: int) -> None:
    closed: list[int] = []

    async def endless(index: int) -> AsyncIterator[int]:
        try:
            while True:
                await asyncio.sleep(0.001)
                yield index
        finally:
            closed.append(index)

    merged = merge_streams([endless(i) for i in range(count)])
    await anext(merged)
    await merged.aclose()
    assert sorted(closed) == list(range(count))
