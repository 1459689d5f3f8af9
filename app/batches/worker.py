"""The batch worker deployment (the line runner and the batch workflows' driver on each of its
replicas) and `batch_services`, what the gateway needs to serve /v1/files and /v1/batches."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ray import serve
from ray.exceptions import RayActorError
from ray.serve import Deployment

from app.api.errors import ServiceUnavailableError
from app.autoscaling.store import kv_connector as store_connector
from app.batches.batches import BatchStore
from app.batches.capacity import ActiveBatches, BatchQuota
from app.batches.concurrency import ModelLimits
from app.batches.driver import RunDriver
from app.batches.files import FileStore
from app.batches.output import ResultStore
from app.batches.runner import ActiveQueues, LineRunner, batch_queue
from app.batches.sender import GatewaySender
from app.batches.settings import BATCH_WORKER_APP, WORKFLOW_PREFIX, BatchSettings
from app.batches.workflow import WORKFLOW, BatchDeps, batch_workflow, start_input
from app.events.bus import EventBus
from app.kv.client import ScanPage
from app.kv.errors import ClusterNotFoundError, KVUnavailableError
from app.runtime import lower_cpu_priority
from app.workflows.engine import WorkflowEngine

logger = logging.getLogger(__name__)

RETRY_S = 5.0  # a loop that failed (the KV store unreachable) tries again after this
DRAIN_S = 10.0  # lines in flight at shutdown get this long, then go back to their queues
StartBatch = Callable[[str], Awaitable[None]]


class LazyKV:
    """The region's KV client, connected on first use (from any thread) and kept; a failed
    connection is a 503 and is tried again at the next call. Gives the methods the batch
    stores, the queue, the bus and the workflow engine use."""

    def __init__(self, connect: Callable[[], Any]) -> None:
        self._connect = connect
        self._client: Any = None
        self._lock = threading.Lock()

    def client(self) -> Any:
        if self._client is None:
            with self._lock:
                if self._client is None:
                    try:
                        self._client = self._connect()
                    except Exception as exc:
                        raise ServiceUnavailableError(
                            f"the KV store is not reachable: {exc}", retry_after_s=5
                        ) from exc
        return self._client

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """One call on the client; if the store itself has gone (its actors died, or it was
        restarted), the client is dropped so the next call connects afresh."""
        try:
            return getattr(self.client(), method)(*args, **kwargs)
        except (RayActorError, ClusterNotFoundError, KVUnavailableError) as exc:
            self._client = None
            raise ServiceUnavailableError(
                f"the KV store is not reachable: {exc}", retry_after_s=5
            ) from exc

    def get(self, key: str, default: Any = None) -> Any:
        return self._call("get", key, default)

    def get_versioned(self, key: str) -> tuple[Any, int] | None:
        result: tuple[Any, int] | None = self._call("get_versioned", key)
        return result

    def put(self, key: str, value: Any, *, ttl: float | None = None) -> int:
        return int(self._call("put", key, value, ttl=ttl))

    def delete(self, key: str) -> bool:
        return bool(self._call("delete", key))

    def cas(
        self, key: str, expected_version: int | None, value: Any, *, ttl: float | None = None
    ) -> tuple[bool, int | None]:
        result: tuple[bool, int | None] = self._call("cas", key, expected_version, value, ttl=ttl)
        return result

    def mget(self, keys: Iterable[str], default: Any = None) -> list[Any]:
        return list(self._call("mget", keys, default))

    def mset(self, mapping: Mapping[str, Any], *, ttl: float | None = None) -> None:
        self._call("mset", mapping, ttl=ttl)

    def scan(
        self, prefix: str = "", *, page_size: int = 100, cursor: str | None = None
    ) -> ScanPage:
        page: ScanPage = self._call("scan", prefix, page_size=page_size, cursor=cursor)
        return page


def kv_connector(settings: BatchSettings) -> Callable[[], Any]:
    """Connects to the settings' KV cluster from inside the Ray cluster."""
    return store_connector(settings.kv_name, settings.kv_namespace)


@dataclass(frozen=True)
class BatchParts:
    """The stores and the batch workflow's engine over one KV client."""

    files: FileStore
    batches: BatchStore
    engine: WorkflowEngine
    events: EventBus


