"""The direct transport's defences on real sockets, without Ray: mutual authentication, the
handshake deadline, the cap on unauthenticated connections, the frame cap."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from app.kv.direct import AsyncDirectClient, DirectClient, DirectServer, Endpoint
from app.kv.frames import max_frame_bytes, send_frame
from app.kv.handshake import (
    CHALLENGE_BYTES,
    HELLO_BYTES,
    MAGIC,
    client_handshake,
    hello,
    new_secret,
    proof,
)
from app.kv.protocol import USE_RAY, Call
from app.kv.tls import PLAIN
from tests.unit.test_kv_direct import FakeHandle

DEADLINE_S = 0.5


class Member:
    """A handler standing in for a shard."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def __call__(self, method: str, args: tuple[Any, ...]) -> Any:
        self.calls.append((method, args))
        return b"x" * args[0] if method == "blob" else args


@pytest.fixture
def member() -> Member:
    return Member()


@pytest.fixture
def server(member: Member) -> Iterator[DirectServer]:
    srv = DirectServer(
        member,
        "127.0.0.1",
        max_frame=max_frame_bytes(4096),
        handshake_timeout_s=DEADLINE_S,
        max_unauthenticated=3,
    )
    yield srv
    srv.close()


def client_for(endpoint: Endpoint, max_frame: int = max_frame_bytes(4096)) -> DirectClient:
    return DirectClient(
        5.0,
        fetch_endpoint=lambda handle: endpoint,
        retry_after_s=60,
        max_frame=max_frame,
        tls=PLAIN,
    )


def call(client: DirectClient, method: str, *args: Any) -> Any:
    pending = client.send("h", method, args)
    return None if pending is None else client.receive(pending)


def connect(srv: DirectServer) -> socket.socket:
    return socket.create_connection((srv.endpoint.host, srv.endpoint.port), timeout=5)


def closed_by_peer(raw: socket.socket) -> bool:
    try:
        return raw.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_a_client_with_the_secret_is_served(server: DirectServer, member: Member) -> None:
    client = client_for(server.endpoint)
    assert call(client, "echo", 1, "two") == (1, "two")
    assert member.calls == [("echo", (1, "two"))] and server.failed_handshakes == 0
    client.close()


def test_a_wrong_secret_is_refused_before_anything_is_read(
    server: DirectServer, member: Member
) -> None:
    with connect(server) as raw:
        nonce, msg = hello()
        raw.sendall(msg)
        answer = raw.recv(CHALLENGE_BYTES, socket.MSG_WAITALL)
        server_nonce = answer[len(MAGIC) : len(MAGIC) + 32]
        raw.sendall(proof(new_secret(), b"kv-direct client", nonce, server_nonce))
        send_frame(raw, ("echo", ("smuggled",)))
        assert closed_by_peer(raw)  # no verdict, no reply
    assert member.calls == [] and wait_for(lambda: server.failed_handshakes == 1)


def test_the_secret_never_crosses_the_wire(server: DirectServer) -> None:
    seen = bytearray()
    proxy = Proxy(server.endpoint, seen)
    client = client_for(Endpoint(proxy.host, proxy.port, server.endpoint.secret))
    assert call(client, "echo", "hello") == ("hello",)
    client.close()
    proxy.close()
    assert seen and server.endpoint.secret not in bytes(seen)


def test_an_impostor_server_is_refused_by_the_client(member: Member) -> None:
    """Something listening at a member's address without its secret: the client sends no
    proof and no call, and uses Ray instead."""
    heard = bytearray()
    listener = socket.create_server(("127.0.0.1", 0))

    def impostor() -> None:
        conn, _ = listener.accept()
        with conn:
            heard.extend(conn.recv(HELLO_BYTES, socket.MSG_WAITALL))
            conn.sendall(MAGIC + new_secret() + new_secret())  # a nonce, a made-up proof
            while chunk := conn.recv(4096):
                heard.extend(chunk)

    thread = threading.Thread(target=impostor)
    thread.start()
    client = client_for(Endpoint("127.0.0.1", listener.getsockname()[1], new_secret()))
    assert client.send("h", "echo", ("for the member",)) is None
    thread.join(5)
    listener.close()
    assert len(heard) == HELLO_BYTES  # only the hello: no proof, no call
    assert client.fallbacks == 1 and client.calls == 0


