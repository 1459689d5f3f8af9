"""Autoscaling (issue 11): Serve 2.60's default policy against ours, reactive and predictive, in a
simulator driven by the real decision code, with a replica measured on this machine.

Three traces (a compressed daily cycle after a few compressed days of history, a sudden 10x
burst, a slow ramp) replay through app.autoscaling.simulate under
  (a) Serve's default policy: `replica_queue_length_autoscaling_policy` inside Serve's own
      `_apply_autoscaling_config` wrapper (upscale_delay_s 30, downscale_delay_s 600), fed by
      Serve's handle metrics (samples every 6 s, pushed every 10 s, 30 s look-back mean);
  (b) ours, reactive only: FleetAutoscalingPolicy (the adapter around AutoscalingCore) with
      predictive scaling off, in the same Serve wrapper with the autoscaling_config our builder
      emits (delays 0; metrics every 1 s over a 2 s look-back);
  (c) ours with prediction: the same, forecasting from the trace's history in the store.
All three see real ray.serve.config.AutoscalingContext objects, built without a cluster; Serve's
delay logic reads time.time(), which is pointed at the simulation's clock. Serve's
target_ongoing_requests is set to ours (0.7 x max_ongoing_requests), so both aim at the same
utilisation and differ only in how they get there.

The replica: start time = a fresh process that imports the app, loads the tiny-llama runner
from models/tiny-llama.yaml and serves one request (no Ray: actor start-up adds to it on a
cluster); per-replica capacity = a full batch's throughput; service time = one request.

    python benchmarks/autoscale_bench.py [--day-s 1800] [--what-if max_step_down=10]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import platform
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from ray.serve import autoscaling_policy as serve_policy_module  # noqa: E402
from ray.serve._private.autoscaling_state import _resolve_policy_callable  # noqa: E402
from ray.serve._private.common import DeploymentID, ReplicaID  # noqa: E402
from ray.serve.autoscaling_policy import _apply_autoscaling_config  # noqa: E402
from ray.serve.config import AutoscalingConfig as ServeConfig  # noqa: E402
from ray.serve.config import AutoscalingContext  # noqa: E402

from app.autoscaling.config import AutoscalingConfig, merged  # noqa: E402
from app.autoscaling.serve_policy import (  # noqa: E402
    FleetAutoscalingPolicy,
    serve_autoscaling_config,
)
from app.autoscaling.sim_summary import Summary, summarize  # noqa: E402
from app.autoscaling.simulate import (  # noqa: E402
    Deployment,
    MetricsCadence,
    Policy,
    ReplicaModel,
    RunResult,
    SimClock,
    Simulation,
    poisson_arrivals,
)
from app.autoscaling.store import AutoscaleStore, rate_key, status_key  # noqa: E402
from app.kv.client import ScanPage  # noqa: E402

MODEL, REGION = "sim", "local"
EPOCH = 1_800_000_000.0  # a minute boundary: the forecast counts epoch minutes
DEPLOYMENT_ID = DeploymentID(name=MODEL, app_name=MODEL)
TARGET_UTILIZATION = AutoscalingConfig().target_utilization

CHILD = r"""
import json, statistics, sys, time
from app.catalog.cards import load_catalogue
from app.serving.runners.base import GenerationRequest, runner_class
catalogue = load_catalogue(sys.argv[1])
card = catalogue.cards[sys.argv[2]]
runner = runner_class(card.loader)(card, card.resolve_source(catalogue.directory))
t = time.perf_counter(); runner.load(); load_s = time.perf_counter() - t
prompt, max_tokens = "How does autoscaling work?", card.generation.max_tokens
request = GenerationRequest(prompt=prompt, max_tokens=max_tokens, seed=0)
def once(n):
    t = time.perf_counter()
    for _ in runner.generate([request] * n):
        pass
    return time.perf_counter() - t
first_s = once(1)
print("READY", flush=True)
n = card.batching.max_batch_size
for _ in range(2):
    once(1), once(n)
# Interleaved, so load from other processes on the machine falls on both alike.
rounds = [(once(1), once(n)) for _ in range(15)]
print(json.dumps({"load_s": load_s, "first_s": first_s, "batch": n,
                  "single_s": statistics.median(r[0] for r in rounds),
                  "batch_s": statistics.median(r[1] for r in rounds),
                  "max_ongoing": card.max_ongoing_requests}), flush=True)
