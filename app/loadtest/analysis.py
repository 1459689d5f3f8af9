"""Per-stage statistics from request records, the scalability index and the breaking point.

Pure: records, stage marks and resource samples in, results out; no network, no clock.

A request belongs to the stage in which it started (latency, errors, TTFT, ITL: what a
client sent at that load saw); throughput counts the requests that finished inside the
stage's window, divided by the window. Throughput is goodput: successful requests only, so
a server that answers 503 quickly does not look like it scales.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections import Counter
from collections.abc import Sequence
from itertools import pairwise

from pydantic import BaseModel

from app.loadtest.config import LoadTestConfig, Stage, Thresholds
from app.loadtest.records import END, RequestRecord, StageMark
from app.loadtest.resources import ResourceSample

CUT_SHORT = 0.9
"""A stage that ran less than this share of its duration (the run was stopped) is reported,
but left out of the scalability index: its few seconds do not measure its load."""


class Percentiles(BaseModel):
    count: int = 0
    mean: float | None = None
    p50: float | None = None
    p95: float | None = None
    p99: float | None = None


class ResourceUse(BaseModel):
    samples: int
    cpu_mean: float | None = None
    cpu_max: float | None = None
    memory_mean: float | None = None
    memory_max: float | None = None
    gpu_mean: float | None = None
    gpu_max: float | None = None


class KindStats(BaseModel):
    requests: int
    errors: int
    latency_ms: Percentiles


class StageStats(BaseModel):
    index: int
    label: str
    offered: float
    users: int
    target_rps: float | None
    ran: bool
    cut_short: bool = False
    start: float | None = None
    duration_s: float = 0.0
    requests: int = 0
    ok: int = 0
    achieved_rps: float = 0.0
    ok_rps: float = 0.0
    output_tokens_per_s: float = 0.0
    error_rate: float = 0.0
    errors: dict[str, int] = {}
    latency_ms: Percentiles = Percentiles()
    ttft_ms: Percentiles = Percentiles()
    itl_ms: Percentiles = Percentiles()
    by_kind: dict[str, KindStats] = {}
    resources: ResourceUse | None = None
    breaches: list[str] = []


class ScalabilityStep(BaseModel):
    """From one stage to the next: goodput gained per unit of offered load gained, and that
    relative to the previous stage's goodput per unit (1 = linear, 0 = flat, < 0 = worse)."""

    from_stage: int
    to_stage: int
    per_unit: float | None
    index: float | None


class Scalability(BaseModel):
    unit: str
    index: float | None
    steps: list[ScalabilityStep]


class BreakingPoint(BaseModel):
    stage: int
    label: str
    offered: float
    reasons: list[str]
    last_good_stage: int | None
    capacity_rps: float | None


def percentiles(values: Sequence[float]) -> Percentiles:
    if not values:
        return Percentiles()
    ordered = sorted(values)
    return Percentiles(
        count=len(ordered),
        mean=sum(ordered) / len(ordered),
        p50=_rank(ordered, 50),
        p95=_rank(ordered, 95),
        p99=_rank(ordered, 99),
    )


