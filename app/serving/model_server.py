"""The Serve deployment class behind every model id: loads the card's runner and serves the OpenAI
API over HTTP (direct ingress) and over handles (gateway, other Ray jobs)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, aclosing, asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
from pydantic import BaseModel
from ray import serve
from ray.serve import Deployment
from starlette.requests import Request
from starlette.responses import Response

from app.api.http import OpenAIRoutes, request_tokens, validate_request
from app.api.observed import RouteLabels
from app.api.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    ImageGenerationRequest,
)
from app.api.sse import Chunk, SSEStream
from app.autoscaling.report import ReplicaMetric, WorkRates, replica_stats
from app.batches.worker import kv_connector
from app.cache.responses import ResponseCache
from app.catalog.cards import ModelCard
from app.events.bus import EventType
from app.events.outbox import Notice, Outbox
from app.fleet.agent import ReplicaAgent
from app.fleet.hints import BACKGROUND, PRIORITY
from app.fleet.spec import FleetSpec, embedded_fleet
from app.observability.logs import configure_logging
from app.observability.metrics import Base
from app.observability.recorder import metrics
from app.observability.tracing import SpanKind, extract, setup_tracing, span, traced_stream
from app.regions.auth import load_secret
from app.regions.ingress import is_forwarded, peer_refusal
from app.security.guard import guard_for
from app.security.keys import Scope
from app.serving.deadlines import bounded_stream, time_limit, timeout_error
from app.serving.runners import runner_class
from app.serving.service import ModelService

logger = logging.getLogger(__name__)

# The `route` keyword: routing hints for the request router (app.fleet.hints); unused here.
RouteArg = dict[str, Any] | None


class ModelServer:
    """One replica of one model id. Handle methods take typed requests (or their dicts)."""

    def __init__(
        self,
        card: dict[str, Any],
        catalogue_dir: str,
        device: str = "cpu",
        fleet: dict[str, Any] | None = None,
    ) -> None:
        parsed = ModelCard.model_validate(card)
        runner = runner_class(parsed.loader)(
            parsed, parsed.resolve_source(Path(catalogue_dir)), device
        )
        self.loaded = runner.load()
        spec = FleetSpec.model_validate(fleet) if fleet else embedded_fleet()
        replica = serve.get_replica_context().replica_id.unique_id
        configure_logging()
        setup_tracing(None, parsed.id, resource={"app.replica": replica})
        self.fleet = ReplicaAgent(spec, parsed.id, replica, parsed.max_ongoing_requests)
        region, recorder = self.fleet.region, metrics()
        batch = parsed.batching.max_batch_size
        self.service = ModelService(
            parsed,
            runner,
            response_cache=ResponseCache.for_card(parsed),
            on_usage=lambda p, c: recorder.count_tokens(parsed.id, region, p, c),
            on_batch=lambda n: recorder.set_batch_fill(parsed.id, region, replica, n / batch),
        )
        logger.info("loaded %s on %s (%s)", parsed.id, self.loaded.device, self.loaded.dtype)
        engine = self.service.engine
        if engine is not None:
            recorder.sample_engine(parsed.id, region, replica, engine.stats)
        labels = RouteLabels.of(Base.MODEL, region, (parsed.id,))
        # Shedding load tells the event bus, at most once a minute per replica.
        overload = Notice(
            Outbox(kv_connector(spec.batches), f"replica:{replica}"),
            EventType.SYSTEM_OVERLOAD,
            {"model": parsed.id, "region": region, "replica": replica},
        )
        self._routes = OpenAIRoutes(self, guard_for(spec.auth), labels, overload.notice)
        self._peer_secret = load_secret(spec.federation) if spec.own_region else None
        self._work = WorkRates(parsed.batching.max_batch_size)

    # ---- fleet hooks: Serve calls these periodically ----------------------------------------

    def record_replica_metadata(self) -> dict[str, Any]:
        """Region, zone and node, given to every router with this replica."""
        return self.fleet.metadata()

    async def record_routing_stats(self) -> dict[str, Any]:
        self.fleet.ensure_heartbeats()
        engine = self.service.engine_stats()
        return self.fleet.routing_stats() | (engine.figures() if engine else {})

    async def check_health(self) -> None:
        self.fleet.ensure_heartbeats()

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve calls this on an autoscaled deployment's replicas every metrics interval; the
        controller averages each figure over the look-back window into the policy's
        ctx.aggregated_metrics (app.autoscaling.serve_policy). Load and latency are the figures
        the fleet already measures for routing, not a second count."""
        work = self._work.advance(self.service.work_totals())
        # Load in admission slots (sequences and images), not requests: a request for 8
        # sequences loads the replica as 8 would.
        load = max(self.fleet.ongoing, self.service.inflight)
        engine = self.service.engine_stats()
        if engine is not None:
            work |= {ReplicaMetric(name): value for name, value in engine.figures().items()}
        return replica_stats(self.fleet.perf.snapshot(), load, self.fleet.capacity, work)

    def __del__(self) -> None:
        """Serve calls this when it stops the replica: leave the fleet at once, rather than
        after the router actor notices missing heartbeats."""
        fleet = getattr(self, "fleet", None)
        if fleet is not None:
            fleet.deregister()
        service = getattr(self, "service", None)
        if service is not None:
            service.close()

    def _stamp(self, response: dict[str, Any]) -> dict[str, Any]:
        """OpenAI's system_fingerprint names the backend that answered: region/zone/replica."""
        response["system_fingerprint"] = self.fleet.fingerprint
        return response

    @asynccontextmanager
    async def _serving(self, route: RouteArg = None) -> AsyncIterator[None]:
        """Admission (429 beyond capacity; batch work within its share, see the route's
        priority) and the fleet's performance accounting."""
        background = route is not None and route.get(PRIORITY) == BACKGROUND
        async with self.fleet.observe():
            with self.service.admit(background=background):
                yield

    def _time_limit(self) -> AbstractAsyncContextManager[None]:
        """The card's limit on one unary request: a 504 past it, and the work cancelled."""
        card = self.service.card
        return time_limit(card.request_timeout_s, lambda first: timeout_error(card, first))

    def _bounded(self, chunks: AsyncIterator[Chunk]) -> AsyncIterator[Chunk]:
        """A stream under the card's limits: its first chunk within timeouts.request_s, each
        later one within timeouts.chunk_s (past either, the stream ends with a 504 error)."""
        card = self.service.card
        return bounded_stream(
            chunks,
            first_s=card.request_timeout_s,
            next_s=card.timeouts.chunk_s,
            error=lambda first: timeout_error(card, first),
        )

    # ---- the Backend protocol (HTTP) and the handle API share these methods -----------------

    async def __call__(self, request: Request) -> Response:
        """HTTP entry point (Serve's direct ingress or proxy). Peer regions' gateways forward
        here too, signed (app.regions)."""
        if is_forwarded(request):
            refusal = await peer_refusal(request, self._peer_secret)
            if refusal is not None:
                return refusal
        return await self._routes(request, trusted=is_forwarded(request))

    async def list_models(self) -> list[dict[str, Any]]:
        return [self.service.model_info()]

    async def health(self) -> dict[str, Any]:
        engine = self.service.engine_stats()
        return {
            "status": "ok",
            "model": self.service.card.id,
            "device": self.loaded.device,
            "inflight": self.service.inflight,
            **({"engine": engine.as_dict()} if engine else {}),
        }

    async def stats(self) -> dict[str, Any]:
        """Batching and load figures for `app status` and tests."""
        return self.service.stats() | {"model": self.service.card.id, "device": self.loaded.device}

    async def chat(
        self,
        req: ChatCompletionRequest | dict[str, Any],
        route: RouteArg = None,
        api_key: str | None = None,
    ) -> dict[str, Any]:
        request = validate_request(req, ChatCompletionRequest)
        with span("replica.chat", parent=extract(route), kind=SpanKind.SERVER, model=request.model):
            async with (
                self._keyed(api_key, request) as used,
                self._serving(route),
                self._time_limit(),
            ):
                with span("runner.chat"):
                    answer = await self.service.chat(request)
                return used.charge(self._stamp(answer))

    async def chat_stream(
        self,
        req: ChatCompletionRequest | dict[str, Any],
        route: RouteArg = None,
        api_key: str | None = None,
    ) -> AsyncIterator[Chunk]:
        """Chunk dicts, for Python callers (`handle.options(stream=True)`)."""
        request = validate_request(req, ChatCompletionRequest)
        # aclosing: a consumer that stops early frees its slots and stops decoding at once.
        async with (
            self._keyed(api_key, request),
            self._serving(route),
            aclosing(self.service.chat_stream(request)) as chunks,
        ):
            async for chunk in self._bounded(chunks):
                yield chunk

    def chat_sse(self, req: ChatCompletionRequest | dict[str, Any]) -> SSEStream:
        """Encoded, coalesced SSE writes: what this replica's HTTP route sends."""
        return SSEStream(self.chat_stream(req))

    async def relay_chat_sse(
        self, req: ChatCompletionRequest, route: RouteArg = None
    ) -> AsyncIterator[bytes]:
        """The same writes over a streaming handle, for the gateway to forward untouched
        (Serve streams only from async generators)."""
        writes = self.chat_sse(req)
        async for write in traced_stream("replica.chat", writes, parent=extract(route)):
            yield write

    async def completions(
        self,
        req: CompletionRequest | dict[str, Any],
        route: RouteArg = None,
        api_key: str | None = None,
    ) -> dict[str, Any]:
        request = validate_request(req, CompletionRequest)
        with span("replica.completions", parent=extract(route), kind=SpanKind.SERVER):
            async with (
                self._keyed(api_key, request) as used,
                self._serving(route),
                self._time_limit(),
            ):
                with span("runner.completions"):
                    answer = await self.service.completions(request)
                return used.charge(self._stamp(answer))

    async def completions_stream(
        self,
        req: CompletionRequest | dict[str, Any],
        route: RouteArg = None,
        api_key: str | None = None,
    ) -> AsyncIterator[Chunk]:
        request = validate_request(req, CompletionRequest)
        async with (
            self._keyed(api_key, request),
            self._serving(route),
            aclosing(self.service.completions_stream(request)) as chunks,
        ):
            async for chunk in self._bounded(chunks):
                yield chunk

    def completions_sse(self, req: CompletionRequest | dict[str, Any]) -> SSEStream:
        return SSEStream(self.completions_stream(req))

    async def relay_completions_sse(
        self, req: CompletionRequest, route: RouteArg = None
    ) -> AsyncIterator[bytes]:
        writes = self.completions_sse(req)
        async for write in traced_stream("replica.completions", writes, parent=extract(route)):
            yield write

    async def embeddings(
        self,
        req: EmbeddingRequest | dict[str, Any],
        route: RouteArg = None,
        api_key: str | None = None,
    ) -> dict[str, Any]:
        request = validate_request(req, EmbeddingRequest)
        with span("replica.embeddings", parent=extract(route), kind=SpanKind.SERVER):
            async with (
                self._keyed(api_key, request) as used,
                self._serving(route),
                self._time_limit(),
            ):
                with span("runner.embeddings"):
                    answer = await self.service.embeddings(request)
                return used.charge(answer)

    async def images(
        self,
        req: ImageGenerationRequest | dict[str, Any],
        route: RouteArg = None,
        api_key: str | None = None,
    ) -> dict[str, Any]:
        request = validate_request(req, ImageGenerationRequest)
        with span("replica.images", parent=extract(route), kind=SpanKind.SERVER):
            async with self._keyed(api_key, request), self._serving(route), self._time_limit():
                with span("runner.images"):
                    return await self.service.images(request)

    @asynccontextmanager
    async def _keyed(self, api_key: str | None, request: BaseModel) -> AsyncIterator[Usage]:
        """A handle caller that gives a key gets what an HTTP client gets: 401, 403, the key's
        limits. Callers inside the cluster that give none are trusted, as before."""
        usage = Usage()
        guard = self._routes.guard
        if api_key is None or guard is None:
            yield usage
            return
        tokens = request_tokens(request, len(orjson.dumps(request.model_dump(mode="json"))))
        permit = await guard.check(f"Bearer {api_key}", Scope.INFERENCE, tokens)
        try:
            yield usage
        finally:
            await permit.finish(usage.total_tokens)


class Usage:
    """The tokens a unary response reports, for the caller's key's tokens-per-minute limit."""

    total_tokens: int | None = None

    def charge(self, response: dict[str, Any]) -> dict[str, Any]:
        usage = response.get("usage")
        total = usage.get("total_tokens") if isinstance(usage, dict) else None
        self.total_tokens = total if isinstance(total, int) else None
        return response


# Decorated here rather than with @ so that ModelServer stays a plain, importable class (pickled by
# reference into replicas) while the builder gets a Deployment to .options() and .bind().
model_server_deployment: Deployment = serve.deployment(ModelServer)  # type: ignore[assignment]
