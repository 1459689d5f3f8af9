"""The replica's side of the fleet: which region and zone it runs in (its node's labels), how it
performs (app.fleet.stats), and a heartbeat to the router actor that brings back operator
directives (a drain, an injected fault)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import ray

from app.fleet.router_actor import ROUTER_NAMESPACE
from app.fleet.spec import FleetSpec, own_locality
from app.fleet.stats import PerfTracker

logger = logging.getLogger(__name__)

# Errors that say nothing about the replica's health: the client sent something wrong, or the
# replica refused work beyond its capacity on purpose.
CLIENT_ERROR_STATUSES = range(400, 500)


class ReplicaAgent:
    def __init__(
        self,
        spec: FleetSpec,
        model: str,
        replica_id: str,
        capacity: int,
    ) -> None:
        self.spec = spec
        self.model = model
        self.replica_id = replica_id
        self.capacity = capacity
        self.router_name = spec.router_actor
        self.perf = PerfTracker()
        self.ongoing = 0
        self.inject_latency_ms = 0.0
        self.drained = False
        ctx = ray.get_runtime_context()
        self.node_id = ctx.get_node_id()
        self.actor_id = ctx.get_actor_id()
        region, self.zone = own_locality()
        self.region = region or spec.default_region
        self._actor: Any = None
        self._heartbeats: asyncio.Task[None] | None = None

    @property
    def fingerprint(self) -> str:
        """Which replica answered, where: `<region>/<zone>/<replica id>`."""
        return f"{self.region}/{self.zone or '-'}/{self.replica_id}"

    def metadata(self) -> dict[str, Any]:
        """Static facts every router gets with the replica (Serve's replica metadata)."""
        return {
            "region": self.region,
            "zone": self.zone,
            "node_id": self.node_id,
            "model": self.model,
        }

    def routing_stats(self) -> dict[str, Any]:
        """Fresh figures Serve polls and hands to every router."""
        return self.perf.snapshot().as_dict() | {"ongoing": self.ongoing}

    @asynccontextmanager
    async def observe(self) -> AsyncIterator[None]:
        """Around one request: counts it, adds an injected fault's latency, records the outcome
        (a 4xx answer is the client's problem and counts as a success)."""
        self.ensure_heartbeats()
        started = time.monotonic()
        self.ongoing += 1
        ok = True
        try:
            if self.inject_latency_ms:
                await asyncio.sleep(self.inject_latency_ms / 1000.0)
            yield
        except BaseException as exc:
            status = getattr(exc, "status", None)
            ok = isinstance(status, int) and status in CLIENT_ERROR_STATUSES
            raise
        finally:
            self.ongoing -= 1
            self.perf.record(time.monotonic() - started, ok)

    def ensure_heartbeats(self) -> None:
        if self._heartbeats is None or self._heartbeats.done():
            self._heartbeats = asyncio.get_running_loop().create_task(self._heartbeat_loop())

    def report(self, healthy: bool = True) -> dict[str, Any]:
        return {
            "replica_id": self.replica_id,
            "actor_id": self.actor_id,
            "model": self.model,
            "node_id": self.node_id,
            "region": self.region,
            "zone": self.zone,
            "capacity": self.capacity,
            "ongoing": self.ongoing,
            "perf": self.perf.snapshot().as_dict(),
            "healthy": healthy,
        }

    async def heartbeat(self, healthy: bool = True) -> None:
        if self._actor is None:
            self._actor = ray.get_actor(self.router_name, namespace=ROUTER_NAMESPACE)
        directives = await asyncio.wait_for(
            self._actor.heartbeat.remote(self.report(healthy)), timeout=5
        )
        self.inject_latency_ms = float(directives.get("inject_latency_ms") or 0.0)
        self.drained = bool(directives.get("drained"))

    def deregister(self) -> None:
        """Tell the router actor this replica is going away (best effort, not awaited)."""
        if self._heartbeats is not None:
            self._heartbeats.cancel()
        if not ray.is_initialized():  # process exiting: asking Ray would connect it again
            return
        try:
            actor = self._actor or ray.get_actor(self.router_name, namespace=ROUTER_NAMESPACE)
            actor.deregister.remote(self.replica_id)
        except Exception as exc:  # the actor gone too: it forgets silent replicas by itself
            logger.debug("fleet deregister failed: %s", exc)

    async def _heartbeat_loop(self) -> None:
        while True:
            try:
                await self.heartbeat()
            except Exception as exc:  # no router actor (yet): routing works without it
                self._actor = None
                logger.debug("fleet heartbeat failed: %s", exc)
            # Two beats per check: the router actor marks a replica down only after
            # 2.5 intervals of silence twice running, so one slow beat on a busy machine
            # (a GC pause, a starved core) is absorbed instead of failing the replica over.
            await asyncio.sleep(self.spec.load_balancing.health_check_interval_s / 2)
