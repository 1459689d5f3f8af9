"""Frames of the KV direct transport: length-prefixed pickles with out-of-band buffers, capped.

Frame: `!IH` (pickle length, number of out-of-band buffers), one `!Q` length per buffer, the
pickle (protocol 5), then the buffers, so a large array is sent without an extra copy.

A frame's body (pickle plus buffers) may be at most `limit` bytes: the cluster's largest value
plus FRAME_OVERHEAD for the call around it (`max_frame_bytes`). A receiver checks the announced
lengths before reading any of the body and drops the connection when they are over; it then
reads into buffers that grow as bytes arrive (doubling from 64 KiB), so a peer announcing a
large frame and sending little of it costs little memory. A sender checks the same limit before
sending anything (FrameTooLargeError), and the caller sends the call through Ray instead.

Pickling and I/O are separate steps: a value this process cannot pickle, or a frame it cannot
unpickle (a class only the other side can import), leaves the connection clean, and the call
goes through Ray instead, whose cloudpickle handles such values.
"""

from __future__ import annotations

import asyncio
import pickle
import socket
import struct
from typing import Any

from app.kv.protocol import USE_RAY

_HEAD = struct.Struct("!IH")
_LEN = struct.Struct("!Q")
_FIRST_CHUNK = 1 << 16
# Room for the call around a value (method name, key, arguments, pickle framing).
FRAME_OVERHEAD = 1 << 20
DEFAULT_MAX_VALUE_BYTES = 512 << 20  # KVConfig.max_value_bytes's default


class FrameTooLargeError(ConnectionError):
    """A frame over the size limit: refused before it is sent, or before it is read."""


def max_frame_bytes(max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES) -> int:
    """The largest frame body a cluster whose values are at most `max_value_bytes` needs."""
    return max_value_bytes + FRAME_OVERHEAD


DEFAULT_MAX_FRAME = max_frame_bytes()


def tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    # A peer whose node vanished is found in about 90 s instead of the kernel's 2 h default.
    for option, value in (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


def recv_exact(sock: socket.socket, n: int) -> bytearray:
    """`n` bytes, into a buffer that doubles as they arrive rather than `n` bytes up front."""
    buf = bytearray(min(n, _FIRST_CHUNK))
    got = 0
    while got < n:
        if got == len(buf):
            buf.extend(bytes(min(n - got, got)))
        with memoryview(buf)[got:] as free:
            k = sock.recv_into(free)
        if not k:
            raise ConnectionError("peer closed the connection")
        got += k
    return buf


def encode_frame(obj: Any, limit: int) -> list[bytes | memoryview]:
    """The frame's parts; raises whatever pickling raises, or FrameTooLargeError, before
    anything is sent."""
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    raws = [buf.raw() for buf in buffers]
    _check(len(data), [raw.nbytes for raw in raws], limit)
    lengths = b"".join(_LEN.pack(raw.nbytes) for raw in raws)
    return [_HEAD.pack(len(data), len(raws)) + lengths + data, *raws]


def _check(size: int, lengths: list[int], limit: int) -> None:
    body = size + sum(lengths)
    if body > limit:
        raise FrameTooLargeError(f"frame of {body} bytes is over the limit of {limit}")


def write_frame(sock: socket.socket, parts: list[bytes | memoryview]) -> None:
    for part in parts:
        sock.sendall(part)


def read_frame(sock: socket.socket, limit: int) -> tuple[bytearray, list[bytearray]]:
    """A whole frame's pickle and buffers (I/O errors only: nothing is unpickled here)."""
    size, count = _HEAD.unpack(recv_exact(sock, _HEAD.size))
    _check(size, [], limit)
    lengths = [n for (n,) in _LEN.iter_unpack(recv_exact(sock, _LEN.size * count))]
    _check(size, lengths, limit)
    data = recv_exact(sock, size)
    return data, [recv_exact(sock, n) for n in lengths]


async def read_frame_async(reader: asyncio.StreamReader, limit: int) -> tuple[bytes, list[bytes]]:
    """read_frame for a stream (whose buffer, too, grows only as bytes arrive)."""
    size, count = _HEAD.unpack(await reader.readexactly(_HEAD.size))
    _check(size, [], limit)
    lengths = [n for (n,) in _LEN.iter_unpack(await reader.readexactly(_LEN.size * count))]
    _check(size, lengths, limit)
    data = await reader.readexactly(size)
    return data, [await reader.readexactly(n) for n in lengths]


def decode_frame(data: bytearray | bytes, buffers: list[Any]) -> Any:
    return pickle.loads(data, buffers=buffers)


def unwrap_reply(frame: tuple[Any, list[Any]]) -> Any:
    """A reply frame's result: the member's exception is raised; USE_RAY when the reply
    cannot be unpickled here (the same call through Ray will carry it)."""
    try:
        ok, value = decode_frame(*frame)
    except Exception:
        return USE_RAY
    if ok:
        return value
    raise value


def send_frame(sock: socket.socket, obj: Any, limit: int = DEFAULT_MAX_FRAME) -> None:
    write_frame(sock, encode_frame(obj, limit))


def recv_frame(sock: socket.socket, limit: int = DEFAULT_MAX_FRAME) -> Any:
    return decode_frame(*read_frame(sock, limit))
