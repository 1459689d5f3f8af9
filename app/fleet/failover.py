"""Failover for callers of model handles (the gateway and InferenceClient): a request whose
replica dies, becomes unreachable or refuses it (full, draining) is sent again, to the next-best
replica (the failed one is excluded through the routing hints), with bounded attempts and
exponential backoff. A stream is retried only until its first chunk has been received; after
that the client already has part of the answer, and a second replica would start it again.

Three bounds keep one request's cost finite:
- a request whose replica died is tried at most once more, so a request that kills replicas
  (a poison request) takes down two at most instead of walking through the fleet;
- the caller's per-replica circuit breakers (app.fleet.breaker) exclude replicas that keep
  failing; when every replica is excluded the request router serves from any of them anyway;
- an optional deadline (event loop time) bounds every attempt and backoff together: past it
  the call in flight is cancelled and TimeoutError raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, Protocol, TypeVar

from ray import ObjectRef, ObjectRefGenerator
from ray.exceptions import RayActorError
from ray.serve.exceptions import (
    BackPressureError,
    ReplicaUnavailableError,
    RequestCancelledError,
)

from app.fleet.breaker import ReplicaBreakers
from app.fleet.hints import with_excluded
from app.fleet.spec import LoadBalancing

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)
RETRYABLE_STATUSES = (429, 503)
Identify = Callable[[Any], str | None]


class Pending(Protocol[T_co]):
    """A handle call in flight, as a blocking caller waits for it (DeploymentResponse)."""

    def result(self) -> T_co: ...


def retryable(exc: BaseException) -> bool:
    """Errors another replica may not have: the replica's actor died or is unreachable, or it
    answered 'full' or 'unavailable' (our OverloadedError / ServiceUnavailableError)."""
    if isinstance(exc, RayActorError | ReplicaUnavailableError | BackPressureError):
        return True
    return getattr(exc, "status", None) in RETRYABLE_STATUSES


def replica_died(exc: BaseException) -> bool:
    """The replica's actor died or cannot be reached (ActorDiedError, ActorUnavailableError)."""
    return isinstance(exc, RayActorError)


def verdict(exc: BaseException) -> bool | None:
    """What a failed attempt says about its replica, for its circuit breaker: False when the
    replica failed (died, unreachable, an internal error, no answer by the deadline), None
    when it says nothing (the replica was full, or the caller went away), True when the
    replica answered and the request was at fault (a 4xx)."""
    if isinstance(exc, RayActorError | ReplicaUnavailableError | TimeoutError):
        return False
    if isinstance(exc, BackPressureError | RequestCancelledError) or not isinstance(exc, Exception):
        return None
    status = getattr(exc, "status", None)
    if status in RETRYABLE_STATUSES:
        return None
    return isinstance(status, int) and status < 500


def failed_replica(exc: BaseException) -> str | None:
    """The actor id of the replica that failed, when the error names it."""
    actor_id = getattr(exc, "actor_id", None)
    return str(actor_id) if actor_id else None


def served_by(response: object) -> str | None:
    """The actor id of the replica a handle call was sent to, once Serve has assigned one;
    None before that, or for anything else. Serve 2.60 keeps it only on the call's private
    ReplicaResult (the object ref of the replica's actor task, or the actor id over gRPC),
    so this reads it there and gives up quietly if that changes: a breaker that learns less
    is better than a request that fails over bookkeeping."""
    try:
        result = getattr(response, "_replica_result", None)
        if result is None:
            return None
        actor = getattr(result, "_actor_id", None)
        if actor is not None:
            return str(actor.hex())
        ref = getattr(result, "_obj_ref", None)
        if ref is None:
            ref = getattr(result, "_obj_ref_gen", None)
        if isinstance(ref, ObjectRefGenerator):
            ref = ref.completed()
        if isinstance(ref, ObjectRef):
            return str(ref.task_id().actor_id().hex())
    except Exception:
        return None
    return None


class Attempts:
    """One request's way through the replicas: the routing hints of each attempt (replicas
    that failed it and open circuits excluded), what each outcome tells the breakers, and
    whether and when to try again."""

    def __init__(
        self,
        route: dict[str, Any],
        balancing: LoadBalancing,
        breakers: ReplicaBreakers | None,
        identify: Identify,
    ) -> None:
        self._route, self._balancing = route, balancing
        self._breakers, self._identify = breakers, identify
        self.number = 0
        self._failed: set[str] = set()
        self._died_at: int | None = None
        self._probes: frozenset[str] = frozenset()

    def next_route(self) -> dict[str, Any]:
        self.number += 1
        if self._breakers is None:
            return with_excluded(self._route, self._failed)
        opened, self._probes = self._breakers.admit()
        return with_excluded(self._route, self._failed | opened)

    def succeeded(self, response: object) -> None:
        # A success only matters to a replica that has a breaker: most of the time none has.
        if self._breakers is not None and self._breakers.breakers:
            self._breakers.settle(self._identify(response), True, self._probes)

    def failed(self, exc: BaseException, response: object) -> float | None:
        """Record a failed attempt; the backoff before the next one, or None to give up."""
        replica = failed_replica(exc) or self._identify(response)
        if self._breakers is not None:
            self._breakers.settle(replica, verdict(exc), self._probes)
        if replica is not None:
            self._failed.add(replica)
        if not retryable(exc):
            return None
        if replica_died(exc) and self._died_at is None:
            self._died_at = self.number
        if self.number >= self._balancing.max_attempts:
            return None
        if self._died_at is not None and self.number > self._died_at:
            return None  # the one attempt after a replica death has been made
        backoff = self._balancing.backoff_s
        return float(min(backoff * 2 ** (self.number - 1), max(1.0, backoff)))

    def failed_late(self, exc: BaseException, response: object) -> None:
        """A stream broke after its first chunk: not retried, but its replica's breaker hears
        of a failure."""
        if self._breakers is not None and verdict(exc) is False:
            self._breakers.settle(failed_replica(exc) or self._identify(response), False)


