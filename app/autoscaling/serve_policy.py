"""Ray Serve's side of the autoscaler: `FleetAutoscalingPolicy`, the class a deployment's
`autoscaling_config.policy` names, turns each `AutoscalingContext` into Signals for the core
(what replicas report for it is app.autoscaling.report)."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from app.autoscaling.config import AutoscalingConfig
from app.autoscaling.decision import Decision
from app.autoscaling.floors import MINUTE_S, Forecast
from app.autoscaling.forecast import Forecaster
from app.autoscaling.metrics import AutoscalingMetrics
from app.autoscaling.policy import AutoscalingCore
from app.autoscaling.report import ReplicaMetric
from app.autoscaling.signals import Signals
from app.autoscaling.store import AutoscaleStore, kv_connector, shared_store
from app.events.bus import EventType
from app.events.outbox import Outbox
from app.observability.recorder import metrics

if TYPE_CHECKING:
    from ray.serve.config import AutoscalingContext

logger = logging.getLogger(__name__)

POLICY_FUNCTION = "app.autoscaling.serve_policy:FleetAutoscalingPolicy"
# Serve's metrics push period follows the decision period, but not below this.
MIN_METRICS_INTERVAL_S = 0.5
# How often the latest status is written (and at once on every logged decision).
STATUS_PERIOD_S = 5.0
# A minute observed for less than this is not recorded (a controller restart cut it short).
MIN_MINUTE_COVERAGE_S = 15.0
# Longest gap between ticks counted as observed time (a stalled controller saw nothing).
MAX_TICK_GAP_S = 5.0
# Weight of a new measured replica start time in the lead time's average.
START_TIME_EWMA = 0.3


def signals_from_context(
    ctx: AutoscalingContext, max_ongoing_requests: int, now: float
) -> tuple[Signals, float | None]:
    """Signals for the core, and the deployment's request rate (None: no replica reported it).
    Latency and errors are averaged over replicas weighted by their request rates, so an idle
    replica's stale figures count for little; throughputs add up."""
    metrics: Mapping[str, Mapping[Any, float]] = ctx.aggregated_metrics or {}
    rates = metrics.get(ReplicaMetric.REQUESTS_PER_S.value) or {}

    def weighted(name: ReplicaMetric) -> float | None:
        pairs = [
            (v, max(0.0, rates.get(r, 0.0)))
            for r, v in (metrics.get(name.value) or {}).items()
            if math.isfinite(v)
        ]
        if not pairs:
            return None
        total = sum(w for _, w in pairs)
        if total <= 0:
            return sum(v for v, _ in pairs) / len(pairs)
        return sum(v * w for v, w in pairs) / total

    def values(name: ReplicaMetric) -> list[float]:
        return [v for v in (metrics.get(name.value) or {}).values() if math.isfinite(v)]

    def summed(name: ReplicaMetric) -> float | None:
        found = values(name)
        return sum(found) if found else None

    def mean(name: ReplicaMetric) -> float | None:
        found = values(name)
        return sum(found) / len(found) if found else None

    signals = Signals(
        timestamp_s=now,
        running_replicas=ctx.current_num_replicas,
        total_requests=max(0.0, float(ctx.total_num_requests or 0.0)),
        queued_requests=max(0.0, float(ctx.total_queued_requests or 0.0)),
        max_ongoing_requests=max_ongoing_requests,
        p50_latency_ms=weighted(ReplicaMetric.LATENCY_P50),
        p95_latency_ms=weighted(ReplicaMetric.LATENCY_P95),
        error_rate=weighted(ReplicaMetric.ERROR_RATE),
        tokens_per_s=summed(ReplicaMetric.TOKENS_PER_S),
        images_per_s=summed(ReplicaMetric.IMAGES_PER_S),
        engine_queued=summed(ReplicaMetric.ENGINE_QUEUED),
        kv_cache_utilization=mean(ReplicaMetric.KV_CACHE_UTILIZATION),
    )
    return signals, summed(ReplicaMetric.REQUESTS_PER_S)