"""


# ---- the replica, measured ----------------------------------------------------------------


def measure(model: str) -> dict[str, float]:
    """A fresh process's time to ready (imports, load, one request), then its timings."""
    began = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(ROOT / "models"), model],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert child.stdout is not None
    for line in child.stdout:
        if line.strip() == "READY":
            break
    ready_s = time.perf_counter() - began
    figures = json.loads(child.stdout.readline())
    child.wait(timeout=120)
    return {"ready_s": ready_s, **figures}


def measured_replica(args: argparse.Namespace) -> tuple[ReplicaModel, dict[str, Any]]:
    """The replica model from the flags, or measured. Measured figures are rounded to what the
    printed flags carry (0.1 ms, 0.01 s), so passing those flags reproduces a run exactly."""
    echo = measure("echo") if args.start_s is None else None
    llama = measure("tiny-llama") if None in (args.start_s, args.service_ms, args.slots) else {}
    service_ms = args.service_ms or round(llama["single_s"] * 1000, 1)
    service_s = service_ms / 1000
    capacity = llama["batch"] / llama["batch_s"] if llama else None
    slots = args.slots or max(1, round((capacity or 0) * service_s))
    start_s = args.start_s if args.start_s is not None else round(llama["ready_s"], 2)
    info = {"echo": echo, "tiny-llama": llama, "capacity_per_s": capacity}
    return ReplicaModel(service_s=service_s, slots=slots, start_s=start_s), info


# ---- traces ---------------------------------------------------------------------------------

# A compressed day as (fraction of the day, replicas needed at the target utilisation): a
# quiet night, a steep morning ramp, a dip and a second peak, an evening decline.
DAY_SHAPE = (
    (0.0, 2),
    (0.28, 2),
    (0.34, 12),
    (0.45, 16),
    (0.55, 13),
    (0.62, 16),
    (0.78, 5),
    (0.9, 2),
    (1.0, 2),
)


@dataclass
class Trace:
    """Requests per second from `start_s` (negative: warm-up) on; figures count over `window`."""

    name: str
    rate: np.ndarray  # per second, from start_s
    start_s: float
    window: tuple[float, float]
    burst: tuple[float, float] | None = None  # (when, rate)
    history: list[tuple[int, int]] = field(default_factory=list)  # (epoch minute, count)

    @property
    def initial_rate(self) -> float:
        return float(self.rate[0])