def batch_parts(
    kv: Any, settings: BatchSettings, *, owner: str, models: Callable[[], set[str]]
) -> BatchParts:
    files = FileStore(kv, settings.content_store(), limits=settings.file_limits)
    batches = BatchStore(kv, files)
    events = EventBus(kv)
    deps = BatchDeps(
        batches=batches,
        files=files,
        results=ResultStore(kv),
        quota=BatchQuota(kv, per_owner=settings.batches_per_owner, total=settings.batches_total),
        active=ActiveBatches(kv),
        queue_for=lambda b: batch_queue(kv, b, **settings.queue_options()),
        models=models,
        poll_s=settings.poll_s,
        events=events,
    )
    engine = WorkflowEngine(
        kv,
        {WORKFLOW: batch_workflow(deps)},
        owner=owner,
        lease_s=settings.lease_s,
        events=events,
        prefix=WORKFLOW_PREFIX,
    )
    return BatchParts(files, batches, engine, events)


def worker_nudger(app: str = BATCH_WORKER_APP) -> Callable[[str], Awaitable[None]]:
    """Tells a batch worker replica to drive a run now, fire and forget: with no worker app
    the run waits for a worker's sweep (RunDriver), so a failure here is only logged."""
    handle: Any = None

    async def nudge(batch_id: str) -> None:
        nonlocal handle
        try:
            if handle is None:
                handle = await asyncio.to_thread(serve.get_app_handle, app)
            handle.nudge.remote(batch_id)
        except Exception as exc:
            logger.info("batch %s: no worker nudged (%r); a worker's sweep takes it", batch_id, exc)

    return nudge


def batch_services(
    connect: Callable[[], Any],
    settings: BatchSettings,
    *,
    nudge: Callable[[str], Awaitable[None]] | None = None,
) -> tuple[FileStore, BatchStore, StartBatch]:
    """The gateway's side: the stores for BatchRoutes and `start_batch`, which records the
    batch's workflow run and nudges a worker; the gateway never drives a run. Nothing
    connects until the first request."""
    # The gateway's engine only starts runs; the worker's validates lines against its models.
    parts = batch_parts(LazyKV(connect), settings, owner=_process_name("gateway"), models=set)
    nudge = nudge or worker_nudger()

    async def start_batch(batch_id: str) -> None:
        run = start_input(batch_id)
        await asyncio.to_thread(parts.engine.start, WORKFLOW, run, run_id=batch_id)
        await nudge(batch_id)

    return parts.files, parts.batches, start_batch


def _process_name(role: str) -> str:
    try:
        return f"{role}:{serve.get_replica_context().replica_id.unique_id}"
    except Exception:  # not in a Serve replica (tests, a driver)
        return f"{role}:{os.uname().nodename}:{os.getpid()}"


