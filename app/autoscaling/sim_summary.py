"""Figures from one simulated run (app.autoscaling.simulate): seconds over the SLO by per-second
p95, replica-hours, scaling actions, and how soon a burst was covered."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from app.autoscaling.simulate import RunResult


@dataclass(frozen=True)
class Summary:
    """One run's figures over its measured window."""

    violation_s: int  # seconds whose requests' p95 latency exceeded the SLO
    seconds: int
    replica_hours: float
    actions: int
    p95_s: float
    covered_after_s: float | None = None  # until the target's capacity covered the burst


def summarize(
    result: RunResult,
    slo_s: float,
    window: tuple[float, float],
    *,
    start_s: float = 0.0,
    burst: tuple[float, float] | None = None,
    capacity_per_s: float | None = None,
) -> Summary:
    """Figures over `window` (seconds from the origin; the run began at `start_s`). `burst` is
    (when, rate): covered_after_s is how long until the target could serve that rate."""
    lo, hi = window
    first = max(0, round((lo - start_s) / result.tick_s))
    last = min(len(result.targets), round((hi - start_s) / result.tick_s))
    replica_hours = float(result.targets[first:last].sum()) * result.tick_s / 3600
    actions = sum(1 for t, _, _ in result.actions if lo <= t < hi)
    inside = (result.arrivals >= lo) & (result.arrivals < hi)
    latencies = result.latencies[inside]
    seconds = np.floor(result.arrivals[inside] - lo).astype(np.int64)
    p95 = float(np.percentile(latencies, 95)) if len(latencies) else 0.0
    covered = None
    if burst is not None and capacity_per_s is not None:
        covered = _covered_after(result, start_s, burst, capacity_per_s)
    return Summary(
        violation_s=int((per_second_p95(seconds, latencies) > slo_s).sum()),
        seconds=round(hi - lo),
        replica_hours=replica_hours,
        actions=actions,
        p95_s=p95,
        covered_after_s=covered,
    )


def per_second_p95(seconds: np.ndarray, latencies: np.ndarray) -> np.ndarray:
    """Nearest-rank p95 of the latencies in each second that has any."""
    if len(latencies) == 0:
        return np.zeros(0)
    order = np.lexsort((latencies, seconds))
    seconds, latencies = seconds[order], latencies[order]
    bounds = np.flatnonzero(np.diff(seconds)) + 1
    first = np.concatenate(([0], bounds))
    counts = np.diff(np.concatenate((first, [len(seconds)])))
    rank = first + np.ceil(0.95 * counts - 1e-9).astype(np.int64) - 1
    return latencies[rank]


def _covered_after(
    result: RunResult, start_s: float, burst: tuple[float, float], capacity_per_s: float
) -> float | None:
    at, rate = burst
    first = max(0, math.ceil((at - start_s) / result.tick_s - 1e-9))
    covered = np.flatnonzero(result.targets[first:] * capacity_per_s >= rate)
    if len(covered) == 0:
        return None
    return start_s + (first + int(covered[0])) * result.tick_s - at
