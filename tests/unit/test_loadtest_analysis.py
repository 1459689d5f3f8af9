"""Per-stage statistics, the scalability index and the breaking point, from synthetic records."""

from __future__ import annotations

import pytest

from app.loadtest.analysis import (
    analyse_stages,
    assign,
    breaking_point,
    percentiles,
    resource_use,
    scalability,
    stage_windows,
)
from app.loadtest.config import LoadTestConfig, RequestKind, build_config
from app.loadtest.records import END, OK, RequestRecord, StageMark
from app.loadtest.resources import ResourceSample

T0 = 1_000_000.0


def make_config(users: list[int], seconds: float = 10, **thresholds: float) -> LoadTestConfig:
    return build_config(
        {
            "base_url": "http://127.0.0.1:8000",
            "stages": [{"duration_s": seconds, "users": n} for n in users],
            "thresholds": {"p95_ms": 1000, "error_rate": 0.05, **thresholds},
        }
    )


def marks(count: int, seconds: float = 10) -> list[StageMark]:
    return [StageMark(i, T0 + i * seconds) for i in range(count)] + [
        StageMark(END, T0 + count * seconds)
    ]


def steady(
    stage: int, rps: float, latency_ms: float, status: str = OK, seconds: float = 10
) -> list[RequestRecord]:
    """`rps` requests a second through stage `stage`, each taking `latency_ms`."""
    n = int(rps * seconds)
    start = T0 + stage * seconds
    return [RequestRecord(RequestKind.CHAT, start + i / rps, latency_ms, status) for i in range(n)]


def test_percentiles_interpolate_like_numpy() -> None:
    p = percentiles([float(v) for v in range(1, 101)])
    assert (p.count, p.p50, p.p95, p.p99) == (100, 50.5, pytest.approx(95.05), pytest.approx(99.01))
    assert percentiles([]).p95 is None
    assert percentiles([7.0]).p99 == 7.0


def test_windows_from_marks_and_a_run_cut_short() -> None:
    config = make_config([1, 2, 4])
    assert stage_windows(config.stages, marks(3), None) == [
        (T0, T0 + 10),
        (T0 + 10, T0 + 20),
        (T0 + 20, T0 + 30),
    ]
    cut = [StageMark(0, T0), StageMark(1, T0 + 10)]
    assert stage_windows(config.stages, cut, run_end=T0 + 13) == [
        (T0, T0 + 10),
        (T0 + 10, T0 + 13),
        None,
    ]


def test_records_belong_to_the_stage_they_started_in() -> None:
    windows = [(T0, T0 + 10), (T0 + 10, T0 + 20)]
    early = RequestRecord(RequestKind.CHAT, T0 - 1, 1, OK)
    first = RequestRecord(RequestKind.CHAT, T0 + 9.9, 500, OK)  # ends in the second window
    second = RequestRecord(RequestKind.CHAT, T0 + 10, 1, OK)
    late = RequestRecord(RequestKind.CHAT, T0 + 20, 1, OK)
    assert assign([early, first, second, late], windows) == [[first], [second]]


def test_stage_stats() -> None:
    config = make_config([1])
    records = [
        *steady(0, 10, 100),
        RequestRecord(
            RequestKind.STREAM, T0 + 1, 300, OK, ttft_ms=50, itl_ms=[10, 20], output_tokens=3
        ),
        RequestRecord(RequestKind.CHAT, T0 + 2, 5, "503"),
        RequestRecord(RequestKind.EMBEDDING, T0 + 3, 30000, "timeout"),
    ]
    samples = [
        ResourceSample(T0 + 1, cpu_percent=50, memory_used_bytes=1, memory_total_bytes=4),
        ResourceSample(T0 + 5, cpu_percent=70, memory_used_bytes=3, memory_total_bytes=4),
        ResourceSample(T0 + 50, cpu_percent=99),  # after the stage: not counted
    ]
    [stage] = analyse_stages(config, records, marks(1), samples, None)
    assert stage.requests == 103 and stage.ok == 101
    assert stage.errors == {"503": 1, "timeout": 1}
    assert stage.error_rate == pytest.approx(2 / 103)
    # the timeout and the last steady request end at or after the window's end: not counted
    assert stage.achieved_rps == pytest.approx(101 / 10)
    assert stage.ok_rps == pytest.approx(100 / 10)
    assert stage.ttft_ms.p50 == 50 and stage.itl_ms.count == 2
    assert stage.by_kind["chat"].requests == 101 and stage.by_kind["chat"].errors == 1
    assert stage.resources is not None
    assert (stage.resources.cpu_mean, stage.resources.cpu_max) == (60, 70)
    assert stage.resources.memory_max == 75
    assert stage.breaches == []


