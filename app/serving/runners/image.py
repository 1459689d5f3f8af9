"""The diffusers Stable Diffusion runner: text-to-image, PNG-encoded."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from app.catalog.cards import ModelCard
from app.serving.runners.base import (
    GenerationCancelled,
    ImageRequest,
    ImageRunner,
    LoadedInfo,
    RowError,
)
from app.serving.runners.common import count_parameters, torch_dtype

if TYPE_CHECKING:
    import torch

MAX_SIDE = 1024  # pixels; larger images take minutes and gigabytes even on a GPU
MAX_STEPS = 200


class StableDiffusionRunner(ImageRunner, loader="diffusers-stable-diffusion"):
    """A StableDiffusionPipeline (hub id or local directory) with the safety checker disabled."""

    def __init__(self, card: ModelCard, source: str | None, device: str = "cpu") -> None:
        super().__init__(card, source, device)
        self.pipeline: Any = None

    def load(self) -> LoadedInfo:
        from diffusers import StableDiffusionPipeline

        if self.source is None:
            raise ValueError(f"model {self.card.id!r} has no source to load")
        dtype = torch_dtype(self.card.dtype, self.device)
        pipeline = StableDiffusionPipeline.from_pretrained(
            self.source,
            revision=self.card.revision,
            safety_checker=None,
            requires_safety_checker=False,
            **{_dtype_arg(): dtype},
        )
        self.pipeline = pipeline.to(self.device)
        self.pipeline.set_progress_bar_config(disable=True)
        return LoadedInfo(
            device=self.device,
            dtype=str(dtype).removeprefix("torch."),
            parameters=count_parameters(pipeline.unet, pipeline.vae, pipeline.text_encoder),
            extra={"scheduler": type(pipeline.scheduler).__name__},
        )

    def generate(self, batch: Sequence[ImageRequest]) -> list[list[bytes] | RowError]:
        """Requests of equal size and step count share one pipeline call; a request that is
        invalid, fails or is cancelled gets its RowError and the others their images."""
        if self.pipeline is None:
            raise RuntimeError("load() must run before generate()")
        results: list[list[bytes] | RowError] = [[] for _ in batch]
        groups: dict[tuple[int, int, int], list[int]] = {}
        for index, request in enumerate(batch):
            try:
                self._validate(request)
            except ValueError as exc:
                results[index] = RowError(exc)
                continue
            key = (request.width, request.height, request.num_inference_steps)
            groups.setdefault(key, []).append(index)
        for members in groups.values():
            outcomes = self._run_isolated([batch[i] for i in members])
            for index, outcome in zip(members, outcomes, strict=True):
                results[index] = outcome
        return results

    def _run_isolated(self, requests: list[ImageRequest]) -> list[list[bytes] | RowError]:
        """One group's images. If the pipeline call fails, each request is drawn alone, so only
        the request that fails gets the error."""
        outcomes: list[list[bytes] | RowError] = [_cancelled() for _ in requests]
        live = [i for i, request in enumerate(requests) if not request.cancel.is_set()]
        if not live:
            return outcomes
        try:
            drawn = self._run_group([requests[i] for i in live])
        except GenerationCancelled as exc:
            return [RowError(exc)] * len(requests)
        except Exception as exc:
            for i in live:
                outcomes[i] = (
                    RowError(exc) if len(live) == 1 else self._run_isolated([requests[i]])[0]
                )
            return outcomes
        for i, images in zip(live, drawn, strict=True):
            outcomes[i] = images
        return outcomes

    def _validate(self, request: ImageRequest) -> None:
        for name, side in (("width", request.width), ("height", request.height)):
            if side % 8 or not 8 <= side <= MAX_SIDE:
                raise ValueError(f"{name} must be a multiple of 8 from 8 to {MAX_SIDE}, got {side}")
        if not 1 <= request.n <= self.card.image.max_images:
            raise ValueError(f"n must be from 1 to {self.card.image.max_images}, got {request.n}")
        if not 1 <= request.num_inference_steps <= MAX_STEPS:
            raise ValueError(
                f"num_inference_steps must be from 1 to {MAX_STEPS}, "
                f"got {request.num_inference_steps}"
            )

    def _run_group(self, requests: list[ImageRequest]) -> list[list[bytes]]:
        first = requests[0]
        prompts: list[str] = []
        negatives: list[str] = []
        generators: list[torch.Generator] = []
        for request in requests:
            # One generator per request, shared by its n images, draws the same latents whatever
            # else is batched with it. CPU generators also make a seed give the same image on
            # any device.
            generator = _generator(request.seed)
            prompts += [request.prompt] * request.n
            # An empty negative prompt is what the pipeline uses when none is given.
            negatives += [request.negative_prompt or ""] * request.n
            generators += [generator] * request.n

        def on_step_end(
            pipeline: Any, step: int, timestep: Any, tensors: dict[str, Any]
        ) -> dict[str, Any]:
            self._on_step_end(requests, step)
            return tensors

        output = self.pipeline(
            prompt=prompts,
            negative_prompt=negatives,
            width=first.width,
            height=first.height,
            num_inference_steps=first.num_inference_steps,
            generator=generators,
            output_type="pil",
            callback_on_step_end=on_step_end,
        )
        pngs = [_png(image) for image in output.images]
        per_request: list[list[bytes]] = []
        for request in requests:
            per_request.append(pngs[: request.n])
            pngs = pngs[request.n :]
        return per_request

    def _on_step_end(self, requests: list[ImageRequest], step: int) -> None:
        """After each denoising step: stop the pipeline once every request in it is cancelled.

        Raising (rather than the pipeline's own `_interrupt` flag, which still runs the skipped
        steps' loop and the VAE decode) ends the call at once; nobody waits for its images.
        """
        if all(request.cancel.is_set() for request in requests):
            raise GenerationCancelled(f"cancelled after denoising step {step + 1}")


def _cancelled() -> RowError:
    return RowError(GenerationCancelled("cancelled before its images were drawn"))


def _dtype_arg() -> str:
    """from_pretrained's dtype keyword: recent diffusers renamed torch_dtype to dtype."""
    from diffusers.utils import deprecation_utils

    # The rename came with this helper; releases without it know only torch_dtype.
    return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"


def _generator(seed: int | None) -> torch.Generator:
    import torch

    generator = torch.Generator()
    if seed is None:
        generator.seed()  # fresh entropy: unseeded requests differ
    else:
        generator.manual_seed(seed)
    return generator


def _png(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
