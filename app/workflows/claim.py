"""A worker's hold on one workflow run (its lease, renewed by every write), and one attempt of
a step run in a thread under a timeout while the lease is kept."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from app.workflows.definition import LeaseLostError, StepContext, StepTimeoutError

CAS_ATTEMPTS = 64
Record = dict[str, Any]


class WorkflowKV(Protocol):
    """What the engine uses of app.kv's KVClient (which satisfies it)."""

    def get(self, key: str, default: Any = None) -> Any: ...

    def get_versioned(self, key: str) -> tuple[Any, int] | None: ...

    def cas(
        self, key: str, expected_version: int | None, value: Any, *, ttl: float | None = None
    ) -> tuple[bool, int | None]: ...


class Claim:
    """One engine's hold on one run: the record as it last wrote it and the random token of
    its lease. Every write renews the lease; a write that finds another token has lost the
    run (LeaseLostError); one that finds the same token (`cancel` wrote in between) applies
    its change again to what is there."""

    def __init__(
        self,
        kv: WorkflowKV,
        key: str,
        record: Record,
        version: int,
        clock: Callable[[], float],
        lease_s: float,
    ) -> None:
        self.kv = kv
        self.key = key
        self.run_id: str = record["run_id"]
        self.token: str = record["token"]
        self.record = record
        self.version = version
        self.clock = clock
        self.lease_s = lease_s
        self.lock = threading.Lock()  # the step's thread heartbeats too

    def write(self, change: Callable[[Record], Record]) -> Record:
        with self.lock:
            record, version = self.record, self.version
            for _ in range(CAS_ATTEMPTS):
                now = self.clock()
                new = change(record) | {"updated_at": now}
                if new.get("token") == self.token:  # a finished run's record has none
                    new["lease_until"] = now + self.lease_s
                ok, new_version = self.kv.cas(self.key, version, new)
                if ok and new_version is not None:
                    self.record, self.version = new, new_version
                    return new
                record, version = self._current()
            raise RuntimeError(f"run {self.run_id}: record contended {CAS_ATTEMPTS} times")

    def refresh(self) -> Record:
        """The record as stored now (raises LeaseLostError if the run was taken)."""
        with self.lock:
            self.record, self.version = self._current()
            return self.record

    def heartbeat(self) -> None:
        self.write(lambda r: r)

    def _current(self) -> tuple[Record, int]:
        got = self.kv.get_versioned(self.key)
        if got is None or got[0].get("token") != self.token:
            raise LeaseLostError(f"run {self.run_id}: another worker has taken it over")
        return got[0], got[1]


def run_attempt(
    fn: Callable[[StepContext], Any],
    ctx: StepContext,
    timeout_s: float,
    clock: Callable[[], float],
    heartbeat: Callable[[], None],
    heartbeat_s: float,
) -> Any:
    """`fn(ctx)` in a daemon thread: its result, or its exception raised here. Waits at most
    `timeout_s` (real time), calling `heartbeat` every `heartbeat_s` meanwhile; then, or when
    it returns later than `timeout_s` by `clock`, raises StepTimeoutError and abandons `ctx`
    (Python cannot stop a thread: the step is told through `ctx.cancelled()`)."""
    box: dict[str, Any] = {}
    done = threading.Event()

    def target() -> None:
        try:
            box["value"] = fn(ctx)
        except BaseException as exc:  # handed to the waiting thread, whatever it is
            box["error"] = exc
        finally:
            done.set()

    started, deadline = clock(), time.monotonic() + timeout_s
    threading.Thread(target=target, name=f"wf-{ctx.run_id}", daemon=True).start()
    while not done.wait(max(0.0, min(heartbeat_s, deadline - time.monotonic()))):
        if time.monotonic() >= deadline:
            ctx.abandon()
            raise StepTimeoutError(f"no answer within {timeout_s}s")
        try:
            heartbeat()
        except LeaseLostError:
            ctx.abandon()
            raise
    if "error" in box:
        raise box["error"]
    took = clock() - started
    if took > timeout_s:
        ctx.abandon()
        raise StepTimeoutError(f"took {took:.3g}s, over its {timeout_s}s")
    return box["value"]
