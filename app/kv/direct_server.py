"""The member's end of the direct transport: a listening socket, one thread per connection.

A connection must finish the handshake (app.kv.handshake; under TLS, the TLS handshake first)
within one deadline for the whole exchange, HANDSHAKE_TIMEOUT_S, however slowly its bytes come.
At most MAX_UNAUTHENTICATED connections may be in that phase at once: more are closed as soon as
they are accepted, so peers that never authenticate hold a bounded number of threads and slots,
each for a bounded time. Only then is anything read beyond the handshake's fixed-size messages,
and then frames no larger than the cluster's largest value plus overhead (app.kv.frames).

The secret is kept off reprs (Endpoint's field is repr=False) and never logged.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from app.kv.frames import (
    DEFAULT_MAX_FRAME,
    FrameTooLargeError,
    decode_frame,
    encode_frame,
    read_frame,
    tune,
    write_frame,
)
from app.kv.handshake import new_secret, server_handshake
from app.kv.protocol import USE_RAY

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT_S = 5.0
MAX_CONNECTIONS = 1024
# Enough for a burst of clients connecting at once (each handshake takes a round trip or two),
# small next to MAX_CONNECTIONS.
MAX_UNAUTHENTICATED = 64
# An authenticated connection idle this long is ended: one whose client went away does not hold
# a thread and a slot for ever (twice the clients' own reuse limit, app.kv.direct.MAX_IDLE_S).
IDLE_TIMEOUT_S = 120.0


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a member takes direct calls, the secret a client proves it holds, and whether it
    speaks TLS."""

    host: str
    port: int
    secret: bytes = field(repr=False)
    tls: bool = False


def _shutdown(conn: socket.socket) -> None:
    # socket.socket's own shutdown, also for an SSLSocket (whose override would drop its
    # TLS state under a thread still reading it): ends the TCP connection, wakes the reader.
    with contextlib.suppress(OSError):
        socket.socket.shutdown(conn, socket.SHUT_RDWR)


class DirectServer:
    """Accepts connections on `host` (an ephemeral port) and answers each on its own thread
    with `handler(method, args)`: the shard is a threaded actor whose calls already serialise
    on its lock, and a write may block for its replicas, so one thread per connection is the
    simple correct shape. A reply is `(True, result)` or `(False, exception)`."""

    def __init__(
        self,
        handler: Callable[[str, tuple[Any, ...]], Any],
        host: str,
        *,
        max_frame: int = DEFAULT_MAX_FRAME,
        tls: ssl.SSLContext | None = None,
        handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S,
        max_unauthenticated: int = MAX_UNAUTHENTICATED,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
    ) -> None:
        self._handler = handler
        self._max_frame = max_frame
        self._tls = tls
        self._handshake_timeout = handshake_timeout_s
        self._max_unauthenticated = max_unauthenticated
        self._idle_timeout = idle_timeout_s
        self._listener = socket.create_server((host, 0), backlog=128)
        port = self._listener.getsockname()[1]
        self.endpoint = Endpoint(host, port, new_secret(), tls is not None)
        self._conns: set[socket.socket] = set()
        self._unauthenticated = 0
        self.refused = 0  # connections closed at accept: over a cap
        self.failed_handshakes = 0
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
                full = (
                    len(self._conns) >= MAX_CONNECTIONS
                    or self._unauthenticated >= self._max_unauthenticated
                )
                if self._closed or full:
                    self.refused += 1
                    conn.close()
                    continue
                self._conns.add(conn)
                self._unauthenticated += 1
            deadline = time.monotonic() + self._handshake_timeout  # from accept, not thread start
            thread = threading.Thread(target=self._serve, args=(conn, deadline), name="kv-direct")
            thread.daemon = True
            try:
                thread.start()
            except RuntimeError:  # no more threads: refuse this one, keep serving the rest
                self._forget(conn, authenticated=False)
                conn.close()

    def _forget(self, conn: socket.socket, authenticated: bool) -> None:
        with self._lock:
            self._conns.discard(conn)
            if not authenticated:
                self._unauthenticated -= 1

    def _serve(self, conn: socket.socket, deadline: float) -> None:
        authenticated = False
        try:
            tune(conn)
            if self._tls is not None:
                conn = self._wrap(conn)
            self._authenticate(conn, deadline)
            with self._lock:
                self._unauthenticated -= 1
                authenticated = True
            conn.settimeout(self._idle_timeout)
            self._answer(conn)
        except FrameTooLargeError as exc:  # from an authenticated peer: worth a line
            log.warning("kv direct: dropped a connection: %s", exc)
        except (OSError, EOFError, ValueError):
            pass  # the peer left, failed the handshake or sent garbage: drop the connection
        except Exception:
            log.exception("kv direct connection failed")
        finally:
            self._forget(conn, authenticated)
            conn.close()

    def _wrap(self, conn: socket.socket) -> ssl.SSLSocket:
        """`conn` in TLS (handshake not done yet); the wrapper replaces it in `_conns`."""
        assert self._tls is not None
        wrapped = self._tls.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        with self._lock:  # the raw socket is detached now: track (and close) the wrapper
            self._conns.discard(conn)
            self._conns.add(wrapped)
        return wrapped

    def _authenticate(self, conn: socket.socket, deadline: float) -> None:
        """Return once the peer proved it holds the secret (after the TLS handshake when
        configured), all by `deadline`; raise otherwise."""
        try:
            if isinstance(conn, ssl.SSLSocket):
                # ssl bounds the whole TLS handshake by this timeout, not each read.
                conn.settimeout(max(deadline - time.monotonic(), 0.001))
                conn.do_handshake()
            server_handshake(conn, self.endpoint.secret, deadline)
        except (OSError, EOFError, ValueError) as exc:
            with self._lock:
                self.failed_handshakes += 1
            log.debug("kv direct: a connection failed the handshake: %r", exc)
            raise

    def _answer(self, conn: socket.socket) -> None:
        limit = self._max_frame
        while True:
            frame = read_frame(conn, limit)
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
                parts = encode_frame(reply, limit)
            except Exception:  # a reply plain pickle cannot carry, or one over the limit
                parts = encode_frame((True, USE_RAY), limit)
            write_frame(conn, parts)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns, self._conns = list(self._conns), set()
        _shutdown(self._listener)  # wakes the thread blocked in accept (Linux)
        self._listener.close()
        for conn in conns:
            _shutdown(conn)
            conn.close()
