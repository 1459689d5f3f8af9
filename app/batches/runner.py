"""The line worker: leases batch lines from the active batches' queues, sends each through a
LineSender at a concurrency that backs off on overload, stores each line's first result and
acks it. Lower priority than interactive traffic by construction: it only grows into spare
capacity, and a 429 or 503 from the fleet shrinks it and pauses it, for the model that
answered so (app.batches.concurrency.ModelLimits)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from app.api.errors import APIError
from app.batches.capacity import ActiveBatches
from app.batches.concurrency import ModelLimits
from app.batches.output import ResultStore, Tally, error_record, response_record, succeeded
from app.jobs.queue import DurableQueue, Lease, QueueKV, QueueStats

logger = logging.getLogger(__name__)

OVERLOAD = frozenset({429, 503})
# A line leased for a model that is at its limit (not paused) goes back to its queue for this
# long (a batch mixing models: its queue is read for one model, the line was another's).
FULL_MODEL_HOLD_S = 0.25


class LineSender(Protocol):
    """Runs one line's request like an interactive one: (HTTP status, JSON body). To pass
    a Retry-After, raise an app.api.errors.APIError with `retry_after_s` (OverloadedError,
    ServiceUnavailableError) instead of returning the 429/503."""

    async def send(self, url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]: ...


class LineQueue(Protocol):
    """What batches use of app.jobs' DurableQueue (which satisfies it)."""

    name: str
    max_attempts: int
    visibility_s: float

    def enqueue(self, items: Sequence[tuple[str, dict[str, Any]]]) -> int: ...
    def lease(self, max_items: int, owner: str) -> list[Lease]: ...
    def ack(self, lease: Lease) -> bool: ...
    def nack(
        self,
        lease: Lease,
        error: str,
        *,
        retry_after_s: float | None = None,
        charge: bool = True,
    ) -> None: ...
    def extend(self, lease: Lease, visibility_s: float | None = None) -> Lease | None: ...
    def stats(self) -> QueueStats: ...
    def dead_letters(self) -> list[tuple[str, dict[str, Any], str]]: ...
    def drop(self) -> None: ...


def queue_name(batch_id: str) -> str:
    return f"batch:{batch_id}"


def batch_queue(kv: QueueKV, batch_id: str, **options: Any) -> DurableQueue:
    """The durable queue of one batch's lines (options: DurableQueue's keywords)."""
    return DurableQueue(kv, queue_name(batch_id), **options)


class ActiveQueues:
    """The queues of the active batches, one object kept per batch while it is active."""

    def __init__(self, active: ActiveBatches, make: Callable[[str], LineQueue]) -> None:
        self.active = active
        self.make = make
        self._queues: dict[str, LineQueue] = {}

    def __call__(self) -> list[LineQueue]:
        ids = self.active.ids()
        self._queues = {i: self._queues.get(i) or self.make(i) for i in ids}
        return list(self._queues.values())


