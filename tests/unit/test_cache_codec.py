"""The value codec: JSON for values JSON carries unchanged, pickle for the rest, and nothing
else decodes."""

from __future__ import annotations

import datetime as dt
import math
import pickle

import pytest

from app.cache import codec

RESPONSE = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1700000000,
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "logprobs": None}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
}
EMBEDDINGS = {"object": "list", "data": [{"index": 0, "embedding": [0.25, -1.5, 1e-9]}]}


@pytest.mark.parametrize("value", [RESPONSE, EMBEDDINGS, "text", 42, 1.5, True, None, [1, "a"]])
def test_json_values_travel_as_json(value: object) -> None:
    blob = codec.encode(value)
    assert codec.is_json(blob)
    decoded = codec.decode(blob)
    assert decoded == value and type(decoded) is type(value)


@pytest.mark.parametrize(
    "value",
    [(1, 2), b"raw", {1: "int key"}, [math.inf, 0.0], dt.date(2024, 1, 2), {"s": {1, 2}}, 2**70],
)
def test_values_json_would_change_travel_as_pickle(value: object) -> None:
    blob = codec.encode(value)
    assert blob[:1] == codec.PICKLE
    assert codec.decode(blob) == value


def test_nan_goes_as_pickle_and_comes_back_nan() -> None:
    blob = codec.encode([math.nan])
    assert blob[:1] == codec.PICKLE and math.isnan(codec.decode(blob)[0])


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        pickle.dumps("an older release's raw pickle"),
        b"J{not json",
        b"P" + pickle.dumps("truncated")[:-3],
        b"S1" + b"\0" * 40,
    ],
)
def test_anything_else_is_undecodable(blob: bytes) -> None:
    with pytest.raises(codec.UndecodableValue):
        codec.decode(blob)
