"""Failover for callers of model handles (the gateway and InferenceClient): a request whose
replica dies, becomes unreachable or refuses it (full, draining) is sent again, to the next-best
replica (the failed one is excluded through the routing hints), with bounded attempts and
exponential backoff. A stream is retried only until its first chunk has been received; after
that the client already has part of the answer, and a second replica would start it again."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, ReplicaUnavailableError
from tenacity import (
    AsyncRetrying,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
)

from app.fleet.spec import LoadBalancing

T = TypeVar("T")
RETRYABLE_STATUSES = (429, 503)


def retryable(exc: BaseException) -> bool:
    """Errors another replica may not have: the replica's actor died or is unreachable, or it
    answered 'full' or 'unavailable' (our OverloadedError / ServiceUnavailableError)."""
    if isinstance(exc, RayActorError | ReplicaUnavailableError | BackPressureError):
        return True
    return getattr(exc, "status", None) in RETRYABLE_STATUSES


def failed_replica(exc: BaseException) -> str | None:
    """The actor id of the replica that failed, when the error names it."""
    actor_id = getattr(exc, "actor_id", None)
    return str(actor_id) if actor_id else None


def _retry_policy(balancing: LoadBalancing) -> dict[str, Any]:
    """One policy for the blocking and the asyncio retry loops."""
    return {
        "stop": stop_after_attempt(balancing.max_attempts),
        "wait": wait_exponential(multiplier=balancing.backoff_s, max=max(1.0, balancing.backoff_s)),
        "retry": retry_if_exception(retryable),
        "reraise": True,
    }


def _next_route(route: dict[str, Any], exc: BaseException | None) -> dict[str, Any]:
    actor = failed_replica(exc) if exc is not None else None
    if actor is None:
        return route
    return route | {"exclude": sorted({*route.get("exclude", ()), actor})}


async def call_with_failover(
    call: Callable[[dict[str, Any]], Awaitable[T]],
    route: dict[str, Any],
    balancing: LoadBalancing,
) -> T:
    """`await call(route)`, retried on retryable errors with the failed replica excluded."""
    last: BaseException | None = None
    async for attempt in AsyncRetrying(**_retry_policy(balancing)):
        with attempt:
            route = _next_route(route, last)
            try:
                return await call(route)
            except BaseException as exc:
                last = exc
                raise
    raise AssertionError("unreachable: tenacity reraises the last error")


async def stream_with_failover(
    open_stream: Callable[[dict[str, Any]], AsyncIterator[T]],
    route: dict[str, Any],
    balancing: LoadBalancing,
) -> AsyncIterator[T]:
    """Yield from `open_stream(route)`; until the first item arrives, a retryable failure opens
    the stream again on another replica. After it, errors propagate."""
    last: BaseException | None = None
    first: T | None = None
    stream: AsyncIterator[T] | None = None
    async for attempt in AsyncRetrying(**_retry_policy(balancing)):
        with attempt:
            route = _next_route(route, last)
            try:
                stream = open_stream(route)
                first = await anext(stream)
            except StopAsyncIteration:
                return
            except BaseException as exc:
                last = exc
                raise
    assert stream is not None
    yield first  # type: ignore[misc]
    async for item in stream:
        yield item


def call_with_failover_sync(
    call: Callable[[dict[str, Any]], T], route: dict[str, Any], balancing: LoadBalancing
) -> T:
    """The blocking form of call_with_failover (for drivers outside an event loop)."""
    last: BaseException | None = None
    for attempt in Retrying(**_retry_policy(balancing)):
        with attempt:
            route = _next_route(route, last)
            try:
                return call(route)
            except BaseException as exc:
                last = exc
                raise
    raise AssertionError("unreachable: tenacity reraises the last error")


def iterate_with_failover(
    open_stream: Callable[[dict[str, Any]], Iterator[T]],
    route: dict[str, Any],
    balancing: LoadBalancing,
) -> Iterator[T]:
    """The blocking form of stream_with_failover."""
    last: BaseException | None = None
    first: T | None = None
    stream: Iterator[T] | None = None
    for attempt in Retrying(**_retry_policy(balancing)):
        with attempt:
            route = _next_route(route, last)
            try:
                stream = open_stream(route)
                first = next(stream)
            except StopIteration:
                return
            except BaseException as exc:
                last = exc
                raise
    assert stream is not None
    yield first  # type: ignore[misc]
    yield from stream
