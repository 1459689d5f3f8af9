"""What the HTTP surface records about each inference request (app.observability's catalogue):
its status and latency, a stream's time to first write and gaps between writes, and a refusal
for load (429 rate limit, 429/503 overload), labelled by model, region and base URL."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Collection
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from starlette.responses import Response

from app.api.errors import APIError, OverloadedError, RateLimitError
from app.observability.metrics import Base, Reason
from app.observability.recorder import Recorder, metrics

# Set by the routes while they handle an inference POST: the model it names ("" before the
# body is parsed), and whether the answer is a stream.
REQUEST_MODEL: ContextVar[str | None] = ContextVar("request_model", default=None)
STREAMED: ContextVar[bool] = ContextVar("request_streamed", default=False)

OTHER = "other"  # the label of any model id not in the catalogue (or not parsed yet)


@dataclass(frozen=True)
class RouteLabels:
    """How one route table's requests are labelled. Only catalogue ids become `model` labels:
    a client's arbitrary string would be a new series for as long as Ray runs."""

    base: Base
    region: str
    models: frozenset[str]

    @classmethod
    def of(cls, base: Base, region: str, models: Collection[str]) -> RouteLabels:
        return cls(base, region, frozenset(models))

    def model(self, requested: str | None) -> str:
        return requested if requested and requested in self.models else OTHER


class RequestObserver:
    """Records one route table's inference requests; `recorder` injected for tests."""

    def __init__(
        self,
        labels: RouteLabels,
        recorder: Recorder | None = None,
        on_overload: Callable[[], object] | None = None,
    ) -> None:
        self.labels = labels
        self._recorder = recorder
        self._on_overload = on_overload  # told of each refusal for load (system.overload)

    @property
    def recorder(self) -> Recorder:
        return self._recorder or metrics()

    def begin(self) -> float:
        REQUEST_MODEL.set(None)
        STREAMED.set(False)
        return time.perf_counter()

    def rejected(self, error: APIError) -> None:
        model = REQUEST_MODEL.get()
        if model is None:
            return
        reason = (
            Reason.RATE_LIMITED
            if isinstance(error, RateLimitError)
            else Reason.OVERLOADED
            if isinstance(error, OverloadedError) or error.status == 503
            else None
        )
        if reason is not None:
            labels = self.labels
            self.recorder.reject(labels.model(model), labels.region, labels.base, reason)
        if reason is Reason.OVERLOADED and self._on_overload is not None:
            self._on_overload()

    def finished(self, response: Response, started: float) -> Response:
        """Record the answer: at once when unary (or an error), at its last write when a
        stream (then its first write's time is the time to first token)."""
        requested = REQUEST_MODEL.get()
        if requested is None:  # not an inference request (GET routes)
            return response
        model, labels = self.labels.model(requested), self.labels
        now = time.perf_counter()
        iterator = getattr(response, "body_iterator", None)
        if not STREAMED.get() or response.status_code != 200:
            self.recorder.observe_request(
                model, labels.region, labels.base, response.status_code, now - started, stream=False
            )
            return response
        self.recorder.observe_first_token(model, labels.region, labels.base, now - started)
        if iterator is None:  # the whole stream was ready at once
            self.recorder.observe_request(
                model, labels.region, labels.base, 200, now - started, stream=True
            )
            return response
        response.body_iterator = self._timed(iterator, model, started)  # type: ignore[attr-defined]
        return response

    async def _timed(
        self, writes: AsyncIterator[Any], model: str, started: float
    ) -> AsyncIterator[Any]:
        labels, recorder = self.labels, self.recorder
        last: float | None = None
        try:
            async for piece in writes:
                now = time.perf_counter()
                if last is not None:  # the first piece is the head, timed as the first token
                    recorder.observe_inter_token(model, labels.region, labels.base, now - last)
                last = now
                yield piece
        finally:
            recorder.observe_request(
                model,
                labels.region,
                labels.base,
                200,
                time.perf_counter() - started,
                stream=True,
            )
