"""The direct transport on real sockets, without Ray: frames, the handshake, replies, failures."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from typing import Any

import numpy as np
import pytest
import ray

from app.kv import endpoints
from app.kv.direct import (
    AsyncDirectClient,
    DirectClient,
    DirectServer,
    Endpoint,
    Pool,
    TransportError,
    recv_frame,
    send_frame,
)
from app.kv.endpoints import MAX_IDLE_PER_ENDPOINT, MAX_IDLE_S
from app.kv.errors import InvalidArgumentError
from app.kv.handshake import MAGIC
from app.kv.protocol import USE_RAY, ByValue, Call, Moved
from app.kv.shard_base import by_value


class Member:
    """A handler standing in for a shard: a dict, plus calls that fail on purpose."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.calls = 0
        self.gate = threading.Event()
        self.crash: Any = None  # set to the server's close: a member going away mid-call

    def __call__(self, method: str, args: tuple[Any, ...]) -> Any:
        self.calls += 1
        if method == "put":
            self.data[args[0]] = args[1]
            return len(self.data)
        if method == "get":
            return self.data.get(args[0])
        if method == "moved":
            return Moved(3, 7)
        if method == "block":
            self.gate.wait(5)
            return "late"
        if method == "echo":
            return args[0]
        if method == "unpicklable":
            return lambda: None
        if method == "die":
            self.crash()
            return "never sent"
        raise InvalidArgumentError(f"{method!r} is not a direct-transport call")


@pytest.fixture
def server() -> Any:
    member = Member()
    srv = DirectServer(member, "127.0.0.1")
    member.crash = srv.close
    yield srv, member
    member.gate.set()
    srv.close()


def closed_without_reply(raw: socket.socket) -> bool:
    try:
        return raw.recv(1) == b""
    except ConnectionResetError:
        return True


def client_for(endpoint: Endpoint | None, timeout: float = 5.0) -> DirectClient:
    return DirectClient(timeout, fetch_endpoint=lambda handle: endpoint, retry_after_s=60)


def test_frames_round_trip_arrays_out_of_band() -> None:
    left, right = socket.socketpair()
    with left, right:
        array = np.arange(300_000, dtype=np.float32).reshape(600, 500)
        value = {"a": array, "b": b"x" * 10, "fetched": ByValue(array[::2], 1)}
        sender = threading.Thread(target=send_frame, args=(left, value))
        sender.start()
        got = recv_frame(right)
        sender.join()
    np.testing.assert_array_equal(got["a"], array)
    np.testing.assert_array_equal(got["fetched"].value, array[::2])
    assert got["b"] == b"x" * 10
    assert got["a"].flags.writeable  # received into a bytearray, not a read-only bytes


def test_calls_replies_and_pooled_connection(server: Any) -> None:
    srv, member = server
    client = client_for(srv.endpoint)
    for i in range(20):
        pending = client.send("h", "put", (f"k{i}", i))
        assert pending is not None
        assert client.receive(pending) == i + 1
    pending = client.send("h", "get", ("k7",))
    assert pending is not None and client.receive(pending) == 7
    pending = client.send("h", "moved", ())
    assert pending is not None and client.receive(pending) == Moved(3, 7)
    assert client.calls == member.calls == 22 and client.fallbacks == 0
    assert len(srv._conns) == 1  # sequential calls reuse one connection
    client.close()


def test_server_errors_are_raised_as_themselves(server: Any) -> None:
    srv, _ = server
    client = client_for(srv.endpoint)
    pending = client.send("h", "nope", ())
    assert pending is not None
    with pytest.raises(InvalidArgumentError, match="not a direct-transport call"):
        client.receive(pending)
    pending = client.send("h", "get", ("missing",))  # the connection survives the error
    assert pending is not None and client.receive(pending) is None


def test_concurrent_calls_use_separate_connections(server: Any) -> None:
    srv, member = server
    client = client_for(srv.endpoint)
    blocked = client.send("h", "block", ())
    assert blocked is not None
    quick = client.send("h", "put", ("k", 1))
    assert quick is not None and client.receive(quick) == 1
    member.gate.set()
    assert client.receive(blocked) == "late"
    assert len(srv._conns) == 2


