"""app.batches.sender over a fake gateway handle: a line validated and answered, a bad or
streaming line as a 400 result, the gateway's 4xx as a result, 429/503 raised with their
Retry-After (also when Ray wraps them), and a missing gateway as a 503 to back off from."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

import pytest
from ray.exceptions import RayTaskError
from ray.serve.exceptions import BackPressureError

from app.api.errors import (
    APIError,
    ModelNotFoundError,
    OverloadedError,
    RequestTimeoutError,
    ServiceUnavailableError,
)
from app.api.schemas import ChatCompletionRequest, EmbeddingRequest
from app.batches.sender import GatewaySender

CHAT = "/v1/chat/completions"
BODY = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}


class Method:
    def __init__(self, handle: FakeHandle, name: str) -> None:
        self.handle = handle
        self.name = name

    def remote(self, req: Any, priority: str | None = None) -> Awaitable[Any]:
        assert priority == "background"  # batch lines are admitted within the batch share
        self.handle.calls.append((self.name, req))
        return self.handle.answer(req)


class FakeHandle:
    """The gateway handle: `.chat.remote(req)` etc. return awaitables; `fail` is raised."""

    def __init__(self, fail: BaseException | None = None) -> None:
        self.fail = fail
        self.calls: list[tuple[str, Any]] = []
        self.chat = Method(self, "chat")
        self.completions = Method(self, "completions")
        self.embeddings = Method(self, "embeddings")

    async def answer(self, req: Any) -> dict[str, Any]:
        if self.fail is not None:
            raise self.fail
        return {"object": "chat.completion", "model": req.model, "x_cache": "MISS"}


def sender(handle: Any) -> GatewaySender:
    return GatewaySender(lambda: handle)


async def test_a_line_goes_to_the_method_of_its_url_validated() -> None:
    handle = FakeHandle()
    status, body = await sender(handle).send(CHAT, BODY)
    assert status == 200
    assert body == {"object": "chat.completion", "model": "echo"}  # no x_cache field
    (name, req), *_ = handle.calls
    assert name == "chat" and isinstance(req, ChatCompletionRequest)
    await sender(handle).send("/v1/embeddings", {"model": "e", "input": "x"})
    assert handle.calls[-1][0] == "embeddings" and isinstance(handle.calls[-1][1], EmbeddingRequest)


@pytest.mark.parametrize(
    ("url", "body", "status", "param"),
    [
        (CHAT, {"model": "echo"}, 400, "messages"),
        (CHAT, BODY | {"temperature": "hot"}, 400, "temperature"),
        (CHAT, BODY | {"stream": True}, 400, "stream"),
        ("/v1/images/generations", {"model": "m", "prompt": "p"}, 404, None),
    ],
)
async def test_a_bad_line_is_its_own_result_and_never_sent(
    url: str, body: dict[str, Any], status: int, param: str | None
) -> None:
    handle = FakeHandle()
    got, error = await sender(handle).send(url, body)
    assert got == status
    assert set(error["error"]) == {"message", "type", "param", "code"}
    assert error["error"]["param"] == param
    assert handle.calls == []


async def test_a_gateway_4xx_or_5xx_is_the_lines_result() -> None:
    missing = ModelNotFoundError("the model 'nope' does not exist", param="model")
    status, body = await sender(FakeHandle(missing)).send(CHAT, BODY)
    assert status == 404
    assert body["error"]["code"] == "model_not_found"
    status, body = await sender(FakeHandle(RequestTimeoutError("slow"))).send(CHAT, BODY)
    assert status == 504 and body["error"]["code"] == "request_timeout"


@pytest.mark.parametrize(
    "error",
    [OverloadedError("full", retry_after_s=3), ServiceUnavailableError("none", retry_after_s=3)],
)
async def test_overload_raises_with_retry_after(error: APIError) -> None:
    with pytest.raises(type(error)) as raised:
        await sender(FakeHandle(error)).send(CHAT, BODY)
    assert raised.value.retry_after_s == 3


async def test_errors_wrapped_by_ray_are_unwrapped() -> None:
    cause = OverloadedError("full", retry_after_s=2)
    wrapped = RayTaskError("chat", "traceback", cause).as_instanceof_cause()
    with pytest.raises(OverloadedError) as raised:
        await sender(FakeHandle(wrapped)).send(CHAT, BODY)
    assert raised.value is cause
    wrapped = RayTaskError("chat", "traceback", ModelNotFoundError("gone")).as_instanceof_cause()
    assert (await sender(FakeHandle(wrapped)).send(CHAT, BODY))[0] == 404


async def test_serve_backpressure_is_an_overload() -> None:
    with pytest.raises(OverloadedError) as raised:
        await sender(
            FakeHandle(BackPressureError(num_queued_requests=5, max_queued_requests=5))
        ).send(CHAT, BODY)
    assert raised.value.retry_after_s == 1


async def test_other_failures_raise_for_the_runner_to_retry() -> None:
    with pytest.raises(RuntimeError):
        await sender(FakeHandle(RuntimeError("bug"))).send(CHAT, BODY)


async def test_no_gateway_is_a_503_and_looked_up_again() -> None:
    handle = FakeHandle()
    answers: list[Any] = [LookupError("Application 'gateway' does not exist."), handle]

    def lookup() -> Any:
        got = answers.pop(0)
        if isinstance(got, Exception):
            raise got
        return got

    s = GatewaySender(lookup)
    with pytest.raises(ServiceUnavailableError) as raised:
        await s.send(CHAT, BODY)
    assert raised.value.retry_after_s is not None
    assert (await s.send(CHAT, BODY))[0] == 200
    assert (await s.send(CHAT, BODY))[0] == 200  # the handle is kept
    assert answers == []


async def test_a_line_past_its_timeout_raises() -> None:
    class Slow(FakeHandle):
        async def answer(self, req: Any) -> dict[str, Any]:
            import asyncio

            await asyncio.sleep(10)
            return {}

    with pytest.raises(TimeoutError):
        await GatewaySender(lambda: Slow(), timeout_s=0.05).send(CHAT, BODY)
