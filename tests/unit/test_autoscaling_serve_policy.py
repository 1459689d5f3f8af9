"""The Serve adapter: Signals from Serve's real AutoscalingContext, decisions through Serve's own
wrapper, history per minute, and state rebuilt after a controller restart."""

from __future__ import annotations

import logging
import math
from typing import Any

import pytest
from ray.serve._private.autoscaling_state import _resolve_policy_callable
from ray.serve._private.common import DeploymentID, ReplicaID
from ray.serve.autoscaling_policy import _apply_autoscaling_config
from ray.serve.config import AutoscalingConfig as ServeAutoscalingConfig
from ray.serve.config import AutoscalingContext

from app.autoscaling.config import AutoscalingConfig
from app.autoscaling.report import ReplicaMetric, replica_stats
from app.autoscaling.serve_policy import (
    POLICY_FUNCTION,
    FleetAutoscalingPolicy,
    MinuteRate,
    StartTimer,
    serve_autoscaling_config,
    signals_from_context,
)
from app.autoscaling.store import AutoscaleStore, rate_key, read_log, status_key
from app.fleet.stats import PerfSnapshot
from app.kv import ClusterNotFoundError
from tests.unit.test_autoscaling_store import FakeKV

CAP = 10
T0 = 1_000_000 * 60.0  # the start of a minute
DEPLOYMENT = DeploymentID(name="model-m", app_name="model-m")
FAST = {
    "stable_window_s": 10,
    "panic_window_s": 2,
    "upscale_cooldown_s": 5,
    "downscale_cooldown_s": 0,
}


def serve_config(**overrides: Any) -> ServeAutoscalingConfig:
    """What the builder emits, validated by Serve (which imports and pickles the policy)."""
    config = AutoscalingConfig.model_validate({**FAST, **overrides})
    emitted = serve_autoscaling_config(
        config,
        model="m",
        region="eu",
        min_replicas=1,
        max_replicas=20,
        initial_replicas=1,
        max_ongoing_requests=CAP,
    )
    return ServeAutoscalingConfig.model_validate(emitted)


def context(
    now: float,
    running: int,
    total: float,
    *,
    target: int | None = None,
    queued: float = 0.0,
    metrics: Any = None,
    up: float | None = None,
    down: float | None = None,
    low: int = 1,
    high: int = 20,
) -> AutoscalingContext:
    return AutoscalingContext(
        deployment_id=DEPLOYMENT,
        deployment_name=DEPLOYMENT.name,
        app_name=DEPLOYMENT.app_name,
        current_num_replicas=running,
        target_num_replicas=running if target is None else target,
        running_replicas=[ReplicaID(f"r{i}", DEPLOYMENT) for i in range(running)],
        total_num_requests=total,
        total_queued_requests=queued,
        aggregated_metrics=metrics if metrics is not None else {},
        raw_metrics={},
        capacity_adjusted_min_replicas=low,
        capacity_adjusted_max_replicas=high,
        policy_state={},
        last_scale_up_time=up,
        last_scale_down_time=down,
        current_time=now,
        config=serve_config(),
    )


def per_replica(running: int, **values: float) -> dict[str, dict[ReplicaID, float]]:
    """The same aggregated figures for every running replica."""
    ids = [ReplicaID(f"r{i}", DEPLOYMENT) for i in range(running)]
    return {name: dict.fromkeys(ids, value) for name, value in values.items()}


def make_store(kv: FakeKV) -> AutoscaleStore:
    return AutoscaleStore(lambda: kv, clock=lambda: T0, background=False)


def make_policy(kv: FakeKV | None = None, **overrides: Any) -> FleetAutoscalingPolicy:
    config = AutoscalingConfig.model_validate({**FAST, **overrides}).model_dump(mode="json")
    return FleetAutoscalingPolicy(config, "m", "eu", CAP, store=make_store(kv or FakeKV()))


def test_signals_from_a_real_serve_context() -> None:
    r0, r1 = ReplicaID("r0", DEPLOYMENT), ReplicaID("r1", DEPLOYMENT)
    metrics = {
        "requests_per_s": {r0: 3.0, r1: 1.0},
        "latency_p50_ms": {r0: 100.0, r1: 200.0},
        "latency_p95_ms": {r0: 300.0, r1: math.nan},
        "error_rate": {r0: 0.0, r1: 0.4},
        "tokens_per_s": {r0: 50.0, r1: 70.0},
    }
    # Serve passes its metrics lazily; the adapter must work with the callable form too.
    ctx = context(T0, 2, 13.0, queued=3.0, metrics=lambda: metrics)
    signals, rate = signals_from_context(ctx, CAP, T0)
    assert (signals.running_replicas, signals.total_requests, signals.queued_requests) == (2, 13, 3)
    assert signals.p50_latency_ms == pytest.approx(125.0)  # weighted by request rate
    assert signals.p95_latency_ms == 300.0  # a NaN is no figure
    assert signals.error_rate == pytest.approx(0.1)
    assert signals.tokens_per_s == 120.0 and signals.images_per_s is None
    assert rate == 4.0
    bare, no_rate = signals_from_context(context(T0, 1, 2.0), CAP, T0)
    assert bare.p50_latency_ms is None and no_rate is None


