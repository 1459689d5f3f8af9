"""Auto-pipelining for the asyncio client: concurrent multi-key reads of one primary share calls.

One Ray actor call costs about as much as a whole 100-key read on the shard, so under
concurrency the client, not the shard, sets the pace. The asyncio client therefore keeps at most
`depth` strong multi-key reads in flight per primary; reads that arrive meanwhile wait and go
out together as one call when one returns (the idea of ioredis' auto-pipelining). A lone read
is sent at once, so latency without concurrency is unchanged. Depth 1 measured best on a
2-core machine with 8 reads in flight (172k keys/s against 142k at depth 2 and 85k without).
Every read is still answered by the primary, after it was issued and before it returns, so
strong reads stay linearizable.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class ReadMany:
    """A strong read of `keys` from one primary, submitted by whichever driver runs the op."""

    primary: Any
    keys: list[str]

    def submit(self) -> Any:
        return self.primary.mget.remote(self.keys)


@dataclass
class _Lane:
    """Reads of one primary: calls in flight, and the reads waiting to go out together.
    Reads wait only while `depth` calls are in flight; the call that returns sends them."""

    inflight: int = 0
    waiting: list[tuple[list[str], asyncio.Future[list[Any]]]] = field(default_factory=list)


async def _actor_mget(primary: Any, keys: list[str]) -> list[Any]:
    reply: list[Any] = await primary.mget.remote(keys)
    return reply


class ReadPipeline:
    """Merges concurrent ReadMany requests per primary (one instance per event loop).
    `mget(primary, keys)` makes one call: a Ray actor call by default."""

    def __init__(
        self,
        depth: int = 1,
        mget: Callable[[Any, list[str]], Awaitable[list[Any]]] = _actor_mget,
    ) -> None:
        self.depth = depth
        self._mget = mget
        self._lanes: dict[Any, _Lane] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def read(self, request: ReadMany) -> list[Any]:
        lane = self._lanes.setdefault(request.primary, _Lane())
        if lane.inflight < self.depth:
            lane.inflight += 1
            return await self._call(request.primary, lane, request.keys)
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        lane.waiting.append((request.keys, future))
        return await future

    async def _call(self, primary: Any, lane: _Lane, keys: list[str]) -> list[Any]:
        """One mget call, already counted in `lane.inflight`."""
        try:
            return await self._mget(primary, keys)
        finally:
            lane.inflight -= 1
            if lane.waiting:
                waiting, lane.waiting = lane.waiting, []
                lane.inflight += 1
                task = asyncio.get_running_loop().create_task(self._merged(primary, lane, waiting))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _merged(
        self, primary: Any, lane: _Lane, waiting: list[tuple[list[str], asyncio.Future[list[Any]]]]
    ) -> None:
        keys = [key for batch, _ in waiting for key in batch]
        try:
            reply = await self._call(primary, lane, keys)
        except Exception as exc:  # each waiting read sees the failure and retries on its own
            for _, future in waiting:
                if not future.done():
                    future.set_exception(exc)
            return
        start = 0
        for batch, future in waiting:
            if not future.done():
                future.set_result(reply[start : start + len(batch)])
            start += len(batch)
