"""CRC16 slots and hash tags, checked against the values Redis Cluster documents."""

from __future__ import annotations

import binascii

import pytest

from app.kv.errors import InvalidKeyError, KeyTooLargeError
from app.kv.slots import NUM_SLOTS, hash_tag, key_slot, slot_of_bytes, slot_ranges


def test_crc16_is_xmodem_check_value() -> None:
    # The Redis Cluster spec's reference output for its CRC16: "123456789" -> 0x31C3.
    assert binascii.crc_hqx(b"123456789", 0) == 0x31C3


@pytest.mark.parametrize(
    ("key", "slot"),
    [("foo", 12182), ("bar", 5061), ("hello", 866), ("123456789", 0x31C3 % NUM_SLOTS)],
)
def test_documented_slots(key: str, slot: int) -> None:
    assert key_slot(key) == slot


def test_hash_tags_follow_redis_rules() -> None:
    assert key_slot("{user1000}.following") == key_slot("{user1000}.followers")
    assert key_slot("{user1000}.following") == key_slot("user1000")
    assert key_slot("foo{bar}{zap}") == key_slot("bar")  # first tag only
    assert hash_tag(b"foo{}{bar}") == b"foo{}{bar}"  # empty tag: whole key
    assert hash_tag(b"foo{{bar}}zap") == b"{bar"  # tag runs to the first closing brace
    assert hash_tag(b"foo{bar") == b"foo{bar"  # unclosed: whole key


def test_slots_are_in_range_and_unicode_is_utf8() -> None:
    assert all(0 <= key_slot(f"k{i}") < NUM_SLOTS for i in range(2000))
    assert key_slot("clé") == slot_of_bytes("clé".encode())


def test_bad_keys_raise_specific_errors() -> None:
    with pytest.raises(InvalidKeyError):
        key_slot(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(InvalidKeyError):
        key_slot(42)  # type: ignore[arg-type]
    with pytest.raises(KeyTooLargeError, match="max_key_bytes"):
        key_slot("x" * 2000, max_key_bytes=1024)
    assert isinstance(InvalidKeyError("x"), TypeError)
    assert isinstance(KeyTooLargeError("x"), ValueError)


def test_slot_ranges_collapse_runs() -> None:
    assert slot_ranges([0, 1, 2, 5, 7, 8]) == [(0, 2), (5, 5), (7, 8)]
    assert slot_ranges([]) == []
