"""This process's copy of the fleet view: the router actor's latest snapshot, pulled by one
background thread for every fleet router in the process (app.fleet.request_router).

One puller per process, not one per handle: a gateway holds a handle per model, and a poller
per handle would pull the same snapshot once per model (that many times the load on the router
actor). A thread, not an asyncio task: Serve runs handle routers on an event loop of their own,
a deployment's constructor and methods on another and a driver's handles on a third; the
snapshot is an immutable dict replaced whole, which any of them can read.

Each pull names the process and the version it has applied, so the router actor knows when an
operator action is in force everywhere (app.fleet.propagation), and carries what this
process's routers observed since the last one (requests and latency per replica).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from typing import Any

import ray

from app.fleet.router_actor import ROUTER_NAMESPACE
from app.fleet.spec import FleetSpec, own_locality

logger = logging.getLogger(__name__)

EMPTY_SNAPSHOT: dict[str, Any] = {
    "version": -1,
    "replicas": {},
    "drained_nodes": [],
    "drained_set": frozenset(),
}
PULL_TIMEOUT_S = 5.0


class FleetView:
    """The latest snapshot of one router actor, and the outcomes to report to it."""

    def __init__(
        self, router_name: str, interval_s: float, subscriber: str, pulling: bool = True
    ) -> None:
        """`pulling=False`: a fixed view that only `apply` changes (a router measured or tested
        outside a cluster)."""
        self.router_name = router_name
        self.interval_s = interval_s
        self.subscriber = subscriber
        self.snapshot: dict[str, Any] = EMPTY_SNAPSHOT
        # Set once the first pull has been tried (successful or not), so that waiting for it
        # never outlasts an unreachable router actor.
        self.first_pull = threading.Event()
        self.pulling = pulling
        if not pulling:
            self.first_pull.set()
        self._outcomes: dict[str, list[Any]] = {}  # replica id -> [requests, errors, EMA ms]
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._actor: Any = None

    # ---- what routers use --------------------------------------------------------------------

    def apply(self, snapshot: dict[str, Any]) -> None:
        """Take a snapshot from the router actor (see FleetRouter.snapshot)."""
        drained = frozenset(snapshot.get("drained_nodes") or ())
        self.snapshot = snapshot | {"drained_set": drained}

    def record(self, replica_id: str, latency_ms: float) -> None:
        """One completed request to the replica, for the next pull's report."""
        with self._lock:
            entry = self._outcomes.setdefault(replica_id, [0, 0, None])
            entry[0] += 1
            ema = entry[2]
            entry[2] = latency_ms if ema is None else ema + 0.2 * (latency_ms - ema)

    def take_outcomes(self) -> dict[str, list[Any]]:
        with self._lock:
            outcomes, self._outcomes = self._outcomes, {}
        return outcomes

    def ensure_running(self) -> None:
        """Start the puller unless it runs or the process is not in Ray (it stops when the
        process leaves Ray)."""
        if not self.pulling or not ray.is_initialized():
            return
        if self._thread is not None and self._thread.is_alive():
            return
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._thread = threading.Thread(
                target=self._run, name=f"fleet-view-{self.router_name}", daemon=True
            )
            self._thread.start()

    async def wait_first_pull(self, timeout_s: float) -> bool:
        """Whether the first pull was tried within `timeout_s` (at once when nothing pulls: the
        process is not in Ray). Tried, not succeeded: a router actor that cannot be reached
        must not hold requests, which are then routed on Serve's replica list alone."""
        deadline = time.monotonic() + timeout_s
        # Polled, not awaited in a thread: the wait is once per process, and a burst of first
        # requests must not take every thread of the loop's default executor.
        while not self.first_pull.is_set() and time.monotonic() < deadline:
            if self._thread is None or not self._thread.is_alive():
                break
            await asyncio.sleep(0.01)
        return self.first_pull.is_set()

    # ---- the puller --------------------------------------------------------------------------

    def _run(self) -> None:
        # ray.is_initialized() is checked first every round: after ray.shutdown a Ray call
        # would connect the process again, to whatever cluster it finds.
        while ray.is_initialized():
            try:
                self.pull()
            except Exception as exc:  # the actor restarting or gone: keep the last snapshot
                self._actor = None
                logger.debug("fleet snapshot pull failed: %s", exc)
            self.first_pull.set()
            time.sleep(self.interval_s)
        # Out of Ray: what this view held belongs to that cluster, not to the next one.
        self._actor, self.snapshot = None, EMPTY_SNAPSHOT
        self.first_pull.clear()

    def pull(self) -> None:
        """One pull: this process's outcomes out (kept for the next pull if this one fails),
        the snapshot in when it is newer than the one held."""
        outcomes = self.take_outcomes()
        try:
            snapshot = self.fetch(self.snapshot.get("epoch"), self.snapshot["version"], outcomes)
        except Exception:
            with self._lock:
                for replica_id, (count, errors, ema) in outcomes.items():
                    entry = self._outcomes.setdefault(replica_id, [0, 0, ema])
                    entry[0] += count
                    entry[1] += errors
            raise
        if snapshot is not None:
            self.apply(snapshot)

    def fetch(self, epoch: str | None, version: int, outcomes: dict[str, Any]) -> Any:
        """The router actor's snapshot if newer than (epoch, version), else None."""
        if self._actor is None:
            self._actor = ray.get_actor(self.router_name, namespace=ROUTER_NAMESPACE)
        call = self._actor.snapshot.remote(version, outcomes, self.subscriber, epoch)
        return ray.get(call, timeout=PULL_TIMEOUT_S)


_views: dict[str, FleetView] = {}
_views_lock = threading.Lock()


def fleet_view(spec: FleetSpec) -> FleetView:
    """This process's view of the spec's router actor, created on first use. The puller runs
    at the spec's `snapshot_interval_s`, the shortest any caller asked for."""
    interval = spec.load_balancing.snapshot_interval_s
    with _views_lock:
        view = _views.get(spec.router_actor)
        if view is None:
            view = FleetView(spec.router_actor, interval, process_name())
            _views[spec.router_actor] = view
        view.interval_s = min(view.interval_s, interval)
    return view


def process_name() -> str:
    """How this process names itself to the router actor: the Serve replica or actor it is,
    its region and pid (`app fleet drain` lists the ones that lag)."""
    from ray import serve
    from ray.serve.exceptions import RayServeException

    who = "driver"
    if ray.is_initialized():
        try:
            ctx = serve.get_replica_context()
            who = f"{ctx.app_name}/{ctx.deployment} replica"
        except RayServeException:
            who = ray.get_runtime_context().get_actor_name() or who
    region, _ = own_locality()
    node = ray.get_runtime_context().get_node_id()[:8] if ray.is_initialized() else "-"
    return f"{who} ({region or 'no region'}, node {node}, pid {os.getpid()})"
