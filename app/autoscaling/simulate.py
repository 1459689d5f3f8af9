"""A discrete-time replay of request traces through a real autoscaling policy: Serve's control loop
and handle-side metrics around the policy, a FIFO queue over replicas with fixed slots."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# What this leaves out of Serve's controller (ray/serve/_private/autoscaling_state.py,
# deployment_state.py, router.py), each small beside the delays and windows it keeps:
# - one handle (the proxy) collecting running requests, Serve's default; its per-replica counts
#   are summed into one series, so a replica stopped since the last push counts until the
#   next (each running replica's first sample still opens Serve's window, as there);
# - a push reaches the controller at once; no stale-handle timeout, no columnar reports;
# - a replica runs exactly start_s after the ask, none fails, and takes requests at once;
#   a scale-down stops starting replicas first, then the newest running, at once, and a
#   stopping replica finishes its requests without counting replica-hours;
# - Serve skips recording a scale time while running replicas are outside the bounds: here
#   they never are;
# - replica-side figures (requests_per_s, p50) are PerfTracker's 30 s window at the decision,
#   not averaged again over the look-back; service time is fixed (no batching, no contention).

# How often Serve's controller runs its control loop and so asks the policy
# (RAY_SERVE_CONTROL_LOOP_INTERVAL_S).
CONTROL_LOOP_S = 0.1
# The handle records a sample every look_back_period_s x this, at most every metrics_interval_s
# (RAY_SERVE_AUTOSCALING_METRIC_RECORD_INTERVAL_FACTOR).
RECORD_INTERVAL_FACTOR = 0.2
# The window of app.fleet.stats.PerfTracker behind each replica's requests_per_s and p50.
PERF_WINDOW_S = 30.0
# The names app.autoscaling.report.ReplicaMetric gives the figures replicas report.
REQUESTS_PER_S = "requests_per_s"
LATENCY_P50_MS = "latency_p50_ms"

# A policy as Serve's controller calls it: context in, (replicas, policy_state) out.
Policy = Callable[[Any], tuple[float, Mapping[str, Any]]]
# Builds the policy's context from AutoscalingContext's keyword arguments (see SimContext).
ContextFactory = Callable[..., Any]


@dataclass(frozen=True)
class ReplicaModel:
    """A replica serves up to `slots` requests at once (max_ongoing_requests), each taking
    `service_s`; one asked for serves `start_s` later."""

    service_s: float
    slots: int
    start_s: float

    @property
    def capacity_per_s(self) -> float:
        return self.slots / self.service_s


@dataclass(frozen=True)
class MetricsCadence:
    """When the handle samples its queued and running requests (`record_s`), and when it pushes
    the samples of the last `look_back_s` to the controller (`push_s`)."""

    record_s: float
    push_s: float
    look_back_s: float
    phase_s: float = 0.0  # where the handle's timers stand against the trace's origin

    @classmethod
    def serve(
        cls, metrics_interval_s: float, look_back_period_s: float, phase_s: float = 0.0
    ) -> MetricsCadence:
        """The cadence Serve derives from a deployment's autoscaling_config."""
        record = min(look_back_period_s * RECORD_INTERVAL_FACTOR, metrics_interval_s)
        return cls(record, metrics_interval_s, look_back_period_s, phase_s)


@dataclass(frozen=True)
class Deployment:
    replica: ReplicaModel
    cadence: MetricsCadence
    min_replicas: int
    max_replicas: int
    initial_replicas: int


class SimClock:
    """The simulation's time, for code that reads a clock (Serve's delay logic calls
    time.time(); a test or benchmark swaps its `time` module for this)."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now


class SimContext:
    """The fields of Serve's AutoscalingContext that policies read, without Ray; callables are
    evaluated on first read, as Serve's lazy metrics are."""

    def __init__(self, **fields: Any) -> None:
        self._lazy = {k: fields.pop(k) for k in list(fields) if callable(fields[k])}
        self.__dict__.update(fields)

    def __getattr__(self, name: str) -> Any:
        lazy = self.__dict__.get("_lazy", {})
        if name not in lazy:
            raise AttributeError(name)
        value = self.__dict__[name] = lazy[name]()
        return value


