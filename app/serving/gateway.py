"""The gateway deployment: one base URL for every model id. It sends each request to its model's
deployment through a handle (with failover between replicas) or, in a federated region, to the
best peer region's gateway when this region cannot serve it (app.regions)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from ray import serve
from ray.exceptions import RayActorError
from ray.serve import Deployment
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import Response

from app.api.errors import (
    APIError,
    InvalidRequestError,
    ModelNotFoundError,
    OverloadedError,
    ServiceUnavailableError,
)
from app.api.http import (
    CURRENT_BODY,
    CURRENT_REQUEST,
    OpenAIRoutes,
    error_response,
    json_response,
    route_path,
)
from app.api.observed import RouteLabels
from app.api.responses import model_object
from app.api.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    ImageGenerationRequest,
)
from app.batches.http import BatchRoutes, handles
from app.batches.worker import LazyKV, batch_services, kv_connector
from app.catalog.cards import ModelCard
from app.events.http import PATH as EVENTS_PATH
from app.events.http import event_routes
from app.fleet.breaker import ReplicaBreakers
from app.fleet.failover import call_with_failover, stream_with_failover
from app.fleet.geo import GeoLocator, forwarded_client_ip
from app.fleet.hints import (
    BACKGROUND,
    PRIORITY,
    REGION_HEADER,
    STRATEGY_HEADER,
    ZONE_HEADER,
    InvalidRouteHintError,
    route_kwarg,
)
from app.fleet.router_actor import FleetRouterUnavailableError, router_handle
from app.fleet.spec import FleetSpec, embedded_fleet
from app.fleet.view import fleet_view
from app.observability.logs import configure_logging
from app.observability.metrics import Base
from app.observability.recorder import metrics
from app.observability.tracing import SpanKind, inject, setup_tracing, span, traced_stream
from app.regions.federation import RegionFederation
from app.regions.forwarding import SUMMARY_PATH, PeerBusyError, PeerUnreachableError
from app.regions.ingress import is_forwarded, peer_refusal
from app.regions.peers import LOCAL
from app.security.guard import guard_for
from app.security.keys import Scope
from app.serving.deadlines import bounded_relay, request_deadline

logger = logging.getLogger(__name__)
T = TypeVar("T")
STATUS_TTL_S = 2.0
REMOTE = "SERVED_BY_PEERS"  # a model this region forwards (its status is the peers' business)
PATHS = {
    "chat": "/v1/chat/completions",
    "completions": "/v1/completions",
    "embeddings": "/v1/embeddings",
    "images": "/v1/images/generations",
    "relay_chat_sse": "/v1/chat/completions",
    "relay_completions_sse": "/v1/completions",
}
# Request headers a forward carries on to the peer (the client region is the resolved one).
PASSED_HEADERS = ("authorization", "x-request-id", "cache-control", "x-cache-bypass")


class Gateway:
    """Resolves the request's model id to that model's deployment handle and forwards."""

    def __init__(self, cards: list[dict[str, Any]], fleet: dict[str, Any] | None = None) -> None:
        self.cards = {c.id: c for c in (ModelCard.model_validate(card) for card in cards)}
        self.fleet = FleetSpec.model_validate(fleet) if fleet else embedded_fleet()
        fleet_view(self.fleet).ensure_running()  # before the first request needs it
        configure_logging()
        setup_tracing(None, "gateway", resource={"app.region": self.fleet.home_region})
        self.geo = GeoLocator(self.fleet)
        self.created = int(time.time())
        self._handles: dict[str, DeploymentHandle] = {}
        self._breakers: dict[str, ReplicaBreakers] = {}  # per model, by replica
        self._status: tuple[float, dict[str, str]] = (0.0, {})
        self._refreshing: asyncio.Task[dict[str, str]] | None = None
        self.federation = RegionFederation(self.fleet) if self.fleet.own_region else None
        region = self.fleet.own_region or self.fleet.home_region
        labels = RouteLabels.of(Base.GATEWAY, region, self.cards)
        self._routes = OpenAIRoutes(self, guard_for(self.fleet.auth), labels)
        self._routes.add_get("/v1/fleet", self._fleet_view)  # admin scope
        self._routes.add_get(SUMMARY_PATH, self._summary, scope=None)  # peer-signed instead
        # Files, batches and events keep their state in this region's KV store.
        connect = kv_connector(self.fleet.batches)
        files, batches, start_batch = batch_services(connect, self.fleet.batches)
        self._batches = BatchRoutes(files, batches, start_batch)
        self._routes.describe(self._batches.route_table())  # answered before self._routes
        events_kv = LazyKV(connect)  # reconnects if the store is restarted
        self._routes.add_get(EVENTS_PATH, event_routes(lambda: events_kv))  # admin scope

    async def handle_for(self, model: str) -> DeploymentHandle:
        card = self.cards.get(model)
        if card is None:
            raise ModelNotFoundError(
                f"the model {model!r} does not exist; available: {sorted(self.cards)}",
                param="model",
            )
        # The first request waits for one status read, so that a model whose application was
        # never deployed gets a 503 at once rather than a handle call that waits for replicas.
        status = self._model_status() or await self._refresh_status()
        if status.get(model) in ("NOT_DEPLOYED", "DEPLOY_FAILED"):
            raise ServiceUnavailableError(
                f"model {model!r} is in the catalogue but its application is not running",
                retry_after_s=10,
            )
        handle = self._handles.get(model)
        if handle is None:
            handle = serve.get_deployment_handle(card.deployment_name, card.deployment_name)
            self._handles[model] = handle
        return handle

    async def __call__(self, request: Request) -> Response:
        """HTTP entry point (Serve's direct ingress or proxy). A request from a peer region
        must carry a valid federation signature, checked before anything else."""
        if self.federation is not None:
            self.federation.ensure_started()
        if is_forwarded(request) or route_path(request) == SUMMARY_PATH:
            secret = self.federation.secret if self.federation else None
            refusal = await peer_refusal(request, secret)
            if refusal is not None:
                return refusal
        if handles(route_path(request)):
            return await self._files_and_batches(request)
        # A peer's signed request was admitted, key and limits, by the region it entered.
        return await self._routes(request, trusted=is_forwarded(request))

    async def _files_and_batches(self, request: Request) -> Response:
        """/v1/files*, /v1/batches*: an inference key, whose id owns the objects (never taken
        from a peer: these objects live in this region's store)."""
        guard = self._routes.guard
        key_id = None
        if guard is not None:
            try:
                permit = await guard.check(request.headers.get("authorization"), Scope.INFERENCE)
            except APIError as exc:
                return error_response(exc)
            await permit.finish(0)
            key_id = permit.key_id
        return await self._batches(request, key_id)

    async def _summary(self, request: Request) -> Response:
        """GET /federation/summary: this region's last summary, for its peers."""
        if self.federation is None:
            raise ServiceUnavailableError("this gateway is not a federated region")
        return json_response(self.federation.summary())

    async def list_models(self) -> list[dict[str, Any]]:
        return [model_object(card, self.created) for card in self.cards.values()]

    async def health(self) -> dict[str, Any]:
        models = await self._refresh_status()
        local = {m: status for m, status in models.items() if status != REMOTE}
        running = [m for m, status in local.items() if status == "RUNNING"]
        if not running:
            raise ServiceUnavailableError("no model application is running", retry_after_s=5)
        return {"status": "ok" if len(running) == len(local) else "degraded", "models": models}

    def _model_status(self) -> dict[str, str]:
        """Last known application status per model, refreshed in the background when stale, so
        no request waits on the controller (an unknown model status counts as serving)."""
        fetched_at, cached = self._status
        stale = time.monotonic() - fetched_at > STATUS_TTL_S
        if stale and (self._refreshing is None or self._refreshing.done()):
            self._refreshing = asyncio.get_running_loop().create_task(self._refresh_status())
        return cached

    async def _refresh_status(self) -> dict[str, str]:
        apps = (await asyncio.to_thread(serve.status)).applications
        status = {
            model: apps[card.deployment_name].status.value
            if card.deployment_name in apps
            else "NOT_DEPLOYED"
            if self.fleet.serves_here(model)
            else REMOTE
            for model, card in self.cards.items()
        }
        self._status = (time.monotonic(), status)
        return status

    def _route(self) -> dict[str, Any]:
        """Routing hints from the HTTP request: X-Client-Region (else the client's IP through
        the GeoIP table), X-Client-Zone and an X-Route-Strategy override."""
        request = CURRENT_REQUEST.get()
        if request is None:
            return route_kwarg()
        headers = request.headers
        client_ip = forwarded_client_ip(
            headers.get("x-forwarded-for"), request.client.host if request.client else None
        )
        try:
            return route_kwarg(
                region=self.geo.client_region(headers.get(REGION_HEADER), client_ip),
                zone=headers.get(ZONE_HEADER),
                strategy=headers.get(STRATEGY_HEADER),
            )
        except InvalidRouteHintError as exc:
            raise InvalidRequestError(str(exc), param=STRATEGY_HEADER) from exc

    async def _call(self, method: str, req: Any, priority: str | None = None) -> dict[str, Any]:
        """`priority` "background": a batch job's line, admitted by the replica within the
        model's batch_share of its slots."""
        route = self._route()
        if priority == BACKGROUND:
            route[PRIORITY] = BACKGROUND
        with request_deadline(self.cards.get(req.model)) as deadline:
            if self.federation is None:
                return await self._local_call(method, req, route, deadline)
            federation, (body, headers) = self.federation, self._peer_request(route)

            async def attempt(target: str) -> dict[str, Any]:
                if target == LOCAL:
                    return await self._local_call(method, req, route, deadline)
                path = _model_path(req.model, method)
                async with asyncio.timeout_at(deadline):
                    return await federation.forward(target, path, body, headers, model=req.model)

            return await self._across_regions(req.model, route, attempt)

    async def _local_call(
        self, method: str, req: Any, route: dict[str, Any], deadline: float | None
    ) -> dict[str, Any]:
        handle = await self.handle_for(req.model)
        with (
            span(f"gateway.{method}", kind=SpanKind.CLIENT, model=req.model),
            _mapped_errors(req.model),
            self._inflight(req.model),
        ):
            return await call_with_failover(
                # The route hints carry the trace context to the router and the replica.
                lambda hints: getattr(handle, method).remote(req, route=inject(dict(hints))),
                route,
                self.fleet.load_balancing,
                breakers=self._replica_breakers(req.model),
                deadline=deadline,
            )

    def _replica_breakers(self, model: str) -> ReplicaBreakers:
        breakers = self._breakers.get(model)
        if breakers is None:
            region = self.fleet.own_region or self.fleet.home_region
            breakers = self._breakers[model] = ReplicaBreakers(
                self.fleet.load_balancing.breaker,
                on_change=lambda state: metrics().breaker_transition(
                    region, str(state), model=model
                ),
            )
        return breakers

    async def _stream(self, method: str, req: Any, route: dict[str, Any]) -> AsyncIterator[bytes]:
        """Forward SSE writes untouched (no decode and re-encode here): from this region's
        replica, or relayed from a peer region as they arrive. A stream fails over only
        before its first byte."""
        with request_deadline(self.cards.get(req.model)) as deadline:
            if self.federation is None:
                async for piece in self._local_stream(method, req, route, deadline):
                    yield piece
                return
            federation, (body, headers) = self.federation, self._peer_request(route)

            async def attempt(target: str) -> tuple[bytes, AsyncIterator[bytes]]:
                if target == LOCAL:
                    stream = self._local_stream(method, req, route, deadline)
                    return await anext(stream), stream
                path = _model_path(req.model, method)
                async with asyncio.timeout_at(deadline):
                    stream = await federation.forward_stream(
                        target, path, body, headers, model=req.model
                    )
                    return await anext(stream), stream

            first, rest = await self._across_regions(req.model, route, attempt)
        yield first
        async for piece in rest:
            yield piece

    async def _across_regions(
        self, model: str, route: dict[str, Any], attempt: Callable[[str], Awaitable[T]]
    ) -> T:
        """Try this region and its peers in the federation's order until one answers; a
        local 429/503 or a busy or unreachable peer moves on to the next."""
        assert self.federation is not None
        failure: APIError | None = None
        for target in self.federation.order(model, route.get("region"), forwarded=_forwarded()):
            try:
                return await attempt(target)
            except (OverloadedError, ServiceUnavailableError) as exc:
                failure = exc
                _log_attempt(model, target, exc)
            except (PeerBusyError, PeerUnreachableError, StopAsyncIteration) as exc:
                _log_attempt(model, target, exc)
        raise _no_region(model, failure)

    async def _local_stream(
        self, method: str, req: Any, route: dict[str, Any], deadline: float | None
    ) -> AsyncIterator[bytes]:
        handle = (await self.handle_for(req.model)).options(stream=True)
        with _mapped_errors(req.model), self._inflight(req.model):
            pieces = stream_with_failover(
                lambda hints: getattr(handle, method).remote(req, route=inject(dict(hints))),
                route,
                self.fleet.load_balancing,
                breakers=self._replica_breakers(req.model),
                deadline=deadline,
            )
            traced = traced_stream(f"gateway.{method}", pieces, kind=SpanKind.CLIENT)
            async for piece in traced:
                yield piece

    def _peer_request(self, route: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
        """The client's own body and the headers a peer needs, taken now, while the request
        is current: the client's region as resolved here, so the peer routes by it too."""
        request = CURRENT_REQUEST.get()
        headers = {}
        if request is not None:
            headers = {k: v for k in PASSED_HEADERS if (v := request.headers.get(k)) is not None}
        for header, key in (
            (REGION_HEADER, "region"),
            (ZONE_HEADER, "zone"),
            (STRATEGY_HEADER, "strategy"),
        ):
            if route.get(key):
                headers[header] = str(route[key])
        return CURRENT_BODY.get() or b"", headers

    @contextmanager
    def _inflight(self, model: str) -> Iterator[None]:
        """Requests this gateway has in flight on its own replicas, per model: the live half of
        the saturation test (the summary's load is a few seconds old)."""
        counts = self.federation.inflight if self.federation else None
        if counts is None:
            yield
            return
        counts[model] = counts.get(model, 0) + 1
        try:
            yield
        finally:
            counts[model] -= 1

    async def _fleet_view(self, request: Request) -> Response:
        """GET /v1/fleet: nodes, replicas, health and current performance, from the router."""
        try:
            actor = router_handle(self.fleet.router_actor)
            view = await asyncio.wait_for(actor.fleet.remote(), timeout=5)
        except (FleetRouterUnavailableError, TimeoutError, RayActorError) as exc:
            raise ServiceUnavailableError(
                f"the fleet router is not available: {exc}", retry_after_s=5
            ) from exc
        if self.federation is not None:
            view["federation"] = self.federation.status()
        view["autoscaling"] = await self._autoscaling_view()
        return json_response(view)

    async def _autoscaling_view(self) -> list[dict[str, Any]] | None:
        """Per model: replicas, signals, forecast and recent decisions, as the policies left
        them in the region's KV store (None when no store runs; `app autoscale status` shows
        the same)."""
        from app.autoscaling.store import kv_connector, read_summaries

        def read() -> list[dict[str, Any]]:
            return read_summaries(kv_connector()(), decisions=3)

        try:
            return await asyncio.wait_for(asyncio.to_thread(read), timeout=5)
        except Exception as exc:  # the fleet view must not fail for want of a KV store
            logger.info("no autoscaling view for /v1/fleet: %r", exc)
            return None

    async def chat(self, req: ChatCompletionRequest, priority: str | None = None) -> dict[str, Any]:
        return await self._call("chat", req, priority)

    def chat_sse(self, req: ChatCompletionRequest) -> AsyncIterator[bytes]:
        writes = self._stream("relay_chat_sse", req, self._route())
        return bounded_relay(self.cards.get(req.model), writes)

    async def completions(
        self, req: CompletionRequest, priority: str | None = None
    ) -> dict[str, Any]:
        return await self._call("completions", req, priority)

    def completions_sse(self, req: CompletionRequest) -> AsyncIterator[bytes]:
        writes = self._stream("relay_completions_sse", req, self._route())
        return bounded_relay(self.cards.get(req.model), writes)

    async def embeddings(
        self, req: EmbeddingRequest, priority: str | None = None
    ) -> dict[str, Any]:
        return await self._call("embeddings", req, priority)

    async def images(self, req: ImageGenerationRequest) -> dict[str, Any]:
        return await self._call("images", req)


def _model_path(model: str, method: str) -> str:
    """A forward goes to the peer's per-model URL: HAProxy takes it straight to a replica,
    one hop fewer than through the peer's gateway (BENCHMARKS.md)."""
    return f"/models/{model}{PATHS[method]}"


def _log_attempt(model: str, target: str, exc: BaseException) -> None:
    where = "this region" if target == LOCAL else f"region {target}"
    body = getattr(exc, "body", None)  # a busy peer's answer (bytes); APIError.body is a method
    detail = f": {body[:300]!r}" if isinstance(body, bytes) else ""
    logger.warning(
        "model %s: %s could not serve (%r%s); trying the next", model, where, exc, detail
    )


def _forwarded() -> bool:
    request = CURRENT_REQUEST.get()
    return request is not None and is_forwarded(request)


def _no_region(model: str, failure: APIError | None) -> APIError:
    """What a client hears when no region could take the request: the local 429 if that was
    the last word, else a 503; both with Retry-After."""
    if isinstance(failure, OverloadedError):
        return failure
    return ServiceUnavailableError(
        f"no region can serve model {model!r} right now", retry_after_s=2
    )


@contextmanager
def _mapped_errors(model: str) -> Iterator[None]:
    """Serve's availability errors as the API's 429/503 with Retry-After."""
    try:
        yield
    except BackPressureError as exc:
        raise OverloadedError(
            f"model {model!r} is at capacity; retry shortly", retry_after_s=1
        ) from exc
    except (DeploymentUnavailableError, RayActorError) as exc:
        raise ServiceUnavailableError(
            f"no replica of model {model!r} is available right now", retry_after_s=2
        ) from exc


# Decorated here rather than with @ so that Gateway stays a plain, importable class (pickled by
# reference into replicas) while the builder gets a Deployment to .options() and .bind().
gateway_deployment: Deployment = serve.deployment(Gateway)  # type: ignore[assignment]
