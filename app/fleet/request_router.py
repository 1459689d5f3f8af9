"""The Serve RequestRouter every model deployment uses: it adapts Serve's replicas into
`ReplicaView`s (labels from replica metadata, queue lengths from Serve's cache, performance from
routing stats and the router actor's snapshot) and ranks them with app.fleet.scoring.

Per-request inputs travel as the `route` keyword of the handle call (see app.fleet.hints): the
client's region and zone, a strategy override and replicas to avoid. A request without them is
routed as if its client were on this process's node, so a Ray job calling a handle gets replicas
near itself.
"""

from __future__ import annotations

import time
from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from app.autoscaling.report import ReplicaMetric
from app.fleet.geo import region_distances
from app.fleet.hints import ROUTE_KWARG, hints_from
from app.fleet.metrics import RoutingMetrics
from app.fleet.scoring import Decision, ReplicaView, RouteHints, RoutingPolicy
from app.fleet.spec import FleetSpec, own_locality
from app.fleet.view import fleet_view
from app.observability.tracing import extract, span

# How long a new router's first decisions wait for this process's first fleet view
# (app.fleet.view). Without it a router is blind to drains, weights and health; the first pull
# (an actor lookup, then the first call to the router actor) took 1.2 s on an idle 2-core
# machine. Below HAProxy's 5 s limit on its call to an ingress router, whose first answer
# includes this wait. A router actor that is gone fails the pull at once and costs no wait.
FIRST_PULL_WAIT_S = 3.0


class FleetRequestRouter(RequestRouter):
    """Geo-, load- and performance-aware ranking of one deployment's replicas."""

    # Serve skips a replica whose queue-length probe misses this deadline (default 0.1 s). A
    # fleet spans regions: a probe across an ocean alone takes longer than that, and skipping
    # the client's own region because its replica answered in 120 ms defeats geo routing.
    queue_len_response_deadline_s = 0.5
    max_queue_len_response_deadline_s = 2.0

    def initialize_state(  # type: ignore[override]
        self, fleet: dict[str, Any], model: str
    ) -> None:
        spec = FleetSpec.model_validate(fleet)
        self._spec = spec
        self._model = model
        distances = region_distances(spec)
        self._policy = RoutingPolicy(spec.load_balancing, lambda a, b: distances[(a, b)])
        # This process's fleet view, shared by its routers and pulled by one thread.
        self._fleet = fleet_view(spec)
        self._started: dict[str, float] = {}
        # ReplicaID -> (view, snapshot, routing stats) it was last refreshed from; the snapshot
        # by identity, since the view replaces it whole (a version alone repeats after the
        # router actor restarts)
        self._views: dict[Any, tuple[ReplicaView, dict[str, Any], dict[str, Any]]] = {}
        self._metrics = RoutingMetrics(model)
        region, zone = own_locality()
        self._home = RouteHints(region=region or spec.default_region, zone=zone)

    # ---- the decision ------------------------------------------------------------------------

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        self._fleet.ensure_running()
        if self._fleet.snapshot["version"] < 0:
            # Only a process's very first decisions wait, briefly, for the fleet view, so that
            # a new router does not send requests to drained or unhealthy replicas.
            await self._fleet.wait_first_pull(FIRST_PULL_WAIT_S)
        hints = self._hints(pending_request)
        carried = pending_request.kwargs.get(ROUTE_KWARG) if pending_request else None
        with span("router.choose", parent=extract(carried), model=self._model) as chosen:
            decision = self.decide(candidate_replicas, hints)
            chosen.set_attribute("router.strategy", decision.strategy.value)
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        ranked = [by_id[v.replica_id] for v in decision.ranked]
        if pending_request is not None:
            if len(self._started) > 10_000:  # requests cancelled before they were sent
                cutoff = time.monotonic() - 600
                self._started = {k: t for k, t in self._started.items() if t > cutoff}
            self._started[pending_request.metadata.internal_request_id] = time.monotonic()
        if not ranked:
            # Nothing eligible (all drained, weighted out or already tried): serving from any
            # replica beats failing; Serve raises on its own when there is none at all.
            return [list(candidate_replicas)] if candidate_replicas else []
        self._metrics.decision(decision, retry=bool(hints.exclude))
        # One replica per rank: Serve tries them in order, skipping any whose queue is full.
        return [[r] for r in ranked]

    def decide(self, replicas: list[RunningReplica], hints: RouteHints) -> Decision:
        return self._policy.rank([self._view(r) for r in replicas], hints)

    def _hints(self, pending_request: PendingRequest | None) -> RouteHints:
        given = hints_from(pending_request.kwargs.get(ROUTE_KWARG) if pending_request else None)
        if given.region is None:
            return RouteHints(
                region=self._home.region,
                zone=self._home.zone,
                strategy=given.strategy,
                exclude=given.exclude,
            )
        return given

    def _view(self, r: RunningReplica) -> ReplicaView:
        """The replica's view, kept between requests: its fixed facts are read once (Serve's
        replica_metadata property copies a dict on every access), fleet and stats fields again
        when a new snapshot or new routing stats arrive, the queue length every time."""
        cached = self._views.get(r.replica_id)
        stats = r.routing_stats
        snapshot = self._fleet.snapshot
        if cached is None:
            meta = r.replica_metadata or {}
            view = ReplicaView(
                replica_id=r.replica_id.unique_id,
                region=meta.get("region") or self._spec.default_region,
                zone=meta.get("zone") or r.availability_zone,
                node_id=meta.get("node_id") or r.node_id,
                capacity=r.max_ongoing_requests,
                actor_id=r.actor_id.hex(),
            )
        else:
            view, seen_snapshot, seen_stats = cached
            if seen_snapshot is snapshot and seen_stats is stats:
                view.ongoing = self.replica_queue_len_cache.get(r.replica_id)
                return view
        fleet = snapshot["replicas"].get(view.replica_id) or {}
        view.capacity = r.max_ongoing_requests
        view.healthy = fleet.get("healthy", True)
        view.drained = fleet.get("drained", False) or view.node_id in snapshot["drained_set"]
        view.weight = fleet.get("weight", 1.0)
        view.latency_ms = fleet.get("latency_ms", stats.get("latency_ms"))
        view.success_rate = fleet.get("success_rate", stats.get("success_rate", 1.0))
        view.throughput = fleet.get("throughput", stats.get("throughput", 0.0))
        view.kv_cache_utilization = stats.get(ReplicaMetric.KV_CACHE_UTILIZATION.value)
        view.ongoing = self.replica_queue_len_cache.get(r.replica_id)
        self._views[r.replica_id] = (view, snapshot, stats)
        return view

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        # Serve calls this as soon as the handle learns its replicas, usually before its first
        # request: start pulling the fleet view now, so that first decisions need not wait.
        self._fleet.ensure_running()
        live = {r.replica_id for r in replicas}
        self._views = {k: v for k, v in self._views.items() if k in live}

    # ---- outcomes and the snapshot pull ------------------------------------------------------

    def on_request_completed(self, replica_id: Any, internal_request_id: str) -> None:
        super().on_request_completed(replica_id, internal_request_id)
        started = self._started.pop(internal_request_id, None)
        if started is None:
            return
        self._fleet.record(replica_id.unique_id, (time.monotonic() - started) * 1000.0)

    def apply_snapshot(self, snapshot: dict[str, Any]) -> None:
        """Take a fleet view from the router actor (for tests; the view's puller does this)."""
        self._fleet.apply(snapshot)