def _cancel(call: object) -> None:
    """Stop a handle call's work on its replica (DeploymentResponse[Generator].cancel)."""
    cancel = getattr(call, "cancel", None)
    if callable(cancel):
        with contextlib.suppress(Exception):  # already finished or failed: nothing to stop
            cancel()


def _out_of_time(deadline: float | None, backoff: float) -> bool:
    return deadline is not None and asyncio.get_running_loop().time() + backoff >= deadline


async def call_with_failover(
    call: Callable[[dict[str, Any]], Awaitable[T]],
    route: dict[str, Any],
    balancing: LoadBalancing,
    *,
    breakers: ReplicaBreakers | None = None,
    deadline: float | None = None,
    identify: Identify = served_by,
) -> T:
    """`await call(route)`, retried on retryable errors with the failed replica excluded."""
    attempts = Attempts(route, balancing, breakers, identify)
    while True:
        response: Awaitable[T] | None = None
        try:
            async with asyncio.timeout_at(deadline):
                response = call(attempts.next_route())
                result = await response
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError | TimeoutError):
                _cancel(response)
            backoff = attempts.failed(exc, response)
            if backoff is None or _out_of_time(deadline, backoff):
                raise
            await asyncio.sleep(backoff)
            continue
        attempts.succeeded(response)
        return result


async def stream_with_failover(
    open_stream: Callable[[dict[str, Any]], AsyncIterator[T]],
    route: dict[str, Any],
    balancing: LoadBalancing,
    *,
    breakers: ReplicaBreakers | None = None,
    deadline: float | None = None,
    identify: Identify = served_by,
) -> AsyncIterator[T]:
    """Yield from `open_stream(route)`; until the first item arrives (by `deadline`), a
    retryable failure opens the stream again on another replica. After it, errors propagate.
    Closing this generator early cancels the stream's work on its replica."""
    attempts = Attempts(route, balancing, breakers, identify)
    while True:
        stream: AsyncIterator[T] | None = None
        try:
            async with asyncio.timeout_at(deadline):
                stream = open_stream(attempts.next_route())
                first = await anext(stream)
        except StopAsyncIteration:
            attempts.succeeded(stream)
            return
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError | TimeoutError):
                _cancel(stream)
            backoff = attempts.failed(exc, stream)
            if backoff is None or _out_of_time(deadline, backoff):
                raise
            await asyncio.sleep(backoff)
            continue
        break
    assert stream is not None
    attempts.succeeded(stream)
    finished = False
    try:
        yield first
        async for item in stream:
            yield item
        finished = True
    except Exception as exc:
        attempts.failed_late(exc, stream)
        raise
    finally:
        if not finished:
            _cancel(stream)


def call_with_failover_sync(
    send: Callable[[dict[str, Any]], Pending[T]],
    route: dict[str, Any],
    balancing: LoadBalancing,
    *,
    breakers: ReplicaBreakers | None = None,
    identify: Identify = served_by,
) -> T:
    """The blocking form of call_with_failover (for drivers outside an event loop): `send`
    makes the call, its `result()` waits for the answer."""
    attempts = Attempts(route, balancing, breakers, identify)
    while True:
        response: Pending[T] | None = None
        try:
            response = send(attempts.next_route())
            result = response.result()
        except BaseException as exc:
            backoff = attempts.failed(exc, response)
            if backoff is None:
                raise
            time.sleep(backoff)
            continue
        attempts.succeeded(response)
        return result


def iterate_with_failover(
    open_stream: Callable[[dict[str, Any]], Iterator[T]],
    route: dict[str, Any],
    balancing: LoadBalancing,
    *,
    breakers: ReplicaBreakers | None = None,
    identify: Identify = served_by,
) -> Iterator[T]:
    """The blocking form of stream_with_failover."""
    attempts = Attempts(route, balancing, breakers, identify)
    while True:
        stream: Iterator[T] | None = None
        try:
            stream = open_stream(attempts.next_route())
            first = next(stream)
        except StopIteration:
            attempts.succeeded(stream)
            return
        except BaseException as exc:
            backoff = attempts.failed(exc, stream)
            if backoff is None:
                raise
            time.sleep(backoff)
            continue
        break
    assert stream is not None
    attempts.succeeded(stream)
    finished = False
    try:
        yield first
        yield from stream
        finished = True
    except Exception as exc:
        attempts.failed_late(exc, stream)
        raise
    finally:
        if not finished:
            _cancel(stream)
