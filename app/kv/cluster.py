"""Starting and stopping a KV cluster: the named coordinator actor and, through it, the shards."""

from __future__ import annotations

import time
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from app.kv.client import KVClient
from app.kv.config import KVConfig
from app.kv.coordinator import CoordinatorActor

# Handles of coordinators this process started. Ray ends a non-detached actor once its creator
# drops the original handle (handles from ray.get_actor do not count), so holding it here makes
# the cluster live as long as the job that started it, until shutdown_kv.
_started: dict[tuple[str, str], Any] = {}


def start_kv(config: KVConfig | None = None, **overrides: Any) -> KVClient:
    """Start the cluster named by `config` (or join it if it already runs); returns a client.

    The coordinator is pinned to the calling node: in a test cluster that is the head, so
    removing worker nodes never takes the coordinator with them. (Hard affinity: Ray 2.60
    ignores soft affinity for zero-resource actors; the caller's own node is alive anyway.)
    """
    cfg = (
        (config or KVConfig()).model_copy(update=overrides) if overrides else (config or KVConfig())
    )
    if overrides:
        cfg = KVConfig.model_validate(cfg.model_dump())
    coordinator: Any = CoordinatorActor.options(
        name=cfg.name,
        namespace=cfg.namespace,
        get_if_exists=True,
        lifetime="detached" if cfg.detached else None,
        num_cpus=0,
        # Restarted after a crash, rebuilding its state from the members; calls made while it
        # restarts are retried (every coordinator method is safe to repeat).
        max_restarts=-1,
        max_task_retries=-1,
        max_concurrency=10_000,
        scheduling_strategy=NodeAffinitySchedulingStrategy(
            ray.get_runtime_context().get_node_id(), soft=False
        ),
    ).remote(cfg)
    _started[(cfg.name, cfg.namespace)] = coordinator
    ray.get(coordinator.start.remote())
    return KVClient.connect(cfg.name, cfg.namespace)


def shutdown_kv(name: str = "kv", namespace: str = "app-kv") -> bool:
    """Stop every shard and the coordinator; False if no such cluster was running."""
    try:
        coordinator = ray.get_actor(name, namespace=namespace)
    except ValueError:
        return False
    try:
        ray.get(coordinator.shutdown.remote(), timeout=30)
    finally:
        ray.kill(coordinator, no_restart=True)
        _started.pop((name, namespace), None)
    # The name is released only once the actor is gone; wait, so a restart cannot join it.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            ray.get_actor(name, namespace=namespace)
        except ValueError:
            break
        time.sleep(0.05)
    return True
