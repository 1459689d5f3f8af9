"""The router actor: the fleet's control plane.

It keeps the registry of nodes (from Ray, with their region and zone labels) and replicas (from
their heartbeats), decides health with a failover threshold, aggregates performance reported by
replicas and by every router, and holds operator state: drained nodes, manual weights and
injected faults. Routers pull versioned snapshots of it in the background; no request waits on
this actor, and when it is gone routers keep routing on what they last saw.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any, cast

import ray

from app.batches.worker import kv_connector
from app.events.bus import EventType
from app.events.outbox import Outbox
from app.fleet.propagation import Propagation
from app.fleet.records import NodeRecord, ReplicaRecord
from app.fleet.spec import FleetSpec, node_locality
from app.regions.summary import summarize
from app.runtime import ON_HEAD_NODE

logger = logging.getLogger(__name__)

ROUTER_NAME = "fleet-router"
ROUTER_NAMESPACE = "app-fleet"


def propagation_live_s(spec: FleetSpec) -> float:
    """How long after its last pull a router is still waited for: ten pulls (5 s at the default
    `snapshot_interval_s` of 0.5 s), so that a router whose process has gone holds a drain's
    confirmation no longer than that. Routers pull from a thread of their own, which an event
    loop busy with requests does not hold up."""
    return max(5.0, 10 * spec.load_balancing.snapshot_interval_s)


class FleetRouterUnavailableError(RuntimeError):
    """No router actor runs in this cluster (deploy the fleet with `app up` first)."""


# The router's own events that the event bus carries, by bus type.
BUS_EVENTS = {
    "replica_healthy": EventType.REPLICA_HEALTHY,
    "replica_unhealthy": EventType.REPLICA_UNHEALTHY,
    "node_joined": EventType.NODE_JOINED,
    "node_left": EventType.NODE_LEFT,
}


class FleetRouter:
    """Named, detached actor (see `ensure_router`). All methods are cheap and non-blocking."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = FleetSpec.model_validate(spec)
        self.version = 0
        self.replicas: dict[str, ReplicaRecord] = {}
        self.nodes: dict[str, NodeRecord] = {}
        self.drained_nodes: set[str] = set()
        self.model_faults: dict[str, float] = {}  # model -> injected latency ms (chaos, benches)
        self.region_drained = False  # the whole region: its gateway forwards to peers instead
        self.federation: dict[str, Any] | None = None  # the gateway's peer view, as reported
        self.events: list[dict[str, Any]] = []
        # Node and replica events also go to the region's event bus (app.events), in batches.
        self.outbox = Outbox(kv_connector(self.spec.batches), "fleet-router")
        self._snapshot: dict[str, Any] = {}
        self.propagation = Propagation(live_s=propagation_live_s(self.spec))
        # This incarnation: Ray restarts the actor with version 0 again, and a router holding
        # version N of the old one must not take the new one's N for the same view.
        self.epoch = uuid.uuid4().hex
        self._loop_task: asyncio.Task[None] | None = None
        self._refresh_nodes()
        self._publish()

    def _ensure_loop(self) -> None:
        # Started from the first call, on the actor's event loop (not in __init__, which Ray
        # may run outside it).
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._health_loop())

    # ---- configuration -----------------------------------------------------------------------

    async def configure(self, spec: dict[str, Any]) -> int:
        self._ensure_loop()
        self.spec = FleetSpec.model_validate(spec)
        self.propagation.live_s = propagation_live_s(self.spec)
        return self._publish()

    async def get_spec(self) -> dict[str, Any]:
        self._ensure_loop()
        return self.spec.model_dump(mode="json")

    # ---- reports in --------------------------------------------------------------------------

    async def heartbeat(self, report: dict[str, Any]) -> dict[str, Any]:
        """A replica's periodic report; the answer carries operator directives for it."""
        self._ensure_loop()
        rid = report["replica_id"]
        record = self.replicas.get(rid)
        if record is None:
            record = ReplicaRecord(
                replica_id=rid,
                model=report["model"],
                node_id=report.get("node_id"),
                region=report.get("region") or self.spec.default_region,
                zone=report.get("zone"),
                capacity=int(report.get("capacity") or 1),
                actor_id=report.get("actor_id"),
            )
            self.replicas[rid] = record
            self._event("replica_registered", replica=rid, region=record.region)
            self._publish()
        record.last_heartbeat = time.monotonic()
        record.ongoing = int(report.get("ongoing") or 0)
        record.perf = dict(report.get("perf") or {})
        record.self_healthy = bool(report.get("healthy", True))
        return {
            "inject_latency_ms": record.inject_latency_ms
            or self.model_faults.get(record.model, 0.0),
            "drained": record.node_id in self.drained_nodes,
        }

    async def deregister(self, replica_id: str) -> None:
        self._ensure_loop()
        if self.replicas.pop(replica_id, None) is not None:
            self._event("replica_deregistered", replica=replica_id)
            self._publish()

    async def snapshot(
        self,
        since_version: int = -1,
        outcomes: dict[str, Any] | None = None,
        subscriber: str | None = None,
        epoch: str | None = None,
    ) -> Any:
        """The current snapshot, or None when the caller already has this version (of this
        incarnation: `epoch`, from the snapshot it holds). A router piggybacks what it observed
        since its last pull ({replica: [n, errors, latency_ms]}) and names itself, so that
        `propagated` knows it holds `since_version`."""
        self._ensure_loop()
        if epoch is not None and epoch != self.epoch:
            since_version = -1  # a view of an earlier incarnation: none of this one
        if subscriber is not None:
            self.propagation.ack(subscriber, since_version, time.monotonic())
        for rid, (count, errors, latency_ms) in (outcomes or {}).items():
            record = self.replicas.get(rid)
            if record is not None:
                record.add_routed(int(count), int(errors), latency_ms)
        return None if since_version == self.version else self._snapshot

    async def propagated(self, version: int, timeout_s: float = 10.0) -> dict[str, Any]:
        """Wait until every live router has applied `version` (as returned by an operator
        action such as `drain_node`), at most `timeout_s`. The answer names the routers still
        behind: empty when the action is in force everywhere."""
        self._ensure_loop()
        deadline = time.monotonic() + max(0.0, timeout_s)
        while True:
            now = time.monotonic()
            behind = self.propagation.behind(version, now)
            if not behind or now >= deadline:
                live = self.propagation.live(now)
                return {"version": version, "routers": len(live), "behind": behind}
            await asyncio.sleep(0.05)

    # ---- operator actions --------------------------------------------------------------------

    async def drain_node(self, node_id: str) -> int:
        self._ensure_loop()
        self._node(node_id)
        self.drained_nodes.add(node_id)
        self._event("node_drained", node=node_id)
        return self._publish()

    async def undrain_node(self, node_id: str) -> int:
        self._ensure_loop()
        self._node(node_id)
        self.drained_nodes.discard(node_id)
        self._event("node_undrained", node=node_id)
        return self._publish()

    async def set_weight(self, replica_id: str, weight: float) -> int:
        self._ensure_loop()
        if not 0 <= weight <= 1000:
            raise ValueError(f"weight must be between 0 and 1000, not {weight}")
        self._replica(replica_id).weight = float(weight)
        self._event("weight_set", replica=replica_id, weight=weight)
        return self._publish()

    async def inject_fault(self, replica_id: str, latency_ms: float) -> int:
        """Chaos testing: the replica adds this much latency to every request (0 clears it)."""
        self._ensure_loop()
        if not 0 <= latency_ms <= 600_000:
            raise ValueError(f"latency_ms must be between 0 and 600000, not {latency_ms}")
        self._replica(replica_id).inject_latency_ms = float(latency_ms)
        self._event("fault_injected", replica=replica_id, latency_ms=latency_ms)
        return self.version

    async def inject_model_fault(self, model: str, latency_ms: float) -> int:
        """Chaos testing and benchmarks: every replica of the model, present and future, adds
        this much latency to every request unless it has a fault of its own (0 clears it)."""
        self._ensure_loop()
        if not 0 <= latency_ms <= 600_000:
            raise ValueError(f"latency_ms must be between 0 and 600000, not {latency_ms}")
        if latency_ms:
            self.model_faults[model] = float(latency_ms)
        else:
            self.model_faults.pop(model, None)
        self._event("fault_injected", model=model, latency_ms=latency_ms)
        return self.version

    async def drain_region(self, drained: bool) -> bool:
        """Take this region out of (or back into) the federation's rotation: its gateway
        forwards to peers, and peers stop forwarding here."""
        self._ensure_loop()
        self.region_drained = bool(drained)
        self._event("region_drained" if drained else "region_undrained")
        return self.region_drained

    async def report_federation(self, view: dict[str, Any]) -> None:
        self.federation = view

    # ---- views out ---------------------------------------------------------------------------

    async def summary(self) -> dict[str, Any]:
        """This region's compact summary for its peers (app.regions.summary)."""
        self._ensure_loop()
        return summarize(
            self.spec.home_region, self._replica_rows(), drained=self.region_drained
        ).to_json()

    async def fleet(self) -> dict[str, Any]:
        """Nodes, replicas with health and performance, for GET /v1/fleet and `app fleet`."""
        self._ensure_loop()
        return {
            "version": self.version,
            "strategy": self.spec.load_balancing.strategy.value,
            "regions": {
                name: {"latitude": r.latitude, "longitude": r.longitude, "zones": list(r.zones)}
                for name, r in self.spec.local_regions().items()
            },
            "nodes": [
                {
                    "node_id": n.node_id,
                    "region": n.region,
                    "zone": n.zone,
                    "address": n.address,
                    "alive": n.alive,
                    "drained": n.drained,
                }
                for n in self.nodes.values()
            ],
            "replicas": self._replica_rows(),
            "placement": self._placement(),
            "events": self.events[-50:],
            "region_drained": self.region_drained,
            "federation": self.federation,
        }

    def _replica_rows(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        return [
            {
                "replica_id": r.replica_id,
                "model": r.model,
                "node_id": r.node_id,
                "region": r.region,
                "zone": r.zone,
                "capacity": r.capacity,
                "ongoing": r.ongoing,
                "healthy": r.healthy,
                "failed_checks": r.failed_checks,
                "drained": r.node_id in self.drained_nodes,
                "weight": r.weight,
                "inject_latency_ms": r.inject_latency_ms,
                "heartbeat_age_s": round(now - r.last_heartbeat, 3),
                "performance": r.performance(),
            }
            for r in sorted(self.replicas.values(), key=lambda r: (r.model, r.region))
        ]

    # ---- internals ---------------------------------------------------------------------------

    def _placement(self) -> dict[str, Any]:
        """Spec'd replica bounds per model and region (this cluster's regions) against what is
        running."""
        out: dict[str, Any] = {}
        for model in sorted(self.spec.placed_models()):
            wanted = {
                region: {"min": p.min_replicas, "max": p.max_replicas}
                for region, p in (self.spec.placement(model) or {}).items()
            }
            running: dict[str, int] = {}
            for r in self.replicas.values():
                if r.model == model:
                    running[r.region] = running.get(r.region, 0) + 1
            out[model] = {"spec": wanted, "running": running}
        return out

    def _node(self, node_id: str) -> NodeRecord:
        self._refresh_nodes()
        if node_id not in self.nodes:
            raise KeyError(f"unknown node {node_id!r}; known: {sorted(self.nodes)}")
        return self.nodes[node_id]

    def _replica(self, replica_id: str) -> ReplicaRecord:
        if replica_id not in self.replicas:
            raise KeyError(f"unknown replica {replica_id!r}")
        return self.replicas[replica_id]

    def _event(self, kind: str, **fields: Any) -> None:
        self.events.append({"t": time.time(), "event": kind, **fields})
        del self.events[:-200]
        if kind in BUS_EVENTS:
            self.outbox.add(BUS_EVENTS[kind], fields)

    def _refresh_nodes(self) -> None:
        before = {n.node_id for n in self.nodes.values() if n.alive} if self.nodes else None
        self._read_nodes()
        if before is None:  # the first reading: nothing joined or left yet
            return
        alive = {n.node_id for n in self.nodes.values() if n.alive}
        for node_id in sorted(alive - before):
            self._event("node_joined", node=node_id, region=self.nodes[node_id].region)
        for node_id in sorted(before - alive):
            region = self.nodes[node_id].region if node_id in self.nodes else None
            self._event("node_left", node=node_id, region=region)

    def _read_nodes(self) -> None:
        nodes: dict[str, NodeRecord] = {}
        for info in ray.nodes():
            region, zone = node_locality(info.get("Labels") or {})
            node_id = info["NodeID"]
            nodes[node_id] = NodeRecord(
                node_id=node_id,
                region=region or self.spec.default_region,
                zone=zone,
                address=info.get("NodeManagerAddress", ""),
                alive=bool(info.get("Alive")),
                drained=node_id in self.drained_nodes,
            )
        self.nodes = nodes

    async def _health_loop(self) -> None:
        while True:
            interval = self.spec.load_balancing.health_check_interval_s
            await asyncio.sleep(interval)
            try:
                self._run_checks(interval)
            except Exception:  # the loop must survive anything; the next round retries
                logger.exception("fleet health check failed")
            if len(self.outbox):
                await asyncio.to_thread(self.outbox.flush)

    def _run_checks(self, interval: float) -> None:
        self._refresh_nodes()
        now = time.monotonic()
        lb = self.spec.load_balancing
        for rid, r in list(self.replicas.items()):
            node = self.nodes.get(r.node_id or "")
            ok = r.check(node is None or node.alive, now, interval)
            changed = r.count_check(ok, lb.failover_threshold, lb.recovery_threshold)
            if changed == "replica_healthy":
                self._event("replica_healthy", replica=rid)
            elif changed == "replica_unhealthy":
                self._event("replica_unhealthy", replica=rid, region=r.region)
            # A replica silent for a long time is gone (Serve replaced it): forget it.
            if now - r.last_heartbeat > max(60.0, 20 * interval):
                del self.replicas[rid]
        # Health and performance figures move every round: publish a new version each time.
        self._publish()

    def _publish(self) -> int:
        self.version += 1
        self._snapshot = {
            "epoch": self.epoch,
            "version": self.version,
            "replicas": {
                rid: {
                    "healthy": r.healthy,
                    "drained": r.node_id in self.drained_nodes,
                    "weight": r.weight,
                    **{
                        k: v
                        for k, v in r.performance().items()
                        if k in ("latency_ms", "success_rate", "throughput")
                    },
                }
                for rid, r in self.replicas.items()
            },
            "drained_nodes": sorted(self.drained_nodes),
        }
        return self.version


def router_actor_class() -> Any:
    # ray.remote's type stubs do not know max_concurrency.
    return cast(Any, ray.remote)(
        num_cpus=0,
        resources=ON_HEAD_NODE,
        max_restarts=-1,
        max_task_retries=-1,
        max_concurrency=64,
    )(FleetRouter)


def ensure_router(spec: FleetSpec) -> Any:
    """The cluster's router actor, created if missing (detached, restarted by Ray if it dies)
    and given this spec."""
    actor = (
        router_actor_class()
        .options(
            name=spec.router_actor,
            namespace=ROUTER_NAMESPACE,
            get_if_exists=True,
            lifetime="detached",
        )
        .remote(spec.model_dump(mode="json"))
    )
    ray.get(actor.configure.remote(spec.model_dump(mode="json")))
    return actor


def router_handle(name: str = ROUTER_NAME) -> Any:
    try:
        return ray.get_actor(name, namespace=ROUTER_NAMESPACE)
    except ValueError as exc:
        raise FleetRouterUnavailableError(
            f"no fleet router actor {name!r} in namespace {ROUTER_NAMESPACE!r}; "
            "deploy with `app up` first"
        ) from exc


def stop_router(name: str = ROUTER_NAME) -> bool:
    """Kill the router actor if it runs (it is detached, so Serve's shutdown leaves it)."""
    try:
        actor = ray.get_actor(name, namespace=ROUTER_NAMESPACE)
    except ValueError:
        return False
    ray.kill(actor, no_restart=True)
    return True
