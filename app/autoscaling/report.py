"""What each replica reports to the autoscaling policy through Serve's
`record_autoscaling_stats`: its load, latency and errors from the fleet's PerfTracker window,
and the work it produced since its last report (tokens or images per second, batch fill)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from app.fleet.stats import PerfSnapshot


class ReplicaMetric(StrEnum):
    """Names of the figures replicas report; Serve hands each to the policy, averaged over its
    look-back window, as ctx.aggregated_metrics[name][replica_id]."""

    ONGOING = "ongoing_requests"
    CAPACITY = "capacity"
    LATENCY_P50 = "latency_p50_ms"
    LATENCY_P95 = "latency_p95_ms"
    LATENCY_P99 = "latency_p99_ms"
    ERROR_RATE = "error_rate"
    REQUESTS_PER_S = "requests_per_s"
    TOKENS_PER_S = "tokens_per_s"
    IMAGES_PER_S = "images_per_s"
    BATCH_FILL = "batch_fill"
    # From a continuous-engine replica (app.serving.engines.EngineStats.figures).
    ENGINE_QUEUED = "engine_queued"
    ENGINE_RUNNING = "engine_running"
    KV_CACHE_UTILIZATION = "kv_cache_utilization"


@dataclass(frozen=True)
class WorkTotals:
    """A model service's running totals since it started (ModelService keeps them)."""

    batches: int = 0
    batched_requests: int = 0
    tokens: int = 0  # generated (completion) tokens
    images: int = 0


@dataclass
class WorkRates:
    """Turns running totals into per-report figures: each call covers the time since the
    previous one, so Serve's look-back average over the reports is the rate over its window."""

    max_batch_size: int
    clock: Callable[[], float] = time.monotonic
    _last: WorkTotals = field(default_factory=WorkTotals)
    _at: float | None = None

    def advance(self, totals: WorkTotals) -> dict[ReplicaMetric, float]:
        now = self.clock()
        last, at = self._last, self._at
        self._last, self._at = totals, now
        figures: dict[ReplicaMetric, float] = {}
        if at is not None and now > at:
            elapsed = now - at
            figures[ReplicaMetric.TOKENS_PER_S] = (totals.tokens - last.tokens) / elapsed
            figures[ReplicaMetric.IMAGES_PER_S] = (totals.images - last.images) / elapsed
        batches = totals.batches - last.batches
        if batches > 0:
            mean = (totals.batched_requests - last.batched_requests) / batches
            figures[ReplicaMetric.BATCH_FILL] = mean / max(1, self.max_batch_size)
        return figures


def replica_stats(
    perf: PerfSnapshot,
    ongoing: int,
    capacity: int,
    work: dict[ReplicaMetric, float] | None = None,
) -> dict[str, float]:
    """One replica's report. Serve takes numbers only, so figures not measured (no request in
    the window, no batch since the last report) are left out rather than sent as None."""
    stats = {
        ReplicaMetric.ONGOING.value: float(ongoing),
        ReplicaMetric.CAPACITY.value: float(capacity),
        ReplicaMetric.REQUESTS_PER_S.value: float(perf.throughput),
        ReplicaMetric.ERROR_RATE.value: 1.0 - perf.success_rate,
    }
    measured = {
        ReplicaMetric.LATENCY_P50: perf.p50_ms,
        ReplicaMetric.LATENCY_P95: perf.p95_ms,
        ReplicaMetric.LATENCY_P99: perf.p99_ms,
        **(work or {}),
    }
    for name, value in measured.items():
        if value is not None and math.isfinite(value):
            stats[name.value] = float(value)
    return stats
