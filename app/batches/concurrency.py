"""How many batch lines a worker keeps in flight: additive increase, multiplicative decrease
(AIMD), so batches fill spare capacity and give it back the moment replicas say 429 or 503.

Like TCP, it starts with slow start: until the first overload the limit grows by `increase`
per success, doubling each round trip with the default of 1, instead of by `increase` per
window of successes. Additive increase alone takes about ceiling²/2 lines to reach the ceiling
(some 500 lines at 32), most of a small batch run below its fair share; slow start takes
ceiling - initial lines. Slow start ends at the first overload, for the worker's lifetime."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from pydantic import BaseModel, ConfigDict, Field, model_validator


class AIMDConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    initial: float = Field(2.0, ge=1, description="Lines in flight at start.")
    minimum: float = Field(1.0, ge=1, description="Never fewer lines in flight than this.")
    ceiling: float = Field(32.0, ge=1, description="Never more lines in flight than this.")
    increase: float = Field(
        1.0, gt=0, description="Lines added per window of successes (one per line in flight)."
    )
    decrease: float = Field(0.5, gt=0, lt=1, description="Factor applied on an overload.")
    pause_s: float = Field(
        1.0, gt=0, description="Pause after an overload that gave no Retry-After."
    )
    slow_start: bool = Field(
        True,
        description="Until the first overload, grow by one line per success (doubling each "
        "window) instead of one per window.",
    )

    @model_validator(mode="after")
    def _bounds(self) -> AIMDConfig:
        if not self.minimum <= self.initial <= self.ceiling:
            raise ValueError("need minimum <= initial <= ceiling")
        return self


class AIMDLimit:
    """The limit itself. Overloads arriving while paused (the other lines of the same burst)
    extend the pause but do not cut the limit again: one cut per congestion event."""

    def __init__(
        self, config: AIMDConfig | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config or AIMDConfig()
        self.clock = clock
        self.limit = self.config.initial
        self.paused_until = 0.0
        self.slow_start = self.config.slow_start  # until the first overload

    def available(self, in_flight: int) -> int:
        """How many more lines may start now."""
        if self.clock() < self.paused_until:
            return 0
        return max(0, math.floor(self.limit) - in_flight)

    def pause_left(self) -> float:
        return max(0.0, self.paused_until - self.clock())

    def on_success(self) -> None:
        step = self.config.increase if self.slow_start else self.config.increase / self.limit
        self.limit = min(self.config.ceiling, self.limit + step)

    def on_overload(self, retry_after_s: float | None = None) -> float:
        """Record a 429/503; returns how long this worker now waits before starting lines."""
        now = self.clock()
        self.slow_start = False
        if now >= self.paused_until:
            self.limit = max(self.config.minimum, self.limit * self.config.decrease)
        wait = self.config.pause_s if retry_after_s is None else max(0.0, retry_after_s)
        self.paused_until = max(self.paused_until, now + wait)
        return wait
