"""The direct transport between real Ray processes: members and clients authenticate each other,
a forged secret or a raw connection gets nothing, and calls over the frame cap go through Ray."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
import ray

from app.kv import KVClient, key_slot
from app.kv.direct import DirectClient, Endpoint
from app.kv.frames import max_frame_bytes
from app.kv.handshake import HELLO_BYTES
from tests.integration.support import running_kv

pytestmark = pytest.mark.integration

NAME, NAMESPACE = "kv-transport", "app-kv-tests"
MAX_VALUE = 300 * 1024


@pytest.fixture(scope="module")
def kv(ray_cluster: Any) -> Iterator[KVClient]:
    with running_kv(NAME, max_value_bytes=MAX_VALUE) as client:
        yield client


def _primary(kv: KVClient) -> Any:
    coordinator = ray.get_actor(NAME, namespace=NAMESPACE)
    return ray.get(coordinator.get_map.remote()).groups[0].primary


def test_clients_authenticate_and_go_direct(kv: KVClient) -> None:
    before = kv.transport_stats()
    for i in range(20):
        kv.put(f"t:{i}", i)
    assert kv.mget([f"t:{i}" for i in range(20)]) == list(range(20))
    after = kv.transport_stats()
    assert after["direct_calls"] - before["direct_calls"] >= 20
    assert after["fallbacks"] == before["fallbacks"]


def test_a_members_endpoint_keeps_its_secret_out_of_reprs(kv: KVClient) -> None:
    endpoint: Endpoint = ray.get(_primary(kv).endpoint.remote())
    assert len(endpoint.secret) == 32 and not endpoint.tls
    assert endpoint.secret.hex() not in repr(endpoint) and "secret" not in repr(endpoint)
    assert f"{endpoint.host}:{endpoint.port}" in str(kv.status())  # status shows no secret
    assert endpoint.secret.hex() not in str(kv.status())


def test_a_forged_secret_gets_nothing(kv: KVClient) -> None:
    primary = _primary(kv)
    real: Endpoint = ray.get(primary.endpoint.remote())
    forged = Endpoint(real.host, real.port, bytes(32))
    client = DirectClient(5.0, fetch_endpoint=lambda handle: forged)
    assert client.send(primary, "get", ("t:1", 0)) is None  # refused: the call goes via Ray
    assert client.fallbacks == 1 and client.calls == 0
    genuine = DirectClient(5.0, fetch_endpoint=lambda handle: real)
    pending = genuine.send(primary, "get", ("t:1", key_slot("t:1")))
    assert pending is not None  # the member itself takes a client with its secret
    genuine.receive(pending)  # a value or a redirect, either way an answer
    assert genuine.fallbacks == 0
    genuine.close()


def test_a_raw_connection_is_dropped_at_the_deadline_without_a_reply(kv: KVClient) -> None:
    real: Endpoint = ray.get(_primary(kv).endpoint.remote())
    with socket.create_connection((real.host, real.port), timeout=15) as raw:
        raw.sendall(b"x" * (HELLO_BYTES - 1))  # never completes the hello
        started = time.monotonic()
        with contextlib.suppress(ConnectionResetError):
            assert raw.recv(1) == b""
        assert time.monotonic() - started < 10  # HANDSHAKE_TIMEOUT_S is 5 s


def test_calls_over_the_frame_cap_go_through_ray(kv: KVClient) -> None:
    """An mset batch of values each under max_value_bytes but together over the frame cap is
    sent as a Ray call, not refused, and not counted as a transport failure."""
    values = {f"{{big}}:{i}": bytes([i]) * (250 * 1024) for i in range(8)}  # one group
    assert sum(len(v) for v in values.values()) > max_frame_bytes(MAX_VALUE)
    before = kv.transport_stats()["fallbacks"]
    kv.mset(values)
    assert kv.mget(list(values)) == list(values.values())
    assert kv.transport_stats()["fallbacks"] == before
