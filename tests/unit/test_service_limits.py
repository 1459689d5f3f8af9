"""ModelService's bounds on a request's cost: the card's limits (a 400 naming the parameter, the
limit and the card field), admission by sequences, seeds, and a failing row's isolation."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from app.api.errors import InvalidRequestError, OverloadedError
from app.api.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    ImageGenerationRequest,
)
from app.catalog.cards import ModelCard
from app.serving.batching import LocalBatcher
from app.serving.limits import check_embeddings
from app.serving.runners.base import (
    GenerationRequest,
    ImageRequest,
    ImageRunner,
    LoadedInfo,
    RowError,
    StepEntry,
)
from app.serving.runners.echo import EchoRunner
from app.serving.service import ModelService


class CountingEcho(EchoRunner):
    """The echo runner, counting tokeniser and template calls and the threads they run on."""

    def __init__(self, card: ModelCard) -> None:
        super().__init__(card, None)
        self.tokenizer_calls = 0
        self.on_main_thread: list[bool] = []

    def count_tokens(self, text: str) -> int:
        self.tokenizer_calls += 1
        self.on_main_thread.append(threading.current_thread() is threading.main_thread())
        return super().count_tokens(text)

    def render_chat(self, messages: Sequence[dict[str, str]]) -> str:
        self.tokenizer_calls += 1
        return super().render_chat(messages)


class BatchedEcho(CountingEcho):
    """The echo runner as a blocking runner: batched, called from a worker thread, each step
    taking `step_s`. A prompt that starts with "poison" fails its row alone."""

    blocking = True
    step_s = 0.005

    def generate(self, batch: Sequence[GenerationRequest]) -> Iterator[list[StepEntry]]:
        poisoned = [r.prompt.startswith("poison") for r in batch]
        for index, step in enumerate(super().generate(batch)):
            time.sleep(self.step_s)
            yield [
                (RowError(ValueError("poisoned")) if index == 0 else None) if bad else entry
                for bad, entry in zip(poisoned, step, strict=True)
            ]


class SlowEcho(BatchedEcho):
    step_s = 0.02


class PriorityEcho(CountingEcho):
    """The echo runner, recording whether each request it decodes is batch work."""

    def generate(self, batch: Sequence[GenerationRequest]) -> Iterator[list[StepEntry]]:
        self.seen = [*getattr(self, "seen", []), *(r.background for r in batch)]
        return super().generate(batch)


def card(**fields: Any) -> ModelCard:
    return ModelCard.model_validate(
        {"id": "echo", "task": "text-generation", "loader": "echo"} | fields
    )


def service(runner_type: type[CountingEcho] = CountingEcho, **fields: Any) -> ModelService:
    model = card(**fields)
    runner = runner_type(model)
    return ModelService(model, runner, batcher=LocalBatcher(8, 0.02))


def chat(content: str = "a b c d", **fields: Any) -> ChatCompletionRequest:
    messages = [{"role": "user", "content": content}]
    return ChatCompletionRequest.model_validate({"model": "echo", "messages": messages} | fields)


def completion(prompt: str | list[str], **fields: Any) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "echo", "prompt": prompt} | fields)


async def refused(call: Any, param: str, *fragments: str) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as caught:
        await call
    assert caught.value.param == param and caught.value.status == 400
    for fragment in fragments:
        assert fragment in caught.value.message
    return caught.value


# --- text limits ---------------------------------------------------------------------------------


async def test_fifty_thousand_prompts_are_refused_before_any_tokenising() -> None:
    svc = service()
    started = time.monotonic()
    huge = completion(["x"] * 50_000, n=16)
    await refused(svc.completions(huge), "prompt", "at most 16 prompts", "limits.max_prompts")
    assert time.monotonic() - started < 1.0
    assert svc.runner.tokenizer_calls == 0  # type: ignore[attr-defined]
    assert svc.inflight == 0


async def test_sequences_are_prompts_times_n() -> None:
    svc = service()
    await refused(svc.completions(completion(["a", "b", "c"], n=6)), "n", "18 sequences")
    four = service(limits={"max_sequences": 4})
    await refused(four.chat(chat(n=5)), "n", "at most 4", "limits.max_sequences")
    raised = service(limits={"max_sequences": 32, "max_prompts": 32})
    reply = await raised.completions(completion(["a"] * 16, n=2))
    assert len(reply["choices"]) == 32
    # max_ongoing_requests caps it too: every sequence holds one of the replica's slots.
    small = service(max_ongoing_requests=4)
    await refused(small.chat(chat(n=5)), "n", "max_ongoing_requests")


async def test_messages_stops_and_characters() -> None:
    svc = service(limits={"max_messages": 2})
    many = ChatCompletionRequest.model_validate(
        {"model": "echo", "messages": [{"role": "user", "content": "x"}] * 3}
    )
    await refused(svc.chat(many), "messages", "at most 2 messages", "limits.max_messages")
    await refused(
        svc.chat(chat(stop=["a", "b", "c", "d", "e"])), "stop", "limits.max_stop_sequences"
    )
    await refused(svc.chat(chat(stop="z" * 65)), "stop", "65 characters", "limits.max_stop_length")
    assert (await service(limits={"max_stop_sequences": 8}).chat(chat(stop=["q"] * 8)))["choices"]
    tight = service(generation={"max_context_tokens": 4})  # 16 characters per context token
    long_text = "word " * 20
    await refused(tight.chat(chat(long_text)), "messages", "100 characters", "at most 64")
    await refused(tight.completions(completion([long_text])), "prompt", "limits.max_input_chars")
    assert tight.runner.tokenizer_calls == 0  # type: ignore[attr-defined]


async def test_long_inputs_are_tokenised_off_the_event_loop() -> None:
    svc = service(generation={"max_tokens": 1})
    await svc.completions(completion(["short", "long " * 2000]))
    assert svc.runner.on_main_thread == [True, False]  # type: ignore[attr-defined]


async def test_seed_near_the_top_wraps_for_later_sequences() -> None:
    reply = await service().chat(chat(n=3, seed=2**63 - 1))
    assert len(reply["choices"]) == 3


# --- admission ---------------------------------------------------------------------------------


async def test_a_request_takes_one_slot_per_sequence() -> None:
    svc = service(SlowEcho, max_ongoing_requests=10, limits={"max_sequences": 10})
    long = chat(" ".join(f"w{i}" for i in range(100)), n=8, max_tokens=40)
    running = asyncio.create_task(svc.chat(long))
    await until(lambda: svc.inflight == 8)
    with pytest.raises(OverloadedError, match="8 of 10 sequences"):
        await svc.chat(chat(n=3))
    with svc.admit():  # as a replica admits a request before parsing it
        reply = await svc.chat(chat(n=2))  # 1 + 1 more: fits
    assert len(reply["choices"]) == 2
    assert len((await running)["choices"]) == 8
    assert svc.inflight == 0


async def test_admitted_request_grows_its_ticket_and_releases_it() -> None:
    svc = service(max_ongoing_requests=4)
    with svc.admit():
        assert svc.inflight == 1
        stream = svc.chat_stream(chat(n=3, stream=True))
        await anext(stream)
        assert svc.inflight == 3
        await stream.aclose()
        assert svc.inflight == 1
    assert svc.inflight == 0


# --- a failing row fails alone -------------------------------------------------------------------


async def test_a_bad_row_fails_only_itself() -> None:
    svc = service(BatchedEcho)
    bad = asyncio.create_task(svc.chat(chat("poison pill here")))
    good = asyncio.create_task(svc.chat(chat("perfectly fine words")))
    with pytest.raises(InvalidRequestError, match="poisoned"):
        await bad
    assert (await good)["choices"][0]["message"]["content"] == "perfectly fine words"
    assert svc.largest_batch == 2 and svc.inflight == 0


# --- images ------------------------------------------------------------------------------------


class FakeImages(ImageRunner):
    """An image runner that draws nothing: tiny placeholder bytes per image."""

    def load(self) -> LoadedInfo:
        return LoadedInfo(device="cpu", dtype="none")

    def generate(self, batch: Sequence[ImageRequest]) -> list[list[bytes] | RowError]:
        return [[b"png"] * request.n for request in batch]


def image_service(**fields: Any) -> ModelService:
    base = {"id": "pics", "task": "text-to-image", "loader": "diffusers-stable-diffusion"}
    model = ModelCard.model_validate(base | fields)
    return ModelService(model, FakeImages(model, None), batcher=LocalBatcher(4, 0.0))


def image(**fields: Any) -> ImageGenerationRequest:
    return ImageGenerationRequest.model_validate({"model": "pics", "prompt": "a cat"} | fields)


async def test_image_size_and_steps_default_to_the_cards_defaults() -> None:
    svc = image_service()
    await refused(svc.images(image(size="512x512")), "size", "262144 pixels", "64x64")
    await refused(
        svc.images(image(num_inference_steps=50)),
        "num_inference_steps",
        "at most 2 denoising steps",
        "limits.max_inference_steps",
    )
    await refused(svc.images(image(n=5)), "n", "image.max_images")
    assert len((await svc.images(image(size="32x128")))["data"]) == 1  # as many pixels
    raised = image_service(limits={"max_image_size": "512x512", "max_inference_steps": 50})
    assert (await raised.images(image(size="512x512", num_inference_steps=50)))["data"]
    assert raised.inflight == 0


async def until(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


def test_embedding_inputs_are_bounded_in_count_and_length() -> None:
    model = ModelCard.model_validate(
        {
            "id": "emb",
            "task": "embedding",
            "loader": "sentence-transformers",
            "batching": {"max_batch_size": 4},
            "limits": {"max_inputs": 10, "max_input_chars": 50},
            "max_ongoing_requests": 2,
        }
    )
    assert check_embeddings(model, EmbeddingRequest(model="emb", input=["a"] * 4)) == 1
    assert check_embeddings(model, EmbeddingRequest(model="emb", input=["a"] * 5)) == 2
    # One slot per batch of inputs, never more than the replica has.
    assert check_embeddings(model, EmbeddingRequest(model="emb", input=["a"] * 10)) == 2
    with pytest.raises(InvalidRequestError, match=r"at most 10 inputs.*limits\.max_inputs") as many:
        check_embeddings(model, EmbeddingRequest(model="emb", input=["a"] * 11))
    assert many.value.param == "input"
    with pytest.raises(InvalidRequestError, match="input 1 has 51 characters") as long:
        check_embeddings(model, EmbeddingRequest(model="emb", input=["a", "b" * 51]))
    assert long.value.param == "input"


async def test_batch_work_reaches_the_engine_marked_as_background() -> None:
    svc = service(PriorityEcho)
    with svc.admit(background=True):
        await svc.chat(chat("a"))
    with svc.admit():
        await svc.chat(chat("b"))
    await svc.completions(completion("c"))  # no admission around it: interactive
    assert isinstance(svc.runner, PriorityEcho)
    assert svc.runner.seen == [True, False, False]


def test_batch_work_is_admitted_within_its_share_of_the_slots() -> None:
    from app.serving.admission import Admission

    admission = Admission("m", capacity=8, background_share=0.25)
    with admission.admit(background=True), admission.admit(background=True):
        with (
            pytest.raises(OverloadedError, match="the share batch work may use"),
            admission.admit(background=True),
        ):
            pass
        # Interactive requests still find the other six slots.
        with admission.admit(6):
            assert admission.inflight == 8
    assert admission.inflight == 0
    # A batch request cannot grow past the share with its later sequences either.
    with admission.admit(background=True), pytest.raises(OverloadedError), admission.hold(3):
        pass
