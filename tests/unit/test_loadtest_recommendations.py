"""Recommendations: each rule on the findings that should trigger it, and stays quiet otherwise."""

from __future__ import annotations

from typing import Any

from app.loadtest.analysis import (
    KindStats,
    Percentiles,
    ResourceUse,
    Scalability,
    StageStats,
    breaking_point,
    scalability,
)
from app.loadtest.config import Thresholds
from app.loadtest.recommendations import (
    Findings,
    capacity,
    decoding,
    errors,
    local_resources,
    queueing,
    recommend,
    saturation,
    scaling,
)


def stage(index: int, users: int, ok_rps: float, p95: float = 100.0, **fields: Any) -> StageStats:
    return StageStats(
        index=index,
        label=f"{users} users",
        offered=users,
        users=users,
        target_rps=None,
        ran=True,
        requests=100,
        ok=100,
        ok_rps=ok_rps,
        achieved_rps=ok_rps,
        latency_ms=Percentiles(count=100, p50=p95 / 2, p95=p95, p99=p95),
        **fields,
    )


def findings(stages: list[StageStats], source: str = "ray") -> Findings:
    broken = [
        s.model_copy(update={"breaches": ["p95 latency"]})
        if s.latency_ms.p95 and s.latency_ms.p95 > 1000
        else s
        for s in stages
    ]
    return Findings(
        broken, breaking_point(broken), scalability(broken, "users"), Thresholds(), source
    )


def test_capacity_from_the_stage_before_the_breaking_point() -> None:
    f = findings([stage(0, 1, 10), stage(1, 2, 20), stage(2, 4, 22, p95=3000)])
    text = capacity(f)
    assert text is not None
    assert text.startswith("Capacity: about 20.0 req/s (2 users); 4 users broke")
    assert "under about 14.0 req/s" in text


def test_capacity_when_the_first_stage_breaks_or_none_does() -> None:
    first = capacity(findings([stage(0, 1, 1, p95=5000)]))
    assert first is not None and "first stage (1 users) already broke" in first
    none = capacity(findings([stage(0, 1, 10), stage(1, 2, 20)]))
    assert none is not None and "No stage crossed" in none and "Add heavier stages" in none


def test_flattening_before_the_breaking_point() -> None:
    f = findings([stage(0, 1, 10), stage(1, 2, 20), stage(2, 4, 21), stage(3, 8, 21, p95=3000)])
    text = scaling(f)
    assert text is not None and "flattened from 2 users to 4 users" in text
    # the step into the breaking stage is the breaking point's to explain
    assert scaling(findings([stage(0, 1, 10), stage(1, 2, 10, p95=3000)])) is None


def test_linear_scaling_is_said() -> None:
    text = scaling(findings([stage(0, 1, 10), stage(1, 2, 20), stage(2, 4, 40)]))
    assert text is not None and "near-linearly" in text


def test_errors_by_status() -> None:
    f = findings(
        [
            stage(0, 1, 10),
            stage(1, 2, 20, errors={"429": 3}),
            stage(2, 4, 20, errors={"503": 9, "timeout": 1, "500": 2, "404": 1}),
        ]
    )
    text = errors(f)
    assert text is not None
    assert "429: rate limits" in text and "(from 2 users)" in text
    assert "503: replicas were full" in text and "(from 4 users)" in text
    assert (
        "timeouts" in text and "500: server errors" in text and "404: the server rejected" in text
    )
    assert errors(findings([stage(0, 1, 10)])) is None


def stream_stage(index: int, users: int, ttft: float, itl: float, total: float) -> StageStats:
    return stage(
        index,
        users,
        10 * users,
        ttft_ms=Percentiles(count=10, p50=ttft, p95=ttft),
        itl_ms=Percentiles(count=10, p50=itl, p95=itl),
        by_kind={
            "stream": KindStats(
                requests=10, errors=0, latency_ms=Percentiles(count=10, p50=total, p95=total)
            )
        },
    )


def test_ttft_dominating_means_queueing() -> None:
    f = findings([stream_stage(0, 1, 20, 10, 200), stream_stage(1, 8, 400, 10, 600)])
    text = queueing(f)
    assert text is not None and "queue before prefill" in text and "20 ms -> 400 ms" in text
    assert (
        queueing(findings([stream_stage(0, 1, 20, 10, 200), stream_stage(1, 8, 30, 10, 600)]))
        is None
    )


def test_itl_growth_means_decode_contention() -> None:
    f = findings([stream_stage(0, 1, 20, 10, 200), stream_stage(1, 8, 25, 40, 900)])
    text = decoding(f)
    assert text is not None and "10 ms to 40 ms" in text
    assert (
        decoding(findings([stream_stage(0, 1, 20, 10, 200), stream_stage(1, 8, 25, 12, 300)]))
        is None
    )


def test_cpu_saturation_and_idle_resources() -> None:
    hot = ResourceUse(samples=3, cpu_mean=95, cpu_max=100, memory_max=40)
    cold = ResourceUse(samples=3, cpu_mean=20, cpu_max=30, gpu_mean=15)
    text = saturation(findings([stage(0, 1, 10), stage(1, 2, 10, p95=3000, resources=hot)]))
    assert text is not None and "CPU at 95 %: CPU bound" in text
    idle = saturation(findings([stage(0, 1, 10), stage(1, 2, 10, p95=3000, resources=cold)]))
    assert idle is not None and "not saturated" in idle and "GPU 15 %" in idle


def test_saturation_falls_back_to_the_last_measured_stage() -> None:
    hot = ResourceUse(samples=1, cpu_mean=90, gpu_mean=97, memory_max=95)
    text = saturation(findings([stage(0, 1, 10, resources=hot), stage(1, 2, 10, p95=3000)]))
    assert text is not None
    assert "CPU at 90 %" in text and "GPU at 97 %" in text and "memory at 95 %" in text


def test_local_resources_note() -> None:
    assert local_resources(findings([stage(0, 1, 10)], source="local")) is not None
    assert local_resources(findings([stage(0, 1, 10)], source="ray")) is None


def test_recommend_collects_the_rules_that_fire() -> None:
    f = findings([stage(0, 1, 10), stage(1, 2, 12, p95=3000, errors={"503": 5})], source="local")
    texts = recommend(f)
    assert texts[0].startswith("Capacity")
    assert any(t.startswith("Errors by status") for t in texts)
    assert texts[-1].startswith("Resource use is this machine's")


def test_no_stage_ran() -> None:
    empty = StageStats(index=0, label="1 users", offered=1, users=1, target_rps=None, ran=False)
    f = Findings(
        [empty], None, Scalability(unit="users", index=None, steps=[]), Thresholds(), "ray"
    )
    assert recommend(f) == ["No stage ran: nothing to conclude (see the engine log)."]
