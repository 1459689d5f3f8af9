"""Sharded, replicated key-value store on Ray actors: the names users import."""

from __future__ import annotations

from app.kv.client import KVClient, ScanPage
from app.kv.cluster import shutdown_kv, start_kv
from app.kv.config import KVConfig, ReadConcern, WALSync, WriteConcern
from app.kv.errors import (
    ClusterNotFoundError,
    DurabilityError,
    InvalidArgumentError,
    InvalidKeyError,
    KeyTooLargeError,
    KVError,
    KVUnavailableError,
    UnknownConsistencyError,
    ValueNotSerializableError,
    ValueTooLargeError,
)
from app.kv.slots import NUM_SLOTS, key_slot

__all__ = [
    "NUM_SLOTS",
    "ClusterNotFoundError",
    "DurabilityError",
    "InvalidArgumentError",
    "InvalidKeyError",
    "KVClient",
    "KVConfig",
    "KVError",
    "KVUnavailableError",
    "KeyTooLargeError",
    "ReadConcern",
    "ScanPage",
    "UnknownConsistencyError",
    "ValueNotSerializableError",
    "ValueTooLargeError",
    "WALSync",
    "WriteConcern",
    "key_slot",
    "shutdown_kv",
    "start_kv",
]
