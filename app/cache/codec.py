"""How a cached value crosses to the L2 tiers as bytes: JSON when the value survives JSON
unchanged (response dicts, embeddings), pickle otherwise; one leading byte says which.

Decoding pickle runs code the bytes choose, so only blobs from a trusted source may be decoded:
the cache actors (inside the cluster), or Redis after its seal checked (app/cache/sealing.py).
"""

from __future__ import annotations

import pickle
from typing import Any

import orjson

JSON = b"J"
PICKLE = b"P"


class UndecodableValue(ValueError):
    """A blob this codec did not write: another format (an older release's), or corrupt."""


def encode(value: Any) -> bytes:
    """JSON when decoding it gives back an equal value, else pickle. So a tuple, bytes, a NaN,
    a datetime, an int-keyed dict or an object travel as pickle: JSON would change them."""
    try:
        text = orjson.dumps(value)
        exact = bool(orjson.loads(text) == value)
    except Exception:  # not serialisable, or an __eq__ that cannot compare with plain data
        exact = False
    if exact:
        return JSON + text
    return PICKLE + pickle.dumps(value, protocol=5)


def is_json(blob: bytes) -> bool:
    return blob[:1] == JSON


def decode(blob: bytes) -> Any:
    """The value of a blob from `encode`; raises UndecodableValue for anything else."""
    kind, body = blob[:1], memoryview(blob)[1:]
    if kind == JSON:
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise UndecodableValue(f"invalid JSON ({exc})") from None
    if kind == PICKLE:
        try:
            return pickle.loads(body)
        except Exception as exc:  # a truncated or foreign pickle fails in many ways
            raise UndecodableValue(f"invalid pickle ({type(exc).__name__})") from None
    raise UndecodableValue(f"unknown format {bytes(blob[:1])!r}")
