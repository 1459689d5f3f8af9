"""Bad input fails in the client with a specific exception, before anything reaches Ray."""

from __future__ import annotations

import pickle
import threading
from typing import Any

import pytest

from app.kv import (
    InvalidArgumentError,
    InvalidKeyError,
    KeyTooLargeError,
    KVClient,
    KVConfig,
    UnknownConsistencyError,
    ValueNotSerializableError,
    ValueTooLargeError,
)
from app.kv.codec import encode
from app.kv.protocol import MapView
from app.kv.slots import NUM_SLOTS


class NoCluster:
    """Stands in for the coordinator handle: any use of it means validation came too late."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"validation should fail before calling coordinator.{name}")


@pytest.fixture
def client() -> KVClient:
    cfg = KVConfig(max_key_bytes=64, max_value_bytes=1000, max_page_size=50)
    return KVClient(NoCluster(), cfg, MapView(1, [0] * NUM_SLOTS, {}))


def test_wrong_key_types(client: KVClient) -> None:
    with pytest.raises(InvalidKeyError):
        client.get(b"k")  # type: ignore[arg-type]
    with pytest.raises(InvalidKeyError):
        client.put(3, "v")  # type: ignore[arg-type]
    with pytest.raises(InvalidKeyError):
        client.mget(["ok", None])  # type: ignore[list-item]
    with pytest.raises(InvalidArgumentError):
        client.mget("abc")


def test_oversized_key(client: KVClient) -> None:
    with pytest.raises(KeyTooLargeError):
        client.put("k" * 65, 1)
    with pytest.raises(KeyTooLargeError):
        client.mset({"k" * 100: 1})


def test_unpicklable_and_oversized_values(client: KVClient) -> None:
    with pytest.raises(ValueNotSerializableError, match="lock"):
        client.put("k", threading.Lock())
    with pytest.raises(ValueNotSerializableError):
        client.put("k", lambda: 1)
    with pytest.raises(ValueNotSerializableError):
        client.cas("k", None, (x for x in range(3)))
    with pytest.raises(ValueTooLargeError):
        client.put("k", b"x" * 2000)


def test_unknown_consistency_levels(client: KVClient) -> None:
    with pytest.raises(UnknownConsistencyError):
        client.get("k", read="linearizable")
    with pytest.raises(UnknownConsistencyError):
        client.put("k", 1, write="quorum")
    with pytest.raises(UnknownConsistencyError):
        client.delete("k", write=2)  # type: ignore[arg-type]


def test_other_bad_arguments(client: KVClient) -> None:
    for ttl in (0, -1, "5", True):
        with pytest.raises(InvalidArgumentError):
            client.put("k", 1, ttl=ttl)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError):
        client.get("k", read="bounded", max_lag_ms=-5)
    with pytest.raises(InvalidArgumentError):
        client.scan("p", page_size=0)
    with pytest.raises(InvalidArgumentError):
        client.scan("p", page_size=51)
    with pytest.raises(InvalidArgumentError):
        client.scan("p", cursor="nonsense")
    with pytest.raises(InvalidArgumentError):
        client.cas("k", "1", 2)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError):
        client.mset([("k", 1)])  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError):
        client.put("k", 1, request_id="")


async def test_async_methods_validate_too(client: KVClient) -> None:
    with pytest.raises(InvalidKeyError):
        await client.aget(1)  # type: ignore[arg-type]
    with pytest.raises(ValueNotSerializableError):
        await client.aput("k", threading.Lock())


def test_small_values_are_pickled_inline() -> None:
    payload = encode({"a": [1, 2]}, large_bytes=100, max_bytes=1000)
    assert type(payload) is bytes and pickle.loads(payload) == {"a": [1, 2]}