def daily(unit: float, day_s: int, history_days: int, rng: np.random.Generator) -> Trace:
    """History days (as per-minute counts for the store), then a warm-up and one measured day;
    each day's level varies by a few percent."""
    x, y = zip(*DAY_SHAPE, strict=True)
    shape = np.interp(np.arange(day_s) / day_s, x, y) * unit
    levels = rng.normal(1.0, 0.03, history_days + 1)
    history = []
    for day in range(history_days):
        counts = rng.poisson((shape * levels[day]).reshape(-1, 60).sum(axis=1))
        first = int(EPOCH // 60) - (history_days - day) * (day_s // 60)
        history += [(first + m, int(c)) for m, c in enumerate(counts)]
    warm = 300
    history = history[: len(history) - warm // 60]  # the simulation records those itself
    rate = np.concatenate((shape[-warm:] * levels[-2], shape * levels[-1]))
    return Trace("daily cycle", rate, -warm, (0, day_s), history=history)


def burst(unit: float) -> Trace:
    """2 replicas' worth for 10 minutes, 10x that for 5, then back for 20."""
    rate = np.concatenate(([2 * unit] * 720, [20 * unit] * 300, [2 * unit] * 1200))
    return Trace("10x burst", rate, -120, (0, 2100), burst=(600, 20 * unit))


def ramp(unit: float) -> Trace:
    """1 replica's worth rising to 16 over 40 minutes, then held for 10."""
    rising = np.linspace(1, 16, 2400) * unit
    rate = np.concatenate(([unit] * 120, rising, [16 * unit] * 600))
    return Trace("slow ramp", rate, -120, (0, 3000))


TRACES = ("daily", "burst", "ramp")


def build_trace(key: str, unit: float, args: argparse.Namespace, rng: np.random.Generator) -> Trace:
    if key == "daily":
        return daily(unit, args.day_s, args.history_days, rng)
    return burst(unit) if key == "burst" else ramp(unit)


# ---- the policies ---------------------------------------------------------------------------


def serve_default(low: int, high: int, initial: int, target: float) -> tuple[Policy, ServeConfig]:
    """Serve's default policy as its controller wraps it (delays, factors), default config but
    the bounds and the target per replica."""
    config = ServeConfig(
        min_replicas=low,
        max_replicas=high,
        initial_replicas=initial,
        target_ongoing_requests=target,
    )
    return _apply_autoscaling_config(_resolve_policy_callable(config.policy)), config


def ours(
    replica: ReplicaModel,
    low: int,
    high: int,
    initial: int,
    config: AutoscalingConfig,
    clock: SimClock,
    trace: Trace,
) -> tuple[Policy, ServeConfig]:
    """The adapter as Serve creates it, over an in-memory KV store that holds what a previous
    controller left: the trace's history and the replica start time it measured."""
    emitted = serve_autoscaling_config(
        config,
        model=MODEL,
        region=REGION,
        min_replicas=low,
        max_replicas=high,
        initial_replicas=initial,
        max_ongoing_requests=replica.slots,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        serve_config = ServeConfig.model_validate(emitted)
    kv = MemoryKV()
    hours: dict[int, dict[int, int]] = {}
    for minute, count in trace.history:
        hours.setdefault(minute // 60, {})[minute] = count
    kv.mset({rate_key(MODEL, REGION, h): counts for h, counts in hours.items()})
    saved = {"replica_start_s": replica.start_s, "service_time_ms": replica.service_s * 1000}
    kv.mset({status_key(MODEL, REGION): saved})
    store = AutoscaleStore(lambda: kv, clock=clock, background=False)
    policy = FleetAutoscalingPolicy(
        config.model_dump(mode="json"),
        MODEL,
        REGION,
        replica.slots,
        store=store,
        clock=clock,
    )
    return _apply_autoscaling_config(policy), serve_config


class MemoryKV:
    """The KV calls AutoscaleStore makes, over a dict."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def mget(self, keys: Any, default: Any = None) -> list[Any]:
        return [self.data.get(k, default) for k in keys]

    def mset(self, mapping: Any, *, ttl: float | None = None) -> None:
        self.data.update(mapping)

    def scan(
        self, prefix: str = "", *, page_size: int = 100, cursor: str | None = None
    ) -> ScanPage:
        return ScanPage(sorted((k, v) for k, v in self.data.items() if k.startswith(prefix)), None)


def context_factory(config: ServeConfig) -> Callable[..., AutoscalingContext]:
    """Serve's own AutoscalingContext, as its controller builds it (replica names become
    ReplicaIDs, in the running list and as the metrics' keys)."""
    ids: dict[str, ReplicaID] = {}

    def replica_id(name: str) -> ReplicaID:
        if name not in ids:
            ids[name] = ReplicaID(name, DEPLOYMENT_ID)
        return ids[name]

    def make(
        *, running_replicas: list[str], aggregated_metrics: Any, **fields: Any
    ) -> AutoscalingContext:
        def metrics() -> dict[str, dict[ReplicaID, float]]:
            raw = aggregated_metrics()
            return {k: {replica_id(r): v for r, v in per.items()} for k, per in raw.items()}

        return AutoscalingContext(
            deployment_id=DEPLOYMENT_ID,
            deployment_name=DEPLOYMENT_ID.name,
            app_name=DEPLOYMENT_ID.app_name,
            running_replicas=[replica_id(r) for r in running_replicas],
            aggregated_metrics=metrics,
            raw_metrics=None,
            config=config,
            **fields,
        )

    return make


# ---- running ----------------------------------------------------------------------------


def run_one(
    trace: Trace,
    arrivals: np.ndarray,
    replica: ReplicaModel,
    args: argparse.Namespace,
    ours_config: AutoscalingConfig | None,
    phase: float,
) -> tuple[RunResult, float]:
    """One policy over one trace; no config is Serve's default."""
    capacity = replica.capacity_per_s
    initial = max(1, math.ceil(trace.initial_rate / (capacity * TARGET_UTILIZATION)))
    clock = SimClock()
    if ours_config is None:
        target = args.serve_target or replica.slots * TARGET_UTILIZATION
        policy, config = serve_default(1, args.max_replicas, initial, target)
    else:
        policy, config = ours(replica, 1, args.max_replicas, initial, ours_config, clock, trace)
    cadence = MetricsCadence.serve(config.metrics_interval_s, config.look_back_period_s)
    cadence = MetricsCadence(
        cadence.record_s,
        cadence.push_s,
        cadence.look_back_s,
        trace.start_s + phase * cadence.record_s,
    )
    deployment = Deployment(replica, cadence, 1, args.max_replicas, initial)
    end = trace.start_s + len(trace.rate)
    sim = Simulation(deployment, arrivals, trace.start_s, end, epoch_s=EPOCH, clock=clock)
    began = time.perf_counter()
    original = serve_policy_module.time
    serve_policy_module.time = clock  # type: ignore[assignment]
    try:
        result = sim.run(policy, context_factory(config))
    finally:
        serve_policy_module.time = original
    return result, time.perf_counter() - began


def contenders(args: argparse.Namespace, day_s: int) -> list[tuple[str, AutoscalingConfig | None]]:
    """(a), (b), (c), and (b'), (c') with the what-if overrides on top; None is Serve's."""
    predictive = {"predictive": {"season_s": day_s, "min_history_s": args.history_days * day_s}}
    reactive = {"predictive": {"enabled": False}}
    base = [predictive, parse_overrides(args.ours)]

    def config(*layers: dict[str, Any]) -> AutoscalingConfig:
        # Copies: `merged` writes later layers' sections into the first layer's dicts.
        return merged(*copy.deepcopy([*base, *layers]))

    rows: list[tuple[str, AutoscalingConfig | None]] = [
        ("(a) Serve default", None),
        ("(b) ours, reactive", config(reactive)),
        ("(c) ours, predictive", config()),
    ]
    if args.what_if:
        what_if, tag = parse_overrides(args.what_if), ", ".join(args.what_if)
        rows += [
            (f"(b') reactive, {tag}", config(what_if, reactive)),
            (f"(c') predictive, {tag}", config(what_if)),
        ]
    return rows


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """KEY=JSON items as a config layer; a dotted key reaches into a section
    (predictive.buffer=0.1)."""
    out: dict[str, Any] = {}
    for item in items:
        key, _, value = item.partition("=")
        *sections, name = key.split(".")
        layer = out
        for section in sections:
            layer = layer.setdefault(section, {})
        layer[name] = json.loads(value)
    return out


# ---- reporting --------------------------------------------------------------------------


@dataclass(frozen=True)
class Figures:
    """One policy's figures on one trace: means over the seeds (the burst: the slowest)."""

    violation_s: float
    per_seed: tuple[int, ...]
    replica_hours: float
    actions: float
    p95_s: float
    covered_after_s: float | None

    @classmethod
    def of(cls, runs: list[Summary]) -> Figures:
        covered = [r.covered_after_s for r in runs]
        return cls(
            violation_s=float(np.mean([r.violation_s for r in runs])),
            per_seed=tuple(r.violation_s for r in runs),
            replica_hours=float(np.mean([r.replica_hours for r in runs])),
            actions=float(np.mean([r.actions for r in runs])),
            p95_s=float(np.mean([r.p95_s for r in runs])),
            covered_after_s=None if None in covered else max(c for c in covered if c is not None),
        )


def periods(seconds: float | None, period_s: float) -> int | None:
    return None if seconds is None else math.ceil(seconds / period_s - 1e-9)


def table(trace: Trace, rows: dict[str, Figures], seeds: int, period_s: float) -> None:
    span = trace.window[1] - trace.window[0]
    print(f"\n### {trace.name} ({span:.0f} s measured, mean of {seeds} seeds)\n")
    burst = trace.burst is not None
    head = "| policy | SLO-violation s (per seed) | replica-hours | scaling actions | p95 ms |"
    print(head + (" burst covered after (slowest seed) |" if burst else ""))
    print("|---|---:|---:|---:|---:|" + ("---:|" if burst else ""))
    for label, f in rows.items():
        each = ", ".join(str(v) for v in f.per_seed)
        line = (
            f"| {label} | {f.violation_s:.1f} ({each}) | {f.replica_hours:.2f} | "
            f"{f.actions:.1f} | {f.p95_s * 1000:.0f} |"
        )
        if burst:
            after = f.covered_after_s
            n = periods(after, period_s)
            line += " never |" if after is None else f" {after:.1f} s = {n} periods |"
        print(line)


def ratio(num: float, den: float) -> str:
    if den == 0:
        return "0/0" if num == 0 else "inf"
    return f"{num / den:.2f}"


def verdicts(results: dict[str, dict[str, Figures]], period_s: float) -> None:
    """Each goal for the rows as run and for the what-if rows (b', c') if any."""
    print("\n### Against the goals (means over the seeds)\n")
    labels = list(next(iter(results.values())))
    serve, pairs = labels[0], [labels[1:3], labels[3:5]]
    for reactive, predictive in (p for p in pairs if p):
        _versus(results, reactive, serve, 0.5, total=True)
        if "daily cycle" in results:
            _versus({"daily cycle": results["daily cycle"]}, predictive, reactive, 1 / 3)
        spike = results.get("10x burst", {})
        for label in (reactive, predictive) if spike else ():
            n = periods(spike[label].covered_after_s, period_s)
            met = n is not None and n <= 2
            print(
                f"- burst answered, {label}: {n} decision periods of {period_s:g} s, slowest "
                f"seed (goal <= 2): {'met' if met else 'NOT met'}"
            )


def _versus(
    results: dict[str, dict[str, Figures]],
    ours: str,
    base: str,
    goal: float,
    total: bool = False,
) -> None:
    """`ours` against `base`: violation seconds at most goal x, replica-hours at most 1.1 x;
    per trace, and over all traces together when `total`."""
    rows = [(name, row[ours], row[base]) for name, row in results.items()]
    if total and len(rows) > 1:
        rows.append(("all traces", _sum([r[1] for r in rows]), _sum([r[2] for r in rows])))
    for name, mine, theirs in rows:
        vo, vb = mine.violation_s, theirs.violation_s
        ho, hb = mine.replica_hours, theirs.replica_hours
        met = vo <= goal * vb and ho <= 1.1 * hb
        print(
            f"- {ours} vs {base}, {name}: violation s {vo:.1f}/{vb:.1f} = {ratio(vo, vb)} "
            f"(goal <= {goal:.2f}), replica-hours {ho:.2f}/{hb:.2f} = {ratio(ho, hb)} "
            f"(goal <= 1.10): {'met' if met else 'NOT met'}"
        )


def _sum(rows: list[Figures]) -> Figures:
    return Figures(
        violation_s=sum(r.violation_s for r in rows),
        per_seed=(),
        replica_hours=sum(r.replica_hours for r in rows),
        actions=sum(r.actions for r in rows),
        p95_s=max(r.p95_s for r in rows),
        covered_after_s=None,
    )


def run_trace(
    key: str, args: argparse.Namespace, replica: ReplicaModel, slo_s: float
) -> tuple[Trace, dict[str, Figures]]:
    """Every contender over `args.seeds` draws of one trace (its Poisson arrivals, its
    history's noise, the handle timers' phase)."""
    unit = replica.capacity_per_s * TARGET_UTILIZATION  # requests/s one replica carries at target
    runs: dict[str, list[Summary]] = {}
    trace = None
    for seed in range(args.seed, args.seed + args.seeds):
        rng = np.random.default_rng([seed, TRACES.index(key)])
        trace = build_trace(key, unit, args, rng)
        arrivals = poisson_arrivals(trace.rate, rng) + trace.start_s
        phase = float(rng.random())
        for label, config in contenders(args, args.day_s):
            result, took = run_one(trace, arrivals, replica, args, config, phase)
            summary = summarize(
                result,
                slo_s,
                trace.window,
                start_s=trace.start_s,
                burst=trace.burst,
                capacity_per_s=replica.capacity_per_s,
            )
            runs.setdefault(label, []).append(summary)
            print(
                f"  seed {seed} {trace.name} / {label}: violation {summary.violation_s} s, "
                f"{summary.replica_hours:.2f} replica-hours, {summary.actions} actions, "
                f"covered after {summary.covered_after_s}; {len(arrivals)} requests, {took:.1f} s"
            )
    assert trace is not None
    return trace, {label: Figures.of(summaries) for label, summaries in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--day-s", type=int, default=1800, help="a compressed day (minutes x 60)")
    parser.add_argument("--history-days", type=int, default=3)
    parser.add_argument("--start-s", type=float, help="replica start time (default: measured)")
    parser.add_argument("--service-ms", type=float, help="service time (default: measured)")
    parser.add_argument("--slots", type=int, help="max_ongoing_requests (default: measured)")
    parser.add_argument("--slo-ms", type=float, help="p95 target (default: 2 x service time)")
    parser.add_argument("--serve-target", type=float, help="Serve's target_ongoing_requests")
    parser.add_argument("--max-replicas", type=int, default=40)
    parser.add_argument("--seed", type=int, default=11, help="the first seed")
    parser.add_argument("--seeds", type=int, default=3, help="draws of each trace")
    parser.add_argument("--ours", action="append", default=[], help="KEY=JSON for (b) and (c)")
    parser.add_argument("--what-if", action="append", default=[], help="KEY=JSON: rows b', c'")
    parser.add_argument("--traces", default=",".join(TRACES))
    args = parser.parse_args()
    if args.day_s % 60:
        parser.error("--day-s must be whole minutes")
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("app").setLevel(logging.WARNING)

    began = time.perf_counter()
    replica, info = measured_replica(args)
    slo_s = args.slo_ms / 1000 if args.slo_ms else 2 * replica.service_s
    print_setup(args, replica, info, slo_s)
    period_s = AutoscalingConfig().decision_period_s
    results: dict[str, dict[str, Figures]] = {}
    for key in args.traces.split(","):
        trace, figures = run_trace(key, args, replica, slo_s)
        results[trace.name] = figures
        table(trace, figures, args.seeds, period_s)
    verdicts(results, period_s)
    print(f"\ntotal {time.perf_counter() - began:.0f} s")


def print_setup(
    args: argparse.Namespace, replica: ReplicaModel, info: dict[str, Any], slo_s: float
) -> None:
    print("command: python benchmarks/autoscale_bench.py " + " ".join(sys.argv[1:]))
    print(
        f"date: {time.strftime('%Y-%m-%d')}; machine: {_cpu()}, {os.cpu_count()} cores, "
        f"python {platform.python_version()}"
    )
    echo, llama = info["echo"], info["tiny-llama"]
    if echo:
        print(
            f"echo runner: fresh process to ready {echo['ready_s']:.2f} s "
            f"(load {echo['load_s'] * 1000:.1f} ms)"
        )
    if llama:
        print(
            f"tiny-llama runner: fresh process to ready {llama['ready_s']:.2f} s "
            f"(load {llama['load_s']:.2f} s, first request {llama['first_s'] * 1000:.0f} ms); "
            f"one request {llama['single_s'] * 1000:.1f} ms, a batch of {llama['batch']} "
            f"{llama['batch_s'] * 1000:.1f} ms = {info['capacity_per_s']:.0f} requests/s "
            f"(card max_ongoing_requests {llama['max_ongoing']})"
        )
    print(
        f"replica model: start {replica.start_s:.2f} s, service {replica.service_s * 1000:.1f} ms, "
        f"{replica.slots} slots = {replica.capacity_per_s:.0f} requests/s; "
        f"SLO p95 <= {slo_s * 1000:.1f} ms; day compressed to {args.day_s} s, "
        f"{args.history_days} days of history; seeds {args.seed}..{args.seed + args.seeds - 1}"
    )
    print(
        f"(the same replica again: --start-s {replica.start_s:.2f} "
        f"--service-ms {replica.service_s * 1000:.1f} --slots {replica.slots})"
    )


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


if __name__ == "__main__":
    main()
