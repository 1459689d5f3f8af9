"""Cancellation through ModelService (no Ray): a cancelled caller or a closed stream stops its
sequence within one decode step (its batch neighbours go on) or its image within one denoising
step, and frees its admission slots. Batching is LocalBatcher, serve.batch's stand-in outside a
replica; tests/integration/test_cancellation.py covers the same on real Ray Serve."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from app.api.schemas import ChatCompletionRequest, CompletionRequest, ImageGenerationRequest
from app.catalog.cards import ModelCard, load_catalogue
from app.catalog.engine import EngineKind, EngineSettings
from app.catalog.recipes import build_card
from app.serving.batching import LocalBatcher
from app.serving.engines.static import INLINE_STEPS_PER_YIELD
from app.serving.runners.base import GenerationRequest, ImageRequest, RowError, StepEntry
from app.serving.runners.echo import EchoRunner
from app.serving.runners.image import StableDiffusionRunner
from app.serving.runners.text import TransformersCausalLMRunner
from app.serving.service import ModelService

CATALOGUE = load_catalogue(Path(__file__).resolve().parents[2] / "models")
WORDS = " ".join(f"w{i}" for i in range(400))


class SteppedEcho(EchoRunner):
    """The echo runner as a blocking runner (batched, in a worker thread) whose steps take
    `step_s`; counts steps and the deltas it made for requests already cancelled."""

    blocking = True

    def __init__(self, card: ModelCard, step_s: float = 0.01) -> None:
        super().__init__(card, None)
        self.step_s = step_s
        self.steps = 0
        self.after_cancel = 0
        self.batch_sizes: list[int] = []

    def generate(self, batch: Sequence[GenerationRequest]) -> Iterator[list[StepEntry]]:
        self.batch_sizes.append(len(batch))
        for step in super().generate(batch):
            time.sleep(self.step_s)
            self.steps += 1
            late = [e for r, e in zip(batch, step, strict=True) if e and r.cancel.is_set()]
            self.after_cancel += len(late)
            yield step


class CountingLlama(TransformersCausalLMRunner):
    """The transformers runner, recording the batch size of every forward pass."""

    forwards: list[int]

    def _forward(self, input_ids: Any, *args: Any) -> Any:
        self.forwards.append(int(input_ids.shape[0]))
        return super()._forward(input_ids, *args)


class CountingSD(StableDiffusionRunner):
    """The diffusers runner, recording denoising steps and when a generate call returns."""

    steps: list[int]
    returned: threading.Event

    def _on_step_end(self, requests: list[ImageRequest], step: int) -> None:
        self.steps.append(step)
        super()._on_step_end(requests, step)

    def generate(self, batch: Sequence[ImageRequest]) -> list[list[bytes] | RowError]:
        try:
            return super().generate(batch)
        finally:
            self.returned.set()


def service(card: ModelCard, runner: Any) -> ModelService:
    return ModelService(card, runner, batcher=LocalBatcher(8, 0.05))


def echo_card(**fields: Any) -> ModelCard:
    base = {"id": "echo", "task": "text-generation", "loader": "echo"}
    return ModelCard.model_validate(base | {"generation": {"max_tokens": 400}} | fields)


def chat(model: str, content: str, **fields: Any) -> ChatCompletionRequest:
    messages = [{"role": "user", "content": content}]
    return ChatCompletionRequest.model_validate({"model": model, "messages": messages} | fields)


async def until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.005)


async def cancelled(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# --- text: the echo runner -----------------------------------------------------------------------


async def test_cancelled_chat_stops_at_once_and_its_neighbour_completes() -> None:
    card = echo_card()
    runner = SteppedEcho(card)
    svc = service(card, runner)
    long = asyncio.create_task(svc.chat(chat("echo", WORDS, max_tokens=400)))
    short = asyncio.create_task(svc.chat(chat("echo", WORDS, max_tokens=40)))
    await until(lambda: runner.steps >= 5)
    assert svc.inflight == 2
    await cancelled(long)
    assert svc.inflight == 1  # the cancelled request's slot is free at once
    reply = await short
    assert reply["usage"]["completion_tokens"] == 40
    assert runner.batch_sizes == [2]
    assert runner.after_cancel <= 1  # at most the step in flight when it was cancelled
    assert runner.steps == 40  # the batch ended with its live neighbour, not with 400 steps
    assert svc.inflight == 0


async def test_closed_stream_stops_generation() -> None:
    card = echo_card()
    runner = SteppedEcho(card)
    svc = service(card, runner)
    stream = svc.chat_stream(chat("echo", WORDS, max_tokens=400, stream=True))
    for _ in range(4):
        await anext(stream)
    assert svc.inflight == 1
    await stream.aclose()  # what a consumer that stops reading does
    assert svc.inflight == 0
    steps = runner.steps
    await asyncio.sleep(20 * runner.step_s)
    assert runner.steps <= steps + 1
    assert runner.steps < 40


async def test_cancelled_stream_reader_stops_every_sequence() -> None:
    card = echo_card()
    runner = SteppedEcho(card)
    svc = service(card, runner)
    request = CompletionRequest(model="echo", prompt=[WORDS, WORDS], n=2, max_tokens=400)
    received: list[Any] = []

    async def read() -> None:
        async for chunk in svc.completions_stream(request):
            received.append(chunk)

    reader = asyncio.create_task(read())
    await until(lambda: len(received) >= 8)
    assert svc.inflight == 4
    await cancelled(reader)
    assert svc.inflight == 0
    steps = runner.steps
    await asyncio.sleep(20 * runner.step_s)
    assert runner.steps <= steps + 1
    assert runner.after_cancel <= 4


async def test_cancelled_inline_echo_stops_early() -> None:
    """The echo runner itself runs on the event loop, unbatched; it yields every few steps."""
    card = echo_card(generation={"max_tokens": 8000, "max_context_tokens": 20000})
    svc = ModelService(card, EchoRunner(card, None))
    words = " ".join(f"w{i}" for i in range(8000))
    task = asyncio.create_task(svc.chat(chat("echo", words, max_tokens=8000)))
    await until(lambda: svc.generated_tokens > 0)
    at_cancel = svc.generated_tokens
    await cancelled(task)
    assert svc.generated_tokens <= at_cancel + INLINE_STEPS_PER_YIELD < 8000
    assert svc.inflight == 0


# --- text: the transformers runner ---------------------------------------------------------------


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> CountingLlama:
    card = CATALOGUE.get("tiny-llama")
    assert card is not None
    runner = CountingLlama(card, str(build_card(card, tmp_path_factory.mktemp("llama"))))
    runner.load()
    return runner


async def test_cancelled_llama_row_leaves_the_batch_within_one_step(llama: CountingLlama) -> None:
    # The static engine: both requests in one batch from its first step (the continuous
    # engine's cancellation is tested in test_engines).
    static = llama.card.model_copy(update={"engine": EngineSettings(kind=EngineKind.STATIC)})
    llama.forwards = []
    svc = service(static, llama)
    long = asyncio.create_task(svc.chat(chat("tiny-llama", "hi", max_tokens=300, temperature=0)))
    short_request = chat("tiny-llama", "hello", max_tokens=20, temperature=0)
    short = asyncio.create_task(svc.chat(short_request))
    await until(lambda: len(llama.forwards) >= 3)
    await cancelled(long)
    at_cancel = len(llama.forwards)
    reply = await short
    assert llama.forwards[0] == 2  # the two were batched
    assert set(llama.forwards[at_cancel + 1 :]) <= {1}  # cut from the batch within one step
    assert len(llama.forwards) <= 20  # the batch ended with the short one
    alone = ModelService(llama.card, llama, batcher=LocalBatcher(8, 0.0))
    assert reply["choices"] == (await alone.chat(short_request))["choices"]
    assert svc.inflight == 0


async def test_closed_llama_stream_stops_decoding(llama: CountingLlama) -> None:
    llama.forwards = []
    svc = service(llama.card, llama)
    stream = svc.chat_stream(chat("tiny-llama", "hi", max_tokens=300, temperature=0, stream=True))
    await until_chunks(stream, 3)
    await stream.aclose()
    assert svc.inflight == 0
    forwards = len(llama.forwards)
    await asyncio.sleep(0.5)
    assert len(llama.forwards) <= forwards + 1 < 300


async def until_chunks(stream: Any, count: int) -> None:
    for _ in range(count):
        await anext(stream)


# --- images --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> CountingSD:
    base = CATALOGUE.get("tiny-sd")
    assert base is not None
    card = ModelCard.model_validate(base.model_dump() | {"limits": {"max_inference_steps": 40}})
    runner = CountingSD(card, str(build_card(base, tmp_path_factory.mktemp("sd"))))
    runner.load()
    return runner


async def test_cancelled_image_stops_at_the_next_denoising_step(tiny_sd: CountingSD) -> None:
    tiny_sd.steps, tiny_sd.returned = [], threading.Event()
    svc = service(tiny_sd.card, tiny_sd)
    request = ImageGenerationRequest(model="tiny-sd", prompt="a cat", num_inference_steps=40)
    task = asyncio.create_task(svc.images(request))
    await until(lambda: len(tiny_sd.steps) >= 1)
    at_cancel = len(tiny_sd.steps)
    await cancelled(task)
    assert svc.inflight == 0
    await until(tiny_sd.returned.is_set)
    assert len(tiny_sd.steps) <= at_cancel + 1 < 40
    assert svc.generated_images == 0
