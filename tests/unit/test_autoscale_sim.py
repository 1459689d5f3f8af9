"""The autoscaling simulator: its queue, Serve's metric path and control loop around a policy, and
the figures the benchmark reports, on tiny traces worked out by hand."""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from ray.serve import autoscaling_policy
from ray.serve._private import autoscaling_state
from ray.serve._private.autoscaling_state import DeploymentAutoscalingState
from ray.serve._private.common import TimeStampedValue
from ray.serve._private.metrics_utils import time_weighted_average as serve_average
from ray.serve.config import AggregationFunction
from ray.serve.config import AutoscalingConfig as ServeConfig

from app.autoscaling import simulate
from app.autoscaling.report import ReplicaMetric
from app.autoscaling.serve_policy import FleetAutoscalingPolicy
from app.autoscaling.sim_summary import per_second_p95, summarize
from app.autoscaling.simulate import (
    Deployment,
    HandleMetrics,
    MetricsCadence,
    QueueModel,
    ReplicaModel,
    RunResult,
    SimClock,
    SimContext,
    Simulation,
    poisson_arrivals,
    time_weighted_average,
)
from tests.unit.test_autoscaling_store import FakeKV, make_store


def run_queue(queue: QueueModel, until: float, slots: int, tick: float = 0.1) -> None:
    for i in range(round(until / tick)):
        queue.advance(i * tick, (i + 1) * tick, slots)


# ---- the queue ---------------------------------------------------------------------------


def test_requests_take_free_slots_first_come_first_served() -> None:
    queue = QueueModel([0.0, 0.1, 0.2, 0.3, 2.5], service_s=1.0)
    run_queue(queue, 0.5, slots=2)
    assert queue.queued(0.5) == 2 and queue.in_flight(0.5) == 2
    run_queue(queue, 4.0, slots=2)
    assert queue.starts == pytest.approx([0.0, 0.1, 1.0, 1.1, 2.5])
    assert queue.latencies(4.0) == pytest.approx([1.0, 1.0, 1.8, 1.8, 1.0])


def test_a_removed_replica_finishes_its_requests_before_a_new_one_starts() -> None:
    queue = QueueModel([0.0, 0.0, 0.5], service_s=1.0)
    queue.advance(0.0, 0.1, slots=2)
    for i in range(1, 30):  # one replica left: its two requests run on, the third waits
        queue.advance(i * 0.1, (i + 1) * 0.1, slots=1)
    assert queue.starts == pytest.approx([0.0, 0.0, 1.0])


def test_at_zero_slots_requests_wait_and_count_until_the_end() -> None:
    queue = QueueModel([0.2, 0.4], service_s=0.5)
    run_queue(queue, 1.0, slots=0)
    assert queue.starts == [] and queue.queued(1.0) == 2
    assert queue.latencies(1.0) == pytest.approx([1.3, 1.1])


def test_completed_counts_finishes_inside_the_window() -> None:
    queue = QueueModel([0.0, 0.0, 0.0, 3.0], service_s=1.0)
    run_queue(queue, 4.0, slots=2)  # finishes at 1, 1, 2 and 4
    assert queue.completed(1.0, 30.0) == 2
    assert queue.completed(2.5, 1.0) == 1
    assert queue.completed(4.0, 3.0) == 2


def test_poisson_arrivals_follow_the_rate_and_the_seed() -> None:
    rates = [0.0] * 10 + [200.0] * 10
    first = poisson_arrivals(rates, np.random.default_rng(1))
    assert np.array_equal(first, poisson_arrivals(rates, np.random.default_rng(1)))
    assert first.min() >= 10.0 and np.all(np.diff(first) >= 0)
    assert abs(len(first) - 2000) < 150


# ---- Serve's metric path --------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_the_time_weighted_average_is_serves(seed: int) -> None:
    rng = np.random.default_rng(seed)
    times = np.cumsum(rng.random(6) + 0.1)
    points = [(float(t), float(v)) for t, v in zip(times, rng.integers(0, 20, 6), strict=True)]
    start = None if seed == 0 else float(times[0] + rng.normal(0, 1))
    last = float(rng.random() + 1e-3)
    ours = time_weighted_average(points, start, last)
    theirs = serve_average([TimeStampedValue(t, v) for t, v in points], start, None, last)
    assert (ours is None) == (theirs is None)
    if ours is not None:
        assert ours == pytest.approx(theirs)


