"""The Serve deployment class behind every model id: loads the card's runner and serves the OpenAI
API over HTTP (direct ingress) and over handles (gateway, other Ray jobs)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve import Deployment
from starlette.requests import Request
from starlette.responses import Response

from app.api.http import OpenAIRoutes, validate_request
from app.api.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    ImageGenerationRequest,
)
from app.api.sse import Chunk, SSEStream
from app.catalog.cards import ModelCard
from app.serving.runners import runner_class
from app.serving.service import ModelService

logger = logging.getLogger(__name__)


class ModelServer:
    """One replica of one model id. Handle methods take typed requests (or their dicts)."""

    def __init__(self, card: dict[str, Any], catalogue_dir: str, device: str = "cpu") -> None:
        parsed = ModelCard.model_validate(card)
        runner = runner_class(parsed.loader)(
            parsed, parsed.resolve_source(Path(catalogue_dir)), device
        )
        self.loaded = runner.load()
        self.service = ModelService(parsed, runner)
        logger.info("loaded %s on %s (%s)", parsed.id, self.loaded.device, self.loaded.dtype)
        self._routes = OpenAIRoutes(self)

    # ---- the Backend protocol (HTTP) and the handle API share these methods -----------------

    async def __call__(self, request: Request) -> Response:
        """HTTP entry point (Serve's direct ingress or proxy)."""
        return await self._routes(request)

    async def list_models(self) -> list[dict[str, Any]]:
        return [self.service.model_info()]

    async def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "model": self.service.card.id,
            "device": self.loaded.device,
            "inflight": self.service.inflight,
        }

    async def stats(self) -> dict[str, Any]:
        """Batching and load figures for `app status` and tests."""
        return self.service.stats() | {"model": self.service.card.id, "device": self.loaded.device}

    async def chat(self, req: ChatCompletionRequest | dict[str, Any]) -> dict[str, Any]:
        with self.service.admit():
            return await self.service.chat(validate_request(req, ChatCompletionRequest))

    async def chat_stream(
        self, req: ChatCompletionRequest | dict[str, Any]
    ) -> AsyncIterator[Chunk]:
        """Chunk dicts, for Python callers (`handle.options(stream=True)`)."""
        with self.service.admit():
            async for chunk in self.service.chat_stream(
                validate_request(req, ChatCompletionRequest)
            ):
                yield chunk

    def chat_sse(self, req: ChatCompletionRequest | dict[str, Any]) -> SSEStream:
        """Encoded, coalesced SSE writes: what this replica's HTTP route sends."""
        return SSEStream(self.chat_stream(req))

    async def relay_chat_sse(self, req: ChatCompletionRequest) -> AsyncIterator[bytes]:
        """The same writes over a streaming handle, for the gateway to forward untouched
        (Serve streams only from async generators)."""
        async for write in self.chat_sse(req):
            yield write

    async def completions(self, req: CompletionRequest | dict[str, Any]) -> dict[str, Any]:
        with self.service.admit():
            return await self.service.completions(validate_request(req, CompletionRequest))

    async def completions_stream(
        self, req: CompletionRequest | dict[str, Any]
    ) -> AsyncIterator[Chunk]:
        with self.service.admit():
            async for chunk in self.service.completions_stream(
                validate_request(req, CompletionRequest)
            ):
                yield chunk

    def completions_sse(self, req: CompletionRequest | dict[str, Any]) -> SSEStream:
        return SSEStream(self.completions_stream(req))

    async def relay_completions_sse(self, req: CompletionRequest) -> AsyncIterator[bytes]:
        async for write in self.completions_sse(req):
            yield write

    async def embeddings(self, req: EmbeddingRequest | dict[str, Any]) -> dict[str, Any]:
        with self.service.admit():
            return await self.service.embeddings(validate_request(req, EmbeddingRequest))

    async def images(self, req: ImageGenerationRequest | dict[str, Any]) -> dict[str, Any]:
        with self.service.admit():
            return await self.service.images(validate_request(req, ImageGenerationRequest))


# Decorated here rather than with @ so that ModelServer stays a plain, importable class (pickled by
# reference into replicas) while the builder gets a Deployment to .options() and .bind().
model_server_deployment: Deployment = serve.deployment(ModelServer)  # type: ignore[assignment]
