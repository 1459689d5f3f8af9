"""The cluster follows the replicas: a `cloud: local` region running Ray's autoscaler with its
fake multi-node provider (app.regions.fake), started through the CLI as a user would. Load
makes our Serve policy ask for a replica that fits on no running node; Ray's autoscaler adds a
node of the region's node type (with the region's labels) and the replica runs there. When the
load stops, the policy scales the model back down and the autoscaler removes the idle node."""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.regions_support import Regions, local_regions
from tests.integration.support import wait_until

pytestmark = pytest.mark.integration

REGION, MODEL = "elastic", "elastic-echo"
HEAD_NODE_ID = "fffffffffffffffffffffffffffffffffffffffffffffffffff00000"  # the fake provider's
FAST = {  # seconds instead of minutes (tests/integration/test_autoscaling.py)
    "upscale_cooldown_s": 1,
    "downscale_cooldown_s": 3,
    "stable_window_s": 4,
    "panic_window_s": 2,
    "decision_period_s": 0.5,
    "predictive": {"enabled": False},
}
SPEC = {
    "cloud": "local",
    "latitude": 0.0,
    "longitude": 0.0,
    "zones": ["elastic-a"],
    # The head keeps one CPU for the gateway (0.1); a replica asks for two, so every replica
    # needs a worker node.
    "local": {"port_base": 28000, "num_cpus": 1, "autoscaler": True, "idle_timeout_s": 5},
    "node_types": {"cpu2": {"instance_type": "fake-2cpu", "cpus": 2, "max_nodes": 2}},
    "models": {MODEL: {"min_replicas": 1, "max_replicas": 2}},
    "autoscaling": FAST,
}
# Unbounded queue: the load waits for the nodes and replicas that join rather than being shed.
CARD = {"resources": {"num_cpus": 2}, "max_ongoing_requests": 2, "max_queued_requests": -1}


@pytest.fixture(scope="module")
def region() -> Iterator[Regions]:
    # A short directory: Ray's unix sockets live under it and may not exceed 107 characters.
    directory = Path(tempfile.mkdtemp(prefix="ela", dir="/tmp"))
    try:
        with local_regions(directory, {REGION: SPEC}, {MODEL: CARD}) as running:
            yield running
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def workers(regions: Regions) -> dict[str, dict[str, Any]]:
    """The region's live worker nodes (not the head), by node id."""
    view = regions.fleet(REGION)
    return {n["node_id"]: n for n in view["nodes"] if n["alive"] and n["node_id"] != HEAD_NODE_ID}


def replica_nodes(regions: Regions) -> list[str]:
    view = regions.fleet(REGION)
    return [r["node_id"] for r in view["replicas"] if r["model"] == MODEL and r["healthy"]]


def test_nodes_join_for_replicas_under_load_and_leave_when_idle(region: Regions) -> None:
    wait_until(lambda: len(replica_nodes(region)) == 1, timeout=120, what="the first replica")
    first = workers(region)
    assert len(first) == 1, first  # the initial replica did not fit the head: a node joined
    node = next(iter(first.values()))
    assert (node["region"], node["zone"]) == (REGION, "elastic-a")  # the node type's labels
    assert replica_nodes(region) == list(first)

    # Each request holds the replica 0.5 s; six clients are three times what it takes.
    replica = region.replica_of(REGION, MODEL)
    region.app("fleet", "--address", "127.0.0.1:28000", "fault", replica, "500", timeout=60)
    stop = threading.Event()
    statuses: list[int] = []
    refusals: list[tuple[int, str]] = []
    url = f"{region.urls[REGION]}/models/{MODEL}/v1/chat/completions"
    body = {"model": MODEL, "messages": [{"role": "user", "content": "grow"}]}

    def client() -> None:
        while not stop.is_set():
            statuses.append(httpx.post(url, json=body, timeout=120).status_code)

    threads = [threading.Thread(target=client) for _ in range(6)]
    for thread in threads:
        thread.start()
    try:
        wait_until(
            lambda: len(set(replica_nodes(region))) == 2,
            timeout=180,
            what="a second replica on a second node",
        )
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
        region.app("fleet", "--address", "127.0.0.1:28000", "fault", replica, "0", timeout=60)
    # Seen once in about twenty runs: one 404 while the new node joined (its body was not
    # recorded then). The likely source is Serve's HAProxy default backend ("Path '...' not
    # found"), answering while its route table briefly lacked the app; this app's own 404s carry
    # an OpenAI body. One such answer is tolerated; any other refusal fails and is shown.
    route_misses = [r for r in refusals if r[0] == 404 and r[1].startswith("Path '")]
    assert statuses and len(route_misses) <= 1, refusals
    assert all(r in route_misses for r in refusals), refusals
    grown = workers(region)
    assert len(grown) == 2 and set(replica_nodes(region)) == set(grown)
    assert all(n["region"] == REGION for n in grown.values())

    # Idle: the policy scales back to one replica, then the autoscaler removes the idle node.
    wait_until(lambda: len(replica_nodes(region)) == 1, timeout=180, what="the scale-down")
    wait_until(lambda: len(workers(region)) == 1, timeout=180, what="the idle node removed")
    assert replica_nodes(region) == list(workers(region))
    print(f"nodes: {sorted(first)} -> {sorted(grown)} -> {sorted(workers(region))}")