def time_weighted_average(
    points: Sequence[tuple[float, float]], window_start: float | None, last_window_s: float
) -> float | None:
    """Serve's mean of a right-continuous step function over [window_start, last point +
    last_window_s], zero before the first point (metrics_utils.time_weighted_average)."""
    if not points:
        return None
    start = points[0][0] if window_start is None else window_start
    end = points[-1][0] + last_window_s
    if end <= start:
        return None
    total = 0.0
    for i, (t, value) in enumerate(points):
        nxt = points[i + 1][0] if i + 1 < len(points) else end
        lo, hi = max(t, start), min(nxt, end)
        if hi > lo:
            total += value * (hi - lo)
    return total / (end - start)


class HandleMetrics:
    """Serve's metric path for one handle: samples of (queued, running) every record_s, kept
    for look_back_s, pushed every push_s; the controller averages the last push up to now.
    Each running replica is a series of its own that starts at its first sample, and Serve's
    window opens once every series has one (so a scale-up shortens the next look-back)."""

    def __init__(self, cadence: MetricsCadence) -> None:
        self.cadence = cadence
        self._samples: deque[tuple[float, float, float]] = deque()
        self._first: dict[str, float] = {}
        self._report: list[tuple[float, float, float]] = []
        self._report_first: dict[str, float] = {}
        self._next_record = cadence.phase_s
        # Pushed just after a sample, so a sample and a push never share a timestamp.
        self._next_push = cadence.phase_s + 1e-3

    def observe(self, now: float, queued: float, running: float, replicas: Sequence[str]) -> None:
        """The handle's timers that fell due by `now`, in their order, with `now`'s figures."""
        while min(self._next_record, self._next_push) <= now:
            if self._next_record <= self._next_push:
                self._record(self._next_record, queued, running, replicas)
                self._next_record += self.cadence.record_s
            else:
                self._push(self._next_push)
                self._next_push += self.cadence.push_s

    def forget(self, replica: str) -> None:
        self._first.pop(replica, None)

    def total_requests(self, now: float, running: Sequence[str]) -> float:
        """ctx.total_num_requests: queued plus running, merged over every series."""
        points = self._report
        if not points:
            return 0.0
        firsts = [self._report_first[r] for r in running if r in self._report_first]
        window_start = None
        if firsts:  # the queued series and at least one replica's
            aligned = max(points[0][0], *firsts)
            window_start = aligned if aligned <= points[-1][0] else None
        merged = [(t, q + r) for t, q, r in points]
        value = time_weighted_average(merged, window_start, _last_window(now, points))
        return value or 0.0

    def queued_requests(self, now: float) -> float:
        """ctx.total_queued_requests: the queued series alone."""
        points = [(t, q) for t, q, _ in self._report]
        return time_weighted_average(points, None, _last_window(now, self._report)) or 0.0

    def _record(self, t: float, queued: float, running: float, replicas: Sequence[str]) -> None:
        self._samples.append((t, queued, running))
        for replica in replicas:
            self._first.setdefault(replica, t)
        self._prune(t)

    def _push(self, t: float) -> None:
        self._prune(t)
        self._report = list(self._samples)
        first_kept = self._report[0][0] if self._report else t
        self._report_first = {r: max(s, first_kept) for r, s in self._first.items()}

    def _prune(self, t: float) -> None:
        start = t - self.cadence.look_back_s
        while self._samples and self._samples[0][0] <= start:
            self._samples.popleft()


def _last_window(now: float, points: Sequence[tuple[float, ...]]) -> float:
    # Serve holds the last sample until now; a clock behind the sample counts 1 ms.
    return max(now - points[-1][0], 1e-3) if points else 1e-3