def serve_autoscaling_config(
    config: AutoscalingConfig,
    *,
    model: str,
    region: str,
    min_replicas: int,
    max_replicas: int,
    initial_replicas: int,
    max_ongoing_requests: int,
) -> dict[str, Any]:
    """Serve's autoscaling_config for a deployment this policy scales. Serve still applies its
    delays, gain factors and bounds to what the policy returns (`_apply_autoscaling_config` in
    ray/serve/autoscaling_policy.py): delays 0 and factors 1 leave the core's cooldowns and step
    bounds the only ones, and the bounds are the same. Metrics come every `metrics_interval_s`,
    averaged over `look_back_period_s`: short, as the core keeps its own panic and stable
    windows. `target_ongoing_requests` only feeds Serve's gauge here."""
    interval = max(MIN_METRICS_INTERVAL_S, min(config.decision_period_s, config.panic_window_s / 3))
    return {
        "min_replicas": min_replicas,
        "max_replicas": max_replicas,
        "initial_replicas": initial_replicas,
        "target_ongoing_requests": max_ongoing_requests * config.target_utilization,
        "upscale_delay_s": 0.0,
        "downscale_delay_s": 0.0,
        "upscaling_factor": 1.0,
        "downscaling_factor": 1.0,
        "metrics_interval_s": interval,
        "look_back_period_s": 2 * interval,  # Serve wants it above the push interval
        "aggregation_function": "mean",
        "policy": {
            "policy_function": POLICY_FUNCTION,
            "policy_kwargs": {
                "config": config.model_dump(mode="json"),
                "model": model,
                "region": region,
                "max_ongoing_requests": max_ongoing_requests,
            },
        },
    }