def test_replica_stats_are_numbers_serve_accepts_and_the_policy_reads() -> None:
    perf = PerfSnapshot(
        latency_ms=90.0,
        p50_ms=80.0,
        p99_ms=400.0,
        success_rate=0.75,
        throughput=2.5,
        completed=8,
        failed=2,
        p95_ms=250.0,
    )
    stats = replica_stats(perf, ongoing=3, capacity=CAP, work={ReplicaMetric.BATCH_FILL: 0.5})
    # Serve disables a replica's stats when any value is not an int or float.
    assert all(isinstance(v, float) for v in stats.values())
    assert stats == {
        "ongoing_requests": 3.0,
        "capacity": 10.0,
        "requests_per_s": 2.5,
        "error_rate": 0.25,
        "latency_p50_ms": 80.0,
        "latency_p95_ms": 250.0,
        "latency_p99_ms": 400.0,
        "batch_fill": 0.5,
    }
    idle = PerfSnapshot(None, None, None, 1.0, 0.0, 0, 0)
    assert set(replica_stats(idle, 0, CAP)) == {
        "ongoing_requests",
        "capacity",
        "requests_per_s",
        "error_rate",
    }
    ids = [ReplicaID(f"r{i}", DEPLOYMENT) for i in range(2)]
    metrics = {name: dict.fromkeys(ids, value) for name, value in stats.items()}
    signals, rate = signals_from_context(context(T0, 2, 6.0, metrics=metrics), CAP, T0)
    assert (signals.p50_latency_ms, signals.error_rate, rate) == (80.0, 0.25, 5.0)
    assert {m.value for m in ReplicaMetric} >= set(stats)


def test_serve_builds_the_policy_from_its_kwargs() -> None:
    config = serve_config(target_utilization=0.6)
    assert config.policy.policy_function == POLICY_FUNCTION
    policy = _resolve_policy_callable(config.policy)  # Serve's own instantiation
    assert type(policy).__name__ == "FleetAutoscalingPolicy"
    assert (policy.model, policy.region, policy.max_ongoing_requests) == ("m", "eu", CAP)
    assert policy.config.target_utilization == 0.6
    assert (config.upscale_delay_s, config.downscale_delay_s) == (0, 0)
    assert (config.get_upscaling_factor(), config.get_downscaling_factor()) == (1, 1)
    assert config.look_back_period_s > config.metrics_interval_s


def test_scales_up_under_load_and_records_the_decision() -> None:
    kv = FakeKV()
    policy = make_policy(kv)
    target, state = policy(context(T0, 2, 19.0))  # 95 % of 2 x 10: over 77 %
    assert target > 2 and state == {}  # nothing kept in Serve's policy_state
    decision = policy.last_decision
    assert decision is not None and decision.rule in ("panic", "utilization_up")
    [entry] = read_log(kv, "m", "eu", 5)
    assert entry["target_replicas"] == target and entry["running"] == 2
    status = policy.store.status("m", "eu")
    assert status is not None and (status["current"], status["target"]) == (2, target)
    assert status["store"] == "kv" and status_key("m", "eu") in kv.data


def test_decides_once_per_decision_period_and_holds_in_between() -> None:
    policy = make_policy(decision_period_s=1.0)
    assert policy(context(T0, 2, 19.0))[0] > 2
    first = policy.last_decision
    held, _ = policy(context(T0 + 0.1, 2, 19.0, target=7))  # Serve ticks every 0.1 s
    assert held == 7 and policy.last_decision is first
    policy(context(T0 + 1.0, 2, 19.0, target=7))
    assert policy.last_decision is not first


def test_serve_applies_the_target_as_decided() -> None:
    """Through Serve's wrapper (delays, factors) the target arrives unchanged, so a scale-down
    is not held for Serve's default 600 s nor an upscale damped."""
    policy = make_policy()
    wrapped = _apply_autoscaling_config(policy)
    for t in range(11):  # a stable window of light load on 6 replicas
        target, _ = wrapped(context(T0 + t, 6, 6.0))
    assert policy.last_decision is not None
    assert policy.last_decision.rule == "utilization_down"
    assert target == policy.last_decision.target_replicas == 3  # halved in one step, as decided
    burst, _ = wrapped(context(T0 + 20, 2, 60.0))
    assert burst == policy.last_decision.target_replicas > 6