class QueueModel:
    """First come, first served over `slots` x running replicas, each request `service_s`.
    Capacity changes only between ticks; a replica removed finishes what it runs."""

    def __init__(self, arrivals: Sequence[float] | np.ndarray, service_s: float) -> None:
        self.arrivals: list[float] = [float(a) for a in arrivals]
        self.service_s = service_s
        self.starts: list[float] = []
        self._busy: deque[float] = deque()  # finish times, ascending
        self._arrived = 0  # requests arrived by the last `queued` query
        self._done = 0  # requests finished by the last `completed` query
        self._window_from = 0  # first of those still inside its window

    def advance(self, t0: float, t1: float, slots: int) -> None:
        """Starts every request that gets a free slot before t1."""
        arrivals, starts, busy, service = self.arrivals, self.starts, self._busy, self.service_s
        head = len(starts)
        while head < len(arrivals) and arrivals[head] < t1:
            at = max(arrivals[head], t0)
            while busy and busy[0] <= at:
                busy.popleft()
            while len(busy) >= slots and busy and busy[0] < t1:
                at = max(at, busy.popleft())
            if len(busy) >= slots:
                break
            starts.append(at)
            busy.append(at + service)
            head += 1

    def queued(self, t: float) -> int:
        """Requests arrived before t that no slot has taken yet; t must not go backwards."""
        arrivals = self.arrivals
        while self._arrived < len(arrivals) and arrivals[self._arrived] < t:
            self._arrived += 1
        return max(0, self._arrived - len(self.starts))

    def in_flight(self, t: float) -> int:
        while self._busy and self._busy[0] <= t:
            self._busy.popleft()
        return len(self._busy)

    def completed(self, t: float, window_s: float) -> int:
        """Requests finished in (t - window_s, t]; t must not go backwards between calls."""
        starts, service = self.starts, self.service_s
        while self._done < len(starts) and starts[self._done] + service <= t:
            self._done += 1
        while self._window_from < self._done and starts[self._window_from] + service <= (
            t - window_s
        ):
            self._window_from += 1
        return self._done - self._window_from

    def latencies(self, end: float) -> np.ndarray:
        """Each request's latency; one still waiting at `end` counts as starting then."""
        arrivals = np.asarray(self.arrivals, dtype=float)
        starts = np.maximum(arrivals, end)
        starts[: len(self.starts)] = self.starts
        return starts + self.service_s - arrivals


@dataclass
class RunResult:
    """Per tick the target and running replicas; per request its arrival and latency."""

    tick_s: float
    targets: np.ndarray
    running: np.ndarray
    arrivals: np.ndarray
    latencies: np.ndarray
    actions: list[tuple[float, int, int]] = field(default_factory=list)  # (t, from, to)


