"""Failover (app.fleet.failover) without Ray: retries with the failed replica excluded, the bound
after a replica death, per-replica circuit breakers fed into the exclusions, the deadline, and
which replica a Serve response came from."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from ray._raylet import ActorID, JobID, ObjectRef, TaskID
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError, RequestCancelledError

from app.api.errors import (
    InternalError,
    InvalidRequestError,
    OverloadedError,
    RequestTimeoutError,
    ServiceUnavailableError,
)
from app.fleet.breaker import BreakerConfig, BreakerState, ReplicaBreakers
from app.fleet.failover import (
    call_with_failover,
    call_with_failover_sync,
    iterate_with_failover,
    served_by,
    stream_with_failover,
    verdict,
)
from app.fleet.hints import route_kwarg
from app.fleet.spec import LoadBalancing

FAST = LoadBalancing(max_attempts=3, backoff_s=0.0)


class DiedError(ActorDiedError):
    """Ray's real ActorDiedError with a chosen actor id (its constructor wants a cause)."""

    def __init__(self, actor_id: str) -> None:
        Exception.__init__(self, f"actor {actor_id} died")
        self.actor_id = actor_id
        self.error_msg = f"actor {actor_id} died"


class Unavailable(ActorUnavailableError):
    def __init__(self, actor_id: str) -> None:
        Exception.__init__(self, f"actor {actor_id} unreachable")
        self.actor_id = actor_id


class Reply:
    """A handle call's response as failover sees it: awaitable, `result()` for blocking
    callers, `cancel()`, and the replica that served it (read by `identify`)."""

    def __init__(self, replica: str | None, outcome: Any, delay_s: float = 0.0) -> None:
        self.replica, self.outcome, self.delay_s = replica, outcome, delay_s
        self.cancelled = False

    def result(self) -> Any:
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome

    def cancel(self) -> None:
        self.cancelled = True

    def __await__(self) -> Any:
        return self._wait().__await__()

    async def _wait(self) -> Any:
        await asyncio.sleep(self.delay_s)
        return self.result()


def replica_of(response: object) -> str | None:
    return getattr(response, "replica", None)


class Script:
    """Answers attempt after attempt from a list of (replica, outcome), recording routes."""

    def __init__(self, *steps: tuple[str | None, Any], delay_s: float = 0.0) -> None:
        self.steps, self.delay_s = list(steps), delay_s
        self.routes: list[dict[str, Any]] = []
        self.replies: list[Reply] = []

    def __call__(self, route: dict[str, Any]) -> Reply:
        self.routes.append(route)
        replica, outcome = self.steps[len(self.routes) - 1]
        reply = Reply(replica, outcome, self.delay_s)
        self.replies.append(reply)
        return reply

    @property
    def excluded(self) -> list[list[str]]:
        return [route["exclude"] for route in self.routes]


def breakers(threshold: int = 2) -> ReplicaBreakers:
    return ReplicaBreakers(BreakerConfig(failure_threshold=threshold, cooloff_s=60))


# ---- retries and the replica-death bound ---------------------------------------------------

OK = "ok"
FULL = OverloadedError("full", retry_after_s=1)
GONE = ServiceUnavailableError("unavailable", retry_after_s=1)

# (outcomes attempt by attempt, max_attempts, attempts made, the final outcome)
RETRY_CASES = {
    "one death, then served elsewhere": ([DiedError("r1"), OK], 3, 2, OK),
    "two deaths stop even with attempts left": (
        [DiedError("r1"), DiedError("r2"), OK],
        10,
        2,
        "r2",
    ),
    "death then a 429: the one extra attempt is spent": ([DiedError("r1"), FULL, OK], 10, 2, FULL),
    "an unreachable actor counts as a death": (
        [Unavailable("r1"), Unavailable("r2"), OK],
        5,
        2,
        "r2",
    ),
    "429s keep the usual policy": ([FULL, FULL, FULL, OK], 3, 3, FULL),
    "503s then a death get one more attempt": ([GONE, GONE, DiedError("r3"), OK], 10, 4, OK),
    "a death on the last allowed attempt": ([FULL, DiedError("r2"), OK], 2, 2, "r2"),
    "a client error is not retried": ([InvalidRequestError("bad"), OK], 3, 1, InvalidRequestError),
    "an internal error is not retried": ([InternalError("boom"), OK], 3, 1, InternalError),
}


def _check_outcome(run: Any, final: Any) -> None:
    if final == OK:
        assert run() == OK
    elif isinstance(final, str):  # the actor id of the death that ends it
        with pytest.raises(RayActorError) as caught:
            run()
        assert caught.value.actor_id == final
    else:
        expected = final if isinstance(final, type) else type(final)
        with pytest.raises(expected):
            run()


