"""Exceptions the KV store raises to callers, one class per thing that can go wrong."""

from __future__ import annotations


class KVError(Exception):
    """Base class of every error the KV store raises on purpose."""


class InvalidKeyError(KVError, TypeError):
    """A key is not a str."""


class KeyTooLargeError(KVError, ValueError):
    """A key's UTF-8 encoding is longer than max_key_bytes."""


class ValueNotSerializableError(KVError, TypeError):
    """A value could not be pickled, so it cannot be stored."""


class ValueTooLargeError(KVError, ValueError):
    """A value's serialised size is over max_value_bytes."""


class UnknownConsistencyError(KVError, ValueError):
    """A read or write concern that the store does not know was asked for."""


class InvalidArgumentError(KVError, ValueError):
    """An argument other than a key or value is out of range (a TTL, a page size, a version)."""


class KVUnavailableError(KVError):
    """The store could not complete the call before its deadline (failover, lost quorum)."""


class ClusterNotFoundError(KVError):
    """No KV coordinator with the given name runs in the given namespace."""


class DurabilityError(KVError):
    """A member could not make a write durable (its write-ahead log or snapshot failed on disk).

    The write is not acknowledged, and the member takes no more writes: it answers this to every
    later one and to health checks, so the coordinator replaces it and the client retries on the
    group's next primary."""