class Simulation:
    """One policy over one trace. Per control-loop tick: asked-for replicas that are due start
    running, the handle samples and pushes, the controller asks the policy (Serve's
    `get_decision_num_replicas`: ceil, then bounds) and applies the target; then the queue
    runs to the next tick. Times are seconds from the trace's origin; the policy's clock and
    context read `epoch_s` + that."""

    def __init__(
        self,
        deployment: Deployment,
        arrivals: Sequence[float] | np.ndarray,
        start_s: float,
        end_s: float,
        *,
        epoch_s: float = 0.0,
        clock: SimClock | None = None,
        tick_s: float = CONTROL_LOOP_S,
    ) -> None:
        self.deployment = deployment
        self.queue = QueueModel(arrivals, deployment.replica.service_s)
        self.metrics = HandleMetrics(deployment.cadence)
        self.start_s, self.end_s, self.epoch_s, self.tick_s = start_s, end_s, epoch_s, tick_s
        self.clock = clock or SimClock()
        self.running = [f"r{i}" for i in range(deployment.initial_replicas)]
        self.target = deployment.initial_replicas
        self._starting: deque[tuple[float, str]] = deque()
        self._names = deployment.initial_replicas
        self.policy_state: dict[str, Any] = {}
        self.last_scale_up_s: float | None = None
        self.last_scale_down_s: float | None = None
        self.actions: list[tuple[float, int, int]] = []

    def run(self, policy: Policy, make_context: ContextFactory = SimContext) -> RunResult:
        ticks = round((self.end_s - self.start_s) / self.tick_s)
        targets = np.zeros(ticks, dtype=np.int32)
        running = np.zeros(ticks, dtype=np.int32)
        slots = self.deployment.replica.slots
        for i in range(ticks):
            now = round(self.start_s + i * self.tick_s, 9)  # 3.0, not 3.0000000000000004
            self.clock.now = self.epoch_s + now
            self._promote(now)
            queued, in_flight = self.queue.queued(now), self.queue.in_flight(now)
            self.metrics.observe(now, queued, in_flight, self.running)
            self._decide(now, policy, make_context)
            self.queue.advance(now, now + self.tick_s, len(self.running) * slots)
            targets[i], running[i] = self.target, len(self.running)
        arrivals = np.asarray(self.queue.arrivals)
        return RunResult(
            self.tick_s, targets, running, arrivals, self.queue.latencies(self.end_s), self.actions
        )

    def _decide(self, now: float, policy: Policy, make_context: ContextFactory) -> None:
        dep, running = self.deployment, list(self.running)
        epoch = self.epoch_s
        ctx = make_context(
            current_num_replicas=len(running),
            target_num_replicas=self.target,
            running_replicas=running,
            total_num_requests=lambda: self.metrics.total_requests(now, running),
            total_queued_requests=lambda: self.metrics.queued_requests(now),
            aggregated_metrics=lambda: self._replica_metrics(now, running),
            capacity_adjusted_min_replicas=dep.min_replicas,
            capacity_adjusted_max_replicas=dep.max_replicas,
            policy_state=dict(self.policy_state),
            last_scale_up_time=self._epoch(self.last_scale_up_s),
            last_scale_down_time=self._epoch(self.last_scale_down_s),
            current_time=epoch + now,
        )
        decision, state = policy(ctx)
        self.policy_state = dict(state or {})
        self._apply(min(max(math.ceil(decision), dep.min_replicas), dep.max_replicas), now)

    def _epoch(self, t: float | None) -> float | None:
        return None if t is None else self.epoch_s + t

    def _replica_metrics(self, now: float, running: Sequence[str]) -> dict[str, dict[str, float]]:
        """What each replica's record_autoscaling_stats reports: its share of the requests
        finished over PerfTracker's window, and p50 = the service time (a replica never queues
        beyond its slots) while it has finished any."""
        if not running:
            return {}
        done = self.queue.completed(now, PERF_WINDOW_S)
        span = min(PERF_WINDOW_S, max(1.0, now - self.start_s))
        share = done / span / len(running)
        metrics = {REQUESTS_PER_S: {r: share for r in running}}
        if done:
            metrics[LATENCY_P50_MS] = {r: self.deployment.replica.service_s * 1000 for r in running}
        return metrics

    def _promote(self, now: float) -> None:
        while self._starting and self._starting[0][0] <= now:
            self.running.append(self._starting.popleft()[1])

    def _apply(self, target: int, now: float) -> None:
        """Serve's scale-up starts new replicas; its scale-down stops starting ones first, then
        the newest running (a removed replica finishes its requests at no cost here)."""
        if target == self.target:
            return
        if target > self.target:
            ready = now + self.deployment.replica.start_s
            for _ in range(target - self.target):
                self._starting.append((ready, f"r{self._names}"))
                self._names += 1
            self.last_scale_up_s = now
        else:
            for _ in range(self.target - target):
                if self._starting:
                    self._starting.pop()
                else:
                    self.metrics.forget(self.running.pop())
            self.last_scale_down_s = now
        self.actions.append((now, self.target, target))
        self.target = target


def poisson_arrivals(
    rate_per_s: Sequence[float] | np.ndarray, rng: np.random.Generator, tick_s: float = 0.1
) -> np.ndarray:
    """Sorted arrival times (seconds from 0) of a Poisson process whose rate is rate_per_s[i]
    during second i."""
    per_tick = max(1, round(1 / tick_s))
    rates = np.repeat(np.asarray(rate_per_s, dtype=float), per_tick) * (1 / per_tick)
    counts = rng.poisson(rates)
    starts = np.repeat(np.arange(len(rates)) / per_tick, counts)
    return np.sort(starts + rng.random(len(starts)) / per_tick)
