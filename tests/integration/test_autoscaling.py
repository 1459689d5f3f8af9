"""Our Serve autoscaling policy on real Ray Serve: a model scales up under load and back down,
and a model at zero replicas serves the request that wakes it (app.autoscaling)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import ray

from app.catalog.cards import ModelCard, load_catalogue
from app.fleet.router_actor import ensure_router, stop_router
from app.fleet.spec import FleetSpec, LoadBalancing, Region
from tests.integration.support import wait_until

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BUSY, IDLE = "autoscale-busy", "autoscale-idle"
FAST = {  # seconds instead of minutes, so a test sees whole up-and-down cycles
    "upscale_cooldown_s": 1,
    "downscale_cooldown_s": 3,
    "stable_window_s": 4,
    "panic_window_s": 2,
    "decision_period_s": 0.5,
    "scale_to_zero_after_s": 3,
    # Forecasts are made and recorded, never applied: the test reads them to see the history.
    "predictive": {"mode": "forecast_only", "season_s": 600, "min_history_s": 60},
}
SPEC = FleetSpec(
    regions={
        "local": Region(
            latitude=0.0,
            longitude=0.0,
            zones=("local-a",),
            models={  # type: ignore[dict-item]
                BUSY: {"min_replicas": 1, "max_replicas": 3},
                IDLE: {"min_replicas": 0, "max_replicas": 1, "initial_replicas": 1},
            },
        )
    },
    default_region="local",
    autoscaling=FAST,
    load_balancing=LoadBalancing(health_check_interval_s=0.5, snapshot_interval_s=0.2),
    router_actor="autoscale-router-tests",
).for_region("local")  # this cluster is the region: no region label selector on replicas


def card(model: str) -> ModelCard:
    return ModelCard(
        id=model,
        task="text-generation",
        loader="echo",
        max_ongoing_requests=2,
        # Unbounded queue: the load must wait for the new replica, not be shed (the default
        # queue, as many as the slots, would refuse most of this test's 4x load with 429).
        max_queued_requests=-1,
        resources={"num_cpus": 0.1},  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
def models(ray_cluster: Any, serving: str) -> Iterator[tuple[str, Any, Any]]:
    from ray import serve

    from app.kv import KVConfig, shutdown_kv, start_kv
    from app.serving.builder import model_application
    from app.serving.deploy import wait_running

    # The region's KV store under the name the policy looks for, as `app up` starts it.
    kv = start_kv(KVConfig())
    router = ensure_router(SPEC)
    catalogue = load_catalogue(ROOT / "models")
    for model in (BUSY, IDLE):
        app = model_application(card(model), catalogue.directory, fleet=SPEC)
        serve.run(app, name=f"model-{model}", route_prefix=f"/models/{model}", blocking=False)
    wait_running([f"model-{BUSY}", f"model-{IDLE}"], timeout_s=180)
    try:
        yield serving, router, kv
    finally:
        for model in (BUSY, IDLE):
            serve.delete(f"model-{model}")
        stop_router(SPEC.router_actor)
        shutdown_kv()


def running(model: str) -> int:
    from ray import serve

    app = serve.status().applications[f"model-{model}"]
    deployment = next(iter(app.deployments.values()))
    return int(deployment.replica_states.get("RUNNING", 0))


def chat(base: str, model: str) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "scale me"}]}
    return httpx.post(f"{base}/models/{model}/v1/chat/completions", json=body, timeout=120)


def test_a_model_scales_up_under_load_and_back_down(models: tuple[str, Any, Any]) -> None:
    base, router, _ = models
    config = _autoscaling_config(BUSY)
    assert config["policy"]["policy_function"].startswith("app.autoscaling.serve_policy:")
    wait_until(lambda: _replica_id(router, BUSY) is not None, timeout=30, what="registration")
    replica = _replica_id(router, BUSY)
    ray.get(router.inject_fault.remote(replica, 400))  # each request holds the replica 0.4 s
    stop = threading.Event()
    statuses: list[int] = []

    def client() -> None:
        while not stop.is_set():
            statuses.append(chat(base, BUSY).status_code)

    threads = [threading.Thread(target=client) for _ in range(8)]  # 4x what one replica takes
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: running(BUSY) >= 2, timeout=90, what="a scale-up under load")
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
        ray.get(router.inject_fault.remote(replica, 0))
    assert statuses and all(status == 200 for status in statuses), set(statuses)
    wait_until(lambda: running(BUSY) == 1, timeout=120, what="the scale-down once idle")
    # Ray's metrics agent exports every few seconds: the scale-down's count may arrive after
    # the replica is gone, so wait for both directions rather than read once.
    wait_until(
        lambda: _decision_directions() == {"up", "down"},
        timeout=60,
        what="the policy's up and down decisions on the Prometheus endpoint",
    )


def _decision_directions() -> set[str]:
    """The directions of the busy model's exported autoscaling_decisions samples."""
    return {
        direction
        for line in _decision_metrics().splitlines()
        for direction in ("up", "down")
        if f'direction="{direction}"' in line and f'model="{BUSY}"' in line
    }


