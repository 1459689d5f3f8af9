"""What a load test runs: stages, request mix, length distributions, models, thresholds, bounds.

The same model is written to a plan file for the Locust process (without the API key, which
travels in its environment), so the engine and the analysis read one definition.
"""

from __future__ import annotations

import math
import random
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    SecretStr,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from app.loadtest.safety import TargetRefusedError, check_target, normalize_base_url

MAX_DURATION_CAP_S = 24 * 3600.0
"""No run may ask for more than a day: every run is bounded."""

GRACE_S = 30.0
"""Default allowance over the stages' total for start-up and shutdown of the engine."""


class LoadTestConfigError(ValueError):
    """A load-test configuration that cannot run; the message names the field."""


class RequestKind(StrEnum):
    CHAT = "chat"
    STREAM = "stream"
    COMPLETION = "completion"
    EMBEDDING = "embedding"


class Stage(BaseModel):
    """One step of offered load held for `duration_s`: a number of concurrent users (closed
    loop, each sends its next request when the last one ends) or a target request rate."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    duration_s: PositiveFloat = Field(description="How long the stage holds its load.")
    users: PositiveInt | None = Field(None, description="Concurrent users (closed loop).")
    rps: PositiveFloat | None = Field(
        None, description="Target requests per second, paced over `users` (default 4 x rps)."
    )
    spawn_rate: PositiveFloat | None = Field(
        None, description="Users started per second (default: all of them within a second)."
    )

    @model_validator(mode="after")
    def _load_given(self) -> Stage:
        if self.users is None and self.rps is None:
            raise ValueError("a stage needs `users` or `rps`")
        return self

    @property
    def offered(self) -> float:
        """The stage's offered load in its own unit (users, or requests per second)."""
        return float(self.rps if self.rps is not None else self.users or 0)

    @property
    def user_count(self) -> int:
        if self.users is not None:
            return self.users
        return max(4, math.ceil(4 * (self.rps or 0)))

    @property
    def label(self) -> str:
        if self.rps is not None:
            return f"{self.rps:g} rps"
        return f"{self.users} user" + ("" if self.users == 1 else "s")


