"""Auto-pipelining of concurrent multi-key reads (app.kv.pipeline), with a fake primary."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from app.kv.pipeline import ReadMany, ReadPipeline


class FakeMget:
    """Stands in for an actor method: each call returns a future the test resolves."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], asyncio.Future[Any]]] = []

    def remote(self, keys: list[str]) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.calls.append((list(keys), future))
        return future

    def answer(self, i: int) -> None:
        keys, future = self.calls[i]
        future.set_result([f"v-{k}" for k in keys])


class FakePrimary:
    def __init__(self) -> None:
        self.mget = FakeMget()


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_lone_read_goes_out_at_once() -> None:
    primary, pipeline = FakePrimary(), ReadPipeline(depth=1)
    read = asyncio.ensure_future(pipeline.read(ReadMany(primary, ["a", "b"])))
    await _settle()
    assert [keys for keys, _ in primary.mget.calls] == [["a", "b"]]
    primary.mget.answer(0)
    assert await read == ["v-a", "v-b"]


async def test_reads_waiting_behind_a_full_lane_share_one_call() -> None:
    primary, pipeline = FakePrimary(), ReadPipeline(depth=1)
    first = asyncio.ensure_future(pipeline.read(ReadMany(primary, ["a"])))
    await _settle()
    second = asyncio.ensure_future(pipeline.read(ReadMany(primary, ["b", "c"])))
    third = asyncio.ensure_future(pipeline.read(ReadMany(primary, ["d"])))
    await _settle()
    assert len(primary.mget.calls) == 1  # the lane is full: b, c and d wait
    primary.mget.answer(0)
    await _settle()
    assert [keys for keys, _ in primary.mget.calls] == [["a"], ["b", "c", "d"]]
    primary.mget.answer(1)
    assert await first == ["v-a"]
    assert await second == ["v-b", "v-c"] and await third == ["v-d"]


async def test_lanes_are_per_primary() -> None:
    one, two, pipeline = FakePrimary(), FakePrimary(), ReadPipeline(depth=1)
    reads = [asyncio.ensure_future(pipeline.read(ReadMany(p, ["k"]))) for p in (one, two)]
    await _settle()
    assert len(one.mget.calls) == len(two.mget.calls) == 1
    one.mget.answer(0)
    two.mget.answer(0)
    assert await asyncio.gather(*reads) == [["v-k"], ["v-k"]]


async def test_a_failed_merged_call_fails_every_read_in_it() -> None:
    primary, pipeline = FakePrimary(), ReadPipeline(depth=1)
    first = asyncio.ensure_future(pipeline.read(ReadMany(primary, ["a"])))
    await _settle()
    waiting = [asyncio.ensure_future(pipeline.read(ReadMany(primary, [k]))) for k in "bc"]
    await _settle()
    primary.mget.answer(0)
    await _settle()
    primary.mget.calls[1][1].set_exception(ConnectionError("primary died"))
    assert await first == ["v-a"]
    for read in waiting:
        with pytest.raises(ConnectionError):
            await read
    # The lane is free again afterwards.
    again = asyncio.ensure_future(pipeline.read(ReadMany(primary, ["e"])))
    await _settle()
    primary.mget.answer(2)
    assert await again == ["v-e"]
