"""A batch as a durable workflow: validate the input → reserve quota → run the lines → write
the output → release. Every step is idempotent (the engine retries it, another worker may
resume it) and starts by re-reading the batch, so a cancel or an expiry is seen at once.

A client's cancel is OpenAI's: lines stop, the finished ones are written out, the batch ends
`cancelled`. A step that fails for good (or the engine cancelling the run) compensates the
completed steps in reverse: delete the output files, drop the queue, release the quota, and
mark the batch failed (or cancelled)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from app.api.errors import NotFoundError
from app.batches.batches import COMPLETION_WINDOWS, TERMINAL, BatchStatus, BatchStore
from app.batches.capacity import ActiveBatches, BatchQuota
from app.batches.files import FileStore
from app.batches.lines import BatchLine, LineError, check_lines
from app.batches.output import (
    ResultStore,
    assemble,
    error_record,
    idempotency_key,
    output_file_id,
    read_counts,
    write_files,
)
from app.batches.runner import LineQueue
from app.events.bus import EventType
from app.workflows.engine import RetryPolicy, Step, Workflow

logger = logging.getLogger(__name__)

S = BatchStatus
WORKFLOW = "batch"
ENQUEUE_CHUNK = 1000
MIN_POLL_S = 0.1  # the run's wait looks at least this far apart, however close the end
HEARTBEAT_LINES = 5000


class StepCtx(Protocol):
    """What the steps use of app.workflows' StepContext."""

    run_id: str
    input: dict[str, Any]
    results: dict[str, Any]
    attempt: int

    def cancelled(self) -> bool: ...
    def heartbeat(self) -> None: ...


class EventSink(Protocol):
    def publish(self, type: str, data: dict[str, Any], *, source: str) -> Any: ...


class RunCancelledError(Exception):
    """The engine cancelled the run: the step stops and the engine compensates."""


@dataclass(frozen=True)
class BatchDeps:
    batches: BatchStore
    files: FileStore
    results: ResultStore
    quota: BatchQuota
    active: ActiveBatches
    queue_for: Callable[[str], LineQueue]  # runner.batch_queue bound to the KV client
    models: Callable[[], set[str]]
    clock: Callable[[], float] = time.time
    sleep: Callable[[float], None] = time.sleep
    poll_s: float = 2.0
    events: EventSink | None = None
    source: str = "batches"


