"""Deploys the catalogue's applications on a connected Ray cluster and waits until they serve."""

from __future__ import annotations

import time
from collections.abc import Callable

from ray import serve

from app.serving.builder import AppSpec


class DeployError(RuntimeError):
    """An application failed to deploy or did not become healthy in time."""


def start_serve(host: str, port: int) -> None:
    serve.start(http_options={"host": host, "port": port, "location": "EveryNode"})


def deploy(
    specs: list[AppSpec],
    *,
    timeout_s: float = 600,
    progress: Callable[[str], None] = lambda message: None,
) -> None:
    """serve.run every application without blocking, then wait for all of them to run."""
    for spec in specs:
        progress(f"deploying {spec.name} at {spec.route_prefix}")
        serve.run(spec.app, name=spec.name, route_prefix=spec.route_prefix, blocking=False)
    wait_running([spec.name for spec in specs], timeout_s=timeout_s, progress=progress)


def wait_running(
    names: list[str], *, timeout_s: float, progress: Callable[[str], None] = lambda m: None
) -> None:
    deadline = time.monotonic() + timeout_s
    reported: dict[str, str] = {}
    while True:
        apps = serve.status().applications
        pending = []
        for name in names:
            status = apps[name].status if name in apps else "NOT_STARTED"
            if status in ("DEPLOY_FAILED", "UNHEALTHY"):
                raise DeployError(f"application {name} is {status}: {apps[name].message}")
            if status != "RUNNING":
                pending.append(name)
            if reported.get(name) != status:
                reported[name] = str(status)
                progress(f"{name}: {status}")
        if not pending:
            return
        if time.monotonic() > deadline:
            raise DeployError(f"applications not running after {timeout_s:.0f}s: {pending}")
        time.sleep(0.5)
