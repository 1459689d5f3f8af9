"""A request's cost checked against its model card's limits, before any tokenising or decoding.

Each violation is an InvalidRequestError (400) whose `param` names the request field and whose
message gives the limit and the card field that raises it.
"""

from __future__ import annotations

from collections.abc import Sequence

from app.api.errors import InvalidRequestError
from app.api.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    ImageGenerationRequest,
)
from app.catalog.cards import MAX_IMAGE_SIDE, ModelCard, parse_size
from app.serving.runners.base import ImageRequest


def _over(card: ModelCard, what: str, got: int, limit: int, field: str, param: str) -> None:
    if got > limit:
        raise InvalidRequestError(
            f"model {card.id!r} accepts at most {limit} {what} per request; got {got} "
            f"(the card's {field} raises this limit)",
            param=param,
        )


def check_chat(card: ModelCard, req: ChatCompletionRequest) -> None:
    limits = card.limits
    _over(
        card, "messages", len(req.messages), limits.max_messages, "limits.max_messages", "messages"
    )
    check_sequences(card, 1, req.n)
    check_stops(card, req.stop_sequences())
    check_chars(card, sum(len(m.text()) for m in req.messages), "messages")


def check_completion(card: ModelCard, req: CompletionRequest) -> None:
    prompts = req.prompts()
    _over(card, "prompts", len(prompts), card.limits.max_prompts, "limits.max_prompts", "prompt")
    check_sequences(card, len(prompts), req.n)
    check_stops(card, req.stop_sequences())
    check_chars(card, sum(len(p) for p in prompts), "prompt")


def check_embeddings(card: ModelCard, req: EmbeddingRequest) -> int:
    """The inputs' count and each input's length within the card's limits; returns the slots
    the request holds: one per batch of inputs (batching.max_batch_size) it embeds."""
    texts = req.inputs()
    _over(card, "inputs", len(texts), card.limits.max_inputs, "limits.max_inputs", "input")
    limit = card.input_char_limit
    for index, text in enumerate(texts):
        if len(text) > limit:
            raise InvalidRequestError(
                f"input {index} has {len(text)} characters; model {card.id!r} accepts at most "
                f"{limit} per input (the card's limits.max_input_chars raises this limit)",
                param="input",
            )
    batch = max(1, card.batching.max_batch_size)
    return min(-(-len(texts) // batch), card.max_ongoing_requests)


def check_sequences(card: ModelCard, prompts: int, n: int) -> None:
    """Prompts times n sequences, each one slot of the replica while it decodes."""
    total = prompts * n
    limit = card.sequence_limit
    if total <= limit:
        return
    if card.limits.max_sequences <= card.max_ongoing_requests:
        bound_by = "the card's limits.max_sequences raises this limit"
    else:  # each sequence holds one of the replica's slots while it decodes
        bound_by = "each takes one of the replica's slots: the card's max_ongoing_requests"
    raise InvalidRequestError(
        f"this request asks for {total} sequences ({prompts} prompt(s) times n={n}); model "
        f"{card.id!r} decodes at most {limit} per request ({bound_by})",
        param="prompt" if n == 1 else "n",
    )


def check_stops(card: ModelCard, stops: Sequence[str]) -> None:
    limits = card.limits
    _over(
        card,
        "stop sequences",
        len(stops),
        limits.max_stop_sequences,
        "limits.max_stop_sequences",
        "stop",
    )
    for index, stop in enumerate(stops):
        if len(stop) > limits.max_stop_length:
            raise InvalidRequestError(
                f"stop sequence {index} has {len(stop)} characters; model {card.id!r} accepts "
                f"at most {limits.max_stop_length} (the card's limits.max_stop_length raises "
                "this limit)",
                param="stop",
            )


def check_chars(card: ModelCard, chars: int, param: str) -> None:
    """Prompt text is bounded before it reaches a tokenizer, whose cost grows with it."""
    limit = card.input_char_limit
    if chars > limit:
        raise InvalidRequestError(
            f"the request carries {chars} characters of prompt text; model {card.id!r} accepts "
            f"at most {limit} (the card's limits.max_input_chars raises this limit)",
            param=param,
        )


def image_request(card: ModelCard, req: ImageGenerationRequest) -> ImageRequest:
    """The runner's request for an image request that is within the card's limits."""
    width, height = req.dimensions() or parse_size(card.image.size)
    for side, name in ((width, "width"), (height, "height")):
        if side % 8 or not 8 <= side <= MAX_IMAGE_SIDE:
            raise InvalidRequestError(
                f"image {name} must be a multiple of 8 between 8 and {MAX_IMAGE_SIDE}; "
                f"got size {width}x{height}",
                param="size",
            )
    max_width, max_height = card.image_size_limit
    if width * height > max_width * max_height:
        raise InvalidRequestError(
            f"size {width}x{height} is {width * height} pixels; model {card.id!r} draws at most "
            f"{max_width * max_height} ({max_width}x{max_height}) per image (the card's "
            "limits.max_image_size raises this limit)",
            param="size",
        )
    steps = req.num_inference_steps or card.image.num_inference_steps
    step_limit = card.inference_step_limit
    field = "limits.max_inference_steps"
    _over(card, "denoising steps", steps, step_limit, field, "num_inference_steps")
    images = min(card.image.max_images, card.max_ongoing_requests)
    _over(card, "images", req.n, images, "image.max_images", "n")
    return ImageRequest(
        prompt=req.prompt,
        n=req.n,
        width=width,
        height=height,
        num_inference_steps=steps,
        seed=req.seed,
        negative_prompt=req.negative_prompt,
    )