class Fixed(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["fixed"] = "fixed"
    tokens: PositiveInt

    def sample(self, rng: random.Random) -> int:
        return self.tokens


class Uniform(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["uniform"] = "uniform"
    low: PositiveInt
    high: PositiveInt

    @model_validator(mode="after")
    def _ordered(self) -> Uniform:
        if self.high < self.low:
            raise ValueError(f"uniform high ({self.high}) is below low ({self.low})")
        return self

    def sample(self, rng: random.Random) -> int:
        return rng.randint(self.low, self.high)


class Normal(BaseModel):
    """Normal around `mean`, clipped to [low, high]."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["normal"] = "normal"
    mean: PositiveFloat
    stddev: float = Field(ge=0)
    low: PositiveInt = 1
    high: PositiveInt = 32768

    def sample(self, rng: random.Random) -> int:
        return _clip(rng.gauss(self.mean, self.stddev), self.low, self.high)


class LogNormal(BaseModel):
    """Log-normal with median `median` and shape `sigma` (long right tail, like real prompts)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["lognormal"] = "lognormal"
    median: PositiveFloat
    sigma: float = Field(ge=0)
    low: PositiveInt = 1
    high: PositiveInt = 32768

    def sample(self, rng: random.Random) -> int:
        return _clip(rng.lognormvariate(math.log(self.median), self.sigma), self.low, self.high)


def _clip(value: float, low: int, high: int) -> int:
    return max(low, min(high, round(value)))


Lengths = Annotated[Fixed | Uniform | Normal | LogNormal, Field(discriminator="kind")]


class Mix(BaseModel):
    """Relative weights of the request kinds (they need not sum to 1)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    chat: float = Field(4.0, ge=0, description="Chat completions, answered whole.")
    stream: float = Field(4.0, ge=0, description="Streamed chat completions (TTFT and ITL).")
    completion: float = Field(1.0, ge=0, description="Legacy text completions.")
    embedding: float = Field(1.0, ge=0, description="Embeddings of the prompt.")

    @model_validator(mode="after")
    def _some(self) -> Mix:
        if not any(self.weights().values()):
            raise ValueError("every weight of the mix is 0")
        return self

    def weights(self) -> dict[RequestKind, float]:
        return {kind: float(getattr(self, kind.value)) for kind in RequestKind}

    def kinds(self) -> list[RequestKind]:
        """The kinds this mix sends (weight above 0)."""
        return [kind for kind, weight in self.weights().items() if weight > 0]


class Models(BaseModel):
    """The model id each kind of request names; None: found from GET /v1/models."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    generation: str | None = Field(None, description="Model for chat, stream and completion.")
    embedding: str | None = Field(None, description="Model for embeddings.")

    def for_kind(self, kind: RequestKind) -> str | None:
        return self.embedding if kind is RequestKind.EMBEDDING else self.generation


class Thresholds(BaseModel):
    """A stage breaks when any of these is crossed; the first such stage is the breaking point."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    p95_ms: PositiveFloat = Field(2000.0, description="p95 end-to-end latency, milliseconds.")
    error_rate: float = Field(0.01, ge=0, le=1, description="Fraction of failed requests.")
    ttft_p95_ms: PositiveFloat | None = Field(
        None, description="p95 time to first token of streams, milliseconds (off when unset)."
    )


class LoadTestConfig(BaseModel):
    """A whole load test. Invalid values fail here, with the field's name in the message."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_url: str = Field(description="OpenAI base URL, ending in /v1 (added when missing).")
    stages: list[Stage] = Field(min_length=1)
    mix: Mix = Mix()
    prompt_tokens: Lengths = Fixed(tokens=64)
    output_tokens: Lengths = Fixed(tokens=32)
    models: Models = Models()
    thresholds: Thresholds = Thresholds()
    api_key: SecretStr | None = Field(None, exclude=True, description="Bearer key; never saved.")
    max_duration_s: float | None = Field(
        None,
        gt=0,
        le=MAX_DURATION_CAP_S,
        description="Hard cap on the whole run, engine start-up included (default: stages + 30 s).",
    )
    request_timeout_s: PositiveFloat = Field(60.0, description="Per socket read, seconds.")
    think_time_s: float = Field(0.0, ge=0, description="Pause between a user's requests.")
    allow_hosts: list[str] = Field(
        default_factory=list, description="Non-loopback hosts the user allows as targets."
    )
    metrics_urls: list[str] = Field(
        default_factory=list, description="Ray Prometheus endpoints (default: discovered)."
    )
    sample_interval_s: PositiveFloat = Field(2.0, description="Resource sampling period.")
    seed: int = 0

    @field_validator("base_url")
    @classmethod
    def _normal_url(cls, url: str) -> str:
        return normalize_base_url(url)

    @model_validator(mode="after")
    def _consistent(self) -> LoadTestConfig:
        try:
            check_target(self.base_url, self.allow_hosts)
        except TargetRefusedError as exc:
            raise ValueError(f"base_url: {exc}") from exc
        if len({stage.rps is None for stage in self.stages}) > 1:
            raise ValueError("stages: use `users` in every stage or `rps` in every stage")
        if self.max_duration_s is not None and self.max_duration_s < self.stages_total_s:
            raise ValueError(
                f"max_duration_s ({self.max_duration_s:g}) is shorter than the stages "
                f"({self.stages_total_s:g} s): shorten the stages or raise the cap"
            )
        if self.stages_total_s > MAX_DURATION_CAP_S:
            raise ValueError(f"stages: {self.stages_total_s:g} s is over the 24 h cap")
        return self

    @property
    def stages_total_s(self) -> float:
        return sum(stage.duration_s for stage in self.stages)

    @property
    def deadline_s(self) -> float:
        """Seconds after which the engine is killed, whatever it is doing."""
        if self.max_duration_s is not None:
            return self.max_duration_s
        return min(MAX_DURATION_CAP_S, self.stages_total_s + GRACE_S)

    @property
    def load_unit(self) -> str:
        return "rps" if self.stages[0].rps is not None else "users"


def load_config(path: str | Path, **overrides: Any) -> LoadTestConfig:
    """A config from YAML, with CLI values (those not None) laid over it."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise LoadTestConfigError(f"{path}: {exc}") from exc
    if not isinstance(data, dict):
        raise LoadTestConfigError(f"{path}: expected a mapping of load-test fields")
    return build_config(_merge(data, overrides), source=str(path))


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`overrides` laid over `base`, mappings merged key by key, None values skipped."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        elif value is not None:
            merged[key] = value
    return merged


def build_config(data: dict[str, Any], source: str = "load test") -> LoadTestConfig:
    try:
        return LoadTestConfig.model_validate(data)
    except ValidationError as exc:
        raise LoadTestConfigError(f"{source}: {_describe(exc)}") from exc


def _describe(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        message = error["msg"].removeprefix("Value error, ")
        field = ".".join(str(part) for part in error["loc"])
        parts.append(f"{field}: {message}" if field else message)
    return "; ".join(parts)


_LENGTH_FIELDS = {
    "fixed": ("tokens",),
    "uniform": ("low", "high"),
    "normal": ("mean", "stddev", "low", "high"),
    "lognormal": ("median", "sigma", "low", "high"),
}
_LENGTHS: TypeAdapter[Fixed | Uniform | Normal | LogNormal] = TypeAdapter(Lengths)


def parse_lengths(text: str) -> Fixed | Uniform | Normal | LogNormal:
    """`128`, `fixed:128`, `uniform:32:256`, `normal:128:32`, `lognormal:128:0.5`."""
    kind, _, rest = text.partition(":")
    if not rest and kind.isdigit():
        kind, rest = "fixed", kind
    args = [part for part in rest.split(":") if part]
    fields = _LENGTH_FIELDS.get(kind, ())
    if not args or len(args) > len(fields):
        raise LoadTestConfigError(
            f"lengths {text!r}: use fixed:N, uniform:LOW:HIGH, normal:MEAN:STDDEV[:LOW:HIGH] "
            "or lognormal:MEDIAN:SIGMA[:LOW:HIGH]"
        )
    try:
        return _LENGTHS.validate_python({"kind": kind, **dict(zip(fields, args, strict=False))})
    except ValidationError as exc:
        raise LoadTestConfigError(f"lengths {text!r}: {_describe(exc)}") from exc


def parse_mix(text: str) -> Mix:
    """`chat=4,stream=4,completion=1,embedding=0`; kinds left out weigh 0."""
    weights: dict[str, str] = {kind.value: "0" for kind in RequestKind}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep or name not in weights:
            kinds = ", ".join(k.value for k in RequestKind)
            raise LoadTestConfigError(f"mix {part!r}: use KIND=WEIGHT with KIND one of {kinds}")
        weights[name] = value
    try:
        return Mix.model_validate(weights)
    except ValidationError as exc:
        raise LoadTestConfigError(f"mix {text!r}: {_describe(exc)}") from exc


def stages_from(
    users: str | None, rps: str | None, duration_s: float, spawn_rate: float | None = None
) -> list[dict[str, object]]:
    """Stages from `--users 1,2,4` or `--rps 5,10,20`, each held `duration_s`."""
    if users and rps:
        raise LoadTestConfigError("give --users or --rps, not both")
    key, values = ("users", users) if users else ("rps", rps)
    if not values:
        return []
    stages: list[dict[str, object]] = []
    for value in filter(None, (v.strip() for v in values.split(","))):
        try:
            load = int(value) if key == "users" else float(value)
        except ValueError as exc:
            raise LoadTestConfigError(f"--{key} {values!r}: {value!r} is not a number") from exc
        stage: dict[str, object] = {"duration_s": duration_s, key: load}
        if spawn_rate is not None:
            stage["spawn_rate"] = spawn_rate
        stages.append(stage)
    return stages
