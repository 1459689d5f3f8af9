"""The engine seam: how a replica turns text-generation requests into per-step deltas.

An engine streams one request's step entries (TokenDelta, RowError or None, see
TextGenerationRunner.generate); app.serving.decoding turns them into a sequence's deltas and
errors. `static` batches requests with serve.batch and decodes each batch in lock step;
`continuous` schedules per iteration (app.serving.engines.continuous).
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from typing import ClassVar, ParamSpec, TypeVar

from app.autoscaling.report import ReplicaMetric
from app.catalog.engine import EngineKind
from app.serving.runners.base import GenerationRequest, RowError, StepEntry, TokenDelta

P = ParamSpec("P")
R = TypeVar("R")

# Tokeniser and chat-template calls on longer inputs run in a worker thread, so one long prompt
# does not stall the other requests on the replica's event loop.
INLINE_TOKENIZE_CHARS = 4096


@dataclass(frozen=True)
class EngineStats:
    """What an engine tells the router and the autoscaler about its load."""

    engine: str
    queued: int  # sequences waiting to start decoding
    running: int  # sequences decoding
    kv_cache_utilization: float | None = None  # share of the KV budget the batch may fill
    kv_cache_tokens: int | None = None  # the KV budget, in positions
    paused: int | None = None  # batch lines set aside (in `running`) while interactive ones run

    def as_dict(self) -> dict[str, float | int | str]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def figures(self) -> dict[str, float]:
        """The numbers routers (routing stats) and the autoscaler (replica stats) read, under
        the names replicas report them by (plain strings: Serve carries them to processes
        that need not import this package)."""
        figures = {
            ReplicaMetric.ENGINE_QUEUED.value: float(self.queued),
            ReplicaMetric.ENGINE_RUNNING.value: float(self.running),
        }
        if self.kv_cache_utilization is not None:
            figures[ReplicaMetric.KV_CACHE_UTILIZATION.value] = self.kv_cache_utilization
        return figures


class Engine(ABC):
    kind: ClassVar[EngineKind]

    @abstractmethod
    def stream(self, request: GenerationRequest) -> AsyncIterator[StepEntry]:
        """One request's entries, in order, ending after its final one. Closing the iterator
        (the reader went away) sets nothing by itself: the caller sets request.cancel."""

    @abstractmethod
    def stats(self) -> EngineStats: ...

    def close(self) -> None:  # noqa: B027 (most engines have nothing to stop)
        """Stop background work (the replica is going away)."""


def final(entry: StepEntry) -> bool:
    """Whether a step entry is its sequence's last."""
    return isinstance(entry, RowError) or (
        isinstance(entry, TokenDelta) and entry.finish_reason is not None
    )


async def tokenizer_call(chars: int, func: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """A tokeniser call on `chars` characters: inline when short, else in a worker thread."""
    if chars <= INLINE_TOKENIZE_CHARS:
        return func(*args, **kwargs)
    return await asyncio.to_thread(func, *args, **kwargs)
