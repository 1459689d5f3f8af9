"""A process's fleet view (app.fleet.view) pulling from the real router actor class, called
in-process: versions, a restarted actor, outcomes kept across a failed pull."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from app.fleet.view import FleetView
from tests.unit.test_fleet_router_actor import SPEC, StaticNodesRouter, report


class DirectView(FleetView):
    """A view whose pulls call a FleetRouter object directly instead of through Ray (the
    tests run each pull on a thread of their own, as the puller does)."""

    def __init__(self, router: StaticNodesRouter) -> None:
        super().__init__(SPEC.router_actor, interval_s=1.0, subscriber="test process")
        self.router = router
        self.fail = False

    def fetch(self, epoch: str | None, version: int, outcomes: dict[str, Any]) -> Any:
        if self.fail:
            raise TimeoutError("the router actor did not answer")
        return asyncio.run(self.router.snapshot(version, outcomes, self.subscriber, epoch))


def pull(view: FleetView) -> None:
    worker = threading.Thread(target=view.pull)
    worker.start()
    worker.join()


async def new_router() -> StaticNodesRouter:
    router = StaticNodesRouter(SPEC.model_dump(mode="json"))
    await router.heartbeat(report("a", "n-eu"))
    return router


async def test_a_drain_reaches_the_view_and_is_acknowledged_with_the_next_pull() -> None:
    router = await new_router()
    view = DirectView(router)
    pull(view)
    version = await router.drain_node("n-eu")
    assert (await router.propagated(version, timeout_s=0))["behind"] == ["test process"]
    pull(view)
    assert view.snapshot["drained_set"] == {"n-eu"} and view.snapshot["version"] == version
    pull(view)  # acknowledges it
    assert (await router.propagated(version, timeout_s=0))["behind"] == []


async def test_a_restarted_router_actor_is_not_mistaken_for_the_view_already_held() -> None:
    old = await new_router()
    view = DirectView(old)
    await old.drain_node("n-eu")
    pull(view)
    held = view.snapshot["version"]
    # Ray restarts the actor: its state is gone and its versions count from 1 again.
    view.router = restarted = await new_router()
    while restarted.version < held:
        restarted._publish()
    assert restarted.version == held
    pull(view)
    assert view.snapshot["epoch"] == restarted.epoch and view.snapshot["drained_set"] == set()
    assert (await restarted.propagated(held, timeout_s=0))["behind"] == ["test process"]


async def test_outcomes_are_kept_across_a_failed_pull() -> None:
    router = await new_router()
    view = DirectView(router)
    view.record("a", 10.0)
    view.fail = True
    with pytest.raises(TimeoutError):
        view.pull()
    view.record("a", 20.0)
    view.fail = False
    pull(view)
    assert view.take_outcomes() == {}
    view_of_a = next(r for r in (await router.fleet())["replicas"] if r["replica_id"] == "a")
    assert view_of_a["performance"]["latency_ms"] == pytest.approx(12.0)  # EMA of 10 then 20


async def test_without_a_puller_the_first_pull_is_not_waited_for() -> None:
    # Not started (outside Ray, ensure_running starts none): nothing to wait for.
    view = FleetView("nobody", interval_s=1.0, subscriber="test")
    assert await asyncio.wait_for(view.wait_first_pull(30), timeout=1) is False
