"""Helpers shared by the integration tests: free ports, polling, a KV store per test module."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

from app.kv import KVClient, KVConfig, shutdown_kv, start_kv
from app.kv.history import RegisterWorkload

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


class SyncClientAsAsync:
    """The synchronous client's methods (the direct transport's callers) as awaitables run on
    worker threads, so the asyncio history workloads can drive them concurrently."""

    def __init__(self, client: KVClient, threads: int = 8) -> None:
        self.client = client
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="kv-sync")

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def aput(self, key: str, value: Any) -> int:
        return int(await self._run(self.client.put, key, value))

    async def aget(self, key: str) -> Any:
        return await self._run(self.client.get, key)

    async def amset(self, mapping: dict[str, Any]) -> None:
        await self._run(self.client.mset, mapping)

    async def amget(self, keys: list[str]) -> list[Any]:
        return list(await self._run(self.client.mget, keys))


def fully_replicated(client: KVClient) -> bool:
    """Every shard group has all its members, each answering."""
    return all(
        len(g["members"]) == g["size"] and all("error" not in m for m in g["members"])
        for g in client.status()["groups"]
    )


async def until(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "workload stalled"
        await asyncio.sleep(0.02)


async def run_under_fault(
    client: Any,
    prefix: str,
    fault: Callable[[], Any],
    batched: bool = False,
    recover_timeout: float = 60.0,
) -> RegisterWorkload:
    """Concurrent writers and readers over 12 keys; `fault` once 100 writes were acknowledged;
    go on until 150 more are (within `recover_timeout` seconds)."""
    keys = [f"{prefix}:{i}" for i in range(12)]
    workload = RegisterWorkload(client, keys, writers=3, readers=2, batched=batched)
    stop = asyncio.Event()
    runner = asyncio.create_task(workload.run(stop))
    loop = asyncio.get_running_loop()
    try:
        await until(lambda: workload.acked >= 100, 30)
        await loop.run_in_executor(None, fault)
        after = workload.acked
        await until(lambda: workload.acked >= after + 150, recover_timeout)
    finally:
        stop.set()
        await asyncio.wait_for(runner, 90)
    return workload


def deploy_with_gateway(card: Any, fleet: Any, gateway: str, prefix: str) -> None:
    """One model on its own URL and a gateway (named `gateway`, at `prefix`) that lists only
    it, both built for `fleet`; returns once both run."""
    from ray import serve

    from app.catalog.cards import Catalogue, load_catalogue
    from app.serving.builder import gateway_application, model_application
    from app.serving.deploy import wait_running
    from tests.integration.conftest import ROOT

    catalogue = load_catalogue(ROOT / "models")
    app = model_application(card, catalogue.directory, fleet=fleet)
    serve.run(app, name=card.deployment_name, route_prefix=f"/models/{card.id}", blocking=False)
    listed = Catalogue(directory=catalogue.directory, cards={card.id: card})
    serve.run(
        gateway_application(listed, fleet=fleet), name=gateway, route_prefix=prefix, blocking=False
    )
    wait_running([card.deployment_name, gateway], timeout_s=180)