def test_breaking_point_on_p95() -> None:
    config = make_config([1, 2, 4, 8])
    records = steady(0, 10, 100) + steady(1, 20, 120) + steady(2, 25, 1500) + steady(3, 25, 3000)
    stages = analyse_stages(config, records, marks(4), [], None)
    bp = breaking_point(stages)
    assert bp is not None
    assert (bp.stage, bp.label, bp.last_good_stage) == (2, "4 users", 1)
    assert bp.reasons == ["p95 latency 1500 ms > 1000 ms"]
    assert bp.capacity_rps == pytest.approx(20, rel=0.05)
    assert stages[3].breaches  # later stages are flagged too, the first one counts


def test_breaking_point_on_error_rate() -> None:
    config = make_config([1, 2])
    records = steady(0, 10, 100) + steady(1, 18, 100) + steady(1, 2, 5, status="503")
    bp = breaking_point(analyse_stages(config, records, marks(2), [], None))
    assert bp is not None and bp.stage == 1
    assert bp.reasons == ["error rate 10.0% > 5.0%"]


def test_ttft_threshold_only_when_set() -> None:
    stream = [
        RequestRecord(RequestKind.STREAM, T0 + i / 10, 200, OK, ttft_ms=900) for i in range(100)
    ]
    assert breaking_point(analyse_stages(make_config([1]), stream, marks(1), [], None)) is None
    strict = make_config([1], ttft_p95_ms=500)
    bp = breaking_point(analyse_stages(strict, stream, marks(1), [], None))
    assert bp is not None and bp.last_good_stage is None and bp.capacity_rps is None
    assert "time to first token 900 ms > 500 ms" in bp.reasons[0]


def test_no_breaking_point_and_stages_not_run() -> None:
    config = make_config([1, 2, 4])
    records = steady(0, 10, 100) + steady(1, 20, 100)
    cut = [StageMark(0, T0), StageMark(1, T0 + 10)]
    stages = analyse_stages(config, records, cut, [], run_end=T0 + 20)
    assert [s.ran for s in stages] == [True, True, False]
    assert breaking_point(stages) is None
    short = analyse_stages(config, records, cut, [], run_end=T0 + 12)
    assert [s.cut_short for s in short] == [False, True, False]
    assert scalability(short, "users").steps == []  # the cut stage measures nothing


def test_a_stage_with_no_finished_request_breaks() -> None:
    config = make_config([1, 2])
    stages = analyse_stages(config, steady(0, 10, 100), marks(2), [], None)
    assert stages[1].breaches == ["no request finished in the stage"]


def test_scalability_index() -> None:
    config = make_config([1, 2, 4, 8])
    linear_then_flat = steady(0, 10, 50) + steady(1, 20, 50) + steady(2, 40, 50) + steady(3, 40, 50)
    result = scalability(analyse_stages(config, linear_then_flat, marks(4), [], None), "users")
    # a request or two crossing a stage boundary moves the numbers by about 1 %
    assert [s.index for s in result.steps] == pytest.approx([1.0, 1.0, 0.0], abs=0.03)
    assert result.steps[0].per_unit == pytest.approx(10, abs=0.2)
    # overall, 1 -> 8 users: goodput x4 for load x8 -> (4 - 1) / (8 - 1)
    assert result.index == pytest.approx(3 / 7, abs=0.03)


def test_scalability_with_one_stage_or_zero_goodput() -> None:
    one = scalability(
        analyse_stages(make_config([1]), steady(0, 10, 50), marks(1), [], None), "users"
    )
    assert one.index is None and one.steps == []
    failing = steady(0, 10, 5, status="500") + steady(1, 10, 5)
    two = scalability(analyse_stages(make_config([1, 2]), failing, marks(2), [], None), "users")
    assert two.steps[0].index is None


def test_resource_use_without_gpu() -> None:
    use = resource_use([ResourceSample(T0, cpu_percent=10), ResourceSample(T0 + 1, gpu_percent=80)])
    assert use is not None
    assert (use.cpu_mean, use.gpu_max, use.memory_mean) == (10, 80, None)
    assert resource_use([]) is None
