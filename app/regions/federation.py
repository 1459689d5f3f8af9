"""A region gateway's view of its peers and the plumbing around the pure parts: it pulls its
own region's summary from the fleet router and its peers' summaries over HTTP in the background
(no request waits on a peer), decides per request where to try (app.regions.peers.plan), and
forwards through app.regions.forwarding, recording what happens."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from typing import Any

from app.fleet.breaker import BreakerState
from app.fleet.geo import region_distances
from app.fleet.spec import FleetSpec
from app.observability.metrics import ForwardOutcome
from app.observability.recorder import metrics
from app.observability.tracing import SpanKind, inject, span
from app.regions.auth import load_secret
from app.regions.forwarding import Forwarder, PeerBusyError, PeerUnreachableError
from app.regions.peers import PeerTable, plan
from app.regions.summary import RegionSummary

logger = logging.getLogger(__name__)


class PeerRefusedError(PeerUnreachableError):
    """The peer's circuit is open here: not tried, so no verdict on it."""


class RegionFederation:
    def __init__(self, fleet: FleetSpec) -> None:
        if fleet.own_region is None:
            raise ValueError("federation needs a region of its own (app up --region)")
        self.fleet, self.region = fleet, fleet.own_region
        self.secret = load_secret(fleet.federation)
        distances = region_distances(fleet)
        self.table = PeerTable(
            fleet.federation, fleet.load_balancing, lambda a, b: distances[(a, b)]
        )
        for name, region in fleet.peers().items():
            url = region.base_url()
            if url is None:
                logger.warning("peer region %s has no endpoint; it is not federated", name)
            else:
                self.table.add(name, url, on_change=self._breaker_metric(name))
                metrics().sample_peer_available(self.region, name, self._in_rotation(name))
        self.forwarder = (
            Forwarder(fleet.federation, self.region, self.secret)
            if self.secret is not None and self.table.peers
            else None
        )
        if self.secret is None and self.table.peers:
            logger.error(
                "no federation secret in $%s or a secret file: region %s will not forward to "
                "its peers nor accept their requests",
                fleet.federation.secret_env,
                self.region,
            )
        self.local: RegionSummary | None = None
        self.local_at: float | None = None
        self.inflight: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None

    def _in_rotation(self, name: str) -> Callable[[], bool]:
        peer = self.table.peers[name]
        return lambda: peer.in_rotation

    def _breaker_metric(self, peer: str) -> Callable[[BreakerState], None]:
        return lambda state: metrics().breaker_transition(self.region, str(state), peer=peer)

    @property
    def forwarding(self) -> bool:
        return self.forwarder is not None

    def ensure_started(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:  # keep pulling: one bad round must not end federation
                logger.exception("federation refresh failed")
            await asyncio.sleep(self.fleet.federation.summary_interval_s)

    async def refresh(self) -> None:
        peers = [self._pull_peer(p) for p in self.table.peers] if self.forwarder else []
        await asyncio.gather(self._pull_local(), *peers)
        await self._report()

    async def _pull_local(self) -> None:
        from app.fleet.router_actor import router_handle

        router = router_handle(self.fleet.router_actor)
        data = await asyncio.wait_for(
            router.summary.remote(), self.fleet.federation.summary_timeout_s
        )
        self.local, self.local_at = RegionSummary.from_json(data), time.monotonic()

    async def _pull_peer(self, region: str) -> None:
        assert self.forwarder is not None
        try:
            summary = RegionSummary.from_json(
                await self.forwarder.summary(self.table.peers[region].base_url)
            )
        except (PeerUnreachableError, ValueError) as exc:
            self.table.record_failure(region, str(exc))
            return
        if summary.region != region:
            self.table.record_failure(region, f"endpoint answers as region {summary.region!r}")
            return
        self.table.record_summary(region, summary)

    async def _report(self) -> None:
        """Hand the peer view to the fleet router, so `app fleet status` shows every region."""
        from app.fleet.router_actor import router_handle

        router = router_handle(self.fleet.router_actor)
        await asyncio.wait_for(router.report_federation.remote(self.status()), 5)

    def summary(self) -> dict[str, Any]:
        """This region's last summary, served to peers (never computed on their request)."""
        if self.local is None:
            return RegionSummary(self.region, generated_at=time.time()).to_json()
        return self.local.to_json()

    def order(self, model: str, client_region: str | None, *, forwarded: bool) -> list[str]:
        local = self.local.load_of(model) if self.local else None
        peers = (
            self.table.rank(
                model, client_region or self.region, spec_regions=self.fleet.serving_regions(model)
            )
            if self.forwarder and not forwarded
            else []
        )
        return plan(
            local=local,
            served_here=self.fleet.serves_here(model),
            drained=bool(self.local and self.local.drained),
            inflight=self.inflight.get(model, 0),
            spillover_utilization=self.fleet.load_balancing.spillover_utilization,
            forwarded=forwarded,
            peers=peers,
        )

    async def forward(
        self, region: str, path: str, body: bytes, headers: dict[str, str], *, model: str = ""
    ) -> dict[str, Any]:
        assert self.forwarder is not None
        started = time.perf_counter()
        with self._outcome(region, model):
            self._admit(region)
            payload = await self.forwarder.unary(
                self.table.peers[region].base_url, path, body, inject(dict(headers))
            )
        self.table.record_forward(region, (time.perf_counter() - started) * 1000)
        return payload

    async def forward_stream(
        self, region: str, path: str, body: bytes, headers: dict[str, str], *, model: str = ""
    ) -> AsyncIterator[bytes]:
        assert self.forwarder is not None
        started = time.perf_counter()
        with self._outcome(region, model):
            self._admit(region)
            stream = await self.forwarder.stream(
                self.table.peers[region].base_url, path, body, inject(dict(headers))
            )
        self.table.record_forward(region, (time.perf_counter() - started) * 1000)
        return stream

    def _admit(self, region: str) -> None:
        """The peer's circuit lets this forward go (ranked peers may have opened since, or
        another request holds the half-open probe); if not, the gateway tries the next."""
        if not self.table.admit(region):
            raise PeerRefusedError(f"region {region} is out of rotation (circuit open)")

    @contextmanager
    def _outcome(self, region: str, model: str) -> Iterator[None]:
        """An unreachable peer counts against its rotation; a busy one is only skipped. Each
        forward is counted by outcome, under a span whose context the peer continues."""
        outcome = ForwardOutcome.ERROR
        try:
            with span("region.forward", kind=SpanKind.CLIENT, peer=region, model=model):
                yield
            outcome = ForwardOutcome.OK
        except PeerRefusedError:
            outcome = ForwardOutcome.UNREACHABLE  # refused here: no verdict on the peer
            raise
        except PeerUnreachableError as exc:
            outcome = ForwardOutcome.UNREACHABLE
            self.table.record_failure(region, str(exc))
            raise
        except BaseException as exc:
            if isinstance(exc, PeerBusyError):
                outcome = ForwardOutcome.BUSY
            self.table.release(region)  # busy, a final answer, or cancelled: no verdict
            raise
        finally:
            metrics().count_forward(model, self.region, region, outcome)

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "region": self.region,
            "forwarding": self.forwarding,
            "drained": bool(self.local and self.local.drained),
            "summary_age_s": None if self.local_at is None else round(now - self.local_at, 3),
            "local": self.local.to_json() if self.local else None,
            "peers": self.table.status(),
        }
