"""Circuit breakers (app.fleet.breaker) on a hand-driven clock: one breaker's state machine as
tables of events, then the per-replica table a caller keeps (exclusions, probes, forgetting)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from app.fleet.breaker import (
    FORGET_AFTER_COOLOFFS,
    BreakerConfig,
    BreakerState,
    CircuitBreaker,
    ReplicaBreakers,
)

CLOSED, OPEN, HALF = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN
CONFIG = BreakerConfig(failure_threshold=3, cooloff_s=60, probe_timeout_s=10)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def test_defaults_are_five_failures_and_a_minute() -> None:
    config = BreakerConfig()
    assert (config.failure_threshold, config.cooloff_s) == (5, 60.0)


@pytest.mark.parametrize("field", ["failure_threshold", "cooloff_s", "probe_timeout_s"])
def test_config_rejects_non_positive_values(field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        BreakerConfig.model_validate({field: 0})


# Each step: an event ("fail", "ok", "allow", "release", "wait N"), then the state after it
# and, for "allow", what it answered.
SCENARIOS: dict[str, list[tuple[str, BreakerState, bool | None]]] = {
    "failures below the threshold keep it closed": [
        ("fail", CLOSED, None),
        ("fail", CLOSED, None),
        ("allow", CLOSED, True),
    ],
    "the threshold opens it": [
        ("fail", CLOSED, None),
        ("fail", CLOSED, None),
        ("fail", OPEN, None),
        ("allow", OPEN, False),
    ],
    "failures must be consecutive": [
        ("fail", CLOSED, None),
        ("fail", CLOSED, None),
        ("ok", CLOSED, None),
        ("fail", CLOSED, None),
        ("fail", CLOSED, None),
        ("fail", OPEN, None),
    ],
    "after the cool-off one probe goes, the next waits": [
        *[("fail", CLOSED, None)] * 2,
        ("fail", OPEN, None),
        ("wait 59", OPEN, None),
        ("allow", OPEN, False),
        ("wait 1", HALF, None),
        ("allow", HALF, True),
        ("allow", HALF, False),
    ],
    "a successful probe closes it": [
        *[("fail", CLOSED, None)] * 2,
        ("fail", OPEN, None),
        ("wait 60", HALF, None),
        ("allow", HALF, True),
        ("ok", CLOSED, None),
        ("allow", CLOSED, True),
        ("fail", CLOSED, None),  # counting starts again from zero
    ],
    "a failed probe opens it for another cool-off": [
        *[("fail", CLOSED, None)] * 2,
        ("fail", OPEN, None),
        ("wait 60", HALF, None),
        ("allow", HALF, True),
        ("fail", OPEN, None),
        ("wait 59", OPEN, None),
        ("wait 1", HALF, None),
    ],
    "a failure while open restarts the cool-off": [
        *[("fail", CLOSED, None)] * 2,
        ("fail", OPEN, None),
        ("wait 50", OPEN, None),
        ("fail", OPEN, None),
        ("wait 50", OPEN, None),
        ("wait 10", HALF, None),
    ],
    "a released probe lets the next request probe": [
        *[("fail", CLOSED, None)] * 2,
        ("fail", OPEN, None),
        ("wait 60", HALF, None),
        ("allow", HALF, True),
        ("release", HALF, None),
        ("allow", HALF, True),
    ],
    "a probe that never reports expires": [
        *[("fail", CLOSED, None)] * 2,
        ("fail", OPEN, None),
        ("wait 60", HALF, None),
        ("allow", HALF, True),
        ("wait 9", HALF, None),
        ("allow", HALF, False),
        ("wait 1", HALF, None),
        ("allow", HALF, True),
    ],
}


@pytest.mark.parametrize("steps", list(SCENARIOS.values()), ids=list(SCENARIOS))
def test_breaker_state_machine(steps: list[tuple[str, BreakerState, bool | None]]) -> None:
    clock = Clock()
    breaker = CircuitBreaker(CONFIG, clock)
    for number, (event, state, answer) in enumerate(steps):
        got: bool | None = None
        if event == "fail":
            breaker.record_failure()
        elif event == "ok":
            breaker.record_success()
        elif event == "allow":
            got = breaker.allow()
        elif event == "release":
            breaker.release()
        else:
            clock.now += float(event.split()[1])
        assert (breaker.state, got) == (state, answer), f"step {number}: {event}"


def test_available_does_not_claim_the_probe() -> None:
    clock = Clock()
    breaker = CircuitBreaker(BreakerConfig(failure_threshold=1, cooloff_s=5), clock)
    breaker.record_failure()
    assert not breaker.available()
    clock.now += 5
    assert breaker.available() and breaker.available()
    assert breaker.allow()
    assert not breaker.available()


# ---- the per-replica table ------------------------------------------------------------------


def replicas(clock: Clock, threshold: int = 2) -> ReplicaBreakers:
    config = BreakerConfig(failure_threshold=threshold, cooloff_s=60, probe_timeout_s=10)
    return ReplicaBreakers(config, clock)


def fail(table: ReplicaBreakers, replica: str, times: int) -> None:
    for _ in range(times):
        table.settle(replica, False)


def test_open_replicas_are_excluded_and_others_are_not_tracked() -> None:
    table = replicas(Clock())
    fail(table, "a", 2)
    fail(table, "b", 1)
    assert table.admit() == (frozenset({"a"}), frozenset())
    assert (table.state("a"), table.state("b"), table.state("c")) == (OPEN, CLOSED, CLOSED)


def test_a_success_forgets_the_replica() -> None:
    table = replicas(Clock())
    fail(table, "a", 1)
    table.settle("a", True)
    assert table.breakers == {}
    table.settle("never-failed", True)
    assert table.breakers == {}


def test_no_verdict_changes_nothing_but_the_probe() -> None:
    table = replicas(Clock())
    fail(table, "a", 1)
    table.settle("a", None)
    table.settle("unknown", None)
    table.settle(None, False)
    assert set(table.breakers) == {"a"} and table.breakers["a"].failures == 1


def test_half_open_replica_is_one_requests_probe_at_a_time() -> None:
    clock = Clock()
    table = replicas(clock)
    fail(table, "a", 2)
    clock.now += 60
    first = table.admit()
    assert first == (frozenset(), frozenset({"a"}))  # this request may go to "a"
    assert table.admit() == (frozenset({"a"}), frozenset())  # the next one may not
    # The probing request was served by another replica: the probe is free again.
    table.settle("b", True, first[1])
    assert table.admit() == (frozenset(), frozenset({"a"}))


def test_a_probe_that_reaches_the_replica_decides() -> None:
    clock = Clock()
    table = replicas(clock)
    fail(table, "a", 2)
    fail(table, "b", 2)
    clock.now += 60
    _, probes = table.admit()
    assert probes == {"a", "b"}
    table.settle("a", True, probes)  # "a" answered: closed and forgotten; "b" released
    assert set(table.breakers) == {"b"} and table.state("b") is HALF
    _, probes = table.admit()
    table.settle("b", False, probes)  # "b" failed again: open for another cool-off
    assert table.state("b") is OPEN
    assert table.admit() == (frozenset({"b"}), frozenset())


def test_every_replica_open_excludes_them_all() -> None:
    """The exclusion covers every replica; the request router then serves from any of them
    (its panic fallback, tested in test_fleet_router)."""
    table = replicas(Clock())
    for replica in ("a", "b", "c"):
        fail(table, replica, 2)
    assert table.admit()[0] == {"a", "b", "c"}


def test_replicas_silent_for_many_cooloffs_are_forgotten() -> None:
    clock = Clock()
    table = replicas(clock)
    fail(table, "gone", 2)
    fail(table, "flaky", 1)
    clock.now += FORGET_AFTER_COOLOFFS * 60 - 1
    fail(table, "recent", 2)
    table.admit()
    assert set(table.breakers) == {"gone", "flaky", "recent"}
    clock.now += 2
    table.admit()
    assert set(table.breakers) == {"recent"}


def test_each_transition_is_told_once() -> None:
    clock = Clock()
    told: list[BreakerState] = []
    breaker = CircuitBreaker(
        BreakerConfig(failure_threshold=2, cooloff_s=10), clock, on_change=told.append
    )
    breaker.record_failure()
    assert told == []  # below the threshold: still closed
    breaker.record_failure()
    assert told == [BreakerState.OPEN]
    clock.now += 11
    assert breaker.allow()  # the half-open probe
    breaker.record_failure()  # the probe failed: open again
    clock.now += 11
    assert breaker.allow()
    breaker.record_success()
    assert told == [
        BreakerState.OPEN,
        BreakerState.HALF_OPEN,
        BreakerState.OPEN,
        BreakerState.HALF_OPEN,
        BreakerState.CLOSED,
    ]
