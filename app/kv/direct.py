"""Direct transport: the hot data-path calls over a TCP connection to a shard member.

Why a socket beside Ray: one Ray actor call costs about 0.7 ms of task machinery on a 2-core
machine (submission, scheduling on the actor, the reply through the core worker), which is
what redis-py spends on a whole pipeline of 100 GETs. The call itself, a dict lookup under a
lock, takes microseconds. So every shard member also listens on its node's IP, and the
synchronous client and the primary's replication stream send their calls there as
length-prefixed pickles: ~0.1 ms a round trip. Everything else stays with Ray: the members are
Ray actors (placement, failover, lifecycle), clients find endpoints through Ray actor calls,
values written as ObjectRefs (large ones) and every call that carries a ref still go as actor
calls, and any transport failure falls back to the actor call, which is how a dead member is
noticed and failed over as before. Retried writes are safe: request ids make them apply once.

Ray Compiled Graphs (shared-memory channels) were the other way below the per-call floor; they
run at most one graph per actor (its `_ray_system` concurrency group has one slot), so a shard
could serve only one such client.

Trust: the same as Ray's own ports (pickles between the cluster's nodes). On top of that each
member makes a random token that clients get through Ray; a connection must present it before
anything it sends is unpickled.

Frame: `!IH` (pickle length, number of out-of-band buffers), one `!Q` length per buffer, the
pickle (protocol 5), then the buffers, so a large array travels without an extra copy on
either side.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import pickle
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import ray

from app.kv.protocol import USE_RAY, Call, UseRay

log = logging.getLogger(__name__)

MAGIC = b"APPKV\x00\x00\x01"
TOKEN_BYTES = 32
_HEAD = struct.Struct("!IH")
_LEN = struct.Struct("!Q")
_OK = b"\x01"
HELLO_TIMEOUT_S = 5.0
MAX_FRAME = 1 << 31  # a frame over 2 GiB is a broken peer, not a request
MAX_CONNECTIONS = 1024
# An idle connection older than this is closed rather than reused: a NAT or firewall between
# nodes may have dropped it silently, and a call sent on it would wait out the call timeout.
MAX_IDLE_S = 60.0
MAX_IDLE_PER_ENDPOINT = 32


class TransportError(ConnectionError):
    """The direct connection failed; the caller makes the same call through Ray instead."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int
    token: bytes


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if not k:
            raise ConnectionError("peer closed the connection")
        got += k
    return buf


# Pickling and I/O are separate steps: a value this process cannot pickle, or a frame it
# cannot unpickle (a class only the other side can import), leaves the connection clean, and
# the call goes through Ray instead, whose cloudpickle handles such values.
def encode_frame(obj: Any) -> list[bytes | memoryview]:
    """The frame's parts; raises whatever pickling raises, before anything is sent."""
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    raws = [buf.raw() for buf in buffers]
    lengths = b"".join(_LEN.pack(raw.nbytes) for raw in raws)
    return [_HEAD.pack(len(data), len(raws)) + lengths + data, *raws]


def write_frame(sock: socket.socket, parts: list[bytes | memoryview]) -> None:
    for part in parts:
        sock.sendall(part)


def read_frame(sock: socket.socket) -> tuple[bytearray, list[bytearray]]:
    """A whole frame's pickle and buffers (I/O errors only: nothing is unpickled here)."""
    size, count = _HEAD.unpack(_recv_exact(sock, _HEAD.size))
    lengths = [n for (n,) in _LEN.iter_unpack(_recv_exact(sock, _LEN.size * count))]
    if size + sum(lengths) > MAX_FRAME:
        raise ConnectionError(f"frame of {size + sum(lengths)} bytes is over the limit")
    data = _recv_exact(sock, size)
    return data, [_recv_exact(sock, n) for n in lengths]


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


def send_frame(sock: socket.socket, obj: Any) -> None:
    write_frame(sock, encode_frame(obj))


