"""Deploys the catalogue's applications on a connected Ray cluster and waits until they serve."""

from __future__ import annotations

import time
from collections.abc import Callable

from ray import serve

from app.fleet.router_actor import ensure_router
from app.fleet.spec import FleetSpec, load_fleet
from app.serving.builder import AppSpec


class DeployError(RuntimeError):
    """An application failed to deploy or did not become healthy in time."""


def start_serve(
    host: str, port: int, request_timeout_s: float | None = None, location: str = "EveryNode"
) -> None:
    """Serve's HTTP proxies: on every node by default; "HeadOnly" where every node shares one
    machine (a local region whose autoscaler adds raylets there: their proxies would contend
    for the head's port and HAProxy files)."""
    options: dict[str, object] = {"host": host, "port": port, "location": location}
    if request_timeout_s is not None:
        options["request_timeout_s"] = request_timeout_s
    serve.start(http_options=options)


def deploy(
    specs: list[AppSpec],
    *,
    timeout_s: float = 600,
    progress: Callable[[str], None] = lambda message: None,
    fleet: FleetSpec | None = None,
) -> None:
    """Start the fleet's router actor, submit every application at once (replicas start in
    parallel), then wait for all of them with a deadline; serve.run alone would wait per
    application with no deadline, forever when a replica cannot be scheduled."""
    fleet = fleet or load_fleet()
    progress(f"fleet router: {len(fleet.regions)} region(s), {fleet.load_balancing.strategy}")
    ensure_router(fleet)
    for spec in specs:
        progress(f"deploying {spec.name} at {spec.route_prefix or '(no HTTP route)'}")
    serve.run_many(
        [
            serve.RunTarget(spec.app, name=spec.name, route_prefix=spec.route_prefix)
            for spec in specs
        ],
        wait_for_ingress_deployment_creation=False,
        wait_for_applications_running=False,
    )
    wait_running([spec.name for spec in specs], timeout_s=timeout_s, progress=progress)


def wait_running(
    names: list[str], *, timeout_s: float, progress: Callable[[str], None] = lambda m: None
) -> None:
    """Poll until every named application runs; report status changes and Serve's messages
    (such as replicas that cannot be scheduled for lack of resources)."""
    deadline = time.monotonic() + timeout_s
    reported: dict[str, str] = {}
    while True:
        apps = serve.status().applications
        pending = []
        for name in names:
            app = apps.get(name)
            status = str(getattr(app.status, "value", app.status)) if app else "NOT_STARTED"
            if status in ("DEPLOY_FAILED", "UNHEALTHY"):
                raise DeployError(f"application {name} is {status}: {_messages(app)}")
            if status != "RUNNING":
                pending.append(name)
            line = f"{name}: {status}" + (f" ({_messages(app)})" if app and _messages(app) else "")
            if reported.get(name) != line:
                reported[name] = line
                progress(line)
        if not pending:
            return
        if time.monotonic() > deadline:
            details = "; ".join(reported[name] for name in pending)
            raise DeployError(f"not running after {timeout_s:.0f}s: {details}")
        time.sleep(0.5)


def _messages(app: object) -> str:
    texts = [getattr(app, "message", "")]
    texts += [d.message for d in getattr(app, "deployments", {}).values()]
    return " ".join(t for t in texts if t)[:500]
