"""The static engine: serve.batch gathers requests for up to batching.wait_timeout_s, and each
batch decodes in lock step (TextGenerationRunner.generate) until its last row ends. A request
that arrives meanwhile waits for the next batch. Runners with no compute (echo) run inline on
the event loop instead, since batching them would only add queueing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from functools import cached_property
from typing import Any

from app.catalog.engine import EngineKind
from app.serving.batching import END_OF_STREAM, Batcher
from app.serving.engines.base import Engine, EngineStats, final
from app.serving.runners.base import GenerationRequest, StepEntry, TextGenerationRunner
from app.serving.streams import closing

# A runner with no compute (echo) runs on the event loop; it gives the loop back this often.
INLINE_STEPS_PER_YIELD = 16


class StaticEngine(Engine):
    kind = EngineKind.STATIC

    def __init__(
        self,
        runner: TextGenerationRunner,
        batcher: Batcher,
        on_batch: Callable[[int], None] = lambda size: None,
    ) -> None:
        self.runner = runner
        self._batcher = batcher
        self._on_batch = on_batch
        self._streams = 0  # requests between arrival and their last entry
        self._running = 0  # rows of the batch decoding now

    # Made on first use: serve.batch needs a replica context (see app.serving.batching).
    @cached_property
    def _batched(self) -> Callable[[GenerationRequest], AsyncIterator[StepEntry]]:
        return self._batcher.wrap_stream(self._decode_batch)

    def stats(self) -> EngineStats:
        return EngineStats(self.kind.value, max(self._streams - self._running, 0), self._running)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[StepEntry]:
        self._streams += 1
        try:
            entries = self._batched(request) if self.runner.blocking else self._inline(request)
            async with closing(entries):
                async for entry in entries:
                    yield entry
        finally:
            self._streams -= 1

    async def _decode_batch(self, batch: list[GenerationRequest]) -> AsyncIterator[list[Any]]:
        self._on_batch(len(batch))
        self._running = len(batch)
        try:
            steps = await asyncio.to_thread(self.runner.generate, batch)  # tokenises prompts
            finished = [False] * len(batch)
            while True:
                step = await asyncio.to_thread(next, steps, None)
                if step is None:
                    return
                out: list[Any] = []
                for i, entry in enumerate(step):
                    out.append(END_OF_STREAM if finished[i] else entry)
                    # A cancelled sequence's reader has gone: end its stream, do not feed it.
                    finished[i] = finished[i] or final(entry) or batch[i].cancel.is_set()
                self._running = finished.count(False)
                yield out
        finally:
            self._running = 0

    async def _inline(self, request: GenerationRequest) -> AsyncIterator[StepEntry]:
        """Unbatched, on the event loop: with no model compute to amortise, batching would only
        add queueing."""
        for count, (entry,) in enumerate(self.runner.generate([request]), 1):
            yield entry
            if count % INLINE_STEPS_PER_YIELD == 0:
                await asyncio.sleep(0)  # let other requests, and a cancellation, in
