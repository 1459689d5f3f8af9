"""The reactive rules: utilisation, queue and latency thresholds, step bounds, cooldowns, the panic
window, and scaling to and from zero (each returns a `Decision`, app.autoscaling.state).

Two choices rest on the simulator (benchmarks/autoscale_bench.py, BENCHMARKS.md):

Scale-down. The long cooldown (600 s) counts from the last scale-up, the first tick standing in
for one: a flap is giving back replicas that load needed a moment ago. Steps down after that
are spaced by the stable window only (`downscale_interval_s`), so each is judged on a whole
window at the size the previous step left, and each keeps at least half (`max_scale_down_rate`
2, Knative's default) and drops at most `max_step_down` (now 10). Counting the cooldown from
every scaling with steps of 1, as before, shed one replica per 10 minutes: 1.26 x Serve's
replica-hours over the three traces (the burst 1.59 x).

Panic sizing. Sizing on Serve's total requests counts each queued request as one in flight, so
a backlog that builds while asked-for replicas start (12 s here, a request 75 ms) asked for up
to 40 replicas where 16 carry the daily peak. A panic now sizes on the arrivals: in flight plus
the queue's growth times the service time (Little's law); the target's head-room drains the
backlog. Only a new panic adds its queue, as load to clear by the next decision, because the
handle's look-back shows just part of a step's growth on its first tick: without that the 10x
burst was covered after 3 decision periods, with it after 2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from app.autoscaling.config import AutoscalingConfig
from app.autoscaling.signals import Signals
from app.autoscaling.state import Decision, ReactiveState, Rule

__all__ = ["Decision", "ReactiveRules", "ReactiveState", "Rule"]

# A queue this small per replica counts as empty for scale-down: a request or two in flight
# between handle and replica is normal even when replicas have free slots.
NEAR_EMPTY_QUEUE_PER_REPLICA = 0.1


@dataclass(frozen=True)
class _Tick:
    """One tick's inputs and the load figures derived from them."""

    signals: Signals
    now: float
    current: int
    low: int
    high: int
    per_replica: float  # requests one replica takes at the target utilisation
    demand_now: float
    demand_stable: float
    demand_panic: float
    queued_stable: float
    queued_panic: float
    queued_before: float  # the previous tick's queue: is the backlog draining?
    queue_growth_per_s: float  # the queue's change since the previous tick
    service_s: float | None  # how long a request holds a slot; None until measured
    joined: bool  # the running replicas changed since the previous tick
    panic_before: bool  # a panic within the last panic window: this burst is sized already
    stable_full: bool  # a whole stable window observed (no scale-down on less)
    arrivals_panic: float | None = None  # arrivals over the panic window, once measured

    @property
    def load_panic(self) -> float:
        """What the scale-up rules size on: the arrivals when measured (a backlog, draining
        or not, is not load that stays), else the requests as Serve counts them."""
        return self.demand_panic if self.arrivals_panic is None else self.arrivals_panic

    @property
    def starting(self) -> bool:
        """A scale-up is in flight: some asked-for replicas are not running yet."""
        return self.signals.running_replicas < self.current

    @property
    def draining(self) -> bool:
        """The backlog shrinks: the replicas already running outpace arrivals."""
        return self.signals.queued_requests < self.queued_before

    @property
    def arrivals(self) -> float | None:
        """Requests the arrivals alone keep in flight (arrival rate x service time, Little's
        law), without the backlog: the replicas take in_flight / service_s a second and the
        queue grows by the rest, so rate x service_s = in_flight + growth x service_s. None
        while the service time is unknown."""
        if self.service_s is None:
            return None
        # Serve averages the two series over different windows (the total's opens at the
        # newest replica's first sample), so the difference is capped by the slots.
        slots = self.signals.running_replicas * self.signals.max_ongoing_requests
        in_flight = min(max(0.0, self.demand_now - self.signals.queued_requests), slots)
        return max(0.0, in_flight + self.queue_growth_per_s * self.service_s)

    def need(self, demand: float) -> int:
        """Replicas that carry `demand` at the target utilisation."""
        return max(0, math.ceil(demand / self.per_replica - 1e-9))

    def utilization(self, demand: float) -> float:
        """Demand against the capacity of the replicas already asked for (running or
        starting), so replicas still starting do not look like overload."""
        capacity = self.current * self.signals.max_ongoing_requests
        return demand / capacity if capacity else (math.inf if demand > 0 else 0.0)


_Proposal = tuple[int, Rule, str]