def test_a_client_with_a_wrong_secret_uses_ray_and_garbage_is_dropped(server: Any) -> None:
    srv, member = server
    forged = Endpoint(srv.endpoint.host, srv.endpoint.port, b"\x00" * 32)
    client = client_for(forged)
    assert client.send("h", "put", ("k", 1)) is None  # the handshake fails: use Ray
    assert client.fallbacks == 1 and member.calls == 0
    with socket.create_connection((srv.endpoint.host, srv.endpoint.port)) as raw:
        raw.sendall(b"GET / HTTP/1.1\r\n\r\n" + b"x" * 64)
        assert closed_without_reply(raw)
    assert member.calls == 0


def test_no_endpoint_or_dead_endpoint_means_ray(server: Any) -> None:
    srv, _ = server
    assert client_for(None).send("h", "get", ("k",)) is None
    dead = socket.create_server(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()
    client = client_for(Endpoint("127.0.0.1", port, srv.endpoint.secret))
    assert client.send("h", "get", ("k",)) is None
    assert client.fallbacks == 1


def test_a_connection_that_breaks_mid_call_raises_transport_error(server: Any) -> None:
    srv, _ = server
    client = client_for(srv.endpoint)
    pending = client.send("h", "die", ())
    assert pending is not None
    with pytest.raises(TransportError):
        client.receive(pending)
    # The member is left to Ray for retry_after_s; its pooled connections are dropped.
    assert client.send("h", "get", ("k",)) is None
    assert client.fallbacks == 1


def test_reply_timeout_is_a_transport_error(server: Any) -> None:
    srv, member = server
    client = client_for(srv.endpoint, timeout=0.2)
    pending = client.send("h", "block", ())
    assert pending is not None
    with pytest.raises(TransportError):
        client.receive(pending)
    member.gate.set()


def test_magic_is_checked(server: Any) -> None:
    srv, member = server
    with socket.create_connection((srv.endpoint.host, srv.endpoint.port)) as raw:
        raw.sendall(b"X" * len(MAGIC) + srv.endpoint.secret)
        assert closed_without_reply(raw)
    assert member.calls == 0


def test_large_values_go_by_value_within_the_reply_budget() -> None:
    ref = ray.ObjectRef.nil()  # a held value is sent from its local copy: no ray.get here
    held = [ref, 1000, "value"]
    assert by_value(held, 4000) == ByValue("value", 1000)
    assert by_value((held, 7), 4000) == (
        ByValue("value", 1000),
        7,
    )  # get_entry's (payload, version)
    assert by_value([b"small", None, held, Moved(1, 2)], 4000) == [
        b"small",
        None,
        ByValue("value", 1000),
        Moved(1, 2),
    ]
    # Past the budget the whole call goes through Ray, which hands over refs instead.
    assert by_value([held, held, held, held, held], 4000) is USE_RAY
    assert by_value(held, 999) is USE_RAY
    # Replies without large values pass unchanged (a 3-item mget reply is not a payload).
    assert by_value([b"a", b"b", None], 0) == [b"a", b"b", None]
    assert by_value((True, 3), 0) == (True, 3)


class FakeHandle:
    """An actor handle's surface as AsyncDirectClient uses it: `endpoint.remote()` and the
    data-path methods' `.remote()` (the Ray fallback), both awaitable."""

    def __init__(self, endpoint: Endpoint | None) -> None:
        self.endpoint_value = endpoint
        self.ray_calls: list[str] = []

    def __getattr__(self, method: str) -> Any:
        outer = self

        class Method:
            @staticmethod
            def remote(*args: Any) -> Any:
                async def reply() -> Any:
                    if method == "endpoint":
                        return outer.endpoint_value
                    outer.ray_calls.append(method)
                    return ("via ray", method)

                return reply()

        return Method()


async def test_async_client_calls_pools_and_falls_back(server: Any) -> None:
    srv, member = server
    handle = FakeHandle(srv.endpoint)
    client = AsyncDirectClient(5.0)
    assert await client.call(Call(handle, "put", ("k", 1))) == 1
    assert await client.call(Call(handle, "get", ("k",))) == 1
    assert await client.call(Call(handle, "get", ("k",), direct=False)) == ("via ray", "get")
    with pytest.raises(InvalidArgumentError):
        await client.call(Call(handle, "nope", ()))
    # Concurrent calls take separate connections: a blocked one does not hold up the rest.
    blocked = asyncio.ensure_future(client.call(Call(handle, "block", ())))
    await asyncio.sleep(0.05)
    assert await client.call(Call(handle, "get", ("k",))) == 1
    member.gate.set()
    assert await blocked == "late"
    assert client.calls == 5 and handle.ray_calls == ["get"]
    # The member goes away: the call is made through Ray instead, and Ray only for a while.
    srv.close()
    assert await client.call(Call(handle, "get", ("k",))) == ("via ray", "get")
    assert await client.call(Call(handle, "get", ("k",))) == ("via ray", "get")
    assert client.fallbacks == 1
    client.close()


async def test_async_call_cancelled_mid_reply_does_not_poison_the_pool(server: Any) -> None:
    srv, member = server
    handle = FakeHandle(srv.endpoint)
    client = AsyncDirectClient(5.0)
    assert await client.call(Call(handle, "put", ("k", "v"))) == 1
    task = asyncio.ensure_future(client.call(Call(handle, "block", ())))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    member.gate.set()  # the blocked call's reply is sent to a connection nobody reuses
    for _ in range(3):
        assert await client.call(Call(handle, "get", ("k",))) == "v"
    client.close()


async def test_async_client_without_an_endpoint_uses_ray() -> None:
    handle = FakeHandle(None)
    client = AsyncDirectClient(5.0)
    assert await client.call(Call(handle, "get", ("k",))) == ("via ray", "get")
    assert client.calls == 0 and handle.ray_calls == ["get"]


def test_close_stops_the_accept_thread() -> None:
    before = set(threading.enumerate())
    srv = DirectServer(Member(), "127.0.0.1")
    new = set(threading.enumerate()) - before
    accept = next(t for t in new if t.name == "kv-direct-accept")
    srv.close()
    accept.join(2)
    assert not accept.is_alive()


def test_pool_reuses_fresh_connections_and_closes_stale_ones() -> None:
    now = [0.0]
    closed: list[str] = []
    pool: Pool[str] = Pool(closed.append, clock=lambda: now[0])
    here, there = Endpoint("h", 1, b""), Endpoint("h", 2, b"")
    pool.give(here, "old")
    now[0] = MAX_IDLE_S + 1
    pool.give(here, "new")
    pool.give(there, "other")
    assert pool.take(here) == "new"  # newest first; the one idle too long is closed, not reused
    assert closed == ["old"] and pool.take(here) is None
    now[0] += MAX_IDLE_S + 1
    assert pool.take(there) is None and closed == ["old", "other"]
    for i in range(MAX_IDLE_PER_ENDPOINT + 2):
        pool.give(here, f"c{i}")
    assert len(pool) == MAX_IDLE_PER_ENDPOINT and len(closed) == 4  # the overflow is closed
    pool.drop()
    assert len(pool) == 0 and len(closed) == 4 + MAX_IDLE_PER_ENDPOINT


def _explode() -> None:
    raise ImportError("this class lives only in the writer's __main__")


class OnlyImportableByTheWriter:
    """Pickles fine, but unpickling fails: a value whose class the other side cannot import."""

    def __reduce__(self) -> Any:
        return (_explode, ())


def test_what_plain_pickle_cannot_carry_goes_through_ray_on_a_clean_connection(
    server: Any,
) -> None:
    srv, member = server
    client = client_for(srv.endpoint)
    # The client cannot pickle the call: nothing is sent; Ray's cloudpickle will carry it.
    assert client.send("h", "echo", (lambda: None,)) is None
    # The member cannot unpickle it, or cannot pickle its reply, or the client cannot
    # unpickle the reply: USE_RAY each time, and the connection stays in use.
    for method, args in (
        ("echo", (OnlyImportableByTheWriter(),)),
        ("unpicklable", ()),
    ):
        pending = client.send("h", method, args)
        assert pending is not None and client.receive(pending) is USE_RAY
    member.data["bomb"] = OnlyImportableByTheWriter()
    pending = client.send("h", "get", ("bomb",))
    assert pending is not None and client.receive(pending) is USE_RAY
    pending = client.send("h", "put", ("k", 1))
    assert pending is not None and client.receive(pending) == 2
    assert client.fallbacks == 0 and len(srv._conns) == 1


async def test_async_client_sends_what_pickle_cannot_carry_through_ray(server: Any) -> None:
    srv, member = server
    handle = FakeHandle(srv.endpoint)
    client = AsyncDirectClient(5.0)
    member.data["bomb"] = OnlyImportableByTheWriter()
    assert await client.call(Call(handle, "echo", (lambda: None,))) == ("via ray", "echo")
    assert await client.call(Call(handle, "get", ("bomb",))) == ("via ray", "get")
    assert await client.call(Call(handle, "unpicklable", ())) == ("via ray", "unpicklable")
    assert await client.call(Call(handle, "get", ("nothing",))) is None
    assert client.fallbacks == 0


def _wait(condition: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_connections_of_closed_event_loops_are_ended(server: Any) -> None:
    """Each asyncio.run leaves a closed loop behind: closing its client must not raise, and
    must end the connections so the member's threads and connection slots are freed."""
    srv, _ = server
    handle = FakeHandle(srv.endpoint)
    clients = [AsyncDirectClient(5.0) for _ in range(3)]
    for client in clients:
        assert asyncio.run(client.call(Call(handle, "get", ("k",)))) is None
    assert _wait(lambda: len(srv._conns) == 3)
    for client in clients:
        client.close()  # their loops are closed
    assert _wait(lambda: len(srv._conns) == 0)


def test_the_member_ends_connections_left_idle(monkeypatch: Any) -> None:
    srv = DirectServer(Member(), "127.0.0.1", idle_timeout_s=0.2)
    monkeypatch.setattr(endpoints, "MAX_IDLE_S", 0.1)
    client = client_for(srv.endpoint)
    pending = client.send("h", "put", ("k", 1))
    assert pending is not None and client.receive(pending) == 1
    assert len(srv._conns) == 1
    assert _wait(lambda: len(srv._conns) == 0)  # after 2 x MAX_IDLE_S without a request
    time.sleep(0.15)  # the client's copy is stale too: it connects again instead
    pending = client.send("h", "get", ("k",))
    assert pending is not None and client.receive(pending) == 1
    assert client.fallbacks == 0
    srv.close()


def test_a_forked_child_does_not_share_its_parents_connections(server: Any) -> None:
    srv, _ = server
    client = client_for(srv.endpoint)
    pending = client.send("h", "put", ("k", "parent"))
    assert pending is not None and client.receive(pending) == 1
    inherited = client._pool  # holds the parent's connection
    pid = os.fork()
    if pid == 0:  # the child: its call must take a connection of its own
        code = 1
        try:
            pending = client.send("h", "get", ("k",))
            fresh = pending is not None and client._pool is not inherited
            code = 0 if fresh and client.receive(pending) == "parent" else 1
        finally:
            os._exit(code)
    deadline = time.monotonic() + 10
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    if done[0] == 0:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        raise AssertionError("the forked child hung")
    assert os.waitstatus_to_exitcode(done[1]) == 0
    assert _wait(lambda: len(srv._conns) >= 1)
    pending = client.send("h", "get", ("k",))  # the parent's pooled connection still works
    assert pending is not None and client.receive(pending) == "parent"
