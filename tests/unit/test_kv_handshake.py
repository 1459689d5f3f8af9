"""The direct transport's challenge-response, without sockets: proofs, replay and reflection."""

from __future__ import annotations

import pytest

from app.kv.handshake import (
    CHALLENGE_BYTES,
    MAGIC,
    HandshakeError,
    challenge,
    hello,
    new_secret,
    respond,
)


def test_both_sides_prove_the_secret() -> None:
    secret = new_secret()
    nonce, msg = hello()
    answer, expected = challenge(secret, msg)
    assert len(answer) == CHALLENGE_BYTES and secret not in answer + msg
    assert respond(secret, nonce, answer) == expected
    assert secret not in expected


def test_a_server_without_the_secret_is_refused() -> None:
    nonce, msg = hello()
    answer, _ = challenge(new_secret(), msg)  # an impostor's own secret
    with pytest.raises(HandshakeError, match="could not prove"):
        respond(new_secret(), nonce, answer)


def test_a_recorded_challenge_cannot_be_replayed_to_a_new_client() -> None:
    secret = new_secret()
    _, first = hello()
    recorded, _ = challenge(secret, first)
    nonce, _ = hello()  # the next client's fresh nonce
    with pytest.raises(HandshakeError):
        respond(secret, nonce, recorded)


def test_the_servers_proof_cannot_be_reflected_as_a_clients() -> None:
    secret = new_secret()
    _, msg = hello()
    answer, expected = challenge(secret, msg)
    server_proof = answer[-32:]
    assert server_proof != expected  # each proof names its direction


def test_a_nonce_is_fresh_every_time() -> None:
    assert len({hello()[0] for _ in range(100)}) == 100


def test_garbage_is_not_a_hello() -> None:
    with pytest.raises(HandshakeError):
        challenge(new_secret(), b"GET / HTTP/1.1\r\n" + b"x" * 24)
    with pytest.raises(HandshakeError):
        challenge(new_secret(), MAGIC)  # too short