def test_the_handle_metrics_give_what_serves_controller_computes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A replica that joins at t=5 shortens Serve's window: the series start where all have a
    point. Serve's own `_merge_and_aggregate_timeseries` on the series the handle pushes at
    6.001 must agree with HandleMetrics."""
    metrics = HandleMetrics(MetricsCadence(record_s=1.0, push_s=2.0, look_back_s=4.0))
    queued = [0, 0, 1, 3, 5, 2, 0]
    r0 = [2, 2, 3, 3, 3, 3, 2]
    r1 = {5: 1, 6: 2}
    for t in range(7):
        replicas = ["r0", "r1"] if t in r1 else ["r0"]
        metrics.observe(float(t), queued[t], r0[t] + r1.get(t, 0), replicas)
    metrics.observe(6.05, 0, 4, ["r0", "r1"])  # the push at 6.001

    def series(values: dict[int, int]) -> list[TimeStampedValue]:
        return [TimeStampedValue(float(t), float(v)) for t, v in values.items() if t > 2.001]

    pushed = [series(dict(enumerate(queued))), series(dict(enumerate(r0))), series(r1)]
    monkeypatch.setattr(autoscaling_state, "time", SimClock(6.5))
    config = SimpleNamespace(aggregation_function=AggregationFunction.MEAN)
    theirs = DeploymentAutoscalingState._merge_and_aggregate_timeseries(
        SimpleNamespace(_config=config),  # type: ignore[arg-type]
        pushed,
    )
    assert theirs == pytest.approx((6 * 1 + 4 * 0.5) / 1.5)
    assert metrics.total_requests(6.5, ["r0", "r1"]) == pytest.approx(theirs)
    assert metrics.queued_requests(6.5) == pytest.approx((3 + 5 + 2 + 0 * 0.5) / 3.5)


def test_serve_derives_the_handle_cadence_from_the_config() -> None:
    default = ServeConfig()
    cadence = MetricsCadence.serve(default.metrics_interval_s, default.look_back_period_s)
    assert (cadence.record_s, cadence.push_s, cadence.look_back_s) == (6.0, 10.0, 30.0)
    assert MetricsCadence.serve(1.0, 2.0).record_s == pytest.approx(0.4)


def test_replica_metric_names_are_the_adapters() -> None:
    assert ReplicaMetric.REQUESTS_PER_S.value == simulate.REQUESTS_PER_S
    assert ReplicaMetric.LATENCY_P50.value == simulate.LATENCY_P50_MS


def test_a_context_evaluates_its_metrics_only_when_read() -> None:
    calls: list[int] = []

    def total() -> float:
        calls.append(1)
        return 7.0

    ctx = SimContext(current_num_replicas=2, total_num_requests=total)
    assert ctx.current_num_replicas == 2 and calls == []
    assert ctx.total_num_requests == 7.0 and ctx.total_num_requests == 7.0
    assert calls == [1]


# ---- the control loop and the figures -------------------------------------------------------

ONE_SLOT = Deployment(
    ReplicaModel(service_s=1.0, slots=1, start_s=2.0),
    MetricsCadence(record_s=1.0, push_s=1.0, look_back_s=2.0),
    min_replicas=1,
    max_replicas=5,
    initial_replicas=1,
)


def test_a_scale_up_serves_after_the_start_time_and_costs_from_the_ask() -> None:
    arrivals = [0.5 * k for k in range(20)]  # 2/s against 1/s, then 2/s from t=5
    sim = Simulation(ONE_SLOT, arrivals, 0.0, 10.0, epoch_s=1000.0)
    seen: list[Any] = []

    def policy(ctx: Any) -> tuple[int, dict[str, Any]]:
        seen.append(ctx)
        calls = ctx.policy_state.get("calls", 0) + 1
        return (2 if ctx.current_time >= 1003.0 - 1e-9 else 1), {"calls": calls}

    result = sim.run(policy)
    assert sim.policy_state == {"calls": 100}  # the state comes back on every tick
    assert result.targets[29] == 1 and result.targets[30] == 2
    assert result.running[49] == 1 and result.running[50] == 2
    assert result.actions == [(pytest.approx(3.0), 1, 2)]
    assert seen[31].last_scale_up_time == pytest.approx(1003.0)
    assert sim.queue.starts == pytest.approx([0, 1, 2, 3, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9])
    summary = summarize(result, slo_s=2.0, window=(0.0, 10.0))
    assert summary.replica_hours == pytest.approx((3 * 1 + 7 * 2) / 3600)
    assert summary.actions == 1
    # Latencies 1, 1.5 | 2, 2.5 | 3, 3.5 | ... | 3, 2.5 | 2, 1.5 (the last five wait for
    # the end): seconds 1 to 8 have a p95 over 2 s; seconds 0 and 9 do not.
    assert summary.violation_s == 8


def test_the_controller_rounds_up_and_holds_the_bounds() -> None:
    sim = Simulation(ONE_SLOT, [], 0.0, 1.0)
    asked = iter([2.2, 9.0, 0.0] + [0.0] * 7)
    result = sim.run(lambda ctx: (next(asked), {}))
    assert [a[1:] for a in result.actions] == [(1, 3), (3, 5), (5, 1)]


def test_violation_seconds_use_each_seconds_p95_by_nearest_rank() -> None:
    arrivals = np.repeat([0.5, 1.5, 2.5], 20)
    latencies = np.full(60, 0.1)
    latencies[[20, 21, 40]] = 1.0  # two slow in second 1 reach its p95, one in second 2 not
    result = RunResult(1.0, np.array([2, 2, 4]), np.array([2, 2, 4]), arrivals, latencies)
    summary = summarize(result, 0.5, (0.0, 3.0), burst=(1.0, 30.0), capacity_per_s=10.0)
    assert summary.violation_s == 1
    assert summary.replica_hours == pytest.approx(8 / 3600)
    assert summary.covered_after_s == pytest.approx(1.0)  # 4 replicas x 10/s >= 30/s at t=2
    assert per_second_p95(np.array([0, 0, 1]), np.array([0.3, 0.1, 0.2])) == pytest.approx(
        [0.3, 0.2]
    )


# ---- the real policies in the loop ----------------------------------------------------------

FAST = Deployment(
    ReplicaModel(service_s=0.1, slots=5, start_s=2.0),
    MetricsCadence.serve(1.0, 2.0),
    min_replicas=1,
    max_replicas=20,
    initial_replicas=1,
)
EPOCH = 1_000_000 * 60.0


def step_load(rng_seed: int = 3) -> np.ndarray:
    """25/s (one replica at half of its 50/s) for 60 s, then 7x that for 60 s."""
    return poisson_arrivals([25.0] * 60 + [175.0] * 60, np.random.default_rng(rng_seed))


def first_scale_up(result: RunResult) -> float:
    return next(t for t, before, after in result.actions if after > before)


def test_serves_default_waits_out_its_look_back_and_upscale_delay(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = ServeConfig(min_replicas=1, max_replicas=20, target_ongoing_requests=3.5)
    deployment = Deployment(
        FAST.replica, MetricsCadence.serve(10.0, 30.0), 1, 20, initial_replicas=1
    )
    clock = SimClock()
    monkeypatch.setattr(autoscaling_policy, "time", clock)
    policy = autoscaling_policy._apply_autoscaling_config(
        autoscaling_policy.replica_queue_length_autoscaling_policy
    )
    sim = Simulation(deployment, step_load(), 0.0, 120.0, epoch_s=EPOCH, clock=clock)
    result = sim.run(policy, functools.partial(SimContext, config=config))
    # The load shows from the sample at 66 s, pushed at 70 s; then 30 s of upscale delay.
    assert 100.0 <= first_scale_up(result) <= 101.0


def test_our_adapter_answers_the_same_step_within_two_decision_periods() -> None:
    clock = SimClock()
    policy = FleetAutoscalingPolicy(
        {"predictive": {"enabled": False}},
        "m",
        "r",
        FAST.replica.slots,
        store=make_store(FakeKV(), clock),  # type: ignore[arg-type]
        clock=clock,
    )
    sim = Simulation(FAST, step_load(), 0.0, 120.0, epoch_s=EPOCH, clock=clock)
    result = sim.run(policy)
    # The step shows in the push at 61.001, so the decision at 62 s is the first that can see it.
    assert first_scale_up(result) == pytest.approx(62.0)
    summary = summarize(
        result,
        slo_s=0.2,
        window=(0.0, 120.0),
        burst=(60.0, 175.0),
        capacity_per_s=FAST.replica.capacity_per_s,
    )
    assert summary.covered_after_s is not None and summary.covered_after_s <= 2.0
    assert max(result.targets) <= math.ceil(175.0 / 3.5) + 2  # the backlog is not chased to max