def _decision_metrics() -> str:
    """The autoscaling_decisions lines of this node's Prometheus endpoint."""
    port = ray._private.worker.global_worker.node.metrics_export_port
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return "\n".join(line for line in text.splitlines() if "autoscaling_decisions" in line)


def test_a_model_at_zero_replicas_serves_the_request_that_wakes_it(
    models: tuple[str, Any, Any],
) -> None:
    base, _, _ = models
    wait_until(lambda: running(IDLE) == 0, timeout=60, what="idle model scaled to zero")
    started = time.monotonic()
    response = chat(base, IDLE)
    cold_start_s = time.monotonic() - started
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "scale me"
    print(f"cold start from zero replicas: {cold_start_s:.2f} s")
    assert running(IDLE) == 1


def _replica_id(router: Any, model: str) -> str | None:
    view = ray.get(router.fleet.remote())
    return next((r["replica_id"] for r in view["replicas"] if r["model"] == model), None)


def _autoscaling_config(model: str) -> dict[str, Any]:
    from ray import serve

    details = serve.status().applications[f"model-{model}"]
    assert details.status == "RUNNING"
    from app.serving.builder import replica_options

    return dict(replica_options(card(model), 0.0, False, SPEC)["autoscaling_config"])


def test_history_and_decisions_survive_a_serve_controller_restart(
    models: tuple[str, Any, Any],
) -> None:
    """The policy keeps its per-minute request history, decision log and status in the KV
    store; a new controller's policy reads the history back and forecasts from it."""
    from ray import serve

    base, _, kv = models
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            chat(base, BUSY)
            time.sleep(0.05)

    thread = threading.Thread(target=client)
    thread.start()
    try:  # a finished minute of traffic reaches the store at the next minute's first decision
        wait_until(lambda: bool(_keys(kv, f"autoscale:rate:{BUSY}:")), 130, "a minute of history")
    finally:
        stop.set()
        thread.join(timeout=60)
    assert _keys(kv, f"autoscale:log:{BUSY}:"), "the decision log is in the KV store"
    before = kv.get(f"autoscale:status:{BUSY}:local")
    assert before is not None  # read back from the KV store, so the policy wrote it through

    controller = ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")
    ray.kill(controller, no_restart=False)

    def restored() -> bool:
        status = kv.get(f"autoscale:status:{BUSY}:local") or {}
        forecast = status.get("forecast") or {}
        return status.get("at_s", 0) > before["at_s"] and forecast.get("history_s", 0) > 0

    wait_until(restored, timeout=90, what="the restarted controller's policy forecasting")
    assert serve.status().applications[f"model-{BUSY}"].status == "RUNNING"
    assert chat(base, BUSY).status_code == 200
    # The gateway's fleet view carries the same per-model summary as `app autoscale status`.
    rows = httpx.get(f"{base}/v1/fleet", timeout=30).json()["autoscaling"]
    busy = next(row for row in rows if row["model"] == BUSY)
    assert busy["min"] == 1 and busy["max"] == 3 and busy["decisions"]


def _keys(kv: Any, prefix: str) -> list[str]:
    return [key for key, _ in kv.scan_iter(prefix)]
