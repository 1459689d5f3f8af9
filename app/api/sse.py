"""Server-sent events in OpenAI's streaming format: encoding, write coalescing, the response."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.responses import Response, StreamingResponse

from app.api.errors import APIError, InternalError, error_json

logger = logging.getLogger(__name__)

SSE_DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
Chunk = dict[str, Any]


async def sse(chunks: AsyncIterator[Chunk]) -> AsyncIterator[bytes]:
    """One event per chunk; an error after the first byte becomes an error event followed by
    [DONE], so a client never hangs on a half-finished stream."""
    try:
        async for chunk in chunks:
            yield b"data: " + orjson.dumps(chunk) + b"\n\n"
    except APIError as exc:
        yield b"data: " + error_json(exc) + b"\n\n"
    except Exception as exc:  # the status line has gone out; report in-band
        logger.exception("stream failed")
        failure = InternalError(f"stream failed: {type(exc).__name__}")
        yield b"data: " + error_json(failure) + b"\n\n"
    yield SSE_DONE


class SSEStream:
    """The SSE body of a chunk stream, as an async iterator of socket writes.

    The first chunk is awaited before the first write, so errors raised before any chunk (bad
    input, unknown model, capacity) surface from the first `anext` and can still become an HTTP
    error status. Events produced in the same event-loop turn (a fast runner, a cached answer,
    the closing chunks) are joined into one write; tokens a model emits with time between them
    still go out one by one.
    """

    def __init__(self, chunks: AsyncIterator[Chunk]) -> None:
        self._chunks = chunks
        self._buffer: list[bytes] = []
        self._wake = asyncio.Event()
        self._finished: list[BaseException | None] = []
        self._task: asyncio.Task[None] | None = None

    @property
    def exhausted(self) -> bool:
        """The stream has ended and every write has been taken."""
        return bool(self._finished) and not self._buffer

    def __aiter__(self) -> SSEStream:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self._next()
        except StopAsyncIteration:
            raise
        except BaseException:
            # The reader failed or went away (a cancelled relay, a client gone): stop producing,
            # so the model stops generating for nobody.
            await self.aclose()
            raise

    async def _next(self) -> bytes:
        if self._task is None:
            try:
                first = await anext(self._chunks)
            except StopAsyncIteration:
                self._finished.append(None)
                return SSE_DONE
            self._task = asyncio.create_task(self._pump(_prepend(first, self._chunks)))
        while not self._buffer:
            if self._finished:
                raise StopAsyncIteration
            await self._wake.wait()
            self._wake.clear()
        out = b"".join(self._buffer)
        self._buffer.clear()
        return out

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
        else:
            closer = getattr(self._chunks, "aclose", None)
            if closer is not None:
                await closer()

    async def _pump(self, chunks: AsyncIterator[Chunk]) -> None:
        try:
            async for piece in sse(chunks):
                self._buffer.append(piece)
                self._wake.set()
        finally:
            self._finished.append(None)
            self._wake.set()


async def _prepend(first: Chunk, rest: AsyncIterator[Chunk]) -> AsyncIterator[Chunk]:
    yield first
    async for chunk in rest:
        yield chunk


async def streaming_response(writes: AsyncIterator[bytes]) -> Response:
    """An event-stream response from SSE writes. Errors before the first write raise here (for
    an HTTP error status); a stream already complete at its first write (a cached answer, the
    echo model) goes out as one plain response with the same body, skipping chunked transfer."""
    head = await anext(writes, SSE_DONE)
    if getattr(writes, "exhausted", False):
        return Response(head, media_type="text/event-stream", headers=SSE_HEADERS)
    return StreamingResponse(
        _resume(head, writes), media_type="text/event-stream", headers=SSE_HEADERS
    )


async def _resume(head: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    try:
        yield head
        async for piece in rest:
            yield piece
    finally:
        close = getattr(rest, "aclose", None)
        if close is not None:
            await close()
