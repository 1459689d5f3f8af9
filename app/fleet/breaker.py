"""Circuit breakers: a caller stops sending to a target (a replica, a peer region) after
consecutive failures, lets one probe through once a cool-off has passed, and closes again when
the probe succeeds. Pure (no Ray, the clock injected): the gateway, InferenceClient and the
region federation share it, and unit tests move time by hand.

Not pybreaker, aiobreaker or purgatory: they wrap the protected call (`breaker.call(fn)` or a
context manager) and decide when it starts, but a handle caller does not choose its replica:
Serve's request router does, after the call is sent. So a breaker here is asked beforehand
which replicas to exclude and told afterwards which replica answered. pybreaker also reads
`datetime.now` and purgatory `time.time` (no injectable clock), purgatory's half-open state
lets every request through rather than one probe, and aiobreaker has had no release since 2021.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

Clock = Callable[[], float]
FORGET_AFTER_COOLOFFS = 10  # a target silent this long after its cool-off is probably gone


class BreakerConfig(BaseModel):
    """When a breaker opens and how it recovers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    failure_threshold: int = Field(
        5, ge=1, le=1000, description="Consecutive failures that open the circuit."
    )
    cooloff_s: float = Field(
        60.0, gt=0, le=3600, description="Time open before one probe request is let through."
    )
    probe_timeout_s: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="How long a probe holds the half-open circuit before another request may "
        "probe (the probe's request went elsewhere, or is still running).",
    )


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass
class CircuitBreaker:
    """One target's breaker. Closed: everything passes and failures are counted. Open:
    nothing passes until `cooloff_s` after the last failure. Half-open: one probe at a time;
    its success closes the circuit, its failure opens it again for another cool-off."""

    config: BreakerConfig = field(default_factory=BreakerConfig)
    clock: Clock = time.monotonic
    failures: int = 0  # consecutive
    tripped: bool = False  # open or half-open
    failed_at: float | None = None  # time of the last failure
    probe_since: float | None = None  # a probe is in flight since then
    # Told each transition (the breaker-transition metric); not part of the state.
    on_change: Callable[[BreakerState], None] | None = field(default=None, compare=False)

    @property
    def state(self) -> BreakerState:
        if not self.tripped:
            return BreakerState.CLOSED
        assert self.failed_at is not None
        if self.clock() - self.failed_at < self.config.cooloff_s:
            return BreakerState.OPEN
        return BreakerState.HALF_OPEN

    def available(self) -> bool:
        """Whether a request may go now, without claiming the probe."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        return state is BreakerState.HALF_OPEN and not self._probing()

    def allow(self) -> bool:
        """Whether a request may go now; in half-open, the caller becomes the probe."""
        if not self.available():
            return False
        if self.tripped:
            self.probe_since = self.clock()
            self._changed(BreakerState.HALF_OPEN)
        return True

    def record_success(self) -> None:
        if self.tripped:
            self._changed(BreakerState.CLOSED)
        self.failures, self.tripped, self.failed_at, self.probe_since = 0, False, None, None

    def record_failure(self) -> None:
        """Counted while closed; once open or half-open, any failure restarts the cool-off."""
        reopened = self.probe_since is not None  # the half-open probe failed
        self.failures += 1
        self.failed_at = self.clock()
        self.probe_since = None
        if self.failures >= self.config.failure_threshold:
            if not self.tripped or reopened:
                self._changed(BreakerState.OPEN)
            self.tripped = True

    def _changed(self, state: BreakerState) -> None:
        if self.on_change is not None:
            self.on_change(state)

    def release(self) -> None:
        """The probe ended without a verdict (it went elsewhere, or was refused as busy)."""
        self.probe_since = None

    def _probing(self) -> bool:
        return (
            self.probe_since is not None
            and self.clock() - self.probe_since < self.config.probe_timeout_s
        )


@dataclass
class ReplicaBreakers:
    """The breakers of one model's replicas, as one caller (a gateway replica, a client) sees
    them, keyed by replica (actor) id. Only replicas that failed have a breaker; a success
    forgets it, so the table stays as small as the set of misbehaving replicas."""

    config: BreakerConfig = field(default_factory=BreakerConfig)
    clock: Clock = time.monotonic
    breakers: dict[str, CircuitBreaker] = field(default_factory=dict)
    on_change: Callable[[BreakerState], None] | None = field(default=None, compare=False)

    def admit(self) -> tuple[frozenset[str], frozenset[str]]:
        """(replicas to exclude, half-open replicas whose probe this request holds). Open
        circuits are excluded; so are half-open ones whose probe another request holds."""
        self._forget_stale()
        excluded, probes = set(), set()
        for replica, breaker in self.breakers.items():
            if breaker.state is BreakerState.HALF_OPEN and breaker.allow():
                probes.add(replica)
            elif not breaker.available():
                excluded.add(replica)
        return frozenset(excluded), frozenset(probes)

    def settle(self, replica: str | None, ok: bool | None, probes: Iterable[str] = ()) -> None:
        """The outcome of one attempt: `replica` served it (None: unknown) and was healthy
        (True), failed (False) or gave no verdict (None); the other probes went unused."""
        for probe in probes:
            if probe != replica and probe in self.breakers:
                self.breakers[probe].release()
        if replica is None:
            return
        breaker = self.breakers.get(replica)
        if ok is True:
            if breaker is not None:
                breaker.record_success()
                del self.breakers[replica]
        elif ok is False:
            if breaker is None:
                breaker = self.breakers[replica] = CircuitBreaker(
                    self.config, self.clock, on_change=self.on_change
                )
            breaker.record_failure()
        elif breaker is not None:
            breaker.release()

    def state(self, replica: str) -> BreakerState:
        breaker = self.breakers.get(replica)
        return breaker.state if breaker is not None else BreakerState.CLOSED

    def _forget_stale(self) -> None:
        """Drop breakers whose replica has not been heard of for many cool-offs: most likely
        it is gone, and one that is not starts again from closed."""
        horizon = self.clock() - FORGET_AFTER_COOLOFFS * self.config.cooloff_s
        stale = [
            replica
            for replica, breaker in self.breakers.items()
            if breaker.failed_at is not None and breaker.failed_at < horizon
        ]
        for replica in stale:
            del self.breakers[replica]
