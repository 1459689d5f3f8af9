"""Fleet routing against Serve's default power-of-two router, side by side in one run.

  (a) routing decision cost per request, p50/p99, at 8 and 64 replicas (the routers' own
      choose_replicas on Serve's replica wrappers; no cluster needed);
  (b) end-to-end requests/s with the echo model over handles, same replicas and load;
  (c) a heterogeneous fleet, one of four replicas 5x slower (injected latency): p99 latency;
  (d) three regions with simulated inter-region round-trip times: mean latency seen by clients
      spread evenly over the regions, against region-blind routing.
(b)-(d) run on a real local cluster (ray.cluster_utils.Cluster: a head plus three nodes labelled
us-east-1, eu-west-1, ap-southeast-1).

    python benchmarks/fleet_bench.py [--duration 8] [--skip-cluster]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_SERVE_ENABLE_HA_PROXY", "1")  # before Serve is imported (driver_env)

REGIONS = ("us-east-1", "eu-west-1", "ap-southeast-1")
# Simulated one-way-and-back times between regions (ms), public cloud inter-region medians.
RTT_MS = {
    frozenset({"us-east-1"}): 2.0,
    frozenset({"eu-west-1"}): 2.0,
    frozenset({"ap-southeast-1"}): 2.0,
    frozenset({"us-east-1", "eu-west-1"}): 75.0,
    frozenset({"us-east-1", "ap-southeast-1"}): 215.0,
    frozenset({"eu-west-1", "ap-southeast-1"}): 160.0,
}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def summary(latencies_ms: list[float]) -> str:
    return f"p50 {pct(latencies_ms, 50):7.2f} ms  p99 {pct(latencies_ms, 99):7.2f} ms"


# ---- (a) decision cost ------------------------------------------------------------------------


def decision_cost(n_replicas: int, iterations: int = 4000) -> dict[str, dict[str, float]]:
    import ray
    from ray.serve._private.common import (
        DeploymentHandleSource,
        DeploymentID,
        ReplicaID,
        RequestMetadata,
        RunningReplicaInfo,
    )
    from ray.serve._private.request_router.pow_2_router import (
        PowerOfTwoChoicesRequestRouter,
    )
    from ray.serve.request_router import PendingRequest, RunningReplica

    from app.fleet.hints import route_kwarg
    from app.fleet.request_router import FleetRequestRouter
    from app.fleet.spec import FleetSpec, Region
    from app.fleet.view import FleetView

    class Replica(RunningReplica):
        def __init__(self, info: RunningReplicaInfo, n: int) -> None:
            self._replica_info = info
            self._multiplexed_model_ids = set()
            self._n = n

        @property
        def actor_id(self) -> Any:
            return ray.ActorID(self._n.to_bytes(16, "big"))

        async def get_queue_len(self, *, deadline_s: float) -> int:
            return self._n % 5

    dep = DeploymentID(name="model-echo", app_name="model-echo")
    replicas = [
        Replica(
            RunningReplicaInfo(
                replica_id=ReplicaID(unique_id=f"r{i}", deployment_id=dep),
                node_id=f"node-{i % 8}",
                node_ip="10.0.0.1",
                availability_zone=None,
                actor_name=f"r{i}",
                max_ongoing_requests=8,
                routing_stats={"latency_ms": 5.0 + i % 7, "throughput": 10.0, "success_rate": 1},
                replica_metadata={"region": REGIONS[i % 3], "zone": None},
            ),
            i + 1,
        )
        for i in range(n_replicas)
    ]
    spec = FleetSpec(
        regions={r: Region(latitude=10.0 * i, longitude=20.0 * i) for i, r in enumerate(REGIONS)},
        default_region="us-east-1",
    )
    fleet = FleetRequestRouter(deployment_id=dep, handle_source=DeploymentHandleSource.UNKNOWN)
    fleet.initialize_state(fleet=spec.model_dump(mode="json"), model="echo")
    # No router actor here: a fixed (empty) fleet view that never pulls.
    fleet._fleet = FleetView(spec.router_actor, interval_s=1.0, subscriber="bench", pulling=False)
    p2c = PowerOfTwoChoicesRequestRouter(
        deployment_id=dep, handle_source=DeploymentHandleSource.UNKNOWN
    )

    async def measure(router: Any) -> list[float]:
        request = PendingRequest(
            args=[],
            kwargs={"route": route_kwarg(region="eu-west-1")},
            metadata=RequestMetadata(request_id="x", internal_request_id="x"),
        )
        out = []
        for _ in range(iterations):
            start = time.perf_counter()
            await router.choose_replicas(replicas, request)
            out.append((time.perf_counter() - start) * 1e6)
        return out

    async def run_all() -> dict[str, dict[str, float]]:
        results = {}
        for name, router in (("power_of_two", p2c), ("fleet composite", fleet)):
            router.update_replicas(replicas)
            await asyncio.sleep(0.05)  # the routers probe every replica's queue length once
            us = (await measure(router))[iterations // 10 :]
            results[name] = {"p50_us": pct(us, 50), "p99_us": pct(us, 99)}
        return results

    return asyncio.run(run_all())


# ---- cluster phases ---------------------------------------------------------------------------


async def drive(
    call: Callable[[int], Awaitable[dict[str, Any]]], duration: float, concurrency: int
) -> tuple[list[float], list[dict[str, Any]]]:
    """`concurrency` loops calling call(i) for `duration` seconds; latencies (ms) and replies."""
    latencies: list[float] = []
    replies: list[dict[str, Any]] = []
    deadline = time.monotonic() + duration
    counter = iter(range(10**9))

    async def loop() -> None:
        while time.monotonic() < deadline:
            i = next(counter)
            start = time.perf_counter()
            reply = await call(i)
            latencies.append((time.perf_counter() - start) * 1000)
            replies.append(reply)

    await asyncio.gather(*(loop() for _ in range(concurrency)))
    return latencies, replies


def add_region_nodes(cluster: Any) -> None:
    from app.fleet.spec import REGION_LABEL, ZONE_LABEL

    for region in REGIONS:
        cluster.add_node(num_cpus=8, labels={REGION_LABEL: region, ZONE_LABEL: f"{region}a"})
    cluster.wait_for_nodes()


def start_cluster() -> Any:
    import ray
    from ray.cluster_utils import Cluster

    from app.runtime import cluster_env, haproxy_env
    from tests.integration.support import free_port

    env = cluster_env() | haproxy_env(tempfile.mkdtemp(), free_port(), free_port())
    saved = dict(os.environ)
    os.environ.update(env)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 16})
    os.environ.clear()
    os.environ.update(saved)
    ray.init(address=cluster.address, log_to_driver=False)
    return cluster


def deploy_pair(name: str, replicas: int, spec: Any, placed: bool) -> tuple[Any, Any]:
    """The same echo model twice: with the fleet router, and with Serve's default router."""
    from ray import serve

    from app.catalog.cards import ModelCard, load_catalogue
    from app.fleet.spec import ModelPlacement
    from app.serving.builder import model_application, replica_options
    from app.serving.deploy import wait_running
    from app.serving.model_server import model_server_deployment

    catalogue = load_catalogue(ROOT / "models")
    handles = []
    for variant in ("fleet", "p2c"):
        card = ModelCard(
            id=f"{name}-{variant}",
            task="text-generation",
            loader="echo",
            max_ongoing_requests=64,
            replicas={"min": replicas, "max": replicas},  # type: ignore[arg-type]
        )
        regions = {
            name: region.model_copy(
                update={"models": {card.id: ModelPlacement()}} if placed else {}
            )
            for name, region in spec.regions.items()
        }
        card_spec = spec.model_copy(update={"regions": regions})
        if variant == "fleet":
            app = model_application(card, catalogue.directory, fleet=card_spec)
        else:
            options = replica_options(card, 0.0, False, card_spec)
            del options["request_router_config"]
            app = model_server_deployment.options(**options).bind(
                card.model_dump(mode="json"),
                str(catalogue.directory),
                "cpu",
                card_spec.model_dump(mode="json"),
            )
        serve.run(app, name=card.deployment_name, route_prefix=None, blocking=False)
        handles.append(card.deployment_name)
    wait_running(handles, timeout_s=300)
    return tuple(serve.get_app_handle(h) for h in handles)  # type: ignore[return-value]


