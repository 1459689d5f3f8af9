"""Fleet routing on a real multi-node cluster: three nodes labelled with three regions, one
replica of an echo model in each, placed by label, routed by app.fleet's RequestRouter.

Which replica answered is read from the response's system_fingerprint (region/zone/replica).
The last tests bound failures: the gateway's per-replica circuit breaker under its time limit,
and a request that kills its replicas, retried once and no more.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import ray

from app.api.schemas import ChatCompletionRequest
from app.catalog.cards import ModelCard
from app.cli import build_parser
from app.client import InferenceClient
from app.fleet.failover import call_with_failover_sync
from app.fleet.hints import route_kwarg
from app.fleet.router_actor import ROUTER_NAMESPACE, ensure_router
from app.fleet.spec import REGION_LABEL, ZONE_LABEL, FleetSpec, LoadBalancing, Region
from tests.integration.support import deploy_with_gateway, wait_until

MODEL = "geo-echo"
REGIONS = {
    name: Region(
        latitude=lat,
        longitude=lon,
        zones=(f"{name}a",),
        models={MODEL: 1},  # type: ignore[dict-item]
    )
    for name, lat, lon in (
        ("us-east-1", 38.9, -77.4),
        ("eu-west-1", 53.3, -6.3),
        ("ap-southeast-1", 1.35, 103.8),
    )
}
SPEC = FleetSpec(
    regions=REGIONS,
    default_region="us-east-1",
    load_balancing=LoadBalancing(
        health_check_interval_s=0.5,
        failover_threshold=2,
        snapshot_interval_s=0.2,
        max_attempts=4,
        backoff_s=0.05,
    ),
    geoip={"cidr": {"10.30.0.0/16": "ap-southeast-1"}},  # type: ignore[arg-type]
    router_actor="fleet-router-tests",
)
CARD = ModelCard(
    id=MODEL,
    task="text-generation",
    loader="echo",
    max_ongoing_requests=2,
    replicas={"min": 1, "max": 1},  # type: ignore[arg-type]
    # Far above an echo request; below the 5 s fault the breaker test injects. A replica's
    # own limit starts after its injected latency, so only the gateway's covers the fault.
    timeouts={"request_s": 2.0},
)


@dataclass
class Fleet:
    base: str  # the fleet gateway's OpenAI base URL
    nodes: dict[str, Any]  # region -> Ray node
    router: Any

    def view(self) -> dict[str, Any]:
        return ray.get(self.router.fleet.remote())

    def replica_in(self, region: str) -> dict[str, Any]:
        return next(r for r in self.view()["replicas"] if r["region"] == region)


def region_of(reply: dict[str, Any]) -> str:
    return str(reply["system_fingerprint"]).split("/")[0]


def set_drained(fleet: Fleet, nodes: list[str], drained: bool) -> int:
    """Drain (or undrain) the nodes and return once every router routes on it (the number of
    routers): what `app fleet drain` waits for."""
    method = fleet.router.drain_node if drained else fleet.router.undrain_node
    version = max(ray.get([method.remote(node) for node in nodes]))
    result = ray.get(fleet.router.propagated.remote(version, 30))
    assert not result["behind"], result
    return int(result["routers"])


def chat(client: InferenceClient, text: str = "hi") -> dict[str, Any]:
    return client.chat(
        ChatCompletionRequest(model=MODEL, messages=[{"role": "user", "content": text}])
    )


@pytest.fixture(scope="module")
def fleet(ray_cluster: Any, serving: str) -> Iterator[Fleet]:
    from ray import serve

    nodes = {
        region: ray_cluster.add_node(
            num_cpus=2,
            labels={REGION_LABEL: region, ZONE_LABEL: spec.zones[0]},
        )
        for region, spec in REGIONS.items()
    }
    ray_cluster.wait_for_nodes()
    router = ensure_router(SPEC)
    deploy_with_gateway(CARD, SPEC, "fleet-gateway", "/fleet")
    result = Fleet(base=f"{serving}/fleet/v1", nodes=nodes, router=router)
    wait_until(
        lambda: (
            len([r for r in result.view()["replicas"] if r["model"] == MODEL and r["healthy"]]) == 3
        ),
        timeout=30,
        what="three healthy replicas registered with the router actor",
    )
    try:
        yield result
    finally:
        serve.delete("fleet-gateway")
        serve.delete(CARD.deployment_name)
        for node in result.nodes.values():
            if node in ray_cluster.list_all_nodes():
                ray_cluster.remove_node(node)
        ray.kill(ray.get_actor(SPEC.router_actor, namespace=ROUTER_NAMESPACE))


def test_replicas_are_placed_one_per_region_by_label(fleet: Fleet) -> None:
    view = fleet.view()
    regions = sorted(r["region"] for r in view["replicas"] if r["model"] == MODEL)
    assert regions == sorted(REGIONS)
    assert view["placement"][MODEL]["running"] == {region: 1 for region in REGIONS}
    assert view["placement"][MODEL]["spec"] == {r: {"min": 1, "max": 1} for r in REGIONS}
    node_regions = {n["node_id"]: n["region"] for n in view["nodes"]}
    for replica in view["replicas"]:
        if replica["model"] == MODEL:
            assert node_regions[replica["node_id"]] == replica["region"]


@pytest.mark.parametrize("region", sorted(REGIONS))
def test_handle_client_lands_in_its_own_region(fleet: Fleet, region: str) -> None:
    client = InferenceClient(region=region, fleet=SPEC)
    served = [region_of(chat(client)) for _ in range(10)]
    view = fleet.view()
    # Geo routing sends every request home; the home replica may still turn one away when
    # its two slots look full for an instant on a loaded machine (Serve then tries the next
    # rank, the nearest region: seen once in ~10 CI runs, with no health event). Routing that
    # ignored the region would land about a third at home.
    assert served.count(region) >= 8, (served, view["replicas"], view["events"])


def test_http_client_region_header_and_geoip(fleet: Fleet) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    url = f"{fleet.base}/chat/completions"
    eu = httpx.post(url, json=body, headers={"X-Client-Region": "eu-west-1"}, timeout=30)
    assert eu.status_code == 200, eu.text
    assert region_of(eu.json()) == "eu-west-1"
    ap = httpx.post(url, json=body, headers={"X-Forwarded-For": "10.30.1.2"}, timeout=30)
    assert region_of(ap.json()) == "ap-southeast-1"
    bad = httpx.post(url, json=body, headers={"X-Route-Strategy": "fastest"}, timeout=30)
    assert bad.status_code == 400
    assert "least_loaded" in bad.json()["error"]["message"]


def test_model_url_is_routed_by_the_fleet_router_through_haproxy(fleet: Fleet) -> None:
    """HAProxy asks the model's ingress router (POST /internal/route, on HAProxy's own node)
    for every POST to the model's own URL. Here every node's HAProxy shares one port on one
    machine, so the ingress region varies; draining two regions must still send every request
    to the third, which HAProxy's own balancing would not do."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    url = fleet.base.replace("/fleet/v1", f"/models/{MODEL}/v1/chat/completions")
    drained = [fleet.replica_in(region)["node_id"] for region in ("us-east-1", "eu-west-1")]
    routers = set_drained(fleet, drained, True)
    try:
        served = Counter(
            region_of(httpx.post(url, json=body, timeout=30).json()) for _ in range(20)
        )
    finally:
        set_drained(fleet, drained, False)
    # Without the router HAProxy would spread them over all three regions (~7 each).
    assert served == {"ap-southeast-1": 20}, (served, routers)