class BatchSteps:
    """The steps and compensations; `ctx.input["batch_id"]` names the batch."""

    def __init__(self, deps: BatchDeps) -> None:
        self.d = deps

    # Helpers ---------------------------------------------------------------------------
    def _batch(self, ctx: StepCtx) -> dict[str, Any]:
        record = self.d.batches.record(ctx.input["batch_id"])
        if record is None:
            raise NotFoundError(f"batch {ctx.input['batch_id']} is gone")
        return record

    def _publish(self, kind: str, batch: dict[str, Any], **data: Any) -> None:
        if self.d.events is None:
            return
        body = {"batch_id": batch["id"], "owner": batch["owner"], "status": batch["status"]}
        try:
            self.d.events.publish(kind, body | data, source=self.d.source)
        except Exception:  # events are for watchers; the batch goes on without them
            logger.warning("could not publish %s for %s", kind, batch["id"], exc_info=True)

    def _outcomes(self, batch: dict[str, Any], models: list[str]) -> Iterator[Any]:
        lines = self.d.files.lines(batch["input_file_id"])
        return check_lines(lines, batch["endpoint"], models)

    def _fail(self, batch: dict[str, Any], code: str, message: str) -> dict[str, Any]:
        errors = {"object": "list", "data": [{"code": code, "message": message}]}
        failed = self.d.batches.advance(batch["id"], S.FAILED, errors=errors)
        self._publish(EventType.JOB_FAILED, failed, code=code)
        return {"failed": code}

    # 0. open ---------------------------------------------------------------------------
    def open(self, ctx: StepCtx) -> dict[str, Any]:
        """Only there for its compensation: the engine undoes completed steps, so a batch
        whose validate step fails for good still ends failed."""
        return {"status": self._batch(ctx)["status"]}

    # 1. validate -----------------------------------------------------------------------
    def validate(self, ctx: StepCtx) -> dict[str, Any]:
        batch = self._batch(ctx)
        if batch["status"] != S.VALIDATING:
            return {"skipped": batch["status"]}
        try:  # pinned at create; again here in case that process died in between
            self.d.files.pin(batch["owner"], batch["input_file_id"], batch["id"])
        except NotFoundError:
            return self._fail(batch, "file_not_found", "the input file no longer exists")
        models = sorted(self.d.models())
        valid = invalid = 0
        for n, outcome in enumerate(self._outcomes(batch, models)):
            valid += isinstance(outcome, BatchLine)
            invalid += isinstance(outcome, LineError)
            if n % HEARTBEAT_LINES == 0:
                ctx.heartbeat()
        if valid + invalid == 0:
            return self._fail(batch, "empty_file", "the input file has no request lines")
        counts = {"total": valid + invalid, "completed": 0, "failed": invalid}
        self.d.batches.set_fields(batch["id"], request_counts=counts)
        return {"models": models, "total": valid + invalid, "invalid": invalid}

    def fail(self, ctx: StepCtx) -> None:
        """open's compensation, so the last to run: the batch ends failed (cancelled if the
        engine cancelled the run) and its input file is deletable again."""
        batch = self._batch(ctx)
        if batch["status"] not in TERMINAL:
            if ctx.cancelled() and batch["status"] in (S.VALIDATING, S.IN_PROGRESS):
                batch = self.d.batches.advance(batch["id"], S.CANCELLING)
            if batch["status"] == S.CANCELLING:
                done = self.d.batches.advance(batch["id"], S.CANCELLED)
                self._publish(EventType.JOB_CANCELLED, done)
            else:
                self._fail(batch, "batch_failed", "the batch could not be processed")
        self.d.files.unpin(batch["input_file_id"], batch["id"])

    # 2. reserve ------------------------------------------------------------------------
    def reserve(self, ctx: StepCtx) -> dict[str, Any]:
        """Wait (still `validating`) for a place under the concurrent-batch quota."""
        while True:
            batch = self._batch(ctx)
            if batch["status"] != S.VALIDATING:
                return {"skipped": batch["status"]}
            if self.d.quota.reserve(batch["owner"], batch["id"]):
                return {"reserved": True}
            if self.d.clock() >= batch["expires_at"]:
                return {"reserved": False}
            if ctx.cancelled():
                raise RunCancelledError(batch["id"])
            ctx.heartbeat()
            self.d.sleep(self.d.poll_s)

    def unreserve(self, ctx: StepCtx) -> None:
        batch = self._batch(ctx)
        self.d.quota.release(batch["owner"], batch["id"])

    # 3. run lines: enqueue, then wait ---------------------------------------------------
    def enqueue_lines(self, ctx: StepCtx) -> dict[str, Any]:
        """Queue the valid lines and offer them to the workers. A step of its own, so its
        compensation (dropping the queue) runs when the wait after it fails or is cancelled."""
        batch = self._batch(ctx)
        if batch["status"] in TERMINAL:
            return {"skipped": batch["status"]}
        if batch["status"] == S.CANCELLING:
            return {"ended": "cancelled"}
        starting = batch["status"] == S.VALIDATING
        batch = self.d.batches.advance(batch["id"], S.IN_PROGRESS)
        if self.d.clock() >= batch["expires_at"]:
            return {"ended": "expired"}
        if starting:
            self._publish(EventType.JOB_STARTED, batch)
        self._enqueue(ctx, batch, self.d.queue_for(batch["id"]))
        self.d.active.add(batch["id"])
        return {"enqueued": True}

    def run_lines(self, ctx: StepCtx) -> dict[str, Any]:
        """Wait until the lines are done, the batch is cancelled or its window closes."""
        queued = ctx.results["enqueue_lines"]
        if "enqueued" not in queued:
            return {"ended": queued.get("ended", "completed")}
        batch = self._batch(ctx)
        if batch["status"] in TERMINAL:
            return {"skipped": batch["status"]}
        queue = self.d.queue_for(batch["id"])
        ended = self._wait(ctx, batch, queue)
        self._stop(batch["id"], queue)
        return {"ended": ended}

    def _enqueue(self, ctx: StepCtx, batch: dict[str, Any], queue: LineQueue) -> None:
        chunk: list[tuple[str, dict[str, Any]]] = []
        for outcome in self._outcomes(batch, ctx.results["validate"]["models"]):
            if isinstance(outcome, BatchLine):
                payload = {"batch_id": batch["id"], "custom_id": outcome.custom_id}
                payload |= {"url": outcome.url, "body": outcome.body, "line": outcome.line}
                chunk.append((idempotency_key(batch["id"], outcome.custom_id), payload))
            if len(chunk) == ENQUEUE_CHUNK:
                queue.enqueue(chunk)  # duplicates of an earlier attempt are ignored
                chunk = []
                ctx.heartbeat()
        if chunk:
            queue.enqueue(chunk)

    def _wait(self, ctx: StepCtx, batch: dict[str, Any], queue: LineQueue) -> str:
        invalid = int(ctx.results["validate"]["invalid"])
        counts = dict(batch["request_counts"])
        seen: tuple[float, int] | None = None  # (when, lines left) at the last look
        rate = 0.0  # lines/s, from the last look at which lines had finished
        while True:
            ctx.heartbeat()
            if ctx.cancelled():
                raise RunCancelledError(batch["id"])
            batch = self._batch(ctx)
            if batch["status"] == S.CANCELLING:
                return "cancelled"
            if self.d.clock() >= batch["expires_at"]:
                return "expired"
            completed, failed = read_counts(self.d.batches.kv, batch["id"])
            now = dict(counts, completed=completed, failed=failed + invalid)
            if now != counts:
                counts = now
                self.d.batches.set_fields(batch["id"], request_counts=counts)
                self._publish(EventType.JOB_PROGRESS, batch, request_counts=counts)
            stats = queue.stats()
            left = stats.pending + stats.leased
            if left == 0:
                return "completed"
            at = self.d.clock()
            if seen is not None and left < seen[1] and at > seen[0]:
                rate = (seen[1] - left) / (at - seen[0])
            if seen is None or left < seen[1]:
                seen = (at, left)
            self.d.sleep(next_poll_s(left, rate, self.d.poll_s))

    def _stop(self, batch_id: str, queue: LineQueue) -> None:
        """No more leases for the batch: dead-lettered lines become failed results (so the
        output says why), then the queue goes."""
        self.d.active.remove(batch_id)
        for _, payload, error in queue.dead_letters():
            reason = {"code": "server_error", "message": f"failed on every attempt: {error}"}
            self.d.results.store(batch_id, error_record(batch_id, payload["custom_id"], reason))
        queue.drop()

    def stop_lines(self, ctx: StepCtx) -> None:
        batch_id = ctx.input["batch_id"]
        self.d.active.remove(batch_id)
        self.d.queue_for(batch_id).drop()

    # 4. write output -------------------------------------------------------------------
    def write_output(self, ctx: StepCtx) -> dict[str, Any]:
        batch = self._batch(ctx)
        if batch["status"] in TERMINAL:
            return {"skipped": batch["status"]}
        ended = ctx.results["run_lines"].get("ended", "completed")
        if batch["status"] == S.IN_PROGRESS:
            batch = self.d.batches.advance(batch["id"], S.FINALIZING)
        models = ctx.results["validate"].get("models")
        if models is None:  # cancelled before validation: nothing ran, nothing to write
            return {"ended": ended}
        records = assemble(self._outcomes(batch, models), self.d.results, batch["id"], ended)
        written = write_files(
            self.d.files,
            batch["owner"],
            batch["id"],
            records,
            expires_after_s=batch.get("output_expires_after_s"),
        )
        counts = {
            "total": written.completed + written.failed,
            "completed": written.completed,
            "failed": written.failed,
        }
        self.d.batches.set_fields(
            batch["id"],
            output_file_id=written.output_file_id,
            error_file_id=written.error_file_id,
            request_counts=counts,
        )
        return {"ended": ended}

    def delete_output(self, ctx: StepCtx) -> None:
        """Partial output goes; a batch that did finish keeps its files."""
        batch = self._batch(ctx)
        if batch["status"] in TERMINAL and batch["status"] != S.FAILED:
            return
        for kind in ("output", "error"):
            self.d.files.remove(output_file_id(batch["id"], kind))
        if batch["status"] not in TERMINAL:
            self.d.batches.set_fields(batch["id"], output_file_id=None, error_file_id=None)

    # 5. release ------------------------------------------------------------------------
    def release(self, ctx: StepCtx) -> dict[str, Any]:
        """Give back what the batch held, then end it: the status is the last write, so a
        failure before it compensates into `failed` rather than a finished batch."""
        batch = self._batch(ctx)
        self.d.quota.release(batch["owner"], batch["id"])
        self.d.active.remove(batch["id"])
        self.d.files.unpin(batch["input_file_id"], batch["id"])
        ended = ctx.results.get("write_output", {}).get("ended")
        if batch["status"] == S.CANCELLING:
            batch = self.d.batches.advance(batch["id"], S.CANCELLED)
            self._publish(EventType.JOB_CANCELLED, batch)
        elif batch["status"] == S.FINALIZING:
            final = S.EXPIRED if ended == "expired" else S.COMPLETED
            batch = self.d.batches.advance(batch["id"], final)
            kind = EventType.JOB_FAILED if final == S.EXPIRED else EventType.JOB_COMPLETED
            self._publish(kind, batch, request_counts=batch["request_counts"])
        return {"status": batch["status"]}