class LineRunner:
    """One worker's loop. `queues()` lists the queues to serve; lines are taken from them in
    turn (a small batch is not stuck behind a large one)."""

    def __init__(
        self,
        sender: LineSender,
        results: ResultStore,
        queues: Callable[[], list[LineQueue]],
        *,
        owner: str,
        limits: ModelLimits | None = None,
        tally: Tally | None = None,
        flush_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sender = sender
        self.results = results
        self.queues = queues
        self.owner = owner
        self.limits = limits or ModelLimits()
        self.in_flight: Counter[str] = Counter()  # model -> its lines in flight
        self._queue_model: dict[str, str] = {}  # queue name -> model of the last line it gave
        self.tally = tally or Tally(results.kv)
        self.flush_s = flush_s
        self.clock = clock
        self.tasks: set[asyncio.Task[str]] = set()
        self._freed = asyncio.Event()  # a line ended: its place in the limit is free
        self._turn = 0
        self._flushed = clock()

    async def poll(self) -> int:
        """Start as many lines as the models' limits allow; returns how many started. Each
        queue is read for the model of the last line it gave (a batch's lines usually share
        one): not at all while that model has no place, so a busy model's batch costs no
        queue traffic, and as many lines as it has places otherwise."""
        queues = await asyncio.to_thread(self.queues)
        started = 0
        for i in range(len(queues)):
            queue = queues[(self._turn + i) % len(queues)]
            want = self.limits.available(self._queue_model.get(queue.name), self.in_flight)
            if not want:
                continue
            leases = await asyncio.to_thread(queue.lease, want, self.owner)
            for lease in leases:
                started += await self._start(queue, lease)
        self._turn += 1
        if len(self._queue_model) > 4 * len(queues) + 64:  # batches that ended
            names = {q.name for q in queues}
            self._queue_model = {k: v for k, v in self._queue_model.items() if k in names}
        if self.clock() - self._flushed >= self.flush_s:
            await self.flush()
        return started

    async def flush(self) -> None:
        self._flushed = self.clock()
        await asyncio.to_thread(self.tally.flush)

    async def _start(self, queue: LineQueue, lease: Lease) -> int:
        """Start the line (1), or put it back when its model has no place now (0): for the
        model's pause, or briefly when the model is only full."""
        model = self._queue_model[queue.name] = model_of(lease)
        if not self.limits.available(model, self.in_flight):
            paused = self.limits.of(model).pause_left()
            why = "model paused" if paused else "model at its limit"
            hold = paused or FULL_MODEL_HOLD_S
            await asyncio.to_thread(queue.nack, lease, why, retry_after_s=hold, charge=False)
            return 0
        self.in_flight[model] += 1
        task = asyncio.create_task(self.process(queue, lease, model))
        self.tasks.add(task)
        task.add_done_callback(lambda t: self._ended(t, model))
        return 1

    def _ended(self, task: asyncio.Task[str], model: str) -> None:
        self.tasks.discard(task)
        self.in_flight[model] -= 1
        if self.in_flight[model] <= 0:
            del self.in_flight[model]
        self._freed.set()

    async def run(self, stop: asyncio.Event, *, idle_s: float = 0.5) -> None:
        """Poll until `stop` is set, then let the lines in flight finish. Between polls: none
        after lines started; else until a line ends (or idle_s at most). A model paused after
        an overload is skipped by the polls meanwhile (its queues are not read), so another
        model's new batch starts at once."""
        while not stop.is_set():
            self._freed.clear()
            started = await self.poll()
            if not started:
                # A line ending (now, or while the poll ran) frees a place: look again then.
                # With none in flight, only new lines can be waited for.
                busy = bool(self.tasks) or self._freed.is_set()
                await _first(stop, self._freed if busy else None, timeout=idle_s)
        await self.drain()

    async def drain(self) -> None:
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.flush()

    async def process(self, queue: LineQueue, lease: Lease, model: str) -> str:
        """One line of `model`: "result" (stored and acked), "retry" / "overload" (nacked), or
        "lost" (the lease expired meanwhile and another worker owns the line)."""
        keeper = asyncio.create_task(self._keep_leased(queue, lease))
        try:
            status, body, retry_after = await self._send(lease.payload)
        except asyncio.CancelledError:
            await asyncio.to_thread(queue.nack, lease, "worker stopped", charge=False)
            raise
        finally:
            keeper.cancel()
        limit = self.limits.of(model)
        if status in OVERLOAD:
            wait = limit.on_overload(retry_after)
            error = f"overloaded ({status})"
            await asyncio.to_thread(queue.nack, lease, error, retry_after_s=wait, charge=False)
            return "overload"
        failed = status == 0 or status >= 500  # 0: the sender raised
        if failed and lease.attempt < queue.max_attempts:
            await asyncio.to_thread(queue.nack, lease, _describe(status, body))
            return "retry"
        if not failed:
            limit.on_success()
        return await asyncio.to_thread(self._settle, queue, lease, status, body)

    async def _send(self, payload: dict[str, Any]) -> tuple[int, dict[str, Any], float | None]:
        try:
            status, body = await self.sender.send(payload["url"], payload["body"])
            return status, body, None
        except APIError as exc:
            return exc.status, exc.body(), exc.retry_after_s
        except Exception as exc:  # a bug or a lost replica: retried, then reported
            logger.warning("batch line %s failed: %r", payload.get("custom_id"), exc)
            return 0, {"error": {"message": f"{type(exc).__name__}: {exc}"}}, None

    def _settle(self, queue: LineQueue, lease: Lease, status: int, body: dict[str, Any]) -> str:
        batch_id, custom_id = lease.payload["batch_id"], lease.payload["custom_id"]
        if status == 0:  # an exception on its last attempt
            message = str(body["error"]["message"])
            record = error_record(batch_id, custom_id, {"code": "server_error", "message": message})
        else:
            record = response_record(batch_id, custom_id, status, body)
        if self.results.store(batch_id, record):
            self.tally.add(batch_id, succeeded(record))
        return "result" if queue.ack(lease) else "lost"

    async def _keep_leased(self, queue: LineQueue, lease: Lease) -> None:
        """Extend the lease while the line runs, so a long generation is not re-leased."""
        while True:
            await asyncio.sleep(queue.visibility_s / 2)
            if await asyncio.to_thread(queue.extend, lease) is None:
                return


def model_of(lease: Lease) -> str:
    """The model a line asks for (validated when its batch was created)."""
    body = lease.payload.get("body")
    model = body.get("model") if isinstance(body, dict) else None
    return model if isinstance(model, str) else ""


async def _first(*events: asyncio.Event | None, timeout: float) -> None:
    """Wait until one of `events` is set, or `timeout` seconds pass."""
    waits = [asyncio.ensure_future(e.wait()) for e in events if e is not None]
    try:
        await asyncio.wait(waits, timeout=max(timeout, 0.01), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


def _describe(status: int, body: dict[str, Any]) -> str:
    error = body.get("error") if isinstance(body, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    return f"{f'status {status}' if status else 'error'}: {message or 'no message'}"
