"""Sequences through a text-generation runner: batched into it (or run inline when the runner has
no compute to batch), one stream of deltas per sequence, and stopped when its reader goes away.

A sequence's runner request carries a cancel event. It is set when the task awaiting the
sequence is cancelled or its stream is closed, which is what Serve does when a client
disconnects; the runner drops the sequence at its next decode step while its batch neighbours
go on. A sequence that fails on its own (a RowError) fails only its own stream.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from functools import cached_property
from typing import Any, ParamSpec, TypeVar

from app.api.errors import APIError, InternalError, InvalidRequestError
from app.serving.batching import END_OF_STREAM, Batcher
from app.serving.runners.base import (
    GenerationCancelled,
    GenerationRequest,
    RowError,
    StepEntry,
    TextGenerationRunner,
    TokenDelta,
)
from app.serving.streams import closing

P = ParamSpec("P")
R = TypeVar("R")

# A runner with no compute (echo) runs on the event loop; it gives the loop back this often.
INLINE_STEPS_PER_YIELD = 16
# Tokeniser and chat-template calls on longer inputs run in a worker thread, so one long prompt
# does not stall the other requests on the replica's event loop.
INLINE_TOKENIZE_CHARS = 4096


class SequenceDecoder:
    """Decodes sequences for one replica; counts the tokens it generates."""

    def __init__(
        self,
        runner: TextGenerationRunner,
        batcher: Batcher,
        on_batch: Callable[[int], None] = lambda size: None,
    ) -> None:
        self.runner = runner
        self._batcher = batcher
        self._on_batch = on_batch
        self.generated_tokens = 0

    # Made on first use: serve.batch needs a replica context (see app.serving.batching).
    @cached_property
    def _batched(self) -> Callable[[GenerationRequest], AsyncIterator[StepEntry]]:
        return self._batcher.wrap_stream(self._decode_batch)

    async def _decode_batch(self, batch: list[GenerationRequest]) -> AsyncIterator[list[Any]]:
        self._on_batch(len(batch))
        steps = await asyncio.to_thread(self.runner.generate, batch)  # it tokenises the prompts
        finished = [False] * len(batch)
        while True:
            step = await asyncio.to_thread(next, steps, None)
            if step is None:
                return
            out: list[Any] = []
            for i, entry in enumerate(step):
                out.append(END_OF_STREAM if finished[i] else entry)
                # A cancelled sequence's reader has gone: end its stream rather than feed it.
                finished[i] = finished[i] or _final(entry) or batch[i].cancel.is_set()
            yield out

    async def _inline(self, request: GenerationRequest) -> AsyncIterator[StepEntry]:
        """Unbatched, on the event loop: with no model compute to amortise, batching would only
        add queueing."""
        for count, (entry,) in enumerate(self.runner.generate([request]), 1):
            yield entry
            if count % INLINE_STEPS_PER_YIELD == 0:
                await asyncio.sleep(0)  # let other requests, and a cancellation, in

    async def deltas(self, request: GenerationRequest) -> AsyncGenerator[TokenDelta, None]:
        """One sequence's deltas. However this ends (finished, failed, cancelled, closed), the
        request's cancel event is set, so the runner stops decoding it at its next step."""
        stream = self._batched(request) if self.runner.blocking else self._inline(request)
        try:
            async with closing(stream):
                async for entry in stream:
                    if isinstance(entry, RowError):
                        raise entry.error
                    if entry is not None:
                        self.generated_tokens += entry.tokens
                        yield entry
        except Exception as exc:
            error = runner_failure(exc, "generation")
            if error is exc:
                raise
            raise error from exc
        finally:
            request.cancel.set()

    async def collect(self, request: GenerationRequest) -> tuple[str, int, str]:
        """A sequence's whole completion: text, tokens and finish reason."""
        text, tokens, finish = [], 0, "stop"
        async with closing(self.deltas(request)) as deltas:
            async for delta in deltas:
                text.append(delta.text)
                tokens += delta.tokens
                finish = delta.finish_reason or finish
        return "".join(text), tokens, finish


def _final(entry: StepEntry) -> bool:
    """Whether a step entry is its sequence's last."""
    return isinstance(entry, RowError) or (
        isinstance(entry, TokenDelta) and entry.finish_reason is not None
    )


def runner_failure(exc: Exception, what: str) -> Exception:
    """What a client sees for a runner's failure: API errors (and a cancellation) as they are,
    a ValueError (a request the runner cannot serve) as a 400, anything else as a 500."""
    if isinstance(exc, APIError | GenerationCancelled):
        return exc
    if isinstance(exc, ValueError):
        return InvalidRequestError(str(exc))
    return InternalError(f"{what} failed: {type(exc).__name__}: {exc}")


async def tokenizer_call(chars: int, func: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """A tokeniser call on `chars` characters: inline when short, else in a worker thread."""
    if chars <= INLINE_TOKENIZE_CHARS:
        return func(*args, **kwargs)
    return await asyncio.to_thread(func, *args, **kwargs)
