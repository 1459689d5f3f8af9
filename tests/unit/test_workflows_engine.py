"""WorkflowEngine over an in-memory KV store and a fake clock: checkpoints, retries with
backoff, timeouts, compensation in reverse, cancel, and a run taken over after its worker
dies."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

from app.events import EventBus
from app.workflows import (
    LeaseLostError,
    RetryPolicy,
    RunStatus,
    Step,
    StepContext,
    StepTimeoutError,
    Workflow,
    WorkflowEngine,
)
from tests.unit.kv_fakes import FakeKV

FAST = RetryPolicy(max_attempts=3, backoff_s=1.0, multiplier=2.0, max_backoff_s=30.0)


class WorkerDied(BaseException):
    """Stands for the process dying mid-step: nothing in the engine handles it."""


class Journal:
    """Records what steps and compensations ran, in order."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def step(
        self,
        name: str,
        result: Any = None,
        fail: int = 0,
        then: Callable[[StepContext], Any] | None = None,
    ) -> Callable[[StepContext], Any]:
        """A step that fails its first `fail` attempts, then runs `then` or returns `result`."""

        def run(ctx: StepContext) -> Any:
            self.calls.append(f"{name}#{ctx.attempt}")
            if ctx.attempt <= fail:
                raise RuntimeError(f"{name} failed")
            return then(ctx) if then else result

        return run

    def undo(self, name: str, fail: int = 0) -> Callable[[StepContext], None]:
        def compensate(ctx: StepContext) -> None:
            self.calls.append(f"undo {name}#{ctx.attempt}")
            if ctx.attempt <= fail:
                raise RuntimeError(f"undo {name} failed")

        return compensate


def engine(
    kv: FakeKV, *steps: Step, owner: str = "w1", events: EventBus | None = None, **kwargs: Any
) -> WorkflowEngine:
    workflows = {"batch": Workflow("batch", tuple(steps))}
    return WorkflowEngine(
        kv, workflows, owner=owner, clock=kv.clock, sleep=kv.clock.sleep, events=events, **kwargs
    )


def test_steps_run_in_order_and_see_earlier_results() -> None:
    kv, j = FakeKV(), Journal()
    bus = EventBus(kv, clock=kv.clock)
    wf = engine(
        kv,
        Step("validate", j.step("validate", {"lines": 3})),
        Step("reserve", j.step("reserve", then=lambda ctx: ctx.results["validate"]["lines"] * 2)),
        Step("run", j.step("run", then=lambda ctx: [ctx.input["file"], ctx.results["reserve"]])),
        events=bus,
    )
    run_id = wf.start("batch", {"file": "f1"})
    state = wf.run(run_id)
    assert state.status is RunStatus.SUCCEEDED
    assert state.results == {"validate": {"lines": 3}, "reserve": 6, "run": ["f1", 6]}
    assert (state.step, state.owner, state.error, state.compensated) == (3, None, None, ())
    assert j.calls == ["validate#1", "reserve#1", "run#1"]
    kinds = [e.type for e in bus.read(0)]
    assert kinds == ["job.submitted", "job.started", *["job.progress"] * 3, "job.completed"]
    assert all(e.data["run_id"] == run_id for e in bus.read(0))
    assert wf.run(run_id).status is RunStatus.SUCCEEDED and len(j.calls) == 3  # finished: no-op
    assert kv.value("wf:active") == {}


def test_start_is_idempotent_on_run_id() -> None:
    kv = FakeKV()
    bus = EventBus(kv, clock=kv.clock)
    wf = engine(kv, Step("a", lambda ctx: 1), events=bus)
    assert wf.start("batch", {"x": 1}, run_id="batch_1") == "batch_1"
    assert wf.start("batch", {"x": 2}, run_id="batch_1") == "batch_1"
    state = wf.status("batch_1")
    assert state is not None and state.input == {"x": 1} and state.status is RunStatus.PENDING
    assert [e.type for e in bus.read(0)] == ["job.submitted"]
    assert wf.start("batch", {}) != wf.start("batch", {})
    with pytest.raises(KeyError):
        wf.start("nope", {})
    assert wf.status("missing") is None


def test_a_failing_step_compensates_the_completed_ones_in_reverse() -> None:
    kv, j = FakeKV(), Journal()
    bus = EventBus(kv, clock=kv.clock)
    wf = engine(
        kv,
        Step("validate", j.step("validate")),  # nothing to undo
        Step("reserve", j.step("reserve"), j.undo("reserve"), retry=FAST),
        Step("write", j.step("write"), j.undo("write"), retry=FAST),
        Step("run", j.step("run", fail=99), j.undo("run"), retry=FAST),
        Step("release", j.step("release")),
        events=bus,
    )
    state = wf.run(wf.start("batch", {}))
    assert state.status is RunStatus.FAILED
    assert j.calls == [
        "validate#1", "reserve#1", "write#1", "run#1", "run#2", "run#3",
        "undo write#1", "undo reserve#1",
    ]  # fmt: skip
    assert state.compensated == ("write", "reserve")
    assert state.error is not None and "step run: RuntimeError: run failed" in state.error
    assert bus.read(0)[-1].type == "job.failed"
    assert kv.clock.sleeps == [1.0, 2.0]


