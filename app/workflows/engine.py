"""WorkflowEngine: runs workflows durably over the KV store: each step's result checkpointed,
retries with backoff, timeouts, compensation in reverse on failure or cancel, and a run taken
over by another worker when the one holding it dies.

Why no library: Temporal, Prefect (3.x), Hatchet and Restate each need their own server and
database; DBOS keeps its state in Postgres; Celery's canvas chains tasks over a broker but has
no compensation or durable step checkpoints; Ray Workflows was deprecated in Ray 2.44 and is
gone from the Ray 2.60 we run (`import ray.workflow` raises RuntimeError). Each would add a
second durable store beside the region's KV store, which already gives what a saga needs:
compare-and-set records and leases. What is here is small: steps in order, no DAG, no timers.

Key layout: `wf:run:<run_id>` holds a run's record, changed only by compare-and-set by the
engine holding its lease (a random token, renewed by every write and by heartbeats) or by
`cancel`; `wf:active` indexes unfinished runs ({run_id: created_at}) for `resume_stale`.

Timeouts of synchronous steps: each attempt runs in a daemon thread; the engine waits at most
`timeout_s` (renewing the lease meanwhile), then counts the attempt as failed and stops
waiting. Python cannot stop a thread, so the attempt is told instead: its `ctx.cancelled()`
turns True and `ctx.heartbeat()` raises; its result, if it ever returns one, is dropped. An
attempt that returns after `timeout_s` by the engine's clock is failed the same way.
"""

from __future__ import annotations

import copy
import json
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

from app.events.bus import EventBus, EventType
from app.workflows.claim import Claim, WorkflowKV, run_attempt
from app.workflows.definition import (
    LeaseLostError,
    RetryPolicy,
    RunState,
    RunStatus,
    Step,
    StepContext,
    StepTimeoutError,
    Workflow,
)

__all__ = [
    "LeaseLostError",
    "RetryPolicy",
    "RunState",
    "RunStatus",
    "Step",
    "StepContext",
    "StepTimeoutError",
    "Workflow",
    "WorkflowEngine",
]

logger = logging.getLogger(__name__)

CAS_ATTEMPTS = 64
Record = dict[str, Any]


