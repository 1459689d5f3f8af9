"""Python handles for other Ray jobs: typed requests in, OpenAI-shaped dicts out, streaming too.

    import ray
    from app.client import InferenceClient
    from app.api.schemas import ChatCompletionRequest

    ray.init(address="auto")
    client = InferenceClient()
    hello = [{"role": "user", "content": "hi"}]
    reply = client.chat(ChatCompletionRequest(model="echo", messages=hello))

Calls go straight to the model's own deployment handle (one hop, Serve's request routing), not
through the HTTP gateway.
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

Response = dict[str, Any]


class InferenceClient:
    """Sync and async access to every deployed model from any process connected to the cluster."""

    def __init__(self) -> None:
        self._handles: dict[str, DeploymentHandle] = {}

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

    def chat(self, req: ChatCompletionRequest) -> Response:
        return self.handle(req.model).chat.remote(req).result()

    def chat_stream(self, req: ChatCompletionRequest) -> Iterator[Response]:
        return iter(self._stream(req.model).chat_stream.remote(req))

    def completions(self, req: CompletionRequest) -> Response:
        return self.handle(req.model).completions.remote(req).result()

    def completions_stream(self, req: CompletionRequest) -> Iterator[Response]:
        return iter(self._stream(req.model).completions_stream.remote(req))

    def embeddings(self, req: EmbeddingRequest) -> Response:
        return self.handle(req.model).embeddings.remote(req).result()

    def images(self, req: ImageGenerationRequest) -> Response:
        return self.handle(req.model).images.remote(req).result()

    # ---- asynchronous (inside actors, deployments or asyncio drivers) ------------------------

    async def achat(self, req: ChatCompletionRequest) -> Response:
        return await self.handle(req.model).chat.remote(req)

    async def achat_stream(self, req: ChatCompletionRequest) -> AsyncIterator[Response]:
        async for chunk in self._stream(req.model).chat_stream.remote(req):
            yield chunk

    async def acompletions(self, req: CompletionRequest) -> Response:
        return await self.handle(req.model).completions.remote(req)

    async def aembeddings(self, req: EmbeddingRequest) -> Response:
        return await self.handle(req.model).embeddings.remote(req)

    async def aimages(self, req: ImageGenerationRequest) -> Response:
        return await self.handle(req.model).images.remote(req)
