"""One decision tick's inputs (`Signals`) and the time-stamped windows that average them."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Signals:
    """What the policy sees at one tick. The names follow Serve's AutoscalingContext
    (`total_num_requests`, `total_queued_requests`, `running_replicas`) and the replica stats
    that `record_autoscaling_stats` reports (latency, errors, throughput)."""

    timestamp_s: float
    running_replicas: int
    # Running plus queued requests, as Serve's ctx.total_num_requests counts them.
    total_requests: float
    # Requests waiting at handles because no replica had a free slot.
    queued_requests: float
    # Concurrent requests one replica takes (the deployment's max_ongoing_requests).
    max_ongoing_requests: int
    p50_latency_ms: float | None = None
    p95_latency_ms: float | None = None
    error_rate: float | None = None
    tokens_per_s: float | None = None
    images_per_s: float | None = None
    # Continuous-engine replicas: sequences waiting inside them, and the mean share of their KV
    # cache budget in use (app.serving.engines).
    engine_queued: float | None = None
    kv_cache_utilization: float | None = None

    def __post_init__(self) -> None:
        if self.max_ongoing_requests < 1:
            raise ValueError("max_ongoing_requests must be at least 1")
        if self.running_replicas < 0 or self.total_requests < 0 or self.queued_requests < 0:
            raise ValueError("replica and request counts must not be negative")

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @property
    def demand(self) -> float:
        """Requests in flight, or more when the replicas' KV caches are fuller than their
        request slots: a replica whose cache is full takes no more work, whatever its slots
        say, so it counts as full (kv_cache_utilization x its slots)."""
        by_memory = (self.kv_cache_utilization or 0.0) * self.running_replicas
        return max(self.total_requests, by_memory * self.max_ongoing_requests)


class MetricWindow:
    """A time-stamped series kept for `span_s` seconds that answers averages over any shorter
    window ending now: the stable window (scale-down, sizing) and the panic window (bursts),
    as Knative's KPA keeps both over one series."""

    def __init__(self, span_s: float) -> None:
        if span_s <= 0:
            raise ValueError("span_s must be positive")
        self.span_s = span_s
        self._points: deque[tuple[float, float]] = deque()

    def __len__(self) -> int:
        return len(self._points)

    def add(self, t: float, value: float) -> None:
        if not math.isfinite(value):
            return  # a replica that reported NaN must not poison every later average
        if self._points and t < self._points[-1][0]:
            raise ValueError(f"time went backwards: {t} < {self._points[-1][0]}")
        self._points.append((t, value))
        while self._points and self._points[0][0] <= t - self.span_s:
            self._points.popleft()

    def average(self, now: float, window_s: float) -> float | None:
        """Mean of the samples in (now - window_s, now]; None when there are none."""
        values = self._recent(now, window_s)
        return sum(values) / len(values) if values else None

    def peak(self, now: float, window_s: float) -> float | None:
        values = self._recent(now, window_s)
        return max(values) if values else None

    def latest(self) -> float | None:
        return self._points[-1][1] if self._points else None

    def oldest_time(self) -> float | None:
        return self._points[0][0] if self._points else None

    def to_list(self) -> list[tuple[float, float]]:
        return list(self._points)

    @classmethod
    def from_list(cls, span_s: float, points: list[tuple[float, float]]) -> MetricWindow:
        window = cls(span_s)
        for t, value in points:
            window.add(float(t), float(value))
        return window

    def _recent(self, now: float, window_s: float) -> list[float]:
        """Samples in (now - window_s, now], newest first."""
        start = now - window_s
        values = []
        for t, v in reversed(self._points):
            if t <= start:
                break
            if t <= now:
                values.append(v)
        return values
