"""Helpers shared by the integration tests: free ports, polling, a KV store per test module."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from app.kv import KVClient, KVConfig, shutdown_kv, start_kv

KV_NAMESPACE = "app-kv-tests"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(
    condition: Callable[[], bool], timeout: float = 10.0, what: str = "condition"
) -> None:
    """Poll `condition` until it holds; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


@contextmanager
def running_kv(name: str, **overrides: Any) -> Iterator[KVClient]:
    """A small store (2 groups x 2 members, co-location allowed) that is shut down afterwards."""
    settings: dict[str, Any] = {
        "num_shards": 2,
        "replication_factor": 2,
        "allow_colocated_replicas": True,
    } | overrides
    client = start_kv(KVConfig(name=name, namespace=KV_NAMESPACE, **settings))
    try:
        yield client
    finally:
        shutdown_kv(name, KV_NAMESPACE)