def test_a_failing_decision_holds_the_target(caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("metrics store gone")

    policy = make_policy()
    with caplog.at_level(logging.ERROR, logger="app.autoscaling.serve_policy"):
        assert policy(context(T0, 3, 29.0, metrics=broken)) == (3, {})
    assert "holding" in caplog.text


def test_cooldown_survives_a_controller_restart_through_the_context() -> None:
    kv = FakeKV()
    before = make_policy(kv)
    scaled, _ = before(context(T0, 2, 19.0))  # 95 %: one step up, no panic
    assert scaled == 3
    busy = 0.9 * scaled * CAP  # still over 77 %
    # A new controller: new policy, new store; Serve reports when it last scaled up.
    after = make_policy(kv)
    assert after(context(T0 + 2, scaled, busy, up=T0))[0] == scaled
    assert after.last_decision is not None and after.last_decision.rule == "up_cooldown"
    assert after.state.reactive.last_scale_up_s == T0
    assert after(context(T0 + 6, scaled, busy, up=T0))[0] > scaled  # the cooldown is over
    # Without Serve's word the same load would have scaled at once.
    assert make_policy()(context(T0 + 2, scaled, busy))[0] > scaled


def test_timings_come_back_from_the_stored_status() -> None:
    kv = FakeKV()
    before = make_policy(kv)
    before(context(T0, 0, 0.0, target=1, up=T0, low=0))  # a replica asked for at T0
    before(context(T0 + 12, 1, 1.0, up=T0, low=0))  # running 12 s later
    assert before.state.replica_start_s == 12.0 and before.last_cold_start_s == 12.0
    before(context(T0 + 13, 1, 1.0, up=T0, low=0))  # the status goes out with the next change
    # Serve forgets its scale times on a restart; the stored status has them.
    after = make_policy(kv)
    after(context(T0 + 20, 1, 1.0, low=0))
    assert after.state.replica_start_s == 12.0
    assert after.state.reactive.last_scale_up_s == before.state.reactive.last_scale_up_s
    assert after.core.lead_time_s(after.state) == 12.0


def test_request_rate_is_recorded_per_minute_and_read_back_after_restart() -> None:
    kv = FakeKV()
    policy = make_policy(kv)
    rates = per_replica(2, requests_per_s=2.5)  # 5 requests/s from two replicas
    start = T0 + 30  # the first minute is seen for half its length
    for t in range(0, 200):
        policy(context(start + t, 2, 4.0, metrics=rates))
    recorded = policy.store.load("m", "eu", since=0)
    assert recorded == [(1_000_000, 300), (1_000_001, 300), (1_000_002, 300)]
    assert rate_key("m", "eu", 1_000_000 // 60) in kv.data
    # A new controller reads the history back and forecasts from it at once.
    after = make_policy(kv)
    after(context(start + 201, 2, 4.0, metrics=rates))
    assert after.store.load("m", "eu", since=0) == recorded
    assert after.state.forecast is not None and after.state.forecast.counts[0] == 300


def test_minute_rate_skips_a_minute_seen_too_briefly() -> None:
    rate = MinuteRate()
    for t in range(50, 60):  # ten seconds of minute 0
        assert rate.add(t, 1.0) is None
    for t in range(60, 121):
        finished = rate.add(t, 2.0)
        assert finished is None or finished == (1, 120)
    assert rate.add(121, None) is None and rate.minute == 2


def test_start_timer_measures_starts_not_scale_downs() -> None:
    timer = StartTimer()
    assert timer.observe(100, running=2, target=4, asked_at=98) is None
    assert timer.observe(105, running=3, target=4, asked_at=98) is None
    assert timer.observe(110, running=4, target=4, asked_at=98) == (12, False)
    assert timer.observe(200, running=2, target=3, asked_at=None) is None
    assert timer.observe(210, running=2, target=2, asked_at=None) is None  # asked for less
    assert timer.observe(300, running=0, target=1, asked_at=299) is None
    assert timer.observe(330, running=1, target=1, asked_at=299) == (31, True)


def test_timings_come_back_when_the_store_answers_late() -> None:
    kv = FakeKV()
    before = make_policy(kv)
    before(context(T0, 0, 0.0, target=1, up=T0, low=0))
    before(context(T0 + 12, 1, 1.0, up=T0, low=0))
    clock = [T0 + 20]
    answering = False

    def connect() -> FakeKV:
        if not answering:
            raise ClusterNotFoundError("no KV cluster yet")
        return kv

    store = AutoscaleStore(connect, clock=lambda: clock[0], background=False, retry_s=30)
    config = AutoscalingConfig.model_validate(FAST).model_dump(mode="json")
    after = FleetAutoscalingPolicy(config, "m", "eu", CAP, store=store)
    after(context(T0 + 20, 1, 1.0, low=0))  # writes its own status to memory
    assert after.state.replica_start_s is None and store.backend == "memory"
    answering, clock[0] = True, T0 + 60
    after(context(T0 + 60, 1, 1.0, low=0))
    assert after.state.replica_start_s == 12.0 and after.last_cold_start_s == 12.0
