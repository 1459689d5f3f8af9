"""The OpenAI operations of one model: validation against its card, batching into its runner,
and the response and stream-chunk objects. No Ray and no HTTP here, so it is tested directly."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from functools import cached_property
from typing import TYPE_CHECKING, Any

from ray import serve

from app.api.errors import InternalError, InvalidRequestError, ModelNotFoundError, OverloadedError
from app.api.responses import (
    chat_choice,
    encode_vector,
    model_object,
    new_id,
    parse_size,
    text_choice,
    usage,
)
from app.api.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    ImageGenerationRequest,
)
from app.api.sse import Chunk
from app.autoscaling.report import WorkTotals
from app.catalog.cards import ModelCard, Task
from app.serving.runners.base import (
    EmbeddingRunner,
    GenerationRequest,
    ImageRequest,
    ImageRunner,
    Runner,
    TextGenerationRunner,
    TokenDelta,
)
from app.serving.streams import merge_streams

if TYPE_CHECKING:
    from app.cache.responses import ResponseCache

MAX_IMAGE_SIDE = 1024


class ModelService:
    """Serves one model card through one runner; every public method is one OpenAI operation."""

    def __init__(
        self,
        card: ModelCard,
        runner: Runner,
        *,
        clock: Callable[[], float] = time.time,
        response_cache: ResponseCache | None = None,
    ) -> None:
        self.card = card
        self.runner = runner
        # Deterministic unary responses (greedy chat and completions, embeddings) come from
        # here when cached; streams are always computed (see README, "Cache").
        self.response_cache = response_cache
        self._clock = clock
        self._inflight = 0
        self.created = int(clock())
        self.batches = 0
        self.batched_requests = 0
        self.largest_batch = 0
        self.generated_tokens = 0  # produced here, not served from the response cache
        self.generated_images = 0

    # serve.batch needs a replica context, so the batchers are made on first use (inside Serve);
    # they are per instance because serve.batch on a method would share one queue per class.
    @cached_property
    def _decode(self) -> Callable[[GenerationRequest], AsyncIterator[TokenDelta | None]]:
        return self._batcher()(self._decode_batch)

    @cached_property
    def _embed(self) -> Callable[[str], Awaitable[list[float]]]:
        return self._batcher()(self._embed_batch)

    @cached_property
    def _draw(self) -> Callable[[ImageRequest], Awaitable[list[bytes]]]:
        return self._batcher()(self._draw_batch)

    def _batcher(self) -> Callable[[Callable[..., Any]], Any]:
        return serve.batch(
            max_batch_size=self.card.batching.max_batch_size,
            batch_wait_timeout_s=self.card.batching.wait_timeout_s,
        )

    def _count_batch(self, size: int) -> None:
        self.batches += 1
        self.batched_requests += size
        self.largest_batch = max(self.largest_batch, size)

    def stats(self) -> dict[str, Any]:
        return {
            "inflight": self._inflight,
            "batches": self.batches,
            "batched_requests": self.batched_requests,
            "largest_batch": self.largest_batch,
            "generated_tokens": self.generated_tokens,
            "generated_images": self.generated_images,
        }

    def work_totals(self) -> WorkTotals:
        """Running totals for the autoscaling report (app.autoscaling.report)."""
        return WorkTotals(
            self.batches, self.batched_requests, self.generated_tokens, self.generated_images
        )

    # ---- admission and identity -------------------------------------------------------------

    @contextmanager
    def admit(self) -> Iterator[None]:
        """Count a request in flight; beyond the card's max_ongoing_requests answer 429."""
        if self._inflight >= self.card.max_ongoing_requests:
            raise OverloadedError(
                f"model {self.card.id!r} is at capacity "
                f"({self.card.max_ongoing_requests} requests in flight); retry shortly",
                retry_after_s=1,
            )
        self._inflight += 1
        try:
            yield
        finally:
            self._inflight -= 1

    @property
    def inflight(self) -> int:
        return self._inflight

    def model_info(self) -> dict[str, Any]:
        return model_object(self.card, self.created)

    def _check(self, model: str, task: Task, endpoint: str) -> None:
        if model != self.card.id:
            raise ModelNotFoundError(
                f"the model {model!r} does not exist here; this endpoint serves {self.card.id!r}",
                param="model",
            )
        if self.card.task != task:
            raise InvalidRequestError(
                f"model {self.card.id!r} is a {self.card.task.value} model and does not "
                f"support {endpoint}",
                param="model",
                code="model_not_supported",
            )

    # ---- text generation --------------------------------------------------------------------

    @property
    def _text(self) -> TextGenerationRunner:
        assert isinstance(self.runner, TextGenerationRunner)
        return self.runner

    def _generation_requests(
        self, prompt: str, req: ChatCompletionRequest | CompletionRequest, param: str
    ) -> tuple[int, list[GenerationRequest]]:
        prompt_tokens = self._text.count_tokens(prompt)
        max_tokens = req.token_limit() or self.card.generation.max_tokens
        limit = self.card.generation.max_context_tokens
        if prompt_tokens + max_tokens > limit:
            raise InvalidRequestError(
                f"this model's maximum context length is {limit} tokens; the request asks for "
                f"{prompt_tokens} prompt tokens plus {max_tokens} completion tokens",
                param=param,
                code="context_length_exceeded",
            )
        requests = [
            GenerationRequest(
                prompt=prompt,
                max_tokens=max_tokens,
                temperature=req.temperature,
                top_p=req.top_p,
                stop=req.stop_sequences(),
                seed=None if req.seed is None else req.seed + i,
            )
            for i in range(req.n)
        ]
        return prompt_tokens, requests

    async def _decode_batch(self, batch: list[GenerationRequest]) -> AsyncIterator[list[Any]]:
        self._count_batch(len(batch))
        steps = self._text.generate(batch)
        finished = [False] * len(batch)
        while True:
            step = await asyncio.to_thread(next, steps, None)
            if step is None:
                return
            out: list[Any] = []
            for i, delta in enumerate(step):
                out.append(StopIteration if finished[i] else delta)
                finished[i] = finished[i] or (delta is not None and delta.finish_reason is not None)
            yield out

    async def _deltas(self, request: GenerationRequest) -> AsyncIterator[TokenDelta]:
        try:
            if not self.runner.blocking:
                # No model compute to amortise: batching would only add queueing.
                for (delta,) in self._text.generate([request]):
                    if delta is not None:
                        self.generated_tokens += delta.tokens
                        yield delta
                return
            async for delta in self._decode(request):
                if delta is not None:
                    self.generated_tokens += delta.tokens
                    yield delta
        except (InvalidRequestError, OverloadedError):
            raise
        except ValueError as exc:
            raise InvalidRequestError(str(exc)) from exc
        except Exception as exc:
            raise InternalError(f"generation failed: {type(exc).__name__}: {exc}") from exc

    async def _collect(self, request: GenerationRequest) -> tuple[str, int, str]:
        text, tokens, finish = [], 0, "stop"
        async for delta in self._deltas(request):
            text.append(delta.text)
            tokens += delta.tokens
            finish = delta.finish_reason or finish
        return "".join(text), tokens, finish

    async def _cached(
        self, operation: str, req: Any, compute: Callable[[], Awaitable[dict[str, Any]]]
    ) -> dict[str, Any]:
        if self.response_cache is None:
            return await compute()
        return await self.response_cache.serve(operation, req, compute)

    async def chat(self, req: ChatCompletionRequest) -> dict[str, Any]:
        self._check(req.model, Task.TEXT_GENERATION, "chat completions")
        return await self._cached("chat", req, lambda: self._chat(req))

    async def _chat(self, req: ChatCompletionRequest) -> dict[str, Any]:
        prompt = self._text.render_chat(req.message_dicts())
        prompt_tokens, requests = self._generation_requests(prompt, req, "messages")
        results = await asyncio.gather(*(self._collect(r) for r in requests))
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish,
            }
            for i, (text, _, finish) in enumerate(results)
        ]
        completion_tokens = sum(tokens for _, tokens, _ in results)
        return {
            "id": new_id("chatcmpl"),
            "object": "chat.completion",
            "created": int(self._clock()),
            "model": self.card.id,
            "choices": choices,
            "usage": usage(prompt_tokens, completion_tokens),
            "system_fingerprint": None,
        }

    async def chat_stream(self, req: ChatCompletionRequest) -> AsyncIterator[Chunk]:
        """Chunks in OpenAI's chat.completion.chunk format; validation errors raise on the first
        iteration, before any chunk, so the caller can still answer with an HTTP error."""
        self._check(req.model, Task.TEXT_GENERATION, "chat completions")
        prompt = self._text.render_chat(req.message_dicts())
        prompt_tokens, requests = self._generation_requests(prompt, req, "messages")
        async for chunk in self._chat_chunks(req, prompt_tokens, requests):
            yield chunk

    async def _chat_chunks(
        self, req: ChatCompletionRequest, prompt_tokens: int, requests: list[GenerationRequest]
    ) -> AsyncIterator[Chunk]:
        base = {
            "id": new_id("chatcmpl"),
            "object": "chat.completion.chunk",
            "created": int(self._clock()),
            "model": self.card.id,
            "system_fingerprint": None,
        }
        for i in range(len(requests)):
            yield base | {"choices": [chat_choice(i, {"role": "assistant", "content": ""})]}
        completion_tokens = 0
        async for i, delta in merge_streams([self._deltas(r) for r in requests]):
            completion_tokens += delta.tokens
            if delta.text:
                yield base | {"choices": [chat_choice(i, {"content": delta.text})]}
            if delta.finish_reason:
                yield base | {"choices": [chat_choice(i, {}, delta.finish_reason)]}
        if req.include_usage:
            yield base | {"choices": [], "usage": usage(prompt_tokens, completion_tokens)}

    async def completions(self, req: CompletionRequest) -> dict[str, Any]:
        self._check(req.model, Task.TEXT_GENERATION, "completions")
        return await self._cached("completions", req, lambda: self._completions(req))

    async def _completions(self, req: CompletionRequest) -> dict[str, Any]:
        plans = [self._generation_requests(p, req, "prompt") for p in req.prompts()]
        requests = [r for _, rs in plans for r in rs]
        results = await asyncio.gather(*(self._collect(r) for r in requests))
        choices = [
            {
                "index": i,
                "text": (r.prompt + text) if req.echo else text,
                "logprobs": None,
                "finish_reason": finish,
            }
            for i, (r, (text, _, finish)) in enumerate(zip(requests, results, strict=True))
        ]
        return {
            "id": new_id("cmpl"),
            "object": "text_completion",
            "created": int(self._clock()),
            "model": self.card.id,
            "choices": choices,
            "usage": usage(sum(p for p, _ in plans), sum(t for _, t, _ in results)),
            "system_fingerprint": None,
        }

    async def completions_stream(self, req: CompletionRequest) -> AsyncIterator[Chunk]:
        self._check(req.model, Task.TEXT_GENERATION, "completions")
        plans = [self._generation_requests(p, req, "prompt") for p in req.prompts()]
        async for chunk in self._completion_chunks(req, plans):
            yield chunk

    async def _completion_chunks(
        self, req: CompletionRequest, plans: list[tuple[int, list[GenerationRequest]]]
    ) -> AsyncIterator[Chunk]:
        requests = [r for _, rs in plans for r in rs]
        base = {
            "id": new_id("cmpl"),
            "object": "text_completion",
            "created": int(self._clock()),
            "model": self.card.id,
            "system_fingerprint": None,
        }
        if req.echo:
            for i, r in enumerate(requests):
                yield base | {"choices": [text_choice(i, r.prompt)]}
        completion_tokens = 0
        async for i, delta in merge_streams([self._deltas(r) for r in requests]):
            completion_tokens += delta.tokens
            yield base | {"choices": [text_choice(i, delta.text, delta.finish_reason)]}
        if req.include_usage:
            prompt_tokens = sum(p for p, _ in plans)
            yield base | {"choices": [], "usage": usage(prompt_tokens, completion_tokens)}

    # ---- embeddings -------------------------------------------------------------------------

    async def _embed_batch(self, texts: list[str]) -> list[list[float]]:
        assert isinstance(self.runner, EmbeddingRunner)
        self._count_batch(len(texts))
        return await asyncio.to_thread(self.runner.embed, texts)

    async def embeddings(self, req: EmbeddingRequest) -> dict[str, Any]:
        self._check(req.model, Task.EMBEDDING, "embeddings")
        return await self._cached("embeddings", req, lambda: self._embeddings(req))

    async def _embeddings(self, req: EmbeddingRequest) -> dict[str, Any]:
        runner = self.runner
        assert isinstance(runner, EmbeddingRunner)
        if req.dimensions is not None and req.dimensions != runner.dimensions:
            raise InvalidRequestError(
                f"model {self.card.id!r} produces {runner.dimensions}-dimensional embeddings "
                f"and cannot return {req.dimensions}",
                param="dimensions",
            )
        texts = req.inputs()
        try:
            vectors = await asyncio.gather(*(self._embed(text) for text in texts))
        except Exception as exc:
            raise InternalError(f"embedding failed: {type(exc).__name__}: {exc}") from exc
        tokens = sum(runner.count_tokens(text) for text in texts)
        data = [
            {"object": "embedding", "index": i, "embedding": encode_vector(v, req.encoding_format)}
            for i, v in enumerate(vectors)
        ]
        return {
            "object": "list",
            "data": data,
            "model": self.card.id,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    # ---- images -----------------------------------------------------------------------------

    async def _draw_batch(self, batch: list[ImageRequest]) -> list[list[bytes]]:
        assert isinstance(self.runner, ImageRunner)
        self._count_batch(len(batch))
        images = await asyncio.to_thread(self.runner.generate, batch)
        self.generated_images += sum(len(drawn) for drawn in images)
        return images

    def _image_request(self, req: ImageGenerationRequest) -> ImageRequest:
        width, height = req.dimensions() or parse_size(self.card.image.size)
        for side, name in ((width, "width"), (height, "height")):
            if side % 8 or not 8 <= side <= MAX_IMAGE_SIDE:
                raise InvalidRequestError(
                    f"image {name} must be a multiple of 8 between 8 and {MAX_IMAGE_SIDE}; "
                    f"got size {width}x{height}",
                    param="size",
                )
        if req.n > self.card.image.max_images:
            raise InvalidRequestError(
                f"model {self.card.id!r} draws at most {self.card.image.max_images} images "
                f"per request; got n={req.n}",
                param="n",
            )
        return ImageRequest(
            prompt=req.prompt,
            n=req.n,
            width=width,
            height=height,
            num_inference_steps=req.num_inference_steps or self.card.image.num_inference_steps,
            seed=req.seed,
            negative_prompt=req.negative_prompt,
        )

    async def images(self, req: ImageGenerationRequest) -> dict[str, Any]:
        self._check(req.model, Task.TEXT_TO_IMAGE, "image generation")
        request = self._image_request(req)
        try:
            pngs = await self._draw(request)
        except Exception as exc:
            raise InternalError(f"image generation failed: {type(exc).__name__}: {exc}") from exc
        return {
            "created": int(self._clock()),
            "data": [{"b64_json": base64.b64encode(png).decode("ascii")} for png in pngs],
        }
