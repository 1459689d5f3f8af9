"""What a workflow is (ordered steps, each with a retry policy, a timeout and an optional
compensation), what a step is handed while it runs, and what a run looks like from outside."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class LeaseLostError(RuntimeError):
    """Another worker has taken the run over (this one's lease expired): stop working on it."""


class StepTimeoutError(TimeoutError):
    """A step attempt ran past its `timeout_s`; raised into a step that goes on anyway."""


@dataclass(frozen=True)
class RetryPolicy:
    """Attempts of one step (or of its compensation), with exponential backoff between them."""

    max_attempts: int = 3
    backoff_s: float = 1.0
    multiplier: float = 2.0
    max_backoff_s: float = 30.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, not {self.max_attempts}")
        if self.backoff_s < 0 or self.multiplier < 1 or self.max_backoff_s < 0:
            raise ValueError("backoff_s and max_backoff_s must be >= 0 and multiplier >= 1")

    def delay(self, attempt: int) -> float:
        """The wait after failed attempt number `attempt` (1-based)."""
        return float(min(self.max_backoff_s, self.backoff_s * self.multiplier ** (attempt - 1)))


class StepContext:
    """What a step (or a compensation) is handed: the run's input, the JSON results of the
    steps completed before it, which attempt this is, and ways to ask whether the run was
    cancelled and to keep the run's lease while it works."""

    def __init__(
        self,
        run_id: str,
        input: dict[str, Any],
        results: dict[str, Any],
        attempt: int,
        *,
        cancelled: Callable[[], bool] = lambda: False,
        heartbeat: Callable[[], None] = lambda: None,
    ) -> None:
        self.run_id = run_id
        self.input = input
        self.results = results
        self.attempt = attempt
        self._cancelled = cancelled
        self._heartbeat = heartbeat
        self._abandoned = False

    def cancelled(self) -> bool:
        """True once the run is asked to cancel, or this attempt has timed out: a long step
        checks it now and then and stops early (raising) when it is True."""
        return self._abandoned or self._cancelled()

    def heartbeat(self) -> None:
        """Extend the run's lease; raises LeaseLostError if another worker has taken the run,
        StepTimeoutError if this attempt has timed out."""
        if self._abandoned:
            raise StepTimeoutError(f"run {self.run_id}: this attempt has timed out")
        self._heartbeat()

    def abandon(self) -> None:
        """The engine has stopped waiting for this attempt."""
        self._abandoned = True


@dataclass(frozen=True)
class Step:
    """One step: `run` returns a JSON-able result that later steps read by the step's name
    (kept in the run's record: ids and counts, not data); `compensate` undoes it once it has
    completed. Both should be idempotent: an attempt cut short by a worker's death or a
    timeout runs again."""

    name: str
    run: Callable[[StepContext], Any]
    compensate: Callable[[StepContext], None] | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    timeout_s: float = 300.0


@dataclass(frozen=True)
class Workflow:
    name: str
    steps: tuple[Step, ...]

    def __post_init__(self) -> None:
        names = [step.name for step in self.steps]
        if len(set(names)) != len(names):
            raise ValueError(f"workflow {self.name!r}: step names must be unique, got {names}")


class RunStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    COMPENSATING = "compensating"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED)


@dataclass(frozen=True)
class RunState:
    """A run as stored: `step` is how many steps have completed, `compensated` the steps
    undone so far (in the order undone), `owner` the worker holding it (None when none)."""

    run_id: str
    workflow: str
    status: RunStatus
    step: int
    results: dict[str, Any]
    error: str | None
    compensated: tuple[str, ...]
    updated_at: float
    owner: str | None
    cancel_requested: bool = False
    input: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> RunState:
        return cls(
            run_id=record["run_id"],
            workflow=record["workflow"],
            status=RunStatus(record["status"]),
            step=record["step"],
            results=dict(record["results"]),
            error=record["error"],
            compensated=tuple(record["compensated"]),
            updated_at=record["updated_at"],
            owner=record["owner"],
            cancel_requested=record["cancel"],
            input=dict(record["input"]),
        )