async def test_the_async_client_refuses_an_impostor_too() -> None:
    heard = bytearray()

    async def impostor(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heard.extend(await reader.readexactly(HELLO_BYTES))
        writer.write(MAGIC + new_secret() + new_secret())
        heard.extend(await reader.read())
        writer.close()

    listener = await asyncio.start_server(impostor, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    handle = FakeHandle(Endpoint("127.0.0.1", port, new_secret()))
    client = AsyncDirectClient(5.0, tls=PLAIN)
    assert await client.call(Call(handle, "echo", ("for the member",))) == ("via ray", "echo")
    listener.close()
    await listener.wait_closed()
    assert len(heard) == HELLO_BYTES and client.fallbacks == 1


def test_a_handshake_trickled_past_the_deadline_is_cut_off(server: DirectServer) -> None:
    """A slowloris: one byte every 50 ms keeps each read short, but the deadline is for the
    whole handshake."""
    _, msg = hello()
    with connect(server) as raw:
        started = time.monotonic()
        with pytest.raises(OSError):
            for byte in msg:
                raw.sendall(bytes([byte]))
                time.sleep(0.05)
            raw.recv(1)  # all 40 bytes sent: only if the server did not cut it off first
            raise AssertionError("the server waited out a 2 s trickle")
        elapsed = time.monotonic() - started
    assert elapsed < DEADLINE_S + 1.0
    assert wait_for(lambda: server._unauthenticated == 0 and not server._conns)


def test_the_deadline_covers_the_proof_too(server: DirectServer) -> None:
    _, msg = hello()
    with connect(server) as raw:
        raw.sendall(msg)
        raw.recv(CHALLENGE_BYTES, socket.MSG_WAITALL)
        started = time.monotonic()
        for _ in range(20):  # trickle the 32-byte proof: 1 s, twice the deadline
            try:
                raw.sendall(b"\x00")
            except OSError:
                break
            time.sleep(0.05)
        assert closed_by_peer(raw)
        assert time.monotonic() - started < DEADLINE_S + 1.0
    assert wait_for(lambda: server.failed_handshakes == 1)


def test_unauthenticated_connections_are_capped(member: Member) -> None:
    server = DirectServer(member, "127.0.0.1", handshake_timeout_s=5.0, max_unauthenticated=3)
    try:
        client = client_for(server.endpoint)
        assert call(client, "echo", 1) == (1,)  # authenticated before the flood
        idle = [connect(server) for _ in range(3)]  # the cap: they say nothing
        assert wait_for(lambda: server._unauthenticated == 3)
        with connect(server) as extra:
            started = time.monotonic()
            assert closed_by_peer(extra)
            assert time.monotonic() - started < 2.5  # at once, not at the 5 s deadline
        assert server.refused == 1
        assert call(client, "echo", 2) == (2,)  # the authenticated connection is unaffected
        assert call(client_for(server.endpoint), "echo", 3) is None  # a new one: Ray, for now
        for raw in idle:
            raw.close()
        assert wait_for(lambda: server._unauthenticated == 0)
        assert call(client_for(server.endpoint), "echo", 4) == (4,)
    finally:
        server.close()


def test_an_oversized_frame_closes_the_connection_unread(
    server: DirectServer, member: Member
) -> None:
    with connect(server) as raw:
        client_handshake(raw, server.endpoint.secret, time.monotonic() + 5)
        raw.sendall(struct.pack("!IH", max_frame_bytes(4096) + 1, 0))
        assert closed_by_peer(raw)
    assert member.calls == []


def test_calls_and_replies_over_the_cap_go_through_ray(
    server: DirectServer, member: Member
) -> None:
    client = client_for(server.endpoint)
    assert client.send("h", "echo", (b"x" * (max_frame_bytes(4096) + 1),)) is None
    assert member.calls == [] and client.fallbacks == 0  # not sent, not a transport failure
    assert call(client, "blob", 100) == b"x" * 100
    assert call(client, "blob", max_frame_bytes(4096) + 1) is USE_RAY  # the member's reply
    assert call(client, "blob", 10) == b"x" * 10  # on the same, still clean, connection
    assert len(server._conns) == 1


def test_a_client_reading_a_reply_over_its_cap_drops_it(server: DirectServer) -> None:
    small = client_for(server.endpoint, max_frame=100)
    pending = small.send("h", "blob", (1000,))
    assert pending is not None
    with pytest.raises(ConnectionError):
        small.receive(pending)


def test_the_endpoint_repr_hides_the_secret(server: DirectServer) -> None:
    text = repr(server.endpoint) + str(server.endpoint)
    assert server.endpoint.secret.hex() not in text and repr(server.endpoint.secret) not in text
    assert "secret" not in text


class Proxy:
    """A TCP relay that records every byte crossing it, both ways."""

    def __init__(self, target: Endpoint, seen: bytearray) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.host, self.port = "127.0.0.1", int(self._listener.getsockname()[1])
        self._target, self._seen = target, seen
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        try:
            while True:
                conn, _ = self._listener.accept()
                upstream = socket.create_connection((self._target.host, self._target.port))
                self._socks += [conn, upstream]
                for a, b in ((conn, upstream), (upstream, conn)):
                    threading.Thread(target=self._pump, args=(a, b), daemon=True).start()
        except OSError:
            return

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while chunk := src.recv(65536):
                self._seen.extend(chunk)
                dst.sendall(chunk)
        except OSError:
            pass

    def close(self) -> None:
        self._listener.close()
        for sock in self._socks:
            sock.close()