@pytest.mark.parametrize("blocking", [True, False], ids=["sync", "async"])
@pytest.mark.parametrize(
    ("outcomes", "max_attempts", "attempts", "final"),
    list(RETRY_CASES.values()),
    ids=list(RETRY_CASES),
)
def test_retry_policy(
    outcomes: list[Any], max_attempts: int, attempts: int, final: Any, blocking: bool
) -> None:
    balancing = LoadBalancing(max_attempts=max_attempts, backoff_s=0.0)
    script = Script(*[(None, outcome) for outcome in outcomes])
    if blocking:
        _check_outcome(lambda: call_with_failover_sync(script, route_kwarg(), balancing), final)
    else:
        _check_outcome(
            lambda: asyncio.run(call_with_failover(script, route_kwarg(), balancing)), final
        )
    assert len(script.routes) == attempts


def test_failover_excludes_the_replicas_that_failed() -> None:
    script = Script(("r1", FULL), (None, DiedError("r2")), ("r3", OK))
    route = route_kwarg(region="a", exclude=["given"])
    assert call_with_failover_sync(script, route, FAST, identify=replica_of) == OK
    assert script.excluded == [["given"], ["given", "r1"], ["given", "r1", "r2"]]
    assert script.routes[0] is route


def test_stream_retries_only_before_the_first_chunk() -> None:
    opened = 0

    def open_stream(route: dict[str, Any]) -> Iterator[int]:
        nonlocal opened
        opened += 1
        if opened == 1:
            raise DiedError("first")
        yield 1
        raise DiedError("mid-stream")

    got: list[int] = []
    with pytest.raises(ActorDiedError, match="mid-stream"):
        for item in iterate_with_failover(open_stream, route_kwarg(), FAST):
            got.append(item)
    assert got == [1] and opened == 2


async def test_async_stream_failover() -> None:
    opened: list[dict[str, Any]] = []

    async def open_stream(route: dict[str, Any]) -> AsyncIterator[int]:
        opened.append(route)
        if len(opened) == 1:
            raise DiedError("dead")
        for i in range(3):
            yield i

    items = [i async for i in stream_with_failover(open_stream, route_kwarg(), FAST)]
    assert items == [0, 1, 2] and opened[1]["exclude"] == ["dead"]


async def test_a_stream_whose_replicas_die_twice_is_not_opened_a_third_time() -> None:
    opened = 0

    async def open_stream(route: dict[str, Any]) -> AsyncIterator[int]:
        nonlocal opened
        opened += 1
        raise DiedError(f"r{opened}")
        yield 0

    balancing = LoadBalancing(max_attempts=10, backoff_s=0.0)
    with pytest.raises(ActorDiedError, match="r2"):
        async for _ in stream_with_failover(open_stream, route_kwarg(), balancing):
            pass
    assert opened == 2


# ---- circuit breakers -----------------------------------------------------------------------


async def test_failures_open_a_replicas_circuit_and_later_requests_skip_it() -> None:
    table = breakers(threshold=2)
    for _ in range(2):
        script = Script(("sick", InternalError("boom")))
        with pytest.raises(InternalError):
            await call_with_failover(
                script, route_kwarg(), FAST, breakers=table, identify=replica_of
            )
    assert table.state("sick") is BreakerState.OPEN
    script = Script(("healthy", OK))
    assert (
        await call_with_failover(script, route_kwarg(), FAST, breakers=table, identify=replica_of)
        == OK
    )
    assert script.excluded == [["sick"]]


def test_actor_errors_count_against_the_actor_they_name() -> None:
    table = breakers(threshold=1)
    script = Script((None, DiedError("dead")), ("other", OK))
    assert (
        call_with_failover_sync(script, route_kwarg(), FAST, breakers=table, identify=replica_of)
        == OK
    )
    assert table.state("dead") is BreakerState.OPEN
    assert table.state("other") is BreakerState.CLOSED


@pytest.mark.parametrize(
    ("error", "counts"),
    [
        (OverloadedError("full"), 0),  # full is not sick: no verdict
        (InvalidRequestError("bad"), -1),  # it answered: a success, the count resets
        (InternalError("boom"), 1),
    ],
)
def test_what_an_answer_does_to_the_count(error: Exception, counts: int) -> None:
    table = breakers(threshold=5)
    table.settle("r", False)  # one failure already
    script = Script(("r", error), ("x", OK))
    with contextlib.suppress(Exception):
        call_with_failover_sync(script, route_kwarg(), FAST, breakers=table, identify=replica_of)
    failures = table.breakers["r"].failures if "r" in table.breakers else 0
    assert failures == 1 + counts


async def test_a_half_open_replica_is_probed_by_one_request_and_closes_on_success() -> None:
    clock = [0.0]
    table = ReplicaBreakers(BreakerConfig(failure_threshold=1, cooloff_s=60), lambda: clock[0])
    table.settle("r", False)
    clock[0] = 60.0
    script = Script(("r", OK))
    await call_with_failover(script, route_kwarg(), FAST, breakers=table, identify=replica_of)
    assert script.excluded == [[]]  # the probe could go to "r", and did
    assert table.breakers == {}


async def test_a_probe_served_elsewhere_frees_the_probe() -> None:
    clock = [0.0]
    table = ReplicaBreakers(BreakerConfig(failure_threshold=1, cooloff_s=60), lambda: clock[0])
    table.settle("r", False)
    clock[0] = 60.0
    await call_with_failover(
        Script(("other", OK)), route_kwarg(), FAST, breakers=table, identify=replica_of
    )
    assert table.state("r") is BreakerState.HALF_OPEN
    script = Script(("other", OK))
    await call_with_failover(script, route_kwarg(), FAST, breakers=table, identify=replica_of)
    assert script.excluded == [[]]  # not excluded: the next request may probe it


