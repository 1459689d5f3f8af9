"""Autoscaling on real Ray Serve, short: one 10x burst replayed through (a) Serve 2.60's default
policy and (b) ours (app.autoscaling, reactive), one after the other on the same local cluster.

The replica is the echo model with a fixed injected latency (the router actor's model fault),
so a replica's capacity is its slots over that latency and does not depend on this machine's
two cores; replicas start in about a second, which flatters (a)'s 30 s upscale delay less than
a GPU model's minute-long start would. Load is open-loop Poisson through a Serve handle.

Reported per policy: SLO-violation seconds (seconds whose arrivals have a p95 over 2x the
unloaded latency), replica-seconds (RUNNING replicas sampled each second), scaling actions
(changes of the RUNNING count), errors, p50/p99; and the ratios (b)/(a).

    python benchmarks/autoscale_real.py [--latency-ms 200] [--base-rps 5] [--burst-rps 40]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import ray
from ray import serve
from ray.serve._private.common import ReplicaState

from app.catalog.cards import ModelCard, load_catalogue
from app.fleet.router_actor import ensure_router, stop_router
from app.fleet.spec import FleetSpec, Region
from app.runtime import cluster_env
from app.serving.builder import replica_options
from app.serving.deploy import start_serve, wait_running

SLOTS = 2
MAX_REPLICAS = 10


@dataclass
class Run:
    policy: str
    latencies: dict[int, list[float]] = field(default_factory=dict)  # arrival second -> s
    errors: int = 0
    running: list[int] = field(default_factory=list)  # RUNNING replicas, each second

    def summary(self, slo_s: float) -> dict[str, Any]:
        every = sorted(x for xs in self.latencies.values() for x in xs)
        violations = sum(
            1 for xs in self.latencies.values() if sorted(xs)[int(0.95 * (len(xs) - 1))] > slo_s
        )
        actions = sum(1 for a, b in zip(self.running, self.running[1:], strict=False) if a != b)
        return {
            "policy": self.policy,
            "requests": len(every),
            "errors": self.errors,
            "slo_violation_s": violations,
            "replica_s": sum(self.running),
            "scaling_actions": actions,
            "peak_replicas": max(self.running, default=0),
            "p50_ms": round(1000 * every[len(every) // 2], 1) if every else None,
            "p99_ms": round(1000 * every[int(0.99 * (len(every) - 1))], 1) if every else None,
        }


def card(name: str) -> ModelCard:
    return ModelCard(
        id=name,
        task="text-generation",
        loader="echo",
        max_ongoing_requests=SLOTS,
        resources={"num_cpus": 0.1},
    )


def deploy(name: str, ours: bool, fleet: FleetSpec) -> Any:
    """The same deployment either way; only its autoscaling_config differs: ours as the builder
    emits it, or Serve's default policy with its default delays at the same target."""
    from app.serving.model_server import model_server_deployment

    model = card(name)
    options = replica_options(model, 0.0, False, fleet)
    if not ours:
        options["autoscaling_config"] = {
            "min_replicas": 1,
            "max_replicas": MAX_REPLICAS,
            "target_ongoing_requests": 0.7 * SLOTS,
        }
    app = model_server_deployment.options(**options).bind(
        model.model_dump(mode="json"),
        str(load_catalogue("models").directory),
        "cpu",
        fleet.model_dump(mode="json"),
    )
    serve.run(app, name=f"model-{name}", route_prefix=f"/models/{name}", blocking=False)
    wait_running([f"model-{name}"], timeout_s=180)
    return serve.get_deployment_handle(model.deployment_name, f"model-{name}")


def running(name: str) -> int:
    app = serve.status().applications[f"model-{name}"]
    deployment = next(iter(app.deployments.values()))
    return int(deployment.replica_states.get(ReplicaState.RUNNING, 0))


async def replay(handle: Any, name: str, phases: list[tuple[float, float]], run: Run) -> None:
    rng = random.Random(7)
    body = {"model": name, "messages": [{"role": "user", "content": "load"}]}
    start = time.monotonic()
    tasks: list[asyncio.Task[None]] = []

    async def one(second: int) -> None:
        sent = time.monotonic()
        try:
            await handle.chat.remote(body)
        except Exception:
            run.errors += 1
            return
        run.latencies.setdefault(second, []).append(time.monotonic() - sent)

    async def sample() -> None:
        while True:
            run.running.append(await asyncio.to_thread(running, name))
            await asyncio.sleep(1.0)

    sampler = asyncio.create_task(sample())
    at = 0.0
    for duration, rate in phases:
        end = at + duration
        while True:
            at += rng.expovariate(rate)
            if at >= end:
                at = end
                break
            delay = start + at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(int(at))))
    await asyncio.gather(*tasks)
    sampler.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--latency-ms", type=float, default=200)
    parser.add_argument("--base-rps", type=float, default=5)
    parser.add_argument("--burst-rps", type=float, default=40)
    parser.add_argument("--phases-s", default="30,60,60", help="before, burst, after")
    args = parser.parse_args()
    before, burst, after = (float(x) for x in args.phases_s.split(","))
    phases = [(before, args.base_rps), (burst, args.burst_rps), (after, args.base_rps)]
    ray.init(num_cpus=8, runtime_env={"env_vars": cluster_env()}, log_to_driver=False)
    start_serve("127.0.0.1", 18123)
    names = {"serve_default": "bench-default", "ours": "bench-ours"}
    fleet = FleetSpec(
        regions={
            "local": Region(
                latitude=0.0,
                longitude=0.0,
                models={
                    n: {"min_replicas": 1, "max_replicas": MAX_REPLICAS} for n in names.values()
                },
            )
        },
        default_region="local",
        router_actor="autoscale-real-bench",
    ).for_region("local")
    router = ensure_router(fleet)
    results = []
    try:
        for policy, name in names.items():
            ray.get(router.inject_model_fault.remote(name, args.latency_ms))
            handle = deploy(name, policy == "ours", fleet)
            time.sleep(3)  # the replica picks the fault up with its next heartbeat
            run = Run(policy)
            asyncio.run(replay(handle, name, phases, run))
            results.append(run.summary(slo_s=2 * args.latency_ms / 1000))
            serve.delete(f"model-{name}")
    finally:
        stop_router(fleet.router_actor)
        serve.shutdown()
        ray.shutdown()
    a, b = results
    print(json.dumps(results, indent=2))
    for key in ("slo_violation_s", "replica_s", "scaling_actions", "p99_ms"):
        ratio = b[key] / a[key] if a[key] else float("nan")
        print(f"ours / serve default, {key}: {b[key]} / {a[key]} = {ratio:.2f}")
    p50 = [r["p50_ms"] for r in results]
    print(f"p50 ms: serve default {p50[0]}, ours {p50[1]} (median {statistics.median(p50)})")


if __name__ == "__main__":
    main()
