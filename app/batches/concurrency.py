"""How many batch lines a worker keeps in flight: additive increase, multiplicative decrease
(AIMD), so batches fill spare capacity and give it back the moment replicas say 429 or 503.

Like TCP, it starts with slow start: until the first overload the limit grows by `increase`
per success, doubling each round trip with the default of 1, instead of by `increase` per
window of successes. Additive increase alone takes about ceiling²/2 lines to reach the ceiling
(some 500 lines at 32), most of a small batch run below its fair share; slow start takes
ceiling - initial lines. Slow start ends at the first overload, for the worker's lifetime.

Each model has its own limit (ModelLimits): a model whose replicas answer 429 slows and pauses
its own lines, while another model's lines, from the same batch or another, keep their pace."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping

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
    total: int = Field(
        128, ge=1, description="Never more lines in flight than this, all models together."
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


class ModelLimits:
    """One AIMDLimit per model, created with the model's first line, under one cap on the
    lines in flight for all models together (`total`)."""

    def __init__(
        self, config: AIMDConfig | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config or AIMDConfig()
        self.clock = clock
        self.limits: dict[str, AIMDLimit] = {}

    def of(self, model: str) -> AIMDLimit:
        limit = self.limits.get(model)
        if limit is None:
            limit = self.limits[model] = AIMDLimit(self.config, clock=self.clock)
        return limit

    def available(self, model: str | None, in_flight: Mapping[str, int]) -> int:
        """How many more of this model's lines may start now; for lines whose model is not
        known yet (a queue not read from yet), a new limit's `initial`."""
        total_left = self.config.total - sum(in_flight.values())
        if model is None:
            return max(0, min(total_left, math.floor(self.config.initial)))
        return max(0, min(total_left, self.of(model).available(in_flight.get(model, 0))))

    def describe(self, in_flight: Mapping[str, int]) -> dict[str, dict[str, float]]:
        """Per model: its limit, lines in flight and pause left (the worker's stats)."""
        return {
            model: {
                "limit": round(limit.limit, 2),
                "in_flight": in_flight.get(model, 0),
                "paused_s": round(limit.pause_left(), 3),
            }
            for model, limit in sorted(self.limits.items())
        }
