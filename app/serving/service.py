"""The OpenAI operations of one model: validation against its card, batching into its runner,
and the response and stream-chunk objects. No Ray and no HTTP here, so it is tested directly.

Cost: a request is checked against its card's limits (app.serving.limits) before any tokeniser
call and holds one admission slot per sequence or image (app.serving.admission). Cancellation:
when the task awaiting an operation is cancelled or its stream is closed (what Serve does when a
client disconnects), each sequence's or image's cancel event is set, the runner drops it at its
next decode or denoising step (app.serving.decoding), and its slots are released on the way out.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import AbstractContextManager
from functools import cached_property
from typing import TYPE_CHECKING, Any

from app.api.errors import InternalError, InvalidRequestError, ModelNotFoundError
from app.api.responses import chat_choice, encode_vector, model_object, new_id, text_choice, usage
from app.api.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    ImageGenerationRequest,
)
from app.api.sse import Chunk
from app.autoscaling.report import WorkTotals
from app.catalog.cards import ModelCard, Task
from app.serving.admission import Admission
from app.serving.batching import Batcher, ServeBatcher
from app.serving.decoding import SequenceDecoder, runner_failure
from app.serving.engines import Engine, EngineStats, make_engine, tokenizer_call
from app.serving.limits import check_chat, check_completion, check_embeddings, image_request
from app.serving.runners.base import (
    EmbeddingRunner,
    GenerationRequest,
    ImageRequest,
    ImageRunner,
    RowError,
    Runner,
    TextGenerationRunner,
)
from app.serving.streams import closing, gather_all, merge_streams

if TYPE_CHECKING:
    from app.cache.responses import ResponseCache

SEED_SPACE = 2**63  # sequence i of a seeded request samples with (seed + i) mod this


class ModelService:
    """Serves one model card through one runner; every public method is one OpenAI operation."""

    def __init__(
        self,
        card: ModelCard,
        runner: Runner,
        *,
        clock: Callable[[], float] = time.time,
        response_cache: ResponseCache | None = None,
        batcher: Batcher | None = None,
        on_usage: Callable[[int, int], None] | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self.card = card
        self.runner = runner
        # Deterministic unary responses (greedy chat and completions, embeddings) come from
        # here when cached; streams are always computed (see README, "Cache").
        self.response_cache = response_cache
        self._clock = clock
        # Observers (the replica's metrics): tokens in and out of each computed answer, the
        # size of each batch run.
        self._on_usage = on_usage
        self._on_batch = on_batch
        self._batcher = batcher or ServeBatcher(
            card.batching.max_batch_size, card.batching.wait_timeout_s
        )
        self._admission = Admission(card.id, card.max_ongoing_requests, card.batch_share)
        self._decoder = (
            SequenceDecoder(make_engine(card, runner, self._batcher, self._count_batch))
            if isinstance(runner, TextGenerationRunner)
            else None
        )
        self.created = int(clock())
        self.batches = 0
        self.batched_requests = 0
        self.largest_batch = 0
        self.generated_images = 0

    @property
    def generated_tokens(self) -> int:
        """Tokens produced here, not served from the response cache."""
        return self._decoder.generated_tokens if self._decoder else 0

    # serve.batch needs a replica context, so the batchers are made on first use (inside Serve);
    # they are per instance because serve.batch on a method would share one queue per class.
    @cached_property
    def _embed(self) -> Callable[[str], Awaitable[list[float]]]:
        return self._batcher.wrap(self._embed_batch)

    @cached_property
    def _draw(self) -> Callable[[ImageRequest], Awaitable[list[bytes] | RowError]]:
        return self._batcher.wrap(self._draw_batch)

    def _count_batch(self, size: int) -> None:
        self.batches += 1
        self.batched_requests += size
        self.largest_batch = max(self.largest_batch, size)
        if self._on_batch is not None:
            self._on_batch(size)

    def _used(self, prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
        """The usage of one computed answer (never of a cached one), told to the observer."""
        if self._on_usage is not None:
            self._on_usage(prompt_tokens, completion_tokens)
        return usage(prompt_tokens, completion_tokens)

    def stats(self) -> dict[str, Any]:
        engine = self.engine_stats()
        return {
            "inflight": self.inflight,
            "batches": self.batches,
            "batched_requests": self.batched_requests,
            "largest_batch": self.largest_batch,
            "generated_tokens": self.generated_tokens,
            "generated_images": self.generated_images,
            **({"engine": engine.as_dict()} if engine else {}),
        }

    @property
    def engine(self) -> Engine | None:
        """The text-generation engine (None for other tasks)."""
        return self._decoder.engine if self._decoder else None

    def engine_stats(self) -> EngineStats | None:
        """The engine's queue, batch and KV cache figures (None for other tasks)."""
        return self.engine.stats() if self.engine else None

    def close(self) -> None:
        """Stop the engine's background work (the replica is going away)."""
        if self._decoder is not None:
            self._decoder.engine.close()

    def work_totals(self) -> WorkTotals:
        """Running totals for the autoscaling report (app.autoscaling.report)."""
        return WorkTotals(
            self.batches, self.batched_requests, self.generated_tokens, self.generated_images
        )

    # ---- admission and identity -------------------------------------------------------------

    def admit(self, slots: int = 1, *, background: bool = False) -> AbstractContextManager[None]:
        """Hold a request's first slot (429 when the replica's max_ongoing_requests slots are
        taken, or for background work its share of them); the operation inside claims one
        more per further sequence or image."""
        return self._admission.admit(slots, background=background)

    @property
    def inflight(self) -> int:
        """Slots in use: sequences being decoded and images being drawn."""
        return self._admission.inflight

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

    @property
    def _sequences(self) -> SequenceDecoder:
        assert self._decoder is not None
        return self._decoder

    async def _render(self, req: ChatCompletionRequest) -> str:
        messages = req.message_dicts()
        chars = sum(len(m["content"]) for m in messages)
        try:
            return await tokenizer_call(chars, self._text.render_chat, messages)
        except ValueError as exc:  # e.g. a chat template that rejects the roles' order
            raise InvalidRequestError(str(exc), param="messages") from exc

    async def _generation_requests(
        self, prompt: str, req: ChatCompletionRequest | CompletionRequest, param: str
    ) -> tuple[int, list[GenerationRequest]]:
        prompt_tokens = await tokenizer_call(len(prompt), self._text.count_tokens, prompt)
        max_tokens = req.token_limit() or self.card.generation.max_tokens
        limit = self.card.generation.max_context_tokens
        if prompt_tokens + max_tokens > limit:
            raise InvalidRequestError(
                f"this model's maximum context length is {limit} tokens; the request asks for "
                f"{prompt_tokens} prompt tokens plus {max_tokens} completion tokens",
                param=param,
                code="context_length_exceeded",
            )
        background = self._admission.background_now()
        requests = [
            GenerationRequest(
                prompt=prompt,
                max_tokens=max_tokens,
                temperature=req.temperature,
                top_p=req.top_p,
                stop=req.stop_sequences(),
                seed=None if req.seed is None else (req.seed + i) % SEED_SPACE,
                background=background,
            )
            for i in range(req.n)
        ]
        return prompt_tokens, requests

    async def _cached(
        self, operation: str, req: Any, compute: Callable[[], Awaitable[dict[str, Any]]]
    ) -> dict[str, Any]:
        if self.response_cache is None:
            return await compute()
        return await self.response_cache.serve(operation, req, compute)

    async def chat(self, req: ChatCompletionRequest) -> dict[str, Any]:
        self._check(req.model, Task.TEXT_GENERATION, "chat completions")
        check_chat(self.card, req)
        return await self._cached("chat", req, lambda: self._chat(req))

    async def _chat(self, req: ChatCompletionRequest) -> dict[str, Any]:
        with self._admission.hold(req.n):
            prompt = await self._render(req)
            prompt_tokens, requests = await self._generation_requests(prompt, req, "messages")
            results = await gather_all([self._sequences.collect(r) for r in requests])
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
            "usage": self._used(prompt_tokens, completion_tokens),
            "system_fingerprint": None,
        }

    async def chat_stream(self, req: ChatCompletionRequest) -> AsyncGenerator[Chunk, None]:
        """Chunks in OpenAI's chat.completion.chunk format; validation errors raise on the first
        iteration, before any chunk, so the caller can still answer with an HTTP error."""
        self._check(req.model, Task.TEXT_GENERATION, "chat completions")
        check_chat(self.card, req)
        with self._admission.hold(req.n):
            prompt = await self._render(req)
            prompt_tokens, requests = await self._generation_requests(prompt, req, "messages")
            async with closing(self._chat_chunks(req, prompt_tokens, requests)) as chunks:
                async for chunk in chunks:
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
        merged = merge_streams([self._sequences.deltas(r) for r in requests])
        try:
            async with closing(merged):
                async for i, delta in merged:
                    completion_tokens += delta.tokens
                    if delta.text:
                        yield base | {"choices": [chat_choice(i, {"content": delta.text})]}
                    if delta.finish_reason:
                        yield base | {"choices": [chat_choice(i, {}, delta.finish_reason)]}
        finally:  # a stream cut short still used what it decoded
            used = self._used(prompt_tokens, completion_tokens)
        if req.include_usage:
            yield base | {"choices": [], "usage": used}

    async def completions(self, req: CompletionRequest) -> dict[str, Any]:
        self._check(req.model, Task.TEXT_GENERATION, "completions")
        check_completion(self.card, req)
        return await self._cached("completions", req, lambda: self._completions(req))

    async def _plans(self, req: CompletionRequest) -> list[tuple[int, list[GenerationRequest]]]:
        return [await self._generation_requests(p, req, "prompt") for p in req.prompts()]

    async def _completions(self, req: CompletionRequest) -> dict[str, Any]:
        with self._admission.hold(len(req.prompts()) * req.n):
            plans = await self._plans(req)
            requests = [r for _, rs in plans for r in rs]
            results = await gather_all([self._sequences.collect(r) for r in requests])
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
            "usage": self._used(sum(p for p, _ in plans), sum(t for _, t, _ in results)),
            "system_fingerprint": None,
        }

    async def completions_stream(self, req: CompletionRequest) -> AsyncGenerator[Chunk, None]:
        self._check(req.model, Task.TEXT_GENERATION, "completions")
        check_completion(self.card, req)
        with self._admission.hold(len(req.prompts()) * req.n):
            plans = await self._plans(req)
            async with closing(self._completion_chunks(req, plans)) as chunks:
                async for chunk in chunks:
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
        merged = merge_streams([self._sequences.deltas(r) for r in requests])
        try:
            async with closing(merged):
                async for i, delta in merged:
                    completion_tokens += delta.tokens
                    yield base | {"choices": [text_choice(i, delta.text, delta.finish_reason)]}
        finally:  # a stream cut short still used what it decoded
            used = self._used(sum(p for p, _ in plans), completion_tokens)
        if req.include_usage:
            yield base | {"choices": [], "usage": used}

    # ---- embeddings -------------------------------------------------------------------------

    async def _embed_batch(self, texts: list[str]) -> list[list[float]]:
        assert isinstance(self.runner, EmbeddingRunner)
        self._count_batch(len(texts))
        return await asyncio.to_thread(self.runner.embed, texts)

    async def embeddings(self, req: EmbeddingRequest) -> dict[str, Any]:
        self._check(req.model, Task.EMBEDDING, "embeddings")
        slots = check_embeddings(self.card, req)
        return await self._cached("embeddings", req, lambda: self._embeddings(req, slots))

    async def _embeddings(self, req: EmbeddingRequest, slots: int) -> dict[str, Any]:
        runner = self.runner
        assert isinstance(runner, EmbeddingRunner)
        if req.dimensions is not None and req.dimensions != runner.dimensions:
            raise InvalidRequestError(
                f"model {self.card.id!r} produces {runner.dimensions}-dimensional embeddings "
                f"and cannot return {req.dimensions}",
                param="dimensions",
            )
        texts = req.inputs()
        with self._admission.hold(slots):
            try:
                vectors = await gather_all([self._embed(text) for text in texts])
            except Exception as exc:
                raise InternalError(f"embedding failed: {type(exc).__name__}: {exc}") from exc
        chars = sum(len(text) for text in texts)
        tokens = await tokenizer_call(chars, _count_all, runner, texts)
        self._used(tokens, 0)
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

    async def _draw_batch(self, batch: list[ImageRequest]) -> list[list[bytes] | RowError]:
        assert isinstance(self.runner, ImageRunner)
        self._count_batch(len(batch))
        outcomes = await asyncio.to_thread(self.runner.generate, batch)
        self.generated_images += sum(len(o) for o in outcomes if not isinstance(o, RowError))
        return outcomes

    async def images(self, req: ImageGenerationRequest) -> dict[str, Any]:
        self._check(req.model, Task.TEXT_TO_IMAGE, "image generation")
        request = image_request(self.card, req)
        with self._admission.hold(request.n):
            try:
                outcome = await self._draw(request)
                if isinstance(outcome, RowError):
                    raise outcome.error
            except Exception as exc:
                error = runner_failure(exc, "image generation")
                if error is exc:
                    raise
                raise error from exc
            finally:
                request.cancel.set()  # a cancelled caller stops the pipeline at its next step
        return {
            "created": int(self._clock()),
            "data": [{"b64_json": base64.b64encode(png).decode("ascii")} for png in outcome],
        }


def _count_all(runner: EmbeddingRunner, texts: list[str]) -> int:
    return sum(runner.count_tokens(text) for text in texts)