def test_retries_back_off_exponentially_with_a_ceiling() -> None:
    kv, j = FakeKV(), Journal()
    policy = RetryPolicy(max_attempts=5, backoff_s=1.0, multiplier=3.0, max_backoff_s=5.0)
    wf = engine(kv, Step("flaky", j.step("flaky", "ok", fail=4), retry=policy))
    state = wf.run(wf.start("batch", {}))
    assert state.status is RunStatus.SUCCEEDED and state.results == {"flaky": "ok"}
    assert kv.clock.sleeps == [1.0, 3.0, 5.0, 5.0]
    assert j.calls == [f"flaky#{i}" for i in range(1, 6)]


def test_a_long_backoff_renews_the_lease_as_it_waits() -> None:
    kv, j = FakeKV(), Journal()
    policy = RetryPolicy(max_attempts=2, backoff_s=20.0)
    wf = engine(kv, Step("flaky", j.step("flaky", fail=1), retry=policy), lease_s=30)
    rival = engine(kv, Step("flaky", j.step("flaky")), owner="w2")
    renewals: list[float] = []
    original = kv.clock.sleep

    def sleep(seconds: float) -> None:
        original(seconds)
        renewals.append(kv.value("wf:run:r")["lease_until"] - kv.clock())
        assert rival.resume_stale() == []  # never stale while it waits

    wf._sleep = sleep
    wf.start("batch", {}, run_id="r")
    assert wf.run("r").status is RunStatus.SUCCEEDED
    assert kv.clock.sleeps == [10.0, 10.0]  # a third of the lease at a time
    assert renewals == [20.0, 20.0]  # renewed after each


def test_a_step_past_its_timeout_is_a_failed_attempt() -> None:
    kv, j = FakeKV(), Journal()

    def slow_once(ctx: StepContext) -> str:
        if ctx.attempt == 1:
            kv.clock.advance(11)  # returns, but too late by the engine's clock
        return "done"

    wf = engine(kv, Step("slow", j.step("slow", then=slow_once), retry=FAST, timeout_s=10))
    state = wf.run(wf.start("batch", {}))
    assert state.status is RunStatus.SUCCEEDED and state.results == {"slow": "done"}
    assert j.calls == ["slow#1", "slow#2"] and kv.clock.sleeps == [1.0]


def test_a_hung_step_times_out_and_is_told_to_stop() -> None:
    kv, j = FakeKV(), Journal()
    release = threading.Event()
    seen: dict[str, Any] = {}

    def hang(ctx: StepContext) -> None:
        release.wait(10)
        seen["cancelled"] = ctx.cancelled()
        try:
            ctx.heartbeat()
        except StepTimeoutError as exc:
            seen["heartbeat"] = exc
        seen["done"] = True

    once = RetryPolicy(max_attempts=1)
    wf = engine(
        kv,
        Step("reserve", j.step("reserve"), j.undo("reserve")),
        Step("hang", hang, retry=once, timeout_s=0.05),
    )
    state = wf.run(wf.start("batch", {}))
    release.set()
    assert state.status is RunStatus.FAILED and "StepTimeoutError" in (state.error or "")
    assert j.calls == ["reserve#1", "undo reserve#1"]
    for _ in range(100):
        if seen.get("done"):
            break
        threading.Event().wait(0.01)
    assert seen["cancelled"] is True and isinstance(seen["heartbeat"], StepTimeoutError)


def test_cancel_mid_run_compensates_and_ends_cancelled() -> None:
    kv, j = FakeKV(), Journal()
    bus = EventBus(kv, clock=kv.clock)
    flags: list[bool] = []

    def run_while_cancelled(ctx: StepContext) -> str:
        flags.append(ctx.cancelled())
        assert wf.cancel(ctx.run_id) is True
        flags.append(ctx.cancelled())
        return "partial"  # completed: it will be compensated

    wf = engine(
        kv,
        Step("reserve", j.step("reserve"), j.undo("reserve")),
        Step("run", j.step("run", then=run_while_cancelled), j.undo("run")),
        Step("release", j.step("release"), j.undo("release")),
        events=bus,
    )
    state = wf.run(wf.start("batch", {}))
    assert state.status is RunStatus.CANCELLED and state.cancel_requested
    assert flags == [False, True]
    assert j.calls == ["reserve#1", "run#1", "undo run#1", "undo reserve#1"]
    assert state.compensated == ("run", "reserve")
    assert bus.read(0)[-1].type == "job.cancelled"
    assert wf.cancel(state.run_id) is False  # finished


def test_a_step_that_stops_for_a_cancel_is_not_retried() -> None:
    kv, j = FakeKV(), Journal()

    def stop(ctx: StepContext) -> None:
        wf.cancel(ctx.run_id)
        if ctx.cancelled():
            raise RuntimeError("stopped: cancelled")

    wf = engine(
        kv,
        Step("reserve", j.step("reserve"), j.undo("reserve")),
        Step("run", j.step("run", then=stop), j.undo("run"), retry=FAST),
    )
    state = wf.run(wf.start("batch", {}))
    assert state.status is RunStatus.CANCELLED and state.error == "cancelled"
    assert j.calls == ["reserve#1", "run#1", "undo reserve#1"] and kv.clock.sleeps == []


