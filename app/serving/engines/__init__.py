"""Text-generation engines: how a replica schedules decoding (a card's `engine:`).

`make_engine` picks the card's engine for the runner and device, and sizes the continuous
engine's KV cache budget from the device's free memory (or the card's override).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from app.catalog.cards import ModelCard
from app.catalog.engine import EngineKind, EngineSettings
from app.serving.batching import Batcher
from app.serving.engines.base import Engine, EngineStats, tokenizer_call
from app.serving.engines.static import StaticEngine
from app.serving.runners.base import RunnerError, TextGenerationRunner

logger = logging.getLogger(__name__)

__all__ = ["Engine", "EngineStats", "kv_capacity_tokens", "make_engine", "tokenizer_call"]

GPU_KV_FRACTION = 0.85  # of the free GPU memory once the weights are loaded
CPU_KV_FRACTION = 0.25  # of the host's available memory, which other replicas share


def make_engine(
    card: ModelCard,
    runner: TextGenerationRunner,
    batcher: Batcher,
    on_batch: Callable[[int], None] = lambda size: None,
) -> Engine:
    """The card's engine on the runner's device. `auto` falls back to static for a runner or
    model the continuous engine cannot drive; an explicit `continuous` fails to load instead."""
    from app.serving.runners.text import TransformersCausalLMRunner

    kind = card.engine.kind.resolve(runner.device)
    if kind is EngineKind.STATIC:
        return StaticEngine(runner, batcher, on_batch)
    explicit = card.engine.kind is EngineKind.CONTINUOUS
    if not isinstance(runner, TransformersCausalLMRunner):
        if explicit:
            raise RunnerError(
                f"model {card.id!r}: the continuous engine needs a transformers causal LM "
                f"(loader transformers-causal-lm), not loader {card.loader!r}"
            )
        return StaticEngine(runner, batcher, on_batch)
    from app.serving.engines.continuous import ContinuousEngine, probe
    from app.serving.runners.text_batch import UnmergeableCache

    try:
        probe(runner)
    except UnmergeableCache as exc:
        if explicit:
            raise RunnerError(f"model {card.id!r} cannot use the continuous engine: {exc}") from exc
        logger.warning("%s: continuous engine unavailable (%s); using static", card.id, exc)
        return StaticEngine(runner, batcher, on_batch)
    capacity = kv_capacity_tokens(
        card.engine,
        bytes_per_token=runner.kv_bytes_per_token(),
        free_bytes=_free_bytes(runner.device),
        on_gpu=runner.device.startswith("cuda"),
        max_running=card.engine_max_running,
        max_context=card.generation.max_context_tokens,
    )
    logger.info("%s: continuous engine, KV cache budget %d positions", card.id, capacity)
    return ContinuousEngine(runner, card, capacity, on_batch)


def kv_capacity_tokens(
    settings: EngineSettings,
    *,
    bytes_per_token: int,
    free_bytes: int,
    on_gpu: bool,
    max_running: int,
    max_context: int,
) -> int:
    """KV cache positions the engine may fill: the card's kv_cache_tokens, else its share of
    free memory, never more than max_running full-context sequences can use."""
    if settings.kv_cache_tokens is not None:
        return settings.kv_cache_tokens
    fraction = settings.kv_cache_memory_fraction or (GPU_KV_FRACTION if on_gpu else CPU_KV_FRACTION)
    by_memory = int(free_bytes * fraction) // max(1, bytes_per_token)
    return max(1, min(by_memory, max_running * max_context))


def _free_bytes(device: str) -> int:
    if device.startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)