def test_a_stream_broken_mid_way_counts_against_its_replica() -> None:
    table = breakers(threshold=1)

    class Stream:
        replica = "r"

        def __init__(self) -> None:
            self.items = iter([1])

        def __iter__(self) -> Stream:
            return self

        def __next__(self) -> int:
            for item in self.items:
                return item
            raise InternalError("broke")

    with pytest.raises(InternalError):
        list(
            iterate_with_failover(
                lambda route: Stream(), route_kwarg(), FAST, breakers=table, identify=replica_of
            )
        )
    assert table.state("r") is BreakerState.OPEN


# ---- the deadline ---------------------------------------------------------------------------


async def test_the_deadline_cancels_the_call_in_flight_and_counts_against_its_replica() -> None:
    table = breakers(threshold=1)
    script = Script(("slow", OK), delay_s=5.0)
    deadline = asyncio.get_running_loop().time() + 0.05
    with pytest.raises(TimeoutError):
        await call_with_failover(
            script, route_kwarg(), FAST, breakers=table, deadline=deadline, identify=replica_of
        )
    assert len(script.routes) == 1 and script.replies[0].cancelled
    assert table.state("slow") is BreakerState.OPEN


async def test_the_deadline_bounds_every_attempt_together() -> None:
    script = Script(*[(None, FULL)] * 10)
    balancing = LoadBalancing(max_attempts=10, backoff_s=0.04)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(OverloadedError):  # no time for another backoff: the last answer stands
        await call_with_failover(script, route_kwarg(), balancing, deadline=started + 0.1)
    assert loop.time() - started < 0.1
    assert 1 < len(script.routes) < 10


async def test_a_stream_s_first_chunk_is_due_by_the_deadline() -> None:
    closed: list[bool] = []

    class Slow:
        replica = "slow"

        def __aiter__(self) -> Slow:
            return self

        async def __anext__(self) -> int:
            await asyncio.sleep(5)
            return 1

        def cancel(self) -> None:
            closed.append(True)

    deadline = asyncio.get_running_loop().time() + 0.05
    with pytest.raises(TimeoutError):
        async for _ in stream_with_failover(
            lambda route: Slow(), route_kwarg(), FAST, deadline=deadline
        ):
            pass
    assert closed == [True]


async def test_closing_a_stream_early_cancels_its_call() -> None:
    cancelled: list[bool] = []

    class Endless:
        def __aiter__(self) -> Endless:
            return self

        async def __anext__(self) -> int:
            return 1

        def cancel(self) -> None:
            cancelled.append(True)

    stream = stream_with_failover(lambda route: Endless(), route_kwarg(), FAST)
    assert await anext(stream) == 1
    await stream.aclose()  # type: ignore[attr-defined]
    assert cancelled == [True]


async def test_a_cancelled_caller_cancels_the_call() -> None:
    script = Script(("r", OK), delay_s=5.0)
    task = asyncio.create_task(call_with_failover(script, route_kwarg(), FAST))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert script.replies[0].cancelled


# ---- verdicts and served_by -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (DiedError("r"), False),
        (Unavailable("r"), False),
        (TimeoutError(), False),
        (RequestTimeoutError("slow"), False),
        (InternalError("boom"), False),
        (RuntimeError("a bug in the replica"), False),
        (OverloadedError("full"), None),
        (ServiceUnavailableError("draining"), None),
        (BackPressureError(num_queued_requests=1, max_queued_requests=1), None),
        (RequestCancelledError("req"), None),
        (asyncio.CancelledError(), None),
        (InvalidRequestError("bad"), True),
    ],
)
def test_verdict(error: BaseException, expected: bool | None) -> None:
    assert verdict(error) is expected


def _actor() -> ActorID:
    job = JobID.from_int(1)
    return ActorID.of(job, TaskID.for_driver_task(job), 7)


def test_served_by_reads_the_actor_of_the_replicas_task() -> None:
    actor = _actor()
    job = JobID.from_int(1)
    task = TaskID.for_actor_task(job, TaskID.for_driver_task(job), 3, actor)
    ref = ObjectRef(task.binary() + (1).to_bytes(4, "little"), skip_adding_local_ref=True)
    response = SimpleNamespace(_replica_result=SimpleNamespace(_obj_ref=ref))
    assert served_by(response) == actor.hex()


def test_served_by_reads_the_actor_id_over_grpc() -> None:
    actor = _actor()
    response = SimpleNamespace(_replica_result=SimpleNamespace(_actor_id=actor))
    assert served_by(response) == actor.hex()


@pytest.mark.parametrize(
    "response",
    [None, object(), SimpleNamespace(_replica_result=None), SimpleNamespace(_replica_result=1)],
)
def test_served_by_is_none_before_assignment_or_for_anything_else(response: object) -> None:
    assert served_by(response) is None
