"""OpenAI wire-format request models (validated with pydantic) for every endpoint we serve.

Requests tolerate fields we do not act on (third-party clients send many), but a field that
would change the answer in a way we cannot honour is rejected with a 400 rather than ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Wire ceilings: what any request may carry whatever the model. Each card's `limits` (see
# app.catalog.cards) sets the usual, lower bounds and may raise them up to these.
MAX_STOP_SEQUENCES = 16
MAX_STOP_LENGTH = 1024  # characters in one stop sequence
MAX_EMBEDDING_INPUTS = 2048
MAX_N = 16
MAX_SEED = 2**63 - 1  # torch generators take signed 64-bit seeds


class _Request(BaseModel):
    # extra="allow": clients such as LangChain send fields (user, metadata, store, ...) that do
    # not change a completion; they are accepted and ignored.
    model_config = ConfigDict(extra="allow", str_strip_whitespace=False)

    model: Annotated[str, Field(min_length=1, max_length=256, description="Model id.")]
    cache_bypass: bool = Field(
        False,
        description="Skip the response cache for this request (neither read nor stored); "
        "HTTP clients can send `Cache-Control: no-cache` or `X-Cache-Bypass: 1` instead.",
    )


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = False


class _Sampling(_Request):
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate.")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, description="Sampling seed, from 0 to 2^63 - 1.")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logprobs: bool | int | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        stops = [value] if isinstance(value, str) else value or []
        if any(len(stop) > MAX_STOP_LENGTH for stop in stops):
            raise ValueError(f"a stop sequence may have at most {MAX_STOP_LENGTH} characters")
        return value

    @field_validator("seed", mode="before")
    @classmethod
    def _seed_range(cls, value: Any) -> Any:
        return check_seed(value)

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: bool | int | None) -> bool | int | None:
        if value:
            raise ValueError("logprobs are not supported by this server")
        return value

    def stop_sequences(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        return tuple(s for s in stops if s)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[dict[str, Any]] | None = None

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, value: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        if value:
            raise ValueError("tool calling is not supported by this server")
        return value

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def message_dicts(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1, description="OpenAI's default is 16.")
    echo: bool = False
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be an empty list")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value:
            raise ValueError("suffix (insertion) is not supported by this server")
        return value

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def token_limit(self) -> int | None:
        return self.max_tokens


class EmbeddingRequest(_Request):
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)

    @field_validator("input")
    @classmethod
    def _inputs(cls, value: str | list[str]) -> str | list[str]:
        items = [value] if isinstance(value, str) else value
        if not items:
            raise ValueError("input must not be an empty list")
        if len(items) > MAX_EMBEDDING_INPUTS:
            raise ValueError(f"input may hold at most {MAX_EMBEDDING_INPUTS} strings")
        if any(not item for item in items):
            raise ValueError("input strings must not be empty")
        return value

    def inputs(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class ImageGenerationRequest(_Request):
    prompt: str = Field(min_length=1, max_length=4000)
    n: int = Field(1, ge=1, le=MAX_N)
    size: str | None = Field(None, pattern=r"^\d{1,4}x\d{1,4}$")
    response_format: Literal["b64_json", "url"] = "b64_json"
    negative_prompt: str | None = Field(None, max_length=4000)
    num_inference_steps: int | None = Field(None, ge=1, le=200)
    seed: int | None = Field(None, description="Latent noise seed, from 0 to 2^63 - 1.")

    @field_validator("seed", mode="before")
    @classmethod
    def _seed_range(cls, value: Any) -> Any:
        return check_seed(value)

    @model_validator(mode="after")
    def _b64_only(self) -> ImageGenerationRequest:
        if self.response_format == "url":
            raise ValueError("response_format 'url' is not supported; use 'b64_json'")
        return self

    def dimensions(self) -> tuple[int, int] | None:
        if self.size is None:
            return None
        width, height = self.size.split("x")
        return int(width), int(height)


def check_seed(value: Any) -> Any:
    """Seeds above 2^63 - 1 overflow torch's generators; negative ones mean nothing here.
    Checked before the int conversion, so a huge JSON number gets this message too."""
    if isinstance(value, int | float) and not 0 <= value <= MAX_SEED:
        raise ValueError(f"seed must be an integer from 0 to {MAX_SEED} (2^63 - 1)")
    return value


REQUEST_TYPES: dict[str, type[_Request]] = {
    "chat": ChatCompletionRequest,
    "completions": CompletionRequest,
    "embeddings": EmbeddingRequest,
    "images": ImageGenerationRequest,
}
