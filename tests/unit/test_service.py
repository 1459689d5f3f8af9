"""ModelService over the echo runner: n choices, seeds, limits, usage and stream merging."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from app.api.errors import InvalidRequestError, ModelNotFoundError, OverloadedError
from app.api.schemas import ChatCompletionRequest, CompletionRequest
from app.catalog.cards import ModelCard
from app.serving.runners.echo import EchoRunner
from app.serving.service import ModelService
from app.serving.streams import merge_streams


def service(**fields: object) -> ModelService:
    card = ModelCard.model_validate(
        {"id": "echo", "task": "text-generation", "loader": "echo"} | fields
    )
    runner = EchoRunner(card, None)
    runner.load()
    return ModelService(card, runner, clock=lambda: 1_700_000_000.0)


def chat(**fields: object) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "echo", "messages": [{"role": "user", "content": "a b c d"}]} | fields
    )


async def test_n_choices_and_usage() -> None:
    reply = await service().chat(chat(n=3, max_tokens=2))
    assert [c["index"] for c in reply["choices"]] == [0, 1, 2]
    assert {c["message"]["content"] for c in reply["choices"]} == {"a b "}
    assert reply["usage"]["completion_tokens"] == 6 and reply["created"] == 1_700_000_000


async def test_default_max_tokens_comes_from_card() -> None:
    reply = await service(generation={"max_tokens": 1}).chat(chat())
    assert reply["choices"][0]["finish_reason"] == "length"
    assert reply["usage"]["completion_tokens"] == 1


async def test_context_limit_and_wrong_model() -> None:
    tight = service(generation={"max_tokens": 4, "max_context_tokens": 5})
    with pytest.raises(InvalidRequestError) as caught:
        await tight.chat(chat())
    assert caught.value.code == "context_length_exceeded"
    with pytest.raises(ModelNotFoundError):
        await service().chat(chat(model="other"))


async def test_completion_indexes_follow_prompts_then_n() -> None:
    req = CompletionRequest.model_validate({"model": "echo", "prompt": ["x", "y"], "n": 2})
    reply = await service().completions(req)
    assert [c["text"] for c in reply["choices"]] == ["x", "x", "y", "y"]
    assert reply["usage"]["prompt_tokens"] == 2


async def test_admission_counts_and_releases() -> None:
    svc = service(max_ongoing_requests=1)
    with svc.admit():
        assert svc.inflight == 1
        with pytest.raises(OverloadedError), svc.admit():
            pass
    assert svc.inflight == 0


async def test_merge_streams_interleaves_and_propagates_errors() -> None:
    async def ticks(name: str, delay: float, count: int) -> AsyncIterator[str]:
        for i in range(count):
            await asyncio.sleep(delay)
            yield f"{name}{i}"

    merged = [item async for item in merge_streams([ticks("a", 0.001, 3), ticks("b", 0.0015, 2)])]
    assert sorted(merged) == [(0, "a0"), (0, "a1"), (0, "a2"), (1, "b0"), (1, "b1")]

    async def failing() -> AsyncIterator[str]:
        yield "x"
        raise ValueError("bad")

    with pytest.raises(ValueError, match="bad"):
        _ = [item async for item in merge_streams([failing(), ticks("b", 0.01, 5)])]


async def test_generated_tokens_count_unary_and_streamed_work() -> None:
    svc = service()
    reply = await svc.chat(chat(n=2, max_tokens=3))
    streamed = [c async for c in svc.chat_stream(chat(max_tokens=2, stream=True))]
    assert streamed and svc.generated_tokens == reply["usage"]["completion_tokens"] + 2 == 8
    assert svc.work_totals().tokens == 8 and svc.work_totals().images == 0
