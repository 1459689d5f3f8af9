"""Sequences through a text-generation engine (app.serving.engines): one stream of deltas per
sequence, stopped when its reader goes away.

A sequence's runner request carries a cancel event. It is set when the task awaiting the
sequence is cancelled or its stream is closed, which is what Serve does when a client
disconnects; the engine drops the sequence at its next decode step while its batch neighbours
go on. A sequence that fails on its own (a RowError) fails only its own stream.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator

from app.api.errors import APIError, InternalError, InvalidRequestError
from app.serving.engines import Engine, tokenizer_call
from app.serving.runners.base import (
    GenerationCancelled,
    GenerationRequest,
    RowError,
    TokenDelta,
)
from app.serving.streams import closing

__all__ = ["SequenceDecoder", "runner_failure", "tokenizer_call"]


class SequenceDecoder:
    """Decodes sequences for one replica through its engine; counts the tokens it generates."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.generated_tokens = 0

    async def deltas(self, request: GenerationRequest) -> AsyncGenerator[TokenDelta, None]:
        """One sequence's deltas. However this ends (finished, failed, cancelled, closed), the
        request's cancel event is set, so the runner stops decoding it at its next step."""
        stream = self.engine.stream(request)
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


def runner_failure(exc: Exception, what: str) -> Exception:
    """What a client sees for a runner's failure: API errors (and a cancellation) as they are,
    a ValueError (a request the runner cannot serve) as a 400, anything else as a 500."""
    if isinstance(exc, APIError | GenerationCancelled):
        return exc
    if isinstance(exc, ValueError):
        return InvalidRequestError(str(exc))
    return InternalError(f"{what} failed: {type(exc).__name__}: {exc}")
