"""Python handles for other Ray jobs: typed requests in, OpenAI-shaped dicts out, streaming too.

    import ray
    from app.client import InferenceClient
    from app.api.schemas import ChatCompletionRequest

    ray.init(address="auto")
    client = InferenceClient()
    hello = [{"role": "user", "content": "hi"}]
    reply = client.chat(ChatCompletionRequest(model="echo", messages=hello))

Calls go straight to the model's own deployment handle (one hop), not through the HTTP gateway.
The fleet's request router places each call: near `region` (default: this process's node's
region), by the deployment's strategy unless `strategy` overrides it, and a call whose replica
dies or refuses it is retried on the next-best replica (streams only before their first chunk;
after a replica death, once at most). Replicas that keep failing this client's calls are
skipped for a while (per-replica circuit breakers, app.fleet.breaker). Time limits are the
model's own (its card's `timeouts`, enforced by the replica).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from ray import serve
from ray.serve.exceptions import RayServeException
from ray.serve.handle import DeploymentHandle

from app.api.errors import ModelNotFoundError
from app.api.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    ImageGenerationRequest,
)
from app.catalog.cards import deployment_name
from app.fleet.breaker import BreakerConfig, ReplicaBreakers
from app.fleet.failover import (
    call_with_failover,
    call_with_failover_sync,
    iterate_with_failover,
    stream_with_failover,
)
from app.fleet.hints import route_kwarg
from app.fleet.spec import FleetSpec, LoadBalancing, load_fleet

Response = dict[str, Any]


class InferenceClient:
    """Sync and async access to every deployed model from any process connected to the cluster.

    `region`/`zone` say where this client is (for geo routing), `strategy` overrides the
    deployments' routing strategy, `fleet` (a FleetSpec; default $APP_FLEET or the embedded
    one) gives the failover settings, `breaker` when a replica's circuit opens and for how
    long (default: the spec's load_balancing.breaker), and `api_key` a key the replicas check
    as they check an HTTP client's (callers inside the cluster may omit it).
    """

    def __init__(
        self,
        *,
        region: str | None = None,
        zone: str | None = None,
        strategy: str | None = None,
        fleet: FleetSpec | None = None,
        breaker: BreakerConfig | None = None,
        api_key: str | None = None,
    ) -> None:
        self._handles: dict[str, DeploymentHandle] = {}
        self._route = route_kwarg(region=region, zone=zone, strategy=strategy)
        self._balancing: LoadBalancing = (fleet or load_fleet()).load_balancing
        self._breaker = breaker or self._balancing.breaker
        self._breakers: dict[str, ReplicaBreakers] = {}  # per model, by replica
        # Checked by the replica like an HTTP client's key (401/403/429 and the key's limits);
        # callers inside the cluster may omit it.
        self._keyed: dict[str, str] = {"api_key": api_key} if api_key else {}

    def handle(self, model: str) -> DeploymentHandle:
        """The model's deployment handle; ModelNotFoundError if no application serves it."""
        handle = self._handles.get(model)
        if handle is None:
            try:
                handle = serve.get_app_handle(deployment_name(model))
            except RayServeException as exc:
                raise ModelNotFoundError(
                    f"no application serves model {model!r}", param="model"
                ) from exc
            self._handles[model] = handle
        return handle

    def breakers(self, model: str) -> ReplicaBreakers:
        """This client's circuit breakers for the model's replicas."""
        breakers = self._breakers.get(model)
        if breakers is None:
            breakers = self._breakers[model] = ReplicaBreakers(self._breaker)
        return breakers

    def _stream(self, model: str) -> Any:
        """The handle in streaming mode (its calls return DeploymentResponseGenerator)."""
        return self.handle(model).options(stream=True)

    def models(self) -> list[str]:
        """Model ids with a running application."""
        apps = serve.status().applications
        return sorted(
            name.removeprefix("model-")
            for name, app in apps.items()
            if name.startswith("model-") and app.status == "RUNNING"
        )

    # ---- synchronous -------------------------------------------------------------------------

    def _sync(self, method: str, req: Any) -> Response:
        handle = self.handle(req.model)
        return call_with_failover_sync(
            lambda route: getattr(handle, method).remote(req, route=route, **self._keyed),
            self._route,
            self._balancing,
            breakers=self.breakers(req.model),
        )

    def _sync_stream(self, method: str, req: Any) -> Iterator[Response]:
        handle = self._stream(req.model)
        return iterate_with_failover(
            lambda route: getattr(handle, method).remote(req, route=route, **self._keyed),
            self._route,
            self._balancing,
            breakers=self.breakers(req.model),
        )

    def chat(self, req: ChatCompletionRequest) -> Response:
        return self._sync("chat", req)

    def chat_stream(self, req: ChatCompletionRequest) -> Iterator[Response]:
        return self._sync_stream("chat_stream", req)

    def completions(self, req: CompletionRequest) -> Response:
        return self._sync("completions", req)

    def completions_stream(self, req: CompletionRequest) -> Iterator[Response]:
        return self._sync_stream("completions_stream", req)

    def embeddings(self, req: EmbeddingRequest) -> Response:
        return self._sync("embeddings", req)

    def images(self, req: ImageGenerationRequest) -> Response:
        return self._sync("images", req)

    # ---- asynchronous (inside actors, deployments or asyncio drivers) ------------------------

    async def _async(self, method: str, req: Any) -> Response:
        handle = self.handle(req.model)
        return await call_with_failover(
            lambda route: getattr(handle, method).remote(req, route=route, **self._keyed),
            self._route,
            self._balancing,
            breakers=self.breakers(req.model),
        )

    def _async_stream(self, method: str, req: Any) -> AsyncIterator[Response]:
        handle = self._stream(req.model)
        return stream_with_failover(
            lambda route: getattr(handle, method).remote(req, route=route, **self._keyed),
            self._route,
            self._balancing,
            breakers=self.breakers(req.model),
        )

    async def achat(self, req: ChatCompletionRequest) -> Response:
        return await self._async("chat", req)

    def achat_stream(self, req: ChatCompletionRequest) -> AsyncIterator[Response]:
        return self._async_stream("chat_stream", req)

    async def acompletions(self, req: CompletionRequest) -> Response:
        return await self._async("completions", req)

    def acompletions_stream(self, req: CompletionRequest) -> AsyncIterator[Response]:
        return self._async_stream("completions_stream", req)

    async def aembeddings(self, req: EmbeddingRequest) -> Response:
        return await self._async("embeddings", req)

    async def aimages(self, req: ImageGenerationRequest) -> Response:
        return await self._async("images", req)