def next_poll_s(left: int, lines_per_s: float, poll_s: float) -> float:
    """When the run's wait looks again: every poll_s, or sooner when the lines left should be
    done sooner at the rate lines have been finishing, so a batch's end is noticed within a
    fraction of poll_s rather than up to poll_s after its last line (most of a small batch's
    time otherwise)."""
    if lines_per_s <= 0:
        return poll_s
    return min(poll_s, max(MIN_POLL_S, left / lines_per_s))


def batch_workflow(deps: BatchDeps, *, name: str = WORKFLOW) -> Workflow:
    """The batch workflow; run it with input {"batch_id": ...} (see start_input)."""
    steps = BatchSteps(deps)
    window = max(COMPLETION_WINDOWS.values()) + 3600.0  # waits end at expiry, then finish
    quick = RetryPolicy(max_attempts=5, backoff_s=1.0, max_backoff_s=30.0)
    return Workflow(
        name,
        (
            # Compensated last: whatever failed after it, the batch ends failed or cancelled.
            Step("open", steps.open, steps.fail, quick, timeout_s=60.0),
            Step("validate", steps.validate, None, quick, timeout_s=1800.0),
            Step("reserve", steps.reserve, steps.unreserve, quick, timeout_s=window),
            Step("enqueue_lines", steps.enqueue_lines, steps.stop_lines, quick, 1800.0),
            Step("run_lines", steps.run_lines, None, quick, timeout_s=window),
            Step("write_output", steps.write_output, steps.delete_output, quick, 3600.0),
            Step("release", steps.release, None, quick, timeout_s=300.0),
        ),
    )


def start_input(batch_id: str) -> dict[str, Any]:
    return {"batch_id": batch_id}