def _rank(ordered: Sequence[float], pct: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    position = (len(ordered) - 1) * pct / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def stage_windows(
    stages: Sequence[Stage], marks: Sequence[StageMark], run_end: float | None
) -> list[tuple[float, float] | None]:
    """Each stage's (start, end) in wall-clock seconds from the engine's marks; None for a
    stage the run never reached. A stage cut short ends at `run_end`."""
    starts = {mark.index: mark.at for mark in marks if mark.index != END}
    end_mark = next((mark.at for mark in marks if mark.index == END), None)
    windows: list[tuple[float, float] | None] = []
    for index in range(len(stages)):
        start = starts.get(index)
        if start is None:
            windows.append(None)
            continue
        end = starts.get(index + 1, end_mark if end_mark is not None else run_end)
        windows.append((start, max(start, end if end is not None else start)))
    return windows


def assign(
    records: Sequence[RequestRecord], windows: Sequence[tuple[float, float] | None]
) -> list[list[RequestRecord]]:
    """Records by the stage they started in; those before the first or after the last
    window (start-up, shutdown) belong to none."""
    known = [(w[0], w[1], i) for i, w in enumerate(windows) if w is not None]
    starts = [start for start, _, _ in known]
    groups: list[list[RequestRecord]] = [[] for _ in windows]
    for record in records:
        position = bisect_right(starts, record.start) - 1
        if position >= 0 and record.start < known[position][1]:
            groups[known[position][2]].append(record)
    return groups


def stage_stats(
    index: int,
    stage: Stage,
    window: tuple[float, float] | None,
    started: Sequence[RequestRecord],
    records: Sequence[RequestRecord],
    samples: Sequence[ResourceSample],
    thresholds: Thresholds,
) -> StageStats:
    base = StageStats(
        index=index,
        label=stage.label,
        offered=stage.offered,
        users=stage.user_count,
        target_rps=stage.rps,
        ran=window is not None,
    )
    if window is None:
        return base
    start, end = window
    duration = max(end - start, 1e-9)
    finished = [r for r in records if start <= r.end < end]
    ok_finished = [r for r in finished if r.ok]
    errors = Counter(r.status for r in started if not r.ok)
    streams = [r for r in started if r.ok and r.ttft_ms is not None]
    stats = base.model_copy(
        update={
            "start": start,
            "duration_s": end - start,
            "cut_short": end - start < CUT_SHORT * stage.duration_s,
            "requests": len(started),
            "ok": len(started) - sum(errors.values()),
            "achieved_rps": len(finished) / duration,
            "ok_rps": len(ok_finished) / duration,
            "output_tokens_per_s": sum(r.output_tokens or 0 for r in ok_finished) / duration,
            "error_rate": sum(errors.values()) / len(started) if started else 0.0,
            "errors": dict(sorted(errors.items())),
            "latency_ms": percentiles([r.latency_ms for r in started if r.ok]),
            "ttft_ms": percentiles([r.ttft_ms for r in streams if r.ttft_ms is not None]),
            "itl_ms": percentiles([gap for r in streams for gap in r.itl_ms]),
            "by_kind": _by_kind(started),
            "resources": resource_use([s for s in samples if start <= s.at < end]),
        }
    )
    return stats.model_copy(update={"breaches": breaches(stats, thresholds)})


def _by_kind(records: Sequence[RequestRecord]) -> dict[str, KindStats]:
    kinds = sorted({r.kind.value for r in records})
    return {
        kind: KindStats(
            requests=sum(1 for r in records if r.kind == kind),
            errors=sum(1 for r in records if r.kind == kind and not r.ok),
            latency_ms=percentiles([r.latency_ms for r in records if r.kind == kind and r.ok]),
        )
        for kind in kinds
    }


def resource_use(samples: Sequence[ResourceSample]) -> ResourceUse | None:
    if not samples:
        return None

    def mean_max(values: list[float | None]) -> tuple[float | None, float | None]:
        present = [v for v in values if v is not None]
        return (sum(present) / len(present), max(present)) if present else (None, None)

    cpu = mean_max([s.cpu_percent for s in samples])
    memory = mean_max([s.memory_percent for s in samples])
    gpu = mean_max([s.gpu_percent for s in samples])
    return ResourceUse(
        samples=len(samples),
        cpu_mean=cpu[0],
        cpu_max=cpu[1],
        memory_mean=memory[0],
        memory_max=memory[1],
        gpu_mean=gpu[0],
        gpu_max=gpu[1],
    )


def breaches(stats: StageStats, thresholds: Thresholds) -> list[str]:
    """Which thresholds the stage crossed, in words."""
    if not stats.ran:
        return []
    if stats.requests == 0:
        return ["no request finished in the stage"]
    found = []
    p95 = stats.latency_ms.p95
    if p95 is None or p95 > thresholds.p95_ms:
        shown = "no successful request" if p95 is None else f"{p95:.0f} ms"
        found.append(f"p95 latency {shown} > {thresholds.p95_ms:g} ms")
    if stats.error_rate > thresholds.error_rate:
        found.append(f"error rate {stats.error_rate:.1%} > {thresholds.error_rate:.1%}")
    ttft = stats.ttft_ms.p95
    if thresholds.ttft_p95_ms is not None and ttft is not None and ttft > thresholds.ttft_p95_ms:
        found.append(f"p95 time to first token {ttft:.0f} ms > {thresholds.ttft_p95_ms:g} ms")
    return found


def analyse_stages(
    config: LoadTestConfig,
    records: Sequence[RequestRecord],
    marks: Sequence[StageMark],
    samples: Sequence[ResourceSample],
    run_end: float | None,
) -> list[StageStats]:
    windows = stage_windows(config.stages, marks, run_end)
    groups = assign(records, windows)
    return [
        stage_stats(i, stage, windows[i], groups[i], records, samples, config.thresholds)
        for i, stage in enumerate(config.stages)
    ]


def scalability(stages: Sequence[StageStats], unit: str) -> Scalability:
    """Steps between consecutive stages that ran in full; the overall index spans the first
    to the last of them: (goodput ratio - 1) / (offered-load ratio - 1)."""
    ran = [s for s in stages if s.ran and not s.cut_short]
    steps = [_step(a, b) for a, b in pairwise(ran)]
    overall = _step(ran[0], ran[-1]).index if len(ran) > 1 else None
    return Scalability(unit=unit, index=overall, steps=steps)


def _step(a: StageStats, b: StageStats) -> ScalabilityStep:
    load_gain = b.offered - a.offered
    per_unit = (b.ok_rps - a.ok_rps) / load_gain if load_gain else None
    baseline = a.ok_rps / a.offered if a.offered else 0.0
    index = per_unit / baseline if per_unit is not None and baseline > 0 else None
    return ScalabilityStep(from_stage=a.index, to_stage=b.index, per_unit=per_unit, index=index)


def breaking_point(stages: Sequence[StageStats]) -> BreakingPoint | None:
    """The first stage that crossed a threshold, with the goodput of the stage before it as
    the capacity estimate."""
    previous: StageStats | None = None
    for stage in stages:
        if stage.breaches:
            return BreakingPoint(
                stage=stage.index,
                label=stage.label,
                offered=stage.offered,
                reasons=stage.breaches,
                last_good_stage=previous.index if previous else None,
                capacity_rps=previous.ok_rps if previous else None,
            )
        if stage.ran:
            previous = stage
    return None
