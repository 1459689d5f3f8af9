"""Frames of the direct transport: the size cap, and buffers that grow only as bytes arrive."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import tracemalloc

import pytest

from app.kv.frames import (
    FRAME_OVERHEAD,
    FrameTooLargeError,
    encode_frame,
    max_frame_bytes,
    read_frame,
    read_frame_async,
    recv_exact,
    recv_frame,
    send_frame,
)

HEAD = struct.Struct("!IH")
LEN = struct.Struct("!Q")


def test_the_cap_is_the_largest_value_plus_overhead() -> None:
    assert max_frame_bytes(1000) == 1000 + FRAME_OVERHEAD
    encode_frame(b"x" * 900, 1000)
    with pytest.raises(FrameTooLargeError):
        encode_frame(b"x" * 1001, 1000)  # refused before anything is sent


def test_an_oversized_length_header_is_refused_before_reading_the_body() -> None:
    left, right = socket.socketpair()
    with left, right:
        left.sendall(HEAD.pack(2000, 0) + b"x" * 10)
        with pytest.raises(FrameTooLargeError):
            read_frame(right, 1000)
        # Out-of-band buffers count too.
        left.sendall(HEAD.pack(10, 2) + LEN.pack(500) + LEN.pack(600))
        with pytest.raises(FrameTooLargeError):
            read_frame(right, 1000)


def test_a_frame_within_the_cap_round_trips() -> None:
    left, right = socket.socketpair()
    with left, right:
        send_frame(left, {"k": b"v" * 500}, 1000)
        assert recv_frame(right, 1000) == {"k": b"v" * 500}


def test_buffers_grow_as_bytes_arrive_not_to_the_announced_length() -> None:
    """A peer announcing 256 MiB and sending 1 KiB costs kilobytes, not 256 MiB."""
    left, right = socket.socketpair()
    with left, right:
        left.sendall(HEAD.pack(256 << 20, 0) + b"x" * 1024)
        left.shutdown(socket.SHUT_WR)
        tracemalloc.start()
        try:
            with pytest.raises(ConnectionError, match="closed"):
                read_frame(right, 1 << 30)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert peak < 1 << 20


def test_a_large_body_arrives_whole_through_the_growing_buffer() -> None:
    left, right = socket.socketpair()
    payload = bytes(range(256)) * 20_000  # ~5 MiB, past several doublings
    with left, right:
        sender = threading.Thread(target=left.sendall, args=(payload,))
        sender.start()
        got = recv_exact(right, len(payload))
        sender.join()
    assert got == payload


async def test_the_stream_reader_refuses_oversized_frames_too() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(HEAD.pack(5000, 0))
    with pytest.raises(FrameTooLargeError):
        await read_frame_async(reader, 1000)
