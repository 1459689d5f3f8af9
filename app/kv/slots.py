"""Key-to-slot hashing: CRC16 (XMODEM) over a fixed space of 16384 slots, with Redis hash tags."""

from __future__ import annotations

from binascii import crc_hqx
from functools import lru_cache

from app.kv.errors import InvalidKeyError, KeyTooLargeError

NUM_SLOTS = 16384
DEFAULT_MAX_KEY_BYTES = 1024


def hash_tag(key: bytes) -> bytes:
    """The part of `key` that is hashed: the first non-empty `{...}` section, else the whole key."""
    start = key.find(b"{")
    if start < 0:
        return key
    end = key.find(b"}", start + 1)
    # An empty tag ("{}") or an unclosed brace hashes the whole key, as Redis Cluster does.
    if end <= start + 1:
        return key
    return key[start + 1 : end]


def slot_of_bytes(key: bytes) -> int:
    """Slot of an encoded key (binascii.crc_hqx is CRC16-CCITT/XMODEM, the CRC Redis uses)."""
    return crc_hqx(hash_tag(key), 0) & (NUM_SLOTS - 1)


@lru_cache(maxsize=1 << 16)
def _cached_slot(key: str, max_key_bytes: int) -> int:
    encoded = key.encode()
    if len(encoded) > max_key_bytes:
        raise KeyTooLargeError(
            f"key is {len(encoded)} bytes; the limit (max_key_bytes) is {max_key_bytes}"
        )
    return slot_of_bytes(encoded)


def key_slot(key: str, max_key_bytes: int = DEFAULT_MAX_KEY_BYTES) -> int:
    """Validated slot of a string key.

    Raises InvalidKeyError for non-string keys and KeyTooLargeError for keys over the limit.
    Hot keys hit an LRU cache, which keeps the client's per-call cost flat.
    """
    if type(key) is not str:
        raise InvalidKeyError(f"keys must be str, not {type(key).__name__}")
    return _cached_slot(key, max_key_bytes)


def slot_ranges(slots: list[int] | range) -> list[tuple[int, int]]:
    """Collapse sorted slot numbers into inclusive (first, last) ranges for display."""
    ranges: list[tuple[int, int]] = []
    for slot in slots:
        if ranges and ranges[-1][1] == slot - 1:
            ranges[-1] = (ranges[-1][0], slot)
        else:
            ranges.append((slot, slot))
    return ranges