def test_fleet_cli_drains_once_every_router_has_it_and_refuses_an_unknown_node(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = build_parser()

    def app_fleet(*argv: str) -> int:
        args = parser.parse_args(["fleet", "--router", SPEC.router_actor, *argv])
        return int(args.func(args))

    node = fleet.replica_in("eu-west-1")["node_id"]
    try:
        assert app_fleet("drain", node, "--wait", "30") == 0
        assert fleet.replica_in("eu-west-1")["drained"]
    finally:
        assert app_fleet("undrain", node, "--wait", "30") == 0
    out = capsys.readouterr().out
    assert f"drained node {node}: in force on all" in out
    assert f"undrained node {node}: in force on all" in out
    assert app_fleet("drain", "no-such-node") == 2
    assert "unknown node 'no-such-node'" in capsys.readouterr().err


def test_fleet_endpoint_shows_nodes_replicas_health_and_scores(fleet: Fleet) -> None:
    view = httpx.get(f"{fleet.base}/fleet", timeout=30).json()
    assert {n["region"] for n in view["nodes"]} >= set(REGIONS)
    mine = [r for r in view["replicas"] if r["model"] == MODEL]
    assert len(mine) == 3 and all(r["healthy"] for r in mine)
    assert all("success_rate" in r["performance"] for r in mine)


def test_saturated_region_spills_to_the_nearest_other_region(fleet: Fleet) -> None:
    eu = fleet.replica_in("eu-west-1")
    ray.get(fleet.router.inject_fault.remote(eu["replica_id"], 3000))
    time.sleep(1.5)  # the replica picks the fault up with its next heartbeat
    client = InferenceClient(region="eu-west-1", fleet=SPEC)

    async def scenario() -> tuple[list[str], str]:
        # Two slow requests fill the EU replica (max_ongoing_requests=2)...
        held = [asyncio.ensure_future(client.achat(_req("slow"))) for _ in range(2)]
        await asyncio.sleep(0.5)
        # ...so the next EU request goes to the nearest other region: us-east-1, not ap.
        spilled = region_of(await client.achat(_req("next")))
        return [region_of(r) for r in await asyncio.gather(*held)], spilled

    try:
        held, spilled = asyncio.run(scenario())
    finally:
        ray.get(fleet.router.inject_fault.remote(eu["replica_id"], 0))
    assert held == ["eu-west-1", "eu-west-1"]
    assert spilled == "us-east-1"


def test_drained_node_gets_no_requests(fleet: Fleet) -> None:
    """EU clients' requests leave the drained EU node. Where they go is the next tier's
    choice: the nearest region, us-east-1, unless its replica is (for the moment) unhealthy
    or full, which a loaded CI machine can make it. Nearest-first is asserted strictly by the
    spill-over test above; here, that the drained node serves nothing."""
    eu = fleet.replica_in("eu-west-1")
    set_drained(fleet, [eu["node_id"]], True)
    try:
        client = InferenceClient(region="eu-west-1", fleet=SPEC)
        served = [region_of(chat(client)) for _ in range(10)]
        assert "eu-west-1" not in served, (served, fleet.view()["replicas"])
        assert served.count("us-east-1") >= 1, (served, fleet.view()["replicas"])
    finally:
        set_drained(fleet, [eu["node_id"]], False)
    assert region_of(chat(InferenceClient(region="eu-west-1", fleet=SPEC))) == "eu-west-1"


def test_slow_replica_gets_a_shrinking_share_under_the_performance_strategy(
    fleet: Fleet,
) -> None:
    client = InferenceClient(strategy="performance", fleet=SPEC)

    def run(seconds: float) -> list[tuple[float, str]]:
        started, served = time.monotonic(), []
        while time.monotonic() - started < seconds:
            served.append((time.monotonic() - started, region_of(chat(client))))
        return served

    # Slow down the replica this strategy currently favours (the largest share, so at least a
    # third: earlier tests leave the replicas with different histories).
    baseline = Counter(region for _, region in run(2))
    favourite, count = baseline.most_common(1)[0]
    replica = fleet.replica_in(favourite)
    ray.get(fleet.router.inject_fault.remote(replica["replica_id"], 150))
    try:
        time.sleep(1.5)  # the replica picks the fault up with its next heartbeat
        served = run(6)
    finally:
        ray.get(fleet.router.inject_fault.remote(replica["replica_id"], 0))
    before = count / sum(baseline.values())
    late = [region for t, region in served if t >= 4]
    after = late.count(favourite) / max(1, len(late))
    assert before >= 1 / 3 and after < 0.05, (before, after, baseline)


def test_a_replica_that_keeps_timing_out_is_skipped_by_the_gateway(fleet: Fleet) -> None:
    """The gateway cuts off each request to a stalled replica at the card's timeouts.request_s
    with a 504; after five in a row (the breaker's threshold) that replica's circuit opens and
    the gateway sends the region's clients to the next-nearest region until the cool-off."""
    ap = fleet.replica_in("ap-southeast-1")
    ray.get(fleet.router.inject_fault.remote(ap["replica_id"], 5000))
    time.sleep(1.5)  # the replica picks the fault up with its next heartbeat
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    headers = {"X-Client-Region": "ap-southeast-1"}
    timeouts, served = 0, []
    try:
        for _ in range(12):
            started = time.monotonic()
            reply = httpx.post(
                f"{fleet.base}/chat/completions", json=body, headers=headers, timeout=30
            )
            if reply.status_code == 504:
                assert reply.json()["error"]["type"] == "timeout", reply.text
                assert time.monotonic() - started < 4.5  # the 2 s limit, not the 5 s fault
                timeouts += 1
            else:
                assert reply.status_code == 200, reply.text
                served.append(region_of(reply.json()))
                if len(served) == 3:
                    break
    finally:
        ray.get(fleet.router.inject_fault.remote(ap["replica_id"], 0))
    assert 1 <= timeouts <= 5, (timeouts, served)
    assert len(served) == 3 and "ap-southeast-1" not in served, (timeouts, served)


def test_node_removal_under_load_loses_no_idempotent_request(
    fleet: Fleet, ray_cluster: Any
) -> None:
    client = InferenceClient(region="eu-west-1", fleet=SPEC)
    stop = threading.Event()
    results: Counter[str] = Counter()
    errors: list[BaseException] = []

    def worker() -> None:
        while not stop.is_set():
            try:
                results[region_of(chat(client, "idempotent"))] += 1
            except BaseException as exc:  # every failure is a test failure
                errors.append(exc)

    with ThreadPoolExecutor(4) as pool:
        for _ in range(4):
            pool.submit(worker)
        wait_until(lambda: results["eu-west-1"] > 20, timeout=30, what="EU traffic")
        ray_cluster.remove_node(fleet.nodes["eu-west-1"])
        before = sum(results.values())
        wait_until(lambda: sum(results.values()) > before + 100, timeout=60, what="failover")
        stop.set()
    assert errors == [], errors[:3]
    assert results["us-east-1"] > 0  # the EU client failed over to the nearest region
    wait_until(
        lambda: (
            not fleet.replica_in("eu-west-1")["healthy"]
            if any(r["region"] == "eu-west-1" for r in fleet.view()["replicas"])
            else True
        ),
        timeout=30,
        what="the EU replica marked unhealthy or forgotten",
    )


def _req(text: str) -> ChatCompletionRequest:
    return ChatCompletionRequest(model=MODEL, messages=[{"role": "user", "content": text}])


def test_a_request_that_kills_its_replica_is_retried_once_and_no_more(serving: str) -> None:
    """A poison request: every replica it reaches dies. With ten attempts allowed and three
    replicas, failover still stops after the second death, so one replica is left standing
    and other requests are served."""
    from ray import serve

    @ray.remote(num_cpus=0)
    class Deaths:
        def __init__(self) -> None:
            self.count = 0

        def add(self) -> None:
            self.count += 1

        def total(self) -> int:
            return self.count

    @serve.deployment(num_replicas=3, ray_actor_options={"num_cpus": 0})
    class Fragile:
        def __init__(self, deaths: Any) -> None:
            self.deaths = deaths

        async def chat(self, text: str, route: dict[str, Any] | None = None) -> str:
            if text == "poison":
                await self.deaths.add.remote()
                os._exit(1)
            return "ok"

    deaths = Deaths.remote()  # type: ignore[attr-defined]
    handle = serve.run(Fragile.bind(deaths), name="fragile", route_prefix=None)  # type: ignore[attr-defined]
    balancing = LoadBalancing(max_attempts=10, backoff_s=0.05)
    try:
        with pytest.raises(ray.exceptions.RayActorError):
            call_with_failover_sync(
                lambda route: handle.chat.remote("poison", route=route), route_kwarg(), balancing
            )
        assert ray.get(deaths.total.remote()) == 2
        ok = call_with_failover_sync(
            lambda route: handle.chat.remote("fine", route=route), route_kwarg(), balancing
        )
        assert ok == "ok"
    finally:
        serve.delete("fragile")
        ray.kill(deaths)