def recv_frame(sock: socket.socket) -> Any:
    return decode_frame(*read_frame(sock))


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    # A peer whose node vanished is found in about 90 s instead of the kernel's 2 h default.
    for option, value in (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


class DirectServer:
    """Accepts connections on `host` (an ephemeral port) and answers each on its own thread
    with `handler(method, args)`: the shard is a threaded actor whose calls already serialise
    on its lock, and a write may block for its replicas, so one thread per connection is the
    simple correct shape. A reply is `(True, result)` or `(False, exception)`."""

    def __init__(self, handler: Callable[[str, tuple[Any, ...]], Any], host: str) -> None:
        self._handler = handler
        self.token = os.urandom(TOKEN_BYTES)
        self._listener = socket.create_server((host, 0), backlog=128)
        self.endpoint = Endpoint(host, self._listener.getsockname()[1], self.token)
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, name="kv-direct-accept", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._listener.accept()
            except OSError as exc:
                if self._closed:
                    return
                # ECONNABORTED, EMFILE, ENOBUFS...: transient; the server must outlive them.
                log.warning("kv direct accept failed: %r", exc)
                time.sleep(0.05)
                continue
            with self._lock:
                if self._closed or len(self._conns) >= MAX_CONNECTIONS:
                    conn.close()
                    continue
                self._conns.add(conn)
            thread = threading.Thread(target=self._serve, args=(conn,), name="kv-direct")
            thread.daemon = True
            try:
                thread.start()
            except RuntimeError:  # no more threads: refuse this one, keep serving the rest
                with self._lock:
                    self._conns.discard(conn)
                conn.close()

    def _serve(self, conn: socket.socket) -> None:
        try:
            _tune(conn)
            conn.settimeout(HELLO_TIMEOUT_S)
            hello = bytes(_recv_exact(conn, len(MAGIC) + TOKEN_BYTES))
            if hello[: len(MAGIC)] != MAGIC or not hmac.compare_digest(
                hello[len(MAGIC) :], self.token
            ):
                return
            # An idle connection is ended after twice the client's reuse limit: one whose
            # client went away does not hold a thread and a slot of MAX_CONNECTIONS for ever.
            conn.settimeout(2 * MAX_IDLE_S)
            conn.sendall(_OK)
            while True:
                frame = read_frame(conn)
                reply: tuple[bool, Any]
                try:
                    method, args = decode_frame(*frame)
                except Exception:  # not importable here: let Ray's cloudpickle carry it
                    reply = (True, USE_RAY)
                else:
                    try:
                        reply = (True, self._handler(method, args))
                    except Exception as exc:
                        reply = (False, exc)
                try:
                    parts = encode_frame(reply)
                except Exception:  # a reply (or exception) plain pickle cannot carry
                    parts = encode_frame((True, USE_RAY))
                write_frame(conn, parts)
        except (OSError, EOFError, ValueError):
            pass  # the peer left or sent garbage: drop the connection
        except Exception:
            log.exception("kv direct connection failed")
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns, self._conns = list(self._conns), set()
        with contextlib.suppress(OSError):  # wakes the thread blocked in accept (Linux)
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()


@dataclass(slots=True)
class Pending:
    """A call sent on `conn`, its reply not read yet."""

    endpoint: Endpoint
    conn: socket.socket
    handle: Any


MAX_HOLD_S = 300.0

C = TypeVar("C")


class Pool(Generic[C]):
    """Idle connections per endpoint, newest reused first; thread-safe."""

    def __init__(self, close: Callable[[C], None], clock: Callable[[], float] = time.monotonic):
        self._close = close
        self._clock = clock
        self._lock = threading.Lock()
        self._idle: dict[Endpoint, list[tuple[C, float]]] = {}

    def take(self, endpoint: Endpoint) -> C | None:
        stale: list[C] = []
        found: C | None = None
        with self._lock:
            idle = self._idle.get(endpoint)
            oldest = self._clock() - MAX_IDLE_S
            while idle:
                conn, released = idle.pop()
                if released >= oldest:
                    found = conn
                    break
                stale.append(conn)
            if idle:  # whatever is older than the one found is stale as well
                stale.extend(c for c, released in idle if released < oldest)
                idle[:] = [(c, released) for c, released in idle if released >= oldest]
        for conn in stale:
            self._safe_close(conn)
        return found

    def _safe_close(self, conn: C) -> None:
        try:
            self._close(conn)
        except Exception:  # one connection that will not close must not keep the rest open
            log.debug("closing a kv direct connection failed", exc_info=True)

    def give(self, endpoint: Endpoint, conn: C) -> None:
        with self._lock:
            idle = self._idle.setdefault(endpoint, [])
            pooled = len(idle) < MAX_IDLE_PER_ENDPOINT
            if pooled:
                idle.append((conn, self._clock()))
        if not pooled:
            self._safe_close(conn)

    def drop(self, endpoint: Endpoint | None = None) -> None:
        """Close the idle connections of `endpoint` (of every endpoint when None)."""
        with self._lock:
            if endpoint is None:
                dropped = [c for idle in self._idle.values() for c, _ in idle]
                self._idle = {}
            else:
                dropped = [c for c, _ in self._idle.pop(endpoint, [])]
        for conn in dropped:
            self._safe_close(conn)

    def __len__(self) -> int:
        with self._lock:
            return sum(len(idle) for idle in self._idle.values())


class EndpointBook:
    """Which members take direct calls, and where: each endpoint is asked of its member once
    (a Ray call). A member without one, or whose connection just failed, is left to Ray calls
    for a while before it is tried again (it may have been replaced at a new port): 2 s after a
    first failure, doubling with each failure in a row up to 5 min, so a member the network
    does not let us reach (a firewall) costs a stalled connect rarely, not every 2 s."""

    def __init__(self, retry_after_s: float) -> None:
        self._retry_after = retry_after_s
        self._endpoints: dict[Any, tuple[Endpoint | None, float]] = {}
        self._strikes: dict[Any, int] = {}
        self.calls = 0
        self.fallbacks = 0

    def known(self, handle: Any) -> tuple[bool, Endpoint | None]:
        """(True, endpoint or None) when the book has an answer, (False, None) to ask."""
        cached = self._endpoints.get(handle)
        if cached is not None and (cached[0] is not None or time.monotonic() < cached[1]):
            return True, cached[0]
        return False, None

    def learned(self, handle: Any, endpoint: Endpoint | None) -> None:
        self._endpoints[handle] = (endpoint, time.monotonic() + self._retry_after)

    def failed(self, handle: Any) -> None:
        self.fallbacks += 1
        strikes = self._strikes.get(handle, 0) + 1
        self._strikes[handle] = strikes
        hold = min(self._retry_after * 2 ** (strikes - 1), MAX_HOLD_S)
        self._endpoints[handle] = (None, time.monotonic() + hold)

    def answered(self, handle: Any) -> None:
        if self._strikes:
            self._strikes.pop(handle, None)


def fetch_endpoint(handle: Any) -> Endpoint | None:
    """A member's direct endpoint, asked through Ray (None: the member has none)."""
    endpoint: Endpoint | None = ray.get(handle.endpoint.remote(), timeout=HELLO_TIMEOUT_S)
    return endpoint


class DirectClient(EndpointBook):
    """Pooled blocking connections to members' endpoints, keyed by actor handle; thread-safe.
    `fetch_endpoint(handle)` asks a member for its endpoint (see EndpointBook)."""

    def __init__(
        self,
        call_timeout_s: float,
        fetch_endpoint: Callable[[Any], Endpoint | None] = fetch_endpoint,
        connect_timeout_s: float = 1.0,
        retry_after_s: float = 2.0,
    ) -> None:
        super().__init__(retry_after_s)
        self._fetch = fetch_endpoint
        self._call_timeout = call_timeout_s
        self._connect_timeout = connect_timeout_s
        self._pool: Pool[socket.socket] = Pool(socket.socket.close)
        self._pid = os.getpid()

    def _endpoint(self, handle: Any) -> Endpoint | None:
        found, endpoint = self.known(handle)
        if found:
            return endpoint
        try:
            endpoint = self._fetch(handle)
        except Exception:
            endpoint = None
        self.learned(handle, endpoint)
        return endpoint

    def _connect(self, endpoint: Endpoint) -> socket.socket:
        if self._pid != os.getpid():
            # A forked child must not share its parent's connections (their replies would
            # cross); the old pool is left alone: its lock may have been held at the fork.
            self._pid, self._pool = os.getpid(), Pool(socket.socket.close)
        pooled = self._pool.take(endpoint)
        if pooled is not None:
            return pooled
        sock = socket.create_connection((endpoint.host, endpoint.port), self._connect_timeout)
        try:
            _tune(sock)
            sock.sendall(MAGIC + endpoint.token)
            if _recv_exact(sock, 1) != _OK:
                raise ConnectionError("endpoint refused the token")
            sock.settimeout(self._call_timeout)
        except BaseException:
            sock.close()
            raise
        return sock

    def _drop(self, handle: Any, endpoint: Endpoint) -> None:
        self.failed(handle)
        self._pool.drop(endpoint)

    def send(self, handle: Any, method: str, args: tuple[Any, ...]) -> Pending | None:
        """Send a call; None when it must go through Ray (no endpoint, or it failed)."""
        endpoint = self._endpoint(handle)
        if endpoint is None:
            return None
        try:
            parts = encode_frame((method, args))
        except Exception:  # plain pickle cannot carry it: Ray's cloudpickle will
            return None
        try:
            sock = self._connect(endpoint)
        except OSError:
            self._drop(handle, endpoint)
            return None
        try:
            write_frame(sock, parts)
        except OSError:
            sock.close()
            self._drop(handle, endpoint)
            return None
        self.calls += 1
        return Pending(endpoint, sock, handle)

    def receive(self, pending: Pending) -> Any:
        """The reply to a sent call; TransportError if the connection broke (the call may or
        may not have run: only calls that are safe to repeat use this transport). USE_RAY when
        the reply cannot be unpickled here: the same call through Ray will carry it."""
        try:
            frame = read_frame(pending.conn)
        except (OSError, EOFError, ValueError) as exc:
            pending.conn.close()
            self._drop(pending.handle, pending.endpoint)
            raise TransportError(str(exc)) from exc
        self.answered(pending.handle)
        self._pool.give(pending.endpoint, pending.conn)
        return unwrap_reply(frame)

    # Making calls: direct when possible, else (and after a transport failure) through Ray --
    def call(self, call: Call, timeout: float | None = None) -> Any:
        """The reply to `call`; Ray's exceptions when it had to go through Ray and failed."""
        if call.direct:
            pending = self.send(call.handle, call.method, call.args)
            if pending is not None:
                try:
                    reply = self.receive(pending)
                    if type(reply) is not UseRay:
                        return reply
                except TransportError:
                    pass
        return ray.get(call.submit(), timeout=timeout)

    def call_many(self, calls: list[Any]) -> list[Any]:
        """Replies to several calls (Call objects or ObjectRefs already submitted), all sent
        before any reply is read, so calls to different members run in parallel."""
        sent: list[Any] = []
        for call in calls:
            if type(call) is not Call:
                sent.append(call)
                continue
            pending = self.send(call.handle, call.method, call.args) if call.direct else None
            sent.append(call.submit() if pending is None else pending)
        # Every direct reply is read even after one fails, so no connection is left
        # mid-reply; calls that must go through Ray after all are submitted together.
        out: list[Any] = [None] * len(calls)
        error: BaseException | None = None
        for i, request in enumerate(sent):
            if type(request) is not Pending:
                continue
            try:
                reply = self.receive(request)
            except TransportError:
                reply = USE_RAY
            except Exception as exc:
                error = error or exc
                reply = None
            sent[i] = calls[i].submit() if type(reply) is UseRay else None
            out[i] = reply
        for i, request in enumerate(sent):
            if request is not None:
                try:
                    out[i] = ray.get(request)
                except Exception as exc:
                    error = error or exc
        if error is not None:
            raise error
        return out

    def close(self) -> None:
        self._pool.drop()


# asyncio ---------------------------------------------------------------------------------
async def _read_frame(reader: asyncio.StreamReader) -> tuple[bytes, list[bytes]]:
    size, count = _HEAD.unpack(await reader.readexactly(_HEAD.size))
    lengths = [n for (n,) in _LEN.iter_unpack(await reader.readexactly(_LEN.size * count))]
    if size + sum(lengths) > MAX_FRAME:
        raise ConnectionError(f"frame of {size + sum(lengths)} bytes is over the limit")
    data = await reader.readexactly(size)
    return data, [await reader.readexactly(n) for n in lengths]


_Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def _close_stream(stream: _Stream) -> None:
    writer = stream[1]
    try:
        writer.close()
    except RuntimeError:  # its event loop is closed: end the TCP connection all the same
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class AsyncDirectClient(EndpointBook):
    """The asyncio twin of DirectClient, for one event loop: pooled stream connections, one
    call in flight on each, so concurrent calls run on several connections."""

    def __init__(
        self, call_timeout_s: float, connect_timeout_s: float = 1.0, retry_after_s: float = 2.0
    ) -> None:
        super().__init__(retry_after_s)
        self._call_timeout = call_timeout_s
        self._connect_timeout = connect_timeout_s
        self._pool: Pool[_Stream] = Pool(_close_stream)

    async def _endpoint(self, handle: Any) -> Endpoint | None:
        found, endpoint = self.known(handle)
        if found:
            return endpoint
        try:
            async with asyncio.timeout(HELLO_TIMEOUT_S):
                endpoint = await handle.endpoint.remote()
        except Exception:
            endpoint = None
        self.learned(handle, endpoint)
        return endpoint

    async def _connect(self, endpoint: Endpoint) -> _Stream:
        pooled = self._pool.take(endpoint)
        if pooled is not None:
            return pooled
        async with asyncio.timeout(self._connect_timeout):
            reader, writer = await asyncio.open_connection(endpoint.host, endpoint.port)
            try:
                writer.write(MAGIC + endpoint.token)
                if await reader.readexactly(1) != _OK:
                    raise ConnectionError("endpoint refused the token")
            except BaseException:
                writer.close()
                raise
        return reader, writer

    def _drop(self, handle: Any, endpoint: Endpoint) -> None:
        self.failed(handle)
        self._pool.drop(endpoint)

    async def call(self, call: Call) -> Any:
        """The reply to `call`, direct when possible, else (and after a transport failure)
        as a Ray actor call."""
        endpoint = await self._endpoint(call.handle) if call.direct else None
        if endpoint is not None:
            reply = await self._roundtrip(call, endpoint)
            if type(reply) is not UseRay:
                return reply
        return await call.submit()

    async def _roundtrip(self, call: Call, endpoint: Endpoint) -> Any:
        """The call's reply over a connection, or USE_RAY when the transport failed or the
        request or reply is something only Ray's cloudpickle carries."""
        try:
            parts = encode_frame((call.method, call.args))
        except Exception:
            return USE_RAY
        stream: _Stream | None = None
        try:
            stream = await self._connect(endpoint)
            reader, writer = stream
            async with asyncio.timeout(self._call_timeout):
                for part in parts:
                    writer.write(part)
                self.calls += 1
                frame = await _read_frame(reader)
        except (OSError, EOFError, ValueError, TimeoutError):
            if stream is not None:
                stream[1].close()
            self._drop(call.handle, endpoint)
            return USE_RAY
        except BaseException:  # cancelled mid-call: the reply would be left on the connection
            if stream is not None:
                stream[1].close()
            raise
        self.answered(call.handle)
        self._pool.give(endpoint, stream)
        return unwrap_reply(frame)

    def close(self) -> None:
        self._pool.drop()
