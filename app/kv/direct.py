"""Direct transport: the hot data-path calls over a TCP connection to a shard member.

Why a socket beside Ray: one Ray actor call costs about 0.7 ms of task machinery on a 2-core
machine (submission, scheduling on the actor, the reply through the core worker), which is
what redis-py spends on a whole pipeline of 100 GETs. The call itself, a dict lookup under a
lock, takes microseconds. So every shard member also listens on its node's IP
(app.kv.direct_server), and the synchronous client and the primary's replication stream send
their calls there as length-prefixed pickles (app.kv.frames): ~0.1 ms a round trip. Everything
else stays with Ray: the members are Ray actors (placement, failover, lifecycle), clients find
endpoints through Ray actor calls, values written as ObjectRefs (large ones) and every call that
carries a ref still go as actor calls, and any transport failure falls back to the actor call,
which is how a dead member is noticed and failed over as before. Retried writes are safe:
request ids make them apply once.

Ray Compiled Graphs (shared-memory channels) were the other way below the per-call floor; they
run at most one graph per actor (its `_ray_system` concurrency group has one slot), so a shard
could serve only one such client.

Trust. Frames are pickles, so only authenticated peers' frames are read: each member makes a
random secret that clients get through Ray, and client and member prove to each other that they
hold it (HMAC challenge-response, app.kv.handshake) before any call is sent; the secret never
crosses the socket. Frames are capped at the cluster's largest value plus overhead, in both
directions; a call or reply over the cap goes through Ray. When Ray runs with TLS the transport
uses TLS too, or stays off (app.kv.tls).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray

from app.kv.direct_server import DirectServer, Endpoint
from app.kv.endpoints import EndpointBook, Pool
from app.kv.frames import (
    DEFAULT_MAX_FRAME,
    encode_frame,
    read_frame,
    read_frame_async,
    recv_frame,
    send_frame,
    tune,
    unwrap_reply,
    write_frame,
)
from app.kv.handshake import HandshakeError, client_handshake, client_handshake_async
from app.kv.protocol import USE_RAY, Call, UseRay
from app.kv.tls import TransportTLS, ray_tls

__all__ = [
    "AsyncDirectClient",
    "DirectClient",
    "DirectServer",
    "Endpoint",
    "Pool",
    "TransportError",
    "recv_frame",
    "send_frame",
]

log = logging.getLogger(__name__)

ENDPOINT_TIMEOUT_S = 5.0


class TransportError(ConnectionError):
    """The direct connection failed; the caller makes the same call through Ray instead."""


@dataclass(slots=True)
class Pending:
    """A call sent on `conn`, its reply not read yet."""

    endpoint: Endpoint
    conn: socket.socket
    handle: Any


def _impostor(endpoint: Endpoint, exc: HandshakeError) -> None:
    log.warning(
        "kv direct: %s:%d failed the handshake (%s); calls to it go through Ray",
        endpoint.host,
        endpoint.port,
        exc,
    )


def fetch_endpoint(handle: Any) -> Endpoint | None:
    """A member's direct endpoint, asked through Ray (None: the member has none)."""
    endpoint: Endpoint | None = ray.get(handle.endpoint.remote(), timeout=ENDPOINT_TIMEOUT_S)
    return endpoint


class DirectClient(EndpointBook):
    """Pooled blocking connections to members' endpoints, keyed by actor handle; thread-safe.
    `fetch_endpoint(handle)` asks a member for its endpoint (see EndpointBook). `max_frame`
    caps calls sent and replies read (app.kv.frames); `tls` defaults to Ray's settings."""

    def __init__(
        self,
        call_timeout_s: float,
        fetch_endpoint: Callable[[Any], Endpoint | None] = fetch_endpoint,
        connect_timeout_s: float = 1.0,
        retry_after_s: float = 2.0,
        max_frame: int = DEFAULT_MAX_FRAME,
        tls: TransportTLS | None = None,
    ) -> None:
        super().__init__(retry_after_s, ray_tls() if tls is None else tls)
        self._max_frame = max_frame
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
        return self.learned(handle, endpoint)

    def _connect(self, endpoint: Endpoint) -> socket.socket:
        if self._pid != os.getpid():
            # A forked child must not share its parent's connections (their replies would
            # cross); the old pool is left alone: its lock may have been held at the fork.
            self._pid, self._pool = os.getpid(), Pool(socket.socket.close)
        pooled = self._pool.take(endpoint)
        if pooled is not None:
            return pooled
        deadline = time.monotonic() + self._connect_timeout
        sock = socket.create_connection((endpoint.host, endpoint.port), self._connect_timeout)
        try:
            tune(sock)
            if self.tls.client is not None:  # the TLS handshake runs in wrap_socket
                sock = self.tls.client.wrap_socket(sock)
            client_handshake(sock, endpoint.secret, deadline)
            sock.settimeout(self._call_timeout)
        except HandshakeError as exc:
            sock.close()
            _impostor(endpoint, exc)
            raise
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
            parts = encode_frame((method, args), self._max_frame)
        except Exception:  # plain pickle cannot carry it (or it is over the cap): Ray will
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
            frame = read_frame(pending.conn, self._max_frame)
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
        self,
        call_timeout_s: float,
        connect_timeout_s: float = 1.0,
        retry_after_s: float = 2.0,
        max_frame: int = DEFAULT_MAX_FRAME,
        tls: TransportTLS | None = None,
    ) -> None:
        super().__init__(retry_after_s, ray_tls() if tls is None else tls)
        self._max_frame = max_frame
        self._call_timeout = call_timeout_s
        self._connect_timeout = connect_timeout_s
        self._pool: Pool[_Stream] = Pool(_close_stream)

    async def _endpoint(self, handle: Any) -> Endpoint | None:
        found, endpoint = self.known(handle)
        if found:
            return endpoint
        try:
            async with asyncio.timeout(ENDPOINT_TIMEOUT_S):
                endpoint = await handle.endpoint.remote()
        except Exception:
            endpoint = None
        return self.learned(handle, endpoint)

    async def _connect(self, endpoint: Endpoint) -> _Stream:
        pooled = self._pool.take(endpoint)
        if pooled is not None:
            return pooled
        # One deadline for the connect, the TLS handshake and the transport's handshake.
        async with asyncio.timeout(self._connect_timeout):
            if self.tls.client is None:
                reader, writer = await asyncio.open_connection(endpoint.host, endpoint.port)
            else:
                reader, writer = await asyncio.open_connection(
                    endpoint.host, endpoint.port, ssl=self.tls.client, server_hostname=""
                )
            try:
                await client_handshake_async(reader, writer, endpoint.secret)
            except HandshakeError as exc:
                writer.close()
                _impostor(endpoint, exc)
                raise
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
            parts = encode_frame((call.method, call.args), self._max_frame)
        except Exception:  # plain pickle cannot carry it (or it is over the cap): Ray will
            return USE_RAY
        stream: _Stream | None = None
        try:
            stream = await self._connect(endpoint)
            reader, writer = stream
            async with asyncio.timeout(self._call_timeout):
                for part in parts:
                    writer.write(part)
                self.calls += 1
                frame = await read_frame_async(reader, self._max_frame)
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