class ReactiveRules:
    """Scales on measured load only; `decide` is one tick. Thresholds come from the config."""

    def __init__(self, config: AutoscalingConfig) -> None:
        self.config = config

    def new_state(self) -> ReactiveState:
        return ReactiveState.new(self.config)

    def decide(
        self,
        signals: Signals,
        now: float,
        current: int,
        min_replicas: int,
        max_replicas: int,
        state: ReactiveState,
        *,
        service_s: float | None = None,
    ) -> Decision:
        decision = self.propose(
            signals, now, current, min_replicas, max_replicas, state, service_s=service_s
        )
        state.note_target(current, decision.target_replicas, now)
        return decision

    def propose(
        self,
        signals: Signals,
        now: float,
        current: int,
        min_replicas: int,
        max_replicas: int,
        state: ReactiveState,
        *,
        service_s: float | None = None,
    ) -> Decision:
        """`decide` without recording the action: a caller that raises the target further
        (a floor) records the final one with `state.note_target`. `service_s` is how long a
        request holds a slot (default: the replicas' p50); a panic sizes on arrivals with it."""
        tick = self._observe(signals, now, current, min_replicas, max_replicas, state, service_s)
        proposal = (
            self._from_zero(tick)
            or self._panic(tick, state)
            or self._scale_up(tick, state)
            or self._to_zero(tick, state)
            or self._scale_down(tick, state)
            or (current, Rule.STEADY, "load within thresholds")
        )
        target, rule, reason = self._bounded(tick, *proposal)
        return Decision(target, current, rule, reason, now, self._inputs(tick, state))

    def _observe(
        self,
        signals: Signals,
        now: float,
        current: int,
        low: int,
        high: int,
        state: ReactiveState,
        service_s: float | None,
    ) -> _Tick:
        cfg = self.config
        last = state.queued.to_list()[-1:]
        queued_before = last[0][1] if last else 0.0
        growth = 0.0
        if last and now > last[0][0]:
            growth = (signals.queued_requests - queued_before) / (now - last[0][0])
        panic_before = _since(now, state.last_panic_s) <= cfg.panic_window_s
        state.demand.add(now, signals.demand)
        state.queued.add(now, signals.queued_requests)
        if state.observing_since_s is None:
            state.observing_since_s = now
        idle = signals.total_requests == 0 and signals.queued_requests == 0
        if not idle:
            state.idle_since_s = None
        elif state.idle_since_s is None:
            state.idle_since_s = now
        stable, panic = cfg.stable_window_s, cfg.panic_window_s
        tick = _Tick(
            signals=signals,
            now=now,
            current=current,
            low=low,
            high=max(high, low),
            per_replica=signals.max_ongoing_requests * cfg.target_utilization,
            demand_now=signals.demand,
            demand_stable=state.demand.average(now, stable) or 0.0,
            demand_panic=state.demand.average(now, panic) or 0.0,
            queued_stable=state.queued.average(now, stable) or 0.0,
            queued_panic=state.queued.average(now, panic) or 0.0,
            queued_before=queued_before,
            queue_growth_per_s=growth,
            service_s=_service_s(service_s, signals),
            joined=state.running_before not in (None, signals.running_replicas),
            panic_before=panic_before,
            stable_full=now - state.observing_since_s >= stable,
        )
        state.running_before = signals.running_replicas
        if tick.arrivals is not None:
            state.arrivals.add(now, tick.arrivals)
            tick = replace(tick, arrivals_panic=state.arrivals.average(now, panic))
        if current > 0 and tick.utilization(tick.demand_panic) >= self._panic_level:
            state.last_panic_s = now
        return tick

    @property
    def _panic_level(self) -> float:
        return self.config.panic_threshold * self.config.target_utilization

    def _from_zero(self, tick: _Tick) -> _Proposal | None:
        # A request waiting at zero replicas gets one at once: no cooldown, no window.
        if tick.current > 0 or (tick.demand_now <= 0 and tick.signals.queued_requests <= 0):
            return None
        target = max(1, tick.need(tick.demand_now))
        return target, Rule.FROM_ZERO, f"{tick.demand_now:g} requests waiting at zero replicas"

    def _panic(self, tick: _Tick, state: ReactiveState) -> _Proposal | None:
        if state.last_panic_s != tick.now:
            return None
        util = tick.utilization(tick.demand_panic)
        reason = (
            f"panic: {util:.0%} utilisation over {self.config.panic_window_s:g}s >= "
            f"{self._panic_level:.0%}"
        )
        arrivals = tick.arrivals
        if arrivals is not None:
            return self._panic_on_arrivals(tick, arrivals, reason)
        # No service time yet: Knative sizes a panic by the panic-window average; the latest
        # tick answers a step burst at once instead of over the whole window.
        needed = tick.need(tick.demand_now)
        reason = f"{reason}; burst needs {needed}"
        # A burst already sized waits for its replicas rather than chase its own backlog.
        held = self._backlog_hold(tick) if tick.panic_before else None
        if held is not None:
            return tick.current, Rule.PANIC, f"{reason}; {held}"
        return max(tick.current, needed), Rule.PANIC, reason

    def _panic_on_arrivals(self, tick: _Tick, arrivals: float, reason: str) -> _Proposal:
        """A panic sized on the arrivals, not on the backlog: a queue that built while
        replicas started is not load that stays, and the target's head-room (1 / target
        utilisation) drains it. A new panic adds its backlog as load to clear by the next
        decision: the handle's look-back shows only part of a step's growth on its first
        tick, and the queue is the rest of the evidence. Later ticks see the growth whole and
        re-size on arrivals alone, except while replicas join, when the two series Serve
        averages over different windows mix the capacity before and after."""
        if tick.panic_before and tick.joined:
            return tick.current, Rule.PANIC, f"{reason}; replicas joining, sizing held"
        needed = tick.need(arrivals)
        backlog = 0.0
        if not tick.panic_before and tick.service_s is not None:
            backlog = tick.signals.queued_requests * tick.service_s / self.config.decision_period_s
            # Never more than counting every queued request as one in flight (Knative's
            # panic sizing), which a service time over the decision period would exceed.
            needed = max(needed, min(tick.need(arrivals + backlog), tick.need(tick.demand_now)))
        why = f"arrivals keep {arrivals:.1f} in flight, backlog {backlog:.1f}: needs {needed}"
        return max(tick.current, needed), Rule.PANIC, f"{reason}; {why}"

    @staticmethod
    def _backlog_hold(tick: _Tick) -> str | None:
        """Why not to size on the backlog now. Demand counts queued requests, and the queue
        grows every tick while asked-for replicas start, so re-sizing on it would chase the
        backlog to max_replicas; a queue that shrinks is served by what already runs."""
        if tick.starting:
            return f"{tick.current - tick.signals.running_replicas} asked-for replicas starting"
        if tick.signals.queued_requests > 0 and tick.draining:
            return f"backlog draining ({tick.queued_before:g} -> {tick.signals.queued_requests:g})"
        return None

    def _scale_up(self, tick: _Tick, state: ReactiveState) -> _Proposal | None:
        cfg = self.config
        # At zero only a waiting request scales (from_zero); the windows' echo of requests
        # that already finished must not.
        trigger = self._up_trigger(tick) if tick.current > 0 else None
        if trigger is None:
            return None
        rule, why = trigger
        held = self._backlog_hold(tick)
        if held is not None and (rule is not Rule.UTILIZATION_UP or tick.starting):
            return tick.current, Rule.UP_PENDING, f"{why}; {held}"
        # Up on the short window, down on the long one: scaling up late costs SLO, scaling
        # down early costs a flap; and a burst's drained backlog lingers in the long window.
        desired = tick.need(tick.load_panic)
        if rule is not Rule.UTILIZATION_UP:
            desired = max(desired, tick.current + 1)
        step = min(max(desired - tick.current, 1), cfg.max_step_up)
        since = _since(tick.now, state.last_scale_up_s)
        if since < cfg.upscale_cooldown_s:
            reason = f"{why}; last scale-up {since:.0f}s ago < {cfg.upscale_cooldown_s:g}s"
            return tick.current, Rule.UP_COOLDOWN, reason
        return tick.current + step, rule, f"{why}; +{step} (needs {desired})"

    def _up_trigger(self, tick: _Tick) -> tuple[Rule, str] | None:
        cfg = self.config
        util = tick.utilization(tick.load_panic)
        if util > cfg.upscale_ratio * cfg.target_utilization:
            limit = cfg.upscale_ratio * cfg.target_utilization
            return Rule.UTILIZATION_UP, f"utilisation {util:.0%} > {limit:.0%}"
        queued = tick.queued_panic / tick.current
        if queued > cfg.max_queued_per_replica:
            return (
                Rule.QUEUE_UP,
                f"{queued:.1f} queued per replica > {cfg.max_queued_per_replica:g}",
            )
        p95 = tick.signals.p95_latency_ms
        # Latency with idle replicas is the model's own speed, not load: more replicas won't
        # help, so a mis-set SLO must not walk the deployment up to max_replicas.
        loaded = (
            tick.utilization(tick.demand_stable) >= cfg.downscale_ratio * cfg.target_utilization
        )
        if cfg.slo_p95_ms is not None and p95 is not None and p95 > cfg.slo_p95_ms and loaded:
            return Rule.LATENCY_UP, f"p95 {p95:.0f} ms > SLO {cfg.slo_p95_ms:g} ms"
        return None

    def _to_zero(self, tick: _Tick, state: ReactiveState) -> _Proposal | None:
        cfg = self.config
        if tick.low > 0 or tick.current == 0 or state.idle_since_s is None:
            return None
        after = cfg.scale_to_zero_after_s or cfg.downscale_cooldown_s
        idle_for = tick.now - state.idle_since_s
        if idle_for < after:
            return None
        if self._panic_held(tick, state):
            return tick.current, Rule.PANIC_HOLD, "idle, but within a stable window of a panic"
        return 0, Rule.TO_ZERO, f"idle for {idle_for:.0f}s >= {after:g}s"

    def _scale_down(self, tick: _Tick, state: ReactiveState) -> _Proposal | None:
        cfg = self.config
        util = tick.utilization(tick.demand_stable)
        limit = cfg.downscale_ratio * cfg.target_utilization
        queue_empty = tick.queued_stable <= NEAR_EMPTY_QUEUE_PER_REPLICA * tick.current
        if util >= limit or not queue_empty or not tick.stable_full:
            return None
        lowest = max(tick.low, 1)  # the last replica goes only by the idle rule (to_zero)
        desired = max(tick.need(tick.demand_stable), self._step_floor(tick.current), lowest)
        if desired >= tick.current:
            return None
        why = f"utilisation {util:.0%} < {limit:.0%} over {cfg.stable_window_s:g}s"
        if self._panic_held(tick, state):
            return tick.current, Rule.PANIC_HOLD, f"{why}; within a stable window of a panic"
        wait = self._down_wait(tick, state)
        if wait is not None:
            return tick.current, Rule.DOWN_COOLDOWN, f"{why}; {wait}"
        return desired, Rule.UTILIZATION_DOWN, f"{why}; -{tick.current - desired}"

    def _step_floor(self, current: int) -> int:
        """The fewest replicas one scale-down may leave: at most max_step_down fewer, and at
        least current / max_scale_down_rate, so a wrong reading costs half the capacity at
        worst before the next stable window can show it."""
        cfg = self.config
        by_rate = math.ceil(current / cfg.max_scale_down_rate - 1e-9)
        return max(current - cfg.max_step_down, by_rate)

    def _down_wait(self, tick: _Tick, state: ReactiveState) -> str | None:
        """Why a scale-down must wait. The long cooldown counts from the last scale-up (the
        first tick stands in for one): load that needed replicas may come back, and that is
        the flap to prevent. Steps down are spaced by the shorter interval only: one after
        another is no flap, but each must be judged on a window at the size the last left."""
        cfg = self.config
        since_up = min(
            _since(tick.now, state.last_scale_up_s), _since(tick.now, state.observing_since_s)
        )
        if since_up < cfg.downscale_cooldown_s:
            return f"last scale-up {since_up:.0f}s ago < {cfg.downscale_cooldown_s:g}s"
        interval = cfg.downscale_interval_s
        interval = cfg.stable_window_s if interval is None else interval
        since_down = _since(tick.now, state.last_scale_down_s)
        if since_down < interval:
            return f"last scale-down {since_down:.0f}s ago < {interval:g}s"
        return None

    def _panic_held(self, tick: _Tick, state: ReactiveState) -> bool:
        return _since(tick.now, state.last_panic_s) < self.config.stable_window_s

    def _bounded(self, tick: _Tick, target: int, rule: Rule, reason: str) -> tuple[int, str, str]:
        bounded = min(max(target, tick.low), tick.high)
        span = f"[{tick.low}, {tick.high}]"
        if bounded == target:
            return target, rule, reason
        if target == tick.current:  # a hold outside the bounds moves to them
            return bounded, Rule.BOUNDS, f"{tick.current} outside {span}"
        if bounded == tick.current:  # the rule wanted to move, the bound says no
            return bounded, Rule.BOUNDS, f"{reason}; held by bounds {span}"
        return bounded, rule, f"{reason}; bounded to {span}"

    def _inputs(self, tick: _Tick, state: ReactiveState) -> dict[str, Any]:
        return {
            **tick.signals.as_dict(),
            "current": tick.current,
            "min": tick.low,
            "max": tick.high,
            "demand_stable": round(tick.demand_stable, 3),
            "demand_panic": round(tick.demand_panic, 3),
            "queued_stable": round(tick.queued_stable, 3),
            "utilization_stable": round(min(tick.utilization(tick.demand_stable), 1e9), 4),
            "utilization_panic": round(min(tick.utilization(tick.demand_panic), 1e9), 4),
            "needed": tick.need(tick.demand_panic),
            "panic": _since(tick.now, state.last_panic_s) < self.config.stable_window_s,
        }


def _since(now: float, then: float | None) -> float:
    return math.inf if then is None else now - then


def _service_s(given: float | None, signals: Signals) -> float | None:
    """Seconds a request holds a slot: the caller's measure, else this tick's p50."""
    if given is not None and math.isfinite(given) and given > 0:
        return given
    p50 = signals.p50_latency_ms
    return p50 / 1000 if p50 is not None and math.isfinite(p50) and p50 > 0 else None