class MinuteRate:
    """Integrates the request rate over each wall-clock minute. A finished minute is recorded as
    its mean rate x 60, so one cut short by a controller restart is scaled up, not undercounted;
    one observed for less than MIN_MINUTE_COVERAGE_S is not recorded at all."""

    def __init__(self) -> None:
        self.minute: int | None = None
        self.requests = 0.0
        self.covered_s = 0.0
        self.last_s: float | None = None

    def add(self, now: float, rate: float | None) -> tuple[int, int] | None:
        """Counts `rate` since the last tick; returns a (minute, count) that just finished."""
        finished = None
        minute = int(now // MINUTE_S)
        if self.minute is not None and minute != self.minute:
            if self.covered_s >= MIN_MINUTE_COVERAGE_S:
                finished = (self.minute, round(self.requests / self.covered_s * MINUTE_S))
            self.requests = self.covered_s = 0.0
        dt = 0.0 if self.last_s is None else min(max(0.0, now - self.last_s), MAX_TICK_GAP_S)
        self.minute, self.last_s = minute, now
        if rate is not None:
            self.requests += rate * dt
            self.covered_s += dt
        return finished


class StartTimer:
    """Measures how long asked-for replicas take to run: from the scale-up until as many run as
    were asked for. The policy's default lead time, and the cold start when it began at zero."""

    def __init__(self) -> None:
        self._since: tuple[float, int] | None = None  # (asked at, running then)

    def observe(
        self, now: float, running: int, target: int, asked_at: float | None
    ) -> tuple[float, bool] | None:
        """(seconds, from zero) once a start completes."""
        if running < target:
            if self._since is None:
                asked = asked_at if asked_at is not None and asked_at <= now else now
                self._since = (asked, running)
            return None
        if self._since is None:
            return None
        asked, running_then = self._since
        self._since = None
        if running <= running_then:  # the target came down to what ran; nothing started
            return None
        return now - asked, running_then == 0


class FleetAutoscalingPolicy:
    """Serve creates one per deployment on its controller with the `policy_kwargs` that
    `serve_autoscaling_config` wrote, and calls it every control-loop tick (0.1 s); it decides
    every `decision_period_s` and holds Serve's current target in between.

    The core's windows live here, not in Serve's policy_state: both are lost on a controller
    restart or redeploy. What must survive is in the KV store (the per-minute rate history,
    the decision log, the last status); the scale-up and scale-down times come back from the
    context and the stored status."""

    def __init__(
        self,
        config: Mapping[str, Any],
        model: str,
        region: str,
        max_ongoing_requests: int,
        kv_name: str = "kv",
        kv_namespace: str = "app-kv",
        *,
        store: AutoscaleStore | None = None,
        clock: Callable[[], float] = time.time,
        forecaster: Forecaster | None = None,
    ) -> None:
        self.config = AutoscalingConfig.model_validate(config)
        self.model, self.region = model, region
        self.max_ongoing_requests = max_ongoing_requests
        self.core = AutoscalingCore(self.config, forecaster)
        self.state = self.core.new_state()
        self.store = store if store is not None else shared_store(kv_name, kv_namespace)
        self.rate = MinuteRate()
        self.metrics = AutoscalingMetrics(model, region)
        # Scaling decisions that act also go to the event bus (app.events), sent off this loop.
        self.outbox = Outbox(kv_connector(kv_name, kv_namespace), "autoscaler")
        if self.config.slo_p95_ms is not None:  # the latency alert's threshold per model
            slo_s = self.config.slo_p95_ms / 1000
            metrics().sample_slo(model, region, lambda: slo_s)
        self.starts = StartTimer()
        self.last_decision: Decision | None = None
        self.last_cold_start_s: float | None = None
        self._clock = clock
        self._decided_at: float | None = None
        self._restored = False
        self._forecast_minute: int | None = None
        self._logged: tuple[int, str, int | None] | None = None
        self._status_at = -math.inf

    def __call__(self, ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
        now = ctx.current_time if ctx.current_time is not None else self._clock()
        held = ctx.target_num_replicas
        due = self._decided_at is None or now - self._decided_at >= self.config.decision_period_s
        if not due:
            return held, {}
        self._decided_at = now
        try:
            return self._decide(ctx, now), {}
        except Exception:  # a policy bug must not take Serve's control loop with it
            logger.exception("autoscaling %s/%s: decision failed; holding", self.model, self.region)
            return held, {}

    def _decide(self, ctx: AutoscalingContext, now: float) -> int:
        self._restore(ctx)
        signals, rate = signals_from_context(ctx, self.max_ongoing_requests, now)
        self._time_starts(ctx, signals, now)
        finished = self.rate.add(now, self._arrivals(signals, rate))
        if finished is not None:
            self.store.append(self.model, self.region, *finished)
        self._refresh_forecast(now)
        decision = self.core.decide(
            signals,
            now,
            ctx.target_num_replicas,
            ctx.capacity_adjusted_min_replicas,
            ctx.capacity_adjusted_max_replicas,
            self.state,
        )
        self._publish(decision, signals, now)
        return decision.target_replicas

    def _restore(self, ctx: AutoscalingContext) -> None:
        """Serve's scale times are the latest word (its cold-start path scales from zero without
        asking the policy); after a restart the stored status gives the rest, once read back."""
        reactive = self.state.reactive
        reactive.last_scale_up_s = _latest(reactive.last_scale_up_s, ctx.last_scale_up_time)
        reactive.last_scale_down_s = _latest(reactive.last_scale_down_s, ctx.last_scale_down_time)
        if self._restored or not self.store.loaded(self.model, self.region):
            return
        self._restored = True
        self._forecast_minute = None  # the history is back: forecast from it now
        saved = self.store.restored_status(self.model, self.region) or {}
        reactive.last_scale_up_s = _latest(reactive.last_scale_up_s, saved.get("last_scale_up_s"))
        reactive.last_scale_down_s = _latest(
            reactive.last_scale_down_s, saved.get("last_scale_down_s")
        )
        reactive.last_panic_s = _latest(reactive.last_panic_s, saved.get("last_panic_s"))
        if self.state.replica_start_s is None:
            self.state.replica_start_s = saved.get("replica_start_s")
        if self.state.service_time_ms is None:
            self.state.service_time_ms = saved.get("service_time_ms")
        if self.last_cold_start_s is None:
            self.last_cold_start_s = saved.get("cold_start_s")

    def _time_starts(self, ctx: AutoscalingContext, signals: Signals, now: float) -> None:
        started = self.starts.observe(
            now, signals.running_replicas, ctx.target_num_replicas, ctx.last_scale_up_time
        )
        if started is None:
            return
        seconds, from_zero = started
        previous = self.state.replica_start_s
        self.state.replica_start_s = (
            seconds if previous is None else previous + START_TIME_EWMA * (seconds - previous)
        )
        if from_zero:
            self.last_cold_start_s = seconds
            logger.info("autoscaling %s/%s: cold start %.1fs", self.model, self.region, seconds)

    def _arrivals(self, signals: Signals, rate: float | None) -> float | None:
        """Requests per second: what the replicas served, or by Little's law from the requests
        in flight and the service time when they report nothing."""
        if rate is not None:
            return rate
        if signals.total_requests == 0:
            return 0.0
        service_ms = self.state.service_time_ms
        return signals.total_requests / (service_ms / 1000) if service_ms else None

    def _refresh_forecast(self, now: float) -> None:
        minute = int(now // MINUTE_S)
        if minute == self._forecast_minute:
            return
        self._forecast_minute = minute
        self.core.refresh_from_history(self.state, self.store, self.model, self.region, now)

    def _publish(self, decision: Decision, signals: Signals, now: float) -> None:
        """Logs a decision that acts or says something new; writes the status every
        STATUS_PERIOD_S and with every logged decision."""
        self.last_decision = decision
        self.metrics.observe(decision, signals)
        shadow = decision.shadow.target_replicas if decision.shadow else None
        said = (decision.target_replicas, decision.rule, shadow)
        logged = decision.changed or said != self._logged
        if logged:
            self._logged = said
            entry = decision.to_dict() | {"running": signals.running_replicas}
            self.store.record(self.model, self.region, entry)
            if decision.changed:
                self.outbox.add(
                    EventType.SCALING_DECISION,
                    {"model": self.model, "region": self.region} | decision.to_dict(),
                )
                threading.Thread(target=self.outbox.flush, daemon=True).start()
                logger.info(
                    "autoscaling %s/%s: %d -> %d (%s: %s)",
                    self.model,
                    self.region,
                    decision.current_replicas,
                    decision.target_replicas,
                    decision.rule,
                    decision.reason,
                )
        if logged or now - self._status_at >= STATUS_PERIOD_S:
            self._status_at = now
            self.store.set_status(self.model, self.region, self.status(decision, signals, now))

    def status(self, decision: Decision, signals: Signals, now: float) -> dict[str, Any]:
        """What `app autoscale status` shows for this deployment."""
        reactive = self.state.reactive
        bounds = decision.inputs
        return {
            "model": self.model,
            "region": self.region,
            "at_s": now,
            "current": signals.running_replicas,
            "target": decision.target_replicas,
            "min": bounds.get("min"),
            "max": bounds.get("max"),
            "rule": decision.rule,
            "reason": decision.reason,
            "applied": decision.applied,
            "signals": signals.as_dict(),
            "forecast": _forecast_summary(self.state.forecast, now),
            "floors": self._floors(signals, now),
            "replica_start_s": self.state.replica_start_s,
            "cold_start_s": self.last_cold_start_s,
            "service_time_ms": self.state.service_time_ms,
            "last_scale_up_s": reactive.last_scale_up_s,
            "last_scale_down_s": reactive.last_scale_down_s,
            "last_panic_s": reactive.last_panic_s,
            "store": self.store.backend,
        }

    def _floors(self, signals: Signals, now: float) -> dict[str, Any]:
        """Both floors as they stand, binding or not (a decision shows only the one that won)."""
        service_ms = self.state.service_time_ms
        forecast = self.core.predictive.floor(
            self.state.forecast,
            now,
            self.core.lead_time_s(self.state),
            None if service_ms is None else service_ms / 1000,
            signals.max_ongoing_requests,
            self.config.target_utilization,
        )
        floors = {"forecast": forecast, "scheduled": self.core.scheduled.floor(now)}
        return {
            name: {"replicas": f.replicas, "applied": f.applied, "reason": f.reason}
            for name, f in floors.items()
            if f is not None
        }


def _forecast_summary(forecast: Forecast | None, now: float) -> dict[str, Any] | None:
    if forecast is None:
        return None
    summary = {k: v for k, v in forecast.to_dict().items() if k != "counts"}
    return summary | {
        "next_per_min": forecast.peak_per_min(now, now),
        "peak_per_min": max(forecast.counts, default=0.0),
        "horizon_min": len(forecast.counts),
    }


def _latest(mine: float | None, theirs: float | None) -> float | None:
    if theirs is None:
        return mine
    return float(theirs) if mine is None else max(mine, float(theirs))
