"""Request validation and its mapping to OpenAI-style 400 errors that name the parameter."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from app.api.errors import (
    APIError,
    InvalidRequestError,
    OverloadedError,
    ServiceUnavailableError,
    error_body,
)
from app.api.http import parse_request
from app.api.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    ImageGenerationRequest,
)

CHAT: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def parse(data: Any, schema: type[Any] = ChatCompletionRequest) -> Any:
    return parse_request(orjson.dumps(data), schema)


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"temperature": -0.5}, "temperature"),
        ({"temperature": 3}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ({"stop": ["s"] * 17}, "stop"),  # the wire ceiling; cards set lower limits
        ({"stop": "x" * 1025}, "stop"),
        ({"seed": 2**63}, "seed"),
        ({"seed": -1}, "seed"),
        ({"seed": 1e30}, "seed"),
        ({"model": 7}, "model"),
        ({"stream": "yes please"}, "stream"),
        ({"logprobs": True}, "logprobs"),
        ({"tools": [{"type": "function"}]}, "tools"),
    ],
)
def test_chat_bad_parameters_name_the_parameter(change: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        parse(CHAT | change)
    assert caught.value.status == 400
    assert caught.value.param == param
    assert caught.value.body()["error"]["type"] == "invalid_request_error"


def test_missing_field_and_bad_json() -> None:
    with pytest.raises(InvalidRequestError, match="missing required parameter: 'messages'"):
        parse({"model": "m"})
    for body in (b"{nope", b"", b"[1, 2]", b'"text"'):
        with pytest.raises(InvalidRequestError) as caught:
            parse_request(body, ChatCompletionRequest)
        assert caught.value.code == "invalid_json"


def test_valid_chat_tolerates_unknown_fields_and_content_parts() -> None:
    req = parse(
        CHAT
        | {
            "user": "u1",
            "metadata": {"a": 1},
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                }
            ],
            "max_completion_tokens": 5,
            "stop": "x",
        }
    )
    assert req.message_dicts() == [{"role": "user", "content": "ab"}]
    assert req.token_limit() == 5
    assert req.stop_sequences() == ("x",)


def test_completion_embedding_image_rules() -> None:
    assert parse({"model": "m", "prompt": ["a", "b"]}, CompletionRequest).prompts() == ["a", "b"]
    assert parse({"model": "m", "prompt": "a"}, CompletionRequest).max_tokens == 16
    with pytest.raises(InvalidRequestError, match="prompt"):
        parse({"model": "m", "prompt": []}, CompletionRequest)
    with pytest.raises(InvalidRequestError, match="suffix"):
        parse({"model": "m", "prompt": "a", "suffix": "z"}, CompletionRequest)
    assert parse({"model": "m", "input": "a"}, EmbeddingRequest).inputs() == ["a"]
    for bad in ([], [""], 5):
        with pytest.raises(InvalidRequestError) as caught:
            parse({"model": "m", "input": bad}, EmbeddingRequest)
        assert caught.value.param == "input"
    with pytest.raises(InvalidRequestError, match="b64_json"):
        parse({"model": "m", "prompt": "cat", "response_format": "url"}, ImageGenerationRequest)
    with pytest.raises(InvalidRequestError) as caught:
        parse({"model": "m", "prompt": "cat", "size": "big"}, ImageGenerationRequest)
    assert caught.value.param == "size"
    req = parse({"model": "m", "prompt": "cat", "size": "128x64"}, ImageGenerationRequest)
    assert req.dimensions() == (128, 64)


def test_seed_bounds_are_named_and_explained() -> None:
    assert parse(CHAT | {"seed": 2**63 - 1}).seed == 2**63 - 1
    for seed in (b"9223372036854775808", b"18446744073709551616", b"1e40"):
        body = b'{"model": "m", "prompt": "cat", "seed": ' + seed + b"}"
        with pytest.raises(InvalidRequestError, match=r"from 0 to 9223372036854775807") as caught:
            parse_request(body, ImageGenerationRequest)
        assert caught.value.param == "seed"
    with pytest.raises(InvalidRequestError) as caught:
        parse({"model": "m", "prompt": "a", "seed": -5}, CompletionRequest)
    assert caught.value.param == "seed"


def test_error_bodies_and_retry_after_survive_pickling() -> None:
    import pickle

    error = OverloadedError("busy", retry_after_s=3)
    copy = pickle.loads(pickle.dumps(error))
    assert isinstance(copy, OverloadedError)
    assert copy.status == 429 and copy.headers() == {"Retry-After": "3"}
    assert copy.body() == error_body("busy", "rate_limit_error", None, "overloaded")
    unavailable = ServiceUnavailableError("none", retry_after_s=2)
    assert unavailable.status == 503 and isinstance(unavailable, APIError)