def test_cancelling_a_pending_run_ends_it_at_once() -> None:
    kv, j = FakeKV(), Journal()
    wf = engine(kv, Step("a", j.step("a"), j.undo("a")))
    run_id = wf.start("batch", {})
    assert wf.cancel(run_id) is True
    state = wf.run(run_id)
    assert state.status is RunStatus.CANCELLED and j.calls == []
    assert wf.cancel("unknown") is False


def test_compensations_are_retried_and_one_that_keeps_failing_is_reported() -> None:
    kv, j = FakeKV(), Journal()
    wf = engine(
        kv,
        Step("a", j.step("a"), j.undo("a", fail=1), retry=FAST),
        Step("b", j.step("b"), j.undo("b", fail=99), retry=RetryPolicy(max_attempts=2)),
        Step("c", j.step("c", fail=99), retry=RetryPolicy(max_attempts=1)),
    )
    state = wf.run(wf.start("batch", {}))
    assert state.status is RunStatus.FAILED
    assert j.calls == ["a#1", "b#1", "c#1", "undo b#1", "undo b#2", "undo a#1", "undo a#2"]
    assert state.compensated == ("a",)
    assert state.error is not None and "compensation failed for b" in state.error


def test_a_run_whose_worker_died_is_resumed_from_its_checkpoint_elsewhere() -> None:
    kv, j = FakeKV(), Journal()

    def die_once(ctx: StepContext) -> str:
        if ctx.attempt == 1:
            raise WorkerDied
        return "ran"

    steps = (
        Step("validate", j.step("validate", "ok")),
        Step("run", j.step("run", then=die_once), retry=FAST),
        Step("write", j.step("write", then=lambda ctx: ctx.results["run"] + "+written")),
    )
    first = engine(kv, *steps, owner="w1", lease_s=30)
    second = engine(kv, *steps, owner="w2", lease_s=30)
    run_id = first.start("batch", {})
    with pytest.raises(WorkerDied):
        first.run(run_id)
    state = second.status(run_id)
    assert state is not None and (state.status, state.step, state.owner) == (
        RunStatus.RUNNING,
        1,
        "w1",
    )
    assert second.resume_stale() == []  # w1's lease is still live
    assert second.run(run_id).owner == "w1"  # held: returned as it is
    kv.clock.advance(31)
    assert second.resume_stale() == [run_id]
    state = second.status(run_id)
    assert state is not None and state.status is RunStatus.SUCCEEDED
    assert state.results == {"validate": "ok", "run": "ran", "write": "ran+written"}
    assert j.calls == ["validate#1", "run#1", "run#2", "write#1"]  # validate not run again
    assert second.resume_stale() == []


def test_a_worker_that_lost_its_lease_stops_and_leaves_the_run_to_the_new_owner() -> None:
    kv, j = FakeKV(), Journal()
    raised: list[BaseException] = []

    def slow(ctx: StepContext) -> str:
        if ctx.attempt == 1:  # stalls past its lease; w2 takes the run over meanwhile
            kv.clock.advance(31)
            assert second.resume_stale() == [ctx.run_id]
            try:
                ctx.heartbeat()
            except LeaseLostError as exc:
                raised.append(exc)
                raise
        return "ok"

    steps = (
        Step("a", j.step("a"), j.undo("a")),
        Step("b", j.step("b", then=slow), j.undo("b"), retry=FAST),
        Step("c", j.step("c")),
    )
    first = engine(kv, *steps, owner="w1", lease_s=30)
    second = engine(kv, *steps, owner="w2", lease_s=30)
    state = first.run(first.start("batch", {}))
    assert raised and state.status is RunStatus.SUCCEEDED
    assert j.calls == ["a#1", "b#1", "b#2", "c#1"]  # w1 neither retried nor compensated


def test_a_run_started_but_never_claimed_is_picked_up_after_a_lease() -> None:
    kv, j = FakeKV(), Journal()
    wf = engine(kv, Step("a", j.step("a", 1)), lease_s=30)
    run_id = wf.start("batch", {})  # its starter died before running it
    assert wf.resume_stale() == []
    kv.clock.advance(31)
    assert wf.resume_stale() == [run_id]
    assert j.calls == ["a#1"]


def test_attempts_used_by_workers_that_died_count_toward_the_policy() -> None:
    kv = FakeKV()

    def die(ctx: StepContext) -> None:
        raise WorkerDied

    steps = (Step("a", lambda ctx: 1, lambda ctx: None), Step("poison", die, retry=RetryPolicy(2)))
    wf = engine(kv, *steps, lease_s=30)
    run_id = wf.start("batch", {})
    for _ in range(2):
        with pytest.raises(WorkerDied):
            wf.run(run_id)
        kv.clock.advance(31)
    wf.resume_stale()
    state = wf.status(run_id)
    assert state is not None and state.status is RunStatus.FAILED
    assert "lost workers" in (state.error or "") and state.compensated == ("a",)
