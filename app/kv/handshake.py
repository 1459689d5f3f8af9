"""Mutual authentication of a direct-transport connection: challenge-response over the member's
secret.

Each member makes a random secret that clients learn through Ray (its `endpoint` actor call);
the secret itself never crosses the socket. Each side proves it holds the secret with
HMAC-SHA256 over both sides' fresh random nonces, so a recorded exchange cannot be replayed,
and each proof names its direction, so one cannot be reflected as the other:

    client -> server  MAGIC, client nonce                                    40 bytes
    server -> client  MAGIC, server nonce, HMAC(secret, "server", nonces)   72 bytes
    client -> server  HMAC(secret, "client", nonces)                        32 bytes
    server -> client  OK                                                     1 byte

The client checks the server's proof before it sends its own or any call, so it does not talk to
an impostor (say, a process now listening at a replaced member's port). Before a client has
proved itself the server reads only these fixed-size messages, all within one deadline for the
whole exchange (see app.kv.direct_server). Proofs are compared with hmac.compare_digest.

This authenticates the two ends; it does not protect the frames that follow from someone on the
network path. Against that, run Ray with TLS: the transport then uses TLS too (app.kv.tls).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import socket
import time

MAGIC = b"APPKV\x00\x00\x02"
SECRET_BYTES = 32
NONCE_BYTES = 32
PROOF_BYTES = hashlib.sha256().digest_size
OK = b"\x01"
HELLO_BYTES = len(MAGIC) + NONCE_BYTES
CHALLENGE_BYTES = len(MAGIC) + NONCE_BYTES + PROOF_BYTES
_SERVER, _CLIENT = b"kv-direct server", b"kv-direct client"


class HandshakeError(ConnectionError):
    """The peer did not prove it holds the member's secret, or does not speak the protocol."""


def new_secret() -> bytes:
    return secrets.token_bytes(SECRET_BYTES)


def proof(secret: bytes, role: bytes, client_nonce: bytes, server_nonce: bytes) -> bytes:
    return hmac.new(secret, role + MAGIC + client_nonce + server_nonce, hashlib.sha256).digest()


# The exchange, without I/O -------------------------------------------------------------------
def hello() -> tuple[bytes, bytes]:
    """(client nonce, the client's first message)."""
    nonce = secrets.token_bytes(NONCE_BYTES)
    return nonce, MAGIC + nonce


def challenge(secret: bytes, hello_msg: bytes) -> tuple[bytes, bytes]:
    """The server's answer to a hello, and the client proof it then expects."""
    if len(hello_msg) != HELLO_BYTES or hello_msg[: len(MAGIC)] != MAGIC:
        raise HandshakeError("not a kv direct-transport client")
    client_nonce, server_nonce = hello_msg[len(MAGIC) :], secrets.token_bytes(NONCE_BYTES)
    answer = MAGIC + server_nonce + proof(secret, _SERVER, client_nonce, server_nonce)
    return answer, proof(secret, _CLIENT, client_nonce, server_nonce)


def respond(secret: bytes, client_nonce: bytes, challenge_msg: bytes) -> bytes:
    """The client's proof, once the server's proof checks out; HandshakeError if it does not."""
    if len(challenge_msg) != CHALLENGE_BYTES or challenge_msg[: len(MAGIC)] != MAGIC:
        raise HandshakeError("the endpoint does not speak the kv direct transport")
    server_nonce = challenge_msg[len(MAGIC) : len(MAGIC) + NONCE_BYTES]
    expected = proof(secret, _SERVER, client_nonce, server_nonce)
    if not hmac.compare_digest(challenge_msg[len(MAGIC) + NONCE_BYTES :], expected):
        raise HandshakeError("the endpoint could not prove it is the member")
    return proof(secret, _CLIENT, client_nonce, server_nonce)


# Blocking sockets ----------------------------------------------------------------------------
def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("handshake deadline passed")
    return left


def recv_before(sock: socket.socket, n: int, deadline: float) -> bytes:
    """Exactly `n` bytes, all by `deadline` (time.monotonic): each read waits only for what is
    left of it, so a peer trickling bytes cannot stretch the exchange."""
    buf = bytearray()
    while len(buf) < n:
        sock.settimeout(_left(deadline))
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("peer closed the connection during the handshake")
        buf += chunk
    return bytes(buf)


def send_before(sock: socket.socket, data: bytes, deadline: float) -> None:
    sock.settimeout(_left(deadline))
    sock.sendall(data)  # the timeout bounds the whole sendall (Python >= 3.5)


def server_handshake(sock: socket.socket, secret: bytes, deadline: float) -> None:
    """Authenticate a client by `deadline`; raises (HandshakeError, TimeoutError, OSError)
    without a verdict when it fails."""
    answer, expected = challenge(secret, recv_before(sock, HELLO_BYTES, deadline))
    send_before(sock, answer, deadline)
    if not hmac.compare_digest(recv_before(sock, PROOF_BYTES, deadline), expected):
        raise HandshakeError("the client could not prove it holds the member's secret")
    send_before(sock, OK, deadline)


def client_handshake(sock: socket.socket, secret: bytes, deadline: float) -> None:
    """Authenticate the member (and this client to it) by `deadline`."""
    nonce, msg = hello()
    send_before(sock, msg, deadline)
    reply = respond(secret, nonce, recv_before(sock, CHALLENGE_BYTES, deadline))
    send_before(sock, reply, deadline)
    if recv_before(sock, len(OK), deadline) != OK:
        raise HandshakeError("the member refused this client")


async def client_handshake_async(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, secret: bytes
) -> None:
    """client_handshake on a stream (the caller bounds it with asyncio.timeout)."""
    nonce, msg = hello()
    writer.write(msg)
    writer.write(respond(secret, nonce, await reader.readexactly(CHALLENGE_BYTES)))
    if await reader.readexactly(len(OK)) != OK:
        raise HandshakeError("the member refused this client")
