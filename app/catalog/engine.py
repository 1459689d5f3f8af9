"""A text-generation card's `engine:` block: how its replicas schedule decoding.

- `static`: serve.batch gathers requests for up to batching.wait_timeout_s and the batch decodes
  in lock step until its last row ends; a request arriving meanwhile waits for the next batch.
- `continuous`: requests join and leave the running batch at every decode step, admitted against
  a KV cache budget sized from the device's free memory (app.serving.engines).
- `auto`: continuous on a GPU; on a CPU the engine BENCHMARKS.md ("Generation engines") found
  better for the offline catalogue's model under arrivals over time (CPU_DEFAULT).

A card may write the kind alone (`engine: continuous`) or the block with its settings.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class EngineKind(StrEnum):
    AUTO = "auto"
    STATIC = "static"
    CONTINUOUS = "continuous"

    def resolve(self, device: str) -> EngineKind:
        """The engine this setting runs on `device`."""
        if self is not EngineKind.AUTO:
            return self
        return EngineKind.CONTINUOUS if device.startswith("cuda") else CPU_DEFAULT


# What `auto` runs on a CPU: under Poisson arrivals the continuous engine cut tiny-llama's p99
# time to first token to a fraction of the static engine's at equal throughput (BENCHMARKS.md,
# "Generation engines").
CPU_DEFAULT = EngineKind.CONTINUOUS
# How long batch lines yield to interactive sequences on a CPU (BENCHMARKS.md, "Batch API").
CPU_BACKGROUND_PAUSE_S = 1.0


class EngineSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: EngineKind = Field(EngineKind.AUTO, description="static, continuous or auto.")
    max_running: int | None = Field(
        None,
        ge=1,
        le=4096,
        description="Sequences the continuous engine decodes at once (default: "
        "batching.max_batch_size).",
    )
    max_waiting: int | None = Field(
        None,
        ge=0,
        le=100_000,
        description="Sequences that may wait for a place in the running batch or for KV cache; "
        "beyond them a request gets a 429 with Retry-After (default: max_ongoing_requests).",
    )
    kv_cache_tokens: int | None = Field(
        None,
        ge=1,
        description="KV cache positions the engine may fill, over all its sequences, padding "
        "included; default: kv_cache_memory_fraction of the device's free memory after the "
        "weights are loaded, divided by the model's bytes per position.",
    )
    kv_cache_memory_fraction: float | None = Field(
        None,
        gt=0,
        le=0.95,
        description="Share of free device memory the KV cache may take (default: 0.85 on a GPU, "
        "0.25 of available memory on a CPU, where other replicas share the host).",
    )
    max_prefill_tokens: int = Field(
        4096,
        ge=1,
        description="Prompt tokens one iteration prefills before the running batch decodes "
        "again, so a burst of long prompts delays the other streams' next tokens by a bounded "
        "amount (one prompt is always taken, however long).",
    )

    max_prefill_delay_steps: int = Field(
        4,
        ge=0,
        le=64,
        description="Decode steps arrivals may wait while a batch runs, so that several are "
        "prefilled in one forward pass instead of one pass each; they are prefilled sooner "
        "once they number at least running / this. 0: prefill at every step.",
    )

    background_pause_s: float | None = Field(
        None,
        ge=0,
        le=60,
        description="While interactive sequences decode, batch jobs' lines pause (keeping "
        "their KV cache) for up to this long, then decode beside them for as long again before "
        "they may pause anew, so a batch always progresses. 0: never pause. Default: 1.0 on a "
        "CPU, where every row adds to a decode step's compute, and 0 on a GPU, where a decode "
        "step is bound by memory traffic and extra rows cost little.",
    )

    def background_pause_for(self, device: str) -> float:
        """background_pause_s on `device` (its default filled in)."""
        if self.background_pause_s is not None:
            return self.background_pause_s
        return CPU_BACKGROUND_PAUSE_S if device.startswith("cpu") else 0.0

    @model_validator(mode="before")
    @classmethod
    def _kind_alone(cls, value: Any) -> Any:
        return {"kind": value} if isinstance(value, str) else value
