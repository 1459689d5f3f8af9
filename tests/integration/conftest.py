"""One real Ray cluster per test session, built with ray.cluster_utils.Cluster.

The head node carries generous logical CPUs so a handful of actors and replicas fit; tests that
need several nodes add them with `cluster.add_node(...)` and remove them when done.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.catalog.cards import Catalogue, ModelCard, load_catalogue
from app.runtime import cluster_env, haproxy_env, kill_stray_haproxy
from tests.integration.support import free_port

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[object]:
    import ray
    from ray.cluster_utils import Cluster

    # The head node (and every process it starts) inherits this environment; the test driver
    # itself keeps its own, so its handles behave as in any other Ray job.
    haproxy_dir = tempfile.mkdtemp(prefix="haproxy-tests-")
    env = (
        cluster_env()
        | haproxy_env(haproxy_dir, free_port(), free_port())
        | {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"}
    )
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        cluster = Cluster(
            initialize_head=True,
            head_node_args={"num_cpus": 16, "resources": {"head": 1}, "include_dashboard": False},
        )
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    ray.init(address=cluster.address, namespace="app-tests", log_to_driver=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        kill_stray_haproxy(haproxy_dir)  # cluster shutdown leaves Serve's HAProxy running


@pytest.fixture(scope="session")
def serving(ray_cluster: object) -> Iterator[str]:
    """All four offline models plus a gateway that also lists a card nobody deployed."""
    from ray import serve

    from app.catalog.recipes import build_catalogue
    from app.serving.builder import GATEWAY_APP, build_all, gateway_application
    from app.serving.deploy import deploy, start_serve, wait_running

    catalogue = load_catalogue(ROOT / "models")
    build_catalogue(catalogue)
    port = free_port()
    start_serve("127.0.0.1", port)
    specs = [spec for spec in build_all(catalogue) if spec.name != GATEWAY_APP]
    offline = ModelCard(id="echo-offline", task="text-generation", loader="echo")
    listed = Catalogue(directory=catalogue.directory, cards=catalogue.cards | {offline.id: offline})
    gateway = gateway_application(listed)
    deploy(specs, timeout_s=600)
    serve.run(gateway, name=GATEWAY_APP, route_prefix="/", blocking=False)
    wait_running([GATEWAY_APP], timeout_s=120)
    yield f"http://127.0.0.1:{port}"
