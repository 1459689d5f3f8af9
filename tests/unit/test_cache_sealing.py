"""The Redis seal: sealed values round-trip under their own name only, any change breaks the
seal, and without a signing key only plain JSON is stored or read."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from app.cache import codec
from app.cache.config import CacheConfig, CacheConfigError
from app.cache.sealing import SEALED, TAG_BYTES, BrokenSeal, Seal, load_signing_key

KEY = b"k" * 32
NAME = "cache:v:resp:echo:1"
JSON_BLOB = codec.encode({"object": "list", "data": []})
PICKLE_BLOB = codec.encode((1, 2))


@pytest.mark.parametrize("blob", [JSON_BLOB, PICKLE_BLOB])
def test_a_sealed_value_round_trips(blob: bytes) -> None:
    seal = Seal(KEY)
    stored = seal.seal(NAME, blob)
    assert stored is not None and stored.startswith(SEALED)
    assert seal.unseal(NAME, stored) == blob


@pytest.mark.parametrize(
    "tamper",
    [
        lambda s: s[:2] + bytes([s[2] ^ 1]) + s[3:],  # the tag
        lambda s: s[:-1] + bytes([s[-1] ^ 1]),  # the value
        lambda s: s[: 2 + TAG_BYTES],  # the value cut off
        lambda s: s[2 + TAG_BYTES :],  # the seal stripped
        lambda s: s[:10],
    ],
)
def test_any_change_breaks_the_seal(tamper: object) -> None:
    seal = Seal(KEY)
    stored = seal.seal(NAME, PICKLE_BLOB)
    assert stored is not None
    with pytest.raises(BrokenSeal):
        seal.unseal(NAME, tamper(stored))  # type: ignore[operator]


def test_a_value_sealed_for_another_key_or_with_another_secret_is_refused() -> None:
    stored = Seal(KEY).seal(NAME, JSON_BLOB)
    assert stored is not None
    with pytest.raises(BrokenSeal, match="does not match"):
        Seal(KEY).unseal(NAME + "x", stored)
    with pytest.raises(BrokenSeal, match="does not match"):
        Seal(b"other" * 8).unseal(NAME, stored)


def test_with_a_key_unsealed_values_are_refused_even_json() -> None:
    with pytest.raises(BrokenSeal, match="not sealed"):
        Seal(KEY).unseal(NAME, JSON_BLOB)


def test_without_a_key_only_json_goes_in_or_comes_out() -> None:
    seal = Seal(None)
    assert seal.seal(NAME, JSON_BLOB) == JSON_BLOB
    assert seal.unseal(NAME, JSON_BLOB) == JSON_BLOB
    assert seal.seal(NAME, PICKLE_BLOB) is None
    for stored in (PICKLE_BLOB, pickle.dumps(object), b""):
        with pytest.raises(BrokenSeal, match="not JSON"):
            seal.unseal(NAME, stored)
    sealed = Seal(KEY).seal(NAME, JSON_BLOB)
    assert sealed is not None
    with pytest.raises(BrokenSeal, match="no signing key"):
        seal.unseal(NAME, sealed)


def test_the_key_comes_from_the_file_first_then_the_setting(tmp_path: Path) -> None:
    assert load_signing_key(CacheConfig()) is None
    assert load_signing_key(CacheConfig(redis_signing_key="s" * 16)) == b"s" * 16
    secret = tmp_path / "key"
    secret.write_text("f" * 20 + "\n")
    both = CacheConfig(redis_signing_key="s" * 16, redis_signing_key_file=str(secret))
    assert load_signing_key(both) == b"f" * 20


@pytest.mark.parametrize(
    ("content", "match"), [(None, "No such file"), ("short-secret", "16\\+ characters")]
)
def test_a_bad_key_file_fails_naming_the_setting(
    tmp_path: Path, content: str | None, match: str
) -> None:
    path = tmp_path / "key"
    if content is not None:
        path.write_text(content)
    with pytest.raises(CacheConfigError, match=match) as info:
        load_signing_key(CacheConfig(redis_signing_key_file=str(path)))
    assert "APP_CACHE_REDIS_SIGNING_KEY_FILE" in str(info.value)
    assert "short-secret" not in str(info.value)
