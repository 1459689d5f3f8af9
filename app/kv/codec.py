"""Value encoding on the client: pickled bytes inline, large values through the object store."""

from __future__ import annotations

import pickle
from typing import Any

import ray

from app.kv.errors import ValueNotSerializableError, ValueTooLargeError
from app.kv.protocol import ByValue


def encode(value: Any, large_bytes: int, max_bytes: int, by_value: bool = False) -> Any:
    """Pickled bytes for a small value; for one of `large_bytes` or more, `ByValue` (sent whole
    over the direct transport, out-of-band buffers and all) or `[ObjectRef, size]`.

    Pickling with a buffer callback measures numpy-style buffers without copying them, so a
    large array is copied once, into the object store, where readers map it without a copy. The
    ref travels inside a list so Ray hands it to the shard as a ref instead of resolving it.
    """
    buffers: list[pickle.PickleBuffer] = []
    try:
        data = pickle.dumps(value, protocol=5, buffer_callback=buffers.append)
    except Exception as exc:
        raise ValueNotSerializableError(
            f"cannot store a value of type {type(value).__name__}: it is not picklable ({exc})"
        ) from exc
    size = len(data)
    if buffers:
        size += sum(buf.raw().nbytes for buf in buffers)
    if size > max_bytes:
        raise ValueTooLargeError(f"value is {size} bytes; the limit is {max_bytes}")
    if size < large_bytes:
        return data if not buffers else pickle.dumps(value, protocol=5)
    if by_value:
        return ByValue(value, size)
    return [ray.put(value), size]


def decode_inline(payload: bytes) -> Any:
    return pickle.loads(payload)