class WorkflowEngine:
    """Starts, runs, cancels and resumes runs of the given workflows; `owner` names this
    worker in run records. Runs are driven by whoever calls `run` or `resume_stale`."""

    def __init__(
        self,
        kv: WorkflowKV,
        workflows: Mapping[str, Workflow],
        *,
        owner: str,
        lease_s: float = 30.0,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        events: EventBus | None = None,
        prefix: str = "wf",
    ) -> None:
        self.kv = kv
        self.workflows = dict(workflows)
        self.owner = owner
        self.lease_s = lease_s
        self.clock = clock
        self._sleep = sleep
        self._events = events
        self._prefix = prefix
        self._active_key = f"{prefix}:active"

    def run_key(self, run_id: str) -> str:
        return f"{self._prefix}:run:{run_id}"

    # Starting and reading ---------------------------------------------------------------
    def start(self, workflow: str, input: dict[str, Any], *, run_id: str | None = None) -> str:
        """Create a run (pending); with a `run_id` that exists already, nothing changes."""
        if workflow not in self.workflows:
            raise KeyError(f"no workflow named {workflow!r}")
        run_id = run_id or f"run_{uuid.uuid4().hex}"
        if self.kv.get(self.run_key(run_id)) is not None:
            return run_id
        now = self.clock()
        # Indexed first: a start that dies before the record is written leaves an index entry
        # (dropped by resume_stale), never a run nobody will find.
        self._index(lambda active: active | {run_id: now})
        record: Record = {
            "run_id": run_id,
            "workflow": workflow,
            "input": json.loads(json.dumps(input)),
            "status": RunStatus.PENDING.value,
            "step": 0,
            "attempt": 0,
            "results": {},
            "error": None,
            "compensated": [],
            "outcome": None,
            "cancel": False,
            "owner": None,
            "token": None,
            "lease_until": 0.0,
            "created_at": now,
            "updated_at": now,
        }
        if self.kv.cas(self.run_key(run_id), None, record)[0]:
            self._publish(EventType.JOB_SUBMITTED, record)
        return run_id

    def status(self, run_id: str) -> RunState | None:
        record = self.kv.get(self.run_key(run_id))
        return None if record is None else RunState.from_record(record)

    # Running ----------------------------------------------------------------------------
    def run(self, run_id: str) -> RunState:
        """Claim the run and drive it to an end from its last checkpoint; a run held by a
        live worker, or finished, is returned as it is. A lost lease stops the driving."""
        if self.kv.get(self.run_key(run_id)) is None:
            raise KeyError(f"no run {run_id!r}")
        claim = self._claim(run_id)
        if claim is not None:
            self._drive_claimed(claim)
        state = self.status(run_id)
        assert state is not None
        return state

    def resume_stale(self) -> list[str]:
        """Claim and drive every unfinished run whose worker's lease has expired (and every
        run started but never claimed within a lease); returns their ids."""
        active: dict[str, float] = self.kv.get(self._active_key) or {}
        resumed: list[str] = []
        for run_id in sorted(active, key=active.__getitem__):
            record = self.kv.get(self.run_key(run_id))
            now = self.clock()
            if record is None or RunStatus(record["status"]).terminal:
                if record is not None or now - active[run_id] > self.lease_s:
                    self._index(partial(_without, run_id=run_id))
                continue
            if record["owner"] is None and now - record["created_at"] < self.lease_s:
                continue  # started a moment ago: its starter is about to run it
            claim = self._claim(run_id)  # None while a live worker holds it
            if claim is not None:
                self._drive_claimed(claim)
                resumed.append(run_id)
        return resumed

    def cancel(self, run_id: str) -> bool:
        """Ask a run to stop: a pending run unclaimed is cancelled at once; a running one stops
        at its worker's next look (its step sees `ctx.cancelled()`) and compensates what it
        completed. False if the run is unknown, finished or already compensating. A run whose
        steps have all completed when its worker looks still succeeds."""
        for _ in range(CAS_ATTEMPTS):
            got = self.kv.get_versioned(self.run_key(run_id))
            if got is None:
                return False
            record, version = got
            status, now = RunStatus(record["status"]), self.clock()
            if status.terminal or status is RunStatus.COMPENSATING:
                return False
            idle = record["owner"] is None or record["lease_until"] <= now
            if status is RunStatus.PENDING and idle:
                final = _finished(record, RunStatus.CANCELLED, None) | {"updated_at": now}
                if self.kv.cas(self.run_key(run_id), version, final)[0]:
                    self._finish(final)
                    return True
            elif self.kv.cas(self.run_key(run_id), version, record | {"cancel": True})[0]:
                return True
        raise RuntimeError(f"run {run_id}: record contended {CAS_ATTEMPTS} times")

    # Driving ----------------------------------------------------------------------------
    def _claim(self, run_id: str) -> Claim | None:
        got = self.kv.get_versioned(self.run_key(run_id))
        if got is None:
            return None
        record, version = got
        now = self.clock()
        if RunStatus(record["status"]).terminal or record["workflow"] not in self.workflows:
            return None
        if record["owner"] is not None and record["lease_until"] > now:
            return None  # a live worker has it
        token = uuid.uuid4().hex
        claimed = record | {"owner": self.owner, "token": token, "lease_until": now + self.lease_s}
        ok, new_version = self.kv.cas(self.run_key(run_id), version, claimed)
        if not ok or new_version is None:
            return None
        return Claim(self.kv, self.run_key(run_id), claimed, new_version, self.clock, self.lease_s)

    def _drive_claimed(self, claim: Claim) -> None:
        try:
            self._drive(claim)
        except LeaseLostError as exc:
            logger.warning("workflow run %s: %s; leaving it to its owner", claim.run_id, exc)

    def _drive(self, claim: Claim) -> None:
        workflow = self.workflows[claim.record["workflow"]]
        if claim.record["status"] == RunStatus.PENDING:
            claim.write(lambda r: r | {"status": RunStatus.RUNNING.value})
            self._publish(EventType.JOB_STARTED, claim.record)
        while claim.record["status"] == RunStatus.RUNNING:
            index = claim.record["step"]
            if index >= len(workflow.steps):
                final = claim.write(lambda r: _finished(r, RunStatus.SUCCEEDED, None))
                self._finish(final)
                return
            if claim.refresh()["cancel"]:
                self._begin_compensation(claim, RunStatus.CANCELLED, "cancelled")
                break
            step = workflow.steps[index]
            ok, value, error = self._attempts(claim, step, step.run, compensating=False)
            if ok:
                claim.write(partial(_completed, name=step.name, value=value))
                self._publish(
                    EventType.JOB_PROGRESS,
                    claim.record,
                    step=step.name,
                    completed=index + 1,
                    total=len(workflow.steps),
                )
            elif claim.refresh()["cancel"]:  # the step stopped for the cancel
                self._begin_compensation(claim, RunStatus.CANCELLED, "cancelled")
            else:
                self._begin_compensation(claim, RunStatus.FAILED, error)
        if claim.record["status"] == RunStatus.COMPENSATING:
            self._compensate(claim, workflow)

    def _begin_compensation(self, claim: Claim, outcome: RunStatus, error: str | None) -> None:
        claim.write(
            lambda r: (
                r
                | {"status": RunStatus.COMPENSATING.value, "outcome": outcome.value}
                | {"error": error, "attempt": 0}
            )
        )

    def _compensate(self, claim: Claim, workflow: Workflow) -> None:
        """Undo the completed steps, last first, each compensation retried per its step's
        policy; one that still fails is recorded and the others go on."""
        for step in reversed(workflow.steps[: claim.record["step"]]):
            record = claim.record
            if step.compensate is None or step.name in record["compensated"]:
                continue
            if step.name in record.get("uncompensated", []):
                continue
            ok, _, error = self._attempts(claim, step, step.compensate, compensating=True)
            field = "compensated" if ok else "uncompensated"
            claim.write(partial(_appended, field=field, name=step.name))
            if not ok:
                logger.error(
                    "workflow run %s: compensation of %s failed: %s", claim.run_id, step.name, error
                )
        outcome = RunStatus(claim.record["outcome"])
        failed = claim.record.get("uncompensated", [])
        error = claim.record["error"]
        if failed:
            error = f"{error}; compensation failed for {', '.join(failed)}"
        self._finish(claim.write(lambda r: _finished(r, outcome, error)))

    def _attempts(
        self, claim: Claim, step: Step, fn: Callable[[StepContext], Any], *, compensating: bool
    ) -> tuple[bool, Any, str | None]:
        """Attempts of `fn` per the step's policy: (True, result, None), or (False, None,
        error); "cancelled" when a cancel stops the retries. The attempt count is written
        before each attempt, so a worker that dies mid-attempt has used it up."""
        policy: RetryPolicy = step.retry
        error: str | None = None
        while True:
            attempt = claim.record["attempt"] + 1
            if attempt > policy.max_attempts:
                return False, None, error or f"step {step.name}: attempts used up by lost workers"
            claim.write(partial(_merged, attempt=attempt))
            ctx = self._context(claim, attempt)
            try:
                value = run_attempt(
                    fn, ctx, step.timeout_s, self.clock, claim.heartbeat, self.lease_s / 3
                )
                return True, None if compensating else json.loads(json.dumps(value)), None
            except LeaseLostError:
                raise
            except Exception as exc:
                error = f"step {step.name}: {type(exc).__name__}: {exc}"
                logger.warning("workflow run %s, attempt %d: %s", claim.run_id, attempt, error)
            if attempt >= policy.max_attempts:
                return False, None, error
            if not compensating and claim.refresh()["cancel"]:
                return False, None, "cancelled"
            self._pause(claim, policy.delay(attempt))

    def _context(self, claim: Claim, attempt: int) -> StepContext:
        record = claim.record

        def cancelled() -> bool:
            return bool(claim.refresh()["cancel"])

        return StepContext(  # copies: a step that changes them changes nothing stored
            claim.run_id,
            copy.deepcopy(record["input"]),
            copy.deepcopy(record["results"]),
            attempt,
            cancelled=cancelled,
            heartbeat=claim.heartbeat,
        )

    def _pause(self, claim: Claim, delay: float) -> None:
        """Back off for `delay`, renewing the lease at least every third of it."""
        while delay > 0:
            chunk = min(delay, self.lease_s / 3)
            self._sleep(chunk)
            delay -= chunk
            claim.heartbeat()

    # Bookkeeping ------------------------------------------------------------------------
    def _finish(self, record: Record) -> None:
        run_id = record["run_id"]
        self._index(partial(_without, run_id=run_id))
        kind = {
            RunStatus.SUCCEEDED: EventType.JOB_COMPLETED,
            RunStatus.FAILED: EventType.JOB_FAILED,
            RunStatus.CANCELLED: EventType.JOB_CANCELLED,
        }[RunStatus(record["status"])]
        self._publish(kind, record, error=record["error"])

    def _index(self, change: Callable[[dict[str, float]], dict[str, float]]) -> None:
        for _ in range(CAS_ATTEMPTS):
            got = self.kv.get_versioned(self._active_key)
            active, version = (got[0], got[1]) if got is not None else ({}, None)
            new = change(active)
            if new == active and got is not None:
                return
            if self.kv.cas(self._active_key, version, new)[0]:
                return
        raise RuntimeError(f"{self._active_key}: contended {CAS_ATTEMPTS} times")

    def _publish(self, kind: EventType, record: Record, **data: Any) -> None:
        if self._events is None:
            return
        body = {"run_id": record["run_id"], "workflow": record["workflow"], **data}
        try:
            self._events.publish(kind, body, source=f"workflow:{self.owner}")
        except Exception:  # events inform; a run never fails for want of one
            logger.warning(
                "workflow run %s: could not publish %s", record["run_id"], kind, exc_info=True
            )


def _merged(record: Record, **fields: Any) -> Record:
    return record | fields


def _appended(record: Record, field: str, name: str) -> Record:
    return record | {field: [*record.get(field, []), name], "attempt": 0}


def _without(active: dict[str, float], run_id: str) -> dict[str, float]:
    return {k: v for k, v in active.items() if k != run_id}


def _completed(record: Record, name: str, value: Any) -> Record:
    return record | {
        "results": record["results"] | {name: value},
        "step": record["step"] + 1,
        "attempt": 0,
    }


def _finished(record: Record, status: RunStatus, error: str | None) -> Record:
    return record | {
        "status": status.value,
        "error": error,
        "owner": None,
        "token": None,
        "lease_until": 0.0,
    }
