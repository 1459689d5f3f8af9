"""What the Redis tier trusts: an HMAC-SHA256 seal over every value it stores, bound to the Redis
key, made with the signing key from APP_CACHE_REDIS_SIGNING_KEY(_FILE); without a key, only
plain JSON is stored or read, so nothing read from Redis is ever unpickled unverified."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

from app.cache import codec
from app.cache.config import ENV_PREFIX, MIN_SIGNING_KEY_CHARS, CacheConfig, CacheConfigError

SEALED = b"S1"  # format and version: part of what the tag covers
TAG_BYTES = hashlib.sha256().digest_size


class BrokenSeal(ValueError):
    """A stored value this process must not use; the message says why, without the value."""


def load_signing_key(config: CacheConfig) -> bytes | None:
    """The key from `redis_signing_key_file` if set, else `redis_signing_key`; None when
    neither is set."""
    if config.redis_signing_key_file:
        path = config.redis_signing_key_file
        field = f"redis_signing_key_file ({ENV_PREFIX}REDIS_SIGNING_KEY_FILE) {path}"
        try:
            text = Path(path).read_text().strip()
        except OSError as exc:
            raise CacheConfigError(f"{field}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise CacheConfigError(f"{field}: not UTF-8 text") from None
        if len(text) < MIN_SIGNING_KEY_CHARS:
            raise CacheConfigError(f"{field}: the key needs {MIN_SIGNING_KEY_CHARS}+ characters")
        return text.encode()
    if config.redis_signing_key is None:
        return None
    return config.redis_signing_key.get_secret_value().strip().encode()


class Seal:
    """Turns blobs (app/cache/codec.py) into what Redis stores under a name, and back.

    With a key: b"S1" + HMAC-SHA256(key, b"S1" + name + blob) + blob, so a value forged, altered,
    or copied from another key is refused. Without one: the blob itself, JSON only.
    """

    def __init__(self, key: bytes | None) -> None:
        self._key = key

    @property
    def signed(self) -> bool:
        return self._key is not None

    def seal(self, name: str, blob: bytes) -> bytes | None:
        """What to store under `name`; None when the blob must stay out of Redis (pickle,
        and no key to seal it)."""
        if self._key is None:
            return blob if codec.is_json(blob) else None
        return SEALED + self._tag(self._key, name, blob) + blob

    def unseal(self, name: str, stored: bytes) -> bytes:
        """The blob inside a value read from `name`; raises BrokenSeal unless the tag checks
        (or, without a key, unless it is plain JSON)."""
        if self._key is None:
            if codec.is_json(stored):
                return stored
            if stored.startswith(SEALED):
                raise BrokenSeal("sealed, but this process has no signing key to check it")
            raise BrokenSeal("not JSON, and without a signing key nothing else is read")
        if not stored.startswith(SEALED) or len(stored) < len(SEALED) + TAG_BYTES:
            raise BrokenSeal("not sealed")
        tag, blob = stored[len(SEALED) : len(SEALED) + TAG_BYTES], stored[len(SEALED) + TAG_BYTES :]
        if not hmac.compare_digest(tag, self._tag(self._key, name, blob)):
            raise BrokenSeal("the seal does not match (altered, forged, or another key's value)")
        return blob

    @staticmethod
    def _tag(key: bytes, name: str, blob: bytes) -> bytes:
        encoded = name.encode()
        mac = hmac.new(key, SEALED + len(encoded).to_bytes(4, "big") + encoded, hashlib.sha256)
        mac.update(blob)
        return mac.digest()