def model_of(handle: Any) -> str:
    return str(handle.deployment_name).removeprefix("model-")


def request(text: str = "the quick brown fox") -> dict[str, Any]:
    return {"model": "x", "messages": [{"role": "user", "content": text}]}


def replicas_of(router: Any, model: str) -> list[dict[str, Any]]:
    import ray

    return [r for r in ray.get(router.fleet.remote())["replicas"] if r["model"] == model]


def cluster_phases(duration: float, phases: str) -> dict[str, Any]:
    import ray
    from ray import serve

    from app.fleet.hints import route_kwarg
    from app.fleet.router_actor import ensure_router
    from app.fleet.spec import FleetSpec, LoadBalancing, Region
    from app.serving.deploy import start_serve
    from tests.integration.support import free_port

    cluster = start_cluster()
    start_serve("127.0.0.1", free_port())
    spec = FleetSpec(
        regions={
            "us-east-1": Region(latitude=38.9, longitude=-77.4),
            "eu-west-1": Region(latitude=53.3, longitude=-6.3),
            "ap-southeast-1": Region(latitude=1.35, longitude=103.8),
        },
        default_region="us-east-1",
        load_balancing=LoadBalancing(health_check_interval_s=0.5, snapshot_interval_s=0.25),
        router_actor="fleet-router-bench",
    )
    router = ensure_router(spec)
    out: dict[str, Any] = {}
    try:
        # (b) throughput, 3 replicas each, no injected latency; two interleaved rounds.
        fleet, p2c = deploy_pair("tput", 3, spec, placed=False) if "b" in phases else (0, 0)
        for _ in range(2 if "b" in phases else 0):
            for name, handle in (("power_of_two", p2c), ("fleet", fleet)):
                req = request()

                def call(i: int, h: Any = handle, r: dict[str, Any] = req) -> Any:
                    return h.chat.remote(r | {"model": model_of(h)}, route=None)

                asyncio.run(drive(call, 2, 16))  # warm-up
                lat, _ = asyncio.run(drive(call, duration, 16))
                entry = out.setdefault(f"b:{name}", {"rps": 0.0, "lat": []})
                entry["rps"] += len(lat) / duration / 2
                entry["lat"] += lat
        if "b" in phases:
            serve.delete("model-tput-fleet")
            serve.delete("model-tput-p2c")

        # (c) heterogeneous: 4 replicas, 10 ms each, one 50 ms.
        if "c" in phases:
            fleet, p2c = deploy_pair("hetero", 4, spec, placed=False)
            time.sleep(2)
            slow: set[str] = set()
            for model in ("hetero-fleet", "hetero-p2c"):
                replicas = replicas_of(router, model)
                for i, r in enumerate(replicas):
                    ray.get(router.inject_fault.remote(r["replica_id"], 50 if i == 0 else 10))
                slow.add(replicas[0]["replica_id"])
            time.sleep(2)
            for name, handle, route in (
                ("power_of_two", p2c, None),
                ("fleet composite", fleet, None),
                ("fleet performance", fleet, route_kwarg(strategy="performance")),
            ):

                def call(i: int, h: Any = handle, rt: Any = route) -> Any:
                    return h.chat.remote(request() | {"model": model_of(h)}, route=rt)

                asyncio.run(drive(call, 3, 8))  # warm-up: let the routers learn
                lat, replies = asyncio.run(drive(call, duration, 8))
                to_slow = sum(r["system_fingerprint"].split("/")[-1] in slow for r in replies)
                out[f"c:{name}"] = {"lat": lat, "slow_share": to_slow / len(replies)}
            serve.delete("model-hetero-fleet")
            serve.delete("model-hetero-p2c")

        # (d) three regions, one replica each, clients spread evenly over the regions. Four in
        # flight: enough to load every replica, not so many that this 2-core machine's own
        # queueing hides the network time being measured.
        if "d" in phases:
            add_region_nodes(cluster)
            fleet, p2c = deploy_pair("geo", 3, spec, placed=True)
        for name, handle, geo in (
            (("region-blind", p2c, False), ("fleet geo", fleet, True)) if "d" in phases else ()
        ):

            def call(i: int, h: Any = handle, g: bool = geo) -> Any:
                client = REGIONS[i % 3]
                rt = route_kwarg(region=client) if g else None
                return h.chat.remote(request(client) | {"model": model_of(h)}, route=rt)

            asyncio.run(drive(call, 2, 4))
            lat, replies = asyncio.run(drive(call, duration, 4))
            seen = []
            for ms, reply in zip(lat, replies, strict=True):
                client = reply["choices"][0]["message"]["content"]
                served = reply["system_fingerprint"].split("/")[0]
                seen.append(ms + RTT_MS[frozenset({client, served})])
            local = sum(
                1
                for reply in replies
                if reply["system_fingerprint"].split("/")[0]
                == reply["choices"][0]["message"]["content"]
            )
            out[f"d:{name}"] = {"lat": seen, "local": local / len(replies)}
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--skip-cluster", action="store_true")
    parser.add_argument("--phases", default="bcd", help="cluster phases to run (b, c, d)")
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")

    print("\n(a) routing decision cost per request (choose_replicas, same replicas)")
    for n in (8, 64):
        res = decision_cost(n)
        base = res["power_of_two"]
        for name, r in res.items():
            print(
                f"  {n:>3} replicas  {name:<16} p50 {r['p50_us']:7.1f} us  p99 {r['p99_us']:7.1f}"
                f" us   (x{r['p50_us'] / base['p50_us']:.2f} p50 of power_of_two)"
            )
    if args.skip_cluster:
        return
    res = cluster_phases(args.duration, args.phases)

    if "b" in args.phases:
        print("\n(b) end-to-end echo chat over handles, 16 in flight, 3 replicas, 2 rounds each")
        base = res["b:power_of_two"]["rps"]
        for name in ("power_of_two", "fleet"):
            r = res[f"b:{name}"]
            print(
                f"  {name:<18} {r['rps']:8.0f} req/s  {summary(r['lat'])}  "
                f"(x{r['rps'] / base:.3f} of power_of_two)"
            )
    if "c" in args.phases:
        print("\n(c) heterogeneous fleet: 4 replicas, 10 ms each, one 50 ms; 8 in flight")
        base_p99 = pct(res["c:power_of_two"]["lat"], 99)
        for name in ("power_of_two", "fleet composite", "fleet performance"):
            lat = res[f"c:{name}"]["lat"]
            print(
                f"  {name:<18} {summary(lat)}  mean {statistics.mean(lat):6.2f} ms  "
                f"to the slow one {res[f'c:{name}']['slow_share']:6.1%}  "
                f"(p99 x{pct(lat, 99) / base_p99:.2f} of power_of_two)"
            )
    if "d" not in args.phases:
        return
    print("\n(d) three regions, clients spread evenly, 4 in flight, simulated RTT added")
    base_mean = statistics.mean(res["d:region-blind"]["lat"])
    for name in ("region-blind", "fleet geo"):
        r = res[f"d:{name}"]
        mean = statistics.mean(r["lat"])
        print(
            f"  {name:<18} mean {mean:7.2f} ms  {summary(r['lat'])}  served in-region "
            f"{r['local']:.0%}  (mean {base_mean / mean:.1f}x lower than region-blind)"
        )


if __name__ == "__main__":
    main()