class BatchWorker:
    """One replica: runs batch lines (LineRunner, on the event loop) and drives batch runs
    (RunDriver threads: when nudged, and every `sweep_s` for runs nobody drives). Connects to
    the KV store lazily and keeps trying while it is unreachable."""

    def __init__(self, models: list[str], settings: dict[str, Any] | None = None) -> None:
        self.settings = BatchSettings.model_validate(settings or {})
        if self.settings.nice:
            with contextlib.suppress(OSError):  # not permitted: run at the normal priority
                lower_cpu_priority(self.settings.nice)
        self.models = frozenset(models)
        self.owner = _process_name("batch-worker")
        self.kv = LazyKV(self.connector())
        self._stop = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._parts: tuple[BatchParts, RunDriver, LineRunner] | None = None
        self._building: asyncio.Lock | None = None
        self.last_error: str | None = None
        with contextlib.suppress(RuntimeError):  # no running loop: check_health starts them
            self.ensure_started()

    # Test seams: a unit test overrides these instead of starting Ray. -----------------------
    def connector(self) -> Callable[[], Any]:
        return kv_connector(self.settings)

    def sender(self) -> GatewaySender:
        return GatewaySender(timeout_s=self.settings.line_timeout_s)

    # Serve's hooks and methods ------------------------------------------------------------
    async def nudge(self, batch_id: str) -> None:
        """Drive this batch's run now (returns at once; the run goes on in a thread)."""
        self.ensure_started()
        _, driver, _ = await self.parts()
        if not driver.drive(batch_id):
            logger.info("batch %s: not taken here (driven already, or full)", batch_id)

    async def stats(self) -> dict[str, Any]:
        self.ensure_started()
        built = self._parts
        body: dict[str, Any] = {"owner": self.owner, "connected": built is not None}
        body["last_error"] = self.last_error
        if built is not None:
            _, driver, runner = built
            body["runs"] = driver.driving()
            body["lines_in_flight"] = len(runner.tasks)
            body["models"] = runner.limits.describe(runner.in_flight)
        return body

    async def check_health(self) -> None:
        """Restarts a loop that ended; an unreachable KV store is not a reason to restart
        the replica (the loops wait for it), so it never raises for that."""
        self.ensure_started()

    def __del__(self) -> Awaitable[None] | None:
        """Serve calls this at shutdown and awaits what it returns: lines in flight get
        DRAIN_S to finish, the rest go back to their queues unpaid (app.batches.runner), and
        the runs' leases lapse to other workers. Plain `def`, returning the coroutine only
        then, so the garbage collector's later call creates none."""
        stop: asyncio.Event | None = getattr(self, "_stop", None)
        if stop is None or stop.is_set() or not getattr(self, "_tasks", None):
            return None
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # not on the replica's loop: signal it, without waiting
            if self._loop is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(stop.set)
            return None
        return self.shutdown()

    async def shutdown(self, drain_s: float = DRAIN_S) -> None:
        self._stop.set()
        tasks = [t for t in self._tasks if not t.done()]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=drain_s)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)

    # Loops ----------------------------------------------------------------------------------
    def ensure_started(self) -> None:
        """Start (or restart) the line and sweep loops on the running event loop."""
        if self._stop.is_set():
            return
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
            self._building = asyncio.Lock()
            # The line runner's KV calls run in threads; Python's default pool is small.
            loop.set_default_executor(ThreadPoolExecutor(self.settings.io_threads, "batch-io"))
        loops = (self._run_lines, self._sweep)
        if not self._tasks:
            self._tasks = [loop.create_task(fn()) for fn in loops]
        elif any(t.done() for t in self._tasks):
            self._tasks = [
                loop.create_task(fn()) if t.done() else t
                for t, fn in zip(self._tasks, loops, strict=True)
            ]

    async def parts(self) -> tuple[BatchParts, RunDriver, LineRunner]:
        """The engine, driver and runner, built once the KV store answers."""
        if self._parts is None:
            assert self._building is not None, "ensure_started first"
            async with self._building:
                if self._parts is None:
                    self._parts = await asyncio.to_thread(self._build)
        return self._parts

    def _build(self) -> tuple[BatchParts, RunDriver, LineRunner]:
        s, kv = self.settings, self.kv
        kv.client()  # connect now, in this thread: a failure is retried by the caller
        parts = batch_parts(kv, s, owner=self.owner, models=lambda: set(self.models))
        driver = RunDriver(
            parts.engine, kv, prefix=WORKFLOW_PREFIX, max_runs=s.max_runs, grace_s=s.claim_grace_s
        )
        queues = ActiveQueues(ActiveBatches(kv), lambda b: batch_queue(kv, b, **s.queue_options()))
        runner = LineRunner(
            self.sender(),
            ResultStore(kv),
            queues,
            owner=self.owner,
            limits=ModelLimits(s.concurrency),
            flush_s=s.flush_s,
        )
        return parts, driver, runner

    async def _run_lines(self) -> None:
        while not self._stop.is_set():
            try:
                _, _, runner = await self.parts()
                await runner.run(self._stop, idle_s=self.settings.idle_s)
            except Exception as exc:
                self._failed("line runner", exc)
                await self._pause(RETRY_S)

    async def _sweep(self) -> None:
        while not self._stop.is_set():
            try:
                _, driver, _ = await self.parts()
                started = await asyncio.to_thread(driver.sweep)
                if started:
                    logger.info("resuming batch runs nobody drove: %s", started)
                self.last_error = None
            except Exception as exc:
                self._failed("run sweep", exc)
            await self._pause(self.settings.sweep_s)

    def _failed(self, what: str, exc: Exception) -> None:
        self.last_error = f"{what}: {type(exc).__name__}: {exc}"
        logger.warning("batch worker %s failed (retrying): %r", what, exc)

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)


# Decorated here rather than with @ so that BatchWorker stays a plain, importable class (as
# app.serving.gateway does with Gateway).
batch_worker_deployment: Deployment = serve.deployment(BatchWorker)  # type: ignore[assignment]
