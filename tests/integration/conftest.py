"""One real Ray cluster per test session, built with ray.cluster_utils.Cluster.

The head node carries generous logical CPUs so a handful of actors and replicas fit; tests that
need several nodes add them with `cluster.add_node(...)` and remove them when done.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from app.runtime import cluster_env

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[object]:
    import ray
    from ray.cluster_utils import Cluster

    # Processes the cluster starts inherit this environment (HAProxy ingress, offline hubs).
    for key, value in cluster_env().items():
        os.environ[key] = value
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 16, "resources": {"head": 1}, "include_dashboard": False},
    )
    ray.init(address=cluster.address, namespace="app-tests", log_to_driver=False)
    try:
        yield cluster
    finally:
        try:
            from ray import serve

            serve.shutdown()
        except Exception:
            pass
        ray.shutdown()
        cluster.shutdown()
