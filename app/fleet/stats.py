"""Per-replica performance figures: a latency moving average and percentiles over a sliding
window, success rate and throughput. Replicas report them as Serve routing stats (every router
receives them) and in heartbeats to the router actor."""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PerfSnapshot:
    latency_ms: float | None  # exponential moving average; None with no recent success
    p50_ms: float | None
    p99_ms: float | None
    success_rate: float
    throughput: float  # completed requests per second over the window
    completed: int  # in the window
    failed: int  # in the window
    p95_ms: float | None = None  # the autoscaler's latency signal (its SLO is a p95)

    def as_dict(self) -> dict[str, float | int | None]:
        return {
            "latency_ms": self.latency_ms,
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
            "p95_ms": self.p95_ms,
            "success_rate": self.success_rate,
            "throughput": self.throughput,
            "completed": self.completed,
            "failed": self.failed,
        }


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of already sorted values (None when empty)."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


class PerfTracker:
    """Thread-safe recorder of request outcomes; cheap enough to call on every request."""

    def __init__(
        self,
        window_s: float = 30.0,
        alpha: float = 0.2,
        max_samples: int = 2048,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._window_s = window_s
        self._alpha = alpha
        self._clock = clock
        self._lock = threading.Lock()
        self._samples: deque[tuple[float, float, bool]] = deque(maxlen=max_samples)
        self._ema: float | None = None

    def record(self, latency_s: float, ok: bool = True) -> None:
        ms = latency_s * 1000.0
        with self._lock:
            self._samples.append((self._clock(), ms, ok))
            if ok:
                self._ema = ms if self._ema is None else self._ema + self._alpha * (ms - self._ema)

    def snapshot(self) -> PerfSnapshot:
        now = self._clock()
        with self._lock:
            while self._samples and now - self._samples[0][0] > self._window_s:
                self._samples.popleft()
            samples = list(self._samples)
            ema = self._ema
        latencies = sorted(ms for _, ms, ok in samples if ok)
        failed = sum(1 for *_, ok in samples if not ok)
        span = max(1.0, min(self._window_s, now - samples[0][0])) if samples else self._window_s
        return PerfSnapshot(
            # No success in the window: the average is stale, so say unknown and let routers
            # treat the replica as average until it has been measured again.
            latency_ms=ema if latencies else None,
            p50_ms=percentile(latencies, 50),
            p99_ms=percentile(latencies, 99),
            p95_ms=percentile(latencies, 95),
            success_rate=(len(samples) - failed) / len(samples) if samples else 1.0,
            throughput=len(samples) / span,
            completed=len(samples),
            failed=failed,
        )
