"""GatewaySender: a batch line sent through the gateway deployment's handle, so it takes the
same fleet routing, failover and model handles as an interactive request."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from functools import partial
from typing import Any

from pydantic import BaseModel
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from app.api.errors import (
    APIError,
    InvalidRequestError,
    NotFoundError,
    OverloadedError,
    ServiceUnavailableError,
)
from app.api.http import validate_request
from app.api.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from app.cache.policy import CACHE_STATUS_FIELD
from app.fleet.hints import BACKGROUND

logger = logging.getLogger(__name__)

# A batch line's url: the gateway method that answers it and the request model it validates.
METHODS: dict[str, tuple[str, type[BaseModel]]] = {
    "/v1/chat/completions": ("chat", ChatCompletionRequest),
    "/v1/completions": ("completions", CompletionRequest),
    "/v1/embeddings": ("embeddings", EmbeddingRequest),
}
OVERLOAD = frozenset({429, 503})
LOOKUP_RETRY_S = 5


def gateway_lookup(app: str | None = None) -> Callable[[], Any]:
    """`serve.get_app_handle` of the gateway application (a blocking call: run it in a
    thread). Imported late, so the sender itself needs no Serve client."""
    from ray import serve

    from app.serving.builder import GATEWAY_APP

    return partial(serve.get_app_handle, app or GATEWAY_APP)


class GatewaySender:
    """A LineSender (app.batches.runner). `lookup()` gives the gateway's handle (any object
    whose `.chat.remote(req)` etc. return awaitables); it is called in a thread, once, and
    again after a failure. A 4xx or 5xx answer is returned as (status, OpenAI error body);
    429/503 raise (OverloadedError, ServiceUnavailableError) with `retry_after_s`, so the
    runner backs off instead of recording them."""

    def __init__(
        self, lookup: Callable[[], Any] | None = None, *, timeout_s: float | None = None
    ) -> None:
        self._lookup = lookup or gateway_lookup()
        self.timeout_s = timeout_s
        self._handle: Any = None

    async def send(self, url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        try:
            method, req = self._request(url, body)
        except APIError as exc:  # the line's own fault: its result, never retried
            return exc.status, exc.body()
        handle = await self._gateway()
        try:
            answer = await asyncio.wait_for(
                getattr(handle, method).remote(req, priority=BACKGROUND), self.timeout_s
            )
        except Exception as exc:
            error = _api_error(exc)
            if error is None:
                raise  # the runner retries it, then reports it
            if error.status in OVERLOAD:
                raise error from exc
            return error.status, error.body()
        if isinstance(answer, dict):
            answer.pop(CACHE_STATUS_FIELD, None)  # an HTTP client gets it as X-Cache instead
        return 200, answer

    def _request(self, url: str, body: dict[str, Any]) -> tuple[str, BaseModel]:
        route = METHODS.get(url)
        if route is None:
            raise NotFoundError(f"no route for POST {url}; batches run {', '.join(METHODS)}")
        if isinstance(body, dict) and body.get("stream"):
            raise InvalidRequestError("batch requests cannot stream", param="stream")
        method, schema = route
        return method, validate_request(body, schema)

    async def _gateway(self) -> Any:
        if self._handle is None:
            try:
                self._handle = await asyncio.to_thread(self._lookup)
            except Exception as exc:
                logger.warning("batch lines wait: no gateway handle (%r)", exc)
                raise ServiceUnavailableError(
                    "the gateway application is not running", retry_after_s=LOOKUP_RETRY_S
                ) from exc
        return self._handle


def _api_error(exc: BaseException) -> APIError | None:
    """What a failed handle call means as an API error; None for anything else (a bug, a
    timeout). The gateway's own errors come wrapped in Ray's RayTaskError (its `cause`)."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, APIError):
        return cause
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, BackPressureError):
        return OverloadedError("the gateway is at capacity; retry shortly", retry_after_s=1)
    if isinstance(exc, DeploymentUnavailableError | RayActorError):
        return ServiceUnavailableError("no gateway replica is available", retry_after_s=2)
    return None
